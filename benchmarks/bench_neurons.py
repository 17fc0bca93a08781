"""Second-order neuron effects: clipdecomp against the reference's way, and a streamed run.

On a random-weight ViT-B/32 vision tower (the follow-up paper's model; transformers'
initialisation, QuickGELU), neuron layer 9 (effects through the heads of layers 10 and 11):

1. images/s of ``clipdecomp.methods.neurons.second_order`` (forward + coefficients in the C core,
   the per-layer fold applied in C) against PyTorch doing what the reference hook does
   (``[B, tokens, neurons, width]`` intermediates per later head, batch 1 as its scripts run),
   same thread count, each in its own process with its peak resident memory, and the largest
   difference of the two on the same image;
2. the peak memory of a streamed ``neuron_stats`` run (two passes: means, then top-k images and
   principal directions) against what the ``[N, F, D]`` array of the reference's pipeline
   would take for the same N and for N = 10,000;
3. (``--parts store``) the peak memory of whole data-set runs with neuron statistics
   (``run_dataset(..., neurons=NeuronStatsSpec(layer, k=100))``: decomposition, neuron rows,
   then the statistics from the stored rows) over made-up image files, each run in its own
   process, for every N of ``--store-images``, against what ``[N, F, D]`` would need.
   ``--store-geometry toy`` uses the embedded shapes-world model (6 layers, F = 768, D = 128,
   64 px; neuron layer 4), ``B32`` the random ViT-B/32 (layer 9).

Usage::

    python benchmarks/bench_neurons.py [--threads 1] [--batch 8] [--ref-images 1]
                                       [--stream-images 64]
    python benchmarks/bench_neurons.py --parts store --store-geometry toy \
                                       --store-images 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

LAYER = 9


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def child_ours(job: dict) -> dict:
    import clipdecomp
    from clipdecomp import _core
    from clipdecomp.methods.neurons import neuron_fold, second_order

    model = clipdecomp.load(job["model"], threads=job["threads"])
    px = pixels(job["batch"])
    t0 = time.perf_counter()
    neuron_fold(model, LAYER)
    fold_s = time.perf_counter() - t0
    second_order(model, px[:1], LAYER)                                  # warm-up
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        eff = second_order(model, px, LAYER, batch_size=job["batch"])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    model.encode_image(px, normalize=False, batch_size=job["batch"])
    enc_s = time.perf_counter() - t0
    np.save(job["out"], eff[:job["ref_images"]])
    return {"isa": _core.isa(), "images_per_s": job["batch"] / min(times),
            "encode_image_per_s": job["batch"] / enc_s, "fold_build_s": fold_s,
            "peak_rss_MiB": peak_rss_mib()}


def child_stream(job: dict) -> dict:
    import clipdecomp
    from clipdecomp.methods.neuron_stats import neuron_stats

    model = clipdecomp.load(job["model"], threads=job["threads"])
    px = pixels(job["n"], seed=1)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    st = neuron_stats(model, px, LAYER, k=100, batch_size=job["batch"])
    wall = time.perf_counter() - t0
    return {"images": job["n"], "seconds": wall, "images_per_s": 2 * job["n"] / wall,
            "peak_rss_MiB": peak_rss_mib(), "before_MiB": base,
            "pixels_MiB": px.nbytes / 2**20, "top_k": int(st.k)}


def child_reference(job: dict) -> dict:
    """The reference hook's steps in PyTorch on transformers' modules, batch 1."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    torch.set_num_threads(job["threads"])
    m = CLIPVisionModelWithProjection.from_pretrained(job["model"],
                                                      attn_implementation="eager").eval()
    vm = m.vision_model
    L = len(vm.encoder.layers)
    H = m.config.num_attention_heads
    coefficient = 100.0
    px = pixels(job["batch"])[:job["ref_images"]]
    outs = []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for i in range(px.shape[0]):
            got = {}
            hook = vm.encoder.layers[LAYER].mlp.fc2.register_forward_hook(
                lambda mod, inp, out, got=got: got.update(act=inp[0]))
            o = vm(pixel_values=torch.from_numpy(px[i:i + 1]), output_attentions=True,
                   output_hidden_states=True)
            hook.remove()
            hs, att = o.hidden_states, o.attentions
            y = hs[-1][:, 0]
            post = vm.post_layernorm
            mu, sd = y.mean(-1), torch.sqrt(y.var(-1, unbiased=False) + post.eps)
            proj = m.visual_projection.weight.T
            rep = ((y - mu[:, None]) / sd[:, None] * post.weight + post.bias) @ proj
            act = got["act"]                                            # [1, N, F]
            F = act.shape[-1]
            lay = vm.encoder.layers[LAYER]
            total = 0
            for j in range(LAYER + 1, L):
                lj = vm.encoder.layers[j]
                x_in = hs[j]
                mean = x_in.mean(-1)
                std = torch.sqrt(x_in.var(-1, unbiased=False) + lj.layer_norm1.eps)
                share = (1 + 2 * j) * F
                W = x_in.shape[-1]
                d = W // H
                wv = lj.self_attn.v_proj.weight.view(H, d, W)
                bv = lj.self_attn.v_proj.bias.view(H, d)
                wo = lj.self_attn.out_proj.weight.view(W, H, d)
                for h in range(H):
                    # the hook recomputes the per-neuron MLP outputs for every later head
                    mlp = torch.einsum("btn,nm->btnm", act, lay.mlp.fc2.weight.T) + \
                        lay.mlp.fc2.bias / F
                    normed = (lj.layer_norm1.weight * (mlp - mean[:, :, None, None] / share)
                              / std[:, :, None, None] + lj.layer_norm1.bias / share)
                    del mlp
                    v = torch.einsum("bnxc,dc->bnxd", normed, wv[h]) + bv[h] / share
                    del normed
                    x = torch.einsum("bnm,bmxc->bnxc", att[j][:, h], v)
                    ret = torch.einsum("bnxc,dc->bnxd", x, wo[:, h]) + \
                        lj.self_attn.out_proj.bias / (share * H)
                    ps = (1 + 2 * j) * (1 + 2 * L) * H * F
                    yy = (post.weight * (ret[:, 0] - mu[:, None, None] / ps)
                          / sd[:, None, None] + post.bias / ps)
                    total = total + yy @ proj
                    del ret, x, v
            outs.append((coefficient * total / rep.norm(dim=-1)[:, None, None]).numpy())
    wall = time.perf_counter() - t_all
    np.save(job["out"], np.concatenate(outs))
    return {"images_per_s": px.shape[0] / wall, "peak_rss_MiB": peak_rss_mib()}


def write_images(root: str, n: int, seed: int = 0) -> None:
    """n made-up 64x64 PNG files (smooth colour gradients plus noise) in folders of 1,000."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(n):
        sub = os.path.join(root, f"d{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        c = rng.uniform(size=(3, 3))
        img = c[:, 0] * yy[..., None] + c[:, 1] * xx[..., None] + c[:, 2] * 0.3
        img = np.clip(img + rng.normal(scale=0.05, size=img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(sub, f"{i:06d}.png"))


def du_mib(path: str) -> float:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total / 2**20


def child_store(job: dict) -> dict:
    import clipdecomp
    from clipdecomp.data.runner import run_dataset
    from clipdecomp.methods.neuron_stats import NeuronStatsSpec

    model = (clipdecomp.load(threads=job["threads"]) if job["model"] == "toy"
             else clipdecomp.load(job["model"], threads=job["threads"]))
    base = peak_rss_mib()
    t0 = time.perf_counter()
    r = run_dataset(model, job["images"], job["out"], chunk_size=job["chunk"],
                    batch_size=job["batch"], layers="-1:", progress=False,
                    neurons=NeuronStatsSpec(job["layer"], k=100))
    wall = time.perf_counter() - t0
    st = r.neuron_stats(job["layer"], norms=False)
    c = model.config
    return {"images": r.n, "valid": st.n_images, "seconds": wall, "peak_rss_MiB": peak_rss_mib(),
            "before_MiB": base, "store_MiB": du_mib(job["out"]), "F": c.mlp_dim,
            "D": c.embed_dim, "k": st.k, "layer": job["layer"]}


CHILDREN = {"ours": child_ours, "stream": child_stream, "reference": child_reference,
            "store": child_store}


def run_child(kind: str, job: dict, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS="1")   # NumPy's BLAS: small calls only, see NEURONS.md
    p = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(job)], env=env,
                       check=False, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ref-images", type=int, default=1)
    ap.add_argument("--stream-images", type=int, default=64)
    ap.add_argument("--parts", default="ours,reference,stream",
                    help="comma-separated subset of ours,reference,stream,store")
    ap.add_argument("--store-images", default="10000",
                    help="comma-separated image counts of the data-set runs (--parts store)")
    ap.add_argument("--store-geometry", default="toy", choices=["toy", "B32"])
    ap.add_argument("--store-chunk", type=int, default=256)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child[0]](json.loads(a.child[1]))))
        return 0
    from run import cpu_model, make_model

    parts = set(a.parts.split(","))
    known = {"ours", "reference", "stream", "store"}
    if not parts <= known:
        ap.error(f"--parts: unknown {sorted(parts - known)}")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"load average before: {os.getloadavg()}")
    if parts == {"store"}:
        return store_runs(a, cpu_model, make_model)
    F, D = 3072, 512
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_model("B32", Path(tmp)))
        job = {"model": path, "threads": a.threads, "batch": a.batch,
               "ref_images": a.ref_images}
        ours = ref = stream = None
        if "ours" in parts or "reference" in parts:
            ours = run_child("ours", dict(job, out=os.path.join(tmp, "ours.npy")), a.threads)
        if "reference" in parts:
            ref = run_child("reference", dict(job, out=os.path.join(tmp, "ref.npy")), a.threads)
            e_ours = np.load(os.path.join(tmp, "ours.npy"))
            e_ref = np.load(os.path.join(tmp, "ref.npy"))
            diff = float(np.abs(e_ours - e_ref).max() / np.abs(e_ref).max())
        if "stream" in parts:
            stream = run_child("stream", dict(job, n=a.stream_images), a.threads)
    from clipdecomp import _core

    print(f"CPU: {cpu_model()}; ISA path: {_core.isa()}; threads: {a.threads}")
    print(f"ViT-B/32 (random weights), neuron layer {LAYER}: [B, F, D] = [B, {F}, {D}]")
    if ours is not None:
        print()
        print("| | images/s | peak RSS (MiB) |")
        print("|---|---|---|")
        print(f"| clipdecomp second_order (batch {a.batch}) | {ours['images_per_s']:.2f} | "
              f"{ours['peak_rss_MiB']:.0f} |")
        if ref is not None:
            print(f"| reference way in PyTorch (batch 1, {a.ref_images} image(s)) | "
                  f"{ref['images_per_s']:.4f} | {ref['peak_rss_MiB']:.0f} |")
        print(f"| clipdecomp encode_image alone (batch {a.batch}) | "
              f"{ours['encode_image_per_s']:.2f} | |")
        print()
        if ref is not None:
            print(f"speed-up: {ours['images_per_s'] / ref['images_per_s']:.0f}x; largest "
                  f"difference (relative to the largest effect): {diff:.1e}")
        print(f"fold built once per model and layer in {ours['fold_build_s']:.1f} s")
    if stream is not None:
        full = stream["images"] * F * D * 4 / 2**20
        full10k = 10_000 * F * D * 4 / 2**30
        print()
        print(f"streamed neuron_stats over {stream['images']} images (two passes, k = 100): "
              f"{stream['seconds']:.1f} s, peak RSS {stream['peak_rss_MiB']:.0f} MiB (process "
              f"before the run: {stream['before_MiB']:.0f} MiB, of which pixels "
              f"{stream['pixels_MiB']:.0f} MiB); the [N, F, D] array would take {full:.0f} MiB "
              f"for these images and {full10k:.1f} GiB for 10,000")
    return 0


def store_runs(a, cpu_model, make_model) -> int:
    """--parts store: one data-set run per N, each in its own process."""
    from clipdecomp import _core

    counts = [int(v) for v in a.store_images.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.store_geometry == "toy":
            model, layer, batch = "toy", 4, max(a.batch, 32)
        else:
            model, layer, batch = str(make_model("B32", Path(tmp))), LAYER, a.batch
        imgs = os.path.join(tmp, "imgs")
        write_images(imgs, max(counts), seed=5)
        for n in counts:
            listing = os.path.join(tmp, f"list{n}.txt")
            with open(listing, "w") as f:
                f.writelines(os.path.join(imgs, f"d{i // 1000:03d}", f"{i:06d}.png\n")
                             for i in range(n))
            job = {"model": model, "threads": a.threads, "batch": batch, "layer": layer,
                   "chunk": a.store_chunk, "images": listing,
                   "out": os.path.join(tmp, f"s{n}.zarr")}
            rows.append(run_child("store", job, a.threads))
            shutil.rmtree(job["out"], ignore_errors=True)
            print(f"  N = {n}: {json.dumps(rows[-1])}; load average {os.getloadavg()}",
                  flush=True)
    print(f"CPU: {cpu_model()}; ISA path: {_core.isa()}; threads: {a.threads}; "
          f"load average after: {os.getloadavg()}")
    r0 = rows[0]
    print(f"{a.store_geometry} geometry, neuron layer {r0['layer']}, k = {r0['k']}, "
          f"F = {r0['F']}, D = {r0['D']}; run_dataset(..., layers='-1:', "
          f"neurons=NeuronStatsSpec({r0['layer']}, k=100)), chunks of {a.store_chunk}")
    print()
    print("| images | seconds | images/s | peak RSS (MiB) | before the run (MiB) | store on "
          "disk (MiB) | [N, F, D] float32 would need |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        need = r["images"] * r["F"] * r["D"] * 4
        print(f"| {r['images']} | {r['seconds']:.0f} | {r['images'] / r['seconds']:.1f} | "
              f"{r['peak_rss_MiB']:.0f} | {r['before_MiB']:.0f} | {r['store_MiB']:.0f} | "
              f"{need / 2**20:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
