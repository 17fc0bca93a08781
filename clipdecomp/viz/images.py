"""Images as figures show them: one conversion for every plot of :mod:`clipdecomp.viz`."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["display_image"]


def display_image(x: Any, centre_crop: bool = True) -> np.ndarray:
    """A displayable [S, S, 3] array (uint8, or float in [0, 1]) of what the model sees.

    Paths, PIL images, uint8 [H, W(, 3)] arrays and float [3, S, S] preprocessed pixels (the
    latter stretched to [0, 1]). With ``centre_crop``, non-square images are cropped to their
    centre square with torchvision's rounding, the region CLIP's preprocessing keeps.

    Examples
    --------
    >>> display_image(np.zeros((3, 4, 4), np.float32)).shape
    (4, 4, 3)
    """
    if isinstance(x, (str, os.PathLike)):
        from PIL import Image

        with Image.open(x) as im:
            x = np.asarray(im.convert("RGB"))
    elif hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        x = np.asarray(x.convert("RGB"))
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"an image must be [H, W, 3], [H, W] or [3, S, S]; got {a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        if lo < 0 or hi > 1:  # normalised pixels: stretch to [0, 1] for display
            a = (a - lo) / max(hi - lo, 1e-12)
        a = np.clip(a, 0, 1)
    h, w = a.shape[:2]
    if centre_crop and h != w:
        s = min(h, w)
        top, left = round((h - s) / 2.0), round((w - s) / 2.0)
        a = a[top:top + s, left:left + s]
    return a
