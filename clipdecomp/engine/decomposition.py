"""The result of ``CLIP.decompose``: the image embedding split into heads, tokens and MLPs.

Shapes: B images, L layers, H heads, N = 1 + G*G tokens (class token first), D embedding dim,
T directions of ``project_tokens``. Every term follows the reference convention of the paper's code (see
``notes/decomposition.md``) and is divided by ``||embedding||``, so that for every image

    heads.sum((1, 2)) + mlps.sum(1) == embedding / norm[:, None]
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp.engine.config import ModelConfig
from clipdecomp.engine.helpers import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from clipdecomp.engine.model import CLIP

__all__ = ["IDENTITY_TOL", "IDENTITY_TOL_BF16", "Decomposition", "check_identity"]

#: largest |heads.sum + mlps.sum - embedding / norm| the debug check accepts (unit vectors)
IDENTITY_TOL = 1e-3
#: the same for a bf16 model, whose folds stay float32 while its forward rounds to bf16 (measured
#: residuals: 3e-5 to 2e-4, benchmarks/PRECISION.md; bf16 keeps 8 bits, 2**-8 = 4e-3)
IDENTITY_TOL_BF16 = 1e-2


def check_identity(heads: np.ndarray, mlps: np.ndarray, embedding: np.ndarray,
                   norm: np.ndarray, tokens: np.ndarray | None = None, start: int = 0,
                   tol: float = IDENTITY_TOL) -> float:
    """Check that the terms of a decomposition add up; raise ``RuntimeError`` if not.

    ``heads.sum((1, 2)) + mlps.sum(1)`` must equal ``embedding / norm`` and, when given,
    ``tokens.sum(2)`` must equal ``heads``, to ``tol`` (absolute; the terms are parts of a unit
    vector). This is what debug mode (:func:`clipdecomp.engine.model.set_debug`,
    ``CLIPDECOMP_DEBUG=1``) runs after every batch.

    Parameters
    ----------
    heads : numpy.ndarray
        ``[B, L, H, D]``.
    mlps : numpy.ndarray
        ``[B, L+1, D]``.
    embedding : numpy.ndarray
        ``[B, D]``, not normalised.
    norm : numpy.ndarray
        ``[B]``.
    tokens : numpy.ndarray, optional
        ``[B, L, N, H, D]``.
    start : int
        Index of the first image in the caller's input (for the message).
    tol : float
        The largest absolute error accepted.

    Returns
    -------
    float
        The largest error found.

    Examples
    --------
    >>> check_identity(dec.heads, dec.mlps, dec.embedding, dec.norm)   # doctest: +SKIP
    3.1e-07
    """
    b = embedding.shape[0]
    if b == 0:
        return 0.0
    nrm = np.asarray(norm, np.float64)
    want = np.asarray(embedding, np.float64) / np.where(nrm > 0, nrm, 1.0)[:, None]
    got = (np.asarray(heads, np.float64).sum((1, 2)) + np.asarray(mlps, np.float64).sum(1))
    err = np.abs(got - want)
    err = np.where(np.isnan(err), np.inf, err).max(axis=1)           # [B]
    worst = int(np.argmax(err))
    if not err[worst] <= tol:
        raise RuntimeError(
            f"decomposition check failed for image {start + worst}: max |heads.sum((1, 2)) + "
            f"mlps.sum(1) - embedding / norm| = {err[worst]:.3g} > {tol:g} (||embedding|| = "
            f"{float(nrm[worst]):.4g}; {int((err > tol).sum())} of {b} images in this batch "
            "fail). The weights or the inputs hold extreme values, or the core is wrong.")
    worst_err = float(err.max())
    if tokens is not None:
        terr = np.abs(np.asarray(tokens, np.float64).sum(2) - np.asarray(heads, np.float64))
        terr = np.where(np.isnan(terr), np.inf, terr).reshape(b, -1).max(axis=1)
        worst = int(np.argmax(terr))
        if not terr[worst] <= tol:
            raise RuntimeError(
                f"decomposition check failed for image {start + worst}: max |tokens.sum(2) - "
                f"heads| = {terr[worst]:.3g} > {tol:g}")
        worst_err = max(worst_err, float(terr.max()))
    return worst_err


class Decomposition:
    """Per-head, per-token and per-MLP terms of a batch of image embeddings.

    Attributes
    ----------
    embedding : numpy.ndarray
        float32 ``[B, D]``, the image embedding, not normalised
        (``== model.encode_image(images, normalize=False)``).
    heads : numpy.ndarray
        float32 ``[B, L, H, D]``, each attention head's term, summed over source tokens.
    mlps : numpy.ndarray
        float32 ``[B, L+1, D]``; row 0 is the ``ln_pre`` output at the class token, row l + 1
        the MLP of layer l.
    cls_to_cls : numpy.ndarray
        float32 ``[B, L, D]``, the class token's attention to itself, summed over heads (the
        "CLS ablation" of the paper).
    tokens : numpy.ndarray
        float32 ``[B, L, N, H, D]``, each (source token, head) term; only with
        ``decompose(..., spatial=True)``, else a ``ValueError``.
    attn_cls : numpy.ndarray
        float32 ``[B, L, H, N]``, the class token's softmax attention; only with ``attn=True``.
    attn_mean : numpy.ndarray
        float32 ``[B, L, N, N]``, attention averaged over heads; only with ``attn=True``.
    norm : numpy.ndarray
        float32 ``[B]``, ``||embedding||``.
    ln_mean, ln_std : numpy.ndarray
        float32 ``[B]``, mean and ``sqrt(var + eps)`` of the residual stream at the class token
        before ``ln_post`` (the numbers that make ``ln_post`` affine).
    config : ModelConfig
        The model's config.

    Examples
    --------
    >>> dec = model.decompose(["cat.jpg", "dog.jpg"])                   # doctest: +SKIP
    >>> dec.heads.shape                                                 # doctest: +SKIP
    (2, 12, 12, 512)
    >>> np.allclose(dec.heads.sum((1, 2)) + dec.mlps.sum(1),
    ...             dec.embedding / dec.norm[:, None], atol=1e-5)        # doctest: +SKIP
    True
    """

    def __init__(self, *, config: ModelConfig, embedding: np.ndarray, ln_stats: np.ndarray,
                 heads: np.ndarray, mlps: np.ndarray, cls_to_cls: np.ndarray,
                 tokens: np.ndarray | None = None, attn_cls: np.ndarray | None = None,
                 attn_mean: np.ndarray | None = None, pixels: np.ndarray | None = None,
                 model: CLIP | None = None):
        self.config = config
        self.embedding = embedding
        self.ln_stats = ln_stats
        self.heads = heads
        self.mlps = mlps
        self.cls_to_cls = cls_to_cls
        self._tokens = tokens
        self._attn_cls = attn_cls
        self._attn_mean = attn_mean
        self.pixels = pixels            # [B, 3, S, S] float32, kept for project_tokens(); may be None
        self._model = model

    # -- arrays --------------------------------------------------------------------------------

    @property
    def norm(self) -> np.ndarray:
        """float32 ``[B]``: ``||embedding||``."""
        return self.ln_stats[:, 2]

    @property
    def ln_mean(self) -> np.ndarray:
        """float32 ``[B]``: mean of the class-token residual stream before ``ln_post``."""
        return self.ln_stats[:, 0]

    @property
    def ln_std(self) -> np.ndarray:
        """float32 ``[B]``: ``sqrt(var + eps)`` of that residual stream."""
        return self.ln_stats[:, 1]

    @property
    def has_tokens(self) -> bool:
        """Whether per-token terms were kept (``spatial=True``)."""
        return self._tokens is not None

    @property
    def has_attn(self) -> bool:
        """Whether attention maps were kept (``attn=True``)."""
        return self._attn_cls is not None

    def _token_bytes(self) -> int:
        c = self.config
        return len(self) * c.layers * c.n_tokens * c.heads * c.embed_dim * 4

    @property
    def tokens(self) -> np.ndarray:
        """float32 ``[B, L, N, H, D]``: per (token, head) terms; needs ``spatial=True``."""
        if self._tokens is None:
            raise ValueError(
                "per-token terms were not computed: call model.decompose(images, spatial=True) "
                f"to keep them (B*L*N*H*D floats, {format_bytes(self._token_bytes())} here), or use "
                "dec.project_tokens(directions) for token scores along a few directions without storing "
                "them")
        return self._tokens

    @property
    def attn_cls(self) -> np.ndarray:
        """float32 ``[B, L, H, N]``: class-token attention; needs ``attn=True``."""
        if self._attn_cls is None:
            raise ValueError("attention maps were not kept: call "
                             "model.decompose(images, attn=True)")
        return self._attn_cls

    @property
    def attn_mean(self) -> np.ndarray:
        """float32 ``[B, L, N, N]``: attention averaged over heads; needs ``attn=True``."""
        if self._attn_mean is None:
            raise ValueError("attention maps were not kept: call "
                             "model.decompose(images, attn=True)")
        return self._attn_mean

    # -- derived -------------------------------------------------------------------------------

    def project_tokens(self, directions: np.ndarray, batch_size: int | None = None,
                       progress: bool = False) -> np.ndarray:
        """Project every (layer, token, head) term on a few directions.

        ``project_tokens(directions) == tokens @ directions.T``. When the tokens were kept it is
        that product; otherwise the C core re-runs the forward pass on the stored pixels and computes
        the projections in head space (N * d * T per head), never forming the tokens.

        Parameters
        ----------
        directions : array_like
            float ``[T, D]`` (or ``[D]`` for one direction), e.g. normalised text embeddings.
            They are used as given, not normalised.
        batch_size : int, optional
            Images per forward pass when re-running (default 8).
        progress : bool
            Show a progress bar when re-running.

        Returns
        -------
        numpy.ndarray
            float32 ``[B, L, N, H, T]``.

        Examples
        --------
        >>> t = model.encode_text(["a dog", "a cat"], normalize=True)  # doctest: +SKIP
        >>> dec.project_tokens(t).shape                                   # doctest: +SKIP
        (2, 12, 197, 12, 2)
        """
        d = np.asarray(directions, dtype=np.float32)
        if d.ndim == 1:
            d = d[None]
        if d.ndim != 2 or d.shape[1] != self.config.embed_dim:
            raise ValueError(f"directions must be [T, {self.config.embed_dim}]; got shape "
                             f"{np.shape(directions)}")
        if not np.isfinite(d).all():
            raise ValueError("directions contain NaN or infinite values")
        d = np.ascontiguousarray(d)
        if self._tokens is not None:
            return np.einsum("blnhd,td->blnht", self._tokens, d, optimize=True).astype(np.float32)
        if self.pixels is None or self._model is None:
            raise ValueError("neither per-token terms nor the pixels were kept; call "
                             "model.decompose(images, spatial=True)")
        return self._model._project_tokens(self.pixels, d, batch_size=batch_size, progress=progress)

    def heatmap(self, text_embeddings: np.ndarray, layers: Any = None,
                heads: Any = None) -> np.ndarray:
        """Each patch's contribution to the similarity with each text, float32 [B, T, G, G].

        The same as :func:`clipdecomp.methods.spatial.heatmap` ``(self, ...)``, which holds the
        code (imported here, on call, so the engine does not depend on the methods at import).

        Examples
        --------
        >>> dec = model.decompose(images, spatial=True)             # doctest: +SKIP
        >>> t = model.encode_text(["a dog", "grass"], normalize=True)  # doctest: +SKIP
        >>> dec.heatmap(t).shape                                        # doctest: +SKIP
        (2, 2, 14, 14)
        """
        from clipdecomp.methods.spatial import heatmap

        return heatmap(self, text_embeddings, layers=layers, heads=heads)

    def summed(self) -> np.ndarray:
        """``heads.sum((1, 2)) + mlps.sum(1)``: float32 ``[B, D]``, equal to
        ``embedding / norm`` (a check of the decomposition).

        Examples
        --------
        >>> np.abs(dec.summed() - dec.embedding / dec.norm[:, None]).max() < 1e-5  # doctest: +SKIP
        True
        """
        return self.heads.sum((1, 2)) + self.mlps.sum(1)

    # -- container -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    def __getitem__(self, index: Any) -> Decomposition:
        """The decomposition of a subset of the images (an int, slice, list or mask)."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 if int(index) != -1 else None)

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return Decomposition(config=self.config, embedding=self.embedding[index],
                             ln_stats=self.ln_stats[index], heads=self.heads[index],
                             mlps=self.mlps[index], cls_to_cls=self.cls_to_cls[index],
                             tokens=take(self._tokens), attn_cls=take(self._attn_cls),
                             attn_mean=take(self._attn_mean), pixels=take(self.pixels),
                             model=self._model)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that were computed, by name (for saving with ``np.savez``)."""
        out = {"embedding": self.embedding, "ln_stats": self.ln_stats, "heads": self.heads,
               "mlps": self.mlps, "cls_to_cls": self.cls_to_cls}
        for k, v in (("tokens", self._tokens), ("attn_cls", self._attn_cls),
                     ("attn_mean", self._attn_mean)):
            if v is not None:
                out[k] = v
        return out

    def __repr__(self) -> str:
        c = self.config
        name = c.name or "CLIP"
        lines = [(f"Decomposition of {len(self)} image{'s' if len(self) != 1 else ''} by {name} "
                 f"(L={c.layers} layers, H={c.heads} heads, N={c.n_tokens} tokens, "
                 f"D={c.embed_dim})")]
        for k, v in self.arrays().items():
            lines.append(f"  {k:<11}{list(v.shape)!s:<24}{format_bytes(v.nbytes)}")
        if self._tokens is None:
            lines.append("  tokens     not kept (decompose(..., spatial=True)); project_tokens() re-runs")
        if self._attn_cls is None:
            lines.append("  attn_*     not kept (decompose(..., attn=True))")
        return "\n".join(lines)
