"""The reference's SigLIP outputs, one call each, over a
:class:`~clipdecomp.engine.siglip.SiglipDecomposition` (the model and its decomposition are in
:mod:`clipdecomp.engine.siglip`; see docs/decomposition.md).

Shapes: B images, H pooling heads, D embedding dim, C classes, M texts, G patches per side.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipdecomp.engine.siglip import SiglipDecomposition

__all__ = ["accuracy_by_part", "head_orthogonality", "pool_head_maps", "textspan_pool_heads"]


def accuracy_by_part(dec: SiglipDecomposition, classifier: np.ndarray, labels: np.ndarray
                     ) -> dict[str, float]:
    """Zero-shot accuracy (%) of the embedding, the pooling MLP term, the attention part, both.

    The reference's check that SigLIP's embedding is mostly its pooling attention. Here the
    attention part carries the out-projection bias and the MLP term the MLP's own biases (the
    reference adds the out-projection bias to its MLP-only variant, and the MLP's output bias to
    its attention-only one).

    Parameters
    ----------
    dec : SiglipDecomposition (either depth)
    classifier : float ``[D, K]``, unit class embeddings as columns
    labels : int ``[B]``

    Returns
    -------
    dict with keys ``"embedding"``, ``"mlp"``, ``"attention"``, ``"attention+mlp"``

    Examples
    --------
    >>> accuracy_by_part(dec, classifier, labels)                       # doctest: +SKIP
    {'embedding': 81.2, 'mlp': 0.4, 'attention': 80.9, 'attention+mlp': 81.2}
    """
    w = np.asarray(classifier, np.float64)
    y = np.asarray(labels).reshape(-1)
    if w.ndim != 2 or w.shape[0] != dec.config.embed_dim:
        raise ValueError(f"classifier must be [{dec.config.embed_dim}, K], got {w.shape}")
    if y.shape[0] != len(dec):
        raise ValueError(f"labels has {y.shape[0]} entries for {len(dec)} images")
    att = np.asarray(dec.pool_heads, np.float64).sum(1)
    mlp = np.asarray(dec.pool_mlp, np.float64)
    parts = {"embedding": np.asarray(dec.embedding, np.float64), "mlp": mlp, "attention": att,
             "attention+mlp": att + mlp}
    return {k: float((np.argmax(v @ w, axis=1) == y).mean() * 100.0) for k, v in parts.items()}


def head_orthogonality(dec: SiglipDecomposition | np.ndarray) -> np.ndarray:
    """How orthogonal the pooling heads' terms are: ``[H, H]``, the reference's matrix.

    ``out[h, g]`` = the mean over images of ``|cos(c[b, h], c[b, g])|``, where ``c`` are the
    head terms centred by their mean over the images. 1 on the diagonal; small off it when the
    heads write to different directions.

    Parameters
    ----------
    dec : SiglipDecomposition, or the head terms ``[B, H, D]``

    Returns
    -------
    float64 ``[H, H]``

    Examples
    --------
    >>> head_orthogonality(dec).shape                                   # doctest: +SKIP
    (12, 12)
    """
    x = np.asarray(dec.pool_heads if hasattr(dec, "pool_heads") else dec, np.float64)
    if x.ndim != 3:
        raise ValueError(f"head terms must be [B, H, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError("the orthogonality needs at least two images (the terms are centred)")
    c = x - x.mean(0, keepdims=True)
    n = np.linalg.norm(c, axis=-1, keepdims=True)
    u = c / np.where(n > 0, n, 1.0)
    return np.abs(np.einsum("bhd,bgd->bhg", u, u)).mean(0)


def textspan_pool_heads(dec: SiglipDecomposition, text_embeddings: np.ndarray,
                        texts: Sequence[str] | None = None, n_texts: int | None = None,
                        rank: int | None = None) -> list[Any]:
    """TextSpan of every pooling head, as the reference runs it for SigLIP (D texts, rank D).

    Parameters
    ----------
    dec : SiglipDecomposition (either depth; ``pool_heads`` are used)
    text_embeddings : float ``[M, D]``, unit text embeddings of the pool
    texts : the pool's texts, optional
    n_texts, rank : default D, the reference's choice for SigLIP

    Returns
    -------
    list of :class:`clipdecomp.textspan.TextSpanResult`, one per head

    Examples
    --------
    >>> res = textspan_pool_heads(dec, pool_emb, pool_texts)            # doctest: +SKIP
    >>> res[0].texts[:5]                                                # doctest: +SKIP
    """
    from clipdecomp.methods.textspan import textspan

    d = dec.config.embed_dim
    n_texts = d if n_texts is None else n_texts
    rank = d if rank is None else rank
    return [textspan(np.asarray(dec.pool_heads[:, h]), text_embeddings, texts,
                     n_texts=n_texts, rank=rank) for h in range(dec.pool_heads.shape[1])]


def pool_head_maps(dec: SiglipDecomposition, direction: np.ndarray) -> np.ndarray:
    """Each pooling head's map along one direction: float32 ``[B, H, G, G]``.

    ``out[b, h, i, j] = tokens[b, 0, i*G + j, h] . direction`` (needs ``spatial=True``).

    Examples
    --------
    >>> pool_head_maps(dec, model.encode_text(["a dog"])[0]).shape      # doctest: +SKIP
    (1, 12, 14, 14)
    """
    from clipdecomp.methods.spatial import head_maps

    if dec.depth != "pool":
        raise ValueError("per-token maps need a depth='pool' decomposition with spatial=True")
    return head_maps(dec, direction)[:, 0]
