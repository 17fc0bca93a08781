"""The binary Waterbirds data set (Sagawa et al., 2020) as the paper's experiment reads it.

A folder with ``metadata.csv`` (columns ``img_filename``, ``y`` (0 land bird, 1 water bird),
``split`` (0 train, 1 valid, 2 test), ``place`` (0 land, 1 water)) and the images it lists.
The group accuracies and the head ablation are in :mod:`clipdecomp.methods.waterbirds`.

Shapes: N images.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipdecomp.data.sources import ImageSource
from clipdecomp.methods.waterbirds import WATERBIRDS_CLASSES

__all__ = ["SPLITS", "places_of", "waterbirds_metadata", "waterbirds_source"]

#: The ``split`` column's codes.
SPLITS: dict[str, int] = {"train": 0, "valid": 1, "test": 2}


def waterbirds_metadata(root: str | os.PathLike, split: str | None = "test"):
    """The rows of ``metadata.csv`` of one split, in file order (the reference's order).

    Parameters
    ----------
    root : path
        The Waterbirds folder (``metadata.csv`` and the images it lists), or the csv itself.
    split : {"train", "valid", "test"} or None
        None keeps every row.

    Returns
    -------
    pandas.DataFrame
        Columns ``img_filename`` (str), ``y`` (int), ``split`` (int), ``place`` (int), index
        0..n-1.

    Examples
    --------
    >>> meta = waterbirds_metadata("waterbird_complete95_forest2water2")   # doctest: +SKIP
    >>> meta.groupby(["y", "place"]).size()                                 # doctest: +SKIP
    """
    import pandas as pd

    path = Path(root)
    csv = path if path.is_file() else path / "metadata.csv"
    if not csv.is_file():
        raise ValueError(f"no metadata.csv in {root}")
    df = pd.read_csv(csv)
    missing = [c for c in ("img_filename", "y", "split", "place") if c not in df.columns]
    if missing:
        raise ValueError(f"{csv} lacks the column(s) {missing}")
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)} or None, got {split!r}")
        df = df[df["split"] == SPLITS[split]]
    df = df[["img_filename", "y", "split", "place"]].reset_index(drop=True)
    for col in ("y", "split", "place"):
        df[col] = df[col].astype(np.int64)
    bad = df[~df["y"].isin([0, 1]) | ~df["place"].isin([0, 1])]
    if len(bad):
        raise ValueError(f"{csv}: y and place must be 0 or 1 (row {int(bad.index[0])})")
    df["img_filename"] = df["img_filename"].astype(str)
    return df


def waterbirds_source(root: str | os.PathLike, split: str = "test"):
    """An :class:`~clipdecomp.data.sources.ImageSource` of one Waterbirds split (labels ``y``).

    Examples
    --------
    >>> src = waterbirds_source("waterbird_complete95_forest2water2")       # doctest: +SKIP
    >>> src.classes                                                         # doctest: +SKIP
    ['landbird', 'waterbird']
    """
    meta = waterbirds_metadata(root, split)
    base = Path(root)
    base = base.parent if base.is_file() else base
    return ImageSource("waterbirds", os.fspath(base.resolve()), meta["img_filename"].tolist(),
                       meta["y"].to_numpy(np.int64), list(WATERBIRDS_CLASSES))


def places_of(paths: Sequence[str], root: str | os.PathLike) -> np.ndarray:
    """The ``place`` of each listed image, from ``metadata.csv`` (all splits).

    Examples
    --------
    >>> places_of(["a/x.jpg"], "waterbirds")                               # doctest: +SKIP
    array([1])
    """
    meta = waterbirds_metadata(root, None)
    where = dict(zip(meta["img_filename"], meta["place"]))
    missing = [p for p in paths if p not in where]
    if missing:
        raise ValueError(f"{len(missing)} image(s) are not in metadata.csv, e.g. {missing[0]!r}")
    return np.asarray([where[p] for p in paths], np.int64)
