"""``clipdecomp.load``: find the weights, the config and the tokenizer, and open the C core.

What ``load`` accepts:

* a ``.safetensors`` file; configs (``open_clip_config.json``, ``config.json``,
  ``preprocessor_config.json``) and tokenizer files are looked for beside it;
* a directory holding ``open_clip_model.safetensors``, ``open_clip_pytorch_model.safetensors``
  or ``model.safetensors`` with those files (a downloaded hub repository, a
  ``save_pretrained`` output);
* an open_clip name with ``pretrained=``: ``load("ViT-B-16", pretrained="openai")``, from the
  table of :mod:`clipdecomp.engine.hub`; ``pretrained`` may also be a local weights file, the
  geometry then coming from the architecture name;
* a Hugging Face Hub repository, ``"hf-hub:ORG/REPO"`` or ``"ORG/REPO"``.

Pickled weights (``.bin``, ``.pt``, ``.pth``) are refused: only safetensors are read.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from clipdecomp.engine import core as _core
from clipdecomp.engine import hub
from clipdecomp.engine.config import (
    ModelConfig,
    config_from_open_clip,
    config_from_tensors,
    detect_layout,
    has_text_tower,
    is_hf_clip_config,
    normalise_act,
    read_config_file,
    resolve_act,
)
from clipdecomp.engine.core import PRECISIONS
from clipdecomp.engine.hub import list_pretrained
from clipdecomp.engine.model import CLIP, check_load_memory
from clipdecomp.engine.safetensors_io import SafetensorsFile
from clipdecomp.engine.tokenizer import Tokenizer, default_tokenizer, find_tokenizer

__all__ = ["CONVERT_HINT", "LAYOUTS", "ModelSpec", "checkpoint_path", "list_pretrained", "load",
           "spec_of"]

#: layouts the C core reads
LAYOUTS = ("auto", "open_clip", "hf")
#: what ``load(..., towers=)`` accepts
TOWERS = ("both", "image")
#: weights file names looked for in a directory, in order
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "model.safetensors")
_PICKLE_EXT = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

CONVERT_HINT = """\
clipdecomp reads only .safetensors weights (pickle files can run code when loaded). Convert the
file once, where torch is installed:

    import torch
    from safetensors.torch import save_file
    sd = torch.load("open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v.contiguous() for k, v in sd.items()}
    save_file(sd, "open_clip_model.safetensors")

and keep the config files (open_clip_config.json / config.json) beside the new file."""


@dataclass
class _Source:
    """What a name or path resolved to."""

    weights: str                       # the .safetensors file
    name: str = ""                     # label for the config
    entry: hub.HubEntry | None = None  # pretrained-table entry, when known
    arch: dict[str, Any] | None = None  # open_clip model config from an architecture name
    notes: list[str] = field(default_factory=list)


def _pickle_error(path: str) -> ValueError:
    return ValueError(f"{path}: a pickled checkpoint. {CONVERT_HINT}")


def _weights_in_dir(directory: str) -> str:
    for name in WEIGHT_NAMES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    entries = sorted(os.listdir(directory))
    if any(e.endswith(".safetensors.index.json") for e in entries):
        raise ValueError(f"{directory}: the weights are sharded (*.safetensors.index.json); "
                         "clipdecomp reads one file: merge the shards with safetensors' "
                         "load_file / save_file")
    others = [e for e in entries if e.endswith(".safetensors")]
    if len(others) == 1:
        return os.path.join(directory, others[0])
    if len(others) > 1:
        raise ValueError(f"{directory}: several .safetensors files ({', '.join(others)}); pass "
                         "the one to load")
    pickles = [e for e in entries if e.endswith(_PICKLE_EXT)]
    if pickles:
        raise ValueError(f"{directory}: only pickled weights ({', '.join(pickles)}). "
                         f"{CONVERT_HINT}")
    raise FileNotFoundError(f"{directory}: no weights file (looked for "
                            f"{', '.join(WEIGHT_NAMES)})")


def _local(path: str, name: str = "") -> _Source:
    if os.path.isdir(path):
        return _Source(_weights_in_dir(path), name or os.path.basename(os.path.normpath(path)))
    if path.endswith(_PICKLE_EXT):
        raise _pickle_error(path)
    stem = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return _Source(path, name or stem)


_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve(path_or_name: Any, pretrained: str | None) -> _Source:
    if isinstance(path_or_name, os.PathLike):
        path_or_name = os.fspath(path_or_name)
    if not isinstance(path_or_name, str):
        raise TypeError(f"load() takes a path or a model name, not {type(path_or_name).__name__}")
    s = path_or_name.strip()
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        if os.path.exists(pretrained):      # open_clip style: load("ViT-B-32", pretrained=file)
            arch = hub.arch_config(s)
            if arch is None:
                raise ValueError(f"unknown architecture {s!r} for the weights {pretrained!r}; "
                                 f"known: {', '.join(hub.list_architectures())}. Or pass the "
                                 "file alone, with its config beside it")
            src = _local(pretrained, name=s)
            src.arch = arch
            return src
        entry = hub.get_entry(s, pretrained)
        arch = hub.arch_config(entry.model)
        weights = hub.download(entry.repo)
        return _Source(weights, f"{entry.model}/{entry.pretrained}", entry, arch)
    if s.startswith("hf-hub:"):
        repo = s[len("hf-hub:"):].strip("/")
        return _Source(hub.download(repo), repo, hub.entry_for_repo(repo))
    if os.path.exists(s):
        return _local(s)
    if hub.arch_config(s) is not None or any(m == s for (m, _) in hub.list_pretrained()):
        tags = sorted(t for (m, t) in hub.list_pretrained() if m == s)
        raise ValueError(f"{s!r} is an architecture: say which weights, e.g. "
                         f"load({s!r}, pretrained={tags[0] if tags else 'PATH'!r})"
                         + (f"; known: {', '.join(tags)}" if tags else ""))
    looks_local = (s.endswith((*_PICKLE_EXT, ".safetensors", ".json"))
                   or s.startswith((".", "/", "~")) or not _REPO_RE.match(s))
    if looks_local:
        raise FileNotFoundError(f"{s}: no such file or directory, and not a known model name "
                                "(see clipdecomp.list_pretrained()) nor a hub repository "
                                "('hf-hub:ORG/REPO')")
    try:
        weights = hub.download(s)
    except RuntimeError as e:
        raise RuntimeError(f"{s!r} is not a local path; as a Hugging Face Hub repository: "
                           f"{e}") from None
    return _Source(weights, s, hub.entry_for_repo(s))


def _config_files(weights: str, layout: str | None) -> list[str]:
    """Config files beside the weights, in the order to trust them."""
    d = os.path.dirname(os.path.abspath(weights))
    oc, hf = os.path.join(d, "open_clip_config.json"), os.path.join(d, "config.json")
    order = [hf, oc] if (layout == "hf" and not os.path.basename(weights).startswith("open_clip")) \
        else [oc, hf]
    out = []
    for p in order:
        if not os.path.isfile(p):
            continue
        if p == hf:
            try:
                with open(p, encoding="utf-8") as fh:
                    if not is_hf_clip_config(json.load(fh)):
                        continue   # e.g. timm's config.json for its image-only model
            except (OSError, ValueError):
                pass               # let read_config_file report it
        out.append(p)
    return out


def _read_config(config: Any, src: _Source, shapes: dict[str, tuple[int, ...]],
                 act: str | None, layout: str | None) -> tuple[ModelConfig | None, bool]:
    """The config from (in order) config=, files beside the weights, the architecture name,
    or the tensor shapes. Returns (config or None, whether it names the activation)."""
    if config is not None:
        if isinstance(config, ModelConfig):
            return config, True
        if isinstance(config, Mapping):
            if "model_cfg" in config or "vision_cfg" in config:
                return config_from_open_clip(config, name=src.name, source="config=")
            from clipdecomp.engine.config import config_from_hf

            return config_from_hf(config, name=src.name, source="config="), True
        return read_config_file(os.fspath(config), name=src.name)
    files = _config_files(src.weights, layout)
    if files:
        pre = os.path.join(os.path.dirname(os.path.abspath(src.weights)),
                           "preprocessor_config.json")
        return read_config_file(files[0], name=src.name,
                                preprocessor=pre if os.path.isfile(pre) else None)
    if src.arch is not None:
        return config_from_open_clip(src.arch, name=src.name, source=src.name)
    if act is None:
        if src.entry is None:
            return None, False
        act = src.entry.act
    return config_from_tensors(shapes, act, name=src.name, source=src.weights), False


def load(path_or_name: str | os.PathLike | None = None, pretrained: str | None = None,
         act: str | None = None, threads: int | None = None, layout: str = "auto",
         config: Any = None, tokenizer: Tokenizer | None = None,
         precision: str = "fp32", towers: str = "both") -> CLIP:
    """Load a CLIP ViT checkpoint (safetensors) into the clipdecomp C core.

    Parameters
    ----------
    path_or_name : str or path, optional
        Nothing: the embedded shapes-world CLIP (:data:`clipdecomp.toy.MODEL_DIR`), which needs
        no download. Otherwise a ``.safetensors`` file, a checkpoint directory, an open_clip architecture name (with
        ``pretrained=``), or a Hugging Face Hub repository (``"hf-hub:ORG/REPO"`` or
        ``"ORG/REPO"``).
    pretrained : str, optional
        open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ... see
        :func:`list_pretrained`), or a local weights file for the architecture named by
        ``path_or_name``.
    act : {"quick_gelu", "gelu"}, optional
        The activation. Overrides everything; required when no config file says it.
    threads : int, optional
        Threads for the C core (default: ``OMP_NUM_THREADS``, else the CPU count).
    layout : {"auto", "open_clip", "hf"}
        Key layout of the weights; ``"auto"`` detects it.
    config : str, dict or ModelConfig, optional
        A config to use instead of the files beside the weights: a path to an
        ``open_clip_config.json`` / open_clip model config / HF ``config.json``, such a dict, or a
        :class:`ModelConfig`.
    tokenizer : Tokenizer, optional
        A tokenizer to use instead of the one found beside the weights (or the bundled CLIP
        vocabulary).
    precision : {"fp32", "bf16", "bf16-emulated"}
        Precision of the matrix products of the transformer blocks (both towers). ``"bf16"``
        stores those weights as bfloat16 (half their memory) and multiplies in bf16 with float32
        sums on CPUs with AVX512_BF16 (:func:`clipdecomp.has_bf16`); elsewhere it falls back to
        ``"bf16-emulated"`` with a warning: the same roundings computed by the float32 kernels
        at float32 speed, within 1.7e-3 of the largest decomposition term of native bf16
        (measured; the hardware sums and rounds in its own order). Both keep the text token
        table in bf16 (each looked-up row widened to float32). The patch embedding, the
        projections, attention and the folds of the decomposition stay float32.
        Measured errors against fp32: ``benchmarks/PRECISION.md``. The weights are converted
        one by one as they are read, so loading in bf16 never holds the float32 model.
    towers : {"both", "image"}
        ``"image"`` loads the image tower and its projection alone, leaving a text tower in the
        file unread (the memory of a job that only decomposes images: data-set runs, workers);
        ``encode_text`` then raises, saying to load again with ``towers="both"``.

    Memory: the weights file is mapped read-only and each tensor's pages are released as soon
    as the model has its own (packed) copy, so loading peaks near the loaded model's size
    (:func:`clipdecomp.engine.model.load_memory`; ``docs/memory.md``). A model whose loading
    would exceed the budget set with :func:`clipdecomp.set_memory_budget` (or, without one,
    the memory available) is refused with ``MemoryError`` before anything large is allocated.

    Returns
    -------
    CLIP

    Raises
    ------
    FileNotFoundError
        Nothing at the path, or no weights file in the directory.
    ValueError
        Pickled weights (with how to convert them), an unknown layout or model name, a
        malformed safetensors file (:class:`clipdecomp.engine.safetensors_io.SafetensorsError`), no
        way to know the activation (pass ``act=``), or a config the C core cannot run.
    MemoryError
        Loading would exceed the memory budget (the message names both).
    ImportError, RuntimeError
        Hub names without ``huggingface_hub`` installed, or without network / cached copy.

    Examples
    --------
    >>> import clipdecomp
    >>> model = clipdecomp.load()                      # the embedded shapes-world model
    >>> model.config.image_size
    64
    >>> model = clipdecomp.load("ViT-B-16", pretrained="openai")          # doctest: +SKIP
    >>> model = clipdecomp.load("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")  # doctest: +SKIP
    >>> model = clipdecomp.load("weights.safetensors", act="quick_gelu")  # doctest: +SKIP
    """
    if path_or_name is None:
        if pretrained is not None:
            raise ValueError("pretrained= needs a model name, e.g. load('ViT-B-16', "
                             "pretrained='openai')")
        from clipdecomp.toy import MODEL_DIR
        if not (MODEL_DIR / "open_clip_config.json").exists():
            raise FileNotFoundError(f"the embedded model is missing from {MODEL_DIR}: "
                                    "reinstall clipdecomp")
        path_or_name = MODEL_DIR
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if towers not in TOWERS:
        raise ValueError(f"unknown towers {towers!r}: use one of {', '.join(TOWERS)}")
    if act is not None:
        act = normalise_act(act)
    src = _resolve(path_or_name, pretrained)
    weights = src.weights
    if weights.endswith(_PICKLE_EXT):
        raise _pickle_error(weights)
    header = SafetensorsFile(weights)
    keys = list(header.keys())
    if any(k.endswith(("head.probe", "attn_pool.latent")) for k in keys):
        raise ValueError(f"{weights}: a SigLIP checkpoint (attention-pooling head, no class "
                         "token): load it with clipdecomp.load_siglip")
    found = detect_layout(keys)
    if found is None:
        raise ValueError(f"{weights}: no CLIP image tower in this file: neither the open_clip "
                         "layout ('visual.*' tensors) nor the transformers layout "
                         "('vision_model.*'); unknown layout")
    if layout != "auto" and layout != found:
        raise ValueError(f"{weights}: layout={layout!r} was asked but the tensors are in the "
                         f"{found!r} layout")
    shapes = {k: header.tensors[k].shape for k in keys}

    cfg, explicit = _read_config(config, src, shapes, act, found)
    table_act = src.entry.act if src.entry is not None else None
    act_value, act_source = resolve_act(act, cfg, explicit, weights, table_act)
    assert cfg is not None   # resolve_act raised when there is neither config nor act
    changes: dict[str, Any] = {"act": act_value}
    if act is not None or table_act is not None:
        changes["text_act"] = act_value   # one activation for both towers
    if src.entry is not None and pretrained is not None:
        # open_clip's pretrained table sets the preprocessing of these checkpoints
        if src.entry.mean is not None:
            changes["mean"], changes["std"] = src.entry.mean, src.entry.std
        changes["resize_mode"] = src.entry.resize_mode
    if not cfg.name:
        changes["name"] = src.name
    if cfg.has_text and (towers == "image" or not has_text_tower(keys, found)):
        changes["text_layers"] = 0
    cfg = cfg.replace(**changes)

    if tokenizer is None and cfg.has_text:
        tokenizer = find_tokenizer(os.path.dirname(os.path.abspath(weights)),
                                   cfg.context_length)
        if tokenizer is None and cfg.vocab_size == 49408:
            tokenizer = default_tokenizer(cfg.context_length)
    if tokenizer is not None and cfg.has_text and tokenizer.vocab_size > cfg.vocab_size:
        warnings.warn(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the "
                      f"model's ({cfg.vocab_size})", stacklevel=2)

    logit_scale = None
    if "logit_scale" in header:
        ls = header.read("logit_scale").reshape(-1)
        if ls.size == 1 and np.isfinite(ls[0]):
            logit_scale = float(np.exp(np.float64(ls[0])))

    run_precision = _core.effective_precision(precision, stacklevel=3)
    check_load_memory(cfg, run_precision, weights)
    core = _core.open_model(weights, cfg, found, run_precision)
    model = CLIP(core, cfg, tokenizer=tokenizer, logit_scale=logit_scale, path=weights,
                 threads=threads, act_source=act_source)
    model.towers = towers
    model.spec = ModelSpec.of_call(path_or_name, pretrained=pretrained, act=act, threads=threads,
                                   layout=layout, config=config, tokenizer=tokenizer,
                                   precision=precision, towers=towers)
    return model


# ----------------------------------------------------------------------------------------------
# how a model is loaded again (Dask workers, pickling)


@dataclasses.dataclass
class ModelSpec:
    """How to load a model: ``loader(path, **kwargs)``; what Dask workers receive.

    Parameters
    ----------
    path : str
        Checkpoint path or model name, as for :func:`clipdecomp.load`.
    kwargs : dict
        Keyword arguments of the loader (``pretrained``, ``act``, ``threads``...).
    loader : callable or "module:function", optional
        Default :func:`clipdecomp.load`.

    Examples
    --------
    >>> spec = ModelSpec("ViT-B-16.safetensors", {"act": "quick_gelu"})   # doctest: +SKIP
    >>> model = spec.load()                                                # doctest: +SKIP
    """

    path: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    loader: Any = None

    #: the defaults of :func:`load`; a spec records only the arguments that differ
    LOAD_DEFAULTS: ClassVar[dict[str, Any]] = {
        "pretrained": None, "act": None, "threads": None, "layout": "auto", "config": None,
        "tokenizer": None, "precision": "fp32", "towers": "both"}

    @classmethod
    def of_call(cls, path_or_name: str | os.PathLike | None, **kwargs: Any) -> ModelSpec:
        """The spec of ``load(path_or_name, **kwargs)``: every argument that differs from its
        default is kept, so a worker loads the same model (``precision="bf16"`` included).
        A local path is made absolute; nothing (the embedded model) stays ``None`` -> its
        folder.

        Examples
        --------
        >>> ModelSpec.of_call(None, precision="bf16").kwargs
        {'precision': 'bf16'}
        """
        if path_or_name is None:
            from clipdecomp.toy import MODEL_DIR

            path = str(MODEL_DIR)
        else:
            path = os.fspath(path_or_name)
            if os.path.exists(path):
                path = os.path.abspath(path)
        given = {k: v for k, v in kwargs.items()
                 if k not in cls.LOAD_DEFAULTS or v != cls.LOAD_DEFAULTS[k]}
        return cls(path, given)

    def _loader(self) -> Callable:
        if self.loader is None:
            return load
        if isinstance(self.loader, str):
            mod, _, name = self.loader.partition(":")
            if not name:
                raise ValueError(f"loader must be 'module:function', not {self.loader!r}")
            return getattr(importlib.import_module(mod), name)
        return self.loader

    def load(self) -> Any:
        """Load the model."""
        return self._loader()(self.path, **self.kwargs)

    def image_tower(self) -> ModelSpec:
        """This spec with ``towers="image"``, for a job that never encodes text (a data-set
        run): the text tower is not loaded. A spec with its own loader, or that names its
        towers, is returned as it is.

        Examples
        --------
        >>> ModelSpec("ViT-B-16", {"precision": "bf16"}).image_tower().kwargs
        {'precision': 'bf16', 'towers': 'image'}
        >>> ModelSpec("ViT-B-16", {"towers": "both"}).image_tower().kwargs
        {'towers': 'both'}
        """
        if self.loader is not None or "towers" in self.kwargs:
            return self
        return ModelSpec(self.path, {**self.kwargs, "towers": "image"})

    def key(self) -> str:
        """A string that identifies this spec (the per-worker cache key)."""
        ld = self.loader
        if callable(ld):
            ld = f"{getattr(ld, '__module__', '?')}:{getattr(ld, '__qualname__', repr(ld))}"
        return json.dumps([self.path, ld, self.kwargs], sort_keys=True, default=str)


def spec_of(model: Any) -> ModelSpec:
    """The :class:`ModelSpec` of a model: a spec or path as is, else the model's own record of
    its checkpoint (attribute ``spec``, or ``path`` plus ``load_kwargs`` and its activation).
    Run with it, a store checks that the workers' model has the config of this one."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ModelSpec(os.fspath(model))
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict) and "path" in spec:
        return ModelSpec(spec["path"], dict(spec.get("kwargs", {})), spec.get("loader"))
    path = checkpoint_path(model)
    if path is None:
        raise ValueError(
            "Dask workers load the model themselves: pass a ModelSpec(path, kwargs) or a "
            "checkpoint path instead of a model object"
        )
    kwargs = dict(getattr(model, "load_kwargs", None) or {})
    act = getattr(getattr(model, "config", None), "act", None)
    if act is not None:
        kwargs.setdefault("act", act)  # whatever decided it at load time, the workers use it
    precision = getattr(model, "precision", "fp32")
    if precision != "fp32":
        kwargs.setdefault("precision", precision)  # the workers run the same numbers
    return ModelSpec(path, kwargs)


def checkpoint_path(model: Any, spec: ModelSpec | None = None) -> str | None:
    """The weights file of ``model`` (or of ``spec``) when there is one on this machine: the
    one place that guesses where a model object came from.

    Examples
    --------
    >>> checkpoint_path(load()).endswith(".safetensors")
    True
    """
    for attr in ("checkpoint_path", "path", "checkpoint", "weights_path", "filename", "_path"):
        v = getattr(model, attr, None)
        if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
            return os.path.abspath(os.fspath(v))
    if spec is not None and os.path.isfile(spec.path):
        return os.path.abspath(spec.path)
    return None
