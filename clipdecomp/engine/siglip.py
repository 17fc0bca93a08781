"""SigLIP and SigLIP 2: loading, encoding and the decomposition of the pooled image embedding.

SigLIP has no class token. Its image embedding is the output of an attention-pooling head: a
learned probe attends over every token after ``post_layernorm``, then a LayerNorm and an MLP
with a residual. Two decompositions are offered (``docs/decomposition.md``, "SigLIP"):

``depth="pool"`` (the reference code's)
    the embedding = the pooling attention's terms per (head, token) + the pooling MLP's term.
    ``heads [B, 1, H, D]``, ``mlps [B, 1, D]`` (the pooling MLP), ``tokens [B, 1, N, H, D]``.
``depth="deep"`` (beyond it)
    ``post_layernorm`` is affine per token once its statistics are fixed and the pooling
    attention is linear in its values, so the attention part splits over every layer and head
    of the encoder: ``heads [B, L, H, D]`` and ``mlps [B, L+2, D]`` (row 0 the patch and
    position embeddings, rows 1..L the MLPs of the layers, row L+1 the pooling MLP, the one
    nonlinear term), and with ``spatial=True`` ``tokens [B, L, N, H, D]``: each encoder head's
    term at each token the pooling head reads (summed over N: ``heads``).

In both, every term is divided by ``||embedding||`` and ``heads.sum((1, 2)) + mlps.sum(1) ==
embedding / ||embedding||``, so TextSpan, ablation, retrieval, heat maps and segmentation take
a SigLIP decomposition as they take a CLIP one.

Shapes: B images, L layers, H heads (the pooling head has as many as the encoder), N = G*G
tokens (patches only), W width = D embedding dim, C text context (64), T texts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipdecomp.engine import core as _engine_core
from clipdecomp.engine.config import _hf_preprocess
from clipdecomp.engine.decomposition import Decomposition
from clipdecomp.engine.helpers import format_bytes
from clipdecomp.engine.model import _check_finite, _normalize, default_threads
from clipdecomp.engine.preprocess import (
    _check_pixel_shape,
    _check_pixels,
    _is_float_array,
    as_image_list,
    preprocess_items,
)

__all__ = [
    "SIGLIP_PRETRAINED",
    "SigLIP",
    "SiglipConfig",
    "SiglipDecomposition",
    "SiglipTokenizer",
    "load_siglip",
    "siglip_config_from_hf",
    "siglip_config_from_open_clip",
]

#: Hugging Face Hub repositories :func:`load_siglip` takes by name: Google's in transformers'
#: layout (the fixed-resolution SigLIP 2 ones use SigLIP's architecture), then open_clip's
#: SigLIP tags in its timm-based layout (their repositories must hold
#: ``open_clip_model.safetensors``: clipdecomp reads no pickles)
SIGLIP_PRETRAINED: tuple[str, ...] = (
    "google/siglip-base-patch16-224",
    "google/siglip-base-patch16-256",
    "google/siglip-base-patch16-384",
    "google/siglip-base-patch16-512",
    "google/siglip-large-patch16-256",
    "google/siglip-large-patch16-384",
    "google/siglip-so400m-patch14-224",
    "google/siglip-so400m-patch14-384",
    "google/siglip2-base-patch16-224",
    "google/siglip2-base-patch16-256",
    "google/siglip2-base-patch16-384",
    "google/siglip2-base-patch16-512",
    "google/siglip2-large-patch16-256",
    "google/siglip2-large-patch16-384",
    "google/siglip2-large-patch16-512",
    "google/siglip2-so400m-patch14-224",
    "google/siglip2-so400m-patch14-384",
    "google/siglip2-so400m-patch16-256",
    "google/siglip2-so400m-patch16-384",
    "google/siglip2-so400m-patch16-512",
    "timm/ViT-B-16-SigLIP",
    "timm/ViT-B-16-SigLIP-256",
    "timm/ViT-B-16-SigLIP-384",
    "timm/ViT-B-16-SigLIP-512",
    "timm/ViT-L-16-SigLIP-256",
    "timm/ViT-L-16-SigLIP-384",
    "timm/ViT-SO400M-14-SigLIP",
    "timm/ViT-SO400M-14-SigLIP-384",
    "timm/ViT-B-16-SigLIP2",
    "timm/ViT-B-16-SigLIP2-256",
    "timm/ViT-L-16-SigLIP2-256",
    "timm/ViT-SO400M-14-SigLIP2",
    "timm/ViT-SO400M-14-SigLIP2-378",
)

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "gelu_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
_CONFIGS = ("config.json", "open_clip_config.json")
_FILES = (*_CONFIGS, "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "spiece.model", *_WEIGHTS)


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SiglipConfig:
    """Geometry, activation and preprocessing of one SigLIP model.

    Attributes
    ----------
    image_size, patch_size : int
        S and P (e.g. 224 and 16); G = floor(S / P) patches per side, N = G*G tokens. The
        patch convolution drops the last ``S % P`` rows and columns (so400m/14 at 384 pixels
        reads a 27 x 27 grid of 378 of them), as the released models do.
    width, layers, heads, mlp_dim : int
        The image tower (e.g. 768, 12, 12, 3072); the pooling head has ``heads`` heads and an
        MLP of width ``mlp_dim``. The embedding dim D equals ``width``.
    act : str
        ``"gelu_tanh"`` (transformers' ``gelu_pytorch_tanh``, every released SigLIP),
        ``"gelu"`` or ``"quick_gelu"``.
    ln_eps : float
        LayerNorm epsilon (1e-6).
    context_length, vocab_size, text_width, text_layers, text_heads, text_mlp_dim : int
        The text tower (C = 64 for SigLIP); ``text_layers == 0``: none.
    text_act : str
        Activation of the text tower.
    mean, std : tuple of float
        Per-channel normalisation (0.5, 0.5 for SigLIP).
    interpolation : str
        ``"bicubic"`` or ``"bilinear"`` (the image is resized to S x S, no crop).
    name : str
        A label, e.g. ``"google/siglip-base-patch16-224"``.

    Examples
    --------
    >>> cfg = SiglipConfig(224, 16, 768, 12, 12, 3072)
    >>> cfg.grid, cfg.n_tokens, cfg.embed_dim
    (14, 196, 768)
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    context_length: int = 64
    vocab_size: int = 32000
    text_width: int = 0
    text_layers: int = 0
    text_heads: int = 0
    text_mlp_dim: int = 0
    text_act: str = ""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("act", "text_act"):
            v = getattr(self, f) or (self.act if f == "text_act" else "")
            if v not in ("gelu_tanh", "gelu", "quick_gelu"):
                raise ValueError(f"SiglipConfig.{f} must be 'gelu_tanh', 'gelu' or 'quick_gelu', "
                                 f"got {v!r}")
            object.__setattr__(self, f, v)
        for f in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"SiglipConfig.{f} must be a positive int, got {v!r}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size "
                             f"{self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got "
                             f"{self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def grid(self) -> int:
        """G = image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """N = G*G: SigLIP has no class token."""
        return self.grid * self.grid

    @property
    def embed_dim(self) -> int:
        """D = width (the pooling head's output is the embedding)."""
        return self.width

    @property
    def head_dim(self) -> int:
        """d = W / H."""
        return self.width // self.heads

    @property
    def has_text(self) -> bool:
        """Whether the checkpoint has a text tower."""
        return self.text_layers > 0

    @property
    def resize_mode(self) -> str:
        """Always ``"squash"``: SigLIP resizes to S x S without cropping."""
        return "squash"

    def replace(self, **changes: Any) -> SiglipConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_core_dict(self) -> dict[str, Any]:
        """The dict that ``clipdecomp._core.Model`` takes (``family="siglip"``).

        Examples
        --------
        >>> SiglipConfig(224, 16, 768, 12, 12, 3072).to_core_dict()["family"]
        'siglip'
        """
        return {
            "image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
            "layers": self.layers, "heads": self.heads, "mlp_dim": self.mlp_dim,
            "embed_dim": self.width, "act": self.act, "ln_eps": float(self.ln_eps),
            "context_length": self.context_length, "vocab_size": self.vocab_size,
            "text_width": self.text_width, "text_layers": self.text_layers,
            "text_heads": self.text_heads, "text_mlp_dim": self.text_mlp_dim,
            "text_act": self.text_act, "family": "siglip",
        }


def _act(v: Any, where: str) -> str:
    if v not in _ACTS:
        raise ValueError(f"{where}: hidden_act {v!r} is not one the core runs "
                         f"({', '.join(sorted(_ACTS))})")
    return _ACTS[v]


def siglip_config_from_hf(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                          source: str = "config.json", name: str = "") -> SiglipConfig:
    """A :class:`SiglipConfig` from transformers' ``config.json`` (and the processor config).

    Reads ``SiglipConfig`` (``model_type: "siglip"``, also used by the fixed-resolution SigLIP 2
    checkpoints), ``Siglip2Config`` (``"siglip2"``, NaFlex, run at its native grid
    ``sqrt(num_patches)`` patches per side) and the vision-only configs.

    Parameters
    ----------
    config : mapping
        The parsed ``config.json``.
    preprocessor : mapping, optional
        The parsed ``preprocessor_config.json`` (mean, std, resample, size).
    source : str
        Named in error messages.
    name : str
        Label of the model.

    Returns
    -------
    SiglipConfig

    Raises
    ------
    ValueError
        For a config that is not SigLIP's, a NaFlex grid that is not square, an activation the
        core lacks, or towers whose widths or epsilons disagree.

    Examples
    --------
    >>> cfg = siglip_config_from_hf({"model_type": "siglip", "vision_config": {
    ...     "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "intermediate_size": 128, "image_size": 32, "patch_size": 8}})
    >>> cfg.n_tokens
    16
    """
    mt = str(config.get("model_type", ""))
    if mt in ("siglip", "siglip2"):
        vis = config.get("vision_config") or {}
        txt = config.get("text_config") or {}
    elif mt in ("siglip_vision_model", "siglip2_vision_model"):
        vis, txt = config, {}
    else:
        raise ValueError(f"{source}: model_type {mt!r} is not SigLIP's ('siglip', 'siglip2', "
                         "'siglip_vision_model', 'siglip2_vision_model')")
    patch = int(vis.get("patch_size", 16))
    if mt.startswith("siglip2"):
        npatch = int(vis.get("num_patches", 256))
        g = math.isqrt(npatch)
        if g * g != npatch:
            raise ValueError(f"{source}: Siglip2 num_patches = {npatch} is not a square grid; "
                             "only the native square grid of a NaFlex model is supported")
        image_size = g * patch
    else:
        image_size = int(vis.get("image_size", 224))
    eps = float(vis.get("layer_norm_eps", 1e-6))
    width = int(vis.get("hidden_size", 768))
    kw: dict[str, Any] = {
        "image_size": image_size, "patch_size": patch, "width": width,
        "layers": int(vis.get("num_hidden_layers", 12)), "heads": int(vis.get("num_attention_heads", 12)),
        "mlp_dim": int(vis.get("intermediate_size", 3072)),
        "act": _act(vis.get("hidden_act", "gelu_pytorch_tanh"), source), "ln_eps": eps, "name": name}
    if txt:
        teps = float(txt.get("layer_norm_eps", 1e-6))
        if teps != eps:
            raise ValueError(f"{source}: the text tower's layer_norm_eps {teps} differs from the "
                             f"image tower's {eps}; the core keeps one")
        tw = int(txt.get("hidden_size", 768))
        proj = int(txt.get("projection_size") or tw)
        if proj != width:
            raise ValueError(f"{source}: the text head maps to {proj} dims but the image "
                             f"embedding has {width}")
        kw.update(context_length=int(txt.get("max_position_embeddings", 64)),
                  vocab_size=int(txt.get("vocab_size", 32000)), text_width=tw,
                  text_layers=int(txt.get("num_hidden_layers", 12)),
                  text_heads=int(txt.get("num_attention_heads", 12)),
                  text_mlp_dim=int(txt.get("intermediate_size", 3072)),
                  text_act=_act(txt.get("hidden_act", "gelu_pytorch_tanh"), source))
    if preprocessor:
        pp = _hf_preprocess(preprocessor, image_size, source)
        kw.update({k: v for k, v in pp.items() if k in ("mean", "std", "interpolation")})
        size = preprocessor.get("size")
        if isinstance(size, Mapping) and "height" in size and \
                (size.get("height") != image_size or size.get("width") != image_size):
            raise ValueError(f"{source}: the processor resizes to {size} but the model takes "
                             f"{image_size} x {image_size}")
    return SiglipConfig(**kw)


#: timm's SigLIP towers: (width, layers, heads, mlp_dim) by the size in the model name
_TIMM_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096),
               "so400m": (1152, 27, 16, 4304), "so150m": (896, 18, 14, 2304),
               "so150m2": (832, 21, 13, 2176), "giantopt": (1536, 40, 16, 6144)}
_TIMM_NAME = re.compile(r"^vit_([a-z0-9]+)_patch(\d+)_siglip(_gap)?_(\d+)$")


def siglip_config_from_open_clip(config: Mapping[str, Any], source: str = "open_clip_config.json",
                                 name: str = "") -> SiglipConfig:
    """A :class:`SiglipConfig` from open_clip's ``open_clip_config.json`` of a timm SigLIP.

    The image tower is named by ``vision_cfg.timm_model_name`` (e.g.
    ``vit_base_patch16_siglip_224``) with ``timm_pool: "map"`` (the attention-pooling head);
    the text tower by ``text_cfg`` (``act_kwargs: {"approximate": "tanh"}`` selects the tanh
    GELU, its absence the exact one, as open_clip builds it).

    Parameters
    ----------
    config : mapping
        The parsed file (``{"model_cfg": ..., "preprocess_cfg": ...}``) or a bare model config.
    source, name : str
        For messages, and the model's label.

    Returns
    -------
    SiglipConfig

    Raises
    ------
    ValueError
        For a tower that is not a timm SigLIP with attention pooling.

    Examples
    --------
    >>> siglip_config_from_open_clip({"embed_dim": 768, "vision_cfg": {
    ...     "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map"}}).layers
    12
    """
    mc = config.get("model_cfg", config)
    pre = config.get("preprocess_cfg") or {}
    vis = mc.get("vision_cfg") or {}
    tname = str(vis.get("timm_model_name", ""))
    mt = _TIMM_NAME.match(tname)
    if not mt or mt.group(1) not in _TIMM_SIZES:
        raise ValueError(f"{source}: vision_cfg.timm_model_name {tname!r} is not a timm SigLIP "
                         f"tower (vit_<{'|'.join(_TIMM_SIZES)}>_patch<P>_siglip_<S>)")
    if mt.group(3) or vis.get("timm_pool", "map") != "map":
        raise ValueError(f"{source}: {tname} pools by averaging (timm_pool "
                         f"{vis.get('timm_pool')!r}); only the attention-pooling head ('map') "
                         "is supported")
    if vis.get("timm_proj", "none") not in ("none", None, ""):
        raise ValueError(f"{source}: timm_proj {vis.get('timm_proj')!r} adds a projection that "
                         "SigLIP checkpoints do not have")
    width, layers, heads, mlp = _TIMM_SIZES[mt.group(1)]
    image_size = int(vis.get("image_size", mt.group(4)))  # type: ignore[arg-type]
    if int(mc.get("embed_dim", width)) != width:
        raise ValueError(f"{source}: embed_dim {mc.get('embed_dim')} differs from the tower's "
                         f"width {width}")
    kw: dict[str, Any] = {"image_size": image_size, "patch_size": int(mt.group(2)),
                          "width": width, "layers": layers, "heads": heads, "mlp_dim": mlp,
                          "act": "gelu_tanh", "ln_eps": 1e-6, "name": name}
    txt = mc.get("text_cfg") or {}
    if txt:
        eps = float((txt.get("norm_kwargs") or {}).get("eps", 1e-5))
        if eps != 1e-6:
            raise ValueError(f"{source}: the text tower's LayerNorm eps {eps} differs from the "
                             "image tower's 1e-6; the core keeps one")
        if not txt.get("no_causal_mask") or txt.get("pool_type", "argmax") != "last":
            raise ValueError(f"{source}: a SigLIP text tower is bidirectional and pools the last "
                             "token (no_causal_mask: true, pool_type: 'last')")
        tw = int(txt.get("width", 512))
        approx = (txt.get("act_kwargs") or {}).get("approximate")
        kw.update(context_length=int(txt.get("context_length", 64)),
                  vocab_size=int(txt.get("vocab_size", 32000)), text_width=tw,
                  text_layers=int(txt.get("layers", 12)), text_heads=int(txt.get("heads", 8)),
                  text_mlp_dim=round(tw * float(txt.get("mlp_ratio", 4.0))),
                  text_act="gelu_tanh" if approx == "tanh" else "gelu")
    if pre.get("mean") is not None:
        kw["mean"] = tuple(pre["mean"])
    if pre.get("std") is not None:
        kw["std"] = tuple(pre["std"])
    if pre.get("interpolation") in ("bicubic", "bilinear"):
        kw["interpolation"] = pre["interpolation"]
    if pre.get("resize_mode", "squash") != "squash":
        raise ValueError(f"{source}: preprocess resize_mode {pre.get('resize_mode')!r}; SigLIP "
                         "resizes to a square ('squash')")
    return SiglipConfig(**kw)


# ----------------------------------------------------------------------------------------------
# tokenizer


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str, lower: bool = True) -> str:
    """SigLIP's text canonicalisation (big_vision's, open_clip's ``clean="canonicalize"``,
    transformers' ``SiglipTokenizer.canonicalize_text``): lower case, no ASCII punctuation,
    single spaces, no space at either end.

    Examples
    --------
    >>> canonicalize("A  Photo, of a CAT!")
    'a photo of a cat'
    """
    if lower:
        text = text.lower()
    return " ".join(text.translate(_NO_PUNCTUATION).split())


@dataclass(frozen=True)
class _SpieceText:
    """What transformers' ``SiglipTokenizer`` (SigLIP v1, ``spiece.model``) adds around
    SentencePiece: the special tokens matched in the raw text (string -> id), lower-casing,
    the end token, and the ``<unk>`` prefix it encodes every stretch of text after."""

    specials: Mapping[str, int]
    lower: bool
    eos_id: int
    unk: str
    unk_len: int           # pieces of SentencePiece's encoding of ``unk`` alone
    boundary_id: int       # the piece U+2581, or -1
    split: re.Pattern[str] | None


def _spiece_ids(backend: Any, rules: _SpieceText, text: str, max_len: int) -> list[int]:
    """transformers' ``SiglipTokenizer`` ids of one text (``truncation=True``), with
    ``backend`` the SentencePiece model (:func:`clipdecomp.engine.spiece.unigram_tokenizer`).

    As ``SiglipTokenizer.tokenize``: U+2581 becomes a space and one is put in front; the text
    is split at special tokens; every other stretch is canonicalised and SentencePiece
    encodes ``<unk>`` + it, of which the pieces of ``<unk>`` are dropped. A lone boundary
    piece before a special token is dropped; ``</s>`` is appended unless the ids end with it,
    after cutting to ``max_len - 1``.
    """
    s = "\u2581" + text.replace("\u2581", " ")
    parts = rules.split.split(s) if rules.split is not None else [s]
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(rules.specials[part])
            continue
        c = canonicalize(part, rules.lower)
        if c:
            ids += backend.encode(rules.unk + c).ids[rules.unk_len:]
        if i == 0 and len(parts) > 1 and ids == [rules.boundary_id]:
            ids = []
    ids = ids[: max(max_len - 1, 0)]
    return ids if ids and ids[-1] == rules.eos_id else [*ids, rules.eos_id]


class SiglipTokenizer:
    """SigLIP's tokenizer: ids padded (or cut, keeping the end token) to the context length.

    The text tower reads the LAST position, so every row is padded to exactly C tokens, as
    transformers' processor does with ``padding="max_length", max_length=64``. The vocabulary
    comes from ``tokenizer.json`` through the ``tokenizers`` library, or (SigLIP's repositories
    ship only ``spiece.model``) from the SentencePiece model read by
    :mod:`clipdecomp.engine.spiece`, with transformers' ``SiglipTokenizer`` text rules
    (lower case, no punctuation, ``</s>`` appended; the same ids).

    Parameters
    ----------
    backend : tokenizers.Tokenizer or a transformers tokenizer
    context_length : int
        C (64).
    pad_id : int
        The padding id.
    lowercase : bool
        Lower-case every text first (SigLIP 2 was trained on lower-cased text).
    canonical : bool
        Apply :func:`canonicalize` first (open_clip's SigLIP tokenizers do).

    Examples
    --------
    >>> tok = SiglipTokenizer.from_dir("siglip-base-patch16-224/")       # doctest: +SKIP
    >>> tok(["a photo of a cat"]).shape                                  # doctest: +SKIP
    (1, 64)
    """

    def __init__(self, backend: Any, context_length: int = 64, pad_id: int = 1,
                 lowercase: bool = False, canonical: bool = False):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.backend = backend
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.lowercase = bool(lowercase)
        self.canonical = bool(canonical)
        #: transformers' text rules around a SigLIP v1 ``spiece.model`` (:func:`_spiece_ids`)
        self._spiece: _SpieceText | None = None
        self._source: tuple[str, dict[str, Any], int, bool] | None = None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], context_length: int = 64,
                 canonical: bool = False) -> SiglipTokenizer:
        """The tokenizer of a model directory (``tokenizer.json``, else ``spiece.model``)."""
        d = os.fspath(directory)
        tc: dict[str, Any] = {}
        p = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as fh:
                tc = json.load(fh)
        pad = tc.get("pad_token")
        if isinstance(pad, Mapping):
            pad = pad.get("content")
        lower = bool(tc.get("do_lower_case", False))
        tj = os.path.join(d, "tokenizer.json")
        if os.path.isfile(tj):
            from tokenizers import Tokenizer as _Tok

            backend: Any = _Tok.from_file(tj)
            backend.no_padding()
            # cut to C with the special tokens kept, as transformers' truncation=True does
            backend.enable_truncation(max_length=int(context_length))
            pad_id = None
            for name in ([pad] if pad else []) + ["<pad>", "</s>"]:
                pad_id = backend.token_to_id(name)
                if pad_id is not None:
                    break
            if pad_id is None:
                raise ValueError(f"{tj}: no pad token ('{pad}', '<pad>' or '</s>') in the "
                                 "vocabulary")
            return cls(backend, context_length, pad_id, lower, canonical)
        sp = os.path.join(d, "spiece.model")
        if os.path.isfile(sp):
            return cls._from_spiece(sp, tc, context_length, canonical)
        raise FileNotFoundError(f"{d}: no tokenizer.json or spiece.model")

    @classmethod
    def _from_spiece(cls, path: str, tc: Mapping[str, Any], context_length: int,
                     canonical: bool) -> SiglipTokenizer:
        """transformers' ``SiglipTokenizer`` (SigLIP v1) from ``spiece.model`` and the
        ``tokenizer_config.json`` entries it reads, without sentencepiece."""
        from clipdecomp.engine.spiece import read_model, unigram_tokenizer

        model = read_model(path)
        try:
            backend = unigram_tokenizer(model)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        # the special tokens: tokenizer_config's added tokens, then eos, unk, pad and extras
        specials: dict[str, int] = {}
        for k, v in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(v, Mapping) and isinstance(v.get("content"), str) and \
                    str(k).isdigit() and int(k) < len(model.pieces):
                specials[v["content"]] = int(k)

        def token(key: str, default: str) -> str:
            v = tc.get(key) or default
            return str(v.get("content", default) if isinstance(v, Mapping) else v)

        eos, unk, pad = token("eos_token", "</s>"), token("unk_token", "<unk>"), \
            token("pad_token", "</s>")
        extra = [t for key in ("additional_special_tokens", "extra_special_tokens")
                 for t in (tc.get(key) or []) if isinstance(t, str)]
        for t in (eos, unk, pad, *extra):
            if t not in specials:
                i = model.piece_id(t)
                if i is None:
                    raise ValueError(f"{path}: special token {t!r} is neither a piece of the "
                                     "model nor in tokenizer_config.json's added tokens")
                specials[t] = i
        boundary = model.piece_id("\u2581")
        alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        rules = _SpieceText(specials, bool(tc.get("do_lower_case", True)), specials[eos], unk,
                            len(backend.encode(unk).ids), -1 if boundary is None else boundary,
                            re.compile(f"({alternatives})") if alternatives else None)
        tok = cls(backend, context_length, specials[pad], False, canonical)
        tok._spiece = rules
        tok._source = (path, dict(tc), int(context_length), bool(canonical))
        return tok

    def __reduce__(self) -> Any:
        # a spiece.model tokenizer holds Python parts tokenizers cannot pickle: rebuild it
        if self._spiece is not None:
            return (SiglipTokenizer._from_spiece, self._source)
        return super().__reduce__()

    def encode(self, text: str) -> list[int]:
        """The ids of one text, with the special tokens the tokenizer adds, cut to C (for a
        tokenizer built by :meth:`from_dir`), not padded."""
        if self.canonical:
            text = canonicalize(text)
        if self.lowercase:
            text = text.lower()
        if self._spiece is not None:
            return _spiece_ids(self.backend, self._spiece, text, self.context_length)
        if hasattr(self.backend, "encode_batch"):      # tokenizers.Tokenizer
            return list(self.backend.encode(text).ids)
        return list(self.backend(text, truncation=True,
                                 max_length=self.context_length)["input_ids"])

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """int32 ``[T, C]``: each text's ids, cut to C and padded with ``pad_id``.

        Examples
        --------
        >>> tok(["a dog", "a cat"])[:, -1]                                # doctest: +SKIP
        array([1, 1], dtype=int32)
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
            ids = self.encode(t)[: self.context_length]
            out[i, : len(ids)] = ids
        return out


# ----------------------------------------------------------------------------------------------
# loading


def _download(repo: str, revision: str | None, cache_dir: str | None,
              local_files_only: bool) -> str:
    """Fetch a hub repository's weights, configs and tokenizer files; their directory."""
    from clipdecomp.engine.hub import _import_hub

    hf_hub_download, _ = _import_hub()

    def fetch(f: str) -> str | None:
        try:
            return hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        except (OSError, ValueError):  # the Hub's errors are OSErrors
            return None

    for f in _FILES:
        if f not in _WEIGHTS + _CONFIGS:
            fetch(f)
    configs = [c for c in _CONFIGS if fetch(c)]
    weights = next((w for w in (fetch(f) for f in _WEIGHTS) if w), None)
    if not configs or weights is None:
        raise RuntimeError(f"Hugging Face Hub repository {repo!r}: could not get "
                           f"{' or '.join(_CONFIGS)} and {' or '.join(_WEIGHTS)} (not found, "
                           "private, offline without a cached copy, or not a SigLIP repository)")
    return os.path.dirname(weights)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_siglip(path_or_name: str | os.PathLike[str], *, revision: str | None = None,
                cache_dir: str | None = None, local_files_only: bool = False,
                threads: int | None = None) -> SigLIP:
    """Load a SigLIP / SigLIP 2 model: a directory, a ``.safetensors`` file, or a hub name.

    Two layouts: transformers' (``model.safetensors`` with ``config.json``, and
    ``preprocessor_config.json``, ``tokenizer.json`` or ``spiece.model``; ``SiglipModel`` and
    ``Siglip2Model``) and open_clip's timm-based one (``open_clip_model.safetensors`` with
    ``open_clip_config.json``). Hub names are repositories such as
    ``"google/siglip-base-patch16-224"`` (:data:`SIGLIP_PRETRAINED`) or
    ``"timm/ViT-B-16-SigLIP"``.

    Parameters
    ----------
    path_or_name : str or path
    revision, cache_dir, local_files_only
        Passed to ``huggingface_hub`` for hub names.
    threads : int, optional
        Threads of the C core (default: :func:`clipdecomp.engine.model.default_threads`).

    Returns
    -------
    SigLIP

    Raises
    ------
    ValueError
        For a checkpoint that is not SigLIP, or a variant the core does not run.
    FileNotFoundError
        For a path that does not exist, or a directory without weights or config.

    Examples
    --------
    >>> model = load_siglip("google/siglip-base-patch16-224")          # doctest: +SKIP
    >>> model.encode_text(["a cat"]).shape                            # doctest: +SKIP
    (1, 768)
    """
    p = os.fspath(path_or_name)
    name = ""
    if not os.path.exists(p):
        if p.count("/") == 1 and not p.startswith((".", "/")):
            name = p
            p = _download(p, revision, cache_dir, local_files_only)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    directory = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
    if os.path.isdir(p):
        found = [os.path.join(p, w) for w in _WEIGHTS if os.path.isfile(os.path.join(p, w))]
        if not found:
            raise FileNotFoundError(f"{directory}: no {' or '.join(_WEIGHTS)}")
        weights = found[0]
    else:
        weights = p
    name = name or os.path.basename(directory)
    hf_cfg = os.path.join(directory, "config.json")
    oc_cfg = os.path.join(directory, "open_clip_config.json")
    canonical = False
    hf_raw = _read_json(hf_cfg) if os.path.isfile(hf_cfg) else None
    # a timm repository's config.json describes the image tower alone: open_clip's wins there
    hf_is_siglip = isinstance(hf_raw, dict) and str(hf_raw.get("model_type", "")).startswith(
        "siglip")
    if hf_raw is not None and (hf_is_siglip or not os.path.isfile(oc_cfg)) and \
            os.path.basename(weights) != "open_clip_model.safetensors":
        pp = os.path.join(directory, "preprocessor_config.json")
        cfg = siglip_config_from_hf(hf_raw, _read_json(pp) if os.path.isfile(pp) else None,
                                    hf_cfg, name)
        layout = "hf"
    elif os.path.isfile(oc_cfg):
        raw = _read_json(oc_cfg)
        cfg = siglip_config_from_open_clip(raw, oc_cfg, name)
        tk = ((raw.get("model_cfg", raw).get("text_cfg") or {}).get("tokenizer_kwargs") or {})
        canonical = tk.get("clean") == "canonicalize"
        layout = "open_clip"
    else:
        raise FileNotFoundError(f"{directory}: no config.json or open_clip_config.json beside "
                                "the weights")
    core = _engine_core.open_model(weights, cfg, layout)
    tok = None
    if cfg.has_text:
        try:
            tok = SiglipTokenizer.from_dir(directory, cfg.context_length, canonical)
        except (FileNotFoundError, ImportError):
            tok = None
    return SigLIP(core, cfg, tok, threads=threads)


# ----------------------------------------------------------------------------------------------
# the model


class SigLIP:
    """A loaded SigLIP model: encoders, the sigmoid logits and the decomposition.

    Parameters
    ----------
    core : clipdecomp._core.Model
        Loaded with ``family="siglip"``.
    config : SiglipConfig
    tokenizer : SiglipTokenizer, optional
    threads : int, optional

    Examples
    --------
    >>> model = load_siglip("google/siglip-base-patch16-224")         # doctest: +SKIP
    >>> img = model.encode_image(["cat.jpg"]); txt = model.encode_text(["a cat", "a dog"])
    >>> model.logits(img, txt)                                        # doctest: +SKIP
    """

    def __init__(self, core: Any, config: SiglipConfig, tokenizer: SiglipTokenizer | None = None,
                 threads: int | None = None):
        self._core = core
        self.config = config
        self.tokenizer = tokenizer
        self.threads = int(threads) if threads else default_threads()

    @property
    def logit_scale(self) -> float | None:
        """``exp(logit_scale)`` as stored in the checkpoint (SigLIP's temperature), or None."""
        v = self._core.raw_logit_scale
        return None if v is None else float(np.exp(v))

    @property
    def logit_bias(self) -> float | None:
        """The checkpoint's ``logit_bias``, or None."""
        v = self._core.raw_logit_bias
        return None if v is None else float(v)

    def preprocess(self, images: Any) -> np.ndarray:
        """Images -> float32 pixels ``[B, 3, S, S]``: resized to S x S (no crop), normalised."""
        c = self.config
        return preprocess_items(as_image_list(images), c.image_size, c.mean, c.std, "squash",
                                c.interpolation)

    def _batches(self, images: Any, batch_size: int):
        c = self.config
        if _is_float_array(images):
            arr = np.asarray(images)
            if arr.ndim == 3:
                arr = arr[None]
            _check_pixel_shape(arr, c.image_size, "images")
            for s in range(0, arr.shape[0], batch_size):
                yield s, _check_pixels(arr[s:s + batch_size], c.image_size, "images", start=s)
            return
        items = as_image_list(images)
        if not items:
            raise ValueError("no images given (an empty list)")
        for s in range(0, len(items), batch_size):
            yield s, preprocess_items(items[s:s + batch_size], c.image_size, c.mean, c.std,
                                      "squash", c.interpolation, start=s, listed=True)

    def _images(self, images: Any) -> tuple[Any, int]:
        """The images as read once (a generator can be read only once) and how many."""
        if _is_float_array(images):
            arr = np.asarray(images)
            return images, (arr.shape[0] if arr.ndim == 4 else 1)
        items = as_image_list(images)
        return items, len(items)

    def _run(self, pixels: np.ndarray, out: dict[str, np.ndarray] | None = None,
             **opts: Any) -> dict[str, np.ndarray]:
        """One core call; the core writes into the arrays of ``out`` (slices of the caller's
        results) and allocates the others it returns."""
        return self._core.encode_image(np.ascontiguousarray(pixels, dtype=np.float32),
                                       threads=self.threads, out=out, **opts)

    def encode_image(self, images: Any, normalize: bool = False, batch_size: int = 8
                     ) -> np.ndarray:
        """Image embeddings (the pooling head's output), float32 ``[B, D]``.

        Examples
        --------
        >>> model.encode_image(["cat.jpg"]).shape                         # doctest: +SKIP
        (1, 768)
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images, n = self._images(images)
        out = np.empty((n, self.config.width), np.float32)
        for s, px in self._batches(images, batch_size):
            r = self._run(px, out={"embedding": out[s:s + px.shape[0]]})
            _check_finite(r["embedding"], s, "encode_image")
        return _normalize(out) if normalize else out

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """int32 ``[T, C]`` ids padded to the context length."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json / spiece.model "
                             "beside the weights): pass token ids to encode_text")
        return self.tokenizer(texts)

    def encode_text(self, texts_or_ids: Any, normalize: bool = False, batch_size: int = 256
                    ) -> np.ndarray:
        """Text embeddings, float32 ``[T, D]``, from strings or int ids ``[T, C]``.

        Examples
        --------
        >>> model.encode_text(["a cat", "a dog"]).shape                   # doctest: +SKIP
        (2, 768)
        """
        if not self.config.has_text:
            raise ValueError("this checkpoint has no text tower")
        if isinstance(texts_or_ids, str) or (isinstance(texts_or_ids, (list, tuple)) and
                                             texts_or_ids and isinstance(texts_or_ids[0], str)):
            ids = self.tokenize(texts_or_ids)
        else:
            ids = np.asarray(texts_or_ids)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.shape[1] != self.config.context_length or \
                    not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"token ids must be integers [T, {self.config.context_length}] "
                                 f"(padded to the context length), got {ids.dtype} "
                                 f"{list(ids.shape)}")
        out = np.empty((ids.shape[0], self.config.width), np.float32)
        for s in range(0, ids.shape[0], batch_size):
            self._core.encode_text(np.ascontiguousarray(ids[s:s + batch_size], dtype=np.int32),
                                   threads=self.threads, out=out[s:s + batch_size])
        return _normalize(out) if normalize else out

    def logits(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """SigLIP's logits ``exp(logit_scale) * cos + logit_bias``: float32 ``[B, T]``.

        ``1 / (1 + exp(-logits))`` is the probability that text t matches image b.

        Examples
        --------
        >>> model.logits(model.encode_image(imgs), model.encode_text(texts))  # doctest: +SKIP
        """
        if self.logit_scale is None or self.logit_bias is None:
            raise ValueError("the checkpoint has no logit_scale / logit_bias")
        a = _normalize(np.asarray(image_embeddings, np.float32))
        b = _normalize(np.asarray(text_embeddings, np.float32))
        return (self.logit_scale * (a @ b.T) + self.logit_bias).astype(np.float32)

    def decompose(self, images: Any, depth: str = "pool", spatial: bool = False,
                  batch_size: int = 8) -> SiglipDecomposition:
        """Split the image embeddings into the terms of the pooling head or of every layer.

        Parameters
        ----------
        images : paths, PIL images, uint8 arrays or float pixels ``[B, 3, S, S]``
        depth : ``"pool"`` or ``"deep"``
            ``"pool"``: the reference's terms (the pooling attention per head and token, the
            pooling MLP). ``"deep"``: the attention part split over every layer and head of the
            encoder, the pooling MLP kept as the last row of ``mlps``.
        spatial : bool
            Keep per-token terms ``tokens``: with ``depth="pool"`` those of the pooling
            attention per (token, pooling head), ``[B, 1, N, H, D]``; with ``depth="deep"``
            those of every encoder head at every token read by the pooling head,
            ``[B, L, N, H, D]`` (L * N * H * D floats per image), summing over N to ``heads``.
        batch_size : int
            Images per forward pass.

        Returns
        -------
        SiglipDecomposition

        Examples
        --------
        >>> dec = model.decompose(images, spatial=True)                  # doctest: +SKIP
        >>> dec.tokens.shape                                             # doctest: +SKIP
        (2, 1, 196, 12, 768)
        >>> model.decompose(images, depth="deep", spatial=True).tokens.shape  # doctest: +SKIP
        (2, 12, 196, 12, 768)
        """
        if depth not in ("pool", "deep"):
            raise ValueError(f"depth must be 'pool' or 'deep', got {depth!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        deep = depth == "deep"
        images, n = self._images(images)
        c = self.config
        L, H, N, W = c.layers, c.heads, c.n_tokens, c.width
        shapes = {"embedding": (W,), "ln_stats": (3,), "pool_heads": (H, W), "pool_mlp": (W,),
                  "pool_attn": (H, N)}
        if deep:
            shapes.update(heads=(L, H, W), mlps=(L + 1, W))
        if spatial:
            shapes["tokens" if deep else "pool_tokens"] = (L if deep else 1, N, H, W)
        out = {k: np.empty((n,) + v, np.float32) for k, v in shapes.items()}
        for s, px in self._batches(images, batch_size):
            e = s + px.shape[0]
            dst = {k: a[s:e] for k, a in out.items()}
            if "pool_tokens" in dst:
                dst["pool_tokens"] = dst["pool_tokens"][:, 0]
            r = self._run(px, heads=deep, mlps=deep, tokens=deep and spatial,
                          pool_tokens=spatial and not deep, out=dst)
            _check_finite(r["embedding"], s, "decompose")
        if n == 0:
            raise ValueError("no images given")
        emb, stats = out["embedding"], out["ln_stats"]
        pool_heads, pool_mlp, pool_attn = out["pool_heads"], out["pool_mlp"], out["pool_attn"]
        if deep:
            heads = out["heads"]       # the pooling MLP's term joins the mlps as their last row
            mlps = np.concatenate([out["mlps"], pool_mlp[:, None]], axis=1)
            tokens = out.get("tokens")
        else:
            heads = pool_heads[:, None]
            mlps = pool_mlp[:, None]
            tokens = out.get("pool_tokens")
        return SiglipDecomposition(model_config=self.config, depth=depth, embedding=emb,
                                   ln_stats=stats, heads=heads, mlps=mlps, tokens=tokens,
                                   pool_heads=pool_heads, pool_mlp=pool_mlp, pool_attn=pool_attn)

    def __repr__(self) -> str:
        c = self.config
        return (f"SigLIP({c.name or 'unnamed'}: {c.image_size}px, patch {c.patch_size}, width "
                f"{c.width}, {c.layers} layers, {c.heads} heads, text "
                f"{'none' if not c.has_text else f'{c.text_layers} layers'}; {self.threads} "
                "threads)")


# ----------------------------------------------------------------------------------------------
# the decomposition


@dataclass(frozen=True)
class _TermsGeometry:
    """The shapes of a SigLIP decomposition's arrays, as the spatial tools read them."""

    layers: int          # rows of heads: 1 (pool) or L (deep)
    heads: int
    n_tokens: int        # N = G*G
    embed_dim: int
    patch_size: int
    image_size: int
    grid: int
    name: str
    class_token: bool = False


class SiglipDecomposition(Decomposition):
    """The terms of a batch of SigLIP image embeddings (see the module notes).

    Attributes
    ----------
    embedding : float32 ``[B, D]``
        The pooled embedding, not normalised.
    norm : float32 ``[B]``
        ``||embedding||``.
    heads : float32 ``[B, 1, H, D]`` (pool) or ``[B, L, H, D]`` (deep)
    mlps : float32 ``[B, 1, D]`` (pool: the pooling MLP) or ``[B, L+2, D]`` (deep: row 0 the
        embeddings, rows 1..L the layers' MLPs, row L+1 the pooling MLP)
    tokens : float32 ``[B, 1, N, H, D]`` (pool) or ``[B, L, N, H, D]`` (deep)
        With ``spatial=True``: the pooling attention per (token, pooling head), or each
        encoder head's deep term per token (``tokens.sum(2) == heads``).
    pool_heads : float32 ``[B, H, D]``
        The pooling attention per head (the out-projection bias shared equally), both depths.
    pool_mlp : float32 ``[B, D]``
        The pooling MLP's term.
    pool_attn : float32 ``[B, H, N]``
        The probe's softmax attention over the tokens.
    depth : str
        ``"pool"`` or ``"deep"``.
    config : the geometry of the arrays (``layers`` = rows of ``heads``), for the spatial tools
    model_config : SiglipConfig

    Examples
    --------
    >>> dec = model.decompose(images, depth="deep")                     # doctest: +SKIP
    >>> np.allclose(dec.summed(), dec.embedding / dec.norm[:, None], atol=1e-5)  # doctest: +SKIP
    True
    """

    def __init__(self, *, model_config: SiglipConfig, depth: str, embedding: np.ndarray,
                 ln_stats: np.ndarray, heads: np.ndarray, mlps: np.ndarray,
                 tokens: np.ndarray | None, pool_heads: np.ndarray, pool_mlp: np.ndarray,
                 pool_attn: np.ndarray):
        c = model_config
        geo = _TermsGeometry(layers=int(heads.shape[1]), heads=c.heads, n_tokens=c.n_tokens,
                             embed_dim=c.width, patch_size=c.patch_size,
                             image_size=c.image_size, grid=c.grid, name=c.name)
        super().__init__(config=geo,  # type: ignore[arg-type]  # the geometry of the terms
                         embedding=embedding, ln_stats=ln_stats, heads=heads,
                         mlps=mlps, cls_to_cls=None, tokens=tokens)  # type: ignore[arg-type]
        self.model_config = model_config
        self.depth = depth
        self.pool_heads = pool_heads
        self.pool_mlp = pool_mlp
        self.pool_attn = pool_attn

    @property
    def tokens(self) -> np.ndarray:
        """float32 ``[B, 1, N, H, D]`` (pool: the pooling attention per (token, head)) or
        ``[B, L, N, H, D]`` (deep: each encoder head's term per token)."""
        if self._tokens is None:
            raise ValueError("per-token terms were not kept: call model.decompose(images, "
                             f"depth={self.depth!r}, spatial=True) "
                             f"({format_bytes(self._token_bytes())} here)")
        return self._tokens

    def project_tokens(self, directions: np.ndarray, batch_size: int | None = None,
                       progress: bool = False) -> np.ndarray:
        """``tokens @ directions.T``: float32 ``[B, L', N, H, T]`` (needs ``spatial=True``)."""
        d = np.asarray(directions, np.float32)
        if d.ndim == 1:
            d = d[None]
        if d.ndim != 2 or d.shape[1] != self.config.embed_dim:
            raise ValueError(f"directions must be [T, {self.config.embed_dim}]; got shape "
                             f"{np.shape(directions)}")
        return np.einsum("blnhd,td->blnht", self.tokens, d, optimize=True).astype(np.float32)

    @property
    def attention_part(self) -> np.ndarray:
        """float32 ``[B, D]``: the pooling attention's output / ``||embedding||``."""
        return self.pool_heads.sum(1)

    def __getitem__(self, index: Any) -> SiglipDecomposition:
        """The decomposition of a subset of the images."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 if int(index) != -1 else None)

        def take(a: Any) -> Any:
            return None if a is None else a[index]

        return SiglipDecomposition(
            model_config=self.model_config, depth=self.depth, embedding=take(self.embedding),
            ln_stats=take(self.ln_stats), heads=take(self.heads), mlps=take(self.mlps),
            tokens=take(self._tokens), pool_heads=take(self.pool_heads),
            pool_mlp=take(self.pool_mlp), pool_attn=take(self.pool_attn))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that were computed, by name."""
        out = {"embedding": self.embedding, "ln_stats": self.ln_stats, "heads": self.heads,
               "mlps": self.mlps, "pool_heads": self.pool_heads, "pool_mlp": self.pool_mlp,
               "pool_attn": self.pool_attn}
        if self._tokens is not None:
            out["tokens"] = self._tokens
        return out

    def __repr__(self) -> str:
        c = self.model_config
        lines = [(f"SiglipDecomposition ({self.depth}) of {len(self)} image"
                  f"{'s' if len(self) != 1 else ''} by {c.name or 'SigLIP'} (L={c.layers}, "
                  f"H={c.heads}, N={c.n_tokens}, D={c.width})")]
        for k, v in self.arrays().items():
            lines.append(f"  {k:<11}{list(v.shape)!s:<24}{format_bytes(v.nbytes)}")
        return "\n".join(lines)
