"""Streaming statistics of head terms: running sums and sums of outer products.

TextSpan (see :mod:`clipdecomp.methods.textspan`) and mean ablation depend on the head terms of a
data set only through their mean and their second moment. :class:`HeadStats` keeps, per
attention head, the number of images, the sum of its terms and the sum of their outer
products, in float64, while batches of images stream through the model; the terms themselves
are never stored. Two accumulators over disjoint data merge exactly, so the work can be split
over processes or machines.

The sums of outer products are the expensive part (``D^2`` per head and image). Rows are staged
in a float32 buffer and, each time it is full (or before anything reads the statistics), added
by the C core (``clipdecomp._core._moments_update``, csrc/moments.c): per head, the buffered
rows are centred on their own mean, multiplied in float32 (the upper triangle only, the matrix
being symmetric), and added with the float64 correction for the mean to the float64
accumulators. Precision: an entry of ``sum_outer`` gets an error of about
``sqrt(rows) * 2^-24`` (at worst ``rows * 2^-24``, rows <= 512) of ``sum |y_i y_j|`` per buffer,
y the rows about the buffer's mean, and float64 rounding otherwise; so a covariance keeps
float32 relative precision however far the terms are from the origin. How the images are split
into updates does not change the result: buffers are filled with the same rows whatever the
update sizes (a read in between adds a partial buffer early, which can move the last bits).
Inputs of another dtype are rounded to float32 for ``sum`` and ``sum_outer``; ``head_sum``,
``mlp_sum`` and ``cls_sum`` are float64 sums of the inputs as given.

Shapes: B images in a batch, L layers, H heads, D embedding dim, Ls selected layers,
K = Ls * H selected heads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipdecomp.engine import core
from clipdecomp.engine.config import check_size
from clipdecomp.engine.selection import parse_layers

__all__ = ["HeadStats"]

#: rows per float32 product of the C core (CD_MOMENTS_CHUNK of csrc/moments.h), the default
#: size of the staging buffer
BUFFER_ROWS = 512


class HeadStats:
    """Running count, sum and sum of outer products of head terms, per head, in float64.

    The outer products of 512 images at a time are computed in float32 by the C core (see the
    module docstring for the precision); everything else is float64.

    Parameters
    ----------
    layers : sequence of int, optional
        Layers whose second moments are kept (negative indices count from the end). Default:
        every layer. The second moments cost ``Ls * H * D * D * 8`` bytes (ViT-B/16: 302 MB for
        all 12 layers; ViT-H/14: 134 MB per layer, 537 MB for the last four), so select the
        layers you will analyse.
        The per-head sums (cheap) are always kept for every layer, and so are the sums of the
        MLP and class-to-class terms when the updates carry them: :func:`component_means
        <clipdecomp.methods.ablation.component_means>` turns them into the means of mean ablation.
    chunk : int
        Not used any more (the products run in the C core); accepted and saved so that older
        code and files keep working.
    buffer_rows : int
        Rows (images) staged before their outer products are added. The buffer costs
        ``buffer_rows * Ls * H * D * 4`` bytes (the default 512 rows: 134 MB for the 4 x 16
        heads of ViT-H/14's last four layers, 13 MB for one layer of ViT-B/16), allocated when
        rows are first staged. Fewer rows save memory but run slower (the float64 accumulators
        are read and written once per buffer); more than 512 rows are multiplied 512 at a time.

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

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        chunk: int = 16,
        buffer_rows: int = BUFFER_ROWS,
    ):
        self._requested_layers = None if layers is None else list(layers)
        self.chunk = check_size(chunk, "chunk")
        self.buffer_rows = check_size(buffer_rows, "buffer_rows")
        self.n = 0
        self.layers: tuple[int, ...] | None = None
        self.n_layers: int | None = None
        self._sum: np.ndarray | None = None
        self._sum_outer: np.ndarray | None = None
        self.head_sum: np.ndarray | None = None
        self.mlp_sum: np.ndarray | None = None
        self.cls_sum: np.ndarray | None = None
        self._buf: np.ndarray | None = None  # float32 [buffer_rows, K, D], rows not yet added
        self._pending = 0  # rows of _buf waiting

    # ------------------------------------------------------------------ accumulators
    # ``sum`` and ``sum_outer`` add the staged rows before they are read (or replaced).
    @property
    def sum(self) -> np.ndarray | None:
        """Sum of the head terms of the selected layers, float64 [Ls, H, D]."""
        self._flush()
        return self._sum

    @sum.setter
    def sum(self, value: np.ndarray | None) -> None:
        self._flush()
        self._sum = value

    @property
    def sum_outer(self) -> np.ndarray | None:
        """Sum of ``x x^T`` over images, per selected head, float64 [Ls, H, D, D]."""
        self._flush()
        return self._sum_outer

    @sum_outer.setter
    def sum_outer(self, value: np.ndarray | None) -> None:
        self._flush()
        self._sum_outer = value

    def _flush(self) -> None:
        """Add the staged rows to ``sum`` and ``sum_outer`` (C core)."""
        if self._pending:
            assert self._buf is not None   # rows are pending only in the buffer
            self._add_rows(self._buf[: self._pending])
            self._pending = 0

    def _add_rows(self, x: np.ndarray) -> None:
        """Add float32 rows x [n, K, D] to the float64 accumulators (in place, C core)."""
        # the core adds in place: the accumulators must be writeable C-contiguous float64
        # (arrays set from outside, e.g. read-only loads, are copied once here)
        self._sum_outer = np.require(self._sum_outer, np.float64, ["C", "A", "W"])
        self._sum = np.require(self._sum, np.float64, ["C", "A", "W"])
        dim = self._sum_outer.shape[-1]
        core.moments_update(
            self._sum_outer.reshape(-1, dim, dim), self._sum.reshape(-1, dim), x
        )

    def _stage(self, heads: np.ndarray) -> None:
        """Add the selected layers of heads [B, L, H, D], through the buffer."""
        b, _, n_heads, dim = heads.shape
        layers = self._layers()
        ls = len(layers)
        rows = self.buffer_rows
        span = layers[-1] - layers[0] + 1 == ls  # consecutive layers: one slice
        l0 = layers[0]
        i = 0
        while i < b:
            if self._pending == 0 and b - i >= rows and span and heads.dtype == np.float32:
                # a whole buffer of float32 rows: straight from the input when the core can
                # read it in place (the same rows and the same products as through the buffer)
                x = heads[i : i + rows, l0 : l0 + ls].reshape(rows, ls * n_heads, dim)
                if x.flags.aligned and x.strides[2] == 4 and min(x.strides) >= 0:
                    self._add_rows(x)
                    i += rows
                    continue
            if self._buf is None:
                self._buf = np.empty((rows, ls * n_heads, dim), np.float32)
            m = min(b - i, rows - self._pending)
            dst = self._buf[self._pending : self._pending + m].reshape(m, ls, n_heads, dim)
            if span:
                dst[...] = heads[i : i + m, l0 : l0 + ls]
            else:
                for j, layer in enumerate(layers):
                    dst[:, j] = heads[i : i + m, layer]
            self._pending += m
            i += m
            if self._pending == rows:
                self._flush()

    # ------------------------------------------------------------------ accumulation
    def _init(self, n_layers: int, n_heads: int, dim: int, mlps: bool, cls: bool) -> None:
        self.n_layers = n_layers
        self.layers = parse_layers(self._requested_layers, n_layers)
        ls = len(self.layers)
        self._buf, self._pending = None, 0
        self._sum = np.zeros((ls, n_heads, dim), np.float64)
        self._sum_outer = np.zeros((ls, n_heads, dim, dim), np.float64)
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
        if self.head_sum is None:
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
        # every check before anything is added: a refused update changes nothing
        if mlps is not None:
            mlps = np.asarray(mlps)
            if mlps.shape != (b, n_layers + 1, dim):
                raise ValueError(f"mlps must be [{b}, {n_layers + 1}, {dim}], got {mlps.shape}")
        if cls_to_cls is not None:
            cls_to_cls = np.asarray(cls_to_cls)
            if cls_to_cls.shape != (b, n_layers, dim):
                raise ValueError(
                    f"cls_to_cls must be [{b}, {n_layers}, {dim}], got {cls_to_cls.shape}"
                )
        if b == 0:
            return self
        self._stage(heads)  # sum and sum_outer of the selected layers
        assert self.head_sum is not None
        self.head_sum += heads.sum(axis=0, dtype=np.float64)
        if mlps is not None:
            self.mlp_sum += mlps.sum(axis=0, dtype=np.float64)
        if cls_to_cls is not None:
            self.cls_sum += cls_to_cls.sum(axis=0, dtype=np.float64)
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
        if other.head_sum is None:
            return self
        if self.head_sum is None:
            self._requested_layers = list(other._layers())
            self._init(
                other._n_layers(),
                other.head_sum.shape[1],
                other.head_sum.shape[2],
                other.mlp_sum is not None,
                other.cls_sum is not None,
            )
        assert self.head_sum is not None
        if self.layers != other.layers or self.head_sum.shape != other.head_sum.shape:
            raise ValueError("cannot merge statistics of different layers or shapes")
        if (self.mlp_sum is None) != (other.mlp_sum is None) or (self.cls_sum is None) != (
            other.cls_sum is None
        ):
            raise ValueError("cannot merge statistics that track different components")
        self.n += other.n
        total, outer = self._array(self.sum), self._array(self.sum_outer)   # in place
        total += self._array(other.sum)
        outer += self._array(other.sum_outer)
        self.head_sum += other.head_sum
        if self.mlp_sum is not None:
            self.mlp_sum += self._array(other.mlp_sum)
        if self.cls_sum is not None:
            self.cls_sum += self._array(other.cls_sum)
        return self

    # ------------------------------------------------------------------ results
    def _check(self) -> None:
        if self.n == 0 or self._sum is None:
            raise ValueError("no data: call update() first")

    @staticmethod
    def _array(x: np.ndarray | None) -> np.ndarray:
        """An accumulator known to be set (after the first update)."""
        assert x is not None, "no data: call update() first"
        return x

    def _layers(self) -> tuple[int, ...]:
        """The kept layers, known after the first update."""
        assert self.layers is not None, "no data: call update() first"
        return self.layers

    def _n_layers(self) -> int:
        assert self.n_layers is not None, "no data: call update() first"
        return self.n_layers

    @property
    def mean(self) -> np.ndarray:
        """Mean head term of the selected layers, float64 [Ls, H, D]."""
        self._check()
        return self._array(self.sum) / self.n

    @property
    def second_moment(self) -> np.ndarray:
        """Uncentred second moment ``E[x x^T]``, float64 [Ls, H, D, D]."""
        self._check()
        return self._array(self.sum_outer) / self.n

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
        layer = int(layer) % self._n_layers()
        if layer not in self._layers():
            raise KeyError(f"layer {layer} has no second moments (kept: {list(self._layers())})")
        return self._layers().index(layer)

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
        return (self._array(self.sum)[i, head] / self.n,
                self._array(self.sum_outer)[i, head] / self.n, self.n)

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
        arrays: dict[str, Any] = {
            "n": np.int64(self.n),
            "layers": np.asarray(self.layers, np.int64),
            "n_layers": np.int64(self._n_layers()),
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

    def __getstate__(self) -> dict:
        """Pickled with the staged rows added and without the buffer."""
        self._flush()
        state = self.__dict__.copy()
        state["_buf"], state["_pending"] = None, 0
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("buffer_rows", BUFFER_ROWS)
        for old, new in (("sum", "_sum"), ("sum_outer", "_sum_outer")):  # older pickles
            if old in state:
                state[new] = state.pop(old)
        state.setdefault("_buf", None)
        state.setdefault("_pending", 0)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        if self._sum is None:
            return "HeadStats(empty)"
        _, h, d = self._sum.shape
        extra = [name for name, v in (("mlps", self.mlp_sum), ("cls_to_cls", self.cls_sum))
                 if v is not None]
        return (
            f"HeadStats(n={self.n}, layers={list(self._layers())} of {self.n_layers}, heads={h}, "
            f"dim={d}{', with ' + ' and '.join(extra) if extra else ''})"
        )
