"""Small helpers every layer uses, written once: progress bars, optional imports, byte sizes.

>>> format_bytes(3 * 2**20)
'3.0 MiB'
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import Any

__all__ = ["format_bytes", "optional_import", "progress_bar"]


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
