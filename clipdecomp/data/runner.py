"""Decompose whole image collections into a Zarr store, with flat memory, resumably.

    from clipdecomp.data.runner import run_dataset
    store = run_dataset(model, "imagenet/val", "val.zarr", layers="-4:", dtype="float16")
    store.stats.mean_heads          # [L, H, D]  (mean ablation)
    store.stats.covariance(11, 3)   # [D, D]     (TextSpan from moments)

Images stream through the model in batches while a thread pool decodes and preprocesses the
next batches; each chunk of ``chunk_size`` rows is written once, in its own Zarr chunks, and
the statistics are committed beside it (see :mod:`clipdecomp.data.store`). Starting the same command
again resumes. With ``client=`` / ``scheduler=`` / ``workers=`` the chunks run on Dask workers
(:mod:`clipdecomp.data.distributed`).

Command line: ``clipdecomp run SOURCE --model M --out STORE`` (see
:func:`clipdecomp.cli.run_main`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import time
from typing import Any

from clipdecomp.data import neuron_store
from clipdecomp.data import store as _store
from clipdecomp.data.chunks import (
    ChunkResult,
    _check_dtype,
    _print_summary,
    _summary,
    iter_chunk_results,
    model_identity,
    prepare_store,
)
from clipdecomp.data.sources import open_source
from clipdecomp.data.store import StoreReader
from clipdecomp.engine.config import MAX_THREADS, check_size
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.engine.loading import ModelSpec, spec_of
from clipdecomp.methods.neuron_stats import NeuronStatsSpec

log = logging.getLogger("clipdecomp.data.runner")

__all__ = ["run_dataset"]


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
    neurons: Any = None,
) -> StoreReader:
    """Decompose every image of a collection into a Zarr store; resume it if it exists.

    Parameters
    ----------
    model : CLIP, ModelSpec or str
        A loaded model, or how to load one (required for Dask: workers load their own). A
        spec or path is loaded with its image tower alone (:meth:`ModelSpec.image_tower`):
        the run never encodes text. The store records the model's identity without its text
        tower (``store.TEXT_TOWER_FIELDS``), so a store made by a model with both towers
        resumes with one loaded image-only, and the other way round; the spec it records
        loads the whole model (for the commands that encode text later).
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
    neurons : int, sequence of int, NeuronStatsSpec or dict, optional
        Also compute the statistics of the second-order effects of the MLP neurons of these
        layers (:class:`~clipdecomp.methods.neuron_stats.NeuronStatsSpec`: ``layers``, ``k``
        top images, default 100): per-image neuron coefficients are stored with every chunk
        (one more forward pass per image and layer) and, once the store is complete, each
        neuron's mean effect, centred norm on every image, top-k images and first principal
        component are written into it; read them with ``StoreReader.neuron_stats(layer)``.
        Memory does not grow with the number of images (see :mod:`clipdecomp.data.neuron_store`).

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
    another run on the same store raises :class:`clipdecomp.data.store.StoreBusyError` (a
    RuntimeError) naming the process that holds it.

    Examples
    --------
    >>> model = clipdecomp.load("ViT-B-16")                                  # doctest: +SKIP
    >>> st = run_dataset(model, "imagenet/val", "val.zarr", layers="-4:")    # doctest: +SKIP
    >>> st.stats.mean_heads.shape                                            # doctest: +SKIP
    (12, 12, 512)
    >>> st = run_dataset(model, "imagenet/val", "val.zarr",               # doctest: +SKIP
    ...                  neurons=NeuronStatsSpec(9, k=100))
    >>> st.neuron_stats(9).pcs.shape                                         # doctest: +SKIP
    (3072, 512)
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
    neurons = NeuronStatsSpec.of(neurons)
    if client is not None or scheduler is not None or workers:
        from clipdecomp.data import distributed as _dist

        expected = None
        if not isinstance(model, (ModelSpec, str, os.PathLike)):
            expected = _store.jsonable(model.config)
        return _dist.run_distributed(
            spec_of(model).image_tower(), src, out, expected_config=expected, chunk_size=chunk_size,
            batch_size=batch_size, dtype=dtype, layers=layers, progress=progress, client=client,
            scheduler=scheduler, workers=workers, decode_threads=decode_threads,
            checkpoint_seconds=checkpoint_seconds, overwrite=overwrite,
            content_hash=content_hash,
            expected_precision=None if expected is None else str(model.precision),
            neurons=neurons,
        )
    spec = None
    if isinstance(model, (ModelSpec, str, os.PathLike)):
        spec = spec_of(model).image_tower()   # the run never encodes text
        model = spec.load()
    identity = model_identity(model, spec)
    if neurons is not None:
        neuron_store.check_model(model)
    with _store.store_lock(out):
        return _run_local(model, src, out, identity, dtype, layers, chunk_size, batch_size,
                          overwrite, checkpoint_seconds, content_hash, decode_threads, progress,
                          neurons)


def _run_local(model, src, out, identity, dtype, layers, chunk_size, batch_size, overwrite,
               checkpoint_seconds, content_hash, decode_threads, progress,
               neurons=None) -> StoreReader:
    """The local run of :func:`run_dataset`, with the store's lock held."""
    state = prepare_store(out, identity, src, dtype, layers, chunk_size, overwrite,
                          checkpoint_seconds, content_hash, neurons)
    tasks = state.tasks(src)
    todo = state.rows_to_do(len(src))
    n_threads = decode_threads or min(4, os.cpu_count() or 1)

    bar = progress_bar(total=len(src), initial=len(src) - todo, unit="img", enabled=progress,
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
            if state.neurons is not None:   # the chunk's neuron rows, written with its rows
                res.arrays.update(neuron_store.chunk_rows(
                    model, [src.abspath(i) for i in range(res.start, res.start + len(res.ok))],
                    res.ok, state.neurons, int(batch_size)))
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
    if state.neurons is not None:   # every chunk is done: the neuron statistics
        neuron_store.finalize(model, out, force=state.rows_done > 0, progress=progress)
    return StoreReader(out)
