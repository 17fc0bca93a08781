"""The chunk protocol shared by a local run and the Dask workers: decode and decompose a chunk of
images, create the store, add up and commit the statistics, summarise a run.

Everything here is used by :func:`clipdecomp.data.runner.run_dataset` (local) and by
:mod:`clipdecomp.data.distributed` (cluster), so both write the same store the same way.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import inspect
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from clipdecomp.data import neuron_store
from clipdecomp.data import store as _store
from clipdecomp.data.sources import ImageSource, load_image, printable_path
from clipdecomp.data.store import Moments, StoreReader
from clipdecomp.engine.config import check_size
from clipdecomp.engine.loading import ModelSpec, checkpoint_path
from clipdecomp.engine.selection import parse_layers

log = logging.getLogger("clipdecomp.data.chunks")


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
    from clipdecomp.engine.safetensors_io import file_fingerprint

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
    path = checkpoint_path(model, spec)
    out = {
        "config": _store.jsonable(cfg),
        "precision": str(getattr(model, "precision", "fp32")),
        "checkpoint": checkpoint_fingerprint(path) if path else None,
    }
    if spec is not None:
        # how to load the model for the commands that read the store later (report, zero-shot:
        # they encode text), so without the towers this run loaded
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "towers"}
        out["spec"] = {"path": spec.path, "kwargs": _store.jsonable(kwargs)}
    return out


def _check_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
    return name


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
        moments, self.included, self.generation = _store.load_committed(out, kept)
        assert moments is not None   # asked with arrays
        self.moments: Moments = moments
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
        #: the neuron statistics this store computes (``run_dataset(..., neurons=)``)
        self.neurons = neuron_store.spec_of_settings(meta["settings"].get("neurons"))

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
    neurons: Any = None,
) -> RunState:
    """Create the store, or check that an existing one matches this run and open it.

    ``neurons`` (``run_dataset(..., neurons=)``) is checked against the model's layers and
    recorded in the settings; ``state.neurons`` is the checked spec (None without).

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
    meta: dict[str, Any] = {
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
    neuron_settings = neuron_store.settings_of(neurons, L)
    if neuron_settings is not None:   # stores without neurons keep their settings as they were
        meta["settings"]["neurons"] = neuron_settings
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
