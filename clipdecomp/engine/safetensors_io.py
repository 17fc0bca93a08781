"""A small, dependency-free reader for ``.safetensors`` files.

The format: 8 bytes little-endian ``u64`` header length ``n``, then ``n`` bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``,
then the raw tensor bytes; offsets count from the first byte after the header.

The C core maps the weights itself; this module is for the Python side: reading the header
(which tensors a file holds, and their shapes, to find the layout and the geometry when no
config is given) and the odd small tensor such as ``logit_scale``. Every check names the file.
"""
from __future__ import annotations

import json
import os
from collections.abc import KeysView
from dataclasses import dataclass

import numpy as np

__all__ = ["SafetensorsError", "SafetensorsFile", "TensorInfo", "file_fingerprint",
           "read_header", "read_tensor"]

#: bytes per element of the dtypes this reader converts to float32 / int arrays
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
#: every dtype name of the format (the C core's list): these are accepted in a header and their
#: byte counts checked; only those of ``_DTYPE_SIZES`` can be read
_KNOWN_DTYPES = {**_DTYPE_SIZES, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
#: header longer than this is refused (real CLIP headers are < 100 kB; the C core's limit)
_MAX_HEADER = 100 * 1024 * 1024
#: at most this many dimensions per tensor (the C core's limit)
_MAX_DIMS = 8


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
    """The parsed header of one ``.safetensors`` file; tensors are read on demand.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    SafetensorsError
        When the header is truncated, is not JSON, or points outside the file.

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
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(self.path, f"the file has {size} bytes, fewer than the 8-byte header "
                                       "length (truncated or empty)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER:
                raise _fail(self.path, f"header length {n} bytes is implausible (> {_MAX_HEADER})")
            if 8 + n > size:
                raise _fail(self.path, f"header length {n} runs past the end of the "
                                       f"{size}-byte file (truncated)")
            if n < 2:
                raise _fail(self.path, f"header of {n} bytes (not a JSON object)")
            raw = fh.read(n)
            if len(raw) != n:
                raise _fail(self.path, "the header is cut short (the file changed while read)")
        header = _parse_json(self.path, raw)
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = dict(meta) if isinstance(meta, dict) else {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry)

    def _parse_entry(self, name: str, entry: object) -> TensorInfo:
        if not isinstance(entry, dict):
            raise _fail(self.path, f"entry for tensor {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offs, list):
            raise _fail(self.path, f"tensor {name!r} lacks dtype / shape / data_offsets")
        if dtype not in _KNOWN_DTYPES:
            raise _fail(self.path, f"tensor {name!r} has unknown dtype {dtype[:40]!r} (expected "
                                   f"one of {', '.join(_KNOWN_DTYPES)})")
        if len(offs) != 2 or not all(_is_uint(o) for o in offs):
            raise _fail(self.path, f"tensor {name!r} has bad data_offsets {str(offs)[:80]}")
        if len(shape) > _MAX_DIMS or not all(_is_uint(s) for s in shape):
            raise _fail(self.path, f"tensor {name!r} has bad shape {str(shape)[:80]}")
        begin, end = offs
        if begin > end or end > self.data_size:
            raise _fail(self.path, f"tensor {name!r} data [{begin}, {end}) lies outside the "
                                   f"{self.data_size} data bytes of the file (truncated or corrupt)")
        info = TensorInfo(name, dtype, tuple(shape), begin, end)
        nbytes = info.numel * _KNOWN_DTYPES[dtype]
        if nbytes != end - begin:
            raise _fail(self.path, f"tensor {name!r}: {dtype} {tuple(shape)} needs "
                                   f"{nbytes} bytes but its offsets span {end - begin}")
        return info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> KeysView[str]:
        """The tensor names, in header order."""
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


def _is_uint(v: object) -> bool:
    """A JSON non-negative integer (``true`` is not one, although Python's bool is an int)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _Object(dict):
    """A JSON object that remembers the keys it saw twice."""

    twice: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, object]]) -> _Object:
    out = _Object(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = []
        for k, _ in pairs:
            if k in seen:
                twice.append(k)
            seen.add(k)
        out.twice = tuple(twice)
    return out


def _bad_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _parse_json(path: str, raw: bytes) -> dict:
    """The header bytes -> its JSON object, strictly: no NaN / Infinity, and no key twice in
    the header or in a tensor's entry (anything goes inside ``__metadata__``, as for the C
    reader)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object,
                            parse_constant=_bad_constant)
    except (UnicodeDecodeError, ValueError) as e:       # JSONDecodeError is a ValueError
        raise _fail(path, f"header is not JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise _fail(path, "header is not JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    for where, obj in [("the header", header)] + [
            (f"the entry of tensor {k[:80]!r}", v) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)]:
        twice = getattr(obj, "twice", ())
        if twice:
            raise _fail(path, f"the key {twice[0][:80]!r} appears twice in {where}")
    return header


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
