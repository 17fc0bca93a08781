"""Reading ``.safetensors`` files on the Python side: the tensor table and the odd small tensor.

The format: 8 bytes little-endian ``u64`` header length ``n``, then ``n`` bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``,
then the raw tensor bytes; offsets count from the first byte after the header.

The header has one parser, the C core's (csrc/safetensors.c): strict (UTF-8, no duplicate
names or fields, known dtypes, every tensor's bytes inside the file and equal to its dtype and
shape, 64-bit overflow checked), and the same whether a file is read here or loaded as a model.
This module asks it for the tensor table (which tensors a file holds and their shapes, to find
the layout and the geometry when no config is given) and reads small tensors such as
``logit_scale`` itself. Every error names the file.
"""
from __future__ import annotations

import os
from collections.abc import KeysView
from dataclasses import dataclass

import numpy as np

from clipdecomp.engine import core as _core

__all__ = ["SafetensorsError", "SafetensorsFile", "TensorInfo", "file_fingerprint",
           "read_header", "read_tensor"]

#: bytes per element of the dtypes this reader converts to float32 / int arrays
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


class SafetensorsError(ValueError):
    """A ``.safetensors`` file is malformed, truncated, or lacks a tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header.

    Attributes
    ----------
    name : str
        The tensor's key, e.g. ``"visual.proj"``.
    dtype : str
        Safetensors dtype tag: ``"F32"``, ``"F16"``, ``"BF16"``, ...
    shape : tuple of int
        The tensor's shape, e.g. ``(768, 512)``.
    begin, end : int
        Byte offsets of the data, relative to the end of the header.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def _fail(path: str, what: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: not a valid safetensors file: {what}")


class SafetensorsFile:
    """The tensor table of one ``.safetensors`` file (parsed by the C core); tensors are read
    on demand.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    SafetensorsError
        When the header is truncated, is not valid JSON of the format, or points outside the
        file.

    Examples
    --------
    >>> f = SafetensorsFile("open_clip_model.safetensors")   # doctest: +SKIP
    >>> f.tensors["visual.proj"].shape                        # doctest: +SKIP
    (768, 512)
    >>> float(f.read("logit_scale"))                          # doctest: +SKIP
    4.6052
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            start, size, entries = _core.extension()._safetensors_header(self.path)
        except ValueError as e:
            raise SafetensorsError(str(e)) from None
        self.data_start: int = start
        self.data_size: int = size
        #: name -> entry, sorted by name
        self.tensors: dict[str, TensorInfo] = {
            name: TensorInfo(name, dtype, tuple(shape), begin, end)
            for name, dtype, shape, begin, end in entries}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> KeysView[str]:
        """The tensor names, sorted."""
        return self.tensors.keys()

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of tensor ``name``, or None when the file lacks it."""
        t = self.tensors.get(name)
        return None if t is None else t.shape

    def read(self, name: str) -> np.ndarray:
        """Read one tensor; floating dtypes come back as float32, integers as their own type.

        Parameters
        ----------
        name : str
            The tensor's key.

        Returns
        -------
        numpy.ndarray
            An array of the tensor's shape (float32 for F16 / BF16 / F32 / F64).

        Raises
        ------
        SafetensorsError
            When the file lacks the tensor or its dtype is not supported.
        """
        t = self.tensors.get(name)
        if t is None:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
        if t.dtype not in _DTYPE_SIZES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {t.dtype}")
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + t.begin)
            buf = fh.read(t.end - t.begin)
        if len(buf) != t.end - t.begin:
            raise _fail(self.path, f"tensor {name!r} is cut short (truncated file)")
        return _decode(buf, t.dtype).reshape(t.shape)


def _decode(buf: bytes, dtype: str) -> np.ndarray:
    """Raw little-endian bytes -> array (floats widened to float32)."""
    if dtype == "F32":
        return np.frombuffer(buf, dtype="<f4").astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(buf, dtype="<f2").astype(np.float32)
    if dtype == "F64":
        return np.frombuffer(buf, dtype="<f8").astype(np.float32)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the 16 bits up
        u16 = np.frombuffer(buf, dtype="<u2").astype(np.uint32)
        return (u16 << 16).view(np.float32)
    ints = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
    return np.frombuffer(buf, dtype=ints[dtype]).copy()


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, by name, without reading their data.

    Examples
    --------
    >>> {k: v.shape for k, v in read_header("model.safetensors").items()}   # doctest: +SKIP
    """
    return dict(SafetensorsFile(path).tensors)


def read_tensor(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """Read one tensor of a safetensors file as a NumPy array (floats as float32).

    Examples
    --------
    >>> np.exp(read_tensor("open_clip_model.safetensors", "logit_scale"))  # doctest: +SKIP
    array(100., dtype=float32)
    """
    return SafetensorsFile(path).read(name)


def file_fingerprint(path: str | os.PathLike[str], samples: int = 16,
                     block: int = 1 << 16) -> tuple[int, str]:
    """(size, SHA-256 hex) of a weights file's size, its first 1 MiB (the safetensors header
    and more) and ``samples`` blocks spread over the rest, the last one ending the file.

    Cheap for multi-GB files, and tells apart checkpoints that share a header but not their
    weights (fine-tunes change every block); a change confined to bytes between the sampled
    blocks goes unseen.

    Examples
    --------
    >>> size, digest = file_fingerprint("model.safetensors")    # doctest: +SKIP
    """
    path = os.fspath(path)
    import hashlib

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        h.update(f.read(1 << 20))
        rest = size - (1 << 20)
        if rest > 0:
            for k in range(samples):  # blocks spread evenly, the last one ending the file
                f.seek((1 << 20) + max(rest - block, 0) * k // max(samples - 1, 1))
                h.update(f.read(block))
    return size, h.hexdigest()
