"""Run :func:`clipdecomp.run_dataset` on a Dask cluster.

Each task is one chunk of the store. A worker loads the model once per process, from a
:class:`~clipdecomp.engine.loading.ModelSpec` (path + load arguments; never a pickled model), keeps it in
a module-level cache, decodes and decomposes the chunk, and writes its rows straight into the
store (chunk-aligned writes, so workers never touch the same file). The statistics of the chunk go
back to the client, which adds them up and commits them with the chunk's done marker: the same
commit protocol as a local run, so a cluster run resumes a local one and the other way round.

    from dask.distributed import Client
    client = Client("tcp://scheduler:8786")
    run_dataset(ModelSpec("ViT-B-16.safetensors"), "imagenet/val", "/shared/val.zarr",
                client=client)

The store and the images must be on a file system that every worker and the client see.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
import uuid
from typing import Any

import numpy as np

from clipdecomp.data import neuron_store
from clipdecomp.data import store as _store
from clipdecomp.data.chunks import (
    ChunkTask,
    _print_summary,
    _summary,
    iter_chunk_results,
    model_identity,
    prepare_store,
)
from clipdecomp.data.sources import ImageSource
from clipdecomp.data.store import StoreReader
from clipdecomp.engine.config import MAX_THREADS, check_size
from clipdecomp.engine.helpers import optional_import, progress_bar
from clipdecomp.engine.loading import ModelSpec
from clipdecomp.methods.neuron_stats import NeuronStatsSpec

__all__ = ["local_client", "run_distributed", "worker_model"]

# per worker process: spec key -> (model, lock held around model calls)
_MODELS: dict[str, tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()
_POOL: cf.ThreadPoolExecutor | None = None


def _dask() -> Any:
    return optional_import(
        "distributed", "running on a cluster needs dask.distributed: pip install 'clipdecomp[data]'")


def worker_model(spec: ModelSpec) -> tuple[Any, threading.Lock]:
    """The model of ``spec`` in this process, loaded on first use and cached.

    Returns the model and a lock that serialises calls into it (workers with several threads).

    Examples
    --------
    >>> model, lock = worker_model(ModelSpec("ViT-B-16.safetensors"))   # doctest: +SKIP
    """
    key = spec.key()
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = (spec.load(), threading.Lock())
        return _MODELS[key]


def _pool(threads: int) -> cf.ThreadPoolExecutor:
    global _POOL
    with _MODELS_LOCK:
        if _POOL is None:
            _POOL = cf.ThreadPoolExecutor(threads, thread_name_prefix="clipdecomp-decode")
        return _POOL


def identity_task(spec: ModelSpec) -> dict:
    """Run on a worker: the model identity a store records (loads and caches the model)."""
    model, _ = worker_model(spec)
    return model_identity(model, spec)


def chunk_task(
    spec: ModelSpec,
    out: str,
    task: ChunkTask,
    batch_size: int,
    kept: tuple,
    decode_threads: int | None = None,
    neurons: NeuronStatsSpec | None = None,
) -> dict:
    """Run on a worker: compute one chunk, write its rows, return its statistics."""
    model, lock = worker_model(spec)
    pool = _pool(decode_threads or min(4, os.cpu_count() or 1))
    res = next(iter(iter_chunk_results(model, [task], batch_size, kept, pool, lock=lock)))
    res.finish()
    if neurons is not None:
        res.arrays.update(neuron_store.chunk_rows(model, task.paths, res.ok, neurons,
                                                  batch_size, lock=lock))
    root = _store._zarr().open_group(out, mode="r+")
    digest = _store.write_rows(root, res.start, res.arrays, res.ok, res.errors)
    return {
        "digest": digest,
        "index": res.index,
        "start": res.start,
        "ok": res.ok,
        "errors": res.errors,
        "moments": res.moments,
        "seconds": res.seconds,
    }


def neuron_stats_task(spec: ModelSpec, out: str, force: bool) -> list[int]:
    """Run on a worker: the neuron statistics of a complete store (its model from ``spec``)."""
    model, lock = worker_model(spec)
    with lock:
        return neuron_store.finalize(model, out, force=force)


def local_client(n_workers: int, threads: int | None = None) -> Any:
    """A Client on a new LocalCluster of ``n_workers`` single-threaded processes, each with
    ``threads`` compute threads (OMP_NUM_THREADS; default CPUs / n_workers).

    Examples
    --------
    >>> client = local_client(2)                         # doctest: +SKIP
    """
    distributed = _dask()
    n_workers = check_size(n_workers, "n_workers")
    threads = check_size(threads, "threads", maximum=MAX_THREADS,
                         default=max(1, (os.cpu_count() or 1) // n_workers))
    cluster = distributed.LocalCluster(
        n_workers=int(n_workers),
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        env={"OMP_NUM_THREADS": str(threads)},
    )
    return distributed.Client(cluster)


def _n_threads(client) -> int:
    return max(1, int(sum(client.nthreads().values())))


def run_distributed(
    spec: ModelSpec,
    source: ImageSource,
    out: str,
    *,
    chunk_size: int = 256,
    batch_size: int = 8,
    dtype: str = "float32",
    layers: Any = None,
    progress: bool = True,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    decode_threads: int | None = None,
    checkpoint_seconds: float | None = None,
    overwrite: bool = False,
    expected_config: dict | None = None,
    content_hash: bool = False,
    expected_precision: str | None = None,
    neurons: NeuronStatsSpec | None = None,
) -> StoreReader:
    """The Dask side of :func:`clipdecomp.run_dataset` (same arguments; see there).

    ``expected_config`` and ``expected_precision`` (those of a model object the caller holds)
    must be the config and precision of the model the workers load, else ValueError. The
    client holds the store's lock for the whole run.

    Uses ``client`` if given, else connects to ``scheduler``, else starts a local cluster of
    ``workers`` processes (and closes what it opened). At most two chunks per worker thread
    are in flight, so the client's memory stays flat.
    """
    distributed = _dask()
    own = None
    if client is None:
        if scheduler is not None:
            client = own = distributed.Client(scheduler)
        else:
            client = own = local_client(int(workers or 2))

    try:
        with _store.store_lock(out):
            return _run_on(client, spec, source, out, chunk_size, batch_size, dtype, layers,
                           progress, decode_threads, checkpoint_seconds, overwrite,
                           expected_config, content_hash, expected_precision, neurons)
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None and workers is not None and scheduler is None:
                cluster.close()


def _run_on(client, spec, source, out, chunk_size, batch_size, dtype, layers, progress,
            decode_threads, checkpoint_seconds, overwrite, expected_config, content_hash,
            expected_precision, neurons=None) -> StoreReader:
    """:func:`run_distributed` on a client, with the store's lock held."""
    distributed = _dask()
    identity = client.submit(identity_task, spec, pure=False).result()
    if expected_config is not None:
        got = identity["config"]
        diff = _store.config_differences(got, expected_config)
        if diff:
            raise ValueError(
                f"the workers' model, loaded from {spec.path}, differs from the model given "
                f"in config.{diff[0]}: {got.get(diff[0])!r} against "
                f"{expected_config.get(diff[0])!r}; pass a ModelSpec with the load arguments"
            )
    got = identity.get("precision", "fp32")
    if expected_precision is not None and got != expected_precision:
        raise ValueError(
            f"the workers' model, loaded from {spec.path}, runs in precision {got!r}, the "
            f"model given in {expected_precision!r} (a worker without AVX512_BF16 emulates "
            "bf16); pass a ModelSpec with precision= that every worker can run")
    state = prepare_store(out, identity, source, dtype, layers, chunk_size, overwrite,
                          checkpoint_seconds, content_hash, neurons)
    tasks = state.tasks(source)
    todo = state.rows_to_do(len(source))
    bar = progress_bar(total=len(source), initial=len(source) - todo, unit="img",
                       enabled=progress, desc="clipdecomp", dynamic_ncols=True)
    t0 = time.perf_counter()
    interrupted = True
    tag = uuid.uuid4().hex[:8]
    queue = iter(tasks)
    running = distributed.as_completed()
    skipped = 0

    def submit_more() -> None:
        while running.count() < max(2, 2 * _n_threads(client)):
            t = next(queue, None)
            if t is None:
                return
            running.add(client.submit(
                chunk_task, spec, out, t, int(batch_size), state.kept, decode_threads,
                state.neurons, key=f"clipdecomp-chunk-{tag}-{t.index}", pure=False,
            ))

    try:
        submit_more()
        for fut in running:
            rep = fut.result()
            fut.release()
            s = rep["start"]
            n = len(rep["ok"])
            state.add(rep["index"], rep["moments"], rep["ok"], rep["errors"],
                      [source.paths[i] for i in range(s, s + n)], s, rep.get("digest", ""))
            bad = n - int(np.count_nonzero(rep["ok"]))
            skipped += bad
            bar.update(n)
            if bad:
                bar.set_postfix(skipped=skipped)
            submit_more()
        interrupted = False
    finally:
        for f in list(running.futures):
            f.cancel()
        state.commit()
        bar.close()
        summary = _summary(state, time.perf_counter() - t0, "dask", int(batch_size),
                           len(source), interrupted)
        summary["workers"] = len(client.nthreads())
        _store.append_run(out, summary)
        if progress:
            _print_summary(summary, out)
    if state.neurons is not None:   # every chunk is done: the neuron statistics, on a worker
        client.submit(neuron_stats_task, spec, out, state.rows_done > 0, pure=False).result()
    return StoreReader(out)
