"""The core's GEMM against the GEMM of another git revision, side by side in one binary.

A change to the C kernels or to their blocking is measured here: the GEMM sources of
``--base`` (default ``HEAD``) and of the working tree are compiled, the base's object renamed
symbol by symbol (prefix ``base_``), and both linked into ``benchmarks/gemm_ab.c``, which calls
the two in turn on the same inputs, round after round. A shared machine's speed swings by 2x
within minutes; the ratio of two calls made back to back does not, so the table reports the
median of the per-round time ratios beside the median rates. ``max |diff|`` compares the two
outputs (0 when the change keeps every sum in the same order).

Usage::

    python benchmarks/bench_gemm_ab.py [--base REV] [--precision bf16|fp32] [--rounds 21]
                                       [--threads 2]

Needs gcc, ld and objcopy (binutils). Rows: the four linear layers of ViT-B/16 and ViT-L/14
at batch 8.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["gemm.c", "gemm_avx2.c", "gemm_avx512.c", "cpu.c"]
HEADERS = ["gemm.h", "gemm_kernels.h", "cpu.h", "clipdecomp.h"]
CFLAGS = ["-O2", "-std=c11", "-fopenmp", "-D_GNU_SOURCE"]

# name, M (8 images of 197 or 257 tokens), K, N
SHAPES = [
    ("B16 qkv", 1576, 768, 2304), ("B16 out", 1576, 768, 768),
    ("B16 fc", 1576, 768, 3072), ("B16 proj", 1576, 3072, 768),
    ("L14 qkv", 2056, 1024, 3072), ("L14 out", 2056, 1024, 1024),
    ("L14 fc", 2056, 1024, 4096), ("L14 proj", 2056, 4096, 1024),
]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def build(base: str, work: Path) -> Path:
    """Compile the base revision's GEMM (renamed) and the tree's, link the harness; the path
    of the binary."""
    src = work / "base"
    src.mkdir()
    for f in SOURCES + HEADERS:
        text = _run(["git", "show", f"{base}:csrc/{f}"], cwd=ROOT)
        (src / f).write_text(text)
    objs = []
    for f in SOURCES:
        o = work / f"base_{f}.o"
        _run(["gcc", *CFLAGS, f"-I{src}", "-c", str(src / f), "-o", str(o)])
        objs.append(str(o))
    merged = work / "base_all.o"
    _run(["ld", "-r", *objs, "-o", str(merged)])
    names = _run(["nm", "-g", "--defined-only", str(merged)]).split("\n")
    syms = work / "syms.txt"
    syms.write_text("".join(f"{ln.split()[-1]} base_{ln.split()[-1]}\n"
                            for ln in names if ln.strip()))
    renamed = work / "base_renamed.o"
    _run(["objcopy", f"--redefine-syms={syms}", str(merged), str(renamed)])
    exe = work / "gemm_ab"
    _run(["gcc", *CFLAGS, f"-I{ROOT / 'csrc'}", "-o", str(exe),
          str(ROOT / "benchmarks" / "gemm_ab.c"), *[str(ROOT / "csrc" / f) for f in SOURCES],
          str(renamed), "-lm"])
    return exe


def run(base: str = "HEAD", precision: str = "bf16", rounds: int = 21, threads: int = 2,
        shapes: list[tuple[str, int, int, int]] | None = None) -> list[dict]:
    """Rows of the table (see the module's docstring); ``shapes`` (name, M, K, N) default
    :data:`SHAPES`."""
    shapes = SHAPES if shapes is None else shapes
    for tool in ("gcc", "ld", "nm", "objcopy", "git"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"bench_gemm_ab needs {tool}")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(base, Path(tmp))
        args = [str(exe), precision, str(rounds)]
        for _, m, k, n in shapes:
            args += [str(m), str(k), str(n)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    rows = []
    for (name, *_), line in zip(shapes, out.strip().split("\n"), strict=True):
        m, k, n, gb, gt, ratio, diff = line.split()
        rows.append({"op": name, "M": int(m), "K": int(k), "N": int(n),
                     "base_gflops": float(gb), "this_gflops": float(gt),
                     "ratio": float(ratio), "max_diff": float(diff)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_bf16 import bf16_kernel
    from run import cpu_model

    from clipdecomp import _core

    rows = run(a.base, a.precision, a.rounds, a.threads)
    rev = _run(["git", "rev-parse", "--short", a.base], cwd=ROOT).strip()
    print(f"Command: `python benchmarks/bench_gemm_ab.py --base {a.base} --precision "
          f"{a.precision} --rounds {a.rounds} --threads {a.threads}` (base {rev} against the "
          f"working tree)  ")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), ISA path: {_core.isa()}, "
          f"bf16 kernel: {bf16_kernel()}\n")
    print("| op | M | K | N | base GFLOP/s | this GFLOP/s | median time ratio base / this "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['base_gflops']:.0f} | "
              f"{r['this_gflops']:.0f} | {r['ratio']:.3f} | {r['max_diff']:.2g} |")


if __name__ == "__main__":
    main()
