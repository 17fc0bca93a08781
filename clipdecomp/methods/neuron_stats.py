"""Data-set statistics of neuron second-order effects, streamed: never ``[N, F, D]`` in memory.

What the reference code's ``compute_pcas.py`` computes from the full ``[images, neurons, D]``
array, here from batches: each neuron's effects are centred by their mean over the data set;
per neuron, the norm of the centred effect on every image, the ``k`` images with the largest
norms (k = 100 by default) and the first principal component of the centred effects on those
images, its sign chosen so that most of them project positively. The k-th largest norm is the
neuron's significance threshold (an effect above it is "significant", as in the reference's
ablations).

Two passes over the images: the mean, then the top images (a top-k by centred norm needs the
mean first). Memory: ``F * k * D`` floats for the kept effects (600 MiB for ViT-B/32 with
k = 100), ``N * F`` for the per-image norms when kept, a few batches of ``[b, F, D]``; the
principal directions are computed a slice of neurons at a time.

Shapes: N images, F neurons, D embedding dim, k top images.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EffectMean", "NeuronStats", "NeuronStatsResult", "NeuronStatsSpec",
           "load_neuron_stats", "neuron_stats", "save_neuron_stats", "stats_from_batches"]


def _as_effects(effects: Any, what: str, shape: tuple[int, int] | None) -> np.ndarray:
    e = np.asarray(effects)
    if e.ndim != 3 or not np.issubdtype(e.dtype, np.floating):
        raise ValueError(f"{what}: effects must be a float array [b, F, D], got {e.dtype} of "
                         f"shape {e.shape}")
    if shape is not None and e.shape[1:] != shape:
        raise ValueError(f"{what}: effects must have shape [b, {shape[0]}, {shape[1]}], got "
                         f"{e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{what}: effects contain NaN or inf")
    return np.asarray(e, np.float32)


@dataclass(frozen=True)
class NeuronStatsSpec:
    """Which neuron statistics a data-set run computes (``run_dataset(..., neurons=)``).

    Parameters
    ----------
    layers : int or sequence of int
        The neuron layers (negative counts from the end; each needs a later layer). One more
        forward pass per image and layer.
    k : int
        Top images per neuron (100, as the reference).
    coefficient : float
        The reference's scale factor of the effects (100).

    Examples
    --------
    >>> NeuronStatsSpec(9)
    NeuronStatsSpec(layers=(9,), k=100, coefficient=100.0)
    >>> NeuronStatsSpec([-3, -2], k=50).resolved(12).layers
    (9, 10)
    """

    layers: tuple[int, ...]
    k: int = 100
    coefficient: float = 100.0

    def __post_init__(self) -> None:
        raw: Any = self.layers
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
            raw = (raw,)
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise TypeError(f"neuron layers must be an int or a sequence of ints, got {raw!r}")
        layers = tuple(raw)
        if not layers or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                             for v in layers):
            raise TypeError(f"neuron layers must be an int or a non-empty sequence of ints, "
                            f"got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(int(v) for v in layers))
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        object.__setattr__(self, "k", int(self.k))
        c = self.coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float, np.number)) \
                or not np.isfinite(c) or c == 0:
            raise ValueError(f"coefficient must be a finite non-zero number, got {c!r}")
        object.__setattr__(self, "coefficient", float(c))

    @classmethod
    def of(cls, value: Any) -> NeuronStatsSpec | None:
        """None, a spec, a layer, a sequence of layers, or a dict of the fields, as a spec.

        Examples
        --------
        >>> NeuronStatsSpec.of({"layers": [9], "k": 20}).k
        20
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"layers", "k", "coefficient"})
            if unknown:
                raise TypeError(f"neurons: unknown field(s) {unknown}; the fields are layers, k "
                                "and coefficient")
            return cls(**value)
        return cls(value)

    def resolved(self, n_layers: int) -> NeuronStatsSpec:
        """The spec with its layers checked against a model of ``n_layers`` layers, counted
        from 0 and sorted (ValueError naming a layer without a later one)."""
        out = []
        for v in self.layers:
            a = v + n_layers if v < 0 else v
            if not 0 <= a < n_layers - 1:
                raise ValueError(f"neuron layer {v} is not in [0, {n_layers - 1}) for a model "
                                 f"of {n_layers} layers (second-order effects need a later "
                                 "layer)")
            out.append(a)
        return NeuronStatsSpec(tuple(sorted(set(out))), self.k, self.coefficient)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what a store records)."""
        return {"layers": list(self.layers), "k": self.k, "coefficient": self.coefficient}


class EffectMean:
    """The mean of effects ``[b, F, D]`` over all images seen (float64 sums).

    Examples
    --------
    >>> m = EffectMean(3, 2)
    >>> m.update(np.ones((4, 3, 2)))
    >>> m.result().shape
    (3, 2)
    """

    def __init__(self, n_neurons: int, dim: int):
        self.shape = (int(n_neurons), int(dim))
        self.sum = np.zeros(self.shape, np.float64)
        self.count = 0

    def update(self, effects: Any) -> None:
        """Add a batch ``[b, F, D]``."""
        e = _as_effects(effects, "EffectMean.update", self.shape)
        self.sum += e.sum(0, dtype=np.float64)
        self.count += e.shape[0]

    def result(self) -> np.ndarray:
        """float32 ``[F, D]``."""
        if self.count == 0:
            raise ValueError("EffectMean: no images were added")
        return (self.sum / self.count).astype(np.float32)


@dataclass
class NeuronStatsResult:
    """Per-neuron statistics of second-order effects over a data set.

    Attributes
    ----------
    mean : ndarray, float32 ``[F, D]``
        Mean effect of each neuron over the images.
    top_images : ndarray, int64 ``[F, k]``
        Indices of each neuron's k images with the largest centred norm, largest first.
    top_norms : ndarray, float32 ``[F, k]``
        Their centred norms, largest first.
    pcs : ndarray, float32 ``[F, D]``
        First principal component of the centred effects on the top images (unit norm; sign:
        most top images project positively).
    norms : ndarray, float32 ``[N, F]`` or None
        Centred norm of every neuron's effect on every image (``keep_norms=True``).
    n_images : int
        N.
    layer : int or None
        The neuron layer, when known.
    """

    mean: np.ndarray
    top_images: np.ndarray
    top_norms: np.ndarray
    pcs: np.ndarray
    norms: np.ndarray | None
    n_images: int
    layer: int | None = None

    @property
    def k(self) -> int:
        return self.top_images.shape[1]

    @property
    def threshold(self) -> np.ndarray:
        """float32 ``[F]``: the k-th largest centred norm of each neuron (the reference's
        significance threshold)."""
        return self.top_norms[:, -1]

    def significant(self, norms: np.ndarray | None = None) -> np.ndarray:
        """bool ``[N, F]``: which effects exceed their neuron's threshold (default: on the
        images the statistics were computed on)."""
        n = self.norms if norms is None else np.asarray(norms)
        if n is None:
            raise ValueError("no per-image norms: computed with keep_norms=False")
        return n > self.threshold[None, :]


class NeuronStats:
    """Streaming top-k images and principal directions per neuron, given the mean effects.

    Parameters
    ----------
    mean : array ``[F, D]``
        The mean effect of each neuron over the data set (:class:`EffectMean`).
    k : int
        Top images per neuron (100 in the reference).
    keep_norms : bool
        Keep the ``[N, F]`` centred norms (for significance and sparsity).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> eff = rng.standard_normal((50, 4, 8)).astype(np.float32)
    >>> s = NeuronStats(eff.mean(0), k=5)
    >>> for i in range(0, 50, 16):
    ...     _ = s.update(eff[i:i + 16])
    >>> s.result().top_images.shape
    (4, 5)
    """

    def __init__(self, mean: Any, k: int = 100, keep_norms: bool = True):
        m = np.asarray(mean, np.float32)
        if m.ndim != 2:
            raise ValueError(f"mean must be [F, D], got shape {m.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.mean = m
        self.k = int(k)
        F, D = m.shape
        self.top_norms = np.full((F, self.k), -np.inf, np.float32)
        self.top_idx = np.full((F, self.k), -1, np.int64)
        self.top_eff = np.zeros((F, self.k, D), np.float32)
        self.keep_norms = keep_norms
        self._norms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.count = 0

    def update(self, effects: Any, start: int | None = None,
               index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Add a batch of effects ``[b, F, D]`` of images ``start .. start + b - 1`` (default:
        following the images added so far), or of the images ``index`` (int ``[b]``). Returns
        the batch's centred norms, float32 ``[b, F]``."""
        e = _as_effects(effects, "NeuronStats.update", self.mean.shape)
        b = e.shape[0]
        if index is not None:
            if start is not None:
                raise ValueError("NeuronStats.update: give start or index, not both")
            idx = np.asarray(index)
            if idx.shape != (b,) or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"NeuronStats.update: index must be {b} ints, got "
                                 f"{idx.dtype} of shape {idx.shape}")
            idx = idx.astype(np.int64)
        else:
            if start is None:
                start = self.count
            idx = np.arange(start, start + b, dtype=np.int64)
        cen = e - self.mean[None]
        nrm = np.linalg.norm(cen, axis=-1)                              # [b, F]
        if self.keep_norms and b:
            first = int(idx[0])
            if first in self._norms:
                raise ValueError(f"NeuronStats.update: images from {first} were added already")
            self._norms[first] = (idx, nrm)
        self.count += b
        if b == 0:
            return nrm
        # the k largest of (kept, new) per neuron; a new image enters only when it is strictly
        # above the neuron's current k-th norm (kept images win ties)
        k = self.k
        thr = self.top_norms.min(1)                                     # [F]
        new_vals = np.where(nrm.T > thr[:, None], nrm.T, -np.inf)       # [F, b]
        vals = np.concatenate([self.top_norms, new_vals], 1)            # [F, k + b]
        keep = np.argpartition(-vals, k - 1, axis=1)[:, :k]
        chosen = np.zeros(vals.shape, bool)
        np.put_along_axis(chosen, keep, True, 1)
        f_out, slot = np.nonzero(~chosen[:, :k])                         # evicted slots
        f_in, row = np.nonzero(chosen[:, k:])                            # entering images
        # per neuron as many enter as leave; both lists are ordered by neuron
        self.top_norms[f_out, slot] = nrm[row, f_in]
        self.top_idx[f_out, slot] = idx[row]
        self.top_eff[f_out, slot] = cen[row, f_in]
        return nrm

    def result(self, layer: int | None = None) -> NeuronStatsResult:
        """Sort the top images and compute the principal components (compute_pcas.py)."""
        if self.count == 0:
            raise ValueError("NeuronStats: no images were added")
        k = min(self.k, self.count)
        order = np.argsort(-self.top_norms, axis=1, kind="stable")[:, :k]
        top_norms = np.take_along_axis(self.top_norms, order, 1)
        top_idx = np.take_along_axis(self.top_idx, order, 1)
        F, _, D = self.top_eff.shape
        pcs = np.empty((F, D), np.float32)
        step = max(1, (64 << 20) // (8 * k * D))                        # 64 MiB of float64
        for a in range(0, F, step):
            eff = np.take_along_axis(self.top_eff[a:a + step], order[a:a + step, :, None], 1)
            pcs[a:a + step] = principal_directions(eff)
        norms = None
        if self.keep_norms:
            starts = sorted(self._norms)
            norms = np.concatenate([self._norms[s][1] for s in starts], 0)
            got = np.concatenate([self._norms[s][0] for s in starts])
            if not np.array_equal(got, np.arange(norms.shape[0])):
                raise ValueError("NeuronStats: the batches added do not cover images 0..N-1 "
                                 "exactly once")
        return NeuronStatsResult(mean=self.mean, top_images=top_idx, top_norms=top_norms,
                                 pcs=pcs, norms=norms, n_images=self.count, layer=layer)


def _one_blas_thread() -> Any:
    """One BLAS thread for the body when threadpoolctl is installed (else no change).

    The principal directions are thousands of small (k x k) eigenproblems: BLAS threads only
    add synchronisation to each, and on a machine with more busy threads than cores OpenBLAS's
    threaded divide-and-conquer eigensolver was seen to take seconds per 100 x 100 matrix."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def principal_directions(centred: np.ndarray) -> np.ndarray:
    """First right singular vector of each ``[k, D]`` matrix of ``centred [F, k, D]``, signed
    so that more than half of the rows project positively (else negated), as the reference's
    ``compute_pcas.py``: float32 ``[F, D]``.

    Examples
    --------
    >>> x = np.array([[[1.0, 0.0], [2.0, 0.0], [-0.5, 0.0]]])
    >>> principal_directions(x).round(2) + 0.0
    array([[1., 0.]], dtype=float32)
    """
    x = np.asarray(centred, np.float64)
    _, k, D = x.shape
    with _one_blas_thread():
        # the top eigenvector of the smaller of X X^T [k, k] and X^T X [D, D] (one batched
        # eigh, far cheaper than an SVD of every [k, D] matrix)
        if k <= D:
            _, u = np.linalg.eigh(x @ x.transpose(0, 2, 1))             # [F, k, k]
            pc = np.einsum("fk,fkd->fd", u[:, :, -1], x)
        else:
            pc = np.linalg.eigh(x.transpose(0, 2, 1) @ x)[1][:, :, -1]  # [F, D]
        size = np.linalg.norm(pc, axis=1, keepdims=True)
        pc = np.where(size > 0, pc / np.where(size > 0, size, 1.0), 0.0)
        pc[size[:, 0] == 0, 0] = 1.0            # all-zero effects: any unit direction
        positive = (np.einsum("fkd,fd->fk", x, pc) > 0).sum(1)
        tie = 2 * positive == k
        if tie.any():   # half the rows on each side: the rule keeps the SVD's sign, negated
            vh = np.linalg.svd(x[tie], full_matrices=False)[2][:, 0]
            pc[tie] *= np.where(np.einsum("fd,fd->f", pc[tie], vh) < 0, -1.0, 1.0)[:, None]
    sign = np.where(positive > x.shape[1] // 2, 1.0, -1.0)
    return (pc * sign[:, None]).astype(np.float32)


def stats_from_batches(batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], *,
                       k: int = 100, mean: np.ndarray | None = None, keep_norms: bool = True,
                       on_norms: Callable[[np.ndarray, np.ndarray], None] | None = None,
                       shape: tuple[int, int] | None = None,
                       layer: int | None = None) -> NeuronStatsResult:
    """Per-neuron statistics from effects that come in batches: the two passes of
    ``compute_pcas.py`` (the mean, then the top images and principal directions), streamed.

    Parameters
    ----------
    batches : callable
        ``batches()`` yields ``(index, effects)`` per batch: ``index`` int ``[b]``, the images'
        indices (unique over the data set), and ``effects`` ``[b, F, D]``. Called twice (once
        when ``mean`` is given); it must yield the same images both times.
    k : int
        Top images per neuron.
    mean : array ``[F, D]``, optional
        The mean effects, when known (one pass instead of two).
    keep_norms : bool
        Keep the ``[N, F]`` centred norms in the result (the indices must then be 0..N-1).
    on_norms : callable, optional
        ``on_norms(index, norms)`` with every batch's centred norms ``[b, F]`` (to write them
        somewhere instead of keeping them).
    shape : (F, D), optional
        The shape every batch must have (default: that of the first).
    layer : int, optional
        Recorded in the result.

    Examples
    --------
    >>> eff = np.random.default_rng(0).standard_normal((40, 3, 4)).astype(np.float32)
    >>> def batches():
    ...     for s in range(0, 40, 16):
    ...         yield np.arange(s, min(s + 16, 40)), eff[s:s + 16]
    >>> stats_from_batches(batches, k=5).top_images.shape
    (3, 5)
    """
    if mean is None:
        acc: EffectMean | None = None
        for _, eff in batches():
            if acc is None:
                F, D = shape if shape is not None else np.shape(eff)[1:]
                acc = EffectMean(F, D)
            acc.update(eff)
        if acc is None:
            raise ValueError("no images: the batches are empty")
        mean = acc.result()
    stats = NeuronStats(mean, k=k, keep_norms=keep_norms)
    if shape is not None and stats.mean.shape != tuple(shape):
        raise ValueError(f"mean must be [F, D] = {list(shape)}, got {list(stats.mean.shape)}")
    for index, eff in batches():
        nrm = stats.update(eff, index=index)
        if on_norms is not None:
            on_norms(np.asarray(index), nrm)
    return stats.result(layer=layer)


def neuron_stats(model: Any, images: Any, layer: int, *, k: int = 100,
                 mean: np.ndarray | None = None, coefficient: float = 100.0,
                 keep_norms: bool = True, batch_size: int | None = None,
                 progress: bool = False) -> NeuronStatsResult:
    """Per-neuron statistics of the second-order effects of ``layer`` over ``images``.

    Runs the model twice over the images (the mean, then the top images and directions) unless
    ``mean`` is given; only one batch of effects is in memory at a time. For a whole data set
    on disk, ``run_dataset(..., neurons=layer)`` stores the same statistics
    (:mod:`clipdecomp.data.neuron_store`).

    Parameters
    ----------
    model : CLIP
    images : list of paths / PIL images / arrays, or float pixels ``[N, 3, S, S]``
        Read twice (a generator is turned into a list first).
    layer : int
        The neuron layer (``0 <= layer < L - 1``).
    k : int
        Top images per neuron (100 in the reference).
    mean : array ``[F, D]``, optional
        Mean effects computed elsewhere (one pass instead of two).
    coefficient : float
        The reference's scale factor of the effects.
    keep_norms : bool
        Keep the ``[N, F]`` per-image norms.
    batch_size : int, optional
    progress : bool

    Returns
    -------
    NeuronStatsResult

    Examples
    --------
    >>> st = neuron_stats(model, images, layer=4, k=20)       # doctest: +SKIP
    >>> st.pcs.shape, st.top_images.shape                     # doctest: +SKIP
    ((768, 128), (768, 20))
    """
    from clipdecomp.engine.helpers import count_images, image_list, progress_bar
    from clipdecomp.methods.neurons import (
        check_neuron_layer,
        neuron_fold,
        neuron_forward,
        second_order_from,
    )

    layer = check_neuron_layer(model, layer, need_later=True)
    images = image_list(images)
    n = count_images(images)
    fold = neuron_fold(model, layer)
    c = model.config
    passes = iter(["neuron means", "neuron stats"] if mean is None else ["neuron stats"])

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with progress_bar(total=n, enabled=progress, unit="img", desc=next(passes)) as bar:
            for s, out in neuron_forward(model, images, layer, batch_size=batch_size):
                b = out["coef"].shape[0]
                yield np.arange(s, s + b), second_order_from(fold, out, float(coefficient))
                bar.update(b)

    return stats_from_batches(batches, k=k, mean=mean, keep_norms=keep_norms,
                              shape=(c.mlp_dim, c.embed_dim), layer=layer)


# -- files --------------------------------------------------------------------------------------

_ARRAYS = ("mean", "top_images", "top_norms", "pcs", "norms")


def save_neuron_stats(result: NeuronStatsResult, path: str | os.PathLike) -> str:
    """Write statistics to a Zarr store (``path`` ending in ``.zarr``, or a group inside an
    existing store such as one of :func:`clipdecomp.run_dataset`: ``"val.zarr/neurons/9"``) or,
    for any other path, to a NumPy ``.npz`` file. Returns the path written.

    Examples
    --------
    >>> save_neuron_stats(st, "val.zarr/neurons/9")           # doctest: +SKIP
    >>> load_neuron_stats("val.zarr/neurons/9").pcs.shape     # doctest: +SKIP
    (3072, 512)
    """
    path = os.fspath(path)
    arrays = {k: getattr(result, k) for k in _ARRAYS if getattr(result, k) is not None}
    meta = {"n_images": int(result.n_images), "layer": -1 if result.layer is None
            else int(result.layer), "k": int(result.k)}
    if ".zarr" in path:
        import zarr

        root, _, sub = path.partition(".zarr")
        group = zarr.open_group(root + ".zarr", mode="a")
        sub = sub.strip("/")
        g = group.require_group(sub) if sub else group
        for k, v in arrays.items():
            g.create_array(k, shape=v.shape, dtype=v.dtype, overwrite=True)[...] = v
        g.attrs.update({"neuron_stats": meta})
        return path
    if not path.endswith(".npz"):
        path += ".npz"
    np.savez(path, **arrays, meta=np.array([meta["n_images"], meta["layer"], meta["k"]]))
    return path


def load_neuron_stats(path: str | os.PathLike) -> NeuronStatsResult:
    """Read statistics written by :func:`save_neuron_stats`.

    Examples
    --------
    >>> st = load_neuron_stats("stats.npz")                   # doctest: +SKIP
    """
    path = os.fspath(path)
    if ".zarr" in path:
        import zarr

        root, _, sub = path.partition(".zarr")
        group = zarr.open_group(root + ".zarr", mode="r")
        sub = sub.strip("/")
        g: Any = group[sub] if sub else group
        meta: dict[str, Any] = dict(g.attrs.get("neuron_stats", {}))
        if not meta:
            raise ValueError(f"{path}: no neuron statistics in this group")
        arrays = {k: np.asarray(g[k][...]) for k in _ARRAYS if k in g}
        n_images, layer = meta["n_images"], meta["layer"]
    else:
        with np.load(path) as f:
            arrays = {k: f[k] for k in _ARRAYS if k in f}
            n_images, layer, _ = (int(x) for x in f["meta"])
    return NeuronStatsResult(mean=arrays["mean"], top_images=arrays["top_images"],
                             top_norms=arrays["top_norms"], pcs=arrays["pcs"],
                             norms=arrays.get("norms"), n_images=int(n_images),
                             layer=None if layer < 0 else int(layer))
