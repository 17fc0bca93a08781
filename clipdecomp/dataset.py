"""Decompose whole image collections into a Zarr store, with flat memory, resumably.

    from clipdecomp.dataset import run_dataset
    store = run_dataset(model, "imagenet/val", "val.zarr", layers="-4:", dtype="float16")
    store.stats.mean_heads          # [L, H, D]  (mean ablation)
    store.stats.covariance(11, 3)   # [D, D]     (TextSpan from moments)

Images stream through the model in batches while a thread pool decodes and preprocesses the
next batches; each chunk of ``chunk_size`` rows is written once, in its own Zarr chunks, and
the statistics are committed beside it (see :mod:`clipdecomp.store`). Starting the same command
again resumes. With ``client=`` / ``scheduler=`` / ``workers=`` the chunks run on Dask workers
(:mod:`clipdecomp.distributed`).

Command line: ``python -m clipdecomp.dataset SOURCE --model M --out STORE`` (also
``clipdecomp run``); see :func:`run_main`.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from clipdecomp import store as _store
from clipdecomp.config import MAX_THREADS, check_size
from clipdecomp.store import Moments, StoreReader

log = logging.getLogger("clipdecomp.dataset")

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
)
LAYOUTS = ("auto", "folder", "classes", "list")

__all__ = [
    "ImageSource",
    "ModelSpec",
    "class_folders",
    "image_folder",
    "list_file",
    "model_identity",
    "open_source",
    "parse_layers",
    "run_dataset",
    "run_main",
]


# ----------------------------------------------------------------------------------------------
# sources


@dataclasses.dataclass
class ImageSource:
    """An ordered listing of images with optional integer labels.

    Attributes
    ----------
    layout : str
        ``"folder"`` (recursive image folder), ``"classes"`` (one sub-folder per class) or
        ``"list"`` (a list file, or a Python sequence of paths).
    root : str
        Absolute directory that relative ``paths`` are relative to.
    paths : list of str
        [N] paths as stored (relative to ``root`` unless absolute).
    labels : ndarray
        [N] int64, -1 where there is no label.
    classes : list of str or None
        Class names, label i is ``classes[i]``.

    Examples
    --------
    >>> src = open_source("imagenet/val")               # doctest: +SKIP
    >>> len(src), src.classes[:2]                       # doctest: +SKIP
    (50000, ['n01440764', 'n01443537'])
    """

    layout: str
    root: str
    paths: list
    labels: np.ndarray
    classes: list | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> str:
        """Absolute path of image i."""
        return os.path.join(self.root, self.paths[i])

    def listing_sha256(self) -> str:
        """SHA-256 of the ordered (path, label) listing and the class names."""
        h = hashlib.sha256()
        h.update(json.dumps([self.layout, self.classes]).encode())
        for p, lab in zip(self.paths, self.labels.tolist()):
            h.update(os.fsencode(p) + f"\t{lab}\n".encode())  # the name's bytes, UTF-8 or not
        return h.hexdigest()

    def file_stats(self, content_hash: bool = False) -> np.ndarray:
        """[N, 4] int64 per file: size, modification time (ns), and 128 bits of a BLAKE2b hash
        of its bytes when ``content_hash`` (else 0, 0); -1, -1, 0, 0 for a missing file.
        What a store records to notice a file replaced under the same name."""
        out = np.zeros((len(self), 4), np.int64)
        for i in range(len(self)):
            p = self.abspath(i)
            try:
                st = os.stat(p)
            except OSError:
                out[i, :2] = -1
                continue
            out[i, 0], out[i, 1] = st.st_size, st.st_mtime_ns
            if content_hash:
                h = hashlib.blake2b(digest_size=16)
                try:
                    with open(p, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
                except OSError:
                    out[i, :2] = -1
                    continue
                out[i, 2:] = np.frombuffer(h.digest(), np.int64)
        return out

    def describe(self) -> dict:
        return {
            "layout": self.layout,
            "root": self.root,
            "n": len(self),
            "listing_sha256": self.listing_sha256(),
            "classes": self.classes,
        }


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (file names on Linux may hold any
    bytes) written as ``\\xNN`` escapes. Valid names come back unchanged.

    Examples
    --------
    >>> printable_path(os.fsdecode(b"caf\\xe9.jpg"))
    'caf\\\\xe9.jpg'
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk_images(top: str, seen: dict | None = None) -> list[str]:
    """Image files under top (recursive, hidden entries skipped), sorted, relative to top.

    Links are followed, but every real directory is visited once (a link to a parent or a loop
    of links ends there) and every real file is listed once (by its real path). ``seen``
    (``{"dirs": set of (st_dev, st_ino), "files": set of real paths}``) may be shared between
    calls: what one call listed, the next one skips."""
    seen = {"dirs": set(), "files": set()} if seen is None else seen
    found: list[str] = []
    seen["dirs"].add(_dir_id(top))
    stack = [("", top, os.path.realpath(top))]
    while stack:
        rel, path, real = stack.pop()
        try:
            with os.scandir(path) as it:  # real entries first: they win over links to them
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))
        except OSError:
            continue  # unreadable folder: nothing to list
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                continue
            r = os.path.join(rel, e.name) if rel else e.name
            if is_dir:
                key = _dir_id(e.path)
                if key is None or key in seen["dirs"]:
                    continue
                seen["dirs"].add(key)
                subdirs.append((e.is_symlink(), r, e.path))
            elif _is_image(e.name):
                rp = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                if rp not in seen["files"]:
                    seen["files"].add(rp)
                    found.append(r)
        # real folders before linked ones, in name order (the stack pops the last first)
        for _, r, p in sorted(subdirs, reverse=True):
            stack.append((r, p, os.path.realpath(p)))
    return sorted(found)


def image_folder(root: str | os.PathLike) -> ImageSource:
    """Every image file under ``root`` (recursive, sorted by path), without labels.

    Examples
    --------
    >>> src = image_folder("photos")                    # doctest: +SKIP
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    paths = _walk_images(root)
    return ImageSource("folder", root, paths, np.full(len(paths), -1, np.int64))


def class_folders(root: str | os.PathLike) -> ImageSource:
    """One sub-folder per class (``root/<class>/**/<image>``); label = index of the class in
    the sorted list of sub-folder names (torchvision's ImageFolder convention).

    Examples
    --------
    >>> src = class_folders("imagenet/val"); src.classes[0]   # doctest: +SKIP
    'n01440764'
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory")
    classes = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    paths, labels = [], []
    # the root and every class folder belong to no other class, whatever links point at them
    seen: dict = {"dirs": {_dir_id(root)} | {_dir_id(os.path.join(root, c)) for c in classes},
                  "files": set()}
    for k, c in enumerate(classes):
        for p in _walk_images(os.path.join(root, c), seen):
            paths.append(os.path.join(c, p))
            labels.append(k)
    return ImageSource("classes", root, paths, np.asarray(labels, np.int64), classes)


def list_file(path: str | os.PathLike) -> ImageSource:
    """A text file with one image a line: ``path`` or ``path<TAB>label`` or ``path,label``.

    Relative paths are relative to the list file's folder. Labels that are all integers are
    used as they are; otherwise the label names are sorted into ``classes`` and numbered.
    Blank lines, lines starting with ``#`` and a ``path,label`` header are ignored; lines
    without a label get -1.

    Examples
    --------
    >>> src = list_file("val.tsv")                      # doctest: +SKIP
    """
    path = os.path.abspath(os.fspath(path))
    root = os.path.dirname(path)
    paths: list[str] = []
    raw: list[str | None] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # names as bytes
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line:
                p, lab = line.split("\t", 1)
            elif "," in line:
                p, lab = line.rsplit(",", 1)
            else:
                p, lab = line, None
            p = p.strip()
            lab = None if lab is None or not lab.strip() else lab.strip()
            if not paths and lab is not None and lab.lower() in ("label", "labels", "class") \
                    and p.lower() in ("path", "paths", "file", "filename", "image"):
                continue  # header line
            paths.append(p)
            raw.append(lab)
    named = [x for x in raw if x is not None]
    classes = None
    if all(_is_int(x) for x in named):
        labels = np.asarray([int(x) if x is not None else -1 for x in raw], np.int64)
    else:
        classes = sorted(set(named))
        index = {c: k for k, c in enumerate(classes)}
        labels = np.asarray([index[x] if x is not None else -1 for x in raw], np.int64)
    return ImageSource("list", root, paths, labels, classes)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def open_source(source: Any, layout: str = "auto") -> ImageSource:
    """Make an :class:`ImageSource` from a folder, a list file or a sequence of paths.

    Parameters
    ----------
    source : str, PathLike, sequence of paths, or ImageSource
    layout : {"auto", "folder", "classes", "list"}
        ``auto``: a file is a list file; a folder whose top level holds sub-folders and no
        image files is a class-per-folder layout; any other folder is an image folder.

    Examples
    --------
    >>> open_source("photos", layout="folder")          # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if isinstance(source, ImageSource):
        return source
    if not isinstance(source, (str, os.PathLike)):
        paths = [os.path.abspath(os.fspath(p)) for p in source]
        return ImageSource("list", "/", paths, np.full(len(paths), -1, np.int64))
    s = os.fspath(source)
    if not os.path.exists(s):
        raise ValueError(f"source {s} does not exist")
    if layout == "auto":
        if os.path.isfile(s):
            layout = "list"
        else:
            entries = [e for e in os.listdir(s) if not e.startswith(".")]
            has_dirs = any(os.path.isdir(os.path.join(s, e)) for e in entries)
            has_images = any(_is_image(e) and os.path.isfile(os.path.join(s, e)) for e in entries)
            layout = "classes" if has_dirs and not has_images else "folder"
    return {"folder": image_folder, "classes": class_folders, "list": list_file}[layout](s)


# ----------------------------------------------------------------------------------------------
# the model: spec, identity, layers


@dataclasses.dataclass
class ModelSpec:
    """How to load a model: ``loader(path, **kwargs)``; what Dask workers receive.

    Parameters
    ----------
    path : str
        Checkpoint path or model name, as for :func:`clipdecomp.load`.
    kwargs : dict
        Keyword arguments of the loader (``pretrained``, ``act``, ``threads``...).
    loader : callable or "module:function", optional
        Default :func:`clipdecomp.load`.

    Examples
    --------
    >>> spec = ModelSpec("ViT-B-16.safetensors", {"act": "quick_gelu"})   # doctest: +SKIP
    >>> model = spec.load()                                                # doctest: +SKIP
    """

    path: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    loader: Any = None

    def _loader(self) -> Callable:
        if self.loader is None:
            import clipdecomp

            return clipdecomp.load
        if isinstance(self.loader, str):
            mod, _, name = self.loader.partition(":")
            if not name:
                raise ValueError(f"loader must be 'module:function', not {self.loader!r}")
            return getattr(importlib.import_module(mod), name)
        return self.loader

    def load(self) -> Any:
        """Load the model."""
        return self._loader()(self.path, **self.kwargs)

    def key(self) -> str:
        """A string that identifies this spec (the per-worker cache key)."""
        ld = self.loader
        if callable(ld):
            ld = f"{getattr(ld, '__module__', '?')}:{getattr(ld, '__qualname__', repr(ld))}"
        return json.dumps([self.path, ld, self.kwargs], sort_keys=True, default=str)


def spec_of(model: Any) -> ModelSpec:
    """The :class:`ModelSpec` of a model: a spec or path as is, else the model's own record of
    its checkpoint (attribute ``spec``, or ``path`` plus ``load_kwargs`` and its activation).
    Run with it, a store checks that the workers' model has the config of this one."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ModelSpec(os.fspath(model))
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict) and "path" in spec:
        return ModelSpec(spec["path"], dict(spec.get("kwargs", {})), spec.get("loader"))
    path = _checkpoint_path(model)
    if path is None:
        raise ValueError(
            "Dask workers load the model themselves: pass a ModelSpec(path, kwargs) or a "
            "checkpoint path instead of a model object"
        )
    kwargs = dict(getattr(model, "load_kwargs", None) or {})
    act = getattr(getattr(model, "config", None), "act", None)
    if act is not None:
        kwargs.setdefault("act", act)  # whatever decided it at load time, the workers use it
    precision = getattr(model, "precision", "fp32")
    if precision != "fp32":
        kwargs.setdefault("precision", precision)  # the workers run the same numbers
    return ModelSpec(path, kwargs)


def _checkpoint_path(model: Any, spec: ModelSpec | None = None) -> str | None:
    for attr in ("checkpoint_path", "path", "checkpoint", "weights_path", "_path"):
        v = getattr(model, attr, None)
        if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
            return os.path.abspath(os.fspath(v))
    if spec is not None and os.path.isfile(spec.path):
        return os.path.abspath(spec.path)
    return None


def checkpoint_fingerprint(path: str | os.PathLike, samples: int = 16, block: int = 1 << 16) -> dict:
    """Name, size and a fingerprint of a checkpoint file: SHA-256 of its size, its first 1 MiB
    (the safetensors header and more) and ``samples`` blocks spread over the rest, the last
    one ending the file. Cheap for multi-GB files, and tells apart checkpoints that share a
    header but not their weights (fine-tunes change every block; a change confined to bytes
    between the sampled blocks would go unseen).

    Examples
    --------
    >>> checkpoint_fingerprint("model.safetensors")["size"]   # doctest: +SKIP
    """
    from clipdecomp.safetensors_io import file_fingerprint

    path = os.fspath(path)
    size, digest = file_fingerprint(path, samples, block)
    return {"name": os.path.basename(path), "size": size, "fingerprint": digest}


def model_identity(model: Any, spec: ModelSpec | None = None) -> dict:
    """What a store records about its model: config dict and checkpoint name/size/fingerprint.

    Examples
    --------
    >>> model_identity(model)["config"]["layers"]      # doctest: +SKIP
    12
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("the model has no .config")
    path = _checkpoint_path(model, spec)
    out = {
        "config": _store.jsonable(cfg),
        "precision": str(getattr(model, "precision", "fp32")),
        "checkpoint": checkpoint_fingerprint(path) if path else None,
    }
    if spec is not None:
        out["spec"] = {"path": spec.path, "kwargs": _store.jsonable(spec.kwargs)}
    return out


def parse_layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    """Normalise a layer selection to sorted, unique, non-negative layer indices.

    Parameters
    ----------
    layers : None, int, slice, sequence of int, or str
        None: all layers. Strings: comma-separated ints and Python slices, e.g. ``"-4:"``,
        ``"0,5,-1"``, ``"8:12"``. Negative numbers count from the end.
    n_layers : int
        L.

    Examples
    --------
    >>> parse_layers("-4:", 12)
    (8, 9, 10, 11)
    >>> parse_layers([0, -1], 12)
    (0, 11)
    """
    L = int(n_layers)
    if layers is None:
        return tuple(range(L))
    items: list[Any]
    if isinstance(layers, str):
        items = []
        for tok in layers.replace(" ", "").split(","):
            if not tok:
                continue
            if ":" in tok:
                parts = [int(p) if p else None for p in tok.split(":")]
                if len(parts) > 3:
                    raise ValueError(f"bad layer slice {tok!r}")
                items.append(slice(*parts))
            else:
                items.append(int(tok))
    elif isinstance(layers, (int, np.integer, slice)):
        items = [layers]
    else:
        items = list(layers)
    out = set()
    for it in items:
        if isinstance(it, slice):
            out.update(range(L)[it])
            continue
        i = int(it)
        if not -L <= i < L:
            raise ValueError(f"layer {i} is out of range for a model with {L} layers")
        out.add(i + L if i < 0 else i)
    if not out:
        raise ValueError(f"the layer selection {layers!r} selects no layer")
    return tuple(sorted(out))


def _check_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
    return name


# ----------------------------------------------------------------------------------------------
# decoding and computing chunks (shared by the local run and the Dask workers)


@dataclasses.dataclass
class ChunkTask:
    """Chunk ``index`` covers rows [start, start + len(paths)); paths are absolute."""

    index: int
    start: int
    paths: list


@dataclasses.dataclass
class ChunkResult:
    """One computed chunk: float32 rows (heads of the kept layers only), validity, errors, and
    its statistics (second moments not yet added: see :meth:`finish`)."""

    index: int
    start: int
    arrays: dict
    ok: np.ndarray
    errors: list
    moments: Moments
    seconds: float = 0.0

    def finish(self) -> None:
        """Add the second moments of the kept heads (float32 values, before storage)."""
        self.moments.add_outer(self.arrays["heads"])

    @property
    def n_ok(self) -> int:
        return int(np.count_nonzero(self.ok))


def load_image(preprocess: Callable, path: str) -> tuple[np.ndarray | None, str]:
    """Decode one image and preprocess it: (pixels [3, S, S] float32, "") or (None, why).

    The model's preprocessing decodes the file (whole: truncated files fail here), scaling
    high bit depths and decoding large JPEGs at reduced size
    (:func:`clipdecomp.preprocess.load_image`)."""
    try:
        px = np.asarray(preprocess([path]), dtype=np.float32)
        if px.ndim == 4:
            px = px[0]
        if not np.all(np.isfinite(px)):
            return None, "preprocessing gave non-finite pixels"
        return px, ""
    except Exception as e:  # noqa: BLE001 - any failure on one file skips that file only
        msg = printable_path(str(e).replace("\n", " "))
        return None, f"{type(e).__name__}: {msg}"


def _decompose_options(model: Any, n: int) -> dict:
    """One model call per batch, and no copy of the pixels kept in the result."""
    try:
        params = inspect.signature(model.decompose).parameters
    except (TypeError, ValueError):
        return {}
    has_var = any(p.kind is p.VAR_KEYWORD for p in params.values())
    opts = {"batch_size": n, "keep_pixels": False}
    return {k: v for k, v in opts.items() if has_var or k in params}


def _decompose(model: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    dec = model.decompose(pixels, **_decompose_options(model, len(pixels)))
    return {
        "embedding": np.asarray(dec.embedding, np.float32),
        "heads": np.asarray(dec.heads, np.float32),
        "mlps": np.asarray(dec.mlps, np.float32),
        "cls_to_cls": np.asarray(dec.cls_to_cls, np.float32),
    }


def iter_chunk_results(
    model: Any,
    tasks: Iterable[ChunkTask],
    batch_size: int,
    kept: Sequence[int],
    pool: cf.Executor,
    prefetch: int = 2,
    on_batch: Callable[[int, int], None] | None = None,
    lock: Any = None,
) -> Iterator[ChunkResult]:
    """Compute chunks in order, decoding the next ``prefetch`` batches in ``pool`` meanwhile.

    Memory is one chunk's float32 rows plus ``prefetch + 1`` batches of pixels, whatever the
    number of images. ``on_batch(n_images, n_skipped)`` is called after every batch; ``lock``
    (optional) is held around each model call.
    """
    cfg = model.config
    L, H, D = int(cfg.layers), int(cfg.heads), int(cfg.embed_dim)
    kept = list(kept)
    pre = model.preprocess

    def batches():
        for t in tasks:
            for b0 in range(0, len(t.paths), batch_size):
                b1 = min(len(t.paths), b0 + batch_size)
                yield t, b0, b1

    queue: collections.deque = collections.deque()
    it = batches()

    def fill():
        while len(queue) < prefetch + 1:
            nxt = next(it, None)
            if nxt is None:
                return
            t, b0, b1 = nxt
            queue.append((t, b0, b1, [pool.submit(load_image, pre, p) for p in t.paths[b0:b1]]))

    cur = None
    fill()
    while queue:
        t, b0, b1, futs = queue.popleft()
        fill()
        if cur is None or cur.index != t.index:
            n = len(t.paths)
            cur = ChunkResult(
                index=t.index,
                start=t.start,
                arrays={
                    "embedding": np.zeros((n, D), np.float32),
                    "heads": np.zeros((n, len(kept), H, D), np.float32),
                    "mlps": np.zeros((n, L + 1, D), np.float32),
                    "cls_to_cls": np.zeros((n, L, D), np.float32),
                },
                ok=np.zeros(n, bool),
                errors=[""] * n,
                moments=Moments(L, H, D, kept),
            )
            t0 = time.perf_counter()
        loaded = [f.result() for f in futs]
        good = [i for i, (px, _) in enumerate(loaded) if px is not None]
        for i, (_, err) in enumerate(loaded):
            if err:
                cur.errors[b0 + i] = err
        if good:
            pixels = np.stack([loaded[i][0] for i in good])
            if lock is not None:
                with lock:
                    out = _decompose(model, pixels)
            else:
                out = _decompose(model, pixels)
            finite = np.ones(len(good), bool)
            for v in out.values():
                finite &= np.isfinite(v.reshape(len(good), -1)).all(1)
            rows = np.asarray([b0 + i for i in good])
            for j in np.nonzero(~finite)[0]:
                cur.errors[rows[j]] = "the model gave non-finite outputs"
            rows, sel = rows[finite], np.nonzero(finite)[0]
            if len(rows):
                a = cur.arrays
                a["embedding"][rows] = out["embedding"][sel]
                a["heads"][rows] = out["heads"][sel][:, kept]
                a["mlps"][rows] = out["mlps"][sel]
                a["cls_to_cls"][rows] = out["cls_to_cls"][sel]
                cur.ok[rows] = True
                cur.moments.add_rows(
                    out["embedding"][sel], out["heads"][sel], out["mlps"][sel],
                    out["cls_to_cls"][sel],
                )
        if on_batch is not None:
            on_batch(b1 - b0, (b1 - b0) - int(np.count_nonzero(cur.ok[b0:b1])))
        if b1 == len(t.paths):
            cur.seconds = time.perf_counter() - t0
            yield cur
            cur = None


# ----------------------------------------------------------------------------------------------
# store preparation and commits (shared by the local run and the Dask client)


class RunState:
    """The store of one run: what is done, the running statistics, and when to commit them."""

    def __init__(self, out: str, meta: dict, kept: tuple, checkpoint_seconds: float | None):
        self.out = out
        self.meta = meta
        self.kept = kept
        self.moments, self.included, self.generation = _store.load_committed(out, kept)
        digests = _store.load_digests(out)
        self.has_digests = digests is not None
        self.digests = digests if digests is not None else [""] * len(self.included)
        self.rewrite: set[int] = set()   # finished chunks whose files failed verification
        self.pending: list[int] = []
        if checkpoint_seconds is None:  # small statistics: commit after every chunk
            checkpoint_seconds = 0.0 if self.moments.nbytes <= (64 << 20) else 120.0
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.last_commit = time.monotonic()
        self.rows_done = 0
        self.rows_ok = 0
        self.skipped: list[tuple[int, str, str]] = []

    @property
    def chunk_size(self) -> int:
        return int(self.meta["settings"]["chunk_size"])

    def verify(self, n: int) -> None:
        """Check the files of every finished chunk against the digest recorded when it was
        written (stores without digests: that they decode); the chunks that fail are computed
        again, their rows only (their statistics were committed from the values computed, not
        from the files), and a warning says which and why."""
        if not self.included.any():
            return
        root = _store._zarr().open_group(self.out, mode="r")
        C, bad = self.chunk_size, []
        for c in np.nonzero(self.included)[0].tolist():
            s, e = c * C, min(n, c * C + C)
            try:
                got = _store.read_digest(root, s, e - s)
            except Exception as ex:  # noqa: BLE001 - any failure to read is a bad chunk
                bad.append((c, s, e, (f"its files cannot be read ({type(ex).__name__}: "
                                     f"{str(ex)[:200]})")))
                continue
            want = self.digests[c]
            if want and got != want:
                bad.append((c, s, e, ("its files differ from the checksum recorded when it was "
                                     "written (a chunk file deleted, truncated or changed)")))
        if bad:
            self.rewrite = {c for c, *_ in bad}
            lines = "; ".join(f"chunk {c} (rows {s}..{e - 1}): {why}" for c, s, e, why in bad)
            warnings.warn(f"{self.out}: {len(bad)} finished chunk(s) are computed again: "
                          f"{lines}", UserWarning, stacklevel=3)
            log.warning("recomputing chunks %s of %s", sorted(self.rewrite), self.out)

    def tasks(self, source: ImageSource) -> Iterator[ChunkTask]:
        """The chunks not yet done (or to be written again), in order (made as needed)."""
        C, N = self.chunk_size, len(source)
        todo = ~self.included
        todo[list(self.rewrite)] = True
        for c in np.nonzero(todo)[0].tolist():
            s, e = c * C, min(N, c * C + C)
            yield ChunkTask(c, s, [source.abspath(i) for i in range(s, e)])

    def rows_to_do(self, n: int) -> int:
        """Rows in the chunks not yet done (n = number of rows of the store)."""
        C = self.chunk_size
        left = ~self.included
        left[list(self.rewrite)] = True
        todo = int(np.count_nonzero(left)) * C
        if len(left) and left[-1]:
            todo -= len(left) * C - n  # the last chunk is short
        return todo

    def add(self, index: int, moments: Moments, ok: np.ndarray, errors: list, paths: list,
            start: int, digest: str = "") -> None:
        """Fold a finished (written) chunk in; commit when due."""
        if index in self.rewrite:   # a finished chunk written again: the same rows
            self.rewrite.discard(index)
            self.rows_done += len(ok)
            self.rows_ok += int(np.count_nonzero(ok))
        if self.included[index] or index in self.pending:
            return  # never count a chunk's statistics twice
        self.digests[index] = digest
        self.moments.merge(moments)
        self.pending.append(index)
        self.rows_done += len(ok)
        self.rows_ok += int(np.count_nonzero(ok))
        for i, e in enumerate(errors):
            if e:
                self.skipped.append((start + i, paths[i], e))
        if time.monotonic() - self.last_commit >= self.checkpoint_seconds:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        inc = self.included.copy()
        inc[self.pending] = True
        _store.commit(self.out, self.moments, inc, self.generation + 1,
                      self.digests if self.has_digests else None)
        self.included, self.generation, self.pending = inc, self.generation + 1, []
        self.last_commit = time.monotonic()


def prepare_store(
    out: str | os.PathLike,
    identity: dict,
    source: ImageSource,
    dtype: str,
    layers: Any,
    chunk_size: int,
    overwrite: bool = False,
    checkpoint_seconds: float | None = None,
    content_hash: bool = False,
) -> RunState:
    """Create the store, or check that an existing one matches this run and open it.

    An existing store must list the same source files, unchanged since it was made (size and
    modification time; also their bytes when it was made with ``content_hash``), and its
    finished chunks are checked against the digests recorded when they were written
    (:meth:`RunState.verify`). The caller holds the store's lock (:func:`store_lock`)."""
    out = os.fspath(out)
    cfg = identity["config"]
    L, H, D = int(cfg["layers"]), int(cfg["heads"]), int(cfg["embed_dim"])
    kept = parse_layers(layers, L)
    chunk_size = check_size(chunk_size, "chunk_size")
    N = len(source)
    meta = {
        "format": _store.FORMAT,
        "version": _store.FORMAT_VERSION,
        "model": identity,
        "settings": {"dtype": dtype, "layers": list(kept), "chunk_size": int(chunk_size)},
        "source": source.describe(),
        "shapes": {
            "n": N, "layers": L, "heads": H, "embed_dim": D,
            "n_chunks": (N + int(chunk_size) - 1) // int(chunk_size),
        },
        "created": _store._now(),
    }
    if not overwrite and _store.is_store(out):
        stored = StoreReader(out).metadata
        _store.compare_metadata(stored, _store.jsonable(meta), f"the store {out}")
        meta = stored
        if "files_sha256" in stored["source"]:   # stores made before it was recorded: not known
            _check_files(out, stored, source)
        state = RunState(out, meta, kept, checkpoint_seconds)
        state.verify(N)
        return state
    stats = source.file_stats(content_hash)
    meta["source"]["content_hash"] = bool(content_hash)
    meta["source"]["files_sha256"] = hashlib.sha256(stats.tobytes()).hexdigest()
    overwrite = overwrite or _store.is_unfinished_store(out)
    _store.create_store(out, _store.jsonable(meta), [printable_path(p) for p in source.paths],
                        source.labels, overwrite, file_stat=stats)
    return RunState(out, meta, kept, checkpoint_seconds)


def _check_files(out: str, stored: dict, source: ImageSource) -> None:
    """Refuse to resume a store whose source files changed since it was made, naming them."""
    content = bool(stored["source"].get("content_hash"))
    now = source.file_stats(content)
    if hashlib.sha256(now.tobytes()).hexdigest() == stored["source"]["files_sha256"]:
        return
    then = np.asarray(_store._zarr().open_group(out, mode="r")["file_stat"][...], np.int64)
    changed = np.nonzero((then != now).any(axis=1))[0]
    lines = []
    for i in changed[:5].tolist():
        if now[i, 0] < 0 or then[i, 0] < 0:
            why = "missing now" if now[i, 0] < 0 else "missing then"
        elif now[i, 0] != then[i, 0]:
            why = f"size {then[i, 0]} then, {now[i, 0]} now"
        elif now[i, 1] != then[i, 1]:
            why = f"modification time {then[i, 1]} ns then, {now[i, 1]} ns now"
        else:
            why = "same size and time, other content"
        lines.append(f"{printable_path(source.paths[i])} ({why})")
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    raise ValueError(
        f"the store {out}: {len(changed)} source file(s) changed since the store was made: "
        f"{'; '.join(lines)}{more}. Its rows and statistics hold the old images: write to a "
        "new store, or pass overwrite=True (--overwrite) to start this one again.")


def _summary(state: RunState, seconds: float, mode: str, batch_size: int, n_total: int,
             interrupted: bool) -> dict:
    done = int(np.count_nonzero(state.included))
    return {
        "finished": _store._now(),
        "mode": mode,
        "interrupted": interrupted,
        "images": state.rows_done,
        "valid": state.rows_ok,
        "skipped": len(state.skipped),
        "seconds": round(seconds, 3),
        "images_per_s": round(state.rows_done / seconds, 3) if seconds > 0 else None,
        "batch_size": batch_size,
        "chunks_done": done,
        "chunks_total": int(state.meta["shapes"]["n_chunks"]),
        "rows_total": n_total,
        "host": platform.node(),
    }


def _print_summary(s: dict, out: str) -> None:
    from tqdm.auto import tqdm

    rate = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "-"
    tqdm.write(
        f"clipdecomp: {s['images']} images done ({s['skipped']} skipped) in "
        f"{s['seconds']:.1f} s, {rate}; {s['chunks_done']}/{s['chunks_total']} chunks of "
        f"{out} finished",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------------
# the runner


def run_dataset(
    model: Any,
    source: Any,
    out: str | os.PathLike,
    chunk_size: int = 256,
    batch_size: int = 8,
    dtype: str = "float32",
    layers: Any = None,
    progress: bool = True,
    client: Any = None,
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    layout: str = "auto",
    decode_threads: int | None = None,
    checkpoint_seconds: float | None = None,
    overwrite: bool = False,
    content_hash: bool = False,
) -> StoreReader:
    """Decompose every image of a collection into a Zarr store; resume it if it exists.

    Parameters
    ----------
    model : CLIP, ModelSpec or str
        A loaded model, or how to load one (required for Dask: workers load their own).
    source : str, PathLike, sequence of paths or ImageSource
        Image folder (recursive), class-per-folder layout, or list file (see
        :func:`open_source`).
    out : str or PathLike
        The store directory. If it holds a store made with the same model, settings and
        listing, finished chunks are kept and the rest computed; a store made otherwise is
        refused with a ValueError naming the field that differs.
    chunk_size : int
        Images per chunk: the unit of writing, of resuming and of Dask tasks. Memory per
        process is about ``chunk_size * (Lk*H + 2L + 2) * D * 4`` bytes.
    batch_size : int
        Images per model call.
    dtype : {"float32", "float16"}
        Storage type of the float arrays; statistics always use the float32 values.
    layers : None, int, slice, sequence or str
        Layers whose heads are stored and get second moments (see :func:`parse_layers`);
        None keeps all. Means of all heads are kept whatever this says. The second moments
        take ``Lk * H * D * D * 8`` bytes (ViT-B/16, all 12 layers: 302 MB; ViT-H/14: 512 MB
        a layer) in the process, and once more per chunk in flight on Dask: keep the layers
        you will analyse (TextSpan uses the last four).
    progress : bool
        Show a tqdm bar (notebook-aware) and print a summary at the end.
    client : distributed.Client, optional
        Run the chunks on this Dask cluster.
    scheduler : str, optional
        Address of a Dask scheduler ("tcp://host:8786") to connect to.
    workers : int, optional
        Start a local Dask cluster with this many single-threaded worker processes.
    layout : {"auto", "folder", "classes", "list"}
        How to read ``source``.
    decode_threads : int, optional
        Threads decoding images ahead of the model (default min(4, CPUs)).
    checkpoint_seconds : float, optional
        Least time between two commits of the statistics (default: every chunk when the
        statistics take under 64 MiB, else 120 s). Work since the last commit is redone on resume.
    overwrite : bool
        Replace whatever is at ``out``.
    content_hash : bool
        Record a hash of every source file's bytes (reads every file once more when the store
        is made and on every resume). Without it, resuming checks each file's size and
        modification time only.

    Returns
    -------
    StoreReader
        The store, opened for reading; ``.runs[-1]`` is this run's summary.

    Skipped images (unreadable, truncated, not an image) keep their row with zeros and
    ``ok == False``; ``StoreReader.skipped()`` lists them with the reason.

    Resuming checks that the store is the one this run would make (model, precision,
    settings, listing), that no source file changed since it was made (else ValueError
    naming the files), and that the files of every finished chunk still hold what was written
    (a chunk that fails is computed again, with a warning naming it). One run at a time:
    another run on the same store raises :class:`clipdecomp.store.StoreBusyError` (a
    RuntimeError) naming the process that holds it.

    Examples
    --------
    >>> model = clipdecomp.load("ViT-B-16")                                  # doctest: +SKIP
    >>> st = run_dataset(model, "imagenet/val", "val.zarr", layers="-4:")    # doctest: +SKIP
    >>> st.stats.mean_heads.shape                                            # doctest: +SKIP
    (12, 12, 512)
    """
    out = os.fspath(out)
    dtype = _check_dtype(dtype)
    src = open_source(source, layout)
    if len(src) == 0:
        raise ValueError(f"no images found in {source!r} (layout {src.layout!r})")
    chunk_size = check_size(chunk_size, "chunk_size")
    batch_size = check_size(batch_size, "batch_size")
    if decode_threads is not None:
        decode_threads = check_size(decode_threads, "decode_threads", maximum=MAX_THREADS)
    if workers is not None:
        workers = check_size(workers, "workers")
    if client is not None or scheduler is not None or workers:
        from clipdecomp import distributed as _dist

        expected = None
        if not isinstance(model, (ModelSpec, str, os.PathLike)):
            expected = _store.jsonable(model.config)
        return _dist.run_distributed(
            spec_of(model), src, out, expected_config=expected, chunk_size=chunk_size,
            batch_size=batch_size, dtype=dtype, layers=layers, progress=progress, client=client,
            scheduler=scheduler, workers=workers, decode_threads=decode_threads,
            checkpoint_seconds=checkpoint_seconds, overwrite=overwrite,
            content_hash=content_hash,
            expected_precision=None if expected is None else str(model.precision),
        )
    spec = None
    if isinstance(model, (ModelSpec, str, os.PathLike)):
        spec = spec_of(model)
        model = spec.load()
    identity = model_identity(model, spec)
    with _store.store_lock(out):
        return _run_local(model, src, out, identity, dtype, layers, chunk_size, batch_size,
                          overwrite, checkpoint_seconds, content_hash, decode_threads, progress)


def _run_local(model, src, out, identity, dtype, layers, chunk_size, batch_size, overwrite,
               checkpoint_seconds, content_hash, decode_threads, progress) -> StoreReader:
    """The local run of :func:`run_dataset`, with the store's lock held."""
    state = prepare_store(out, identity, src, dtype, layers, chunk_size, overwrite,
                          checkpoint_seconds, content_hash)
    tasks = state.tasks(src)
    todo = state.rows_to_do(len(src))
    n_threads = decode_threads or min(4, os.cpu_count() or 1)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(src), initial=len(src) - todo, unit="img", disable=not progress,
               desc="clipdecomp", dynamic_ncols=True)
    root = _store._zarr().open_group(out, mode="r+")
    t0 = time.perf_counter()
    interrupted = True
    skipped_seen = [0]

    def on_batch(n: int, skipped: int) -> None:
        skipped_seen[0] += skipped
        bar.update(n)
        if skipped:
            bar.set_postfix(skipped=skipped_seen[0])

    def finish(res: ChunkResult) -> None:  # runs in the writer thread
        res.finish()
        digest = _store.write_rows(root, res.start, res.arrays, res.ok, res.errors)
        state.add(res.index, res.moments, res.ok, res.errors,
                  [src.paths[i] for i in range(res.start, res.start + len(res.ok))], res.start,
                  digest)

    pool = cf.ThreadPoolExecutor(n_threads, thread_name_prefix="clipdecomp-decode")
    writer = cf.ThreadPoolExecutor(1, thread_name_prefix="clipdecomp-write")
    pending: cf.Future | None = None
    try:
        for res in iter_chunk_results(model, tasks, int(batch_size), state.kept, pool,
                                      on_batch=on_batch):
            if pending is not None:
                pending.result()
            pending = writer.submit(finish, res)
        if pending is not None:
            pending.result()
            pending = None
        interrupted = False
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if pending is not None:
            with contextlib.suppress(Exception):  # the original error is the one to raise
                pending.result()
        writer.shutdown(wait=True)
        state.commit()  # whatever was written and summed stays done (Ctrl-C in a notebook)
        bar.close()
        summary = _summary(state, time.perf_counter() - t0, "local", int(batch_size),
                           len(src), interrupted)
        _store.append_run(out, summary)
        if progress:
            _print_summary(summary, out)
    log.info("run finished: %s", summary)
    return StoreReader(out)


# ----------------------------------------------------------------------------------------------
# command line


def add_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``clipdecomp run`` to a parser (for clipdecomp.cli)."""
    p.add_argument("source", help="image folder, class-per-folder root, or list file")
    p.add_argument("--model", required=True, help="checkpoint path or model name")
    p.add_argument("--out", required=True, help="the Zarr store to write or resume")
    p.add_argument("--pretrained", default=None, help="pretrained tag, as for clipdecomp.load")
    p.add_argument("--act", default=None, choices=["gelu", "quick_gelu"],
                   help="MLP activation, as for clipdecomp.load")
    p.add_argument("--threads", type=int, default=None, help="compute threads per process")
    p.add_argument("--loader", default=None, metavar="MODULE:FUNCTION",
                   help="load the model with FUNCTION(path, **kwargs) instead of clipdecomp.load")
    p.add_argument("--layout", default="auto", choices=LAYOUTS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    p.add_argument("--layers", default=None,
                   help="layers whose heads to keep, e.g. -4: (the last four) or 0,5,11 "
                   "(default all)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on the Dask cluster of this scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of N worker processes")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--checkpoint-seconds", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--content-hash", action="store_true",
                   help="record a hash of every source file (resume then checks the bytes, "
                   "not only size and modification time)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``clipdecomp run`` from parsed arguments; returns the exit status."""
    try:
        if args.threads is not None:
            check_size(args.threads, "--threads", maximum=MAX_THREADS)
    except ValueError as e:
        print(f"clipdecomp run: error: {e}", file=sys.stderr)
        return 2
    kwargs = {k: v for k, v in (("pretrained", args.pretrained), ("act", args.act),
                                ("threads", args.threads)) if v is not None}
    spec = ModelSpec(args.model, kwargs, args.loader)
    try:
        run_dataset(
            spec, args.source, args.out, chunk_size=args.chunk_size, batch_size=args.batch_size,
            dtype=args.dtype, layers=args.layers, progress=not args.no_progress,
            scheduler=args.scheduler, workers=args.workers, layout=args.layout,
            decode_threads=args.decode_threads, checkpoint_seconds=args.checkpoint_seconds,
            overwrite=args.overwrite, content_hash=args.content_hash,
        )
    except (ValueError, _store.StoreBusyError) as e:
        print(f"clipdecomp run: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp run SOURCE --model M --out STORE [options]``; returns the exit status.

    Examples
    --------
    >>> run_main(["photos", "--model", "ViT-B-16", "--out", "photos.zarr"])   # doctest: +SKIP
    0
    """
    p = argparse.ArgumentParser(
        prog="clipdecomp run",
        description="Decompose an image collection into a Zarr store (resumes if it exists).",
    )
    add_run_arguments(p)
    return run_from_args(p.parse_args(_join_layers(argv)))


def _join_layers(argv: Sequence[str] | None) -> list[str]:
    """Let ``--layers -4:`` through argparse (which reads ``-4:`` as an option)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--layers" and i + 1 < len(argv) and argv[i + 1][:2].lstrip("-")[:1].isdigit():
            out.append(f"--layers={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


if __name__ == "__main__":
    from clipdecomp.dataset import run_main as _run_main  # the importable copy, for pickling

    sys.exit(_run_main())
