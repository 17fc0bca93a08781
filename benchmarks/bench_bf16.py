"""bf16 and fp32 forward passes side by side, with a profile of where the time goes.

For each model (random-weight transformers CLIP vision towers of ViT-B/16 and L/14 geometry, 224
px, one batch of ``--batch`` images), in one process with ``--threads`` threads for both sides:

1. *Speed*: ``encode_image`` of clipdecomp in fp32 and bf16, ``decompose`` (heads and MLPs) in
   bf16, and PyTorch (transformers' ``CLIPVisionModelWithProjection`` under
   ``torch.inference_mode``) in fp32 and in bf16 (weights and inputs cast to ``bfloat16``). The
   variants run interleaved, one call each per round (A B C D E, A B C D E, ...), so that the
   load of a shared machine falls on all of them; each figure is the median over the rounds.
2. *Profile*: one more call of each clipdecomp variant with the core's profile on (wall time per
   kind of operation at the top level of the forward: the linear layers' GEMMs, attention, layer
   norms, GELU, element-wise work; the rest is the decomposition's folds and the glue).
   ``bf16 conversion`` is the thread time spent rounding activations to bf16 inside the GEMMs
   (already part of the GEMM row), divided by the threads.
3. *fp32 forward against the GEMM*: the forward's rate (its floating-point operations over its
   time) against the core's own GEMM on the model's four linear-layer shapes (the same rows,
   ``cd_matmul`` on packed weights, timed interleaved with the forward).

The bf16 kernel in use is printed: ``amx`` (AMX tiles), ``avx512bf16`` (vdpbf16ps) or ``none``
(no bf16 here: the bf16 rows then run ``bf16-emulated``, at fp32 speed). Usage::

    python benchmarks/bench_bf16.py [--models B16,L14] [--batch 8] [--rounds 5] [--threads N]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import GEOMETRIES, cpu_model, forward_flops, make_model

PROFILE_KINDS = ["GEMM fp32", "GEMM bf16", "bf16 conversion", "attention", "layer norms",
                 "GELU", "element-wise"]


def _lib():
    """The core as a shared library, for its profile counters (not in the Python API)."""
    from clipdecomp import _core

    lib = ctypes.CDLL(_core.__file__)
    lib.cd_profile_read.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    lib.cd_profile_enable.argtypes = [ctypes.c_int]
    lib.cd_bf16_kernel_name.restype = ctypes.c_char_p
    lib.cd_cpu_can_amx.restype = ctypes.c_int
    return lib


def gemm_kernels(name: str = "B16", batch: int = 8, rounds: int = 5) -> list[dict]:
    """GFLOP/s of the core's GEMM on the model's linear-layer shapes: fp32, bf16 on AMX tiles,
    bf16 on vdpbf16ps (AMX turned off), interleaved; kernels this CPU lacks are left out."""
    from clipdecomp import _core

    lib = _lib()
    lib.cd_cpu_set_amx.argtypes = [ctypes.c_int]
    has_amx = bool(lib.cd_cpu_can_amx())
    rng = np.random.default_rng(0)
    rows = []
    reps = 4  # products per timed call (one packing of the weight)
    for op, m, k, n, _ in linear_shapes(name, batch):
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        fns = {"fp32": lambda x=x, w=w: _core._matmul(x, w, None, repeat=reps)}
        if _core.has_bf16():
            def dp(x=x, w=w):
                lib.cd_cpu_set_amx(0)
                try:
                    _core._matmul(x, w, None, repeat=reps, precision="bf16")
                finally:
                    lib.cd_cpu_set_amx(1 if has_amx else 0)
            fns["bf16 vdpbf16ps"] = dp
            if has_amx:
                fns["bf16 AMX"] = lambda x=x, w=w: _core._matmul(x, w, None, repeat=reps,
                                                                 precision="bf16")
        t = interleaved(fns, rounds)
        flop = 2.0 * m * k * n * reps
        rows.append({"op": f"{name} {op}", "M": m, "K": k, "N": n,
                     **{f"{key} GFLOP/s": flop / v / 1e9 for key, v in t.items()}})
    return rows


def bf16_kernel() -> str:
    """``amx``, ``avx512bf16`` or ``none``: the kernel of the bf16 products here."""
    return _lib().cd_bf16_kernel_name().decode()


def profile(fn, threads: int) -> dict:
    """Seconds per kind of operation of one call of ``fn`` (and its wall time)."""
    lib = _lib()
    out = (ctypes.c_double * len(PROFILE_KINDS))()
    lib.cd_profile_enable(1)
    lib.cd_profile_reset()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    lib.cd_profile_read(out, len(PROFILE_KINDS))
    lib.cd_profile_enable(0)
    prof = dict(zip(PROFILE_KINDS, list(out)))
    prof["bf16 conversion"] /= max(threads, 1)
    prof["wall"] = wall
    return prof


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function, the functions called in turn each round."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def linear_shapes(name: str, batch: int) -> list[tuple[str, int, int, int, int]]:
    """(op, M, K, N, count per forward) of the linear layers of the transformer blocks."""
    patch, width, layers, _, mlp, _ = GEOMETRIES[name]
    m = batch * (1 + (224 // patch) ** 2)
    return [("qkv", m, width, 3 * width, layers), ("out", m, width, width, layers),
            ("fc", m, width, mlp, layers), ("proj", m, mlp, width, layers)]


def bench_model(name: str, path: Path, batch: int, threads: int, rounds: int) -> dict:
    import torch
    from transformers import CLIPVisionModelWithProjection

    import clipdecomp
    from clipdecomp import _core

    torch.set_num_threads(threads)
    native = clipdecomp.has_bf16()
    bf16_name = "bf16" if native else "bf16-emulated"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m32 = clipdecomp.load(str(path), threads=threads)
        m16 = clipdecomp.load(str(path), threads=threads, precision=bf16_name)
    ref32 = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    ref16 = CLIPVisionModelWithProjection.from_pretrained(path).eval().to(torch.bfloat16)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    tp32 = torch.from_numpy(pixels)
    tp16 = tp32.to(torch.bfloat16)

    def torch32():
        with torch.inference_mode():
            return ref32(pixel_values=tp32).image_embeds

    def torch16():
        with torch.inference_mode():
            return ref16(pixel_values=tp16).image_embeds

    fns = {
        "fp32": lambda: m32.encode_image(pixels, normalize=False),
        "bf16": lambda: m16.encode_image(pixels, normalize=False),
        "bf16 decompose": lambda: m16.decompose(pixels),
        "torch bf16": torch16,
        "torch fp32": torch32,
    }
    load0 = os.getloadavg()
    t = interleaved(fns, rounds)
    load1 = os.getloadavg()
    e32 = m32.encode_image(pixels, normalize=False)
    e16 = m16.encode_image(pixels, normalize=False)
    t16 = torch16().float().numpy()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # the fp32 forward against the core's GEMM on the same shapes, interleaved
    shapes = linear_shapes(name, batch)
    mats = [(rng.standard_normal((m, k), dtype=np.float32),
             rng.standard_normal((n, k), dtype=np.float32), c) for _, m, k, n, c in shapes]
    gemm_flops = sum(2.0 * x.shape[0] * x.shape[1] * w.shape[0] for x, w, _ in mats)
    reps = 2

    def gemm_all():
        for x, w, _ in mats:
            _core._matmul(x, w, None, repeat=reps)

    tg = interleaved({"gemm": gemm_all, "fp32": fns["fp32"]}, max(3, rounds // 2))
    gemm_rate = gemm_flops * reps / tg["gemm"] / 1e9
    fwd_rate = forward_flops(*GEOMETRIES[name]) * batch / tg["fp32"] / 1e9

    profs = {k: profile(fns[k], threads) for k in ("fp32", "bf16", "bf16 decompose")}
    return {
        "model": name, "batch": batch, "threads": threads, "bf16": bf16_name,
        "times": t, "img_s": {k: batch / v for k, v in t.items()},
        "bf16_vs_fp32": t["fp32"] / t["bf16"], "bf16_vs_torch_bf16": t["torch bf16"] / t["bf16"],
        "fp32_vs_torch_fp32": t["torch fp32"] / t["fp32"],
        "decompose_vs_bf16": t["bf16 decompose"] / t["bf16"],
        "rel_l2_bf16_vs_fp32": rel(e16, e32), "rel_l2_torch_bf16_vs_fp32": rel(t16, e32),
        "gemm_gflops": gemm_rate, "forward_gflops": fwd_rate, "forward_vs_gemm": fwd_rate / gemm_rate,
        "profile": profs, "load_before": load0, "load_after": load1,
    }


def markdown(rows: list[dict], command: str) -> str:
    from clipdecomp import _core

    out = [f"Command: `{command}`  ",
           (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), ISA path: {_core.isa()}, "
           f"bf16 kernel: {bf16_kernel()}  "),
           "Load average (1, 5, 15 min) before / after each model: "
           + "; ".join(f"{r['model']} {tuple(round(x, 2) for x in r['load_before'])} / "
                       f"{tuple(round(x, 2) for x in r['load_after'])}" for r in rows),
           "", "Images/s (median of interleaved rounds) and ratios (> 1: the first is faster):", "",
           ("| model | batch | threads | fp32 | bf16 | bf16 decompose | PyTorch bf16 | PyTorch fp32 "
           "| bf16 / fp32 | bf16 / PyTorch bf16 | fp32 / PyTorch fp32 | decompose / forward (bf16) "
           "| rel. L2 bf16 vs fp32 (ours / PyTorch) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["img_s"]
        out.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {s['fp32']:.2f} | "
                   f"{s['bf16']:.2f} | {s['bf16 decompose']:.2f} | {s['torch bf16']:.2f} | "
                   f"{s['torch fp32']:.2f} | {r['bf16_vs_fp32']:.2f} | "
                   f"{r['bf16_vs_torch_bf16']:.2f} | {r['fp32_vs_torch_fp32']:.2f} | "
                   f"{r['decompose_vs_bf16']:.3f} | {r['rel_l2_bf16_vs_fp32']:.1e} / "
                   f"{r['rel_l2_torch_bf16_vs_fp32']:.1e} |")
    out += ["", ("Where the time goes (one call each, core profile on; share of the call's wall "
            "time, `rest` = decomposition folds, copies and glue):"), "",
            "| model | call | wall s | " + " | ".join(PROFILE_KINDS) + " | rest |",
            "|---|---|---|" + "---|" * (len(PROFILE_KINDS) + 1)]
    for r in rows:
        for call, p in r["profile"].items():
            accounted = sum(p[k] for k in PROFILE_KINDS if k != "bf16 conversion")
            cells = " | ".join(f"{100 * p[k] / p['wall']:.1f}%" for k in PROFILE_KINDS)
            out.append(f"| {r['model']} | {call} | {p['wall']:.3f} | {cells} | "
                       f"{100 * (p['wall'] - accounted) / p['wall']:.1f}% |")
    out += ["", ("fp32 forward against the core's GEMM on the model's linear-layer shapes "
            "(interleaved, medians):"), "",
            "| model | batch | GEMM GFLOP/s | forward GFLOP/s | forward / GEMM |",
            "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {r['gemm_gflops']:.1f} | "
                   f"{r['forward_gflops']:.1f} | {r['forward_vs_gemm']:.2f} |")
    return "\n".join(out)


def gemm_markdown(rows: list[dict]) -> str:
    from clipdecomp import _core

    keys = [k for k in rows[0] if k.endswith("GFLOP/s")]
    out = [(f"GEMM kernels (median of interleaved rounds), ISA path {_core.isa()}, bf16 kernel "
           f"by default: {bf16_kernel()}, load average {tuple(round(x, 2) for x in os.getloadavg())}"),
           "", "| op | M | K | N | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        out.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | "
                   + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="B16,L14")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--gemm-only", action="store_true",
                    help="only the GEMM kernels table (fp32, bf16 AMX, bf16 vdpbf16ps)")
    args = ap.parse_args(argv)
    if args.gemm_only:
        print(gemm_markdown(gemm_kernels(args.models.split(",")[0], args.batch, args.rounds)))
        return
    command = "python benchmarks/bench_bf16.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = make_model(name, Path(tmp))
            rows.append(bench_model(name, path, args.batch, args.threads, args.rounds))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, command.strip()))


if __name__ == "__main__":
    main()
