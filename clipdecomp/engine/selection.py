"""Layer selections: one parser for every function that takes ``layers=``.

>>> parse_layers("-4:", 12)
(8, 9, 10, 11)
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["LayerSelectionError", "parse_layers"]


class LayerSelectionError(IndexError, ValueError):
    """A layer selection that names no layer or a layer the model does not have.

    Both an ``IndexError`` (an index out of range) and a ``ValueError`` (a bad argument), so
    callers may catch either."""


def parse_layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    """Normalise a layer selection to sorted, unique, non-negative layer indices.

    Parameters
    ----------
    layers : None, int, slice, sequence of int, or str
        None: all layers. Strings: comma-separated ints and Python slices, e.g. ``"-4:"``,
        ``"0,5,-1"``, ``"8:12"``. Negative numbers count from the end.
    n_layers : int
        L.

    Examples
    --------
    >>> parse_layers("-4:", 12)
    (8, 9, 10, 11)
    >>> parse_layers([0, -1], 12)
    (0, 11)
    """
    L = int(n_layers)
    if layers is None:
        return tuple(range(L))
    items: list[Any]
    if isinstance(layers, str):
        items = []
        for tok in layers.replace(" ", "").split(","):
            if not tok:
                continue
            if ":" in tok:
                parts = [int(p) if p else None for p in tok.split(":")]
                if len(parts) > 3:
                    raise LayerSelectionError(f"bad layer slice {tok!r}")
                items.append(slice(*parts))
            else:
                items.append(int(tok))
    elif isinstance(layers, (int, np.integer, slice)):
        items = [layers]
    else:
        items = list(layers)
    out: set[int] = set()
    for it in items:
        if isinstance(it, slice):
            out.update(range(L)[it])
            continue
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)):
            raise TypeError(f"layers must be ints, slices or a string like '-4:', got {it!r}")
        i = int(it)
        if not -L <= i < L:
            raise LayerSelectionError(f"layer {i} is out of range for a model with {L} layers")
        out.add(i + L if i < 0 else i)
    if not out:
        raise LayerSelectionError(f"the layer selection {layers!r} selects no layer")
    return tuple(sorted(out))
