"""Data-set sources in the layouts the paper's experiments read them from.

Each function returns an :class:`~clipdecomp.data.sources.ImageSource` whose rows come in the order
the reference code (torchvision's data sets) sees them, so that stores and the ``.npy`` files of
:func:`clipdecomp.data.reference.write_reference_npy` line up row for row with the reference's:

:func:`imagenet_val`
    The ImageNet validation set in its official layout: 50,000 ``ILSVRC2012_val_*.JPEG`` files
    in one folder and the development kit's labels (``ILSVRC2012_validation_ground_truth.txt``
    + ``meta.mat``). Classes are the WordNet ids sorted (torchvision's ImageNet), rows sorted
    by class then file name (so image i has label ``i // 50``, as the reference assumes).
:func:`cifar`
    CIFAR-10 / CIFAR-100 from their Python pickles (``cifar-10-batches-py``,
    ``cifar-100-python``), read with an unpickler that builds only plain containers and NumPy
    arrays (:func:`safe_load_pickle`): a pickle file can run any code when loaded the usual
    way. Rows are virtual paths ``<batch file>::<row>`` that :func:`read_virtual_image` decodes.
:func:`waterbirds`
    The binary Waterbirds layout (``metadata.csv`` with ``img_filename``, ``y``, ``split``,
    ``place``); see :mod:`clipdecomp.data.waterbirds`.

``clipdecomp run SOURCE --layout imagenet-val|cifar10|cifar100|waterbirds`` uses them.

Shapes: N images.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from clipdecomp.data.sources import _VIRTUAL, EXTRA_LAYOUTS, ImageSource, _is_image

__all__ = [
    "EXTRA_LAYOUTS",
    "VIRTUAL_SEPARATOR",
    "cifar",
    "imagenet_val",
    "open_extra",
    "read_virtual_image",
    "safe_load_pickle",
    "waterbirds",
]

VIRTUAL_SEPARATOR = _VIRTUAL
_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


# ----------------------------------------------------------------------------------------------
# ImageNet validation, official layout

def _find(root: Path, name: str, devkit: Path | None) -> Path | None:
    for base in [p for p in (devkit, root) if p is not None]:
        for cand in (base / name, base / "data" / name,
                     base / "ILSVRC2012_devkit_t12" / "data" / name):
            if cand.is_file():
                return cand
    return None


def _synsets_from_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WordNet id of the 1,000 leaf classes, from the devkit's meta.mat."""
    try:
        import scipy.io
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs scipy (pip install scipy), or give a "
                          "map_clsloc.txt beside it") from e
    meta = scipy.io.loadmat(os.fspath(path), squeeze_me=True)
    if "synsets" not in meta:
        raise ValueError(f"{path} has no 'synsets' table: not an ImageNet devkit meta.mat")
    syn = np.atleast_1d(meta["synsets"])
    names = syn.dtype.names or ()
    for field in ("ILSVRC2012_ID", "WNID"):
        if field not in names:
            raise ValueError(f"{path}: synsets lack the field {field!r}")
    out = {}
    for row in syn:
        children = int(row["num_children"]) if "num_children" in names else 0
        if children == 0:
            out[int(row["ILSVRC2012_ID"])] = str(row["WNID"])
    return out


def _synsets_from_txt(path: Path) -> dict[int, str]:
    """``WNID ID name`` a line (the devkit's map_clsloc.txt) -> ID -> WNID."""
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{path}, line {i + 1}: expected 'WNID ID name', got {line!r}")
        out[int(parts[1])] = parts[0]
    return out


def imagenet_val(root: str | os.PathLike, devkit: str | os.PathLike | None = None
                 ) -> ImageSource:
    """The ImageNet validation set in its official layout, labelled from the devkit.

    Parameters
    ----------
    root : path
        The folder of the 50,000 ``ILSVRC2012_val_XXXXXXXX.JPEG`` files (any number, for a
        subset: the k-th file of the sorted listing takes line k of the ground truth by its
        number ``XXXXXXXX``).
    devkit : path, optional
        The development kit folder (``ILSVRC2012_devkit_t12``) or its ``data`` folder.
        Default: looked for in ``root`` and ``root/ILSVRC2012_devkit_t12``. It must hold
        ``ILSVRC2012_validation_ground_truth.txt`` (the ILSVRC2012_ID of each image, one a
        line) and ``meta.mat`` (read with scipy) or ``map_clsloc.txt`` (``WNID ID name``).

    Returns
    -------
    ImageSource
        ``classes``: the 1,000 WordNet ids sorted; rows sorted by (class, file name), as
        torchvision's ``ImageNet(split="val")`` lists them.

    Examples
    --------
    >>> src = imagenet_val("ILSVRC2012_img_val", devkit="ILSVRC2012_devkit_t12")  # doctest: +SKIP
    >>> src.classes[0], src.labels[:3]                                         # doctest: +SKIP
    ('n01440764', array([0, 0, 0]))
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    dk = None if devkit is None else Path(devkit).resolve()
    if dk is not None and not dk.is_dir():
        raise ValueError(f"devkit {dk} is not a directory")
    gt_path = _find(root, _GROUND_TRUTH, dk)
    if gt_path is None:
        raise ValueError(f"no {_GROUND_TRUTH} in {dk or root} (give devkit=)")
    meta = _find(root, "meta.mat", dk)
    txt = _find(root, "map_clsloc.txt", dk)
    if meta is not None:
        id_to_wnid = _synsets_from_meta(meta)
    elif txt is not None:
        id_to_wnid = _synsets_from_txt(txt)
    else:
        raise ValueError(f"no meta.mat or map_clsloc.txt in {dk or gt_path.parent}")
    truth = [ln.strip() for ln in gt_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        truth_ids = [int(x) for x in truth]
    except ValueError:
        raise ValueError(f"{gt_path}: every line must be an integer class id") from None
    files = sorted(f for f in os.listdir(root)
                   if f.startswith("ILSVRC2012_val_") and _is_image(f))
    if not files:
        raise ValueError(f"no ILSVRC2012_val_*.JPEG files in {root}")
    classes = sorted(set(id_to_wnid.values()))
    index = {w: k for k, w in enumerate(classes)}
    rows = []
    for f in files:
        stem = f.split(".")[0]
        try:
            number = int(stem.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            raise ValueError(f"{f}: not an ILSVRC2012_val_XXXXXXXX file name") from None
        if not 1 <= number <= len(truth_ids):
            raise ValueError(f"{f}: image number {number} is beyond the {len(truth_ids)} lines "
                             f"of {gt_path.name}")
        cid = truth_ids[number - 1]
        if cid not in id_to_wnid:
            raise ValueError(f"{f}: class id {cid} is not a leaf class of the devkit")
        rows.append((index[id_to_wnid[cid]], f))
    rows.sort()
    return ImageSource("imagenet-val", os.fspath(root), [f for _, f in rows],
                       np.asarray([k for k, _ in rows], np.int64), classes)


# ----------------------------------------------------------------------------------------------
# CIFAR, from the Python pickles, safely

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, str, bytes, numbers and NumPy arrays; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only plain data and NumPy arrays are allowed")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # numpy >= 2

            return _reconstruct
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        return getattr(np, name)


def safe_load_pickle(data: bytes | str | os.PathLike, encoding: str = "latin1") -> Any:
    """Load a pickle that may hold only plain containers, numbers, strings and NumPy arrays.

    Any other global (a class, a function such as ``os.system``) raises
    ``pickle.UnpicklingError`` before it is looked up, so a crafted file cannot run code.

    Parameters
    ----------
    data : bytes or path
        The pickle, or the file holding it.
    encoding : str
        How Python 2 ``str`` objects are decoded (``"latin1"``, as torchvision reads CIFAR).

    Returns
    -------
    object

    Examples
    --------
    >>> import pickle, numpy as np
    >>> safe_load_pickle(pickle.dumps({"data": np.arange(3)}))["data"].tolist()
    [0, 1, 2]
    >>> import os
    >>> try:
    ...     safe_load_pickle(pickle.dumps(os.system))
    ... except pickle.UnpicklingError:
    ...     print("refused")
    refused
    """
    if isinstance(data, (bytes, bytearray)):
        return _ArrayUnpickler(io.BytesIO(bytes(data)), encoding=encoding).load()
    with open(data, "rb") as f:
        return _ArrayUnpickler(f, encoding=encoding).load()


def _key(d: dict, name: str) -> Any:
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise ValueError(f"the pickle has no {name!r} entry")


@functools.lru_cache(maxsize=4)
def _cifar_batch(path: str) -> np.ndarray:
    """uint8 [n, 32, 32, 3] images of one batch file (cached: one read per process)."""
    d = safe_load_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")  # noqa: TRY004
    data = np.asarray(_key(d, "data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


_CIFAR = {
    # name: (folder, test files, train files, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", ["test_batch"],
                [f"data_batch_{i}" for i in range(1, 6)], "batches.meta", "labels",
                "label_names"),
    "cifar100": ("cifar-100-python", ["test"], ["train"], "meta", "fine_labels",
                 "fine_label_names"),
}


def cifar(root: str | os.PathLike, name: str | None = None, train: bool = False) -> ImageSource:
    """CIFAR-10 or CIFAR-100 from the Python pickles of their official archives.

    Parameters
    ----------
    root : path
        The extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
    name : {"cifar10", "cifar100"}, optional
        Which data set (default: whichever folder is found).
    train : bool
        The training split instead of the test split (the reference uses the test split).

    Returns
    -------
    ImageSource
        Paths ``<batch file>::<row>`` (see :func:`read_virtual_image`), labels and class names
        from the pickles, in file order (torchvision's order).

    Examples
    --------
    >>> src = cifar("data", "cifar10")            # doctest: +SKIP
    >>> len(src), src.classes[:2]                 # doctest: +SKIP
    (10000, ['airplane', 'automobile'])
    """
    base = Path(root).resolve()
    names = [name] if name is not None else list(_CIFAR)
    for n in names:
        if n not in _CIFAR:
            raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {n!r}")
    for n in names:
        folder, test, tr, meta_name, label_key, names_key = _CIFAR[n]
        d = base if (base / meta_name).is_file() and base.name == folder else base / folder
        if not (d / meta_name).is_file():
            continue
        meta = safe_load_pickle(d / meta_name)
        classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
                   for c in _key(meta, names_key)]
        paths, labels = [], []
        for f in tr if train else test:
            p = d / f
            if not p.is_file():
                raise ValueError(f"{p} is missing")
            batch = safe_load_pickle(p)
            lab = np.asarray(_key(batch, label_key), np.int64).reshape(-1)
            n_rows = np.asarray(_key(batch, "data")).shape[0]
            if len(lab) != n_rows:
                raise ValueError(f"{p}: {len(lab)} labels for {n_rows} images")
            if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
                raise ValueError(f"{p}: labels outside 0..{len(classes) - 1}")
            paths += [f"{f}{VIRTUAL_SEPARATOR}{i}" for i in range(n_rows)]
            labels.append(lab)
        return ImageSource(n, os.fspath(d), paths, np.concatenate(labels), classes)
    want = " or ".join(_CIFAR[n][0] for n in names)
    raise ValueError(f"no {want} folder with its meta file in {base}")


def read_virtual_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] image of a virtual path ``<pickle file>::<row>`` (CIFAR rows).

    Examples
    --------
    >>> read_virtual_image("cifar-10-batches-py/test_batch::0").shape   # doctest: +SKIP
    (32, 32, 3)
    """
    file, _, row = path.rpartition(VIRTUAL_SEPARATOR)
    if not file or not row.isdigit():
        raise ValueError(f"{path!r} is not a '<file>::<row>' path")
    images = _cifar_batch(file)
    i = int(row)
    if i >= len(images):
        raise IndexError(f"{path}: the file holds {len(images)} images")
    return images[i]


# ----------------------------------------------------------------------------------------------
# Waterbirds and the dispatch

def waterbirds(root: str | os.PathLike, split: str = "test") -> ImageSource:
    """The binary Waterbirds layout; see :func:`clipdecomp.data.waterbirds.waterbirds_source`.

    Examples
    --------
    >>> src = waterbirds("waterbird_complete95_forest2water2")     # doctest: +SKIP
    """
    from clipdecomp.data.waterbirds import waterbirds_source

    return waterbirds_source(root, split)


def open_extra(source: str | os.PathLike, layout: str, **kwargs: Any) -> ImageSource:
    """The source of one of :data:`EXTRA_LAYOUTS` at ``source``.

    Examples
    --------
    >>> src = open_extra("data", "cifar100")      # doctest: +SKIP
    """
    if layout == "imagenet-val":
        return imagenet_val(source, **kwargs)
    if layout in ("cifar10", "cifar100"):
        return cifar(source, layout, **kwargs)
    if layout == "waterbirds":
        return waterbirds(source, **kwargs)
    raise ValueError(f"layout must be one of {EXTRA_LAYOUTS}, not {layout!r}")
