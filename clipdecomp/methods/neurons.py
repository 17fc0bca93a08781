"""Second-order effects of MLP neurons (Gandelsman, Efros & Steinhardt, "Interpreting the
Second-Order Effects of Neurons in CLIP", ICLR 2025).

The second-order effect of neuron ``n`` of MLP layer ``l`` on an image is the part of the image
embedding that flows from the neuron's post-activation values, through the class-token row of
every attention head of the later layers ``j > l``, directly to the output. It follows the
conventions of the paper's reference code:

* the neuron's output at token ``t`` is ``act[t, n] * W_proj[:, n] + b_proj / F`` (the c_proj bias
  split evenly over the F neurons);
* ``ln_1`` of layer ``j`` is linearised per token with the token's own mean and std; the neuron
  gets a ``1 / ((1 + 2j) F)`` share of the mean and of the LayerNorm bias, and of the value bias;
  the out-projection bias share is ``1 / ((1 + 2j) H F)``;
* ``ln_post`` is linearised with the image's class-token statistics, the neuron's share of its
  mean and bias being ``1 / ((1 + 2j) (2L + 1) H F)``, then projected with ``proj``;
* the result is multiplied by ``coefficient`` (100 in the reference) and divided by the norm of
  the unnormalised image embedding. Divided by ``coefficient`` the effects are on the scale of
  :class:`~clipdecomp.Decomposition` terms (which add up to the unit embedding).

The first-order (direct) effect of a neuron is its class-token output through the residual
stream to ``ln_post`` (share ``1 / ((2L + 1) F)``), the same ``coefficient`` and norm; the direct
effects of all neurons of layer ``l`` add up to ``coefficient * dec.mlps[:, l + 1]``.

How it is computed: per (later layer j, head h) the map from a neuron's output direction to the
embedding is a fixed ``[F, D]`` matrix (the fold, built once per model and layer); per image only
``coef[j, h, n] = sum_t a[j,h,0,t] act[t,n] / sigma_j[t]`` changes, which the C core computes
during the forward pass (``N * F`` per head and image). No ``[B, tokens, neurons, width]``
intermediate is ever formed.

Shapes: B images, N tokens, F neurons (MLP width), D embedding dim, L layers, H heads,
J = L - 1 - layer later layers, K = J * H later heads.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdecomp.engine import core
from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import (
    count_images,
    format_bytes,
    image_batches,
    image_list,
    memory_budget,
    progress_bar,
)

__all__ = ["NeuronFold", "check_neuron_layer", "first_order", "neuron_ablation", "neuron_fold",
           "neuron_forward", "neuron_segment", "second_order", "second_order_from"]

#: the reference's scale factor of every effect
COEFFICIENT = 100.0


# -- the weights the fold needs -----------------------------------------------------------------

_KEYS = {
    "open_clip": {
        "ln_1.weight": "visual.transformer.resblocks.{}.ln_1.weight",
        "ln_1.bias": "visual.transformer.resblocks.{}.ln_1.bias",
        "in_proj.weight": "visual.transformer.resblocks.{}.attn.in_proj_weight",
        "in_proj.bias": "visual.transformer.resblocks.{}.attn.in_proj_bias",
        "out.weight": "visual.transformer.resblocks.{}.attn.out_proj.weight",
        "out.bias": "visual.transformer.resblocks.{}.attn.out_proj.bias",
        "c_proj.weight": "visual.transformer.resblocks.{}.mlp.c_proj.weight",
        "c_proj.bias": "visual.transformer.resblocks.{}.mlp.c_proj.bias",
        "ln_post.weight": "visual.ln_post.weight",
        "ln_post.bias": "visual.ln_post.bias",
        "proj": "visual.proj",
    },
    "hf": {
        "ln_1.weight": "vision_model.encoder.layers.{}.layer_norm1.weight",
        "ln_1.bias": "vision_model.encoder.layers.{}.layer_norm1.bias",
        "v.weight": "vision_model.encoder.layers.{}.self_attn.v_proj.weight",
        "v.bias": "vision_model.encoder.layers.{}.self_attn.v_proj.bias",
        "out.weight": "vision_model.encoder.layers.{}.self_attn.out_proj.weight",
        "out.bias": "vision_model.encoder.layers.{}.self_attn.out_proj.bias",
        "c_proj.weight": "vision_model.encoder.layers.{}.mlp.fc2.weight",
        "c_proj.bias": "vision_model.encoder.layers.{}.mlp.fc2.bias",
        "ln_post.weight": "vision_model.post_layernorm.weight",
        "ln_post.bias": "vision_model.post_layernorm.bias",
        "proj": "visual_projection.weight",
    },
}


class _Weights:
    """The vision-tower tensors of a model's weights file, in float64, by role."""

    def __init__(self, model: Any):
        from clipdecomp.engine.safetensors_io import SafetensorsFile

        layout = model.layout
        if layout not in _KEYS:
            raise ValueError(f"neuron effects need the model's key layout ('open_clip' or 'hf'), "
                             f"got {layout!r}")
        self.layout = layout
        self.file = SafetensorsFile(model.path)
        anchor = _KEYS[layout]["ln_post.weight"]
        self.prefix = ""
        for k in self.file:
            if k.endswith(anchor) and (k == anchor or k[: -len(anchor)].endswith(".")):
                self.prefix = k[: -len(anchor)]
                break

    def get(self, role: str, layer: int | None = None) -> np.ndarray:
        key = self.prefix + _KEYS[self.layout][role].format(layer)
        return np.asarray(self.file.read(key), np.float64)

    def value(self, layer: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``W_v [W, W]`` (out, in) and ``b_v [W]`` of a layer."""
        if self.layout == "hf":
            return self.get("v.weight", layer), self.get("v.bias", layer)
        w, b = self.get("in_proj.weight", layer), self.get("in_proj.bias", layer)
        return w[2 * width:], b[2 * width:]

    def proj(self) -> np.ndarray:
        """``proj [W, D]``."""
        p = self.get("proj")
        return p.T if self.layout == "hf" else p


@dataclass
class NeuronFold:
    """The fixed part of the neuron effects of one layer of one model.

    Attributes
    ----------
    layer : int
        The neuron layer l.
    second : ndarray, float32 ``[F, K, D]``
        ``second[n, (j, h)] = G(W_O,h W_V,h (g1_j * W_proj[:, n]))``, where ``G(x) = (g_post * x)
        @ proj``: the direction of neuron n through head h of later layer j, before the per-image
        coefficient.
    first : ndarray, float32 ``[F, 1, D]``
        ``G(W_proj[:, n])``: the direct direction of neuron n.
    r_bias, r_ln_mean, r_const : ndarray, float64 ``[K, D]``
        Per later head: ``G(W_O,h W_V,h (g1_j * b_proj / F))``, ``G(W_O,h W_V,h g1_j)`` and
        ``G(W_O,h (W_V,h b1_j + b_V,h))``: the pieces of the per-image shift.
    out_bias : ndarray, float64 ``[J, D]``
        ``G(b_O,j)``.
    g_ones, beta, proj_bias : ndarray, float64 ``[D]``
        ``G(1)``, ``b_post @ proj`` and ``G(b_proj)``.
    c : ndarray, float64 ``[J]``
        ``(1 + 2j) F``: the neuron's share denominator in layer j.
    """

    layer: int
    layers: int
    heads: int
    second: np.ndarray
    first: np.ndarray
    r_bias: np.ndarray
    r_ln_mean: np.ndarray
    r_const: np.ndarray
    out_bias: np.ndarray
    g_ones: np.ndarray
    beta: np.ndarray
    proj_bias: np.ndarray
    c: np.ndarray

    @property
    def n_neurons(self) -> int:
        return self.second.shape[0]

    @property
    def nbytes(self) -> int:
        return self.second.nbytes + self.first.nbytes


_FOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FOLDS_LOCK = threading.Lock()


def check_neuron_layer(model: Any, layer: Any, *, need_later: bool) -> int:
    """``layer`` as an index in ``[0, L)`` (negative counts from the end), or in ``[0, L - 1)``
    with ``need_later`` (second-order effects need a later layer); TypeError / ValueError
    otherwise.

    Examples
    --------
    >>> check_neuron_layer(model, -2, need_later=True)        # doctest: +SKIP
    10
    """
    L = model.config.layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    layer = int(layer)
    if layer < 0:
        layer += L
    hi = L - 1 if need_later else L
    if not 0 <= layer < hi:
        later = " (second-order effects need a later layer)" if need_later else ""
        raise ValueError(f"layer must be in [0, {hi}) for a model of {L} layers{later}, "
                         f"got {layer}")
    return layer


def neuron_fold(model: Any, layer: int) -> NeuronFold:
    """The fixed maps of the neuron effects of ``layer`` (cached per model and layer).

    Built in float64 from the weights file, stored as float32: ``F * (K + 1) * D`` floats
    (151 MiB for ViT-B/32, layer 9).

    Examples
    --------
    >>> fold = neuron_fold(model, 4)                          # doctest: +SKIP
    >>> fold.second.shape                                     # [F, K, D]
    (768, 6, 128)
    """
    layer = check_neuron_layer(model, layer, need_later=False)
    with _FOLDS_LOCK:
        cached = _FOLDS.get(model, {}).get(layer)
    if cached is not None and cached[0] == os.path.getmtime(model.path):
        return cached[1]
    c = model.config
    W, H, L, F = c.width, c.heads, c.layers, c.mlp_dim
    d = W // H
    wt = _Weights(model)
    g_post, b_post, proj = wt.get("ln_post.weight"), wt.get("ln_post.bias"), wt.proj()
    gproj = g_post[:, None] * proj                                  # G(x) = x @ gproj  [W, D]
    w_p, b_p = wt.get("c_proj.weight", layer), wt.get("c_proj.bias", layer)   # [W, F], [W]
    J = L - 1 - layer
    K = J * H
    second = np.empty((F, K, c.embed_dim), np.float32)
    r_bias = np.empty((K, c.embed_dim))
    r_ln_mean = np.empty((K, c.embed_dim))
    r_const = np.empty((K, c.embed_dim))
    out_bias = np.empty((J, c.embed_dim))
    for jj in range(J):
        j = layer + 1 + jj
        g1, b1 = wt.get("ln_1.weight", j), wt.get("ln_1.bias", j)
        w_v, b_v = wt.value(j, W)
        w_o, b_o = wt.get("out.weight", j), wt.get("out.bias", j)
        out_bias[jj] = b_o @ gproj
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            m_h = w_o[:, sl].T @ gproj                              # [d, D]
            wv_h = w_v[sl]                                          # [d, W]
            k = jj * H + h
            second[:, k] = ((wv_h @ (g1[:, None] * w_p)).T @ m_h).astype(np.float32)
            r_bias[k] = (wv_h @ (g1 * b_p / F)) @ m_h
            r_ln_mean[k] = (wv_h @ g1) @ m_h
            r_const[k] = (wv_h @ b1 + b_v[sl]) @ m_h
    fold = NeuronFold(
        layer=layer, layers=L, heads=H, second=second,
        first=(w_p.T @ gproj).astype(np.float32)[:, None, :],
        r_bias=r_bias, r_ln_mean=r_ln_mean, r_const=r_const, out_bias=out_bias,
        g_ones=g_post @ proj, beta=b_post @ proj, proj_bias=b_p @ gproj,
        c=np.array([(1 + 2 * (layer + 1 + jj)) * F for jj in range(J)], np.float64))
    with _FOLDS_LOCK:
        _FOLDS.setdefault(model, {})[layer] = (os.path.getmtime(model.path), fold)
    return fold


# -- the forward pass ---------------------------------------------------------------------------


def _batch_size(model: Any, batch_size: int | None, per_image_bytes: int) -> int:
    if batch_size is not None:
        return check_size(batch_size, "batch_size", default=8)
    return int(max(1, min(32, (256 << 20) // max(per_image_bytes, 1))))


def neuron_forward(model: Any, images: Any, layer: int, *, record: Any = None,
                   batch_size: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run the model over ``images`` in batches, keeping what the neuron effects of ``layer``
    need.

    Yields ``(start, out)`` per batch, ``out`` a dict of ``coef [b, J, H, F]``, ``aux [b, J, H,
    2]``, ``act_cls [b, F]``, ``embedding [b, D]``, ``ln_stats [b, 3]`` and, given ``record``
    (neuron indices), ``acts [b, N, R]``: the post-activation values of those neurons at every
    token (their spatial maps). See ``csrc/neurons.h``.

    Examples
    --------
    >>> for start, out in neuron_forward(model, images, 4, record=[7]):    # doctest: +SKIP
    ...     maps = out["acts"][:, 1:, 0]                       # [b, G*G]
    """
    layer = check_neuron_layer(model, layer, need_later=False)
    c = model.config
    rec = None
    if record is not None:
        rec = np.asarray(record)
        if rec.ndim != 1 or not np.issubdtype(rec.dtype, np.integer):
            raise ValueError(f"record must be a 1-d array of neuron indices, got {rec.dtype} "
                             f"of shape {rec.shape}")
        if rec.size and (rec.min() < 0 or rec.max() >= c.mlp_dim):
            raise ValueError(f"record: neuron indices must lie in [0, {c.mlp_dim}), got "
                             f"[{rec.min()}, {rec.max()}]")
        rec = np.ascontiguousarray(rec, np.int32)
    # the forward's scratch, and the [F, D] effects (and a copy) one image becomes downstream
    per_image = 4 * c.n_tokens * (c.mlp_dim + c.width * 6) + 8 * c.mlp_dim * c.embed_dim
    bs = _batch_size(model, batch_size, per_image)
    for s, px in image_batches(model, image_list(images), bs):
        out = core.neuron_coefs(model, np.ascontiguousarray(px, np.float32), layer, rec)
        yield s, out


def _scales(out: dict[str, np.ndarray], coefficient: float) -> tuple[np.ndarray, np.ndarray]:
    """``coefficient / (||emb|| sigma)`` and ``coefficient / ||emb||`` per image (float64)."""
    st = np.asarray(out["ln_stats"], np.float64)
    norm = st[:, 2]
    if not np.all(norm > 0):
        raise ValueError("an image embedding has norm 0: its neuron effects are undefined")
    return coefficient / (norm * st[:, 1]), coefficient / norm


def second_order_from(fold: NeuronFold, out: dict[str, np.ndarray],
                      coefficient: float = COEFFICIENT) -> np.ndarray:
    """``[b, F, D]`` second-order effects of one batch from what :func:`neuron_forward` yields
    for it (only ``coef [b, J, H, F]``, ``aux [b, J, H, 2]`` and ``ln_stats [b, 3]`` are read).

    The effects of an image are a function of these arrays and the fold alone, so a data set's
    statistics can be computed from stored coefficients without running the model again.

    Examples
    --------
    >>> fold = neuron_fold(model, 9)                          # doctest: +SKIP
    >>> for s, out in neuron_forward(model, images, 9):       # doctest: +SKIP
    ...     eff = second_order_from(fold, out)                # [b, F, D]
    """
    b = out["coef"].shape[0]
    F, K, _ = fold.second.shape
    sc, inv_norm = _scales(out, coefficient)
    st = np.asarray(out["ln_stats"], np.float64)
    aux = np.asarray(out["aux"], np.float64).reshape(b, K, 2)
    H = fold.heads
    c_k = np.repeat(fold.c, H)                                      # [K]
    mu = st[:, 0]
    # (1/sigma) part of the shift: [b, D]
    inner = (aux[:, :, 0] @ fold.r_bias
             - (aux[:, :, 1] / c_k) @ fold.r_ln_mean
             + (1.0 / c_k) @ fold.r_const
             + (1.0 / fold.c) @ fold.out_bias
             - mu[:, None] * (np.sum(1.0 / (fold.c * (2 * fold.layers + 1))) * fold.g_ones))
    outer = np.sum(1.0 / (fold.c * (2 * fold.layers + 1))) * fold.beta
    shift = (sc[:, None] * inner + inv_norm[:, None] * outer).astype(np.float32)
    coef = np.ascontiguousarray(out["coef"].reshape(b, K, F))
    return core.neuron_fold_apply(coef, fold.second, sc.astype(np.float32), shift)


def _first_from(fold: NeuronFold, out: dict[str, np.ndarray],
                coefficient: float = COEFFICIENT) -> np.ndarray:
    """``[b, F, D]`` first-order (direct) effects of one batch."""
    F = fold.n_neurons
    K2 = 2 * fold.layers + 1
    sc, inv_norm = _scales(out, coefficient)
    mu = np.asarray(out["ln_stats"], np.float64)[:, 0]
    inner = fold.proj_bias / F - mu[:, None] * fold.g_ones / (K2 * F)
    shift = (sc[:, None] * inner + inv_norm[:, None] * (fold.beta / (K2 * F))).astype(np.float32)
    coef = np.ascontiguousarray(out["act_cls"][:, None, :])
    return core.neuron_fold_apply(coef, fold.first, sc.astype(np.float32), shift)


def _effects(model: Any, images: Any, layer: int, which: str, coefficient: float,
             batch_size: int | None, progress: bool) -> np.ndarray:
    layer = check_neuron_layer(model, layer, need_later=which == "second")
    if not np.isfinite(coefficient) or coefficient == 0:
        raise ValueError(f"coefficient must be a finite non-zero number, got {coefficient!r}")
    c = model.config
    images = image_list(images)
    n = count_images(images)
    need = n * c.mlp_dim * c.embed_dim * 4
    if need > memory_budget(model):
        raise MemoryError(
            f"{which}-order effects of {n} images take {format_bytes(need)} ([B, F, D] = "
            f"[{n}, {c.mlp_dim}, {c.embed_dim}] float32), over the memory budget of "
            f"{format_bytes(memory_budget(model))}; use clipdecomp.methods.neuron_stats."
            "neuron_stats for data-set statistics without keeping them (or run_dataset(..., "
            "neurons=layer) for a whole data set)")
    fold = neuron_fold(model, layer)
    res = np.empty((n, c.mlp_dim, c.embed_dim), np.float32)
    fn = second_order_from if which == "second" else _first_from
    with progress_bar(total=n, enabled=progress, unit="img", desc=f"{which}_order") as bar:
        for s, out in neuron_forward(model, images, layer, batch_size=batch_size):
            res[s:s + out["coef"].shape[0]] = fn(fold, out, coefficient)
            bar.update(out["coef"].shape[0])
    return res


def second_order(model: Any, images: Any, layer: int, *, coefficient: float = COEFFICIENT,
                 batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Second-order effects of every neuron of MLP ``layer``: float32 ``[B, F, D]``.

    ``out[b, n]`` is the effect of neuron ``n`` on image ``b``'s embedding through the
    class-token rows of all heads of the later layers, with the reference code's conventions
    (module docstring), times ``coefficient`` and divided by ``||embedding||``.

    Parameters
    ----------
    model : CLIP
        A loaded model (``clipdecomp.load``).
    images : paths, PIL images, arrays, or float ``[B, 3, S, S]`` pixels
        As for :meth:`CLIP.decompose`.
    layer : int
        The MLP layer, ``0 <= layer < L - 1`` (negative counts from the end).
    coefficient : float
        The reference's scale factor (100). Divided by it, the effects are on the scale of the
        decomposition's terms.
    batch_size : int, optional
        Images per forward pass.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ndarray, float32 ``[B, F, D]``

    Raises
    ------
    MemoryError
        When ``[B, F, D]`` does not fit the model's memory budget (use
        :func:`clipdecomp.neuron_stats.neuron_stats` for data-set statistics).

    Examples
    --------
    >>> import clipdecomp
    >>> from clipdecomp import toy
    >>> model = clipdecomp.load()
    >>> eff = second_order(model, list(toy.generate(2, seed=0).images), layer=3)
    >>> eff.shape
    (2, 768, 128)
    """
    return _effects(model, images, layer, "second", float(coefficient), batch_size, progress)


def first_order(model: Any, images: Any, layer: int, *, coefficient: float = COEFFICIENT,
                batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """First-order (direct) effects of every neuron of MLP ``layer``: float32 ``[B, F, D]``.

    The neuron's class-token output ``act[0, n] W_proj[:, n] + b_proj / F`` through ``ln_post``
    (share ``1 / ((2L + 1) F)`` of its mean and bias) and ``proj``, times ``coefficient``,
    divided by ``||embedding||``. Summed over neurons it is ``coefficient * dec.mlps[:, layer +
    1]``.

    Examples
    --------
    >>> eff = first_order(model, images, layer=5)             # doctest: +SKIP
    >>> np.allclose(eff.sum(1), 100 * model.decompose(images).mlps[:, 6], atol=1e-4)  # doctest: +SKIP
    True
    """
    return _effects(model, images, layer, "first", float(coefficient), batch_size, progress)


# -- the reference's ablation study -------------------------------------------------------------


def _check_classifier(classifier: Any, dim: int) -> np.ndarray:
    clf = np.asarray(classifier, np.float64)
    if clf.ndim != 2 or clf.shape[0] != dim:
        raise ValueError(f"classifier must be [D, C] with D = {dim}, got shape {clf.shape}")
    return clf


def neuron_ablation(model: Any, images: Any, labels: Any, classifier: Any, stats: Any, *,
                    coefficient: float = COEFFICIENT, batch_size: int | None = None,
                    progress: bool = False):
    """The reference's neuron ablation study, in one call (``compute_ablations.py``).

    For each image the representation ``coefficient * emb / ||emb||`` is changed in the
    second-order effects of the neurons of ``stats.layer`` only:

    * ``mean-ablated``: every effect replaced by its mean over the statistics' images;
    * ``without significant``: mean-ablated, then the insignificant effects put back (an effect
      is significant when its centred norm exceeds its neuron's threshold ``stats.threshold``,
      the k-th largest norm over the statistics' images);
    * ``only significant``: mean-ablated, then only the significant effects put back;
    * ``principal components``: mean-ablated, then each centred effect replaced by its
      projection on the neuron's principal direction.

    Parameters
    ----------
    model : CLIP
    images : images or float pixels ``[B, 3, S, S]``
    labels : int ``[B]``
    classifier : ``[D, C]`` (``zero_shot_classifier``)
    stats : NeuronStatsResult
        From :func:`clipdecomp.neuron_stats.neuron_stats` on a reference set (its ``layer``
        gives the neuron layer).
    coefficient : float
        As for :func:`second_order` (must match the statistics').

    Returns
    -------
    pandas.DataFrame
        Columns ``ablation`` and ``accuracy`` (top-1, in [0, 1]); ``df.attrs`` has
        ``significant_share`` (fraction of (image, neuron) effects that are significant) and
        ``logits`` (dict of ``[B, C]`` arrays).

    Examples
    --------
    >>> df = neuron_ablation(model, images, labels, clf, stats)   # doctest: +SKIP
    >>> df.set_index("ablation").accuracy["principal components"]  # doctest: +SKIP
    0.98
    """
    import pandas as pd

    if stats.layer is None:
        raise ValueError("stats has no layer: compute it with neuron_stats(model, ..., layer)")
    layer = check_neuron_layer(model, stats.layer, need_later=True)
    c = model.config
    clf = _check_classifier(classifier, c.embed_dim)
    if stats.mean.shape != (c.mlp_dim, c.embed_dim):
        raise ValueError(f"stats are for [F, D] = {stats.mean.shape}, the model has "
                         f"[{c.mlp_dim}, {c.embed_dim}]")
    images = image_list(images)
    n = count_images(images)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} images")
    fold = neuron_fold(model, layer)
    mean = stats.mean.astype(np.float64)
    pcs = stats.pcs.astype(np.float64)
    thr = stats.threshold.astype(np.float64)
    names = ["baseline", "mean-ablated", "without significant", "only significant",
             "principal components"]
    logits = {k: np.empty((n, clf.shape[1])) for k in names}
    n_sig = 0
    with progress_bar(total=n, enabled=progress, unit="img", desc="neuron ablation") as bar:
        for s, out in neuron_forward(model, images, layer, batch_size=batch_size):
            eff = second_order_from(fold, out, float(coefficient)).astype(np.float64)
            b = eff.shape[0]
            emb = np.asarray(out["embedding"], np.float64)
            rep = coefficient * emb / np.linalg.norm(emb, axis=1, keepdims=True)
            cen = eff - mean
            sig = np.linalg.norm(cen, axis=-1) > thr                    # [b, F]
            n_sig += int(sig.sum())
            ablated = rep - eff.sum(1) + mean.sum(0)
            reps = {
                "baseline": rep,
                "mean-ablated": ablated,
                "without significant": ablated + np.einsum("bf,bfd->bd", ~sig, cen),
                "only significant": ablated + np.einsum("bf,bfd->bd", sig, cen),
                "principal components": ablated + np.einsum(
                    "bf,fd->bd", np.einsum("bfd,fd->bf", cen, pcs), pcs),
            }
            for k in names:
                logits[k][s:s + b] = reps[k] @ clf
            bar.update(b)
    acc = [float((logits[k].argmax(1) == labels).mean()) for k in names]
    df = pd.DataFrame({"ablation": names, "accuracy": acc})
    df.attrs["significant_share"] = n_sig / float(n * c.mlp_dim)
    df.attrs["logits"] = logits
    return df


# -- neuron-based zero-shot segmentation --------------------------------------------------------


def neuron_segment(model: Any, images: Any, classifier: Any, stats: Any, *,
                   top_neurons: int = 200, classes: Any = None, batch_size: int | None = None,
                   progress: bool = False):
    """Zero-shot segmentation from neurons, as the reference's ``compute_segmentation.py``.

    For each class, the ``top_neurons`` neurons (over the layers of ``stats``) whose principal
    direction has the largest absolute score under the class's classifier column; an image's map
    is the mean over its class's neurons of their post-activation values at the patches. Maps are
    upsampled bilinearly to the image side, min-max normalised per image, and thresholded at 0.5
    (the reference's threshold; it does not clip at 0).

    Parameters
    ----------
    model : CLIP
    images : images or float pixels ``[B, 3, S, S]``
    classifier : ``[D, C]``
    stats : NeuronStatsResult or a sequence of them (one per layer, each with its ``layer``)
    top_neurons : int
        Neurons per class (200 in the reference).
    classes : int ``[B]``, optional
        Segment these classes (default: the predicted class of each image).

    Returns
    -------
    SegmentationResult
        ``scores [B, S, S]``, ``masks [B, S, S]``, ``classes [B]``, ``maps [B, G, G]``;
        ``.metrics(gt_masks)`` gives the paper's metrics.

    Examples
    --------
    >>> res = neuron_segment(model, images, clf, [st8, st9, st10])   # doctest: +SKIP
    >>> res.metrics(gt_masks)["miou"]                                # doctest: +SKIP
    """
    from clipdecomp.methods.segmentation import SegmentationResult
    from clipdecomp.methods.spatial import upsample

    st_list = list(stats) if isinstance(stats, (list, tuple)) else [stats]
    if not st_list or any(s.layer is None for s in st_list):
        raise ValueError("stats must be NeuronStatsResult(s) with their layer set")
    c = model.config
    clf = _check_classifier(classifier, c.embed_dim)
    pcs = np.concatenate([np.asarray(s.pcs, np.float64) for s in st_list])   # [F_all, D]
    if isinstance(top_neurons, bool) or not isinstance(top_neurons, (int, np.integer)) \
            or not 1 <= top_neurons <= pcs.shape[0]:
        raise ValueError(f"top_neurons must be an int in [1, {pcs.shape[0]}], got "
                         f"{top_neurons!r}")
    layers = [check_neuron_layer(model, s.layer, need_later=False) for s in st_list]
    F = c.mlp_dim
    scores = np.abs(pcs @ clf)                                          # [F_all, C]
    chosen = np.argsort(scores, axis=0, kind="stable")[-top_neurons:].T  # [C, top]
    images = image_list(images)
    n = count_images(images)
    if classes is not None:
        classes = np.asarray(classes, np.int64).reshape(-1)
        if classes.shape[0] != n or classes.min() < 0 or classes.max() >= clf.shape[1]:
            raise ValueError(f"classes must be {n} ints in [0, {clf.shape[1]})")
    G = c.grid
    # post-activation values at every token of every neuron that some class uses
    sums = np.zeros((n, c.n_tokens))
    pred = np.empty(n, np.int64)

    for li, layer in enumerate(layers):
        in_layer = np.unique(chosen[(chosen >= li * F) & (chosen < (li + 1) * F)]) - li * F
        if li > 0 and not in_layer.size:
            continue
        with progress_bar(total=n, enabled=progress, unit="img",
                          desc=f"neuron maps, layer {layer}") as bar:
            for s, out in neuron_forward(model, images, layer, record=in_layer,
                                         batch_size=batch_size):
                b = out["embedding"].shape[0]
                bar.update(b)
                if li == 0:
                    pred[s:s + b] = (np.asarray(out["embedding"], np.float64) @ clf).argmax(1)
                cls = pred[s:s + b] if classes is None else classes[s:s + b]
                if not in_layer.size:
                    continue
                acts = np.asarray(out["acts"], np.float64)              # [b, N, R]
                for i in range(b):
                    mine = chosen[cls[i]]
                    mine = mine[(mine >= li * F) & (mine < (li + 1) * F)] - li * F
                    cols = np.searchsorted(in_layer, mine)
                    sums[s + i] += acts[i][:, cols].sum(1)
    cls_all = pred if classes is None else classes
    maps = (sums[:, 1:] / top_neurons).reshape(n, G, G).astype(np.float32)
    up = upsample(maps, c.image_size)
    flat = up.reshape(n, -1)
    lo = flat.min(1)[:, None, None]
    span = flat.max(1)[:, None, None] - lo
    degenerate = ~(span[:, 0, 0] > 0)
    sc = np.where(span > 0, (up - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
    masks = sc > 0.5
    return SegmentationResult(scores=sc, masks=masks, classes=np.asarray(cls_all, np.int64),
                              maps=maps, degenerate=degenerate)
