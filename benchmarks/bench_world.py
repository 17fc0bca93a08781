"""Throughput of the shapes world: ``clipdecomp.toy.generate`` in images per second.

Each measurement is one call of ``generate(batch, seed)`` at the default 64x64 size, which
draws the backgrounds, the objects, their masks and the captions and fills every label. The
calls are timed with a wall clock, after one warm-up call per batch size, with a new seed for
each repetition; the table gives the best and the median rate over the repetitions, and the
median rate by the CPU time of the process (steadier than the wall clock on a shared machine,
where the process waits for a core now and then). Run it on one core (``OMP_NUM_THREADS=1``,
the default here; the generator is single-threaded NumPy and Python anyway).

``--baseline path/to/world.py`` also times another version of ``clipdecomp/toy/world.py`` (for
example the file of an earlier commit), alternating its calls with the current version's so
that both see the same machine load, and checks that both give identical batches (images,
masks, foreground, captions and labels) for one seed per batch size. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_world.py [--batches 16,64,256,1024]
        [--repeats 7] [--baseline old_world.py]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib.util
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout, when run from the source tree
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import cpu_model

from clipdecomp.toy import world


def load_module(path: str) -> ModuleType:
    """Import a stand-alone copy of ``world.py`` (it needs only NumPy) under its own name."""
    spec = importlib.util.spec_from_file_location("baseline_world", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def same_batch(a, b) -> bool:
    """Whether two ShapesBatch are identical: images, masks, foreground, captions, labels."""
    if a.captions != b.captions or not np.array_equal(a.images, b.images):
        return False
    if not np.array_equal(a.foreground, b.foreground) or len(a.masks) != len(b.masks):
        return False
    if any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a.masks, b.masks)):
        return False
    if a.labels.keys() != b.labels.keys():
        return False
    return all(a.labels[k].dtype == b.labels[k].dtype
               and np.array_equal(a.labels[k], b.labels[k], equal_nan=a.labels[k].dtype.kind == "f")
               for k in a.labels)


def time_call(mod: ModuleType, batch: int, seed: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one generate call."""
    t0, c0 = time.perf_counter(), time.process_time()
    mod.generate(batch, seed=seed)
    return time.perf_counter() - t0, time.process_time() - c0


def run(batches: list[int], repeats: int, baseline: ModuleType | None = None) -> list[dict]:
    """One row per batch size: images/s of the current (and baseline) version: best and median
    over the repetitions by the wall clock, median by the CPU time of the process."""
    mods = {"current": world} if baseline is None else {"current": world, "baseline": baseline}
    rows = []
    for batch in batches:
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in mods}
        for mod in mods.values():
            mod.generate(batch, seed=10_000)  # warm-up: imports, allocator, caches
        for rep in range(repeats):
            for name, mod in mods.items():  # alternate: both see the same machine load
                times[name].append(time_call(mod, batch, seed=rep))
        row = {"batch": batch, "repeats": repeats}
        for name, ts in times.items():
            wall = [w for w, _ in ts]
            row[f"{name}_best"] = batch / min(wall)
            row[f"{name}_median"] = batch / statistics.median(wall)
            row[f"{name}_cpu"] = batch / statistics.median([c for _, c in ts])
        if baseline is not None:
            row["speedup"] = row["current_median"] / row["baseline_median"]
            row["identical"] = same_batch(world.generate(batch, seed=1),
                                          baseline.generate(batch, seed=1))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [("batch", "batch"), ("repeats", "repeats"), ("current_best", "img/s best"),
            ("current_median", "img/s median"), ("current_cpu", "img/s CPU median")]
    if "baseline_best" in rows[0]:
        cols += [("baseline_best", "baseline best"), ("baseline_median", "baseline median"),
                 ("baseline_cpu", "baseline CPU median"), ("speedup", "speedup (median)"),
                 ("identical", "identical output")]

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.2f}" if v < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[key]) for key, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,64,256,1024", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per batch size")
    ap.add_argument("--baseline", default=None, help="another world.py to time against")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    baseline = load_module(a.baseline) if a.baseline else None
    rows = run(batches, a.repeats, baseline)
    cmd = " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable), *sys.argv])
    print(f"Command: `OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {cmd}`  ")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), one process; "
          f"Python {platform.python_version()}, NumPy {np.__version__}  ")
    print(f"generate(batch, seed) at {world.IMAGE_SIZE}x{world.IMAGE_SIZE}: backgrounds, objects, "
          "masks, captions and labels; images/s by the wall clock unless marked CPU\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
