"""The one door to the C extension ``clipdecomp._core``.

Every call from Python into the C core goes through this module, so the rest of the package
(and the layers above the engine) never import the extension themselves.

>>> from clipdecomp.engine import core
>>> isinstance(core.has_bf16(), bool)
True
"""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from clipdecomp.engine.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "bf16-emulated")


def extension() -> ModuleType:
    """The built extension module; ImportError with how to build it when it is missing."""
    try:
        from clipdecomp import _core
    except ImportError as e:
        raise ImportError(
            "the C extension clipdecomp._core is not built: run `pip install .` or `python "
            f"setup.py build_ext --inplace` in the source tree ({e})") from None
    return _core


def has_bf16() -> bool:
    """Whether ``precision="bf16"`` runs natively here (AVX512_BF16, avx512 path in use).

    Examples
    --------
    >>> import clipdecomp
    >>> isinstance(clipdecomp.has_bf16(), bool)
    True
    """
    return bool(extension().has_bf16())


def bf16_kernel() -> str:
    """The kernel of native bf16 products here: ``"amx"`` (AMX tiles), ``"avx512bf16"``
    (``vdpbf16ps``) or ``"none"`` (bf16 is emulated). ``CLIPDECOMP_AMX=0`` turns AMX off."""
    return str(extension().bf16_kernel())


def isa() -> str:
    """The SIMD path the core chose on this CPU (e.g. ``"avx2"``)."""
    return str(extension().isa())


def check_config(core_dict: dict[str, Any]) -> None:
    """ValueError when the C core cannot run a model of this config (a dict as
    ``ModelConfig.to_core_dict()`` makes): the one validation of a model's geometry, the one
    ``open_model`` runs too (``cd_config_check`` in csrc/load.c)."""
    extension()._check_config(core_dict)


def open_model(weights: str, cfg: ModelConfig | Any, layout: str,
               precision: str = "fp32") -> Any:
    """Open a safetensors checkpoint in the core (``_core.Model``) with the config ``cfg`` (a
    :class:`ModelConfig` or a SigLIP config: anything with ``to_core_dict()``), the blocks'
    weights converted to ``precision`` one by one as they are packed, so that the float32 copy
    of the whole model never exists (``"bf16"`` becomes ``"bf16-emulated"``, with a warning,
    on a CPU without AVX512_BF16)."""
    return extension().Model(weights, cfg.to_core_dict(), layout,
                             precision=effective_precision(precision, stacklevel=4))


def image_plan(cfg: ModelConfig | Any, images: int, *, threads: int, heads: bool = False,
               mlps: bool = False, cls_to_cls: bool = False, tokens: bool = False,
               attn: bool = False, probe: int = 0) -> dict[str, int]:
    """The C core's memory plan of one ``encode_image`` call over ``images`` images with these
    outputs (``probe``: the number of directions) on ``threads`` threads: ``chunk`` (images it
    computes at once), ``scratch_per_image`` and ``scratch_fixed`` (bytes of its working
    memory: ``chunk * scratch_per_image + scratch_fixed``), ``model_bytes`` (kept by the model
    from the first such call on) and ``result_per_image`` (bytes of the output arrays).

    Examples
    --------
    >>> from clipdecomp.engine.config import ModelConfig
    >>> cfg = ModelConfig(224, 16, 768, 12, 12, 3072, 512, "gelu")
    >>> image_plan(cfg, 8, threads=1)["result_per_image"]        # embedding and ln_stats
    2060
    """
    return dict(extension().image_plan(cfg.to_core_dict(), images, threads=threads, heads=heads,
                                       mlps=mlps, cls_to_cls=cls_to_cls, tokens=tokens,
                                       attn=attn, probe=probe))


def effective_precision(precision: str, stacklevel: int = 3) -> str:
    """The precision the core runs for ``precision`` on this CPU: ``"bf16"`` becomes
    ``"bf16-emulated"``, with a warning, on a CPU without AVX512_BF16."""
    if precision == "bf16" and not has_bf16():
        warnings.warn("precision='bf16': this CPU has no AVX512_BF16 (or the avx512 path is "
                      "off), so bf16 is emulated: the same bf16 roundings (numbers within 1e-3 of "
                      "native bf16), computed by the float32 kernels at float32 speed and memory",
                      RuntimeWarning,
                      stacklevel=stacklevel)
        precision = "bf16-emulated"
    return precision


def set_precision(core_model: Any, precision: str) -> str:
    """Convert a freshly opened core model to ``precision``; returns the precision in effect
    (see :func:`effective_precision`). :func:`open_model` with ``precision=`` does the same
    while loading, without the float32 copy."""
    if precision == "fp32":
        return "fp32"
    precision = effective_precision(precision, stacklevel=4)
    core_model.set_precision(precision)
    return precision


def moments_update(sum_outer: np.ndarray, total: np.ndarray, x: np.ndarray) -> None:
    """Add rows ``x`` [n, K, D] (float32) to per-head second moments, in place (csrc/moments.c).

    Parameters
    ----------
    sum_outer : [K, D, D] float64, C-contiguous, writeable
        Running sum of ``x[i, k] x[i, k]^T``.
    total : [K, D] float64, C-contiguous, writeable
        Running sum of ``x[i, k]``.
    x : [n, K, D] float32
    """
    extension()._moments_update(sum_outer, total, x)


def neuron_coefs(model: Any, pixels: np.ndarray, layer: int, record: Any) -> dict:
    """The C forward of ``model`` (a :class:`~clipdecomp.engine.model.CLIP`) on preprocessed
    pixels [B, 3, S, S] up to the MLP of ``layer``, returning its neuron coefficients and what
    :func:`clipdecomp.methods.neurons.neuron_forward` asks to ``record``."""
    return model._core.neuron_coefs(pixels, layer, record=record, threads=model.threads)


def neuron_fold_apply(coef: np.ndarray, fold: np.ndarray, scales: np.ndarray,
                      shift: Any) -> np.ndarray:
    """The C core's product of neuron coefficients with a folded neuron map
    (:mod:`clipdecomp.methods.neurons`)."""
    return extension()._neuron_fold_apply(coef, fold, scales, shift)
