"""Text for neurons: sparse decompositions of neuron directions over a pool of texts.

As in the reference code of "Interpreting the Second-Order Effects of Neurons in CLIP", each
neuron's principal direction (:mod:`clipdecomp.neuron_stats`) is written as a sparse
combination of text embeddings found by orthogonal matching pursuit. The dictionary is the
pool's embeddings, centred by their mean over the pool, each embedding dimension (column)
scaled to unit norm over the pool and multiplied by ``coefficient`` (100), as the reference
prepares it. :func:`omp` is plain NumPy (it selects as scikit-learn's
``OrthogonalMatchingPursuit`` does, which the tests check).

Shapes: T texts, D embedding dim, M targets, k terms.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["neuron_texts", "omp", "text_dictionary"]


def omp(dictionary: Any, targets: Any, k: int) -> np.ndarray:
    """Orthogonal matching pursuit: ``k``-sparse codes of ``targets`` over ``dictionary`` atoms.

    Greedy: each step picks the atom with the largest absolute inner product with the
    residual (atoms are not normalised, as in scikit-learn), then refits the coefficients of all
    picked atoms by least squares. Stops early when the best atom is one already picked (the
    residual is orthogonal to the span, up to rounding) or the residual is zero.

    Parameters
    ----------
    dictionary : array ``[T, D]``
        One atom a row.
    targets : array ``[M, D]`` (or ``[D]``)
        The vectors to decompose.
    k : int
        Non-zero coefficients per target (at most ``min(T, D)``).

    Returns
    -------
    ndarray, float64 ``[M, T]`` (or ``[T]``)
        The codes: ``codes @ dictionary`` approximates ``targets``.

    Examples
    --------
    >>> A = np.eye(4)[:3] * [[1.0], [2.0], [3.0]]
    >>> omp(A, np.array([0.0, 4.0, 3.0, 0.0]), 2)
    array([0., 2., 1.])
    """
    A = np.asarray(dictionary, np.float64)
    Y = np.asarray(targets, np.float64)
    single = Y.ndim == 1
    if single:
        Y = Y[None]
    if A.ndim != 2 or Y.ndim != 2 or Y.shape[1] != A.shape[1]:
        raise ValueError(f"omp: dictionary [T, D] and targets [M, D] must agree, got "
                         f"{A.shape} and {Y.shape}")
    T, D = A.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(T, D):
        raise ValueError(f"omp: k must be an int in [1, min(T, D) = {min(T, D)}], got {k!r}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(Y))):
        raise ValueError("omp: dictionary and targets must be finite")
    M = Y.shape[0]
    picked: list[list[int]] = [[] for _ in range(M)]
    coefs = [np.zeros(0)] * M
    residual = Y.copy()
    active = np.ones(M, bool)
    tiny = np.finfo(np.float64).tiny
    for _ in range(int(k)):
        rows = np.nonzero(active)[0]
        if rows.size == 0:
            break
        corr = np.abs(residual[rows] @ A.T)                             # [m, T]
        best = corr.argmax(1)
        for i, m in enumerate(rows.tolist()):
            b = int(best[i])
            if b in picked[m] or corr[i, b] ** 2 <= tiny:
                active[m] = False
                continue
            picked[m].append(b)
            sel = A[picked[m]]                                          # [i, D]
            coefs[m], *_ = np.linalg.lstsq(sel.T, Y[m], rcond=None)
            residual[m] = Y[m] - coefs[m] @ sel
    codes = np.zeros((M, T))
    for m in range(M):
        codes[m, picked[m]] = coefs[m]
    return codes[0] if single else codes


def text_dictionary(text_embeddings: Any, coefficient: float = 100.0) -> np.ndarray:
    """The reference's dictionary: embeddings ``[T, D]`` centred over the pool, each column
    scaled to unit norm over the pool, times ``coefficient``.

    Examples
    --------
    >>> d = text_dictionary(np.random.default_rng(0).normal(size=(5, 3)), coefficient=1.0)
    >>> np.allclose(np.linalg.norm(d, axis=0), 1.0), np.allclose(d.mean(0), 0.0)
    (True, True)
    """
    t = np.asarray(text_embeddings, np.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"text embeddings must be [T, D] with T >= 2, got shape {t.shape}")
    t = t - t.mean(0)
    norm = np.linalg.norm(t, axis=0, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("text embeddings: a dimension is constant over the pool (its column "
                         "cannot be scaled)")
    return coefficient * t / norm


def neuron_texts(directions: Any, text_embeddings: Any, texts: Sequence[str], *, k: int = 32,
                 neurons: Sequence[int] | None = None, layer: int | None = None,
                 coefficient: float = 100.0):
    """Sparse text decompositions of neuron directions: the neuron tables.

    Parameters
    ----------
    directions : array ``[F, D]`` or NeuronStatsResult
        One direction per neuron (the first principal components ``stats.pcs``).
    text_embeddings : array ``[T, D]``
        Embeddings of the pool (:func:`clipdecomp.encode_pool`).
    texts : sequence of str ``[T]``
    k : int
        Terms per neuron (32 in the reference).
    neurons : sequence of int, optional
        Decompose only these neurons (default: all).
    layer : int, optional
        Written into the table (default: the statistics' layer).
    coefficient : float
        Scale of the dictionary (100 in the reference).

    Returns
    -------
    pandas.DataFrame
        One row per neuron: ``layer``, ``neuron``, ``texts`` (list of str, largest absolute
        coefficient first), ``weights`` (their coefficients), ``cosine`` (cosine between the
        direction and its sparse reconstruction). ``df.attrs["codes"]`` holds the codes
        ``[rows, T]``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> df = neuron_texts(rng.normal(size=(3, 8)), rng.normal(size=(20, 8)),
    ...                   [f"t{i}" for i in range(20)], k=2)
    >>> list(df.columns)
    ['layer', 'neuron', 'texts', 'weights', 'cosine']
    """
    import pandas as pd

    if hasattr(directions, "pcs"):
        layer = directions.layer if layer is None else layer
        directions = directions.pcs
    dirs = np.asarray(directions, np.float64)
    if dirs.ndim != 2:
        raise ValueError(f"directions must be [F, D], got shape {dirs.shape}")
    texts = list(texts)
    emb = np.asarray(text_embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"text_embeddings [T, D] and texts must agree: {emb.shape} and "
                         f"{len(texts)} texts")
    if emb.shape[1] != dirs.shape[1]:
        raise ValueError(f"directions have dimension {dirs.shape[1]}, text embeddings "
                         f"{emb.shape[1]}")
    idx = np.arange(dirs.shape[0]) if neurons is None else np.asarray(neurons, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= dirs.shape[0]):
        raise ValueError(f"neurons must lie in [0, {dirs.shape[0]})")
    dictionary = text_dictionary(emb, coefficient)
    codes = omp(dictionary, dirs[idx], k)
    rows = []
    for r, n in enumerate(idx):
        nz = np.nonzero(codes[r])[0]
        nz = nz[np.argsort(-np.abs(codes[r, nz]), kind="stable")]
        rec = codes[r] @ dictionary
        den = np.linalg.norm(rec) * np.linalg.norm(dirs[n])
        rows.append({"layer": layer, "neuron": int(n), "texts": [texts[i] for i in nz],
                     "weights": [float(codes[r, i]) for i in nz],
                     "cosine": float(rec @ dirs[n] / den) if den > 0 else 0.0})
    df = pd.DataFrame(rows, columns=["layer", "neuron", "texts", "weights", "cosine"])
    df.attrs["codes"] = codes
    return df
