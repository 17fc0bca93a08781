"""Each GEMM kernel of the core against the peak rate of its instruction, on one core.

How close to the machine's limit a kernel runs depends on the limit, and the limit differs
between CPUs: the rate of ``vdpbf16ps`` relative to ``vfmadd231ps`` is not the same on every
core that has both, and AMX tiles exist only on some. This benchmark measures the limits
themselves (``benchmarks/isa_peak.c``: independent multiply-adds on registers, no memory
traffic) and, in the same rounds, the core's GEMM on ViT-B/16's four linear layers at batch 8,
one thread, on each path the CPU can run:

- ``fp32 avx512`` against ``vfmadd231ps zmm``; ``fp32 avx2`` (the path of AVX2-only CPUs,
  forced here) against ``vfmadd231ps ymm``;
- ``bf16 vdpbf16ps`` (AMX turned off: the path of AVX512_BF16 CPUs without AMX) against
  ``vdpbf16ps zmm``;
- ``bf16 amx`` against ``tdpbf16ps`` on 2 x 2 tiles (the kernel's products without its loads).

Each round measures every peak and every GEMM once; the table gives medians over rounds of the
rates and of the per-round ratio GEMM / peak (a shared machine's speed moves between rounds,
the ratio of two measurements made seconds apart much less). GFLOP/s count 2 per multiply-add.

Usage::

    python benchmarks/bench_peak.py [--rounds 7]

From Python: ``bench_peak.run(rounds) -> dict`` (used by ``benchmarks/run.py``).
Needs gcc (the peak kernels are compiled on the fly).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# one round of each peak function, in FLOP (see isa_peak.c)
FLOP_PER_ITER = {
    "fma_ymm": 12 * 8 * 2,
    "fma_zmm": 12 * 16 * 2,
    "dpbf16_zmm": 24 * 32 * 2,
    "amx_tdpbf16": 4 * 16 * 16 * 32 * 2,
}
INSTRUCTION = {
    "fma_ymm": "vfmadd231ps ymm",
    "fma_zmm": "vfmadd231ps zmm",
    "dpbf16_zmm": "vdpbf16ps zmm",
    "amx_tdpbf16": "tdpbf16ps (2 x 2 tiles)",
}
# ViT-B/16 at batch 8: M = 8 * 197
SHAPES = [("qkv", 1576, 768, 2304), ("out", 1576, 768, 768), ("fc", 1576, 768, 3072),
          ("proj", 1576, 3072, 768)]
REPEAT = 2  # products per timed _matmul call (one packing of the weight)


def build(work: Path) -> ctypes.CDLL:
    """Compile isa_peak.c into a shared library in ``work`` and load it."""
    so = work / "isa_peak.so"
    r = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so),
                        str(HERE / "isa_peak.c")], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling benchmarks/isa_peak.c failed:\n{r.stderr}")
    lib = ctypes.CDLL(str(so))
    fp = ctypes.POINTER(ctypes.c_float)
    for name in ("peak_fma_ymm", "peak_fma_zmm", "peak_dpbf16_zmm"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_long, fp]
        fn.restype = ctypes.c_double
    lib.peak_amx_tdpbf16.argtypes = [ctypes.c_long, ctypes.c_void_p, fp]
    lib.peak_amx_tdpbf16.restype = ctypes.c_double
    lib.amx_permit.restype = ctypes.c_int
    return lib


class Peaks:
    """The peak functions this CPU can run, each calibrated to about ``seconds`` per call."""

    def __init__(self, lib: ctypes.CDLL, kinds: list[str], seconds: float = 0.05):
        self.lib = lib
        self.sink = np.zeros(256, dtype=np.float32)
        rng = np.random.default_rng(0)
        # A and B tiles of bf16 values in [0.5, 1): sign 0, exponent 126, random mantissa
        tiles = (0x3F00 | rng.integers(0, 128, size=2048)).astype(np.uint16)
        self.tiles = np.ascontiguousarray(tiles)
        self.iters = {}
        for k in kinds:
            n = 1000
            while self._call(k, n) < seconds / 4:
                n *= 4
            self.iters[k] = max(1, int(n * seconds / max(self._call(k, n), 1e-6)))

    def _call(self, kind: str, n: int) -> float:
        sink = self.sink.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if kind == "amx_tdpbf16":
            return self.lib.peak_amx_tdpbf16(n, self.tiles.ctypes.data, sink)
        return getattr(self.lib, "peak_" + kind)(n, sink)

    def gflops(self, kind: str) -> float:
        n = self.iters[kind]
        return FLOP_PER_ITER[kind] * n / self._call(kind, n) / 1e9


def _child(rounds: int) -> dict:
    """The measurement, in a process whose OpenMP team has one thread."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from bench_bf16 import _lib

    from clipdecomp import _core

    core = _lib()
    core.cd_cpu_set_amx.argtypes = [ctypes.c_int]
    core.cd_set_isa.argtypes = [ctypes.c_char_p]
    best = _core.isa()
    has_bf16 = bool(_core.has_bf16())
    has_amx = bool(core.cd_cpu_can_amx())
    # (path, peak kind, isa to set, precision, amx on)
    paths = []
    if best == "avx512":
        paths.append(("fp32 avx512", "fma_zmm", "avx512", "fp32", 0))
    if best in ("avx512", "avx2"):
        paths.append(("fp32 avx2", "fma_ymm", "avx2", "fp32", 0))
    if has_bf16:
        paths.append(("bf16 vdpbf16ps", "dpbf16_zmm", "avx512", "bf16", 0))
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        if has_amx and lib.amx_permit():
            paths.append(("bf16 amx", "amx_tdpbf16", "avx512", "bf16", 1))
        peaks = Peaks(lib, [p[1] for p in paths])
        rng = np.random.default_rng(0)
        data = [(rng.standard_normal((m, k), dtype=np.float32),
                 rng.standard_normal((n, k), dtype=np.float32)) for _, m, k, n in SHAPES]
        flop = sum(2.0 * m * k * n * REPEAT for _, m, k, n in SHAPES)

        def gemm(isa: str, precision: str, amx: int) -> float:
            core.cd_set_isa(isa.encode())
            core.cd_cpu_set_amx(amx)
            try:
                t0 = time.perf_counter()
                for x, w in data:
                    _core._matmul(x, w, None, repeat=REPEAT, precision=precision)
                return flop / (time.perf_counter() - t0) / 1e9
            finally:
                core.cd_set_isa(best.encode())
                core.cd_cpu_set_amx(1 if has_amx else 0)

        for _, _, isa, prec, amx in paths:  # warm-up
            gemm(isa, prec, amx)
        rec: dict = {p[0]: {"peak": [], "gemm": [], "ratio": []} for p in paths}
        for _ in range(rounds):
            for name, kind, isa, prec, amx in paths:
                pk = peaks.gflops(kind)
                g = gemm(isa, prec, amx)
                rec[name]["peak"].append(pk)
                rec[name]["gemm"].append(g)
                rec[name]["ratio"].append(g / pk)
        rows = []
        for name, kind, *_ in paths:
            r = rec[name]
            rows.append({"path": name, "instruction": INSTRUCTION[kind],
                         "peak": float(np.median(r["peak"])), "gemm": float(np.median(r["gemm"])),
                         "ratio": float(np.median(r["ratio"]))})
    by = {r["path"]: r for r in rows}
    ratios = {}
    if "fp32 avx512" in by and "bf16 vdpbf16ps" in by:
        ratios["vdpbf16ps / vfmadd zmm (peak)"] = (by["bf16 vdpbf16ps"]["peak"]
                                                   / by["fp32 avx512"]["peak"])
    if "fp32 avx512" in by and "bf16 amx" in by:
        ratios["tdpbf16ps / vfmadd zmm (peak)"] = by["bf16 amx"]["peak"] / by["fp32 avx512"]["peak"]
    return {"rows": rows, "ratios": ratios, "isa": best, "rounds": rounds,
            "load": list(os.getloadavg())}


def run(rounds: int = 7) -> dict:
    """Measure in a child process with one OpenMP thread (see the module's docstring)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().split("\n")[-1])


def markdown(res: dict, command: str) -> str:
    from run import cpu_model

    lines = [f"Command: `{command}`  ",
             (f"CPU: {cpu_model()}, ISA path: {res['isa']}, one thread, {res['rounds']} rounds, "
             f"load average after {tuple(round(x, 2) for x in res['load'])}"), "",
             ("| path | instruction | peak GFLOP/s (one core) | GEMM GFLOP/s (one core, ViT-B/16 "
             "layers) | GEMM / peak |"),
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['path']} | {r['instruction']} | {r['peak']:.1f} | {r['gemm']:.1f} | "
                     f"{r['ratio']:.2f} |")
    if res["ratios"]:
        lines.append("")
        lines.append("Peaks against each other: " + ", ".join(
            f"{k} = {v:.2f}" for k, v in res["ratios"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.rounds)))
        return
    sys.path.insert(0, str(HERE))
    print(markdown(run(a.rounds), f"python benchmarks/bench_peak.py --rounds {a.rounds}"))


if __name__ == "__main__":
    main()
