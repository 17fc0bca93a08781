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
from __future__ import annotations

import json
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
    SPURIOUS_NAMES,
    STYLES,
    TEMPLATES,
    ShapesBatch,
    generate,
    prompts,
    shape_mask,
    spurious_split,
    vocabulary,
)

MODEL_DIR: Path = Path(__file__).resolve().parent / "model"


def model_style(model_dir: str | Path = MODEL_DIR) -> str:
    """The world style (a key of ``STYLES``) a toy model folder was trained on.

    Read from its ``training_info.json`` ("textured" when the file or the field is missing).

    Examples
    --------
    >>> model_style() in STYLES
    True
    """
    info = Path(model_dir) / "training_info.json"
    if not info.exists():
        return "textured"
    return json.loads(info.read_text()).get("style", "textured")


#: the world style of the shipped model: scenes generated for it should use this style
MODEL_STYLE: str = model_style()

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "COLOR_RGB",
    "COUNTS",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "MODEL_DIR",
    "MODEL_STYLE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPURIOUS_NAMES",
    "STYLES",
    "TEMPLATES",
    "ShapesBatch",
    "generate",
    "model_style",
    "prompts",
    "shape_mask",
    "spurious_split",
    "vocabulary",
]
