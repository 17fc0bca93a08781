"""Pretrained CLIP checkpoints on the Hugging Face Hub, by their open_clip names.

``clipdecomp.load("ViT-B-16", pretrained="openai")`` looks the pair up here, downloads the
safetensors weights and config files with ``huggingface_hub`` (an optional dependency), and loads
them. ``load("hf-hub:ORG/REPO")`` and ``load("ORG/REPO")`` download any repository that holds
CLIP ViT weights as safetensors, in the open_clip or the transformers layout.

The table follows open_clip's own registry (``open_clip/pretrained.py``, version 3.3): the same
repositories, the same activation (``quick_gelu`` for OpenAI, MetaCLIP, DFN-2B / DFN-5B and the
LAION-400M ViT-B/32; exact GELU for the LAION-2B / DataComp ones) and the same preprocessing
(Inception statistics for the LAION-2B ViT-L/14; "squash" resizing for DFN-5B).

Only ``.safetensors`` weights are read. timm's and LAION's repositories publish
``open_clip_model.safetensors`` (a few LAION repositories name it
``open_clip_pytorch_model.safetensors``); Apple's DFN repositories publish only the pickled
``open_clip_pytorch_model.bin``, so loading them fails with instructions to convert it once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clipdecomp.engine.helpers import optional_import

__all__ = [
    "AUX_FILES",
    "WEIGHT_FILES",
    "HubEntry",
    "arch_config",
    "download",
    "entry_for_repo",
    "get_entry",
    "list_architectures",
    "list_pretrained",
]

#: weights file names tried in a repository, in order; model.safetensors only with an HF config
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "model.safetensors")
#: config and tokenizer files fetched beside the weights when the repository has them
AUX_FILES = ("open_clip_config.json", "config.json", "preprocessor_config.json",
             "tokenizer.json", "vocab.json", "merges.txt")

_INCEPTION = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HubEntry:
    """One pretrained checkpoint.

    Attributes
    ----------
    model : str
        open_clip architecture name, e.g. ``"ViT-B-16"``.
    pretrained : str
        open_clip pretrained tag, e.g. ``"openai"``.
    repo : str
        Hugging Face Hub repository, e.g. ``"timm/vit_base_patch16_clip_224.openai"``.
    act : str
        ``"quick_gelu"`` or ``"gelu"``, as open_clip builds this checkpoint.
    safetensors : bool
        Whether the repository is known to publish safetensors weights.
    mean, std : tuple or None
        Image statistics when they differ from OpenAI's.
    resize_mode : str
        ``"shortest"`` or ``"squash"``.
    note : str
        Anything a user should know.
    """

    model: str
    pretrained: str
    repo: str
    act: str
    safetensors: bool = True
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize_mode: str = "shortest"
    note: str = field(default="", compare=False)


def _e(model: str, tag: str, repo: str, act: str, **kw: Any) -> HubEntry:
    return HubEntry(model, tag, repo, act, **kw)


_Q, _G = "quick_gelu", "gelu"
_DFN_NOTE = ("Apple publishes only open_clip_pytorch_model.bin: convert it to safetensors once "
             "(see clipdecomp.load's error message)")
_ENTRIES: list[HubEntry] = [
    # OpenAI (QuickGELU), mirrored by timm
    _e("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", _Q),
    _e("ViT-B-16", "openai", "timm/vit_base_patch16_clip_224.openai", _Q),
    _e("ViT-L-14", "openai", "timm/vit_large_patch14_clip_224.openai", _Q),
    _e("ViT-L-14-336", "openai", "timm/vit_large_patch14_clip_336.openai", _Q),
    # LAION-400M
    _e("ViT-B-32", "laion400m_e31", "timm/vit_base_patch32_clip_224.laion400m_e31", _Q),
    _e("ViT-B-32", "laion400m_e32", "timm/vit_base_patch32_clip_224.laion400m_e32", _Q),
    _e("ViT-B-16", "laion400m_e31", "timm/vit_base_patch16_clip_224.laion400m_e31", _G),
    _e("ViT-B-16", "laion400m_e32", "timm/vit_base_patch16_clip_224.laion400m_e32", _G),
    _e("ViT-L-14", "laion400m_e31", "timm/vit_large_patch14_clip_224.laion400m_e31", _G),
    _e("ViT-L-14", "laion400m_e32", "timm/vit_large_patch14_clip_224.laion400m_e32", _G),
    # LAION-2B (exact GELU)
    _e("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", _G),
    _e("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", _G),
    _e("ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", _G,
       mean=_INCEPTION, std=_INCEPTION),
    _e("ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", _G),
    _e("ViT-g-14", "laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K", _G),
    _e("ViT-g-14", "laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K", _G),
    _e("ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", _G),
    # DataComp-XL (exact GELU)
    _e("ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", _G),
    _e("ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", _G),
    _e("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", _G),
    # DFN (QuickGELU; DFN-5B resizes by squashing)
    _e("ViT-B-16", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", _Q, safetensors=False, note=_DFN_NOTE),
    _e("ViT-L-14", "dfn2b", "apple/DFN2B-CLIP-ViT-L-14", _Q, safetensors=False, note=_DFN_NOTE),
    _e("ViT-H-14", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14", _Q, safetensors=False,
       resize_mode="squash", note=_DFN_NOTE),
    _e("ViT-H-14-378", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378", _Q, safetensors=False,
       resize_mode="squash", note=_DFN_NOTE),
    # MetaCLIP (QuickGELU, except "altogether")
    _e("ViT-B-32", "metaclip_400m", "timm/vit_base_patch32_clip_224.metaclip_400m", _Q),
    _e("ViT-B-32", "metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", _Q),
    _e("ViT-B-16", "metaclip_400m", "timm/vit_base_patch16_clip_224.metaclip_400m", _Q),
    _e("ViT-B-16", "metaclip_fullcc", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", _Q),
    _e("ViT-L-14", "metaclip_400m", "timm/vit_large_patch14_clip_224.metaclip_400m", _Q),
    _e("ViT-L-14", "metaclip_fullcc", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", _Q),
    _e("ViT-H-14", "metaclip_fullcc", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", _Q),
    _e("ViT-H-14", "metaclip_altogether", "timm/vit_huge_patch14_clip_224.metaclip_altogether",
       _G),
    _e("ViT-bigG-14", "metaclip_fullcc", "timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", _Q),
]
# open_clip also lists every QuickGELU checkpoint under "<model>-quickgelu"
_ENTRIES += [HubEntry(e.model + "-quickgelu", e.pretrained, e.repo, e.act, e.safetensors, e.mean,
                      e.std, e.resize_mode, e.note) for e in list(_ENTRIES) if e.act == _Q]
_TABLE: dict[tuple[str, str], HubEntry] = {(e.model, e.pretrained): e for e in _ENTRIES}


def _vit(embed: int, image: int, layers: int, width: int, patch: int, text_width: int,
         text_heads: int, text_layers: int, head_width: int = 64,
         mlp_ratio: float = 4.0) -> dict[str, Any]:
    """A bare open_clip model config (the dict of ``model_configs/<name>.json``)."""
    vision: dict[str, Any] = {"image_size": image, "layers": layers, "width": width,
                              "patch_size": patch}
    if head_width != 64:
        vision["head_width"] = head_width
    if mlp_ratio != 4.0:
        vision["mlp_ratio"] = mlp_ratio
    return {"embed_dim": embed, "vision_cfg": vision,
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width,
                         "heads": text_heads, "layers": text_layers}}


#: open_clip's model_configs for the architectures above (geometry; no weights)
_ARCH: dict[str, dict[str, Any]] = {
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12, 12),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 1024, 16, 24, head_width=80),
    "ViT-H-14-378": _vit(1024, 378, 32, 1280, 14, 1024, 16, 24, head_width=80),
    "ViT-g-14": _vit(1024, 224, 40, 1408, 14, 1024, 16, 24, head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(1280, 224, 48, 1664, 14, 1280, 20, 32, head_width=104,
                        mlp_ratio=4.9231),
}


def list_pretrained(as_str: bool = False) -> list[Any]:
    """The (model, pretrained) pairs ``clipdecomp.load`` knows, as open_clip names them.

    Parameters
    ----------
    as_str : bool
        Return ``"model:pretrained"`` strings instead of tuples.

    Examples
    --------
    >>> ("ViT-B-16", "openai") in list_pretrained()
    True
    """
    return [f"{m}:{t}" if as_str else (m, t) for (m, t) in _TABLE]


def list_architectures() -> list[str]:
    """open_clip architecture names whose geometry is known without a config file.

    Examples
    --------
    >>> "ViT-L-14" in list_architectures()
    True
    """
    return sorted(set(_ARCH) | {a + "-quickgelu" for a in _ARCH})


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def get_entry(model: str, pretrained: str) -> HubEntry:
    """The table entry of an open_clip (model, pretrained) pair.

    Raises
    ------
    ValueError
        For an unknown pair, listing the tags known for that model (or the known models).

    Examples
    --------
    >>> get_entry("ViT-B-32", "openai").repo
    'timm/vit_base_patch32_clip_224.openai'
    """
    model = model.replace("/", "-")
    e = _TABLE.get((model, _clean_tag(pretrained)))
    if e is not None:
        return e
    tags = sorted(t for (m, t) in _TABLE if m == model)
    if tags:
        raise ValueError(f"no pretrained weights {pretrained!r} for {model!r}; known: "
                         f"{', '.join(tags)}")
    models = sorted({m for (m, _) in _TABLE})
    raise ValueError(f"unknown model {model!r}; known: {', '.join(models)} (or pass a path, or "
                     "'hf-hub:ORG/REPO')")


def entry_for_repo(repo: str) -> HubEntry | None:
    """The table entry whose repository is ``repo`` (case-insensitive), if any."""
    repo = repo.strip("/").lower()
    for e in _ENTRIES:
        if e.repo.lower() == repo:
            return e
    return None


def arch_config(model: str) -> dict[str, Any] | None:
    """open_clip's bare model config for an architecture name, or None when unknown.

    ``"-quickgelu"`` names get ``"quick_gelu": True``, as open_clip's own configs do.

    Examples
    --------
    >>> arch_config("ViT-B-32-quickgelu")["quick_gelu"]
    True
    """
    model = model.replace("/", "-")
    quick = model.endswith("-quickgelu")
    base = model[: -len("-quickgelu")] if quick else model
    cfg = _ARCH.get(base)
    if cfg is None:
        return None
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    if quick:
        out["quick_gelu"] = True
    return out


# ----------------------------------------------------------------------------------------------
# downloading


def _import_hub():
    hf = optional_import(
        "huggingface_hub",
        "loading from the Hugging Face Hub needs the huggingface_hub package: "
        "`pip install huggingface_hub` (or `pip install clipdecomp[hub]`); or download the "
        "repository yourself and pass its directory to clipdecomp.load")
    from huggingface_hub import errors

    return hf.hf_hub_download, errors


def _is_hf_clip(path: str) -> bool:
    import json

    from clipdecomp.engine.config import is_hf_clip_config

    try:
        with open(path, "r", encoding="utf-8") as fh:
            return is_hf_clip_config(json.load(fh))
    except (OSError, ValueError):
        return False


def download(repo: str, revision: str | None = None, cache_dir: str | None = None,
             local_files_only: bool = False,
             weight_files: Sequence[str] = WEIGHT_FILES) -> str:
    """Download a repository's safetensors weights and config / tokenizer files.

    Parameters
    ----------
    repo : str
        ``"ORG/NAME"`` on the Hugging Face Hub.
    revision : str, optional
        Branch, tag or commit (e.g. ``"refs/pr/3"`` for a safetensors conversion pull request).
    cache_dir : str, optional
        The Hub cache (default: ``huggingface_hub``'s, ``~/.cache/huggingface/hub``).
    local_files_only : bool
        Use only what is cached (also implied by ``HF_HUB_OFFLINE=1``).
    weight_files : sequence of str
        Weight file names to try in order.

    Returns
    -------
    str
        Path of the weights file; the configs and tokenizer files are in the same directory.

    Raises
    ------
    ImportError
        When huggingface_hub is not installed.
    RuntimeError
        When the repository does not exist, cannot be reached (offline, no cached copy), or has
        no safetensors weights; the message names the repository.

    Examples
    --------
    >>> path = download("timm/vit_base_patch16_clip_224.openai")   # doctest: +SKIP
    """
    hf_hub_download, errors = _import_hub()
    repo = repo.strip().strip("/")
    local_err = getattr(errors, "LocalEntryNotFoundError", ())
    missing_err = tuple(c for c in (getattr(errors, "EntryNotFoundError", None),
                                    getattr(errors, "RemoteEntryNotFoundError", None)) if c)
    repo_err = tuple(c for c in (getattr(errors, "RepositoryNotFoundError", None),
                                 getattr(errors, "RevisionNotFoundError", None)) if c)
    offline = False

    def fetch(filename: str) -> str | None:
        nonlocal offline
        try:
            # once the Hub proved unreachable, use the cache only (no retry cycle per file)
            return hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only or offline)
        except local_err:
            offline = True
            return None
        except missing_err:
            return None
        except repo_err as e:
            raise RuntimeError(f"Hugging Face Hub repository {repo!r}"
                               f"{'' if revision is None else f' (revision {revision!r})'} "
                               f"not found, or private / gated: {e}") from None
        except Exception as e:
            # OSError, and the HTTP client's own errors (a connection dropped mid-file, a
            # server error): huggingface_hub keeps the partial file out of the cache
            raise RuntimeError(f"could not download {filename!r} from the Hugging Face Hub "
                               f"repository {repo!r}: {type(e).__name__}: {e}") from e

    aux = {name: fetch(name) for name in AUX_FILES}
    weights = None
    for name in weight_files:
        config_json = aux.get("config.json")
        if name == "model.safetensors" and not (config_json and _is_hf_clip(config_json)):
            continue   # timm's model.safetensors is an image-only timm model, not CLIP
        weights = fetch(name)
        if weights is not None:
            break
    if weights is None:
        if offline:
            raise RuntimeError(
                f"could not reach the Hugging Face Hub for {repo!r} and no cached copy of its "
                "safetensors weights was found (offline, or HF_HUB_OFFLINE=1). Download it "
                "where there is network, or pass a local directory to clipdecomp.load")
        entry = entry_for_repo(repo)
        hint = f" ({entry.note})" if entry is not None and entry.note else ""
        raise RuntimeError(
            f"Hugging Face Hub repository {repo!r} has no safetensors weights (looked for "
            f"{', '.join(weight_files)}){hint}. clipdecomp reads only .safetensors; convert "
            "the pickled weights once (see clipdecomp.engine.loading.CONVERT_HINT), or try a "
            "conversion branch with revision='refs/pr/N'")
    return weights
