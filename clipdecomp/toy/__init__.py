"""The shapes world and the small CLIP trained on it, clipdecomp's built-in test bed.

``MODEL_DIR`` is the folder of the shipped model (open_clip layout, F16 safetensors);
``clipdecomp.load()`` with no arguments loads it. The world itself (:func:`generate`,
:func:`spurious_split`) needs only NumPy.

Examples
--------
>>> from clipdecomp import toy
>>> batch = toy.generate(8, seed=0)
>>> batch.images.shape
(8, 64, 64, 3)
>>> names, texts = toy.prompts("shape")
"""
from pathlib import Path

from clipdecomp.toy.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    COUNTS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapesBatch,
    generate,
    prompts,
    shape_mask,
    spurious_split,
    vocabulary,
)

MODEL_DIR: Path = Path(__file__).resolve().parent / "model"

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "COLOR_RGB",
    "COUNTS",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "MODEL_DIR",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEMPLATES",
    "ShapesBatch",
    "generate",
    "prompts",
    "shape_mask",
    "spurious_split",
    "vocabulary",
]
