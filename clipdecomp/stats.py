"""Streaming statistics of head terms: running sums and sums of outer products.

TextSpan (see :mod:`clipdecomp.textspan`) and mean ablation depend on the head terms of a
data set only through their mean and their second moment. :class:`HeadStats` keeps, per
attention head, the number of images, the sum of its terms and the sum of their outer
products, in float64, while batches of images stream through the model; the terms themselves
are never stored. Two accumulators over disjoint data merge exactly, so the work can be split
over processes or machines.

Shapes: B images in a batch, L layers, H heads, D embedding dim, Ls selected layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["HeadStats"]


def _as_layers(layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """Normalise a layer selection (negative indices allowed) to sorted unique indices."""
    if layers is None:
        return tuple(range(n_layers))
    out = []
    for layer in layers:
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {n_layers} layers")
        out.append(layer % n_layers)
    if not out:
        raise ValueError("layers must name at least one layer")
    return tuple(sorted(set(out)))


class HeadStats:
    """Running count, sum and sum of outer products of head terms, per head, in float64.

    Parameters
    ----------
    layers : sequence of int, optional
        Layers whose second moments are kept (negative indices count from the end). Default:
        every layer. The second moments cost ``Ls * H * D * D * 8`` bytes (ViT-B/16: 302 MB for
        all 12 layers; ViT-H/14: 512 MB per layer), so select the layers you will analyse.
        The per-head sums (cheap) are always kept for every layer, and so are the sums of the
        MLP and class-to-class terms when the updates carry them: :func:`component_means
        <clipdecomp.ablation.component_means>` turns them into the means of mean ablation.
    chunk : int
        Heads processed per batched matrix product in :meth:`update` (bounds the temporary).

    Attributes
    ----------
    n : int
        Images seen.
    layers : tuple of int
        The layers with second moments (known after the first update).
    sum : ndarray, float64 [Ls, H, D]
        Sum of the head terms of the selected layers.
    sum_outer : ndarray, float64 [Ls, H, D, D]
        Sum of ``x x^T`` over images, per selected head.
    head_sum : ndarray, float64 [L, H, D]
        Sum of the head terms of every layer.
    mlp_sum : ndarray, float64 [L+1, D] or None
        Sum of the MLP terms (row 0: the ln_pre term), when the updates carried them.
    cls_sum : ndarray, float64 [L, D] or None
        Sum of the class-to-class terms, when the updates carried them.

    Examples
    --------
    >>> import numpy as np
    >>> stats = HeadStats(layers=[-1])
    >>> rng = np.random.default_rng(0)
    >>> for _ in range(3):
    ...     _ = stats.update(rng.normal(size=(8, 2, 3, 4)))   # [B, L, H, D]
    >>> stats.n, stats.mean.shape, stats.covariance.shape
    (24, (1, 3, 4), (1, 3, 4, 4))
    """

    def __init__(self, layers: Sequence[int] | None = None, chunk: int = 16):
        self._requested_layers = None if layers is None else list(layers)
        self.chunk = int(chunk)
        self.n = 0
        self.layers: tuple[int, ...] | None = None
        self.n_layers: int | None = None
        self.sum: np.ndarray | None = None
        self.sum_outer: np.ndarray | None = None
        self.head_sum: np.ndarray | None = None
        self.mlp_sum: np.ndarray | None = None
        self.cls_sum: np.ndarray | None = None

    # ------------------------------------------------------------------ accumulation
    def _init(self, n_layers: int, n_heads: int, dim: int, mlps: bool, cls: bool) -> None:
        self.n_layers = n_layers
        self.layers = _as_layers(self._requested_layers, n_layers)
        ls = len(self.layers)
        self.sum = np.zeros((ls, n_heads, dim), np.float64)
        self.sum_outer = np.zeros((ls, n_heads, dim, dim), np.float64)
        self.head_sum = np.zeros((n_layers, n_heads, dim), np.float64)
        self.mlp_sum = np.zeros((n_layers + 1, dim), np.float64) if mlps else None
        self.cls_sum = np.zeros((n_layers, dim), np.float64) if cls else None

    def update(
        self,
        heads: Any,
        mlps: np.ndarray | None = None,
        cls_to_cls: np.ndarray | None = None,
    ) -> HeadStats:
        """Add a batch of images.

        Parameters
        ----------
        heads : ndarray [B, L, H, D] or Decomposition
            Head terms of a batch. A Decomposition (anything with ``.heads``) also brings its
            ``.mlps`` and ``.cls_to_cls`` when present.
        mlps : ndarray [B, L+1, D], optional
            MLP terms of the same images (for the means of mean ablation).
        cls_to_cls : ndarray [B, L, D], optional
            Class-to-class terms of the same images.

        Returns
        -------
        HeadStats
            ``self``, so that updates chain.

        Examples
        --------
        >>> import numpy as np
        >>> HeadStats().update(np.ones((2, 1, 1, 3))).n
        2
        """
        if hasattr(heads, "heads"):
            dec = heads
            heads = dec.heads
            if mlps is None:
                mlps = getattr(dec, "mlps", None)
            if cls_to_cls is None:
                try:
                    cls_to_cls = getattr(dec, "cls_to_cls", None)
                except (ValueError, AttributeError):
                    cls_to_cls = None
        heads = np.asarray(heads)
        if heads.ndim != 4:
            raise ValueError(f"heads must be [B, L, H, D], got shape {heads.shape}")
        b, n_layers, n_heads, dim = heads.shape
        if self.sum is None:
            self._init(n_layers, n_heads, dim, mlps is not None, cls_to_cls is not None)
        elif self.head_sum.shape != (n_layers, n_heads, dim):
            raise ValueError(
                f"heads of shape [B, {n_layers}, {n_heads}, {dim}] do not match the "
                f"accumulated [*, {', '.join(map(str, self.head_sum.shape))}]"
            )
        if (mlps is None) != (self.mlp_sum is None):
            raise ValueError("every update must carry MLP terms, or none may")
        if (cls_to_cls is None) != (self.cls_sum is None):
            raise ValueError("every update must carry class-to-class terms, or none may")
        if b == 0:
            return self
        x64 = heads.astype(np.float64, copy=False)
        self.head_sum += x64.sum(axis=0)
        sel = x64[:, list(self.layers)]  # [B, Ls, H, D]
        self.sum += sel.sum(axis=0)
        # sum of outer products, batched: [K, D, B] @ [K, B, D] for K heads at a time
        flat = sel.reshape(b, -1, dim).transpose(1, 0, 2)  # [Ls*H, B, D]
        outer = self.sum_outer.reshape(-1, dim, dim)  # view [Ls*H, D, D]
        for k0 in range(0, flat.shape[0], self.chunk):
            block = np.ascontiguousarray(flat[k0 : k0 + self.chunk])  # [k, B, D]
            outer[k0 : k0 + self.chunk] += np.matmul(block.transpose(0, 2, 1), block)
        if mlps is not None:
            mlps = np.asarray(mlps, dtype=np.float64)
            if mlps.shape != (b, n_layers + 1, dim):
                raise ValueError(f"mlps must be [{b}, {n_layers + 1}, {dim}], got {mlps.shape}")
            self.mlp_sum += mlps.sum(axis=0)
        if cls_to_cls is not None:
            cls_to_cls = np.asarray(cls_to_cls, dtype=np.float64)
            if cls_to_cls.shape != (b, n_layers, dim):
                raise ValueError(
                    f"cls_to_cls must be [{b}, {n_layers}, {dim}], got {cls_to_cls.shape}"
                )
            self.cls_sum += cls_to_cls.sum(axis=0)
        self.n += b
        return self

    def merge(self, other: HeadStats) -> HeadStats:
        """Add the statistics of ``other`` (disjoint images) to ``self``; exact.

        Examples
        --------
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(10, 1, 2, 3))
        >>> a, b = HeadStats().update(x[:4]), HeadStats().update(x[4:])
        >>> bool(np.allclose(a.merge(b).sum_outer, HeadStats().update(x).sum_outer))
        True
        """
        if other.sum is None:
            return self
        if self.sum is None:
            self._requested_layers = list(other.layers)
            self._init(
                other.n_layers,
                other.head_sum.shape[1],
                other.head_sum.shape[2],
                other.mlp_sum is not None,
                other.cls_sum is not None,
            )
        if self.layers != other.layers or self.head_sum.shape != other.head_sum.shape:
            raise ValueError("cannot merge statistics of different layers or shapes")
        if (self.mlp_sum is None) != (other.mlp_sum is None) or (self.cls_sum is None) != (
            other.cls_sum is None
        ):
            raise ValueError("cannot merge statistics that track different components")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        self.head_sum += other.head_sum
        if self.mlp_sum is not None:
            self.mlp_sum += other.mlp_sum
        if self.cls_sum is not None:
            self.cls_sum += other.cls_sum
        return self

    # ------------------------------------------------------------------ results
    def _check(self) -> None:
        if self.n == 0 or self.sum is None:
            raise ValueError("no data: call update() first")

    @property
    def mean(self) -> np.ndarray:
        """Mean head term of the selected layers, float64 [Ls, H, D]."""
        self._check()
        return self.sum / self.n

    @property
    def second_moment(self) -> np.ndarray:
        """Uncentred second moment ``E[x x^T]``, float64 [Ls, H, D, D]."""
        self._check()
        return self.sum_outer / self.n

    def covariance_of(self, ddof: int = 1) -> np.ndarray:
        """Covariance of the head terms, float64 [Ls, H, D, D], dividing by ``n - ddof``.

        Examples
        --------
        >>> import numpy as np
        >>> s = HeadStats().update(np.array([[[[0.0]]], [[[2.0]]]]))
        >>> float(s.covariance_of(ddof=0)[0, 0, 0, 0])
        1.0
        """
        self._check()
        if self.n - ddof <= 0:
            raise ValueError(f"need more than {ddof} images for a covariance")
        mu = self.mean
        cov = self.sum_outer - self.n * mu[..., :, None] * mu[..., None, :]
        return cov / (self.n - ddof)

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by ``n - 1``, as torch's ``std``), [Ls, H, D, D]."""
        return self.covariance_of(ddof=1)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` (negative allowed) among :attr:`layers`.

        Examples
        --------
        >>> import numpy as np
        >>> HeadStats(layers=[-1]).update(np.ones((2, 3, 1, 2))).layer_index(2)
        0
        """
        self._check()
        layer = int(layer) % self.n_layers
        if layer not in self.layers:
            raise KeyError(f"layer {layer} has no second moments (kept: {list(self.layers)})")
        return self.layers.index(layer)

    def head(self, layer: int, head: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(mean [D], second_moment [D, D], n)`` of one head, the input of TextSpan.

        Examples
        --------
        >>> import numpy as np
        >>> s = HeadStats().update(np.ones((2, 1, 1, 3)))
        >>> s.head(0, 0)[0]
        array([1., 1., 1.])
        """
        i = self.layer_index(layer)
        return self.sum[i, head] / self.n, self.sum_outer[i, head] / self.n, self.n

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to one ``.npz`` file.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> s = HeadStats().update(np.ones((2, 1, 1, 3)))
        >>> p = os.path.join(tempfile.mkdtemp(), "stats.npz")
        >>> s.save(p); HeadStats.load(p).n
        2
        """
        self._check()
        arrays = {
            "n": np.int64(self.n),
            "layers": np.asarray(self.layers, np.int64),
            "n_layers": np.int64(self.n_layers),
            "sum": self.sum,
            "sum_outer": self.sum_outer,
            "head_sum": self.head_sum,
            "chunk": np.int64(self.chunk),
        }
        if self.mlp_sum is not None:
            arrays["mlp_sum"] = self.mlp_sum
        if self.cls_sum is not None:
            arrays["cls_sum"] = self.cls_sum
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadStats:
        """Read statistics written by :meth:`save` (example there)."""
        with np.load(path) as f:
            out = cls(layers=[int(v) for v in f["layers"]], chunk=int(f["chunk"]))
            out.n = int(f["n"])
            out.n_layers = int(f["n_layers"])
            out.layers = tuple(int(v) for v in f["layers"])
            out.sum = f["sum"]
            out.sum_outer = f["sum_outer"]
            out.head_sum = f["head_sum"]
            out.mlp_sum = f["mlp_sum"] if "mlp_sum" in f.files else None
            out.cls_sum = f["cls_sum"] if "cls_sum" in f.files else None
        return out

    def __repr__(self) -> str:
        if self.sum is None:
            return "HeadStats(empty)"
        _, h, d = self.sum.shape
        extra = [name for name, v in (("mlps", self.mlp_sum), ("cls_to_cls", self.cls_sum))
                 if v is not None]
        return (
            f"HeadStats(n={self.n}, layers={list(self.layers)} of {self.n_layers}, heads={h}, "
            f"dim={d}{', with ' + ' and '.join(extra) if extra else ''})"
        )
