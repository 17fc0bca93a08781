"""Side-by-side benchmarks of the clipdecomp core (``make bench``).

Measures, in one process per model, on random-weight CLIP vision towers of real geometry:

1. ``encode_image`` against PyTorch running the same weights (transformers'
   ``CLIPVisionModelWithProjection`` under ``torch.inference_mode``, same thread count);
2. ``decompose`` (heads and MLPs) against ``encode_image``: the overhead of the decomposition;
3. ``decompose(spatial=True)`` against the reference way of getting per-token terms in PyTorch
   (per-head einsum over ``[B, N, N, H, d]`` then the out-projection, as the paper's code does),
   time and peak memory (each side in a fresh subprocess), and the largest difference;
4. the GEMM alone against ``numpy.matmul`` on the model's shapes, and the whole forward's
   achieved GFLOP/s.

5. bf16 against fp32 and PyTorch bf16 at batch 8, decompose against the bf16 forward, the
   profile of where the time goes, and the fp32 forward against the GEMM (``bench_bf16.py``);
6. ``encode_text`` against PyTorch at batch 256 on the description pool (``bench_text.py``);
7. ``clipdecomp run`` on a folder of JPEGs against ``decompose`` on the same images as arrays,
   for a small tower (ViT-S/16 geometry, 6 layers) and ViT-B/16
   (``bench_dataset.py --pipeline``);
8. fp32 with both clipdecomp and PyTorch held to AVX2 (``bench_avx2.py``);
9. each GEMM kernel against the peak rate of its instruction on one core (``bench_peak.py``).

Every table is printed as it is measured, with its command, the ISA path and the load average.
Writes ``benchmarks/RESULTS.md``. Usage::

    python benchmarks/run.py [--models B32,B16,L14] [--batches 1,8] [--threads N]
                             [--sections 1,3,4,5,6,7,8,9] [--bf16-models B16,L14]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the checkout, when run from the source tree

GEOMETRIES = {
    # name: (patch, width, layers, heads, mlp, embed)
    "B32": (32, 768, 12, 12, 3072, 512),
    "B16": (16, 768, 12, 12, 3072, 512),
    "L14": (14, 1024, 24, 16, 4096, 768),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_flops(patch: int, width: int, layers: int, heads: int, mlp: int, embed: int,
                  size: int = 224) -> float:
    """Floating-point operations (2 per multiply-add) of one image's vision forward."""
    n = 1 + (size // patch) ** 2
    per_layer = n * (4 * width * width + 2 * width * mlp) + 2 * n * n * width
    patch_embed = (n - 1) * 3 * patch * patch * width
    return 2.0 * (layers * per_layer + patch_embed + width * embed)


def make_model(name: str, root: Path) -> Path:
    """A random-weight transformers CLIP vision tower of the given geometry, saved to disk."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    patch, width, layers, heads, mlp, embed = GEOMETRIES[name]
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=224, patch_size=patch,
                           projection_dim=embed, hidden_act="quick_gelu")
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(cfg).eval()
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    return out


def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_forward(name: str, path: Path, batches, threads: int, reps: int) -> list[dict]:
    import torch
    from transformers import CLIPVisionModelWithProjection

    import clipdecomp

    torch.set_num_threads(threads)
    ours = clipdecomp.load(str(path), threads=threads)
    ref = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    flops = forward_flops(*GEOMETRIES[name])
    rows = []
    for b in batches:
        rng = np.random.default_rng(b)
        pixels = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
        tp = torch.from_numpy(pixels)

        def run_torch(tp=tp):
            with torch.inference_mode():
                return ref(pixel_values=tp).image_embeds

        t_torch = best_time(run_torch, reps)
        t_ours = best_time(lambda px=pixels: ours.encode_image(px, normalize=False), reps)
        t_dec = best_time(lambda px=pixels: ours.decompose(px), reps)
        err = float(np.abs(ours.encode_image(pixels, normalize=False)
                           - run_torch().numpy()).max())
        rows.append({"model": name, "batch": b, "torch_img_s": b / t_torch, "ours_img_s": b / t_ours,
                         "speedup": t_torch / t_ours, "decompose_overhead": t_dec / t_ours,
                         "gflops": flops * b / t_ours / 1e9, "max_abs_diff": err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


SPATIAL_CHILD = r"""
import json, resource, sys, time
import numpy as np
which, path, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return status('VmRSS')
def hwm():
    return status('VmHWM')
if which == 'ours':
    import clipdecomp
    m = clipdecomp.load(path, threads=threads)
    m.encode_image(pixels[:1], normalize=True)
    base = reset_peak()
    t0 = time.perf_counter()
    dec = m.decompose(pixels, spatial=True, batch_size=batch)
    t = time.perf_counter() - t0
    tokens = dec.tokens
else:
    import torch
    from transformers import CLIPVisionModelWithProjection
    torch.set_num_threads(threads)
    ref = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    vm = ref.vision_model
    with torch.inference_mode():
        ref(pixel_values=torch.from_numpy(pixels[:1]))
    base = reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = vm.pre_layrnorm(vm.embeddings(torch.from_numpy(pixels)))
        L = len(vm.encoder.layers); B, N, W = x.shape
        H = ref.config.num_attention_heads; d = W // H
        per_layer = []
        for layer in vm.encoder.layers:
            at = layer.self_attn
            h = layer.layer_norm1(x)
            q = at.q_proj(h).view(B, N, H, d).transpose(1, 2) * d ** -0.5
            k = at.k_proj(h).view(B, N, H, d).transpose(1, 2)
            v = at.v_proj(h).view(B, N, H, d).transpose(1, 2)
            a = (q @ k.transpose(-1, -2)).softmax(-1)                      # [B, H, N, N]
            # the reference: every (query, source token, head) term, then the out-projection
            terms = torch.einsum('bhnm,bhmc->bnmhc', a, v)                  # [B, N, N, H, d]
            wo = at.out_proj.weight.view(W, H, d)                           # [W, H, d]
            proj = torch.einsum('bnmhc,whc->bnmhw', terms, wo)              # [B, N, N, H, W]
            proj = proj + at.out_proj.bias / (N * H)
            per_layer.append(proj[:, 0])                                    # class-token row
            x = x + proj.sum((2, 3))
            x = x + layer.mlp(layer.layer_norm2(x))
            del terms, proj
        y = x[:, 0]
        mu = y.mean(-1, keepdim=True); sd = (y.var(-1, unbiased=False, keepdim=True) + vm.post_layernorm.eps).sqrt()
        rep = ref.visual_projection(vm.post_layernorm(y))
        K = 2 * L + 1
        g, bt = vm.post_layernorm.weight, vm.post_layernorm.bias
        P = ref.visual_projection.weight.T
        toks = torch.stack(per_layer, 1)                                    # [B, L, N, H, W]
        toks = (g * (toks - mu[:, None, None, None] / (K * N * H)) / sd[:, None, None, None]
                + bt / (K * N * H)) @ P
        tokens = (toks / rep.norm(dim=-1)[:, None, None, None, None]).numpy()
    t = time.perf_counter() - t0
np.save(sys.argv[5], tokens[:, :, :, :, :8])
print(json.dumps(dict(seconds=t, peak_bytes=hwm() - base)))
"""


def bench_spatial(name: str, path: Path, batch: int, threads: int) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("ours", "reference"):
            out = Path(tmp) / f"{which}.npy"
            p = subprocess.run([sys.executable, "-c", SPATIAL_CHILD, which, str(path), str(batch),
                                str(threads), str(out)], capture_output=True, text=True, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if p.returncode != 0:
                raise RuntimeError(f"spatial benchmark ({which}) failed:\n{p.stderr[-3000:]}")
            res[which] = json.loads(p.stdout.strip().splitlines()[-1])
            res[which + "_tokens"] = np.load(out)
    diff = float(np.abs(res["ours_tokens"] - res["reference_tokens"]).max())
    row = {"model": name, "batch": batch, "ours_s": res["ours"]["seconds"],
               "reference_s": res["reference"]["seconds"],
               "time_ratio": res["reference"]["seconds"] / res["ours"]["seconds"],
               "ours_peak_mb": res["ours"]["peak_bytes"] / 2**20,
               "reference_peak_mb": res["reference"]["peak_bytes"] / 2**20,
               "memory_ratio": res["reference"]["peak_bytes"] / max(res["ours"]["peak_bytes"], 1),
               "max_abs_diff": diff}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="B32,B16,L14")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--spatial-models", default="B32,B16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--sections", default="1,3,4,5,6,7,8,9",
                    help="1 (with 2): forward, 3: per-token terms, 4: GEMM, 5: bf16, 6: text, "
                         "7: folders, 8: AVX2, 9: instruction peaks")
    ap.add_argument("--bf16-models", default="B16,L14")
    ap.add_argument("--text-texts", type=int, default=4800)
    ap.add_argument("--pipeline-images", type=int, default=96)
    args = ap.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])

    import clipdecomp._core as core
    import torch

    fwd, spatial, gemm = [], [], []
    print(f"ISA path: {core.isa()}, load average: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in models if sections & {"1", "3"} else []:
            path = make_model(name, Path(tmp))
            if "1" in sections:
                fwd += bench_forward(name, path, batches, args.threads, args.reps)
            if "3" in sections and name in args.spatial_models.split(","):
                spatial.append(bench_spatial(name, path, 1, args.threads))
            import shutil
            shutil.rmtree(path)

    if "4" in sections:
        import bench_gemm
        gemm = bench_gemm.run(args.threads)

    extra = []
    if "5" in sections:
        import bench_bf16
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.bf16_models.split(","):
                rows.append(bench_bf16.bench_model(name, make_model(name, Path(tmp)), 8,
                                                   args.threads, max(3, args.reps)))
        md = bench_bf16.markdown(rows, command.strip() + "  (section 5: benchmarks/bench_bf16.py)")
        md += "\n\n" + bench_bf16.gemm_markdown(bench_bf16.gemm_kernels("B16", 8))
        print(md, flush=True)
        extra += ["## 5. bf16 against fp32 and PyTorch; where the time goes", "", md, ""]
    if "6" in sections:
        import bench_text
        r = bench_text.run(args.text_texts, max(2, args.reps), args.threads)
        md = bench_text.markdown(r, command.strip() + "  (section 6: benchmarks/bench_text.py)")
        print(md, flush=True)
        extra += ["## 6. encode_text against PyTorch, batch 256", "", md, ""]
    if "7" in sections:
        import bench_dataset
        r = [bench_dataset.pipeline(args.pipeline_images, max(2, args.reps), model=m)
             for m in ("S16-6", "B16")]
        md = bench_dataset.pipeline_markdown(
            r, command.strip() + "  (section 7: benchmarks/bench_dataset.py --pipeline)")
        print(md, flush=True)
        extra += ["## 7. Whole folders: `clipdecomp run` against decompose on arrays", "", md, ""]
    if "8" in sections and core.isa() in ("avx512", "avx2"):
        import bench_avx2
        r = bench_avx2.run(args.bf16_models.split(","), max(3, args.reps), args.threads)
        md = bench_avx2.markdown(r, command.strip() + "  (section 8: benchmarks/bench_avx2.py)")
        print(md, flush=True)
        extra += ["## 8. fp32 on the AVX2 paths: clipdecomp and PyTorch both held to AVX2", "",
                  ("On this AVX-512 machine, in a child process: clipdecomp under "
                   "`CLIPDECOMP_ISA=avx2`, PyTorch under `ATEN_CPU_CAPABILITY=avx2`, "
                   "`MKL_ENABLE_INSTRUCTIONS=AVX2` and `ONEDNN_MAX_CPU_ISA=AVX2`. The same "
                   "core, caches and clock as the other sections: this measures the AVX2 code "
                   "of both, not an AVX2-only CPU. Batch 8, medians of interleaved rounds."),
                  "", md, ""]
    if "9" in sections and core.isa() in ("avx512", "avx2"):
        import bench_peak
        r = bench_peak.run(rounds=7)
        md = bench_peak.markdown(r, command.strip() + "  (section 9: benchmarks/bench_peak.py)")
        print(md, flush=True)
        extra += ["## 9. Each GEMM kernel against the peak of its instruction", "",
                  ("Peaks: independent multiply-adds on registers (`benchmarks/isa_peak.c`); "
                   "GEMM: the core's kernels on ViT-B/16's four linear layers at batch 8, one "
                   "thread; medians over rounds that measure both, and of their per-round "
                   "ratio. The bf16 AMX peak leaves out the tile loads the GEMM must do."),
                  "", md, ""]

    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command.strip()}`  ",
        (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), threads: {args.threads}, "
        f"ISA path: {core.isa()}  "),
        f"PyTorch {torch.__version__}, NumPy {np.__version__}, date: {time.strftime('%Y-%m-%d')}",
        "",
        "## 1-2. encode_image against PyTorch; decompose against encode_image",
        "",
        ("Random-weight vision towers of the named geometry at 224 px. `speedup` = PyTorch time /"
        " clipdecomp time (>1: clipdecomp faster); `decompose overhead` = decompose (heads + MLPs) "
        "time / encode_image time. Best of the repetitions."),
        "",
        table(fwd, [("model", "model", "s"), ("batch", "batch", "d"),
                    ("torch_img_s", "PyTorch img/s", ".2f"), ("ours_img_s", "clipdecomp img/s", ".2f"),
                    ("speedup", "speedup", ".2f"), ("decompose_overhead", "decompose overhead", ".3f"),
                    ("gflops", "forward GFLOP/s", ".1f"), ("max_abs_diff", "max abs diff", ".1e")]),
        "",
        "## 3. Per-token terms: folded (clipdecomp) against the reference einsum (PyTorch)",
        "",
        ("Each side in a fresh process; peak memory is the growth of the resident set during the"
        " call. Batch 1."),
        "",
        table(spatial, [("model", "model", "s"), ("batch", "batch", "d"),
                        ("ours_s", "clipdecomp s", ".3f"), ("reference_s", "reference s", ".3f"),
                        ("time_ratio", "time ratio", ".1f"), ("ours_peak_mb", "clipdecomp MB", ".0f"),
                        ("reference_peak_mb", "reference MB", ".0f"),
                        ("memory_ratio", "memory ratio", ".1f"), ("max_abs_diff", "max abs diff", ".1e")]),
        "",
        "## 4. GEMM alone against numpy.matmul",
        "",
        table(gemm, [(k, k, ".2f" if isinstance(v, float) else "") for k, v in gemm[0].items()])
        if gemm else "(no rows)",
        "",
        *extra,
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
