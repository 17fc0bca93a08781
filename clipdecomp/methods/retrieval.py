"""Image retrieval in the output space of one head (or a set of heads).

The paper retrieves, for a head with a clear TextSpan role ("colours", "locations"...), the
images whose term of that head is closest to a query's: the head's output space then acts as an
image similarity of its own. :class:`HeadIndex` keeps the terms of the chosen head(s) over a
collection and answers exact top-k queries, in memory (float32) or from a memory-mapped file on
disk that is written chunk by chunk (collections larger than memory). Two rankings:
``metric="cosine"`` (unit-normalised terms, float16 on disk) and ``metric="dot"`` (the raw
terms, float32 on disk: the ranking of the reference notebook ``nns.ipynb``, which scores
``terms @ query_terms``). :meth:`HeadIndex.from_store` builds one from a store's kept layers,
reading only the layers it needs, one chunk at a time.

Shapes: N indexed images, Q queries, L layers, H heads, D embedding dim, k results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdecomp.engine.config import check_size

__all__ = ["HeadIndex", "HeadIndexWriter"]

_META = "meta.json"
_VECTORS = "vectors.f16"
_BLOCK = 65536  # index rows scored at a time
METRICS = ("cosine", "dot")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _as_heads(heads: Any) -> list[tuple[int, int]]:
    """``(l, h)`` or a list of them -> list of (l, h)."""
    if (
        isinstance(heads, (tuple, list))
        and len(heads) == 2
        and all(isinstance(v, (int, np.integer)) for v in heads)
    ):
        return [(int(heads[0]), int(heads[1]))]
    out = [(int(p[0]), int(p[1])) for p in heads]
    if not out:
        raise ValueError("select at least one head")
    return out


def _head_vectors(chunk: Any, heads: list[tuple[int, int]], normalize: bool = True
                  ) -> np.ndarray:
    """Summed terms of ``heads`` for a chunk (unit-normalised unless not ``normalize``),
    float32 [B, D]."""
    arr = chunk.heads if hasattr(chunk, "heads") else chunk
    arr = np.asarray(arr)
    if arr.ndim != 4:
        raise ValueError(f"head terms must be [B, L, H, D], got shape {arr.shape}")
    layers = np.array([p[0] for p in heads])
    hs = np.array([p[1] for p in heads])
    x = arr[:, layers, hs].sum(axis=1, dtype=np.float64)  # [B, D]
    if not normalize:
        return x.astype(np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-30)).astype(np.float32)


def _chunks(source: Any) -> Iterable[Any]:
    if hasattr(source, "heads") or isinstance(source, np.ndarray):
        yield source
    else:
        yield from source


class HeadIndexWriter:
    """Write an on-disk :class:`HeadIndex` one chunk at a time (float16 unit vectors for
    ``metric="cosine"``, float32 raw terms for ``metric="dot"``).

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> path = tempfile.mkdtemp()
    >>> with HeadIndexWriter(path, heads=(1, 0)) as w:
    ...     for _ in range(3):
    ...         w.add(np.random.default_rng(0).normal(size=(5, 2, 2, 4)))
    >>> len(HeadIndex.open(path))
    15
    """

    def __init__(self, path: str | os.PathLike, heads: Any, metric: str = "cosine"):
        self.metric = _check_metric(metric)
        self.dtype = "<f2" if metric == "cosine" else "<f4"
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.heads = _as_heads(heads)
        self.n = 0
        self.dim: int | None = None
        self._file = open(self.path / _VECTORS, "wb")  # noqa: SIM115 (closed by close())

    def add(self, chunk: Any) -> None:
        """Append a chunk: head terms [B, L, H, D] or a Decomposition (example: the class)."""
        vec = _head_vectors(chunk, self.heads, self.metric == "cosine")
        self._write(vec)

    def _write(self, vec: np.ndarray) -> None:
        if self.dim is None:
            self.dim = vec.shape[1]
        elif vec.shape[1] != self.dim:
            raise ValueError(f"chunk of dim {vec.shape[1]}, index of dim {self.dim}")
        self._file.write(np.ascontiguousarray(vec, self.dtype).tobytes())
        self.n += vec.shape[0]

    def close(self) -> HeadIndex:
        """Finish the file and open the index (example: the class)."""
        if not self._file.closed:
            self._file.close()
            meta = {"n": self.n, "dim": self.dim or 0, "heads": self.heads, "dtype": self.dtype,
                    "metric": self.metric}
            (self.path / _META).write_text(json.dumps(meta))
        return HeadIndex.open(self.path)

    def __enter__(self) -> HeadIndexWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HeadIndex:
    """Exact top-k search (cosine or dot product) over the terms of one head or a set of heads.

    Build it with :meth:`build` (from head terms, a Decomposition or an iterable of chunks),
    save it with :meth:`save` and open it again, memory-mapped, with :meth:`open`.

    Parameters
    ----------
    vectors : ndarray [N, D]
        (Summed) head terms: unit-normalised for ``metric="cosine"``, as they are for
        ``"dot"``; float32 in memory or a memmap.
    heads : list of (layer, head)
        The head(s) whose terms are indexed (summed when several).
    model : CLIP, optional
        Lets :meth:`query` take raw images (decomposed with ``model.decompose``).
    path : path, optional
        Where the index lives on disk, if it does.
    metric : {"cosine", "dot"}
        How :meth:`query` ranks: cosine similarity, or the dot product of the raw terms (the
        reference notebook's ranking).

    Examples
    --------
    >>> import numpy as np
    >>> heads = np.random.default_rng(0).normal(size=(100, 4, 2, 8))   # [N, L, H, D]
    >>> index = HeadIndex.build(heads, heads=(3, 1))
    >>> idx, scores = index.query(7, k=3)      # images most similar to image 7 for head L3.H1
    >>> int(idx[0]), round(float(scores[0]), 4)
    (7, 1.0)
    """

    def __init__(
        self,
        vectors: np.ndarray,
        heads: Any,
        model: Any = None,
        path: str | os.PathLike | None = None,
        metric: str = "cosine",
    ):
        self.metric = _check_metric(metric)
        self.vectors = vectors
        self.heads = _as_heads(heads)
        self.model = model
        self.path = None if path is None else Path(path)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        source: Any,
        heads: Any,
        path: str | os.PathLike | None = None,
        model: Any = None,
        metric: str = "cosine",
    ) -> HeadIndex:
        """Index the terms of ``heads`` over a collection.

        Parameters
        ----------
        source : ndarray [N, L, H, D], Decomposition, or iterable of either
            Head terms; an iterable is consumed chunk by chunk.
        heads : (layer, head) or list of (layer, head)
            One head, or several whose terms are summed.
        path : path, optional
            Write a float16 index there (chunk by chunk, never holding the whole collection)
            and return it memory-mapped. Default: a float32 index in memory.
        model : CLIP, optional
            See the class parameters.
        metric : {"cosine", "dot"}
            See the class parameters.

        Returns
        -------
        HeadIndex

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> heads = np.random.default_rng(0).normal(size=(50, 2, 3, 8))
        >>> HeadIndex.build(heads, heads=[(1, 0), (1, 2)])
        HeadIndex(50 images, heads L1.H0, L1.H2, dim 8)
        >>> chunks = (heads[i:i + 20] for i in range(0, 50, 20))
        >>> len(HeadIndex.build(chunks, heads=(1, 0), path=tempfile.mkdtemp()))
        50
        """
        _check_metric(metric)
        if path is not None:
            with HeadIndexWriter(path, heads, metric=metric) as writer:
                for chunk in _chunks(source):
                    writer.add(chunk)
            index = writer.close()
            index.model = model
            return index
        hs = _as_heads(heads)
        parts = [_head_vectors(chunk, hs, metric == "cosine") for chunk in _chunks(source)]
        if not parts:
            raise ValueError("no data to index")
        return cls(np.concatenate(parts, axis=0), hs, model=model, metric=metric)

    @classmethod
    def from_store(
        cls,
        store: Any,
        heads: Any,
        path: str | os.PathLike | None = None,
        model: Any = None,
        metric: str = "cosine",
    ) -> HeadIndex:
        """Index ``heads`` over a clipdecomp store, reading only their layers, chunk by chunk.

        Row i of the index is row i of the store (skipped or unfinished rows hold zeros and
        score 0; pass their rows as ``exclude`` to :meth:`query` to leave them out).

        Parameters
        ----------
        store : StoreReader or path
            A store written by :func:`clipdecomp.run_dataset`; the heads' layers must be kept.
        heads : (layer, head) or list of (layer, head)
            Model layer numbers (negative allowed), as in :meth:`build`.
        path, model, metric
            As in :meth:`build`.

        Returns
        -------
        HeadIndex

        Examples
        --------
        >>> index = HeadIndex.from_store("val.zarr", heads=(11, 3), metric="dot")  # doctest: +SKIP
        >>> idx, scores = index.query(0, k=15)                                     # doctest: +SKIP
        """
        from clipdecomp.data.store import StoreReader  # a path: open it (the data layer)

        _check_metric(metric)
        reader = store if hasattr(store, "iter_chunks") else StoreReader(store)
        n_layers = int(reader.metadata["shapes"]["layers"])
        hs = _as_heads(heads)
        wanted = sorted({layer % n_layers if layer < 0 else layer for layer, _ in hs})
        reader._layer_positions(wanted)  # raises if a layer is not kept
        local = [(wanted.index(layer % n_layers if layer < 0 else layer), h) for layer, h in hs]
        if path is not None:
            writer = HeadIndexWriter(path, hs, metric=metric)
            with writer:
                for _, chunk in reader.iter_chunks("heads", layers=wanted):
                    writer._write(_head_vectors(chunk["heads"], local, metric == "cosine"))
            index = writer.close()
            index.model = model
            return index
        parts = [_head_vectors(chunk["heads"], local, metric == "cosine")
                 for _, chunk in reader.iter_chunks("heads", layers=wanted)]
        return cls(np.concatenate(parts, axis=0), hs, model=model, metric=metric)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to a directory (float16 vectors + ``meta.json``).

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> index = HeadIndex.build(np.ones((4, 1, 1, 3)), heads=(0, 0))
        >>> path = tempfile.mkdtemp()
        >>> index.save(path)
        >>> len(HeadIndex.open(path))
        4
        """
        with HeadIndexWriter(path, self.heads, metric=self.metric) as writer:
            for r0 in range(0, len(self), _BLOCK):
                writer._write(np.asarray(self.vectors[r0 : r0 + _BLOCK], np.float32))

    @classmethod
    def open(cls, path: str | os.PathLike, model: Any = None) -> HeadIndex:
        """Open a saved index, memory-mapped (read-only); example in :meth:`save`."""
        path = Path(path)
        meta = json.loads((path / _META).read_text())
        n, dim = int(meta["n"]), int(meta["dim"])
        if n == 0:
            vectors = np.zeros((0, dim), np.float16)
        else:
            vectors = np.memmap(path / _VECTORS, dtype=meta["dtype"], mode="r", shape=(n, dim))
        return cls(vectors, [tuple(p) for p in meta["heads"]], model=model, path=path,
                   metric=meta.get("metric", "cosine"))

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    # ------------------------------------------------------------------ queries
    def _query_vectors(self, query: Any) -> tuple[np.ndarray, bool]:
        if isinstance(query, (int, np.integer)):
            return np.asarray(self.vectors[int(query)], np.float32)[None], True
        cosine = self.metric == "cosine"
        if hasattr(query, "heads"):
            return _head_vectors(query, self.heads, cosine), False
        if (isinstance(query, np.ndarray) and query.dtype != object and query.ndim in (1, 2, 4)
                and not self._is_pixels(query)):
            if query.ndim == 4:
                return _head_vectors(query, self.heads, cosine), False
            q = np.asarray(query, np.float64)
            single = q.ndim == 1
            q = q.reshape(-1, q.shape[-1])
            if q.shape[1] != self.dim:
                raise ValueError(f"query vectors must be [Q, {self.dim}], got {query.shape}")
            if cosine:
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
            return q.astype(np.float32), single
        if self.model is None:
            raise TypeError(
                "query must be an index, a vector [D] / [Q, D], head terms [Q, L, H, D] or a "
                "Decomposition; pass model= to the index to query with images"
            )
        single = not isinstance(query, (list, tuple)) and not (
            isinstance(query, np.ndarray) and query.ndim == 4
        )
        if isinstance(query, np.ndarray) and query.dtype == np.uint8 and query.ndim == 4:
            query = list(query)  # a stack of uint8 images [Q, H, W, 3]
        dec = self.model.decompose([query] if single else query)
        return _head_vectors(dec, self.heads, cosine), single

    def _is_pixels(self, a: np.ndarray) -> bool:
        """Preprocessed pixels [Q, 3, S, S] or a uint8 image, for a model to decompose."""
        if self.model is None:
            return False
        if a.dtype == np.uint8:
            return True
        size = getattr(getattr(self.model, "config", None), "image_size", None)
        return a.ndim == 4 and a.shape[1:] == (3, size, size)

    def query(
        self,
        query: Any,
        k: int = 10,
        exclude: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by the index's metric (cosine or dot product).

        Parameters
        ----------
        query : int, ndarray [D] / [Q, D] / [Q, L, H, D], Decomposition, or images
            An indexed image (its own vector; with cosine it comes back first, score 1), direction
            vector(s) in embedding space (e.g. a text embedding), head terms of new images,
            or images when the index has a ``model``.
        k : int
            Results per query.
        exclude : sequence of int, optional
            Indexed images never to return (e.g. the query image itself).

        Returns
        -------
        indices : ndarray int64 [k] (one query) or [Q, k]
        scores : ndarray float32, same shape
            Cosine similarities or dot products, best first (ties: lower index first).
        """
        k = check_size(k, "k")
        q, single = self._query_vectors(query)
        n = len(self)
        excl = None if exclude is None else np.unique(np.asarray(list(exclude), np.int64))
        n_excl = 0 if excl is None else int(((excl >= 0) & (excl < n)).sum())
        k = int(max(0, min(k, n - n_excl)))
        if k == 0:
            out_i = np.zeros((q.shape[0], 0), np.int64)
            out_s = np.zeros((q.shape[0], 0), np.float32)
            return (out_i[0], out_s[0]) if single else (out_i, out_s)
        best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
        best_i = np.zeros((q.shape[0], 0), np.int64)
        for r0 in range(0, n, _BLOCK):
            block = np.asarray(self.vectors[r0 : r0 + _BLOCK], np.float32)
            s = q @ block.T  # [Q, b]
            if excl is not None:
                inside = excl[(excl >= r0) & (excl < r0 + block.shape[0])] - r0
                s[:, inside] = -np.inf
            idx = np.broadcast_to(np.arange(r0, r0 + block.shape[0]), s.shape)
            s = np.concatenate([best_s, s], axis=1)
            idx = np.concatenate([best_i, idx], axis=1)
            if s.shape[1] > k:
                # keep the k best and every candidate tied with the k-th, so that ties
                # resolve by index at the end
                kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
                keep = s >= kth
                width = int(keep.sum(axis=1).max())
                sel = np.argsort(~keep, axis=1, kind="stable")[:, :width]
                pad = ~np.take_along_axis(keep, sel, axis=1)
                s = np.take_along_axis(s, sel, axis=1)
                s[pad] = -np.inf
                idx = np.take_along_axis(idx, sel, axis=1)
            best_s, best_i = s, idx
        order = np.lexsort((best_i, -best_s), axis=1)[:, :k] if best_s.size else best_i[:, :0]
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        if single:
            return best_i[0], best_s[0]
        return best_i, best_s

    def __repr__(self) -> str:
        where = f", on disk at {self.path}" if self.path is not None else ""
        heads = ", ".join(f"L{layer}.H{h}" for layer, h in self.heads)
        metric = "" if self.metric == "cosine" else f", {self.metric}"
        return f"HeadIndex({len(self)} images, heads {heads}, dim {self.dim}{metric}{where})"
