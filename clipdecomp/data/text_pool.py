"""The description pool of TextSpan: load it, encode it (cached), and how it was made.

TextSpan picks, for each head, texts out of a pool of short image descriptions. clipdecomp
ships a pool of its own (``clipdecomp/assets/descriptions.txt``, one description a line, ``#``
lines are section titles) covering objects, animals, people, scenes, landscapes, countries,
colours, textures, shapes, materials, counts, styles, moods, lighting, weather, times of day,
art movements, viewpoints and the shapes world of the toy model. Any text file with one
description a line can replace it.

The word tables that wrote the shipped file live in ``scripts/make_description_pool.py``
(``python scripts/make_description_pool.py`` writes it again); this module only reads files.

Shapes: M texts, D embedding dim.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdecomp import assets
from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.engine.loading import checkpoint_path

__all__ = ["DEFAULT_POOL", "POOLS", "encode_pool", "load_pool"]

DEFAULT_POOL: Path = assets.path("descriptions.txt")

#: Description pools shipped with clipdecomp, by name: the package's own (``clipdecomp``, the
#: default) and the two text sets of the paper's reference code (MIT licence, see
#: ``assets/reference/NOTICE``), read verbatim as the reference reads them (one text a line,
#: only the line break removed) so that picks and written tables match it.
POOLS: dict[str, Path] = {
    "clipdecomp": DEFAULT_POOL,
    "image_descriptions_general": assets.path("reference/image_descriptions_general.txt"),
    "google_3498_english": assets.path("reference/google_3498_english.txt"),
}
_VERBATIM = ("image_descriptions_general", "google_3498_english")


def load_pool(path: str | os.PathLike | None = None) -> list[str]:
    """Read a description pool by name or from a file: one text a line.

    Parameters
    ----------
    path : str or path, optional
        A name in :data:`POOLS` (``"clipdecomp"``, ``"image_descriptions_general"``,
        ``"google_3498_english"``) or a text file (UTF-8). Default: clipdecomp's own pool.

    Returns
    -------
    list of str
        The descriptions, in file order. Files and clipdecomp's pool: stripped, blank lines
        and ``#`` comments skipped, duplicates removed (first kept). The reference's pools:
        every line as the reference reads it (line break removed, nothing else).

    Examples
    --------
    >>> pool = load_pool()
    >>> len(pool) >= 3000
    True
    >>> len(load_pool("google_3498_english"))
    3498
    """
    if isinstance(path, str) and path in POOLS:
        name, path = path, POOLS[path]
        if name in _VERBATIM:
            with open(path, encoding="utf-8") as f:
                return [line.replace("\n", "") for line in f]
    path = DEFAULT_POOL if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"no description pool {str(path)!r}: give a text file or one of "
                         f"{sorted(POOLS)}")
    seen: set[str] = set()
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#") or text in seen:
                continue
            seen.add(text)
            out.append(text)
    return out


def _model_key(model: Any) -> str:
    """A fingerprint of the model: config, checkpoint file identity, and a probe embedding."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(repr(cfg).encode())
    p = checkpoint_path(model)
    if p is not None:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    # the weights themselves, through what they do to a fixed text (robust to copies/renames)
    probe = np.asarray(model.encode_text(["a photo of a dog on the grass."], normalize=True))
    h.update(np.round(probe.astype(np.float64), 3).tobytes())
    return h.hexdigest()[:24]


def _default_cache() -> Path:
    root = os.environ.get("CLIPDECOMP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "clipdecomp",
    )
    return Path(root)


def encode_pool(
    model: Any,
    texts: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Unit text embeddings of a pool, cached on disk.

    Parameters
    ----------
    model : CLIP
        Anything with ``encode_text(list_of_str, normalize=True) -> [T, D]``.
    texts : sequence of str [M], optional
        Default: :func:`load_pool` ().
    cache_dir : path or False, optional
        Cache folder (default ``$CLIPDECOMP_CACHE`` or ``~/.cache/clipdecomp``); ``False``
        disables the cache. The key hashes the model (config, checkpoint file size and
        modification time when the model knows its path, and the embedding of a probe text,
        which changes with the weights) and the texts.
    batch_size : int
        Texts per ``encode_text`` call.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    ndarray float32 [M, D]
        Unit-normalised embeddings, row i for ``texts[i]``.

    Examples
    --------
    >>> pool = load_pool()                                     # doctest: +SKIP
    >>> T = encode_pool(model, pool)                           # doctest: +SKIP
    """
    texts = load_pool() if texts is None else [str(t) for t in texts]
    path = None
    if cache_dir is not False:
        root = _default_cache() if cache_dir is None or cache_dir is True else Path(cache_dir)
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:24]
        path = root / f"pool-{_model_key(model)}-{digest}.npy"
        if path.exists():
            try:
                out = np.load(path)
                if out.shape[0] == len(texts):
                    return out
            except (OSError, ValueError):
                pass  # a broken cache file: recompute
    batch_size = check_size(batch_size, "batch_size")
    starts = range(0, len(texts), batch_size)
    starts = progress_bar(starts, desc="encoding pool", total=len(starts), enabled=progress)
    parts = [
        np.asarray(model.encode_text(texts[i : i + batch_size], normalize=True), np.float32)
        for i in starts
    ]
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = (out / np.maximum(norm, 1e-30)).astype(np.float32)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache is no reason to fail
    return out
