"""Shared fixtures: small random CLIP checkpoints (built once per session) and the C core.

torch and transformers are imported only by the fixtures that need them, so test files that do
not use the checkpoints stay fast.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def requires_core():
    """The C extension module ``clipdecomp._core``, for the tests that call it directly.

    A missing build is a failure that says how to build, never a skip: every test of the
    package needs the core, and a suite that skips without it would pass on a broken install.
    """
    try:
        from clipdecomp import _core
    except ImportError as e:
        pytest.fail(f"clipdecomp._core is not built ({e}): run "
                    "`python setup.py build_ext --inplace` (or `make build`)", pytrace=False)
    return _core


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``name -> checkpoints.Checkpoint`` for every geometry of ``checkpoints.SPECS``, each saved
    in both layouts and in F32 / F16 / BF16."""
    import checkpoints as ckpts
    import torch

    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("clip_checkpoints"))
    return {name: ckpts.build(name, root, seed=i) for i, name in enumerate(ckpts.SPECS)}


@pytest.fixture(scope="session")
def b32(checkpoints):
    """The ViT-B/32-like QuickGELU checkpoint."""
    return checkpoints["b32_quick"]


@pytest.fixture(scope="session")
def b16(checkpoints):
    """The ViT-B/16-like exact-GELU checkpoint with 5 heads of 12."""
    return checkpoints["b16_gelu"]
