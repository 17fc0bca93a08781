"""SigLIP's image forward: clipdecomp's C core against transformers on the same CPU.

A random ``SiglipVisionModel`` of the ViT-B/16-224 geometry (width 768, 12 layers, 12 heads,
MLP 3072, 196 tokens, the attention-pooling head) is saved once and loaded by both sides. Each
row is the best of ``reps`` timed calls on a batch of 8 images (the machine may be shared:
the best call is the least disturbed one; the rows are timed in turn, round by round, after one
warm-up round, so that a busy spell falls on all of them alike):

* ``transformers``: ``SiglipVisionModel(pixel_values).pooler_output`` under ``torch.no_grad``;
* ``clipdecomp encode_image``: the embedding only;
* ``clipdecomp decompose pool``: the reference decomposition (per-head terms, MLP term);
* ``clipdecomp decompose pool, spatial``: with the (token, head) terms ``[B, 1, N, H, D]``;
* ``clipdecomp decompose deep``: heads ``[B, L, H, D]`` and mlps ``[B, L+2, D]``;
* ``clipdecomp decompose deep, spatial``: with each encoder head's term per token
  ``[B, L, N, H, D]``.

Both sides use ``--threads`` threads (``torch.set_num_threads`` and the core's ``threads``);
the command, the instruction-set path and the versions are printed with the table.

Usage::

    python benchmarks/bench_siglip.py [--threads N] [--reps R] [--batch B] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best_round_robin(fns: list, reps: int) -> list[float]:
    """The best time of each function over ``reps`` rounds that call every function once in
    turn (after one warm-up round), so that a busy spell of a shared machine falls on all rows
    alike rather than on one."""
    best = [float("inf")] * len(fns)
    for rnd in range(reps + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if rnd:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(threads: int, reps: int, batch: int) -> tuple[list[tuple[str, float]], dict[str, str]]:
    """Time every row; returns ``[(name, seconds)]`` and facts about the run."""
    import torch
    import transformers

    from clipdecomp import _core
    from clipdecomp.engine.siglip import load_siglip

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12,
                                          image_size=224, patch_size=16)
    hf = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_siglip(d, threads=threads)
        x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            want = hf(pixel_values=xt).pooler_output.numpy()
        got = model.encode_image(x, normalize=False, batch_size=batch)
        err = float(np.abs(got - want).max() / np.abs(want).max())

        def torch_fwd():
            with torch.no_grad():
                hf(pixel_values=xt)

        named = [
            ("transformers SiglipVisionModel", torch_fwd),
            ("clipdecomp encode_image", lambda: model.encode_image(x, batch_size=batch)),
            ("clipdecomp decompose pool", lambda: model.decompose(x, batch_size=batch)),
            ("clipdecomp decompose pool, spatial",
             lambda: model.decompose(x, spatial=True, batch_size=batch)),
            ("clipdecomp decompose deep",
             lambda: model.decompose(x, depth="deep", batch_size=batch)),
            ("clipdecomp decompose deep, spatial",
             lambda: model.decompose(x, depth="deep", spatial=True, batch_size=batch)),
        ]
        times = _best_round_robin([fn for _, fn in named], reps)
        rows = [(name, t) for (name, _), t in zip(named, times)]
    facts = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cpu": _cpu_name(), "isa": _core.isa(), "threads": str(threads),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "batch": str(batch), "reps": str(reps),
        "max rel. difference of the embeddings": f"{err:.2e}",
        "load average at the end (1, 5, 15 min)": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    return rows, facts


def report(rows: list[tuple[str, float]], facts: dict[str, str]) -> str:
    """The Markdown table and the facts of a run."""
    base = rows[0][1]
    batch = int(facts["batch"])
    lines = [f"| forward (ViT-B/16-224, batch {batch}) | seconds | images/s | vs transformers |",
             "|---|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {s:.3f} | {batch / s:.1f} | {base / s:.2f}x |")
    lines.append("")
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in facts.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=str, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows, facts = run(args.threads, args.reps, args.batch)
    text = report(rows, facts)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# SigLIP forward: clipdecomp against transformers\n\n"
            "Produced by `benchmarks/bench_siglip.py` on a machine shared with other jobs: the "
            "best of several calls is kept, the rows are timed in turn, and still the times, "
            "and less so the ratios, vary between runs.\n\n" + text + "\n",
            encoding="utf-8")


if __name__ == "__main__":
    main()
