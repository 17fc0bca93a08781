"""The GEMM kernels alone: clipdecomp's C core against ``numpy.matmul`` on ViT shapes.

Rows: the four linear layers of ViT-B/16 and ViT-L/14 at batch 8 (``M = 8 * tokens``), in the
``nn.Linear`` convention ``out [M, N] = inp [M, K] @ weight[N, K]^T``, and the two attention
products of one head (``q k^T`` with K = head width 64, ``p v``). The two sides run in
alternating blocks of ``reps`` calls, the best call is kept (the machine may be shared), and
GFLOP/s = 2 M N K / seconds. ``ratio`` = clipdecomp GFLOP/s / NumPy GFLOP/s (> 1: clipdecomp
faster).

``clipdecomp._core._matmul`` packs the weight on every call (the model packs it once, at load).
When it accepts ``repeat=R`` (pack once, multiply R times) the packing is spread over R products;
otherwise the time includes it, and the row says so.

The measurement runs in a child process whose OpenMP and OpenBLAS thread counts are set to
``threads``, so both sides use the same number of threads.

Usage::

    python benchmarks/bench_gemm.py [--threads N] [--reps R]

From Python: ``bench_gemm.run(threads) -> list[dict]`` (used by ``benchmarks/run.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

REPEAT = 8  # products per timed _matmul call, when the core supports repeat=
PAUSE = 0.3  # seconds between timed blocks (see _alternating)

# name, M, K, N: linear layers at batch 8 (B/16: 197 tokens, L/14: 257 tokens)
LINEAR = [
    ("B/16 qkv", 8 * 197, 768, 3 * 768),
    ("B/16 out", 8 * 197, 768, 768),
    ("B/16 fc", 8 * 197, 768, 3072),
    ("B/16 proj", 8 * 197, 3072, 768),
    ("L/14 qkv", 8 * 257, 1024, 3 * 1024),
    ("L/14 out", 8 * 257, 1024, 1024),
    ("L/14 fc", 8 * 257, 1024, 4096),
    ("L/14 proj", 8 * 257, 4096, 1024),
]
# name, kind, M, K, N: one attention head (d = 64)
ATTENTION = [
    ("B/16 q k^T", "nt", 197, 64, 197),
    ("L/14 q k^T", "nt", 257, 64, 257),
    ("L/14-336 q k^T", "nt", 577, 64, 577),
    ("B/16 p v", "nn", 197, 197, 64),
    ("L/14 p v", "nn", 257, 257, 64),
]


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _alternating(fa, fb, reps: int, rounds: int = 2) -> tuple[float, float]:
    """Best seconds of ``fa`` and ``fb``, in alternating blocks of ``reps`` calls.

    Blocks, not single calls, with a pause after each: the thread pool of one side (OpenBLAS
    or OpenMP) keeps spinning for a while after its call, and would otherwise steal a core
    from the other side's next call. Alternating rounds let both sides see the same load.
    """
    fa(), fb()  # warm up: first-touch pages, thread pools
    ta = tb = float("inf")
    for _ in range(rounds):
        ta = min(ta, _best(fa, reps))
        time.sleep(PAUSE)
        tb = min(tb, _best(fb, reps))
        time.sleep(PAUSE)
    return ta, tb


def _supports_repeat(core) -> bool:
    x = np.ones((1, 1), np.float32)
    try:
        core._matmul(x, x, None, repeat=2)
    except TypeError:
        return False
    return True


def measure(reps: int = 7) -> list[dict]:
    """All rows, in this process, with whatever thread counts it was started with.

    Returns
    -------
    list of dict
        One per shape: ``op, M, K, N, numpy GFLOP/s, clipdecomp GFLOP/s, ratio, note``.

    Examples
    --------
    >>> rows = measure(reps=3)  # doctest: +SKIP
    >>> rows[0]["op"]  # doctest: +SKIP
    'B/16 qkv'
    """
    from clipdecomp import _core as core

    rng = np.random.default_rng(0)
    repeat = REPEAT if _supports_repeat(core) else 1
    rows = []
    for name, M, K, N in LINEAR:
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        if repeat > 1:
            def ours(x=x, w=w):
                return core._matmul(x, w, None, repeat=repeat)
        else:
            def ours(x=x, w=w):
                return core._matmul(x, w, None)
        t_np, t_ours = _alternating(lambda x=x, w=w: np.matmul(x, w.T), ours, reps)
        t_ours /= repeat
        rows.append(_row(name, M, K, N, t_np, t_ours,
                         "" if repeat > 1 else "clipdecomp time includes packing the weight"))
    for name, kind, M, K, N in ATTENTION:
        a = rng.standard_normal((M, K), dtype=np.float32)
        if kind == "nt":
            bm = rng.standard_normal((N, K), dtype=np.float32)
            f_np, f_ours = (lambda a=a, bm=bm: a @ bm.T), (lambda a=a, bm=bm: core._sgemm_nt(a, bm))
        else:
            bm = rng.standard_normal((K, N), dtype=np.float32)
            f_np, f_ours = (lambda a=a, bm=bm: a @ bm), (lambda a=a, bm=bm: core._sgemm_nn(a, bm))
        t_np, t_ours = _alternating(f_np, f_ours, 4 * reps)  # short: more repetitions
        rows.append(_row(name, M, K, N, t_np, t_ours, f"sgemm_{kind}"))
    return rows


def _row(name, M, K, N, t_np, t_ours, note) -> dict:
    flop = 2.0 * M * K * N
    return {"op": name, "M": M, "K": K, "N": N,
            "numpy GFLOP/s": flop / t_np / 1e9, "clipdecomp GFLOP/s": flop / t_ours / 1e9,
            "ratio": t_np / t_ours, "note": note}


def run(threads: int | None = None, reps: int = 7) -> list[dict]:
    """Measure in a child process with ``threads`` OpenMP / OpenBLAS threads.

    Parameters
    ----------
    threads : int, optional
        Threads for both sides; default: every logical core.
    reps : int
        Repetitions per shape (the best is kept).

    Returns
    -------
    list of dict
        One per shape: ``op, M, K, N, numpy GFLOP/s, clipdecomp GFLOP/s, ratio, note``.

    Examples
    --------
    >>> rows = run(threads=2)  # doctest: +SKIP
    >>> [round(r["ratio"], 2) for r in rows]  # doctest: +SKIP
    """
    threads = threads or os.cpu_count() or 1
    n = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    p = subprocess.run([sys.executable, __file__, "--child", "--reps", str(reps)],
                       capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"GEMM benchmark failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.reps)))
        return
    from clipdecomp import _core as core

    rows = run(args.threads, args.reps)
    print(f"ISA path: {core.isa()}, threads: {args.threads or os.cpu_count()}")
    print(f"{'op':16s} {'M':>5s} {'K':>5s} {'N':>5s} {'numpy':>8s} {'ours':>8s} {'ratio':>6s}  GFLOP/s")
    for r in rows:
        print(f"{r['op']:16s} {r['M']:5d} {r['K']:5d} {r['N']:5d} {r['numpy GFLOP/s']:8.1f} "
              f"{r['clipdecomp GFLOP/s']:8.1f} {r['ratio']:6.2f}  {r['note']}")


if __name__ == "__main__":
    main()
