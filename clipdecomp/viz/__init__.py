"""Every figure and the HTML atlas: methods return data, this layer draws it (matplotlib,
imported lazily)."""
from clipdecomp.viz.atlas import Atlas, report

__all__ = ["Atlas", "report"]
