"""How fast can the embedded model's vision tower learn shapes? Diagnostics for the toy model.

Two measurements behind the README's account of why the shipped model did not learn shape:

1. ``supervised``: the vision tower of the embedded model (open_clip ViT, patch 8, 6 layers,
   width 192), trained from scratch with cross-entropy on the shape label of single-object
   scenes, on the textured grounds of the shapes world and on flat grey grounds (the objects
   pasted on grey 128 through their masks); beside it a small CNN (three 3x3 conv layers with
   max pooling) on the textured scenes. Test accuracy on 512 held-out scenes every
   ``--every`` steps. All runs see the same batches (``generate(batch, seed=step + 1)``).
2. ``text``: mean cosine similarity between the shipped text tower's embeddings of prompts that
   differ in one word (shape, colour, position): near 1 means the text tower does not tell
   those words apart, so contrastive training gives the images no pull towards them.

Needs torch (``pip install .[train]``). One thread per run; about 1 s per step of 64 scenes
for the ViT on the development machine. Usage::

    python benchmarks/shape_learning.py [--steps 300] [--batch 64] [--every 50]
        [--only supervised|text] [--runs vit,vit-flat,cnn]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover
    sys.exit("shape_learning.py needs torch: pip install .[train]")

from clipdecomp.toy import MODEL_DIR, world
from clipdecomp.toy import train as toytrain


def _cnn() -> nn.Module:
    """Three conv layers (32, 64, 64 channels), max pooling, a linear head: [B,3,64,64] -> [B,8]."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(64, len(world.SHAPES)))


def _vit() -> nn.Module:
    v = toytrain.MODEL_CFG["vision_cfg"]
    return toytrain.Visual(v["image_size"], v["patch_size"], v["width"], v["layers"],
                           v["head_width"], v["mlp_ratio"], len(world.SHAPES))


def _pixels(b: world.ShapesBatch, grey: bool) -> torch.Tensor:
    images = np.where(b.foreground[..., None], b.images, np.uint8(128)) if grey else b.images
    return toytrain.to_pixels(images)


def supervised(name: str, model: nn.Module, grey: bool, steps: int, batch: int, every: int,
               lr: float = 1e-3, warmup: int = 20) -> list[tuple[int, float]]:
    """Train ``model`` on shape labels; returns [(step, test accuracy)]."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    test = world.generate(512, seed=999, n_objects=1)
    x_test, y_test = _pixels(test, grey), torch.from_numpy(test.labels["shape"][:, 0])
    curve, t0 = [], time.perf_counter()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (s + 1) / warmup)
        b = world.generate(batch, seed=s + 1, n_objects=1)
        loss = F.cross_entropy(model(_pixels(b, grey)), torch.from_numpy(b.labels["shape"][:, 0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (s + 1) % every == 0:
            with torch.no_grad():
                acc = float((model(x_test).argmax(-1) == y_test).float().mean())
            curve.append((s + 1, acc))
            print(f"  {name}: step {s + 1} loss {loss.item():.3f} test accuracy {acc:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curve


@torch.no_grad()
def text_collapse() -> dict[str, float]:
    """Mean off-diagonal cosine of the shipped text tower's embeddings, per varied word."""
    model, tok = toytrain.load_exported(MODEL_DIR)
    sets = {
        "shape": [f"a photo of a {s}." for s in world.SHAPES],
        "shape (with colour and ground)": [f"a red {s} on the grass" for s in world.SHAPES],
        "color": [f"a photo of a {c} object." for c in world.COLORS],
        "position": [f"a photo of an object in the {p}." for p in world.POSITIONS],
    }
    out = {}
    for name, texts in sets.items():
        e = F.normalize(model.encode_text(torch.from_numpy(toytrain.tokenize(tok, texts))), dim=-1)
        c = (e @ e.T).numpy()
        out[name] = float(c[~np.eye(len(c), dtype=bool)].mean())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--only", choices=["supervised", "text"], default=None)
    ap.add_argument("--runs", default="vit,vit-flat,cnn",
                    help="comma-separated supervised runs: vit, vit-flat, cnn")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: python benchmarks/" + " ".join(
        shlex.quote(x) for x in [os.path.basename(__file__)] + sys.argv[1:]))
    if a.only in (None, "text"):
        print("\ntext tower: mean cosine between prompts that differ in one word")
        for k, v in text_collapse().items():
            print(f"  {k:<32s} {v:.3f}")
    if a.only in (None, "supervised"):
        table = {"vit": ("ViT, textured grounds", _vit, False),
                 "vit-flat": ("ViT, flat grey grounds", _vit, True),
                 "cnn": ("CNN, textured grounds", _cnn, False)}
        runs = [table[k] for k in a.runs.split(",")]
        results = {}
        for name, make, grey in runs:
            print(f"\n{name}")
            torch.manual_seed(0)
            results[name] = supervised(name, make(), grey, a.steps, a.batch, a.every)
        print(f"\nshape accuracy on 512 held-out scenes (chance {1 / len(world.SHAPES):.3f}), "
              f"batch {a.batch}")
        steps = [s for s, _ in next(iter(results.values()))]
        print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for name, curve in results.items():
            print(f"| {name} | " + " | ".join(f"{acc:.3f}" for _, acc in curve) + " |")


if __name__ == "__main__":
    main()
