"""TextSpan: label attention heads with the texts that span their output variance.

Given the terms ``C [N, D]`` of one head over N images and a pool of unit text embeddings
``T [M, D]``, TextSpan (Gandelsman et al., ICLR 2024) greedily picks the texts whose directions
explain most of the variance of ``C``. Two implementations pick the same texts:

:func:`textspan`
    The reference steps, on the head terms held in memory (also returns the reconstruction).
:func:`textspan_from_stats`
    The same algorithm on the head's mean and second moment only (see :class:`HeadStats
    <clipdecomp.methods.stats.HeadStats>`): the variance of ``C t`` is ``t^T S t``, so one product
    ``G = T S`` and a few rank-one updates per pick replace the ``N x M x D`` product of every
    pick. Seconds for all heads of the last layers of a ViT-H instead of a GPU job.

Conventions (all documented in the reference code, ``compute_complete_text_set.py`` of
``yossigandelsman/clip_text_span``):

* texts are projected onto the top ``rank`` right singular vectors of the *uncentred* C;
  where C has fewer than ``rank`` singular values above ``rtol * s_max`` only those are used
  (``rank_mode="clean"``, the default). A head's terms span at most ``d + 3`` dimensions (its
  value space, plus its shares of the out-projection bias, of LN_post's centring and of its
  bias): 67 for the 64-dim heads of ViT-B/16 and ViT-L/14, 83 for ViT-H/14 (d = 80), where
  ``rank = 80`` is below it and both modes agree. For d + 3 < 80 the reference also projects
  onto float32 noise vectors of the null space, which add arbitrary components to the texts
  (and so change their norms and later deflations) that depend on the SVD routine; the
  default drops them, which gives the reference's result with ``rank`` lowered to C's rank.
  ``rank_mode="reference"`` keeps them, exactly as the reference does (a float32 NumPy SVD of
  the terms, the top ``rank`` vectors whatever their singular values), so that its head tables
  come out pick for pick; it needs the terms themselves (not only their moments);
* the pick criterion is the standard deviation over images of ``C t`` with torch's default
  unbiased estimate (divide by ``N - 1``); reported variances use the same ``N - 1``;
* computation is float64 (the reference runs float32 on a GPU; near-ties may break
  differently, nothing else does).

Shapes: N images, M texts, D embedding dim, m picked texts, L layers, H heads.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.engine.selection import parse_layers

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "TextSpanResult",
    "textspan",
    "textspan_from_stats",
    "textspan_heads",
    "textspan_reconstruction_curve",
]

_CHUNK_BYTES = 64 << 20  # row block of the reference path's [N, M] products


@dataclass(repr=False)
class TextSpanResult:
    """The texts TextSpan picked for one head, and what they explain.

    Attributes
    ----------
    texts : list of str
        Picked texts, in pick order.
    indices : ndarray int64 [m]
        Their rows in the text pool.
    std : ndarray float64 [m]
        The pick criterion ``s_j*``: standard deviation over images (unbiased) of ``C t`` for
        the projected, deflated text vector ``t`` when it was picked (the reference's
        ``projection_std``). ``std**2`` is the variance of C along ``t``, scaled by ``|t|^2``.
    variance : ndarray float64 [m]
        Variance of C explained by each pick: the variance of the deflated C along the unit
        direction ``u = t / |t|`` (``= std**2 / |t|**2``), which is what the deflation removes.
    fraction : ndarray float64 [m]
        ``variance / total_variance``.
    cumulative : ndarray float64 [m]
        Running sum of ``fraction``: after k picks, ``1 - |C - R_k|^2 / |C - mean|^2`` with
        ``R_k`` the reconstruction from k texts.
    total_variance : float
        Total variance (trace of the unbiased covariance) of C.
    directions : ndarray float64 [m, D]
        The projected, deflated text vectors ``t`` at pick time (mutually orthogonal).
    mean : ndarray float64 [D]
        Mean of C over images.
    reconstruction : ndarray float64 [N, D] or None
        ``R``: the mean plus the projection of each centred row onto the picked directions
        (:func:`textspan` only; :meth:`reconstruct` makes it from any C).
    rank : int
        Number of singular vectors the texts were projected on.
    layer, head : int or None
        Which head, when known.
    """

    texts: list
    indices: np.ndarray
    std: np.ndarray
    variance: np.ndarray
    fraction: np.ndarray
    cumulative: np.ndarray
    total_variance: float
    directions: np.ndarray
    mean: np.ndarray
    reconstruction: np.ndarray | None = None
    rank: int = 0
    layer: int | None = None
    head: int | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def reconstruct(self, head_outputs: np.ndarray, n_texts: int | None = None) -> np.ndarray:
        """Text-span reconstruction of head terms from the first ``n_texts`` picks.

        ``R = mean + (C - mean) U^T U`` with U the unit picked directions; equal, up to
        rounding, to the reference's accumulated reconstruction.

        Parameters
        ----------
        head_outputs : ndarray [N, D]
            Terms of the same head (any images: a held-out set, a second pass).
        n_texts : int, optional
            Use the first ``n_texts`` picks (default: all).

        Returns
        -------
        ndarray float64 [N, D]

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> C, T = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
        >>> r = textspan(C, T / np.linalg.norm(T, axis=1, keepdims=True), n_texts=3, rank=6)
        >>> bool(np.allclose(r.reconstruct(C), r.reconstruction))
        True
        """
        k = len(self.texts) if n_texts is None else int(n_texts)
        c = np.asarray(head_outputs, np.float64) - self.mean
        u = self.directions[:k]
        u = u / np.linalg.norm(u, axis=1, keepdims=True) if k else u
        return self.mean + (c @ u.T) @ u

    def to_frame(self) -> pd.DataFrame:
        """The picks as a pandas DataFrame (text, index, std, variance, fraction, cumulative).

        Examples
        --------
        >>> import numpy as np
        >>> r = textspan(np.random.default_rng(0).normal(size=(30, 3)), np.eye(3), ["x", "y", "z"],
        ...              n_texts=2, rank=3)
        >>> list(r.to_frame().columns)[:2]
        ['text', 'index']
        """
        import pandas as pd

        return pd.DataFrame(
            {
                "text": self.texts,
                "index": self.indices,
                "std": self.std,
                "variance": self.variance,
                "fraction": self.fraction,
                "cumulative": self.cumulative,
            },
            index=pd.RangeIndex(1, len(self.texts) + 1, name="pick"),
        )

    def _title(self) -> str:
        where = "" if self.layer is None else f"L{self.layer}.H{self.head}: "
        total = self.cumulative[-1] if len(self.cumulative) else 0.0
        return f"{where}TextSpan, {len(self.texts)} texts, {100 * total:.1f}% of variance"

    def __repr__(self) -> str:
        lines = [self._title()]
        width = len(str(len(self.texts)))
        for i, (t, f) in enumerate(zip(self.texts, self.fraction)):
            lines.append(f"{i + 1:>{width}}. {t}  ({100 * f:.1f}%)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        items = "".join(
            f"<li>{html.escape(str(t))} <span style='color:#888'>({100 * f:.1f}%)</span></li>"
            for t, f in zip(self.texts, self.fraction)
        )
        return f"<div><b>{html.escape(self._title())}</b><ol>{items}</ol></div>"


# ---------------------------------------------------------------------------- helpers
def _as_texts(texts: Sequence[str] | None, m: int) -> list:
    if texts is None:
        return [f"text {i}" for i in range(m)]
    texts = list(texts)
    if len(texts) != m:
        raise ValueError(f"{len(texts)} texts for {m} text embeddings")
    return texts


def _check_inputs(text_embeddings: np.ndarray, dim: int) -> np.ndarray:
    t = np.asarray(text_embeddings, np.float64)
    if t.ndim != 2 or t.shape[1] != dim:
        raise ValueError(f"text_embeddings must be [M, {dim}], got shape {t.shape}")
    return t


def _tiny(scale: float) -> float:
    """Scores at or below this are 'nothing left to explain'."""
    return max(scale, np.finfo(np.float64).tiny) * 1e-24


def _build_result(texts, picks, stds, variances, dirs, total, mean, rank, recon=None):
    variance = np.asarray(variances, np.float64)
    fraction = variance / total if total > 0 else np.zeros_like(variance)
    dim = mean.shape[0]
    return TextSpanResult(
        texts=[texts[j] for j in picks],
        indices=np.asarray(picks, np.int64),
        std=np.asarray(stds, np.float64),
        variance=variance,
        fraction=fraction,
        cumulative=np.cumsum(fraction),
        total_variance=float(total),
        directions=np.asarray(dirs, np.float64).reshape(-1, dim),
        mean=mean,
        reconstruction=recon,
        rank=int(rank),
    )


RANK_MODES = ("clean", "reference")


def _check_rank_mode(rank_mode: str) -> str:
    if rank_mode not in RANK_MODES:
        raise ValueError(f"rank_mode must be one of {RANK_MODES}, got {rank_mode!r}")
    return rank_mode


def _reference_projection(head_outputs: np.ndarray, text_embeddings: np.ndarray,
                          rank: int) -> tuple[np.ndarray, int]:
    """Texts projected as the reference does: float32 SVD, top ``rank`` vectors, no cut-off.

    The reference takes ``V = vh[:rank]`` of ``np.linalg.svd`` of its float32 head terms and
    maps the texts by ``V^T (V V^T)^-1 V``, all in float32; the vectors beyond C's rank are
    rounding noise of that SVD, which this keeps on purpose. Returns float64 [M, D], and the
    number of vectors used.
    """
    c32 = np.ascontiguousarray(head_outputs, dtype=np.float32)
    t32 = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    _, _, vh = np.linalg.svd(c32, full_matrices=False)
    vh = vh[: int(rank)]
    proj = vh.T @ (np.linalg.inv(vh @ vh.T) @ vh)  # [D, D] float32
    return (proj @ t32.T).T.astype(np.float64), int(vh.shape[0])


# ---------------------------------------------------------------------------- reference
def textspan(
    head_outputs: np.ndarray,
    text_embeddings: np.ndarray,
    texts: Sequence[str] | None = None,
    n_texts: int = 20,
    rank: int = 80,
    rtol: float = 1e-5,
    rank_mode: str = "clean",
) -> TextSpanResult:
    """TextSpan of one head, with the reference steps, on its terms held in memory.

    1. Project the texts onto the top ``rank`` right singular vectors of the uncentred C.
    2. Centre C; the reconstruction starts at the mean.
    3. ``n_texts`` times: pick the text whose projection ``C t`` has the largest standard
       deviation over images; add the projection of C on it to the reconstruction; remove
       its direction from C and from every text.

    Stops early (fewer picks) when the remaining texts explain nothing, e.g. when ``n_texts``
    exceeds the rank of C.

    Parameters
    ----------
    head_outputs : ndarray [N, D]
        Terms of one head over N images (``dec.heads[:, l, h]``).
    text_embeddings : ndarray [M, D]
        Unit-normalised embeddings of the text pool (see :func:`clipdecomp.data.text_pool.encode_pool`).
    texts : sequence of str [M], optional
        The pool's texts (default: ``"text i"``).
    n_texts : int
        Texts to pick (paper: 10 to 60; 20 in its head tables).
    rank : int
        Singular vectors to project the texts on (reference default 80).
    rtol : float
        Singular values at or below ``rtol * s_max`` count as zero (see the module notes).
    rank_mode : {"clean", "reference"}
        ``"clean"`` (default): project on at most ``rank`` singular vectors with nonzero
        singular values. ``"reference"``: project on the top ``rank`` right singular vectors of
        a float32 SVD of the terms even where C has lower rank (the reference code's
        ``replace_with_iterative_removal``, pick for pick; ``rtol`` is not used).

    Returns
    -------
    TextSpanResult
        With ``reconstruction`` [N, D].

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> T = np.eye(4)                        # four "texts", one per axis
    >>> C = rng.normal(size=(100, 4)) * [5.0, 1.0, 0.1, 2.0]
    >>> textspan(C, T, ["a", "b", "c", "d"], n_texts=2, rank=4).texts
    ['a', 'd']
    """
    c = np.asarray(head_outputs, np.float64)
    if c.ndim != 2:
        raise ValueError(f"head_outputs must be [N, D], got shape {c.shape}")
    n, dim = c.shape
    if n < 2:
        raise ValueError("TextSpan needs at least two images")
    t = _check_inputs(text_embeddings, dim)
    texts = _as_texts(texts, t.shape[0])
    n_texts, rank = check_size(n_texts, "n_texts"), check_size(rank, "rank")

    # 1. top right singular vectors of the uncentred C
    if _check_rank_mode(rank_mode) == "reference":
        t, keep = _reference_projection(head_outputs, text_embeddings, rank)
    else:
        _, s, vh = np.linalg.svd(c, full_matrices=False)
        keep = int(min(rank, np.count_nonzero(s > rtol * s[0]) if s[0] > 0 else 0))
        vh = vh[:keep]
        t = (t @ vh.T) @ vh  # [M, D]
    # 2. centre
    mean = c.mean(axis=0)
    c = c - mean
    recon = np.repeat(mean[None], n, axis=0)
    total = float((c * c).sum() / (n - 1))
    rows = max(1, _CHUNK_BYTES // (8 * max(t.shape[0], 1)))

    picks, stds, variances, dirs = [], [], [], []
    for _ in range(int(n_texts)):
        # std over images of C T^T, one row block at a time (never [N, M] at once)
        s1 = np.zeros(t.shape[0])
        s2 = np.zeros(t.shape[0])
        for r0 in range(0, n, rows):
            p = c[r0 : r0 + rows] @ t.T
            s1 += p.sum(axis=0)
            s2 += (p * p).sum(axis=0)
        var = np.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1)
        j = int(np.argmax(var))
        if var[j] <= _tiny(total):
            break
        tj = t[j].copy()
        norm2 = float(tj @ tj)
        coef = c @ tj / norm2  # [N]
        recon += coef[:, None] * tj[None, :]
        c -= coef[:, None] * tj[None, :]
        t -= (t @ tj / norm2)[:, None] * tj[None, :]
        picks.append(j)
        stds.append(np.sqrt(var[j]))
        variances.append(var[j] / norm2)
        dirs.append(tj)
    return _build_result(texts, picks, stds, variances, dirs, total, mean, keep, recon)


# ---------------------------------------------------------------------------- streaming
def _stats_of(stats: Any, head: tuple[int, int] | None):
    """Mean [D], uncentred second moment [D, D], n, from HeadStats or a tuple."""
    if isinstance(stats, tuple) and len(stats) == 3:
        mean, second, n = stats
        return np.asarray(mean, np.float64), np.asarray(second, np.float64), int(n)
    if hasattr(stats, "head") and hasattr(stats, "sum_outer"):
        if head is None:
            ls, h = stats.sum.shape[:2]
            if ls * h != 1:
                raise ValueError("these statistics hold several heads: pass head=(layer, head)")
            head = (stats.layers[0], 0)
        return stats.head(*head)
    raise TypeError("stats must be a HeadStats or a tuple (mean [D], second_moment [D, D], n)")


def textspan_from_stats(
    stats: Any,
    text_embeddings: np.ndarray,
    texts: Sequence[str] | None = None,
    n_texts: int = 20,
    rank: int = 80,
    head: tuple[int, int] | None = None,
    rtol: float = 1e-5,
) -> TextSpanResult:
    """TextSpan of one head from its mean and second moment (no head terms in memory).

    Same picks as :func:`textspan` on the same data (ties aside). The right singular vectors of
    the uncentred C are the eigenvectors of ``C^T C = n * second_moment``; with ``S`` the
    covariance, the variance of ``C t`` is ``t^T S t``; removing a unit direction ``u`` maps
    ``S -> P S P`` and ``T -> T P`` (``P = I - u u^T``). Keeping ``G = T S`` up to date with
    rank-one updates (``a = T u``, ``b = S u``: ``G <- (G - a b^T) P``) makes each pick
    ``O(M D + D^2)``, and ``s_j^2 = <T_j, G_j>``. The projected texts and the removed
    directions all lie in the span of the top ``rank`` singular vectors, so the updates run in
    those ``r`` coordinates: ``O(M r + r^2)`` per pick, after one ``D x D`` eigendecomposition.

    Parameters
    ----------
    stats : HeadStats or tuple
        A :class:`~clipdecomp.methods.stats.HeadStats` (with ``head=(layer, head)`` when it holds
        several heads), or ``(mean [D], second_moment [D, D], n)`` with the uncentred second
        moment ``E[x x^T]``.
    text_embeddings : ndarray [M, D]
        Unit-normalised text embeddings of the pool.
    texts : sequence of str [M], optional
    n_texts, rank, rtol
        As in :func:`textspan`.
    head : (int, int), optional
        Which head of ``stats``.

    Returns
    -------
    TextSpanResult
        ``reconstruction`` is None; :meth:`TextSpanResult.reconstruct` makes it from the terms.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> C = rng.normal(size=(200, 8)) * np.arange(1, 9)
    >>> T = rng.normal(size=(30, 8)); T /= np.linalg.norm(T, axis=1, keepdims=True)
    >>> moments = (C.mean(0), C.T @ C / len(C), len(C))
    >>> fast = textspan_from_stats(moments, T, n_texts=5, rank=8)
    >>> bool((fast.indices == textspan(C, T, n_texts=5, rank=8).indices).all())
    True
    """
    mean, second, n = _stats_of(stats, head)
    dim = mean.shape[0]
    if second.shape != (dim, dim):
        raise ValueError(f"second moment must be [{dim}, {dim}], got {second.shape}")
    if n < 2:
        raise ValueError("TextSpan needs at least two images")
    t = _check_inputs(text_embeddings, dim)
    texts = _as_texts(texts, t.shape[0])
    second = (second + second.T) / 2

    n_texts, rank = check_size(n_texts, "n_texts"), check_size(rank, "rank")
    # 1. top eigenvectors of C^T C = right singular vectors of C (eigh: ascending order)
    w, v = np.linalg.eigh(second)
    w, v = w[::-1], v[:, ::-1]
    smax = np.sqrt(max(w[0], 0.0))
    sing = np.sqrt(np.maximum(w, 0.0))
    keep = int(min(rank, np.count_nonzero(sing > rtol * smax) if smax > 0 else 0))
    vr = v[:, :keep]  # [D, r]
    # The projected texts, and every direction removed later, lie in the span of V_r: work in
    # its r coordinates (T = T_r V_r^T, S_r = V_r^T S V_r), an exact change of basis that
    # makes each pick O(M r + r^2) instead of O(M D + D^2).
    t = t @ vr  # [M, r]
    # 2. unbiased covariance S = (sum x x^T - n mu mu^T) / (n - 1), total variance in R^D
    cov = (second - np.outer(mean, mean)) * (n / (n - 1))
    total = float(np.trace(cov))
    s = vr.T @ cov @ vr  # [r, r]
    g = t @ s  # G = T S  [M, r]
    score = np.einsum("mr,mr->m", t, g)  # s_j^2 = <T_j, G_j>

    picks, stds, variances, dirs = [], [], [], []
    for _ in range(int(n_texts)):
        j = int(np.argmax(score))
        if score[j] <= _tiny(total):
            break
        tj = t[j].copy()
        u = tj / np.sqrt(tj @ tj)
        a = t @ u  # [M]
        b = s @ u  # [r]
        ub = float(u @ b)  # variance of C along u
        picks.append(j)
        stds.append(np.sqrt(score[j]))
        variances.append(ub)
        dirs.append(vr @ tj)  # back to R^D
        g -= np.outer(a, b)  # G <- (G - a b^T) P
        g -= np.outer(g @ u, u)
        t -= np.outer(a, u)  # T <- T P
        s += ub * np.outer(u, u) - np.outer(u, b) - np.outer(b, u)  # S <- P S P
        score = np.einsum("mr,mr->m", t, g)
    return _build_result(texts, picks, stds, variances, dirs, total, mean, keep)


# ---------------------------------------------------------------------------- many heads
def _default_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """The chosen layers (see :func:`~clipdecomp.engine.selection.parse_layers`); default: the
    last four, where the paper finds the direct effects."""
    return list(parse_layers(f"{-min(4, n_layers)}:" if layers is None else layers, n_layers))


def _progress(it, total: int, enabled: bool, desc: str):
    return progress_bar(it, total=total, enabled=enabled, desc=desc)


def textspan_heads(
    source: Any,
    text_embeddings: np.ndarray,
    texts: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    n_texts: int = 20,
    rank: int = 80,
    progress: bool = True,
    heads: Iterable[tuple[int, int]] | None = None,
    rank_mode: str = "clean",
) -> pd.DataFrame:
    """TextSpan of every head of some layers: the paper's head tables.

    Runs :func:`textspan_from_stats` per head (same picks as the reference steps, much
    faster); for arrays and decompositions the moments are computed first. With
    ``rank_mode="reference"`` it runs :func:`textspan` on each head's terms instead (the
    reference's projection needs them), which reproduces the reference's tables pick for pick.

    Parameters
    ----------
    source : Decomposition, ndarray [N, L, H, D] or HeadStats
        Head terms (``dec.heads``) or their streaming statistics.
    text_embeddings : ndarray [M, D]
        Unit-normalised text embeddings of the pool.
    texts : sequence of str [M], optional
    layers : iterable of int, optional
        Layers to analyse (negative allowed). Default: the last four (for HeadStats: every
        layer it holds, when fewer than four of the last four are kept).
    n_texts, rank : int
        As in :func:`textspan`.
    progress : bool
        Show a tqdm bar over heads.
    heads : iterable of (layer, head), optional
        Analyse only these heads (overrides ``layers``).
    rank_mode : {"clean", "reference"}
        As in :func:`textspan`; ``"reference"`` needs head terms, not HeadStats.

    Returns
    -------
    pandas.DataFrame
        One row per head: ``layer``, ``head``, ``texts`` (list of str, pick order),
        ``variance_explained`` (cumulative fraction of the head's variance). The full
        :class:`TextSpanResult` of each head is in ``df.attrs["results"][(layer, head)]``.
        Show it with :func:`format_head_table`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> heads = rng.normal(size=(64, 6, 2, 8))           # [N, L, H, D]
    >>> T = rng.normal(size=(40, 8)); T /= np.linalg.norm(T, axis=1, keepdims=True)
    >>> df = textspan_heads(heads, T, n_texts=3, rank=8, progress=False)
    >>> sorted(set(df.layer.tolist())), len(df)
    ([2, 3, 4, 5], 8)
    """
    import pandas as pd

    stats = None
    arr = None
    reference = _check_rank_mode(rank_mode) == "reference"
    if hasattr(source, "sum_outer"):
        if reference:
            raise ValueError("rank_mode='reference' needs the head terms (an array or a "
                             "decomposition), not their statistics")
        stats = source
        n_layers = stats.n_layers
        n_heads = stats.sum.shape[1]
    else:
        arr = np.asarray(source.heads if hasattr(source, "heads") else source)
        if arr.ndim != 4:
            raise ValueError(f"head terms must be [N, L, H, D], got shape {arr.shape}")
        n_layers, n_heads = arr.shape[1:3]
    if heads is not None:
        pairs = [(int(layer) % n_layers, int(h)) for layer, h in heads]
    else:
        if layers is None and stats is not None:
            want = _default_layers(None, n_layers)
            lays = [x for x in want if x in stats.layers] or list(stats.layers)
        else:
            lays = _default_layers(layers, n_layers)
        pairs = [(layer, h) for layer in lays for h in range(n_heads)]
    n_texts, rank = check_size(n_texts, "n_texts"), check_size(rank, "rank")
    t = np.asarray(text_embeddings)
    texts = _as_texts(texts, t.shape[0])

    rows, results = [], {}
    for layer, h in _progress(pairs, len(pairs), progress, "TextSpan"):
        if reference:
            assert arr is not None   # the reference's picks need the head terms themselves
            res = textspan(arr[:, layer, h], t, texts, n_texts=n_texts, rank=rank,
                           rank_mode="reference")
            res.reconstruction = None
        else:
            if stats is not None:
                moments = stats.head(layer, h)
            else:
                assert arr is not None   # no stats: the head terms were given
                c = arr[:, layer, h].astype(np.float64)
                moments = (c.mean(axis=0), c.T @ c / len(c), len(c))
            res = textspan_from_stats(moments, t, texts, n_texts=n_texts, rank=rank)
        res.layer, res.head = layer, h
        results[(layer, h)] = res
        rows.append(
            {
                "layer": layer,
                "head": h,
                "texts": list(res.texts),
                "variance_explained": float(res.cumulative[-1]) if len(res) else 0.0,
            }
        )
    df = pd.DataFrame(rows, columns=["layer", "head", "texts", "variance_explained"])
    df.attrs["results"] = results
    return df


# ---------------------------------------------------------------------------- experiment
def _top1(embeddings: np.ndarray, labels: np.ndarray, classifier: np.ndarray) -> float:
    pred = np.argmax(embeddings @ classifier, axis=1)
    return float(np.mean(pred == labels))


def textspan_reconstruction_curve(
    heads: np.ndarray,
    mlps: np.ndarray,
    labels: np.ndarray,
    classifier: np.ndarray,
    text_embeddings: np.ndarray,
    texts: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    n_texts_list: Sequence[int] = (1, 2, 5, 10, 20, 40, 60),
    rank: int = 80,
    means: Any = None,
    progress: bool = True,
    rank_mode: str = "clean",
) -> pd.DataFrame:
    """Zero-shot accuracy when the analysed heads are replaced by their TextSpan reconstruction.

    Follows the reference experiment (``compute_complete_text_set.py``): every head of the
    layers *not* analysed is mean-ablated, the MLP terms (and the ln_pre row) are kept as they
    are, and each head of the analysed layers is replaced by its reconstruction from k texts
    (its mean plus the projection of its centred terms onto the k picked directions); the
    repaired embeddings ``sum(heads) + sum(mlps)`` are classified with ``classifier``. The
    picks of each head are greedy, so the k-text reconstruction uses the first k picks of one
    run with ``max(n_texts_list)`` texts.

    Parameters
    ----------
    heads : ndarray [N, L, H, D]
    mlps : ndarray [N, L+1, D]
    labels : ndarray int [N]
    classifier : ndarray [D, C]
        Zero-shot classifier (columns: unit class embeddings).
    text_embeddings : ndarray [M, D]
    texts : sequence of str [M], optional
    layers : iterable of int, optional
        Analysed layers (default: the last four).
    n_texts_list : sequence of int
        Texts per head to evaluate (0 = the analysed heads mean-ablated too).
    rank : int
    means : ComponentMeans or ndarray [L, H, D], optional
        Head means for the ablation (default: the mean over these N images, as the
        reference).
    progress : bool
    rank_mode : {"clean", "reference"}
        As in :func:`textspan`.

    Returns
    -------
    pandas.DataFrame
        Columns ``setting``, ``n_texts``, ``accuracy`` (a fraction). Rows: ``"baseline"`` (no
        ablation), ``"heads kept"`` (others mean-ablated, analysed heads untouched), then one
        ``"text span"`` row per k. ``df.attrs["results"]`` holds the TextSpan results.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> heads, mlps = rng.normal(size=(60, 3, 2, 5)), rng.normal(size=(60, 4, 5))
    >>> T = rng.normal(size=(20, 5)); T /= np.linalg.norm(T, axis=1, keepdims=True)
    >>> df = textspan_reconstruction_curve(heads, mlps, rng.integers(0, 3, 60),
    ...     rng.normal(size=(5, 3)), T, layers=[2], n_texts_list=(1, 2), progress=False)
    >>> list(df.setting)
    ['baseline', 'heads kept', 'text span', 'text span']
    """
    import pandas as pd

    heads = np.asarray(heads)
    mlps = np.asarray(mlps)
    if heads.ndim != 4:
        raise ValueError(f"heads must be [N, L, H, D], got {heads.shape}")
    n, n_layers, n_heads, dim = heads.shape
    if mlps.shape != (n, n_layers + 1, dim):
        raise ValueError(f"mlps must be [{n}, {n_layers + 1}, {dim}], got {mlps.shape}")
    labels = np.asarray(labels)
    w = np.asarray(classifier, np.float64)
    reference = _check_rank_mode(rank_mode) == "reference"
    lays = _default_layers(layers, n_layers)
    others = [x for x in range(n_layers) if x not in lays]
    if means is None:
        head_means = heads.mean(axis=0, dtype=np.float64)
    else:
        head_means = np.asarray(getattr(means, "heads", means), np.float64)
    rank = check_size(rank, "rank")
    ks = sorted({0 if k == 0 else check_size(k, "n_texts_list entry") for k in n_texts_list})
    kmax = max(ks) if ks else 0

    full = heads.sum(axis=(1, 2), dtype=np.float64) + mlps.sum(axis=1, dtype=np.float64)
    rows = [{"setting": "baseline", "n_texts": np.nan, "accuracy": _top1(full, labels, w)}]
    # fixed part: MLPs as they are + mean of the non-analysed heads
    fixed = mlps.sum(axis=1, dtype=np.float64) + head_means[others].sum(axis=(0, 1))
    kept = fixed + heads[:, lays].sum(axis=(1, 2), dtype=np.float64)
    rows.append({"setting": "heads kept", "n_texts": np.nan, "accuracy": _top1(kept, labels, w)})

    t = np.asarray(text_embeddings)
    texts = _as_texts(texts, t.shape[0])
    logits = {k: fixed @ w for k in ks}
    results = {}
    pairs = [(layer, h) for layer in lays for h in range(n_heads)]
    for layer, h in _progress(pairs, len(pairs), progress, "TextSpan"):
        c = heads[:, layer, h].astype(np.float64)
        mu = c.mean(axis=0)
        if reference:
            res = textspan(heads[:, layer, h], t, texts, n_texts=kmax, rank=rank,
                           rank_mode="reference")
            res.reconstruction = None
        else:
            res = textspan_from_stats((mu, c.T @ c / n, n), t, texts, n_texts=kmax, rank=rank)
        res.layer, res.head = layer, h
        results[(layer, h)] = res
        u = res.directions
        if len(u):
            u = u / np.linalg.norm(u, axis=1, keepdims=True)
        coef = (c - mu) @ u.T  # [N, m]
        uw = u @ w  # [m, C]
        for k in ks:
            kk = min(k, len(u))
            logits[k] += mu @ w + coef[:, :kk] @ uw[:kk]
    for k in ks:
        acc = float(np.mean(np.argmax(logits[k], axis=1) == labels))
        rows.append({"setting": "text span", "n_texts": k, "accuracy": acc})
    df = pd.DataFrame(rows, columns=["setting", "n_texts", "accuracy"])
    df.attrs["results"] = results
    df.attrs["layers"] = lays
    return df
