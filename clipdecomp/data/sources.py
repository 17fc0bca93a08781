"""Image collections: an ordered listing of image files with optional labels, and decoding.

Three layouts are read: a folder of images (recursive), one sub-folder per class, or a list file
(one path a line, optionally a label). :func:`open_source` picks one.

>>> src = open_source("photos")            # doctest: +SKIP
>>> len(src), src.layout                    # doctest: +SKIP
(1000, 'folder')
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
)
LAYOUTS = ("auto", "folder", "classes", "list")
# layouts of clipdecomp.data.sources_extra: the reference's data sets in their official layouts
EXTRA_LAYOUTS = ("imagenet-val", "cifar10", "cifar100", "waterbirds")
_VIRTUAL = "::"  # "<pickle file>::<row>": an image inside a pickled array (CIFAR)

__all__ = [
    "EXTRA_LAYOUTS",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "ImageSource",
    "class_folders",
    "image_folder",
    "list_file",
    "load_image",
    "open_source",
]


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
    layout : {"auto", "folder", "classes", "list", "imagenet-val", "cifar10", "cifar100", \
"waterbirds"}
        ``auto``: a file is a list file; a folder whose top level holds sub-folders and no
        image files is a class-per-folder layout; any other folder is an image folder. The
        last four are the official layouts of :mod:`clipdecomp.data.sources_extra`.

    Examples
    --------
    >>> open_source("photos", layout="folder")          # doctest: +SKIP
    """
    if layout not in LAYOUTS + EXTRA_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS + EXTRA_LAYOUTS}, not {layout!r}")
    if isinstance(source, ImageSource):
        return source
    if layout in EXTRA_LAYOUTS:
        from clipdecomp.data.sources_extra import open_extra

        return open_extra(source, layout)
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


def load_image(preprocess: Callable, path: str) -> tuple[np.ndarray | None, str]:
    """Decode one image and preprocess it: (pixels [3, S, S] float32, "") or (None, why).

    The model's preprocessing decodes the file (whole: truncated files fail here), scaling
    high bit depths and decoding large JPEGs at reduced size
    (:func:`clipdecomp.engine.preprocess.load_image`). A row of a pickled array (CIFAR,
    ``<file>::<row>``) is read by :func:`clipdecomp.data.sources_extra.read_virtual_image`."""
    try:
        if _VIRTUAL in os.path.basename(path):  # a row of a pickled array (CIFAR)
            from PIL import Image

            from clipdecomp.data.sources_extra import read_virtual_image

            item: Any = Image.fromarray(read_virtual_image(path))
        else:
            item = path
        px = np.asarray(preprocess([item]), dtype=np.float32)
        if px.ndim == 4:
            px = px[0]
        if not np.all(np.isfinite(px)):
            return None, "preprocessing gave non-finite pixels"
        return px, ""
    except Exception as e:  # noqa: BLE001 - any failure on one file skips that file only
        msg = printable_path(str(e).replace("\n", " "))
        return None, f"{type(e).__name__}: {msg}"
