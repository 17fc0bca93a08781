"""``CLIP``: a loaded model, its preprocessing and tokenizer, and the decomposition.

Create one with :func:`clipdecomp.load`. Shapes: B images, T texts, S image side, C context
length, D embedding dim, L layers, H heads, N tokens.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp.engine import core as _engine_core
from clipdecomp.engine.config import MAX_THREADS, ModelConfig, check_size
from clipdecomp.engine.decomposition import (
    IDENTITY_TOL,
    IDENTITY_TOL_BF16,
    Decomposition,
    check_identity,
)
from clipdecomp.engine.helpers import count_images, format_bytes, memory_budget, progress_bar
from clipdecomp.engine.preprocess import (
    _check_pixel_shape,
    _check_pixels,
    _is_float_array,
    as_image_list,
    preprocess,
    preprocess_items,
)
from clipdecomp.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from clipdecomp.engine.loading import ModelSpec
    from clipdecomp.methods.ablation import RepairedCLIP

__all__ = ["CLIP", "MemoryPlan", "available_memory", "check_load_memory", "debug_enabled",
           "default_threads", "get_memory_budget", "load_memory", "plan_memory", "set_debug",
           "set_memory_budget"]

#: images per forward pass when nothing else is asked
_BATCH = 8
#: bytes of per-token terms one spatial batch may hold before the batch is made smaller
_SPATIAL_BATCH_BYTES = 512 * 2**20
#: the default memory budget: this fraction of the memory available when a batch is planned
_BUDGET_FRACTION = 0.5
_F32 = 4

# process-wide settings (the model's own attributes win over them)
_settings_lock = threading.Lock()
_memory_budget: int | None = None
_debug: bool | None = None


# fork: the OpenMP runtime's threads do not survive fork(), so a child forked after the C core
# has computed (multiprocessing's default start method on Linux, DataLoader-style workers) runs
# the core on one thread; the core enforces it (csrc/cpu.c), this side says so once
_core_used = False
_forked_child = False
_fork_noted = False


def _mark_forked_child() -> None:
    global _forked_child, _fork_noted
    _forked_child, _fork_noted = _forked_child or _core_used, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


def _fork_note() -> None:
    global _fork_noted
    if not _fork_noted:
        _fork_noted = True
        warnings.warn("clipdecomp runs single-threaded in this process: it was forked from "
                      "one whose OpenMP threads cannot be used after fork(). For parallel "
                      "workers use the multiprocessing start method 'spawn' or 'forkserver' "
                      "(multiprocessing.get_context('spawn'), or DataLoader("
                      "multiprocessing_context='spawn')).", RuntimeWarning, stacklevel=4)


def default_threads() -> int:
    """Threads for the C core: ``OMP_NUM_THREADS`` when set, else ``os.cpu_count()``.

    Examples
    --------
    >>> default_threads() >= 1
    True
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
            if n > 0:
                return min(n, MAX_THREADS)
        except ValueError:
            pass
    return max(1, min(os.cpu_count() or 1, MAX_THREADS))


# -- memory budget ---------------------------------------------------------------------------


def available_memory() -> int:
    """Bytes of memory available to new allocations now.

    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical pages
    (``os.sysconf``), else 4 GiB when the system says nothing.

    Examples
    --------
    >>> available_memory() > 0
    True
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page > 0:
            return int(pages) * int(page)
    except (AttributeError, ValueError, OSError):
        pass
    return 4 * 2**30


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def _parse_bytes(value: Any, what: str) -> int:
    """``1073741824``, ``"1G"``, ``"512MiB"``, ``"2.5GB"`` -> bytes (binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of bytes, got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise ValueError(f"{what} must be a finite number of bytes, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        num = text.rstrip("KMGTIB")
        unit = text[len(num):]
        try:
            n = int(float(num) * _UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"{what}: cannot read {value!r} as a size (e.g. 2000000000, "
                             "'512M', '2G')") from None
    else:
        raise TypeError(f"{what} must be a number of bytes, got {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def set_memory_budget(nbytes: int | str | None) -> None:
    """Set the memory the models of this process may plan one call with.

    A call whose results and working memory would exceed the budget runs in smaller batches
    (with the same results); one that cannot fit even one image at a time raises
    ``MemoryError``. The default (``None``) is the environment variable
    ``CLIPDECOMP_MEMORY_BUDGET`` when set, else half of the memory available at the time of the
    call. A model's own ``memory_budget`` attribute takes precedence.

    Parameters
    ----------
    nbytes : int, str or None
        Bytes (``2_000_000_000``), a size with a binary unit (``"512M"``, ``"8GiB"``), or None
        to go back to the default.

    Examples
    --------
    >>> set_memory_budget("8G")
    >>> get_memory_budget()
    8589934592
    >>> set_memory_budget(None)
    """
    global _memory_budget
    value = None if nbytes is None else _parse_bytes(nbytes, "memory budget")
    with _settings_lock:
        _memory_budget = value


def _set_budget() -> int | None:
    """The budget set by :func:`set_memory_budget` or ``CLIPDECOMP_MEMORY_BUDGET``, else None."""
    with _settings_lock:
        value = _memory_budget
    if value is not None:
        return value
    env = os.environ.get("CLIPDECOMP_MEMORY_BUDGET", "").strip()
    if env:
        return _parse_bytes(env, "CLIPDECOMP_MEMORY_BUDGET")
    return None


def get_memory_budget() -> int:
    """The budget in bytes that a model without its own ``memory_budget`` uses now.

    Examples
    --------
    >>> get_memory_budget() > 0
    True
    """
    value = _set_budget()
    if value is not None:
        return value
    return max(1, int(available_memory() * _BUDGET_FRACTION))


#: columns per packed panel of the core's GEMM weights (CD_GEMM_NR in csrc/gemm_kernels.h)
_PANEL = 16


def load_memory(config: ModelConfig, precision: str = "fp32") -> tuple[int, int]:
    """(steady, peak): bytes a model of ``config`` holds once loaded, and at most while loading.

    ``steady`` counts every weight the C core keeps, as it keeps it (its
    :attr:`CLIP.nbytes` right after loading): float32, except the four matrices of every
    transformer block in ``precision="bf16"`` (2 bytes a value) and the text token table in
    ``"bf16"`` and ``"bf16-emulated"`` (2 bytes a value); packed matrices have their output
    rows rounded up to a panel of 16. No tensor is kept twice. ``peak`` adds what the
    loader holds for one tensor at a time (its source pages and a float32 conversion) on top.
    A config with ``text_layers == 0`` counts the image tower alone.

    Examples
    --------
    >>> cfg = ModelConfig(224, 16, 768, 12, 12, 3072, 512, "gelu")
    >>> steady, peak = load_memory(cfg)
    >>> round(steady / 2**20), round(load_memory(cfg, "bf16")[0] / 2**20)
    (329, 167)
    """
    def packed(oc: int, k: int, block: bool) -> int:
        rows = -(-oc // _PANEL) * _PANEL
        if block and precision == "bf16":
            return rows * ((k + 1) // 2) * 4        # bf16 pairs in 32-bit words
        return rows * k * 4

    def blocks(n: int, w: int, f: int) -> tuple[int, int]:
        one = (packed(3 * w, w, True) + packed(w, w, True) + packed(f, w, True)
               + packed(w, f, True) + (4 * w + 3 * w + w + f + w) * 4)
        return n * one, max(3 * w * w, f * w) * 4

    c = config
    w, p = c.width, c.patch_size
    steady = packed(w, 3 * p * p, False) + (w + c.n_tokens * w + 4 * w) * 4
    steady += packed(c.embed_dim, w, False)
    vb, largest = blocks(c.layers, w, c.mlp_dim)
    steady += vb
    largest = max(largest, c.n_tokens * w * 4)
    if c.has_text:
        tw = c.text_width
        tb, tl = blocks(c.text_layers, tw, c.text_mlp_dim)
        table = 4 if precision == "fp32" else 2   # bytes a value of the token table
        steady += tb + c.vocab_size * tw * table + (c.context_length * tw + 2 * tw) * 4
        steady += packed(c.embed_dim, tw, False)
        largest = max(largest, tl, c.vocab_size * tw * 4)
    return steady, steady + 2 * largest


def check_load_memory(config: ModelConfig, precision: str, what: str) -> int:
    """Refuse, before anything large is allocated, a model whose loading would not fit.

    The limit is the budget of :func:`set_memory_budget` (or ``CLIPDECOMP_MEMORY_BUDGET``)
    when one is set, else the memory available now. Returns the peak of :func:`load_memory`.

    Raises
    ------
    MemoryError
        Naming the need (steady and peak) and the budget.
    """
    steady, peak = load_memory(config, precision)
    budget = _set_budget()
    limit, source = (budget, "the memory budget") if budget is not None else (
        available_memory(), "the memory available")
    if peak > limit:
        hint = ""
        if config.has_text:
            hint = "load(..., towers='image') loads the image tower alone; "
        if precision == "fp32":
            hint += "precision='bf16' halves the blocks' weights; "
        raise MemoryError(
            f"{what}: loading needs {format_bytes(peak)} ({format_bytes(steady)} of weights in "
            f"{precision}, then the largest tensor in flight), more than {source} of "
            f"{format_bytes(limit)}. {hint}raise the budget with "
            "clipdecomp.set_memory_budget(bytes) or CLIPDECOMP_MEMORY_BUDGET.")
    return peak


def set_debug(on: bool | None) -> None:
    """Check every decomposition as it is computed (``None``: follow ``CLIPDECOMP_DEBUG``).

    In debug mode ``decompose`` verifies, for every batch, that the terms add up to the
    normalised embedding (``heads.sum((1, 2)) + mlps.sum(1) == embedding / norm``, and
    ``tokens.sum(2) == heads`` when the tokens are kept) to 1e-3, and raises ``RuntimeError``
    with the numbers if not. It costs one pass over the results.

    Examples
    --------
    >>> set_debug(True); debug_enabled()
    True
    >>> set_debug(None)
    """
    global _debug
    with _settings_lock:
        _debug = None if on is None else bool(on)


def debug_enabled() -> bool:
    """Whether debug checks run: :func:`set_debug`, else ``CLIPDECOMP_DEBUG`` (``1``, ``true``).

    Examples
    --------
    >>> isinstance(debug_enabled(), bool)
    True
    """
    with _settings_lock:
        value = _debug
    if value is not None:
        return value
    return os.environ.get("CLIPDECOMP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one call needs, and the batch that fits a budget.

    Attributes
    ----------
    images : int
        B, the images of the call.
    result_per_image : int
        Bytes of the returned arrays per image (kept for all B images).
    batch_per_image : int
        Bytes per image of one batch in flight: the preprocessed pixels (and the results when
        they are not kept: the core writes the kept ones in place).
    scratch_per_image : int
        The core's activations per image (it holds at most ``core_chunk`` images' worth).
    core_chunk : int
        Images the core computes at once (the core's own plan, within its scratch limit).
    fixed : int
        Bytes per call that do not grow with the batch (attention tiles, per-thread buffers,
        the folded per-token maps).
    budget : int
        The budget the plan was made for.
    batch_size : int
        Images per forward pass that fit (0: not even one does).
    """

    images: int
    result_per_image: int
    batch_per_image: int
    scratch_per_image: int
    core_chunk: int
    fixed: int
    budget: int
    batch_size: int

    def need(self, batch: int) -> int:
        """Bytes for the whole call run in batches of ``batch`` images."""
        b = max(0, min(batch, self.images))
        return (self.images * self.result_per_image + b * self.batch_per_image
                + min(b, self.core_chunk) * self.scratch_per_image + self.fixed)


def plan_memory(config: ModelConfig, images: int, budget: int, *, decompose: bool = True,
                tokens: bool = False, attn: bool = False, probe: int = 0,
                keep_pixels: bool = False, threads: int = 1, batch_size: int = _BATCH,
                results: bool = True) -> MemoryPlan:
    """Plan a call over ``images`` images within ``budget`` bytes.

    ``results=False`` leaves out the returned arrays (a caller that keeps only part of them).
    The batch size is the largest ``<= batch_size`` whose need fits the budget (0 if none).

    Examples
    --------
    >>> cfg = ModelConfig(224, 16, 768, 12, 12, 3072, 512, "gelu")
    >>> plan = plan_memory(cfg, 100, 2**30, tokens=True)
    >>> plan.batch_size, plan.result_per_image // 2**20      # 55 MiB of tokens per image
    (0, 55)
    """
    c = config
    core = _engine_core.image_plan(c, max(images, 1), threads=max(1, threads),
                                   heads=decompose, mlps=decompose, cls_to_cls=decompose,
                                   tokens=tokens, attn=attn, probe=probe)
    res = core["result_per_image"]
    pix = 3 * c.image_size * c.image_size * _F32
    # the fold of the decomposition is built once per model and kept: counted with the call's
    # scratch
    fixed = core["scratch_fixed"] + core["model_bytes"]
    result_kept = (res + (pix if keep_pixels else 0)) if results else 0
    plan = MemoryPlan(images=images, result_per_image=result_kept,
                      batch_per_image=pix + (0 if results else res),
                      scratch_per_image=core["scratch_per_image"], core_chunk=core["chunk"],
                      fixed=fixed, budget=budget, batch_size=0)
    bs = max(1, min(batch_size, max(images, 1)))
    if plan.need(bs) > budget:      # the largest batch that fits: need() grows with the batch
        lo, hi = 0, bs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if plan.need(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        bs = lo
    return MemoryPlan(**{**plan.__dict__, "batch_size": bs})


def _too_big(plan: MemoryPlan, what: str, hint: str) -> MemoryError:
    results = plan.images * plan.result_per_image
    one = plan.need(1) - results
    return MemoryError(
        f"{what} of {plan.images} image{'s' if plan.images != 1 else ''} needs about "
        f"{format_bytes(plan.need(1))} even one image at a time ({format_bytes(results)} for the "
        f"results, {format_bytes(one)} to compute), more than the memory budget of "
        f"{format_bytes(plan.budget)}. {hint}Raise the budget with "
        "clipdecomp.set_memory_budget(bytes), model.memory_budget or the environment variable "
        "CLIPDECOMP_MEMORY_BUDGET, or pass fewer images per call.")


def _normalize(x: np.ndarray) -> np.ndarray:
    # the norm in float64: float32 squares overflow for entries above ~1e19
    n = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):          # rows already reported by _check_finite
        return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _check_finite(embedding: np.ndarray, start: int, what: str) -> None:
    """Warn when a batch's embeddings are not finite (finite weights and pixels whose forward
    pass overflowed float32): better said once than found later as NaN in a plot."""
    bad = ~np.isfinite(embedding).all(axis=1)
    if bad.any():
        first = start + int(np.flatnonzero(bad)[0])
        warnings.warn(f"{what}: the embeddings of {int(bad.sum())} image(s) (the first is image "
                      f"{first}) are NaN or infinite: the forward pass overflowed float32 (the "
                      "weights or the pixels hold extreme values)", RuntimeWarning, stacklevel=3)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    return progress_bar(total=total, enabled=enabled, unit="img", desc=desc)


class CLIP:
    """A CLIP ViT model over the clipdecomp C core.

    Attributes
    ----------
    config : ModelConfig
        Geometry, activation and preprocessing.
    tokenizer : Tokenizer or None
        The text tokenizer (None when the model has no text tower or no vocabulary was found).
    logit_scale : float or None
        ``exp(logit_scale)`` of the checkpoint (about 100 for released models), if it has one.
    path : str
        The weights file.
    threads : int
        Threads the C core uses (default :func:`default_threads`).
    act_source : str
        Where the activation came from (the ``act=`` argument, the config, the pretrained table,
        or open_clip's default).
    memory_budget : int or None
        Bytes one call may plan with (None: :func:`get_memory_budget`, by default half the
        available memory). Larger calls run in smaller batches, with the same results.

    Notes
    -----
    One model may be used from several threads at once (the C core releases the GIL and keeps
    no state between calls). A model pickles by its source: unpickling (a Dask worker, a
    process pool) opens the same weights file again, with the same config and tokenizer.

    Examples
    --------
    >>> import clipdecomp
    >>> model = clipdecomp.load("ViT-B-16", pretrained="openai")          # doctest: +SKIP
    >>> img = model.encode_image(["cat.jpg"], normalize=True)  # doctest: +SKIP
    >>> txt = model.encode_text(["a photo of a cat", "a photo of a dog"],  # doctest: +SKIP
    ...                         normalize=True)
    >>> (model.logit_scale * img @ txt.T).argmax(1)                       # doctest: +SKIP
    array([0])
    """

    def __init__(self, core: Any, config: ModelConfig, tokenizer: Tokenizer | None = None,
                 logit_scale: float | None = None, path: str = "",
                 threads: int | None = None, act_source: str = ""):
        self._core = core
        self.config = config
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale
        self.path = os.path.abspath(path) if path else path   # valid in any working directory
        self._stamp = _weights_stamp(self.path) if path else None   # the file as loaded
        self.act_source = act_source
        self.threads = threads
        self.memory_budget = None
        #: how :func:`clipdecomp.load` was called for this model (what Dask workers load);
        #: None for a model made otherwise
        self.spec: ModelSpec | None = None
        #: ``"image"`` when ``load(..., towers="image")`` left the file's text tower unread
        self.towers = "both"

    # -- properties ----------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"bf16-emulated"``: the precision of the blocks' matrix
        products (``load(..., precision=)``)."""
        return str(getattr(self._core, "precision", "fp32"))

    @property
    def nbytes(self) -> int:
        """Bytes of weights the C core holds for this model, as it holds them (packed, in
        :attr:`precision`), plus the decomposition's fold once a call has built it
        (:func:`load_memory` predicts it before loading)."""
        return int(getattr(self._core, "nbytes", 0))

    @property
    def threads(self) -> int:
        """Threads for the C core: 1 to :data:`clipdecomp.engine.config.MAX_THREADS` (the larger of
        1024 and four per CPU)."""
        return self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        self._threads_given = value is not None
        if value is None:
            value = default_threads()
        self._threads = check_size(value, "threads", maximum=MAX_THREADS)

    @property
    def memory_budget(self) -> int | None:
        """Bytes this model may plan one call with (None: :func:`get_memory_budget`).

        A call that would need more runs in smaller batches, with the same results; one that
        cannot fit one image at a time raises ``MemoryError``. Set it to bytes, a size such as
        ``"4G"``, or None.

        Examples
        --------
        >>> model.memory_budget = "4G"                                    # doctest: +SKIP
        """
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int | str | None) -> None:
        self._memory_budget = None if value is None else _parse_bytes(value, "memory_budget")

    def estimate_memory(self, images: int, spatial: bool = False, attn: bool = False,
                        probe: int = 0, keep_pixels: bool = True,
                        batch_size: int | None = None) -> MemoryPlan:
        """How much memory ``decompose`` of ``images`` images needs, and the batch that fits.

        Parameters
        ----------
        images : int
            B.
        spatial, attn, keep_pixels : bool
            As for :meth:`decompose`.
        probe : int
            T, directions of a ``probe`` call (0: none).
        batch_size : int, optional
            The batch to start from (default as in :meth:`decompose`).

        Returns
        -------
        MemoryPlan
            ``plan.need(b)`` is the bytes of the call in batches of b; ``plan.batch_size`` the
            batch that fits the budget (0: not even one image).

        Examples
        --------
        >>> plan = model.estimate_memory(1000, spatial=True)              # doctest: +SKIP
        >>> plan.need(plan.batch_size) < plan.budget                      # doctest: +SKIP
        True
        """
        bs = self._batch_arg(batch_size, self._spatial_batch() if spatial else _BATCH)
        images = check_size(images, "images")
        return plan_memory(self.config, images, memory_budget(self), decompose=True,
                           tokens=spatial, attn=attn, probe=probe, keep_pixels=keep_pixels,
                           threads=self.threads, batch_size=bs)

    @property
    def layout(self) -> str:
        """The weights' key layout: ``"open_clip"`` or ``"hf"``."""
        return str(getattr(self._core, "layout", ""))

    # -- preprocessing -------------------------------------------------------------------------

    def preprocess(self, images: Any) -> np.ndarray:
        """Images -> normalised float32 pixels ``[B, 3, S, S]``.

        Parameters
        ----------
        images : path, PIL.Image, uint8 array, float array, or a list of these
            See :func:`clipdecomp.engine.preprocess.preprocess`.

        Examples
        --------
        >>> model.preprocess(["cat.jpg", "dog.png"]).shape              # doctest: +SKIP
        (2, 3, 224, 224)
        """
        c = self.config
        return preprocess(images, c.image_size, c.mean, c.std, c.resize_mode, c.interpolation)

    def tokenize(self, texts: str | Sequence[str],
                 context_length: int | None = None) -> np.ndarray:
        """Texts -> int32 ids ``[T, C]`` (open_clip's layout: start, tokens, end, zeros).

        Examples
        --------
        >>> model.tokenize(["a dog"])[0, :4]                              # doctest: +SKIP
        array([49406,   320,  1929, 49407], dtype=int32)
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json / vocab.json + "
                             "merges.txt beside the weights, and no text tower to use the "
                             "bundled CLIP vocabulary for); pass tokenizer= to clipdecomp.load")
        c = self.config.context_length
        if context_length is not None and self.config.has_text and context_length > c:
            raise ValueError(f"context_length={context_length} is longer than the model's "
                             f"context of {c} tokens (its positional embedding has {c} rows); "
                             "longer texts are cut to fit it")
        return self.tokenizer(texts, context_length or c)

    # -- running -------------------------------------------------------------------------------

    def _batches(self, images: Any, batch_size: int):
        """Yield ``(start, pixels [b, 3, S, S])`` over the input, preprocessing per batch."""
        if _is_float_array(images):
            arr = np.asarray(images)
            if arr.ndim == 3:
                arr = arr[None]
            _check_pixel_shape(arr, self.config.image_size, "images")   # up front
            for s in range(0, arr.shape[0], batch_size):
                yield s, _check_pixels(arr[s:s + batch_size], self.config.image_size, "images",
                                       start=s)
            return
        items = as_image_list(images)
        if not items:
            raise ValueError("no images given (an empty list)")
        c = self.config
        listed = isinstance(images, (list, tuple)) or len(items) > 1
        for s in range(0, len(items), batch_size):
            yield s, preprocess_items(items[s:s + batch_size], c.image_size, c.mean, c.std,
                                      c.resize_mode, c.interpolation, start=s, listed=listed)

    def _call_threads(self) -> int:
        """Threads for one core call: one in a forked child (see :func:`_fork_note`)."""
        global _core_used
        _core_used = True
        if _forked_child and self.threads > 1:
            _fork_note()
            return 1
        return self.threads

    def _run(self, pixels: np.ndarray, out: dict[str, np.ndarray] | None = None,
             **opts: Any) -> dict[str, np.ndarray]:
        """One core call; the core writes into the arrays of ``out`` (slices of the caller's
        results) and allocates the others it returns."""
        return self._core.encode_image(np.ascontiguousarray(pixels, dtype=np.float32),
                                       threads=self._call_threads(), out=out, **opts)

    def encode_image(self, images: Any, normalize: bool = False,
                     batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Image embeddings, float32 ``[B, D]``.

        Parameters
        ----------
        images : path, PIL.Image, array, or a list of these
            Raw images are preprocessed; float ``[B, 3, S, S]`` arrays are used as they are.
        normalize : bool
            Divide each embedding by its norm. Default False, as open_clip's
            ``encode_image(x, normalize=False)``: the raw projected embedding.
        batch_size : int, optional
            Images per forward pass (default 8).
        progress : bool
            Show a progress bar.

        Examples
        --------
        >>> model.encode_image(["cat.jpg"], normalize=True).shape  # doctest: +SKIP
        (1, 512)
        """
        bs = self._batch_arg(batch_size, _BATCH)
        if not _is_float_array(images):
            images = as_image_list(images)   # once: a generator can be read only once
        n = count_images(images)
        plan = plan_memory(self.config, n, memory_budget(self), decompose=False,
                           threads=self.threads, batch_size=bs)
        if plan.batch_size < 1:
            raise _too_big(plan, "encode_image", "")
        out = np.empty((n, self.config.embed_dim), dtype=np.float32)
        with _progress(n, progress, "encode_image") as bar:
            for s, px in self._batches(images, plan.batch_size):
                r = self._run(px, out={"embedding": out[s:s + px.shape[0]]})
                _check_finite(r["embedding"], s, "encode_image")
                del r
                bar.update(px.shape[0])
        return _normalize(out) if normalize else out

    def token_embeddings(self, images: Any, batch_size: int | None = None,
                         progress: bool = False) -> np.ndarray:
        """Every token's own projection ``ln_post(x_L[n]) @ proj``, float32 ``[B, N, D]``.

        Token 0 is the class token (its row is ``encode_image(normalize=False)``); tokens 1..N-1
        are the patches in row-major grid order. Their dot products with class directions give
        the plain patch-token segmentation baseline (:func:`clipdecomp.methods.seg_baselines.
        patch_token_maps`).

        Parameters
        ----------
        images : path, PIL.Image, array, or a list of these
        batch_size : int, optional
            Images per forward pass (default 8).
        progress : bool

        Examples
        --------
        >>> model.token_embeddings(["cat.jpg"]).shape                     # doctest: +SKIP
        (1, 197, 512)
        """
        bs = self._batch_arg(batch_size, _BATCH)
        if not _is_float_array(images):
            images = as_image_list(images)
        n = count_images(images)
        c = self.config
        plan = plan_memory(c, n, memory_budget(self), decompose=False, threads=self.threads,
                           batch_size=bs)
        if plan.batch_size < 1:
            raise _too_big(plan, "token_embeddings", "")
        out = np.empty((n, c.n_tokens, c.embed_dim), dtype=np.float32)
        with _progress(n, progress, "token_embeddings") as bar:
            for s, px in self._batches(images, plan.batch_size):
                r = self._run(px, token_embeddings=True,
                              out={"token_embeddings": out[s:s + px.shape[0]]})
                _check_finite(r["embedding"], s, "token_embeddings")
                del r
                bar.update(px.shape[0])
        return out

    @staticmethod
    def _batch_arg(batch_size: int | None, default: int) -> int:
        return check_size(batch_size, "batch_size", default=default)

    def _as_ids(self, texts_or_ids: Any) -> np.ndarray:
        if isinstance(texts_or_ids, str) or (
                isinstance(texts_or_ids, (list, tuple)) and texts_or_ids
                and all(isinstance(t, str) for t in texts_or_ids)):
            return self.tokenize(texts_or_ids)
        ids = np.asarray(texts_or_ids)
        if ids.ndim == 1 and ids.size and np.issubdtype(ids.dtype, np.integer):
            ids = ids[None]
        c = self.config
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"texts must be strings, or integer token ids [T, "
                             f"{c.context_length}]; got {ids.dtype} of shape {ids.shape}")
        if ids.shape[1] != c.context_length:
            raise ValueError(f"token ids must have the model's context length "
                             f"{c.context_length}; got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got "
                             f"[{ids.min()}, {ids.max()}]")
        return np.ascontiguousarray(ids, dtype=np.int32)

    def encode_text(self, texts_or_ids: Any, normalize: bool = False,
                    batch_size: int | None = None) -> np.ndarray:
        """Text embeddings, float32 ``[T, D]``.

        Parameters
        ----------
        texts_or_ids : str, list of str, or int array ``[T, C]``
            Texts are tokenized; ids are used as they are (the feature is read at the position
            of each row's largest id, the end-of-text token).
        normalize : bool
            Divide each embedding by its norm. Default False, as open_clip's
            ``encode_text(x, normalize=False)``.
        batch_size : int, optional
            Texts per forward pass (default 256).

        Examples
        --------
        >>> model.encode_text(["a photo of a cat"], normalize=True).shape  # doctest: +SKIP
        (1, 512)
        """
        if not self.config.has_text:
            if self.towers == "image":
                raise ValueError("this model was loaded with towers='image' (the image tower "
                                 "alone): load it again with clipdecomp.load(..., "
                                 "towers='both') for encode_text")
            raise ValueError("this checkpoint has no text tower: encode_text is not available")
        bs = self._batch_arg(batch_size, 256)
        ids = self._as_ids(texts_or_ids)
        out = np.empty((ids.shape[0], self.config.embed_dim), dtype=np.float32)
        for s in range(0, ids.shape[0], bs):
            self._core.encode_text(ids[s:s + bs], threads=self._call_threads(),
                                   out=out[s:s + bs])
        return _normalize(out) if normalize else out

    # -- the decomposition ---------------------------------------------------------------------

    def _spatial_batch(self) -> int:
        c = self.config
        per_image = c.layers * c.n_tokens * c.heads * c.embed_dim * 4
        return int(max(1, min(_BATCH, _SPATIAL_BATCH_BYTES // max(per_image, 1))))

    def decompose(self, images: Any, spatial: bool = False, attn: bool = False,
                  batch_size: int | None = None, progress: bool = False,
                  keep_pixels: bool = True) -> Decomposition:
        """Decompose image embeddings into heads, tokens and MLPs (Gandelsman et al., 2024).

        Parameters
        ----------
        images : path, PIL.Image, array, or a list of these
            B images (raw, or preprocessed float ``[B, 3, S, S]``).
        spatial : bool
            Also keep the per (token, head) terms ``tokens [B, L, N, H, D]``: L * N * H * D
            floats per image (58 MiB for ViT-B/16), for heat maps and segmentation.
        attn : bool
            Also keep the attention maps ``attn_cls [B, L, H, N]`` and ``attn_mean
            [B, L, N, N]``.
        batch_size : int, optional
            Images per forward pass: default 8, fewer with ``spatial=True`` (at most
            512 MiB of tokens per batch), and fewer still when the call would not fit the
            memory budget (:attr:`memory_budget`); the results do not depend on it.
        progress : bool
            Show a tqdm progress bar.
        keep_pixels : bool
            Keep the preprocessed pixels in the result (float32 ``[B, 3, S, S]``), so that
            ``project_tokens`` can re-run the model without ``spatial=True``.

        Returns
        -------
        Decomposition

        Raises
        ------
        MemoryError
            When the results and one image's working memory exceed the memory budget (the
            message gives both).
        RuntimeError
            In debug mode (:func:`set_debug`, ``CLIPDECOMP_DEBUG=1``), when the terms do not add
            up to the embedding.

        Examples
        --------
        >>> dec = model.decompose(["cat.jpg"], spatial=True)              # doctest: +SKIP
        >>> dec.tokens.shape                                              # doctest: +SKIP
        (1, 12, 197, 12, 512)
        """
        c = self.config
        bs = self._batch_arg(batch_size, self._spatial_batch() if spatial else _BATCH)
        if not _is_float_array(images):
            images = as_image_list(images)   # once: a generator can be read only once
        n = count_images(images)
        plan = plan_memory(c, n, memory_budget(self), decompose=True, tokens=spatial, attn=attn,
                           keep_pixels=keep_pixels, threads=self.threads, batch_size=bs)
        if plan.batch_size < 1:
            raise _too_big(plan, "decompose" + (" with spatial=True" if spatial else ""),
                           "Per-token terms take L*N*H*D floats per image: "
                           "dec.project_tokens(directions) gives token scores without keeping "
                           "them. " if spatial else "")
        shapes = {
            "embedding": (c.embed_dim,), "ln_stats": (3,),
            "heads": (c.layers, c.heads, c.embed_dim), "mlps": (c.layers + 1, c.embed_dim),
            "cls_to_cls": (c.layers, c.embed_dim),
        }
        if spatial:
            shapes["tokens"] = (c.layers, c.n_tokens, c.heads, c.embed_dim)
        if attn:
            shapes["attn_cls"] = (c.layers, c.heads, c.n_tokens)
            shapes["attn_mean"] = (c.layers, c.n_tokens, c.n_tokens)
        if keep_pixels:
            shapes["pixels"] = (3, c.image_size, c.image_size)
        out = {k: np.empty((n,) + s, dtype=np.float32) for k, s in shapes.items()}
        debug = debug_enabled()
        with _progress(n, progress, "decompose") as bar:
            for s, px in self._batches(images, plan.batch_size):
                e = s + px.shape[0]
                r = self._run(px, heads=True, mlps=True, cls_to_cls=True, tokens=spatial,
                              attn=attn, out={k: a[s:e] for k, a in out.items() if k != "pixels"})
                _check_finite(r["embedding"], s, "decompose")
                if debug:
                    check_identity(r["heads"], r["mlps"], r["embedding"], r["ln_stats"][:, 2],
                                   r.get("tokens"), start=s,
                                   tol=IDENTITY_TOL if self.precision == "fp32"
                                   else IDENTITY_TOL_BF16)
                if keep_pixels:
                    out["pixels"][s:e] = px
                del r
                bar.update(px.shape[0])
        return Decomposition(config=c, embedding=out["embedding"], ln_stats=out["ln_stats"],
                             heads=out["heads"], mlps=out["mlps"], cls_to_cls=out["cls_to_cls"],
                             tokens=out.get("tokens"), attn_cls=out.get("attn_cls"),
                             attn_mean=out.get("attn_mean"), pixels=out.get("pixels"),
                             model=self)

    def _project_tokens(self, pixels: np.ndarray, directions: np.ndarray,
                        batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Token scores ``[B, L, N, H, T]`` of preprocessed pixels along ``directions [T, D]``."""
        c = self.config
        t = directions.shape[0]
        n = pixels.shape[0]
        per_image = c.layers * c.n_tokens * c.heads * t * 4
        default = max(1, min(_BATCH, _SPATIAL_BATCH_BYTES // max(per_image, 1)))
        plan = plan_memory(c, n, memory_budget(self), decompose=False, probe=t,
                           threads=self.threads, batch_size=self._batch_arg(batch_size, default))
        if plan.batch_size < 1:
            raise _too_big(plan, f"probe along {t} directions", "")
        out = np.empty((n, c.layers, c.n_tokens, c.heads, t), dtype=np.float32)
        with _progress(n, progress, "probe") as bar:
            for s in range(0, n, plan.batch_size):
                px = pixels[s:s + plan.batch_size]
                self._run(px, probe=directions, out={"probe": out[s:s + px.shape[0]]})
                bar.update(px.shape[0])
        return out

    # -- derived models ------------------------------------------------------------------------

    def repaired(self, heads: Any = (), **kwargs: Any) -> RepairedCLIP:
        """An encoder whose ``encode_image`` returns embeddings with ``heads`` mean-ablated.

        The same as :class:`clipdecomp.methods.ablation.RepairedCLIP` ``(self, heads, ...)``,
        which holds the code (imported here, on call, so the engine does not depend on the
        methods at import).

        Examples
        --------
        >>> fixed = model.repaired(heads=[(5, 2)], means=means)   # doctest: +SKIP
        >>> fixed.encode_image(images, normalize=True).shape                        # doctest: +SKIP
        (8, 512)
        """
        from clipdecomp.methods.ablation import RepairedCLIP

        return RepairedCLIP(self, heads=heads, **kwargs)

    # -- pickling ------------------------------------------------------------------------------

    def __reduce__(self):
        """Pickle by source, never by weights: the weights file is opened again on unpickling
        (Dask workers, multiprocessing), with the same config, layout and tokenizer."""
        stamp = getattr(self, "_stamp", None) or {}
        state = {
            "path": os.path.abspath(self.path), "config": self.config, "layout": self.layout,
            "size": stamp.get("size"), "stamp": stamp,
            "tokenizer": _tokenizer_spec(self.tokenizer),
            "logit_scale": self.logit_scale, "act_source": self.act_source,
            "threads": self._threads if self._threads_given else None,
            "memory_budget": self._memory_budget, "precision": self.precision,
            "spec": self.spec, "towers": self.towers,
        }
        return (_restore, (state,))

    def __repr__(self) -> str:
        c = self.config
        lines = [
            f"CLIP {c.name or os.path.basename(self.path)} ({self.layout or '?'} layout)",
            (f"  image: {c.image_size}px, patch {c.patch_size} (N={c.n_tokens} tokens), "
            f"width {c.width}, {c.layers} layers, {c.heads} heads, mlp {c.mlp_dim}, "
            f"act {c.act}{f' ({self.act_source})' if self.act_source else ''}"),
            (f"  embedding dim {c.embed_dim}; preprocess: {c.resize_mode} {c.interpolation}, "
            f"mean {tuple(round(m, 4) for m in c.mean)}, std {tuple(round(s, 4) for s in c.std)}"),
        ]
        if c.has_text:
            lines.append(f"  text: width {c.text_width}, {c.text_layers} layers, {c.text_heads} "
                         f"heads, context {c.context_length}, vocab {c.vocab_size}")
        else:
            lines.append("  text: none")
        if self.logit_scale is not None:
            lines.append(f"  logit_scale {self.logit_scale:.2f}")
        prec = "" if self.precision == "fp32" else f"; precision {self.precision}"
        lines.append(f"  threads {self.threads}{prec}; weights {self.path}")
        return "\n".join(lines)



def _weights_stamp(path: str) -> dict | None:
    """Size, modification time and content fingerprint of a weights file (what an unpickled
    model checks: the file must be the one the model was loaded from)."""
    from clipdecomp.engine.safetensors_io import file_fingerprint

    try:
        mtime = os.stat(path).st_mtime_ns
        size, digest = file_fingerprint(path)
    except OSError:
        return None
    return {"size": size, "mtime_ns": mtime, "fingerprint": digest}


def _tokenizer_spec(tok: Tokenizer | None) -> tuple:
    """How to make ``tok`` again: from its files when it came from files, else itself."""
    if tok is None:
        return ("none",)
    from clipdecomp.engine import tokenizer as _tk

    src = str(getattr(tok, "source", ""))
    ctx = tok.context_length
    if src == str(_tk.DEFAULT_BPE):
        return ("default", ctx)
    if src.endswith(".json") and os.path.basename(src) == "tokenizer.json" and \
            os.path.isfile(src):
        return ("file", os.path.abspath(src), ctx)
    merges = os.path.join(os.path.dirname(src), "merges.txt")
    if os.path.basename(src) == "vocab.json" and os.path.isfile(src) and os.path.isfile(merges):
        return ("vocab", os.path.abspath(src), os.path.abspath(merges), ctx)
    return ("object", tok)


def _make_tokenizer(spec: tuple) -> Tokenizer | None:
    from clipdecomp.engine import tokenizer as _tk

    kind = spec[0]
    if kind == "none":
        return None
    if kind == "default":
        return _tk.default_tokenizer(spec[1])
    if kind == "file":
        return _tk.Tokenizer.from_file(spec[1], spec[2])
    if kind == "vocab":
        return _tk.Tokenizer.from_vocab_merges(spec[1], spec[2], spec[3])
    return spec[1]


def _restore(state: dict) -> CLIP:
    """Unpickle a :class:`CLIP`: open its weights file again."""
    from clipdecomp.engine import core as _core

    path = state["path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the weights of the pickled model are not here (a "
                                "model is pickled by its path: every process must see the file)")
    old = state.get("stamp") or {}
    if not old and state.get("size") is not None:
        old = {"size": state["size"]}           # pickled by an older version: size only
    new = _weights_stamp(path) or {}
    for key, what in (("size", "size in bytes"), ("mtime_ns", "modification time, ns"),
                      ("fingerprint", "content fingerprint")):
        if key in old and old[key] != new.get(key):
            raise ValueError(
                f"{path}: the weights file changed since the model was pickled ({what}: "
                f"{old[key]} then, {new.get(key)} now), so the pickled model cannot be "
                "restored from it. Load the model again with clipdecomp.load (copy weights "
                "between machines with their times kept: cp -p, rsync -a)")
    precision = state.get("precision", "fp32")
    if precision != "fp32":   # bf16 pickled where the CPU had it, or not
        precision = "bf16" if precision == "bf16" else "bf16-emulated"
    core = _core.open_model(path, state["config"], state["layout"] or "auto", precision)
    model = CLIP(core, state["config"], tokenizer=_make_tokenizer(state["tokenizer"]),
                 logit_scale=state["logit_scale"], path=path, threads=state["threads"],
                 act_source=state["act_source"])
    model.memory_budget = state["memory_budget"]
    model.spec = state.get("spec")
    model.towers = state.get("towers", "both")
    return model
