"""Memory of loading big CLIP models: peak and steady resident memory against the weights.

For each geometry (ViT-B/16, L/14, H/14, bigG/14 with their text towers, open_clip layout) a
checkpoint of random weights is written with NumPy alone (tensor by tensor, so the writer never
holds the model), then every measurement runs in a fresh child process:

* file size; ``model.nbytes`` (the weights the C core keeps, as it keeps them);
* peak resident memory of the process during ``clipdecomp.load`` (``VmHWM``) and the steady
  resident memory right after it (``VmRSS``), both including the interpreter with NumPy and
  clipdecomp imported (``base``, measured before the load), and their ratio;
* optionally ``decompose`` of a batch of 8 random images (heads and MLPs) under a memory budget
  (``set_memory_budget``): images per second and the process's peak over the whole child.

Checkpoints are deleted after use (``--keep`` keeps them). Usage::

    python benchmarks/bench_memory.py --out benchmarks/MEMORY.md
    python benchmarks/bench_memory.py --models B16 --dtypes F32,F16,BF16 --decompose 8
    python benchmarks/bench_memory.py --models bigG14 --precisions fp32,bf16 --towers image \\
        --decompose 8 --budget fp32=16G,bf16=10G

The machine this runs on may be shared: the load average is printed beside the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: name -> (image_size, patch, width, layers, heads, mlp, embed, text_width, text_layers,
#:          text_heads, text_mlp) of open_clip's model configs
GEOMETRIES = {
    "B16": (224, 16, 768, 12, 12, 3072, 512, 512, 12, 8, 2048),
    "L14": (224, 14, 1024, 24, 16, 4096, 768, 768, 12, 12, 3072),
    "H14": (224, 14, 1280, 32, 16, 5120, 1024, 1024, 24, 16, 4096),
    "bigG14": (224, 14, 1664, 48, 16, 8192, 1280, 1280, 32, 20, 5120),
}
VOCAB, CONTEXT = 49408, 77
_ITEM = {"F32": 4, "F16": 2, "BF16": 2}


def _tensors(geo: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an open_clip CLIP of this geometry."""
    s, p, w, layers, _, f, d, tw, tl, _, tf = geo
    n = 1 + (s // p) ** 2
    out: list[tuple[str, tuple[int, ...]]] = [
        ("visual.conv1.weight", (w, 3, p, p)), ("visual.class_embedding", (w,)),
        ("visual.positional_embedding", (n, w)), ("visual.ln_pre.weight", (w,)),
        ("visual.ln_pre.bias", (w,))]

    def block(base: str, w: int, f: int) -> None:
        out.extend([
            (base + "ln_1.weight", (w,)), (base + "ln_1.bias", (w,)),
            (base + "attn.in_proj_weight", (3 * w, w)), (base + "attn.in_proj_bias", (3 * w,)),
            (base + "attn.out_proj.weight", (w, w)), (base + "attn.out_proj.bias", (w,)),
            (base + "ln_2.weight", (w,)), (base + "ln_2.bias", (w,)),
            (base + "mlp.c_fc.weight", (f, w)), (base + "mlp.c_fc.bias", (f,)),
            (base + "mlp.c_proj.weight", (w, f)), (base + "mlp.c_proj.bias", (w,))])

    for i in range(layers):
        block(f"visual.transformer.resblocks.{i}.", w, f)
    out += [("visual.ln_post.weight", (w,)), ("visual.ln_post.bias", (w,)),
            ("visual.proj", (w, d)), ("token_embedding.weight", (VOCAB, tw)),
            ("positional_embedding", (CONTEXT, tw))]
    for i in range(tl):
        block(f"transformer.resblocks.{i}.", tw, tf)
    out += [("ln_final.weight", (tw,)), ("ln_final.bias", (tw,)),
            ("text_projection", (tw, d)), ("logit_scale", ())]
    return out


def write_checkpoint(directory: Path, name: str, dtype: str = "F32", seed: int = 0) -> Path:
    """A random-weight open_clip checkpoint of geometry ``name`` (and its open_clip_config.json)
    in ``directory``; values N(0, 0.02) tiled from a 1 Mi-value block, LayerNorm weights 1."""
    geo = GEOMETRIES[name]
    tensors = _tensors(geo)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEM[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 20) * 0.02).astype(np.float32)
    path = directory / "open_clip_model.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for key, shape in tensors:
            n = int(np.prod(shape, dtype=np.int64))
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                             "ln_final.weight")):
                _write(fh, np.ones(n, np.float32), dtype)
                continue
            if key == "logit_scale":
                _write(fh, np.array([np.log(100.0)], np.float32), dtype)
                continue
            start = int(rng.integers(0, block.size))
            for s in range(0, n, block.size):     # a rotated block per chunk
                k = min(block.size, n - s)
                _write(fh, np.roll(block, start + s)[:k], dtype)
    s, p, w, layers, h, f, d, tw, tl, th, tf = geo
    cfg = {"model_cfg": {"embed_dim": d,
                         "vision_cfg": {"image_size": s, "patch_size": p, "width": w,
                                        "layers": layers, "head_width": w // h,
                                        "mlp_ratio": f / w},
                         "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB,
                                      "width": tw, "heads": th, "layers": tl,
                                      "mlp_ratio": tf / tw}}}
    (directory / "open_clip_config.json").write_text(json.dumps(cfg))
    return path


def _write(fh, x: np.ndarray, dtype: str) -> None:
    if dtype == "F32":
        fh.write(x.astype("<f4").tobytes())
    elif dtype == "F16":
        fh.write(x.astype("<f2").tobytes())
    else:   # BF16: the top half of the float32, rounded to nearest even
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        fh.write(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes())


# ----------------------------------------------------------------------------------------------
# the child: one load (and optionally one decompose) in a fresh process


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    import warnings

    if args.before:                      # the package of an earlier tree, for a side-by-side
        sys.path.insert(0, args.before)
    import clipdecomp

    if args.budget:
        clipdecomp.set_memory_budget(args.budget)
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if args.before:
            model = clipdecomp.load(args.child, precision=args.precision)
        else:
            model = clipdecomp.load(args.child, precision=args.precision, towers=args.towers)
    load_s = time.perf_counter() - t0
    out = {"base": base * 1024, "peak_load": _status_kib("VmHWM") * 1024,
           "steady": _status_kib("VmRSS") * 1024, "load_s": load_s,
           "precision": model.precision, "package": os.path.dirname(clipdecomp.__file__)}
    out["nbytes"] = model.nbytes
    if not args.before:
        from clipdecomp.engine.model import load_memory

        out["predicted"] = load_memory(model.config, model.precision)[0]
        # parameters of what was loaded (no panel padding in these geometries)
        out["params"] = load_memory(model.config, "fp32")[0] // 4
    if args.decompose:
        rng = np.random.default_rng(0)
        s = model.config.image_size
        px = rng.standard_normal((args.decompose, 3, s, s)).astype(np.float32)
        t0 = time.perf_counter()
        dec = model.decompose(px, batch_size=args.decompose)
        out["decompose_s"] = time.perf_counter() - t0
        out["images_per_s"] = args.decompose / out["decompose_s"]
        out["identity"] = float(np.abs(dec.heads.sum((1, 2)) + dec.mlps.sum(1)
                                       - dec.embedding / np.linalg.norm(
                                           dec.embedding, axis=-1, keepdims=True)).max())
        out["peak_all"] = _status_kib("VmHWM") * 1024
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# the parent


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def run_child(path: Path, precision: str, towers: str, decompose: int, budget: str,
              timeout: int, before: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path),
           "--precision", precision, "--towers", towers, "--decompose", str(decompose)]
    if budget:
        cmd += ["--budget", budget]
    if before:
        cmd += ["--before", before]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def _before_row(name: str, dtype: str, size: int, precision: str, before: str,
                params: int | None, timeout: int, path: Path) -> str:
    """The row of one load by the package of an earlier tree (``--before``), beside the row
    of the same load by this one; ``params`` is counted by this one."""
    r = run_child(path, precision, "both", 0, "", timeout, before)
    if "error" in r:
        return f"| {name} | before | error: {r['error']} |"
    w = r["nbytes"]
    per = f"{w / (params * (2 if r['precision'] == 'bf16' else 4)):.3f}" if params else "-"
    return (f"| {name} | {dtype} | both | {r['precision']}, before (`{before}`) | "
            f"{_gib(size)} | {_gib(w)} | {per} | {_gib(r['base'])} | {_gib(r['peak_load'])} | "
            f"{_gib(r['steady'])} | {r['peak_load'] / r['steady']:.3f} | "
            f"{(r['steady'] - r['base']) / w:.3f} | {r['load_s']:.1f} | - | - | "
            f"{_gib(r['peak_load'])} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="B16,L14,H14")
    ap.add_argument("--dtypes", default="F32", help="file dtypes, e.g. F32,F16,BF16")
    ap.add_argument("--precisions", default="fp32", help="e.g. fp32,bf16")
    ap.add_argument("--towers", default="both", help="both, image, or both,image")
    ap.add_argument("--decompose", type=int, default=0, help="images to decompose (0: none)")
    ap.add_argument("--budget", default="", help="memory budget per precision, e.g. "
                    "'fp32=16G,bf16=10G', or one size for all")
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=None, help="append the Markdown table to this file")
    ap.add_argument("--before", default="", help="also load each checkpoint (both towers, "
                    "each precision) with the package of this source tree (an earlier "
                    "version, built in place), side by side")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.budget and "=" in args.budget:
            args.budget = dict(kv.split("=") for kv in args.budget.split(",")).get(
                args.precision, "")
        child(args)
        return

    from clipdecomp.engine import core

    budgets = {}
    if args.budget:
        budgets = (dict(kv.split("=") for kv in args.budget.split(",")) if "=" in args.budget
                   else {p: args.budget for p in args.precisions.split(",")})
    cmd = "python benchmarks/bench_memory.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    head = (f"Command: `{cmd.strip()}`  \n"
            f"ISA path: {core.isa()}, AVX512_BF16: {'yes' if core.has_bf16() else 'no'}"
            f", load average at start {tuple(round(x, 2) for x in os.getloadavg())} "
            f"(shared machine), {os.cpu_count()} CPUs\n\n"
            "| model | file | towers | precision | file GiB | weights GiB (nbytes) | "
            "nbytes / (params x 4 or 2 B) | base GiB | peak at load GiB | steady GiB | "
            "peak / steady | (steady - base) / nbytes | load s | budget | "
            "decompose: images/s | peak overall GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    rows = []
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            tmp = Path(tempfile.mkdtemp(prefix=f"bench_memory_{name}_", dir=args.dir))
            try:
                path = write_checkpoint(tmp, name, dtype)
                size = path.stat().st_size
                for towers in args.towers.split(","):
                    for precision in args.precisions.split(","):
                        budget = budgets.get(precision, "")
                        r = run_child(path, precision, towers, args.decompose, budget,
                                      args.timeout)
                        if "error" in r:
                            row = (f"| {name} | {dtype} | {towers} | {precision} | {_gib(size)} "
                                   f"| error: {r['error']} |")
                        else:
                            w = r["nbytes"]
                            per = r["params"] * (2 if r["precision"] == "bf16" else 4)
                            dec = (f"{r['images_per_s']:.2f}" if "images_per_s" in r else "-")
                            row = (f"| {name} | {dtype} | {towers} | {r['precision']} | "
                                   f"{_gib(size)} | {_gib(w)} | {w / per:.3f} | "
                                   f"{_gib(r['base'])} | "
                                   f"{_gib(r['peak_load'])} | {_gib(r['steady'])} | "
                                   f"{r['peak_load'] / r['steady']:.3f} | "
                                   f"{(r['steady'] - r['base']) / w:.3f} | {r['load_s']:.1f} | "
                                   f"{budget or '-'} | {dec} | "
                                   f"{_gib(r.get('peak_all', r['peak_load']))} |")
                        rows.append(row)
                        print(row + f"  <!-- load {os.getloadavg()[0]:.2f} -->", flush=True)
                        if args.before and towers == "both":
                            row = _before_row(name, dtype, size, precision, args.before,
                                              r.get("params"), args.timeout, path)
                            rows.append(row)
                            print(row, flush=True)
            finally:
                if not args.keep:
                    shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(head + "\n" + "\n".join(rows) + "\n\n")


if __name__ == "__main__":
    main()
