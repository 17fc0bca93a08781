"""Model configuration: what the C core needs to know about a CLIP checkpoint.

Three sources are read:

* open_clip's ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg": {...}}``) and
  the bare model configs of open_clip's ``model_configs/*.json`` (``{"embed_dim", "vision_cfg",
  "text_cfg", "quick_gelu"?}``);
* Hugging Face transformers' ``config.json`` (``CLIPConfig``, or a standalone
  ``CLIPVisionConfig``), with ``preprocessor_config.json`` for the image statistics;
* as a last resort, the tensor shapes of the weights file itself.

The activation is the one thing the weights cannot tell (see ``notes/decomposition.md``):
QuickGELU for OpenAI's checkpoints, exact GELU for most others. The rule is

1. ``act=`` given by the user always wins;
2. else an explicit setting in the config: open_clip's ``"quick_gelu": true``, or HF's
   ``hidden_act`` (HF's own default, ``"quick_gelu"``, applies when the key is absent);
3. else an open_clip config without the key means ``"gelu"``, open_clip's default for it;
4. else (no config, or one that says nothing about it) a ``ValueError`` asks for ``act=``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ModelConfig",
    "config_from_hf",
    "config_from_open_clip",
    "config_from_tensors",
    "default_heads",
    "detect_layout",
    "has_text_tower",
    "is_hf_clip_config",
    "normalise_act",
    "read_config_file",
    "resolve_act",
]

#: OpenAI's image statistics, the default of open_clip and transformers alike
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: the activations the C core implements; "gelu" is the exact (erf) form
ACTIVATIONS = ("gelu", "quick_gelu")
_ACT_ALIASES = {"gelu": "gelu", "quick_gelu": "quick_gelu", "quickgelu": "quick_gelu",
                "quick-gelu": "quick_gelu"}
_RESIZE_MODES = ("shortest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class ModelConfig:
    """Geometry, activation and preprocessing of one CLIP model.

    Shapes used throughout: S = ``image_size``, P = ``patch_size``, G = S / P = ``grid``,
    N = 1 + G*G = ``n_tokens``, W = ``width``, L = ``layers``, H = ``heads``,
    d = W / H = ``head_dim``, D = ``embed_dim``, C = ``context_length``.

    Attributes
    ----------
    image_size, patch_size : int
        S and P, e.g. 224 and 16.
    width, layers, heads, mlp_dim : int
        W, L, H and the MLP hidden width of the image tower (e.g. 768, 12, 12, 3072).
    embed_dim : int
        D, the joint embedding width (e.g. 512).
    act : str
        ``"gelu"`` (exact erf form) or ``"quick_gelu"`` (x * sigmoid(1.702 x)).
    ln_eps : float
        LayerNorm epsilon (1e-5 for every released CLIP).
    context_length, vocab_size : int
        Text context C (77) and vocabulary size (49408).
    text_width, text_layers, text_heads, text_mlp_dim : int
        The text tower; ``text_layers == 0`` means the checkpoint has none.
    text_act : str
        Activation of the text tower (the same as ``act`` in every released CLIP).
    mean, std : tuple of float
        Per-channel normalisation of the preprocessing.
    resize_mode : str
        ``"shortest"`` (resize the shorter side to S, centre crop) or ``"squash"`` (resize to
        S x S ignoring the aspect ratio, as Apple's DFN models were trained).
    interpolation : str
        ``"bicubic"`` or ``"bilinear"``.
    name : str
        A label for printing, e.g. ``"ViT-B-16/openai"``.

    Examples
    --------
    >>> cfg = ModelConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12,
    ...                   mlp_dim=3072, embed_dim=512, act="quick_gelu")
    >>> cfg.grid, cfg.n_tokens, cfg.head_dim
    (14, 197, 64)
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    embed_dim: int
    act: str
    ln_eps: float = 1e-5
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 0
    text_layers: int = 0
    text_heads: int = 0
    text_mlp_dim: int = 0
    text_act: str = ""
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    name: str = ""

    def __post_init__(self) -> None:
        act = normalise_act(self.act, "act")
        object.__setattr__(self, "act", act)
        object.__setattr__(self, "text_act",
                           normalise_act(self.text_act, "text_act") if self.text_act else act)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        # the types are translated here; the rules of a runnable geometry (ranges,
        # divisibility, size limits) have one authority, the C core's cd_config_check
        for f in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "embed_dim",
                  "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
                  "text_mlp_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                # ValueError, as every bad config (a float read from a JSON file, ...)
                raise ValueError(f"ModelConfig.{f} must be an int, got {v!r}")  # noqa: TRY004
        if isinstance(self.ln_eps, bool) or not isinstance(self.ln_eps, (int, float)):
            raise ValueError(  # noqa: TRY004
                f"ModelConfig.ln_eps must be a number, got {self.ln_eps!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels (std > 0), got {self.mean}, "
                             f"{self.std}")
        from clipdecomp.engine.core import check_config

        check_config(self.to_core_dict())

    @property
    def grid(self) -> int:
        """G = image_size / patch_size patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """N = 1 + G*G tokens (class token first)."""
        return 1 + self.grid * self.grid

    @property
    def head_dim(self) -> int:
        """d = width / heads."""
        return self.width // self.heads

    @property
    def has_text(self) -> bool:
        """Whether the checkpoint has a text tower."""
        return self.text_layers > 0

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, e.g. ``cfg.replace(act="gelu")``."""
        return dataclasses.replace(self, **changes)

    def to_core_dict(self) -> dict[str, Any]:
        """The dict that ``clipdecomp._core.Model`` takes.

        Examples
        --------
        >>> ModelConfig(224, 32, 768, 12, 12, 3072, 512, "gelu").to_core_dict()["act"]
        'gelu'
        """
        return {
            "image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
            "layers": self.layers, "heads": self.heads, "mlp_dim": self.mlp_dim,
            "embed_dim": self.embed_dim, "act": self.act, "ln_eps": float(self.ln_eps),
            "context_length": self.context_length, "vocab_size": self.vocab_size,
            "text_width": self.text_width, "text_layers": self.text_layers,
            "text_heads": self.text_heads, "text_mlp_dim": self.text_mlp_dim,
            "text_act": self.text_act,
        }


# ----------------------------------------------------------------------------------------------
# helpers


def normalise_act(act: Any, what: str = "act") -> str:
    """``"gelu"`` or ``"quick_gelu"`` from a user's spelling; anything else is a ValueError.

    Examples
    --------
    >>> normalise_act("QuickGELU".replace("GELU", "_gelu").lower())
    'quick_gelu'
    """
    key = str(act).strip().lower() if isinstance(act, str) else None
    if key not in _ACT_ALIASES:
        raise ValueError(f"{what}={act!r} is not supported: use act='quick_gelu' "
                         "(OpenAI's checkpoints, MetaCLIP, most DFN) or act='gelu' (exact erf "
                         "GELU: most LAION / DataComp checkpoints)")
    return _ACT_ALIASES[key]


#: the most threads a call may ask for: more exhausts the OpenMP runtime (it exits the
#: interpreter or crashes), and is never faster than one thread per core
MAX_THREADS = max(1024, 4 * (os.cpu_count() or 1))


def check_size(value: Any, name: str, default: int | None = None,
               maximum: int | None = None) -> int:
    """Validate a size argument of the public API (batch sizes, counts, threads, top-k).

    Every such argument goes through this one check: a positive ``int`` (NumPy integers too;
    not a bool, float or string), at most ``maximum`` when given.

    Parameters
    ----------
    value : int or None
        The argument; None gives ``default`` (when there is one).
    name : str
        The argument's name, for the message.
    default : int, optional
        The value of None; without one, None is refused.
    maximum : int, optional
        The largest value allowed.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        Naming the argument and the value given.

    Examples
    --------
    >>> check_size(8, "batch_size")
    8
    >>> check_size(None, "batch_size", default=256)
    256
    >>> check_size(0, "batch_size")
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive int, got 0
    """
    if value is None and default is not None:
        return int(default)
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is too large: at most {maximum} is allowed")
    return int(value)


def _square(v: Any, what: str, source: str) -> int:
    """An int, or a [h, w] pair that must be square."""
    if isinstance(v, (list, tuple)):
        if len(v) == 2 and v[0] == v[1]:
            v = v[0]
        else:
            raise ValueError(f"{source}: {what}={list(v)} is not square; only square images "
                             "and patches are supported")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{source}: {what}={v!r} is not a positive integer")
    return v


def _triple(v: Any, what: str, source: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        v = [v, v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise ValueError(f"{source}: {what}={v!r} is not three per-channel numbers")
    return (float(v[0]), float(v[1]), float(v[2]))


def default_heads(width: int) -> int:
    """The head count open_clip uses for a tower of this width, when no config says.

    Head width 64 (``width // 64``), except the ViT-H/14 (1280: 16 heads of 80),
    ViT-g/14 (1408: 16 of 88) and ViT-bigG/14 (1664: 16 of 104) image towers.

    Examples
    --------
    >>> default_heads(768), default_heads(1280)
    (12, 16)
    """
    if width in (1280, 1408, 1664):
        return 16
    return max(1, width // 64)


# ----------------------------------------------------------------------------------------------
# open_clip


def config_from_open_clip(
    cfg: Mapping[str, Any], name: str = "", source: str = "open_clip config"
) -> tuple[ModelConfig, bool]:
    """Parse an open_clip ``open_clip_config.json`` or a bare ``model_configs/*.json`` dict.

    Parameters
    ----------
    cfg : dict
        Either ``{"model_cfg": {...}, "preprocess_cfg": {...}}`` or the bare model dict
        ``{"embed_dim": 512, "vision_cfg": {...}, "text_cfg": {...}, "quick_gelu": true}``.
    name : str
        Label stored in ``ModelConfig.name``.
    source : str
        What to call the config in error messages (usually its path).

    Returns
    -------
    config : ModelConfig
        The parsed config; its activation follows the rule of this module (without ``quick_gelu``
        the key, open_clip builds exact GELU).
    act_explicit : bool
        Whether the config named the activation (``quick_gelu`` present).

    Raises
    ------
    ValueError
        For towers the C core does not implement (ResNet, timm or HF towers, layer scale,
        attentional pooling), naming the feature.

    Examples
    --------
    >>> cfg, explicit = config_from_open_clip({"embed_dim": 512, "quick_gelu": True,
    ...     "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    ...     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
    ...                  "layers": 12}})
    >>> cfg.act, cfg.heads, cfg.mlp_dim, explicit
    ('quick_gelu', 12, 3072, True)
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{source}: not a JSON object")
    model_cfg = cfg.get("model_cfg", cfg)
    pre = cfg.get("preprocess_cfg") or {}
    if not isinstance(model_cfg, Mapping) or "vision_cfg" not in model_cfg:
        raise ValueError(f"{source}: no 'vision_cfg' found; not an open_clip model config")
    v = model_cfg.get("vision_cfg") or {}
    t = model_cfg.get("text_cfg") or {}

    if v.get("timm_model_name"):
        raise ValueError(f"{source}: the image tower is the timm model "
                         f"{v['timm_model_name']!r}; clipdecomp supports the CLIP ViT tower only")
    resnet = isinstance(v.get("layers"), (list, tuple))
    if resnet:
        raise ValueError(f"{source}: a ResNet image tower (layers={v['layers']}); clipdecomp "
                         "supports ViT towers only")
    for key, bad, what in (("attentional_pool", True, "attentional pooling"),
                           ("no_ln_pre", True, "no ln_pre"),
                           ("input_patchnorm", True, "input patch norm")):
        if v.get(key) == bad:
            raise ValueError(f"{source}: vision_cfg.{key}={bad} ({what}) is not supported")
    if v.get("ls_init_value") is not None:
        raise ValueError(f"{source}: layer scale (vision_cfg.ls_init_value) is not supported")
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", None):
        raise ValueError(f"{source}: vision_cfg.pool_type={pool!r}; only class-token pooling "
                         "('tok') has the decomposition of the paper")

    width = int(v.get("width", 768))
    head_width = int(v.get("head_width", 64))
    if head_width <= 0 or width % head_width:
        raise ValueError(f"{source}: width {width} is not a multiple of head_width {head_width}")
    mlp_ratio = float(v.get("mlp_ratio", 4.0))
    eps = 1e-5
    norm_kwargs = v.get("norm_kwargs") or {}
    if isinstance(norm_kwargs, Mapping) and "eps" in norm_kwargs:
        eps = float(norm_kwargs["eps"])

    if "quick_gelu" in model_cfg and model_cfg["quick_gelu"] is not None:
        act = "quick_gelu" if model_cfg["quick_gelu"] else "gelu"
        explicit = True
    else:
        act, explicit = "gelu", False

    text = _open_clip_text(t, source)

    mean = pre.get("mean", v.get("image_mean", OPENAI_MEAN))
    std = pre.get("std", v.get("image_std", OPENAI_STD))
    config = ModelConfig(
        image_size=_square(v.get("image_size", 224), "vision_cfg.image_size", source),
        patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size", source),
        width=width,
        layers=int(v.get("layers", 12)),
        heads=width // head_width,
        mlp_dim=int(width * mlp_ratio),
        embed_dim=int(model_cfg.get("embed_dim", 512)),
        act=act,
        ln_eps=eps,
        mean=_triple(mean, "mean", source),
        std=_triple(std, "std", source),
        resize_mode=str(pre.get("resize_mode", "shortest")),
        interpolation=str(pre.get("interpolation", "bicubic")),
        name=name,
        **text,
    )
    return config, explicit


def _open_clip_text(t: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Text-tower fields from an open_clip text_cfg; an unsupported tower becomes 'none'."""
    context = int(t.get("context_length", 77))
    vocab = int(t.get("vocab_size", 49408))
    reason = None
    if t.get("hf_model_name"):
        reason = f"a Hugging Face text model ({t['hf_model_name']})"
    elif t.get("ls_init_value") is not None:
        reason = "layer scale"
    elif t.get("pool_type", "argmax") not in ("argmax", None):
        reason = f"pool_type={t.get('pool_type')!r}"
    elif t.get("embed_cls") or t.get("no_causal_mask"):
        reason = "a class token / no causal mask"
    if reason is not None:
        warnings.warn(f"{source}: the text tower uses {reason}, which clipdecomp does not "
                      "implement; the model is loaded without it (encode_text will fail)",
                      stacklevel=3)
        return {"context_length": context, "vocab_size": vocab}
    width = int(t.get("width", 512))
    return {
        "context_length": context,
        "vocab_size": vocab,
        "text_width": width,
        "text_layers": int(t.get("layers", 12)),
        "text_heads": int(t.get("heads", 8)),
        "text_mlp_dim": int(width * float(t.get("mlp_ratio", 4.0))),
    }


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers

_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                     "num_hidden_layers": 12, "num_attention_heads": 8,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def is_hf_clip_config(cfg: Any) -> bool:
    """Whether a ``config.json`` dict is a transformers CLIP config (not, e.g., timm's)."""
    if not isinstance(cfg, Mapping):
        return False
    mt = cfg.get("model_type")
    return mt in ("clip", "clip_vision_model", "clip_text_model") or (
        mt is None and isinstance(cfg.get("vision_config"), Mapping))


def config_from_hf(
    cfg: Mapping[str, Any],
    preprocessor: Mapping[str, Any] | None = None,
    name: str = "",
    source: str = "config.json",
) -> ModelConfig:
    """Parse a transformers ``CLIPConfig`` / ``CLIPVisionConfig`` dict (``config.json``).

    Transformers' defaults fill absent keys, as ``CLIPConfig.from_pretrained`` would fill them:
    ``hidden_act="quick_gelu"``, ``layer_norm_eps=1e-5``, ``projection_dim=512``, ...

    Parameters
    ----------
    cfg : dict
        The ``config.json`` contents.
    preprocessor : dict, optional
        ``preprocessor_config.json``: ``image_mean``, ``image_std``, ``resample``, ``size``,
        ``do_center_crop``.
    name, source : str
        Label of the config, and what to call it in error messages.

    Returns
    -------
    ModelConfig

    Raises
    ------
    ValueError
        When the config is not a CLIP config, has no image tower, or an unsupported activation.

    Examples
    --------
    >>> c = config_from_hf({"model_type": "clip", "projection_dim": 512,
    ...                     "vision_config": {"patch_size": 16}, "text_config": {}})
    >>> c.act, c.patch_size, c.width, c.text_width
    ('quick_gelu', 16, 768, 512)
    """
    if not is_hf_clip_config(cfg):
        raise ValueError(f"{source}: model_type={cfg.get('model_type')!r} is not a CLIP config "
                         "(expected 'clip' or 'clip_vision_model')")
    mt = cfg.get("model_type")
    if mt == "clip_text_model":
        raise ValueError(f"{source}: a text-only CLIP config; clipdecomp needs the image tower")
    if mt == "clip_vision_model":
        vis, txt = dict(cfg), None
    else:
        vis = dict(cfg.get("vision_config") or {})
        vis.update(cfg.get("vision_config_dict") or {})   # very old configs
        txt = dict(cfg.get("text_config") or {})
        txt.update(cfg.get("text_config_dict") or {})
    vis = {**_HF_VISION_DEFAULTS, **{k: x for k, x in vis.items() if x is not None}}
    embed_dim = int(cfg.get("projection_dim") or vis.get("projection_dim") or 512)
    text: dict[str, Any] = {}
    if txt is not None:
        txt = {**_HF_TEXT_DEFAULTS, **{k: x for k, x in txt.items() if x is not None}}
        text = {
            "context_length": int(txt["max_position_embeddings"]),
            "vocab_size": int(txt["vocab_size"]),
            "text_width": int(txt["hidden_size"]),
            "text_layers": int(txt["num_hidden_layers"]),
            "text_heads": int(txt["num_attention_heads"]),
            "text_mlp_dim": int(txt["intermediate_size"]),
            "text_act": normalise_act(txt["hidden_act"], f"{source}: text_config.hidden_act"),
        }
        if float(txt["layer_norm_eps"]) != float(vis["layer_norm_eps"]):
            warnings.warn(f"{source}: text and vision towers have different layer_norm_eps; "
                          f"using the vision tower's {vis['layer_norm_eps']} for both",
                          stacklevel=2)
    image_size = _square(vis["image_size"], "vision_config.image_size", source)
    pre = _hf_preprocess(preprocessor or {}, image_size, source)
    return ModelConfig(
        image_size=image_size,
        patch_size=_square(vis["patch_size"], "vision_config.patch_size", source),
        width=int(vis["hidden_size"]),
        layers=int(vis["num_hidden_layers"]),
        heads=int(vis["num_attention_heads"]),
        mlp_dim=int(vis["intermediate_size"]),
        embed_dim=embed_dim,
        act=normalise_act(vis["hidden_act"], f"{source}: vision_config.hidden_act"),
        ln_eps=float(vis["layer_norm_eps"]),
        name=name,
        **pre,
        **text,
    )


def _hf_preprocess(p: Mapping[str, Any], image_size: int, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "image_mean" in p:
        out["mean"] = _triple(p["image_mean"], "image_mean", source)
    if "image_std" in p:
        out["std"] = _triple(p["image_std"], "image_std", source)
    if p.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[p["resample"]]
    size = p.get("size")
    if p.get("do_center_crop", True) is False and isinstance(size, Mapping) and \
            size.get("height") == size.get("width") == image_size:
        out["resize_mode"] = "squash"
    return out


# ----------------------------------------------------------------------------------------------
# from tensor shapes (no config at all)

_BLOCK_RE = {
    "open_clip": (re.compile(r"^visual\.transformer\.resblocks\.(\d+)\."),
                  re.compile(r"^transformer\.resblocks\.(\d+)\.")),
    "hf": (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."),
           re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")),
}


def detect_layout(keys: Sequence[str]) -> str | None:
    """``"open_clip"`` or ``"hf"`` from a checkpoint's tensor names, None when neither.

    Examples
    --------
    >>> detect_layout(["visual.conv1.weight", "visual.proj"])
    'open_clip'
    >>> detect_layout(["vision_model.embeddings.patch_embedding.weight"])
    'hf'
    """
    keys = list(keys)
    if any(k.startswith("visual.") for k in keys):
        return "open_clip"
    if any(k.startswith("vision_model.") for k in keys):
        return "hf"
    return None


def has_text_tower(keys: Sequence[str], layout: str) -> bool:
    """Whether the checkpoint holds a text tower (token embedding and text projection)."""
    names = set(keys)
    if layout == "open_clip":
        return "token_embedding.weight" in names and "text_projection" in names
    return ("text_model.embeddings.token_embedding.weight" in names
            and "text_projection.weight" in names)


def _count_blocks(keys: Sequence[str], pattern: re.Pattern[str]) -> int:
    idx = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
    return (max(idx) + 1) if idx else 0


def config_from_tensors(shapes: Mapping[str, tuple[int, ...]], act: str,
                        name: str = "", source: str = "checkpoint") -> ModelConfig:
    """Infer the geometry from tensor shapes, for a weights file that has no config beside it.

    Everything but the head count is in the shapes. Heads follow open_clip's convention
    (:func:`default_heads`), which holds for every released CLIP ViT; a warning says so.

    Parameters
    ----------
    shapes : dict
        Tensor name -> shape, e.g. from :func:`clipdecomp.engine.safetensors_io.read_header`.
    act : str
        The activation: it cannot be read from weights, so it must be given.
    name, source : str
        Label and error-message name.

    Examples
    --------
    >>> shapes = {"visual.conv1.weight": (768, 3, 32, 32), "visual.positional_embedding": (50, 768),
    ...           "visual.proj": (768, 512), "visual.transformer.resblocks.0.mlp.c_fc.weight":
    ...           (3072, 768), "visual.transformer.resblocks.11.ln_1.weight": (768,)}
    >>> config_from_tensors(shapes, act="quick_gelu").image_size   # doctest: +SKIP
    224
    """
    keys = list(shapes)
    layout = detect_layout(keys)
    if layout is None:
        raise ValueError(f"{source}: no CLIP image tower found (no 'visual.*' nor "
                         "'vision_model.*' tensors)")

    def need(key: str, ndim: int) -> tuple[int, ...]:
        s = shapes.get(key)
        if s is None:
            raise ValueError(f"{source}: missing tensor {key!r} (needed to infer the geometry "
                             "without a config file)")
        if len(s) != ndim:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(s)}, expected {ndim} "
                             "dimensions")
        return tuple(s)

    vis_re, txt_re = _BLOCK_RE[layout]
    if layout == "open_clip":
        w, _, p, _ = need("visual.conv1.weight", 4)
        n, _ = need("visual.positional_embedding", 2)
        f, _ = need("visual.transformer.resblocks.0.mlp.c_fc.weight", 2)
        _, d = need("visual.proj", 2)
        text_keys = ("token_embedding.weight", "positional_embedding",
                     "transformer.resblocks.0.mlp.c_fc.weight")
    else:
        w, _, p, _ = need("vision_model.embeddings.patch_embedding.weight", 4)
        n, _ = need("vision_model.embeddings.position_embedding.weight", 2)
        f, _ = need("vision_model.encoder.layers.0.mlp.fc1.weight", 2)
        d, _ = need("visual_projection.weight", 2)
        text_keys = ("text_model.embeddings.token_embedding.weight",
                     "text_model.embeddings.position_embedding.weight",
                     "text_model.encoder.layers.0.mlp.fc1.weight")
    g = round(math.sqrt(n - 1))
    if g * g != n - 1:
        raise ValueError(f"{source}: {n} positions is not 1 + a square grid")
    heads = default_heads(w)
    text: dict[str, Any] = {}
    if has_text_tower(keys, layout) and all(k in shapes for k in text_keys):
        vocab, tw = need(text_keys[0], 2)
        ctx, _ = need(text_keys[1], 2)
        tf, _ = need(text_keys[2], 2)
        text = {"context_length": ctx, "vocab_size": vocab, "text_width": tw,
                "text_layers": _count_blocks(keys, txt_re), "text_heads": max(1, tw // 64),
                "text_mlp_dim": tf}
    warnings.warn(f"{source}: no config file found; geometry read from the tensor shapes, with "
                  f"{heads} image heads (head width {w // heads}) assumed by open_clip's "
                  "convention. Pass config= to be explicit.", stacklevel=3)
    return ModelConfig(image_size=g * p, patch_size=p, width=w, layers=_count_blocks(keys, vis_re),
                       heads=heads, mlp_dim=f, embed_dim=d, act=act, name=name, **text)


# ----------------------------------------------------------------------------------------------
# files


def _load_json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


def read_config_file(path: str | os.PathLike[str], name: str = "",
                     preprocessor: str | os.PathLike[str] | None = None,
                     ) -> tuple[ModelConfig, bool]:
    """Read one config file of any supported kind.

    Parameters
    ----------
    path : str
        ``open_clip_config.json``, a bare open_clip model config, or an HF ``config.json``.
    name : str
        Label for the config.
    preprocessor : str, optional
        An HF ``preprocessor_config.json`` to take the image statistics from.

    Returns
    -------
    config : ModelConfig
    act_explicit : bool
        Whether the file names the activation (always true for an HF config, whose default
        applies; false for an open_clip config without ``quick_gelu``).

    Examples
    --------
    >>> cfg, explicit = read_config_file("ViT-B-32-quickgelu.json")   # doctest: +SKIP
    """
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: not a JSON object")  # noqa: TRY004 - a bad file
    try:
        if "model_cfg" in data or "vision_cfg" in data:
            return config_from_open_clip(data, name=name, source=path)
        if is_hf_clip_config(data):
            pre = _load_json(os.fspath(preprocessor)) if preprocessor else None
            return config_from_hf(data, pre, name=name, source=path), True
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise ValueError(f"{path}: a config value has the wrong type or is out of range "
                         f"({type(e).__name__}: {e})") from None
    raise ValueError(f"{path}: neither an open_clip config (model_cfg / vision_cfg) nor a "
                     "transformers CLIP config (model_type 'clip')")


def resolve_act(act: str | None, config: ModelConfig | None, explicit: bool,
                source: str, table_act: str | None = None) -> tuple[str, str]:
    """Apply the activation rule of this module (see the module docstring).

    Parameters
    ----------
    act : str or None
        The user's ``act=``.
    config : ModelConfig or None
        The parsed config, None when there is none.
    explicit : bool
        Whether the config named the activation.
    source : str
        What was loaded, for the error message.
    table_act : str or None
        The activation of the pretrained table (:mod:`clipdecomp.engine.hub`) for this checkpoint;
        it ranks after ``act=`` and before the config, as in open_clip.

    Returns
    -------
    act : str
        ``"gelu"`` or ``"quick_gelu"``.
    why : str
        Where it came from, e.g. ``"act= argument"`` (shown by ``repr(model)``).

    Raises
    ------
    ValueError
        When nothing determines the activation: asks for ``act="quick_gelu"`` or ``"gelu"``.

    Examples
    --------
    >>> resolve_act(None, None, False, "model.safetensors", table_act="quick_gelu")
    ('quick_gelu', 'pretrained table')
    """
    if act is not None:
        return normalise_act(act), "act= argument"
    if table_act is not None:
        if config is not None and explicit and config.act != table_act:
            warnings.warn(f"{source}: the config says {config.act} but open_clip's pretrained "
                          f"table builds this checkpoint with {table_act}; using {table_act} "
                          "(pass act= to choose)", stacklevel=3)
        return normalise_act(table_act), "pretrained table"
    if config is not None:
        if explicit:
            return config.act, "config"
        return config.act, "open_clip default: the config has no quick_gelu"
    raise ValueError(
        f"{source}: no config file says which activation this model uses, and the weights "
        "cannot tell. Pass act='quick_gelu' for OpenAI's checkpoints (and MetaCLIP, DFN), or "
        "act='gelu' (exact GELU) for most LAION / DataComp ones. A wrong choice runs without "
        "error but gives wrong numbers.")
