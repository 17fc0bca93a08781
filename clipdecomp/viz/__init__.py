"""Figures and the HTML atlas: methods return data, viz draws it."""
from .atlas import Atlas, report

__all__ = ["Atlas", "report"]
