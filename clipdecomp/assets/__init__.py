"""Files shipped with the package: the CLIP BPE vocabulary, the description pool and the
ImageNet class names. Code reads them through :func:`path`, so their folder is named once.

>>> from clipdecomp import assets
>>> assets.path("imagenet_classes.txt").name
'imagenet_classes.txt'
"""
from __future__ import annotations

from pathlib import Path

DIR: Path = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The path of the shipped file ``name`` (e.g. ``"descriptions.txt"``)."""
    return DIR / name
