"""clipdecomp: CLIP image embeddings decomposed into heads, tokens and MLPs.

An implementation of "Interpreting CLIP's Image Representation via Text-Based Decomposition"
(Gandelsman, Efros, Steinhardt, ICLR 2024) on a C core that needs no PyTorch.

>>> import clipdecomp
>>> model = clipdecomp.load()                    # the embedded shapes-world CLIP
>>> from clipdecomp import toy
>>> dec = model.decompose(list(toy.generate(2, seed=0).images))
>>> dec.heads.shape                              # [B, L, H, D]
(2, 6, 6, 128)
"""
__version__ = "0.1.0"

from .ablation import (
    ComponentMeans,
    RepairedCLIP,
    ablate,
    ablation_study,
    component_means,
    load_ablation,
)
from .config import ModelConfig
from .decomposition import Decomposition
from .loading import has_bf16, list_pretrained, load
from .model import CLIP, get_memory_budget, set_debug, set_memory_budget
from .pool import encode_pool, load_pool
from .retrieval import HeadIndex, show_retrieval
from .segmentation import SegmentationResult, segment, segmentation_metrics
from .siglip import SIGLIP_PRETRAINED, SigLIP, SiglipDecomposition, load_siglip
from .spatial import attention_map, attention_rollout, head_map, head_maps, heatmap, upsample
from .stats import HeadStats
from .textspan import (
    TextSpanResult,
    format_head_table,
    textspan,
    textspan_from_stats,
    textspan_heads,
    textspan_reconstruction_curve,
)
from .zeroshot import accuracy, zero_shot_classifier


def _repaired(self, heads=(), **kwargs):
    """An encoder whose ``encode_image`` returns repaired embeddings (see :class:`RepairedCLIP`)."""
    return RepairedCLIP(self, heads=heads, **kwargs)


CLIP.repaired = _repaired
Decomposition.heatmap = heatmap


def run_dataset(*args, **kwargs):
    """Stream a collection through the decomposition into a Zarr store; see
    :func:`clipdecomp.dataset.run_dataset` (imported lazily: zarr and dask are optional)."""
    from .dataset import run_dataset as _run

    return _run(*args, **kwargs)


def StoreReader(path, *args, **kwargs):
    """Open a store written by :func:`run_dataset`; see :class:`clipdecomp.store.StoreReader`."""
    from .store import StoreReader as _Reader

    return _Reader(path, *args, **kwargs)


__all__ = [
    "CLIP",
    "SIGLIP_PRETRAINED",
    "ComponentMeans",
    "Decomposition",
    "HeadIndex",
    "HeadStats",
    "ModelConfig",
    "RepairedCLIP",
    "SegmentationResult",
    "SigLIP",
    "SiglipDecomposition",
    "StoreReader",
    "TextSpanResult",
    "ablate",
    "ablation_study",
    "accuracy",
    "attention_map",
    "attention_rollout",
    "component_means",
    "encode_pool",
    "format_head_table",
    "get_memory_budget",
    "has_bf16",
    "head_map",
    "head_maps",
    "heatmap",
    "list_pretrained",
    "load",
    "load_ablation",
    "load_pool",
    "load_siglip",
    "run_dataset",
    "segment",
    "segmentation_metrics",
    "set_debug",
    "set_memory_budget",
    "show_retrieval",
    "textspan",
    "textspan_from_stats",
    "textspan_heads",
    "textspan_reconstruction_curve",
    "upsample",
    "zero_shot_classifier",
]
