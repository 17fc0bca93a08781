"""Where in the image: heat maps from the per-token decomposition, and attention baselines.

Every map here comes out of the same forward pass as the decomposition itself. A token term
``tokens[b, l, n, h]`` is what patch ``n`` wrote into the image embedding through head ``h`` of
layer ``l`` (see the decomposition note), so its dot product with a text embedding is that patch's
share of the image-text similarity. Summed over the chosen layers and heads, the shares of the
patches (tokens 1..N-1; the class token is left out) form a heat map on the patch grid.

Shapes: B images, L layers, H heads, N = 1 + G*G tokens, G patches per side, D embedding dim,
T texts (or directions), S output side in pixels.

Patch ``n`` (1-based token index) sits at row ``(n - 1) // G`` and column ``(n - 1) % G`` of the
grid, the order of the patch-embedding convolution. Models without a class token (SigLIP, whose
decompositions say ``config.class_token = False``) start their patches at token 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

from clipdecomp.engine.selection import parse_layers

__all__ = [
    "attention_map",
    "attention_rollout",
    "head_map",
    "head_maps",
    "heatmap",
    "upsample",
]

LayerSel = Union[None, int, Iterable[int]]
HeadSel = Union[None, int, Iterable[int], Iterable[tuple[int, int]]]


# --------------------------------------------------------------------------------------------
# helpers

def _grid_side(n_tokens: int, first: int = 1) -> int:
    """G from N = first + G*G (first = 1 with a class token, 0 without)."""
    g = math.isqrt(max(n_tokens - first, 0))
    if g * g != n_tokens - first or g == 0:
        raise ValueError(f"{n_tokens} tokens are not {first} + G*G for a square patch grid")
    return g


def _first_patch(dec: Any) -> int:
    """Token index of the first patch: 1 after a class token, 0 for models without one
    (SigLIP: ``dec.config.class_token`` is False)."""
    return 1 if getattr(getattr(dec, "config", None), "class_token", True) else 0


def _tokens_or_none(dec: Any) -> np.ndarray | None:
    """dec.tokens [B, L, N, H, D] when the decomposition kept them, else None."""
    if getattr(dec, "has_tokens", True) is False:
        return None
    try:
        tokens = dec.tokens
    except (ValueError, AttributeError):
        return None
    return None if tokens is None else np.asarray(tokens)


def _shape(dec: Any) -> tuple[int, int, int, int, int]:
    """(B, L, N, H, D) of a decomposition, read without forcing a new forward pass."""
    b, d = np.shape(dec.embedding)  # [B, D]
    cfg = getattr(dec, "config", None)
    if cfg is not None:
        return b, int(cfg.layers), int(cfg.n_tokens), int(cfg.heads), d
    tokens = _tokens_or_none(dec)
    if tokens is None:
        raise ValueError("cannot tell the shapes: dec has neither a config nor tokens")
    _, n_layers, n, n_heads, _ = tokens.shape
    return b, n_layers, n, n_heads, d


def _index_list(sel: int | Iterable[int], size: int, what: str) -> list[int]:
    items = [sel] if isinstance(sel, (int, np.integer)) else list(sel)
    out = []
    for i in items:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{what} must be ints, got {i!r}")
        j = int(i) + size if i < 0 else int(i)
        if not 0 <= j < size:
            raise IndexError(f"{what} {int(i)} out of range for {size} {what}s")
        out.append(j)
    return out


def _selection(n_layers: int, n_heads: int, layers: LayerSel, heads: HeadSel) -> np.ndarray:
    """Boolean [L, H]: which (layer, head) terms a map sums over.

    ``heads`` may be head indices (combined with ``layers``) or (layer, head) pairs.
    """
    sel = np.zeros((n_layers, n_heads), bool)
    head_items: list[Any] | None = None if heads is None else (
        [heads] if isinstance(heads, (int, np.integer)) else list(heads))
    if head_items and all(isinstance(x, (tuple, list, np.ndarray)) for x in head_items):
        if layers is not None:
            raise ValueError("give either layers with head indices, or (layer, head) pairs alone")
        for pair in head_items:
            if len(pair) != 2:
                raise ValueError(f"a (layer, head) pair has two entries, got {pair!r}")
            (li,) = _index_list(pair[0], n_layers, "layer")
            (hi,) = _index_list(pair[1], n_heads, "head")
            sel[li, hi] = True
        return sel
    ls = parse_layers(layers, n_layers)
    hs = range(n_heads) if head_items is None else _index_list(head_items, n_heads, "head")
    for li in ls:
        sel[li, list(hs)] = True
    return sel


def _as_directions(x: Any, d: int, what: str = "text_embeddings") -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != d:
        raise ValueError(f"{what} must be [T, {d}] (or [{d}]), got shape {np.shape(x)}")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# heat maps

def heatmap(dec: Any, text_embeddings: np.ndarray, layers: LayerSel = None,
            heads: HeadSel = None) -> np.ndarray:
    """Each patch's contribution to the similarity with each text, on the patch grid.

    ``out[b, t, i, j] = sum_{l, h} tokens[b, l, 1 + i*G + j, h] . text_embeddings[t]`` over the
    chosen layers and heads. With the decomposition's convention (terms divided by
    ``||embedding||``) and unit text embeddings, the maps of all patches, plus the class token and
    the MLP terms, add up to the cosine similarity of image and text.

    Uses ``dec.tokens`` when the decomposition kept them (``spatial=True``); otherwise asks the
    core for ``dec.project_tokens(text_embeddings)``, computed in head space without materialising tokens.

    Parameters
    ----------
    dec : Decomposition of B images
    text_embeddings : [T, D] (or [D]) directions, usually unit text embeddings,
        ``model.encode_text(texts, normalize=True)``
    layers : None (all), a layer index, or a list of them (negative counts from the end)
    heads : None (all), a head index, a list of them, or a list of (layer, head) pairs (then
        ``layers`` must be None)

    Returns
    -------
    float32 [B, T, G, G]

    Examples
    --------
    >>> dec = model.decompose(images, spatial=True)               # doctest: +SKIP
    >>> maps = heatmap(dec, model.encode_text(["a dog", "grass"], normalize=True))  # doctest: +SKIP
    >>> maps.shape                                                # doctest: +SKIP
    (2, 2, 14, 14)
    >>> last4 = heatmap(dec, texts, layers=[-4, -3, -2, -1])      # doctest: +SKIP
    """
    b, n_layers, n, n_heads, d = _shape(dec)
    f = _first_patch(dec)
    g = _grid_side(n, f)
    texts = _as_directions(text_embeddings, d)
    sel = _selection(n_layers, n_heads, layers, heads)
    tokens = _tokens_or_none(dec)
    if tokens is not None:
        # sum the chosen terms per patch first ([B, N-1, D]), then one product with the texts
        acc = np.zeros((b, n - f, d), np.float64)
        for li in np.flatnonzero(sel.any(1)):
            hs = np.flatnonzero(sel[li])
            t = tokens[:, li, f:]  # [B, G*G, H, D]
            if len(hs) < n_heads:
                t = t[:, :, hs]
            acc += t.sum(axis=2, dtype=np.float64)
        out = acc @ texts.T.astype(np.float64)  # [B, N-1, T]
    else:
        probe = np.asarray(dec.project_tokens(texts))  # [B, L, N, H, T]
        out = np.zeros((b, n - f, texts.shape[0]), np.float64)
        for li in np.flatnonzero(sel.any(1)):
            hs = np.flatnonzero(sel[li])
            p = probe[:, li, f:]  # [B, G*G, H, T]
            if len(hs) < n_heads:
                p = p[:, :, hs]
            out += p.sum(axis=2, dtype=np.float64)
    return np.ascontiguousarray(out.transpose(0, 2, 1).reshape(b, -1, g, g), dtype=np.float32)


def head_maps(dec: Any, direction: np.ndarray) -> np.ndarray:
    """The map of one direction through every head separately: [B, L, H, G, G].

    ``out[b, l, h, i, j] = tokens[b, l, 1 + i*G + j, h] . direction``.

    Parameters
    ----------
    dec : Decomposition of B images
    direction : [D], e.g. a text embedding or a TextSpan text of some head

    Returns
    -------
    float32 [B, L, H, G, G]

    Examples
    --------
    >>> maps = head_maps(dec, model.encode_text(["a dog"], normalize=True)[0])   # doctest: +SKIP
    >>> maps.shape                                                # doctest: +SKIP
    (1, 12, 12, 14, 14)
    """
    b, n_layers, n, n_heads, d = _shape(dec)
    f = _first_patch(dec)
    g = _grid_side(n, f)
    u = _as_directions(direction, d, "direction")
    if u.shape[0] != 1:
        raise ValueError(f"direction must be one [D] vector, got {u.shape[0]}")
    tokens = _tokens_or_none(dec)
    if tokens is not None:
        # on the whole (contiguous) array, so that no copy of the tokens is made
        per = np.tensordot(tokens, u[0].astype(tokens.dtype), axes=([4], [0]))[:, :, f:]
    else:
        per = np.asarray(dec.project_tokens(u))[:, :, f:, :, 0]  # [B, L, G*G, H]
    per = np.asarray(per, np.float32).transpose(0, 1, 3, 2)  # [B, L, H, N-1]
    return np.ascontiguousarray(per.reshape(b, n_layers, n_heads, g, g))


def head_map(dec: Any, layer: int, head: int, direction: np.ndarray) -> np.ndarray:
    """The joint map of one head and one direction (figure 1c of the paper): [B, G, G].

    ``out[b, i, j] = tokens[b, layer, 1 + i*G + j, head] . direction``: where in the image that
    head writes along ``direction`` (for instance the TextSpan text of the head).

    Parameters
    ----------
    dec : Decomposition of B images
    layer, head : which head (negative indices count from the end)
    direction : [D]

    Returns
    -------
    float32 [B, G, G]

    Examples
    --------
    >>> m = head_map(dec, -1, 3, model.encode_text(["red"], normalize=True)[0])  # doctest: +SKIP
    """
    _, n_layers, _, n_heads, d = _shape(dec)
    (li,) = _index_list(layer, n_layers, "layer")
    (hi,) = _index_list(head, n_heads, "head")
    u = _as_directions(direction, d, "direction")
    if u.shape[0] != 1:
        raise ValueError(f"direction must be one [D] vector, got {u.shape[0]}")
    return heatmap(dec, u, heads=[(li, hi)])[:, 0]


# --------------------------------------------------------------------------------------------
# attention baselines

def _attn(dec: Any, name: str) -> np.ndarray:
    try:
        a = getattr(dec, name)
    except ValueError as e:
        raise ValueError(f"{e} (attention baselines need model.decompose(..., attn=True))") from e
    if a is None:
        raise ValueError(f"dec.{name} is missing: decompose with attn=True")
    return np.asarray(a)


def attention_map(dec: Any, layer: int = -1, heads: int | Sequence[int] | None = None
                  ) -> np.ndarray:
    """Raw attention of the class token to the patches, averaged over heads: [B, G, G].

    The usual "raw attention" baseline (last layer by default), from ``dec.attn_cls``.

    Parameters
    ----------
    dec : Decomposition made with ``attn=True``
    layer : which layer (default the last)
    heads : None (average all heads) or the heads to average

    Returns
    -------
    float32 [B, G, G]

    Examples
    --------
    >>> dec = model.decompose(images, attn=True)    # doctest: +SKIP
    >>> attention_map(dec).shape                    # doctest: +SKIP
    (1, 14, 14)
    """
    a = _attn(dec, "attn_cls")  # [B, L, H, N]
    b, n_layers, n_heads, n = a.shape
    g = _grid_side(n)
    (li,) = _index_list(layer, n_layers, "layer")
    hs = list(range(n_heads)) if heads is None else _index_list(heads, n_heads, "head")
    m = a[:, li][:, hs, 1:].mean(axis=1, dtype=np.float64)  # [B, N-1]
    return m.reshape(b, g, g).astype(np.float32)


def attention_rollout(dec: Any, residual: bool = True, start_layer: int = 0) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) from the class token to the patches: [B, G, G].

    Per layer ``A_l = 0.5 * attn_mean_l + 0.5 * I`` (or ``attn_mean_l`` alone without
    ``residual``), each row normalised to sum 1; the rollout is ``A_L ... A_(start+1) A_start``
    and the map is its class-token row over the patches.

    Parameters
    ----------
    dec : Decomposition made with ``attn=True`` (uses ``dec.attn_mean`` [B, L, N, N])
    residual : account for the skip connections with the identity
    start_layer : first layer to include

    Returns
    -------
    float32 [B, G, G]

    Examples
    --------
    >>> attention_rollout(model.decompose(images, attn=True)).shape   # doctest: +SKIP
    (1, 14, 14)
    """
    a = _attn(dec, "attn_mean")  # [B, L, N, N]
    b, n_layers, n, _ = a.shape
    g = _grid_side(n)
    (start,) = _index_list(start_layer, n_layers, "layer")
    eye = np.eye(n)
    roll = np.broadcast_to(eye, (b, n, n)).copy()
    for li in range(start, n_layers):
        al = a[:, li].astype(np.float64)
        if residual:
            al = 0.5 * al + 0.5 * eye
        al = al / al.sum(axis=-1, keepdims=True)
        roll = al @ roll
    return roll[:, 0, 1:].reshape(b, g, g).astype(np.float32)


# --------------------------------------------------------------------------------------------
# resampling

def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with half-pixel centres.

    Source coordinate of output i: ``(i + 0.5) * n_in / n_out - 0.5``, clamped below at 0; the
    neighbour past the last input sample is the last sample (align_corners=False convention).
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def upsample(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of maps ``[..., G, G]`` to ``[..., size, size]`` (half-pixel centres).

    The same numbers as ``torch.nn.functional.interpolate(x, size, mode='bilinear',
    align_corners=False)``, which is how the paper brings patch maps to pixels.

    Parameters
    ----------
    maps : [..., h, w] (e.g. [B, G, G])
    size : output side, or (out_h, out_w)

    Returns
    -------
    [..., out_h, out_w], float32 for float32 or integer input, else the input's float dtype

    Examples
    --------
    >>> import numpy as np
    >>> upsample(np.arange(4.0).reshape(1, 2, 2), 4)[0, 0]
    array([0.  , 0.25, 0.75, 1.  ])
    """
    arr = np.asarray(maps)
    if arr.ndim < 2:
        raise ValueError(f"maps must be [..., h, w], got shape {arr.shape}")
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
    wr = _bilinear_matrix(arr.shape[-2], int(out_h))  # [out_h, h]
    wc = _bilinear_matrix(arr.shape[-1], int(out_w))  # [out_w, w]
    out = wr @ arr.astype(np.float64) @ wc.T
    return out.astype(dtype)
