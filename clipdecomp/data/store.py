"""The Zarr store that :func:`clipdecomp.run_dataset` writes, and :class:`StoreReader`.

A store holds the decomposition of every image of a collection, one row per image, in the order
of the source listing, chunked by images (``chunk_size`` rows per chunk), plus streaming
statistics over the valid rows.

Layout (Zarr v3 group; N images, L layers, Lk kept layers, H heads, D embedding dim)::

    embedding    [N, D]          float16 | float32   chunks (C, D)
    heads        [N, Lk, H, D]   float16 | float32   chunks (C, 1, H, D): one file per layer
    mlps         [N, L+1, D]     float16 | float32   row 0 = the ln_pre term
    cls_to_cls   [N, L, D]       float16 | float32
    labels       [N]             int64, -1 when the source has no label
    paths        [N]             str, as listed by the source (relative to source.root)
    ok           [N]             bool, True once the row holds a decomposed image
    error        [N]             str, why an image was skipped ("" otherwise)
    file_stat    [N, 4]          int64, size, modification time (ns) and 128 bits of content
                                 hash (0 unless made with content_hash=True) of each source
                                 file when the store was made (-1 for a file that was missing)
    done         [n_chunks]      bool, chunk c (rows c*C .. c*C+C-1) is finished
    stats/slot0, stats/slot1     two copies of the statistics (see below)
    neurons/<l>/...              with ``run_dataset(..., neurons=)``: per-image neuron
                                 coefficients of layer l (rows like the others) and, once
                                 the store is complete, the neuron statistics
                                 (:mod:`clipdecomp.data.neuron_store`)

Skipped images (unreadable or corrupt files) keep their row: ``ok`` is False, ``error`` holds the
reason, and every float array holds zeros there (never NaN). They are left out of the
statistics. Rows of chunks that are not done yet are zeros too, with ``ok`` False.

Statistics (float64, over rows with ``ok``; the names of :class:`clipdecomp.methods.stats.HeadStats`)::

    n                  []                 number of valid rows
    embedding_sum      [D]
    head_sum           [L, H, D]          all layers, whatever ``layers`` keeps
    mlp_sum            [L+1, D]
    cls_sum            [L, D]
    sum_outer          [Lk, H, D, D]      sum over images of x x^T, x = heads[n, l, h] (float32
                                          values as computed, before any float16 rounding)
    included           [n_chunks] bool    the chunks these sums cover
    digest             [n_chunks] str     BLAKE2b of each chunk's rows as written (what a
                                          resumed run checks the chunk files against)

The statistics are committed to one slot while the other slot keeps the previous commit, and a
slot counts only once its attributes say ``complete``. ``included`` of the newest complete slot is
the ground truth of which chunks are finished; ``done`` mirrors it for readers. A run killed at
any moment therefore resumes from a consistent state: chunks written after the last commit are
computed again (bit for bit the same rows) and their sums added once.

Root attributes: ``clipdecomp`` (model identity, settings, source listing hash, shapes) and
``runs`` (one summary per run).

One run at a time: a run holds an exclusive lock (``fcntl.flock``) on the file
``.<store name>.lock`` beside the store for as long as it writes, and a second run on the
same store is refused with :class:`StoreBusyError` naming the process that holds it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import socket
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp.engine import core
from clipdecomp.engine.helpers import optional_import
from clipdecomp.methods.stats import HeadStats

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "clipdecomp-store"
FORMAT_VERSION = 1
FLOAT_FIELDS = ("embedding", "heads", "mlps", "cls_to_cls")
ROW_FIELDS = FLOAT_FIELDS + ("labels", "paths", "ok", "error")
STAT_FIELDS = ("n", "embedding_sum", "head_sum", "mlp_sum", "cls_sum", "sum_outer")


def _zarr() -> Any:
    return optional_import(
        "zarr", "clipdecomp stores need zarr: pip install 'clipdecomp[data]' (or pip install zarr)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(obj: Any) -> Any:
    """Turn dataclasses, tuples and NumPy scalars into plain JSON values (lists, dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


# ----------------------------------------------------------------------------------------------
# statistics


class Moments:
    """Float64 sums of the decomposition terms over valid images, mergeable exactly.

    The fields mean what the same names mean in :class:`clipdecomp.methods.stats.HeadStats` (plus the
    embedding sum); unlike ``HeadStats.update``, the second moments are added once per chunk of
    rows (:meth:`add_outer`), which keeps their cost small next to the model's.

    Parameters
    ----------
    layers : int
        L, the model's layer count.
    heads : int
        H.
    dim : int
        D, the embedding dimension.
    kept : sequence of int
        The Lk layers whose per-head second moments are kept.

    Attributes
    ----------
    n : int
        Number of images summed.
    embedding_sum : ndarray [D]
    head_sum : ndarray [L, H, D]
    mlp_sum : ndarray [L+1, D]
    cls_sum : ndarray [L, D]
    sum_outer : ndarray [Lk, H, D, D]
        Sum over images of ``x x^T`` with ``x = heads[n, l, h]``, l in ``kept``.

    Examples
    --------
    >>> m = Moments(2, 1, 3, kept=[1])
    >>> m.add_rows(np.ones((4, 3)), np.ones((4, 2, 1, 3)), np.ones((4, 3, 3)), np.ones((4, 2, 3)))
    >>> m.add_outer(np.ones((4, 1, 1, 3)))
    >>> m.n, float(m.sum_outer[0, 0, 0, 0])
    (4, 4.0)
    """

    def __init__(self, layers: int, heads: int, dim: int, kept: Sequence[int]):
        self.kept = tuple(int(k) for k in kept)
        L, H, D, Lk = int(layers), int(heads), int(dim), len(self.kept)
        self.n = 0
        self.embedding_sum = np.zeros((D,), np.float64)
        self.head_sum = np.zeros((L, H, D), np.float64)
        self.mlp_sum = np.zeros((L + 1, D), np.float64)
        self.cls_sum = np.zeros((L, D), np.float64)
        self.sum_outer = np.zeros((Lk, H, D, D), np.float64)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in STAT_FIELDS[1:])

    def add_rows(
        self,
        embedding: np.ndarray,
        heads: np.ndarray,
        mlps: np.ndarray,
        cls_to_cls: np.ndarray,
    ) -> None:
        """Add the sums of valid images: embedding [n, D], heads [n, L, H, D] (all layers),
        mlps [n, L+1, D], cls_to_cls [n, L, D]."""
        self.n += int(embedding.shape[0])
        self.embedding_sum += embedding.astype(np.float64).sum(0)
        self.head_sum += heads.astype(np.float64).sum(0)
        self.mlp_sum += mlps.astype(np.float64).sum(0)
        self.cls_sum += cls_to_cls.astype(np.float64).sum(0)

    def add_outer(self, heads_kept: np.ndarray) -> None:
        """Add ``x x^T`` of every row of heads_kept [n, Lk, H, D] (rows of zeros add nothing).

        The products are the C core's (:func:`clipdecomp.engine.core.moments_update`, as in
        :class:`~clipdecomp.methods.stats.HeadStats`): float32 over centred chunks of rows,
        summed in float64."""
        x = np.asarray(heads_kept, np.float32)
        n, lk, h, d = x.shape
        if n == 0 or lk == 0:
            return
        # the core also sums the rows; the store keeps head_sum over every layer in add_rows
        discard = np.zeros((lk * h, d), np.float64)
        core.moments_update(self.sum_outer.reshape(lk * h, d, d), discard,
                            np.ascontiguousarray(x.reshape(n, lk * h, d)))

    def merge(self, other: Moments) -> Moments:
        """Add another Moments in place (same shapes) and return self."""
        if other.kept != self.kept or other.sum_outer.shape != self.sum_outer.shape:
            raise ValueError("cannot merge statistics of different shapes or kept layers")
        self.n += int(other.n)
        for f in STAT_FIELDS[1:]:
            getattr(self, f).__iadd__(getattr(other, f))
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f: getattr(self, f) for f in STAT_FIELDS[1:]}
        out["n"] = np.asarray(self.n, np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], kept: Sequence[int]) -> Moments:
        L, H, D = arrays["head_sum"].shape
        m = cls(L, H, D, kept)
        m.n = int(arrays["n"])
        for f in STAT_FIELDS[1:]:
            getattr(m, f)[...] = arrays[f]
        return m


# ----------------------------------------------------------------------------------------------
# metadata


#: the config fields of the text tower: a store holds image decompositions, so they are no part
#: of its model's identity (a run loads the image tower alone; a store made by a model with
#: both towers resumes with it, and the other way round)
TEXT_TOWER_FIELDS = frozenset({"context_length", "vocab_size", "text_width", "text_layers",
                               "text_heads", "text_mlp_dim", "text_act"})


def config_differences(a: dict, b: dict) -> list[str]:
    """The fields where two models' config records differ for a store, sorted: the name (a
    label) and :data:`TEXT_TOWER_FIELDS` left out.

    Examples
    --------
    >>> config_differences({"layers": 12, "text_layers": 12}, {"layers": 12, "text_layers": 0})
    []
    >>> config_differences({"layers": 12, "name": "a"}, {"layers": 24, "name": "b"})
    ['layers']
    """
    keys = (set(a) | set(b)) - {"name"} - TEXT_TOWER_FIELDS
    return sorted(k for k in keys if a.get(k) != b.get(k))


def compare_metadata(stored: dict, wanted: dict, where: str) -> None:
    """Raise ValueError naming the first field where a store's metadata and a run disagree.

    Checked: ``model.config.*`` (but its ``name`` and the text tower's fields, see
    :func:`config_differences`), ``model.precision``,
    ``model.checkpoint.size`` / ``.fingerprint`` (when both sides know the checkpoint file),
    ``settings.*`` and ``source.*`` (layout, n, listing_sha256).
    """
    fields: list[tuple[str, Any, Any]] = []
    sc, wc = stored["model"]["config"], wanted["model"]["config"]
    for k in config_differences(sc, wc):
        fields.append((f"model.config.{k}", sc.get(k), wc.get(k)))
    if "precision" in stored["model"]:  # stores made before it was recorded: not known
        fields.append(("model.precision", stored["model"]["precision"],
                       wanted["model"].get("precision", "fp32")))
    sk, wk = stored["model"].get("checkpoint"), wanted["model"].get("checkpoint")
    if sk and wk:
        for k in ("size", "fingerprint"):
            fields.append((f"model.checkpoint.{k}", sk.get(k), wk.get(k)))
    elif sk and not wk:
        warnings.warn(
            f"{where}: cannot check the model's checkpoint file against the store "
            f"(made with {sk.get('name')}); only its config was compared",
            stacklevel=3,
        )
    for k in ("dtype", "layers", "chunk_size", "neurons"):
        fields.append((f"settings.{k}", stored["settings"].get(k), wanted["settings"].get(k)))
    for k in ("layout", "n", "listing_sha256"):
        fields.append((f"source.{k}", stored["source"].get(k), wanted["source"].get(k)))
    for name, a, b in fields:
        if a != b:
            raise ValueError(
                f"{where} was made with a different {name}: the store has {a!r}, this run has "
                f"{b!r}. Use the same model and options to resume it, or write to a new store."
            )


# ----------------------------------------------------------------------------------------------
# writing (used by clipdecomp.data.runner and clipdecomp.data.distributed)


class StoreBusyError(RuntimeError):
    """Another run is writing this store (see :func:`store_lock`)."""


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of a store: ``.<name>.lock`` beside it (inside, an overwrite would
    delete it)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


@contextlib.contextmanager
def store_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the store's lock for the body, or raise :class:`StoreBusyError` at once.

    The lock is an exclusive ``fcntl.flock`` on :func:`lock_path`, released when the body
    ends (also when the process dies); the file keeps the holder's pid and host. On a
    network file system the lock is as good as its ``flock`` (Linux NFS: yes).

    Examples
    --------
    >>> with store_lock("val.zarr"):                  # doctest: +SKIP
    ...     pass
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    lp = lock_path(path)
    os.makedirs(os.path.dirname(lp), exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            who = (f"process {holder[0]} on {holder[1]}" if len(holder) >= 2
                   else "another process")
            raise StoreBusyError(
                f"the store {os.fspath(path)} is in use: {who} is writing it (lock file "
                f"{lp}). Wait for that run to finish (or stop it), or write to another "
                "store.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def rows_digest(arrays: dict[str, np.ndarray], ok: np.ndarray, errors: Sequence[str]) -> str:
    """BLAKE2b (128 bits, hex) of one chunk's rows as stored: the float arrays in the store's
    dtype (and the neuron rows, ``neurons/...``, when the store has them), ``ok`` and the error
    texts. :func:`write_rows` returns it; :func:`read_digest` computes it again from the
    files."""
    h = hashlib.blake2b(digest_size=16)
    for f in FLOAT_FIELDS + tuple(sorted(k for k in arrays if k.startswith("neurons/"))):
        a = np.ascontiguousarray(arrays[f])
        h.update(f"{f}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(np.asarray(ok, bool).tobytes())
    h.update("\0".join(str(e) for e in errors).encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def read_digest(root, start: int, n: int) -> str:
    """:func:`rows_digest` of rows [start, start + n) as the store's files hold them now
    (raises what zarr raises for a chunk file it cannot decode)."""
    from clipdecomp.data.neuron_store import row_fields

    neurons = row_fields(root.attrs["clipdecomp"]["settings"].get("neurons"))
    arrays = {f: np.asarray(root[f][start:start + n]) for f in FLOAT_FIELDS + tuple(neurons)}
    ok = np.asarray(root["ok"][start:start + n], bool)
    errors = [str(e) for e in np.asarray(root["error"][start:start + n]).tolist()]
    return rows_digest(arrays, ok, errors)


def is_store(path: str | os.PathLike) -> bool:
    """True when path holds a clipdecomp store."""
    zarr = _zarr()
    if not os.path.exists(os.path.join(os.fspath(path), "zarr.json")):
        return False
    try:
        g = zarr.open_group(os.fspath(path), mode="r")
    except Exception:  # noqa: BLE001 - whatever zarr cannot open is not a store
        return False
    return isinstance(g.attrs.get("clipdecomp"), dict)


def create_store(
    path: str | os.PathLike,
    meta: dict,
    paths: Sequence[str],
    labels: np.ndarray,
    overwrite: bool = False,
    file_stat: np.ndarray | None = None,
) -> None:
    """Create an empty store for ``meta`` (see :func:`clipdecomp.data.runner.run_dataset`)."""
    zarr = _zarr()
    path = os.fspath(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"{path} exists and is not a clipdecomp store; choose a new --out (or overwrite=True)"
        )
    shp = meta["shapes"]
    N, L, H, D = shp["n"], shp["layers"], shp["heads"], shp["embed_dim"]
    Lk = len(meta["settings"]["layers"])
    C = meta["settings"]["chunk_size"]
    dt = meta["settings"]["dtype"]
    n_chunks = shp["n_chunks"]
    root = zarr.open_group(path, mode="w")
    root.attrs.put({"clipdecomp_creating": True})  # a store killed while being made is redone
    specs = {
        "embedding": ((N, D), (C, D), dt, 0),
        "heads": ((N, Lk, H, D), (C, 1, H, D), dt, 0),
        "mlps": ((N, L + 1, D), (C, L + 1, D), dt, 0),
        "cls_to_cls": ((N, L, D), (C, L, D), dt, 0),
        "labels": ((N,), (C,), "int64", -1),
        "paths": ((N,), (C,), str, ""),
        "ok": ((N,), (C,), bool, False),
        "error": ((N,), (C,), str, ""),
        "done": ((n_chunks,), (max(n_chunks, 1),), bool, False),
        "file_stat": ((N, 4), (C, 4), "int64", 0),
    }
    for name, (shape, chunks, dtype, fill) in specs.items():
        root.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    # paths and labels are known up front: write them chunk by chunk, bounded memory
    for s in range(0, N, C):
        e = min(N, s + C)
        root["paths"][s:e] = np.asarray(list(paths[s:e]), dtype=str)
        root["labels"][s:e] = np.asarray(labels[s:e], np.int64)
        if file_stat is not None:
            root["file_stat"][s:e] = np.asarray(file_stat[s:e], np.int64)
    stats = root.create_group("stats")
    for slot in (0, 1):
        g = stats.create_group(f"slot{slot}")
        g.attrs.put({"complete": False, "generation": -1})
        _create_stat_arrays(g, L, H, D, Lk, n_chunks)
    from clipdecomp.data.neuron_store import create_arrays

    create_arrays(root, meta)
    root.attrs.put({"clipdecomp": meta, "runs": []})
    return root


def is_unfinished_store(path: str | os.PathLike) -> bool:
    """True when path holds a store whose creation was interrupted (safe to make again)."""
    zarr = _zarr()
    if not os.path.exists(os.path.join(os.fspath(path), "zarr.json")):
        return False
    try:
        g = zarr.open_group(os.fspath(path), mode="r")
    except Exception:  # noqa: BLE001 - whatever zarr cannot open is not ours
        return False
    return bool(g.attrs.get("clipdecomp_creating")) and "clipdecomp" not in g.attrs


def _create_stat_arrays(g, L: int, H: int, D: int, Lk: int, n_chunks: int) -> None:
    # the float64 sums are stored uncompressed: their mantissas are noise to a compressor
    # (zstd saves a few percent on them), and every commit rewrites all of them, sum_outer
    # (Lk * H * D * D * 8 bytes) included, in the writer thread beside the model's work
    sums = {"dtype": "float64", "fill_value": 0, "compressors": None}
    g.create_array("n", shape=(), dtype="int64", fill_value=0)
    g.create_array("embedding_sum", shape=(D,), **sums)
    g.create_array("head_sum", shape=(L, H, D), **sums)
    g.create_array("mlp_sum", shape=(L + 1, D), **sums)
    g.create_array("cls_sum", shape=(L, D), **sums)
    g.create_array("sum_outer", shape=(Lk, H, D, D), chunks=(1, 1, D, D), **sums)
    g.create_array(
        "included", shape=(n_chunks,), chunks=(max(n_chunks, 1),), dtype=bool, fill_value=False
    )
    g.create_array("digest", shape=(n_chunks,), chunks=(max(n_chunks, 1),), dtype=str,
                   fill_value="")


def _slot_state(path: str) -> list[tuple[int, int]]:
    """[(generation, slot)] of the complete stats slots, newest first."""
    zarr = _zarr()
    out = []
    for slot in (0, 1):
        try:
            a = zarr.open_group(os.path.join(path, "stats", f"slot{slot}"), mode="r").attrs
            if a.get("complete"):
                out.append((int(a["generation"]), slot))
        except Exception:  # noqa: BLE001, S112 - a slot that cannot be read is not valid
            continue
    return sorted(out, reverse=True)


def load_committed(
    path: str | os.PathLike, kept: Sequence[int], arrays: bool = True
) -> tuple[Moments | None, np.ndarray, int]:
    """Return (statistics, included [n_chunks] bool, generation) of the newest commit.

    A store without a commit gives zero statistics, no chunk included and generation -1.
    With ``arrays=False`` the statistics are not read (None).
    """
    zarr = _zarr()
    path = os.fspath(path)
    root = zarr.open_group(path, mode="r")
    state = _slot_state(path)
    if not state:
        shp = root.attrs["clipdecomp"]["shapes"]
        m = Moments(shp["layers"], shp["heads"], shp["embed_dim"], kept) if arrays else None
        return m, np.zeros(shp["n_chunks"], bool), -1
    gen, slot = state[0]
    g = zarr.open_group(os.path.join(path, "stats", f"slot{slot}"), mode="r")
    m = Moments.from_arrays({f: g[f][...] for f in STAT_FIELDS}, kept) if arrays else None
    return m, np.asarray(g["included"][...], bool), gen


def load_digests(path: str | os.PathLike) -> list[str] | None:
    """The chunk digests of the newest commit ("" for a chunk without one), or None for a
    store made before digests were recorded."""
    zarr = _zarr()
    path = os.fspath(path)
    state = _slot_state(path)
    g = zarr.open_group(os.path.join(path, "stats", f"slot{state[0][1] if state else 0}"),
                        mode="r")
    if "digest" not in g:
        return None
    if not state:
        return [""] * int(g["included"].shape[0])
    return [str(x) for x in np.asarray(g["digest"][...]).tolist()]


def commit(path: str | os.PathLike, moments: Moments, included: np.ndarray, generation: int,
           digests: Sequence[str] | None = None) -> None:
    """Write statistics + included chunks (+ chunk digests) into the older slot, then mark it
    complete, then mirror ``included`` into ``done``. Each step is one atomic file write on a
    local store."""
    zarr = _zarr()
    path = os.fspath(path)
    state = _slot_state(path)
    target = 1 - state[0][1] if state else 0
    g = zarr.open_group(os.path.join(path, "stats", f"slot{target}"), mode="r+")
    g.attrs.put({"complete": False, "generation": -1})
    for f, a in moments.arrays().items():
        g[f][...] = a
    g["included"][...] = np.asarray(included, bool)
    if digests is not None and "digest" in g:
        g["digest"][...] = np.asarray(list(digests), dtype=str)
    g.attrs.put({"complete": True, "generation": int(generation), "time": _now()})
    zarr.open_array(os.path.join(path, "done"), mode="r+")[...] = np.asarray(included, bool)


def write_rows(
    root: Any,
    start: int,
    arrays: dict[str, np.ndarray],
    ok: np.ndarray,
    errors: Sequence[str],
) -> str:
    """Write one chunk's rows [start, start + n) (n = len(ok)); float arrays are cast to the
    store's dtype. Chunk-aligned, so different processes may write different chunks at once.
    Returns the chunk's :func:`rows_digest`."""
    n = len(ok)
    stored = {}
    for f in FLOAT_FIELDS:
        arr = root[f]
        src = arrays[f]
        if arr.dtype == np.float16:
            big = float(np.abs(src[np.isfinite(src)]).max(initial=0))
            if big > 65504:
                raise ValueError(f"{f}: value {big:.4g} does not fit float16 (rows {start}.."
                                 f"{start + n}); use dtype='float32'")
        stored[f] = src.astype(arr.dtype, copy=False)
        arr[start:start + n] = stored[f]
    for f in sorted(k for k in arrays if k.startswith("neurons/")):   # float32, as computed
        stored[f] = np.asarray(arrays[f], np.float32)
        root[f][start:start + n] = stored[f]
    root["ok"][start:start + n] = np.asarray(ok, bool)
    root["error"][start:start + n] = np.asarray(list(errors), dtype=str)
    return rows_digest(stored, ok, errors)


def append_run(path: str | os.PathLike, summary: dict) -> None:
    """Record one run's summary in the root attributes (a list under ``runs``)."""
    zarr = _zarr()
    root = zarr.open_group(os.fspath(path), mode="r+")
    runs = list(root.attrs.get("runs", []))
    runs.append(jsonable(summary))
    root.attrs.update({"runs": runs})


# ----------------------------------------------------------------------------------------------
# reading


def _config_object(cfg: dict) -> Any:
    try:
        from clipdecomp.engine.config import ModelConfig

        names = {f.name for f in dataclasses.fields(ModelConfig)}
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in cfg.items() if k in names}
        return ModelConfig(**fields)
    except (ImportError, TypeError, ValueError):
        return types.SimpleNamespace(**cfg)


class StoreStats(HeadStats):
    """The statistics of a store: a :class:`~clipdecomp.methods.stats.HeadStats` (so TextSpan and mean
    ablation take it as it is) that also knows the embedding sum and the means of every term.

    Attributes
    ----------
    n : int
        Number of valid images summed.
    layers : tuple of int
        The Lk layers with second moments (the store's kept layers).
    sum, sum_outer, head_sum, mlp_sum, cls_sum
        As in HeadStats: [Lk, H, D], [Lk, H, D, D], [L, H, D], [L+1, D], [L, D].
    embedding_sum : ndarray [D]

    Examples
    --------
    >>> st = StoreReader("val.zarr").stats                         # doctest: +SKIP
    >>> st.mean_heads.shape, st.head(11, 3)[1].shape                # doctest: +SKIP
    ((12, 12, 512), (512, 512))
    >>> textspan_heads(st, pool_embeddings, texts)                  # doctest: +SKIP
    """

    embedding_sum: np.ndarray | None = None   # [D]

    @classmethod
    def from_moments(cls, m: Moments) -> StoreStats:
        """Wrap float64 sums (:class:`Moments`) without copying."""
        out = cls(layers=list(m.kept))
        out.n = int(m.n)
        out.n_layers = int(m.head_sum.shape[0])
        out.layers = tuple(m.kept)
        out.head_sum = m.head_sum
        out.sum = m.head_sum[list(m.kept)]
        out.sum_outer = m.sum_outer
        out.mlp_sum = m.mlp_sum
        out.cls_sum = m.cls_sum
        out.embedding_sum = m.embedding_sum
        return out

    def _mean_of(self, x: np.ndarray | None) -> np.ndarray:
        self._check()
        return self._array(x) / self.n

    @property
    def mean_embedding(self) -> np.ndarray:
        """Mean embedding (not normalised), [D]."""
        return self._mean_of(self.embedding_sum)

    @property
    def mean_heads(self) -> np.ndarray:
        """Mean head terms of every layer, [L, H, D] (the means of mean ablation)."""
        return self._mean_of(self.head_sum)

    @property
    def mean_mlps(self) -> np.ndarray:
        """Mean MLP terms, [L+1, D]."""
        return self._mean_of(self.mlp_sum)

    @property
    def mean_cls_to_cls(self) -> np.ndarray:
        """Mean class-to-class terms, [L, D]."""
        return self._mean_of(self.cls_sum)

    def __repr__(self) -> str:
        return f"StoreStats(n={self.n}, layers={list(self._layers())} of {self.n_layers})"


@dataclasses.dataclass
class StoredDecomposition:
    """Some rows of a store, as NumPy arrays with the fields of a Decomposition.

    Attributes
    ----------
    embedding : ndarray [B, D]
    heads : ndarray [B, Lk, H, D]
        Only the kept layers, listed in ``layers``.
    mlps : ndarray [B, L+1, D]
    cls_to_cls : ndarray [B, L, D]
    norm : ndarray [B]
        ||embedding|| (0 for skipped rows).
    layers : tuple of int
        Which model layers ``heads`` holds.
    rows, labels, paths, ok
        Row indices in the store, labels (-1 none), listed paths, validity.
    config
        The model's config.
    """

    embedding: np.ndarray
    heads: np.ndarray
    mlps: np.ndarray
    cls_to_cls: np.ndarray
    norm: np.ndarray
    layers: tuple
    rows: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    ok: np.ndarray
    config: Any = None

    def __len__(self) -> int:
        return int(self.embedding.shape[0])


class StoreReader:
    """Open a clipdecomp store for reading, chunk by chunk.

    Parameters
    ----------
    path : str or PathLike
        The store directory made by :func:`clipdecomp.run_dataset`.

    Attributes
    ----------
    embedding, heads, mlps, cls_to_cls, labels, paths, ok, error, done : zarr.Array
        The stored arrays (see :mod:`clipdecomp.data.store`), read lazily.
    n, chunk_size, n_chunks : int
    layers : tuple of int
        The layers whose heads are stored (``heads[:, j]`` is layer ``layers[j]``).
    dtype : str
    classes : list of str or None
        Class names (label i is ``classes[i]``) for class-folder and named-label sources.
    config
        The model's config (a ModelConfig when clipdecomp provides one).
    metadata : dict
        Everything the store records about the model, settings and source.
    runs : list of dict
        One summary per run.

    Examples
    --------
    >>> r = StoreReader("val.zarr")                                   # doctest: +SKIP
    >>> for rows, c in r.iter_chunks(["heads", "labels"], layers=[-1]):  # doctest: +SKIP
    ...     c["heads"].shape                                          # [C, 1, H, D]
    >>> dec = r.decomposition(slice(0, 10)); dec.heads.shape          # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        zarr = _zarr()
        self.path = os.fspath(path)
        if not is_store(self.path):
            raise ValueError(f"{self.path} is not a clipdecomp store")
        self._root = zarr.open_group(self.path, mode="r")
        self.metadata = dict(self._root.attrs["clipdecomp"])
        self.runs = list(self._root.attrs.get("runs", []))
        st = self.metadata["settings"]
        self.layers = tuple(st["layers"])
        self.chunk_size = int(st["chunk_size"])
        self.dtype = st["dtype"]
        self.n = int(self.metadata["shapes"]["n"])
        self.n_chunks = int(self.metadata["shapes"]["n_chunks"])
        self.classes = self.metadata["source"].get("classes")
        self.config = _config_object(self.metadata["model"]["config"])
        # the stored arrays (zarr, read lazily): [N, ...] rows and the per-chunk done flags
        self.embedding: Any = self._root["embedding"]
        self.heads: Any = self._root["heads"]
        self.mlps: Any = self._root["mlps"]
        self.cls_to_cls: Any = self._root["cls_to_cls"]
        self.labels: Any = self._root["labels"]
        self.paths: Any = self._root["paths"]
        self.ok: Any = self._root["ok"]
        self.error: Any = self._root["error"]
        self.done: Any = self._root["done"]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        done = int(np.count_nonzero(self.included))
        return (
            f"StoreReader({self.path!r}, n={self.n}, layers={list(self.layers)}, "
            f"dtype={self.dtype}, chunks done {done}/{self.n_chunks})"
        )

    @property
    def complete(self) -> bool:
        """True when every chunk is done (by the committed statistics, the ground truth)."""
        return bool(np.all(self.included))

    @property
    def included(self) -> np.ndarray:
        """[n_chunks] bool: the chunks that the committed statistics cover (= finished)."""
        return load_committed(self.path, self.layers, arrays=False)[1]

    @property
    def stats(self) -> StoreStats:
        """The committed statistics over the valid rows (:class:`StoreStats`, a HeadStats)."""
        moments = load_committed(self.path, self.layers)[0]
        assert moments is not None   # asked with arrays
        return StoreStats.from_moments(moments)

    @property
    def neuron_layers(self) -> tuple[int, ...]:
        """The layers whose neuron statistics the store holds (``run_dataset(..., neurons=)``;
        empty without)."""
        from clipdecomp.data.neuron_store import spec_of_settings

        spec = spec_of_settings(self.metadata["settings"].get("neurons"))
        return () if spec is None else spec.layers

    def neuron_stats(self, layer: int | None = None, norms: bool = True) -> Any:
        """The statistics of the second-order effects of the neurons of ``layer`` over the
        valid rows (default: the store's only or first neuron layer), as
        :class:`~clipdecomp.methods.neuron_stats.NeuronStatsResult`: ``mean [F, D]``,
        ``top_images [F, k]`` (store rows), ``top_norms [F, k]``, ``pcs [F, D]`` and, with
        ``norms``, ``norms [N, F]`` (0 on rows that are not valid).

        Examples
        --------
        >>> st = StoreReader("val.zarr").neuron_stats(9)              # doctest: +SKIP
        >>> st.pcs.shape, st.top_images.shape                         # doctest: +SKIP
        ((3072, 512), (3072, 100))
        """
        from clipdecomp.data.neuron_store import read_stats

        if layer is None:
            if not self.neuron_layers:
                raise ValueError(f"{self.path} has no neuron statistics: run it with "
                                 "run_dataset(..., neurons=layer)")
            layer = self.neuron_layers[0]
        return read_stats(self.path, layer, norms=norms)

    def skipped(self) -> pd.DataFrame:
        """The images that could not be read: a DataFrame with columns row, path, reason."""
        import pandas as pd

        rows, paths, reasons = [], [], []
        for s in range(0, self.n, self.chunk_size):
            e = min(self.n, s + self.chunk_size)
            err = np.asarray(self.error[s:e])
            idx = np.nonzero(err != "")[0]
            if len(idx):
                p = np.asarray(self.paths[s:e])
                rows += (idx + s).tolist()
                paths += [str(x) for x in p[idx]]
                reasons += [str(x) for x in err[idx]]
        return pd.DataFrame({"row": rows, "path": paths, "reason": reasons})

    def _layer_positions(self, layers: Sequence[int] | int | None) -> list[int] | None:
        if layers is None:
            return None
        if isinstance(layers, (int, np.integer)):
            layers = [int(layers)]
        L = int(self.metadata["shapes"]["layers"])
        pos = []
        for lay in layers:
            a = int(lay) + L if int(lay) < 0 else int(lay)
            if a not in self.layers:
                raise ValueError(f"layer {lay} is not stored; the store keeps {list(self.layers)}")
            pos.append(self.layers.index(a))
        return pos

    def _read(self, field: str, sel, pos: list[int] | None) -> np.ndarray:
        if field == "norm":
            e = np.asarray(self.embedding.oindex[sel], np.float32)
            return np.linalg.norm(e, axis=-1)
        arr = self._root[field]
        if field == "heads" and pos is not None:
            out = arr.oindex[sel, pos]
        else:
            out = arr.oindex[sel]
        out = np.asarray(out)
        if field in FLOAT_FIELDS:
            out = out.astype(np.float32, copy=False)
        if field in ("paths", "error"):
            out = out.astype(object)
        return out

    def iter_chunks(
        self,
        fields: Sequence[str] | str = ("heads",),
        layers: Sequence[int] | int | None = None,
        valid_only: bool = False,
    ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield ``(rows, arrays)`` for each chunk of the store, in order.

        Parameters
        ----------
        fields : str or sequence of str
            Any of embedding, heads, mlps, cls_to_cls, norm, labels, paths, ok, error.
            ``ok`` [C] is always included.
        layers : int or sequence of int, optional
            Layers of ``heads`` to read (must be stored); default all stored layers.
        valid_only : bool
            Drop skipped and unfinished rows (``rows`` is then an index array). ``ok`` is False
            for rows of chunks that the committed statistics do not cover yet.

        Yields
        ------
        rows : slice or ndarray
            The store rows of this chunk.
        arrays : dict of ndarray
            Float fields as float32: heads [C, len(layers), H, D], embedding [C, D], ...

        Examples
        --------
        >>> total = 0
        >>> for rows, c in StoreReader("s.zarr").iter_chunks("heads", layers=[-1]):  # doctest: +SKIP
        ...     total += c["heads"][c["ok"]].sum(0)
        """
        if isinstance(fields, str):
            fields = [fields]
        bad = [f for f in fields if f not in ROW_FIELDS + ("norm",)]
        if bad:
            raise ValueError(f"unknown field(s) {bad}; choose from {ROW_FIELDS + ('norm',)}")
        pos = self._layer_positions(layers)
        included = self.included
        for s in range(0, self.n, self.chunk_size):
            e = min(self.n, s + self.chunk_size)
            sl = slice(s, e)
            ok = np.asarray(self.ok[sl], bool) & included[s // self.chunk_size]
            out = {f: self._read(f, sl, pos) for f in fields if f != "ok"}
            out["ok"] = ok
            if valid_only:
                out = {k: v[ok] for k, v in out.items()}
                yield np.arange(s, e)[ok], out
            else:
                yield sl, out

    def decomposition(self, rows: Any = slice(None), layers: Sequence[int] | int | None = None) -> Any:
        """Load some rows as a :class:`StoredDecomposition` (float32 arrays).

        Parameters
        ----------
        rows : slice, int, sequence of int or bool mask [N]
        layers : optional subset of the stored layers for ``heads``

        Examples
        --------
        >>> dec = StoreReader("s.zarr").decomposition(range(8))       # doctest: +SKIP
        >>> dec.heads.shape                                 # doctest: +SKIP
        (8, 4, 12, 512)
        """
        if isinstance(rows, (int, np.integer)):
            rows = [int(rows)]
        if isinstance(rows, slice):
            idx = np.arange(self.n)[rows]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                idx = np.nonzero(idx)[0]
            idx = idx.astype(np.int64)
            idx = np.where(idx < 0, idx + self.n, idx)
        sel = idx if len(idx) != self.n or not np.array_equal(idx, np.arange(self.n)) else slice(None)
        pos = self._layer_positions(layers)
        kept = self.layers if pos is None else tuple(self.layers[p] for p in pos)
        f = {k: self._read(k, sel, pos) for k in FLOAT_FIELDS + ("labels", "paths", "ok")}
        norm = np.linalg.norm(f["embedding"], axis=-1)
        return StoredDecomposition(
            embedding=f["embedding"], heads=f["heads"], mlps=f["mlps"],
            cls_to_cls=f["cls_to_cls"], norm=norm, layers=kept, rows=idx,
            labels=f["labels"], paths=f["paths"], config=self.config,
            ok=f["ok"].astype(bool) & self.included[idx // self.chunk_size],
        )
