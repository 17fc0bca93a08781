"""clipdecomp: CLIP image embeddings decomposed into heads, tokens and MLPs.

An implementation of "Interpreting CLIP's Image Representation via Text-Based Decomposition"
(Gandelsman, Efros, Steinhardt, ICLR 2024) on a C core that needs no PyTorch.

>>> import clipdecomp
>>> model = clipdecomp.load()                    # the embedded shapes-world CLIP
>>> from clipdecomp import toy
>>> dec = model.decompose(list(toy.generate(2, seed=0).images))
>>> dec.heads.shape                              # [B, L, H, D]
(2, 6, 6, 128)

The package is built in layers; imports run one way, down (see docs/architecture.md):

    clipdecomp.engine    files and images -> arrays: load, CLIP, Decomposition (the C core)
    clipdecomp.methods   functions over Decomposition arrays: TextSpan, ablation, maps, ...
    clipdecomp.data      image sources, the Zarr store, the data-set runner, Dask, text pools
    clipdecomp.viz       every figure and the HTML atlas (report, Atlas)
    clipdecomp.toy       the shapes world and the embedded model
    clipdecomp.cli       the command line

This module only re-exports the names below. ``run_dataset`` and ``StoreReader`` need the
``data`` extra (zarr, dask) and are imported on first use.
"""
from __future__ import annotations

from typing import Any

from clipdecomp import toy
from clipdecomp.engine.core import has_bf16
from clipdecomp.engine.decomposition import Decomposition
from clipdecomp.engine.loading import ModelSpec, list_pretrained, load
from clipdecomp.engine.model import CLIP, set_debug, set_memory_budget
from clipdecomp.engine.siglip import SIGLIP_PRETRAINED, SigLIP, SiglipDecomposition, load_siglip
from clipdecomp.methods.ablation import ablate, ablation_study, component_means
from clipdecomp.methods.retrieval import HeadIndex
from clipdecomp.methods.segmentation import segment, segmentation_metrics
from clipdecomp.methods.spatial import head_maps, heatmap
from clipdecomp.methods.stats import HeadStats
from clipdecomp.methods.textspan import textspan, textspan_heads
from clipdecomp.methods.waterbirds import (
    group_accuracy,
    waterbirds_ablation,
    worst_group_accuracy,
)
from clipdecomp.methods.zeroshot import accuracy, zero_shot_classifier
from clipdecomp.viz.atlas import Atlas, report
from clipdecomp.viz.tables import format_head_table

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "SIGLIP_PRETRAINED",
    "Atlas",
    "Decomposition",
    "HeadIndex",
    "HeadStats",
    "ModelSpec",
    "SigLIP",
    "SiglipDecomposition",
    "StoreReader",
    "ablate",
    "ablation_study",
    "accuracy",
    "component_means",
    "format_head_table",
    "group_accuracy",
    "has_bf16",
    "head_maps",
    "heatmap",
    "list_pretrained",
    "load",
    "load_siglip",
    "report",
    "run_dataset",
    "segment",
    "segmentation_metrics",
    "set_debug",
    "set_memory_budget",
    "textspan",
    "textspan_heads",
    "toy",
    "waterbirds_ablation",
    "worst_group_accuracy",
    "zero_shot_classifier",
]

_LAZY = {"run_dataset": "clipdecomp.data.runner", "StoreReader": "clipdecomp.data.store"}


def __getattr__(name: str) -> Any:
    """``run_dataset`` and ``StoreReader``, imported when first asked for (zarr is optional)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipdecomp' has no attribute {name!r}")
