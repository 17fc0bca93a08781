"""Small helpers every layer uses, written once: progress bars, optional imports, byte sizes,
and the image inputs of a model (how many images, in which batches, within what memory).

>>> format_bytes(3 * 2**20)
'3.0 MiB'
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["count_images", "format_bytes", "image_batches", "image_list", "is_pixel_array",
           "memory_budget", "optional_import", "progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 enabled: bool = True, desc: str | None = None, unit: str = "it",
                 initial: int = 0, **options: Any) -> Any:
    """A tqdm progress bar (notebook-aware), silent when ``enabled`` is False.

    Use it over an iterable (``for x in progress_bar(xs, desc="heads")``) or as a context
    manager with ``.update(n)``. The bar writes to stderr only; ``options`` go to tqdm
    (``dynamic_ncols``, ``unit_scale``...).

    Examples
    --------
    >>> with progress_bar(total=3, enabled=False, unit="img") as bar:
    ...     bar.update(3)
    >>> list(progress_bar(range(3), enabled=False))
    [0, 1, 2]
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, disable=not enabled, desc=desc, unit=unit,
                initial=initial, **options)


def optional_import(name: str, hint: str) -> ModuleType:
    """Import the optional dependency ``name``; ImportError(``hint``) when it is missing.

    Parameters
    ----------
    name : str
        Module to import, e.g. ``"zarr"``.
    hint : str
        What needs it and how to install it, e.g. ``"stores need zarr: pip install zarr"``.

    Examples
    --------
    >>> optional_import("json", "json is in the standard library").__name__
    'json'
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(hint) from e


def format_bytes(n: float) -> str:
    """A byte count in binary units: ``"512 bytes"``, ``"3.0 KiB"``, ``"58.0 MiB"``, ``"1.5 GiB"``.

    Examples
    --------
    >>> format_bytes(1536), format_bytes(100)
    ('1.5 KiB', '100 bytes')
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} bytes"


# -- the image inputs of a model ---------------------------------------------------------------


def is_pixel_array(images: Any) -> bool:
    """Whether ``images`` is a float array, which models take as preprocessed pixels
    ``[B, 3, S, S]`` or ``[3, S, S]`` (anything else is a path, an image or a list of them).

    Examples
    --------
    >>> is_pixel_array(np.zeros((2, 3, 8, 8), np.float32)), is_pixel_array(["a.jpg"])
    (True, False)
    """
    from clipdecomp.engine.preprocess import _is_float_array

    return bool(_is_float_array(images))


def image_list(images: Any) -> Any:
    """The input of a model call ready to be read more than once: float pixel arrays as they
    are, anything else (a path, an image, a list, a generator) as a list of its images.

    Examples
    --------
    >>> image_list(iter(["a.jpg", "b.jpg"]))
    ['a.jpg', 'b.jpg']
    """
    from clipdecomp.engine.preprocess import as_image_list

    return images if is_pixel_array(images) else as_image_list(images)


def count_images(images: Any) -> int:
    """The number of images of a model input (see :func:`image_list`).

    Examples
    --------
    >>> count_images(np.zeros((5, 3, 8, 8), np.float32)), count_images(["a.jpg", "b.jpg"])
    (5, 2)
    """
    if is_pixel_array(images):
        a = np.asarray(images)
        return int(a.shape[0]) if a.ndim == 4 else 1
    return len(image_list(images))


def image_batches(model: Any, images: Any, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, pixels)`` over the images, ``pixels`` float32 ``[b, 3, S, S]`` (at most
    ``batch_size`` images) preprocessed for ``model`` and checked (shape, finite values), as
    the model's own calls read their input.

    Examples
    --------
    >>> for start, px in image_batches(model, ["a.jpg", "b.jpg"], 8):   # doctest: +SKIP
    ...     px.shape
    (2, 3, 224, 224)
    """
    yield from model._batches(images, batch_size)


def memory_budget(model: Any) -> int:
    """Bytes one call of ``model`` may plan with: its ``memory_budget`` when set, else the
    process default (half the available memory, :func:`clipdecomp.engine.model.
    get_memory_budget`).

    Examples
    --------
    >>> memory_budget(model) > 0                                      # doctest: +SKIP
    True
    """
    budget = getattr(model, "memory_budget", None)
    if budget is not None:
        return int(budget)
    from clipdecomp.engine.model import get_memory_budget

    return int(get_memory_budget())
