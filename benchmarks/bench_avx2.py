"""fp32 on the AVX2 paths: clipdecomp and PyTorch both held to AVX2, side by side.

CPUs of this project differ: some have only AVX2. Where no such machine is at hand, the AVX2
code of both sides can still be measured on an AVX-512 one by forbidding them anything wider,
in a child process:

- clipdecomp: ``CLIPDECOMP_ISA=avx2`` (its AVX2 + FMA kernels: GEMM, attention, layer norms);
- PyTorch: ``ATEN_CPU_CAPABILITY=avx2`` (ATen's vectorised kernels),
  ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL's sgemm, which runs ``nn.Linear``) and
  ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, where PyTorch uses it).

The table prints the path each side reports (clipdecomp's ISA path, ATen's CPU capability and
the instruction set MKL's verbose mode names), so a restriction that did not take shows. It is
the same core as the AVX-512 runs (same caches, clock and memory), so it measures
the AVX2 code, not an AVX2-only CPU. Images/s are medians of interleaved rounds at batch 8.

Usage::

    python benchmarks/bench_avx2.py [--models B16,L14] [--rounds 3] [--threads N]

From Python: ``bench_avx2.run(models, rounds, threads) -> dict`` (``benchmarks/run.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

AVX2_ENV = {
    "CLIPDECOMP_ISA": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
}


def mkl_isa(env: dict) -> str:
    """The instruction set MKL reports (``MKL_VERBOSE=1``) for a torch.mm under ``env``."""
    code = "import torch; a = torch.randn(8, 8); torch.mm(a, a)"
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, MKL_VERBOSE="1"),
                       check=False, capture_output=True, text=True)
    m = re.search(r"\(Intel\(R\) (AVX[-0-9A-Za-z]*)\)", r.stdout + r.stderr)
    return m.group(1) if m else "not reported"


def _child(models: list[str], rounds: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import torch
    from bench_bf16 import interleaved
    from run import make_model
    from transformers import CLIPVisionModelWithProjection

    import clipdecomp
    from clipdecomp import _core

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            path = make_model(name, Path(tmp))
            ours = clipdecomp.load(str(path), threads=threads)
            ref = CLIPVisionModelWithProjection.from_pretrained(path).eval()
            pixels = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
            tp = torch.from_numpy(pixels)

            def torch32(tp=tp, ref=ref):
                with torch.inference_mode():
                    return ref(pixel_values=tp).image_embeds

            def ours32(o=ours, px=pixels):
                return o.encode_image(px, normalize=False)

            t = interleaved({"ours": ours32, "torch": torch32}, rounds)
            err = float(np.abs(ours.encode_image(pixels, normalize=False)
                               - torch32().numpy()).max())
            rows.append({"model": name, "batch": 8, "threads": threads,
                         "ours_img_s": 8 / t["ours"], "torch_img_s": 8 / t["torch"],
                         "speedup": t["torch"] / t["ours"], "max_abs_diff": err})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "isa": _core.isa(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "load": list(os.getloadavg())}


def run(models: list[str], rounds: int = 3, threads: int | None = None) -> dict:
    """Measure in a child process held to AVX2 (see the module's docstring)."""
    threads = threads or os.cpu_count() or 1
    env = dict(os.environ, **AVX2_ENV, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", "--models", ",".join(models),
                          "--rounds", str(rounds), "--threads", str(threads)],
                         env=env, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().split("\n")[-1])
    res["mkl_isa"] = mkl_isa(env)
    return res


def markdown(res: dict, command: str) -> str:
    from run import cpu_model

    lines = [f"Command: `{command}`  ",
             (f"CPU: {cpu_model()}; clipdecomp ISA path: {res['isa']}; PyTorch CPU capability: "
             f"{res['torch_capability']}, MKL instruction set: {res['mkl_isa']}; load average "
             f"after {tuple(round(x, 2) for x in res['load'])}"), "",
             ("| model | batch | threads | clipdecomp img/s | PyTorch img/s | speedup | "
             "max abs diff |"), "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['ours_img_s']:.2f} | "
                     f"{r['torch_img_s']:.2f} | {r['speedup']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="B16,L14")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    if a.child:
        print(json.dumps(_child(models, a.rounds, a.threads or 1)))
        return
    sys.path.insert(0, str(HERE))
    res = run(models, a.rounds, a.threads)
    print(markdown(res, f"python benchmarks/bench_avx2.py --models {a.models} --rounds "
                        f"{a.rounds}" + (f" --threads {a.threads}" if a.threads else "")))


if __name__ == "__main__":
    main()
