"""How fast can the embedded model's vision tower learn shapes? Diagnostics for the toy model.

Three measurements behind the README's account of why the shipped model did not learn shape:

1. ``supervised``: the vision tower of the embedded model (open_clip ViT, patch 8, 6 layers,
   width 192), trained from scratch with cross-entropy on the shape label of single-object
   scenes, on the textured grounds of the shapes world and on flat grey grounds (the objects
   pasted on grey 128 through their masks); beside it a small CNN (three 3x3 conv layers with
   max pooling) on the textured scenes. Test accuracy on 512 held-out scenes every
   ``--every`` steps. All runs see the same batches (``generate(batch, seed=step + 1)``).
2. ``text``: mean cosine similarity between a text tower's embeddings of prompts that
   differ in one word (shape, colour, position): near 1 means the text tower does not tell
   those words apart, so contrastive training gives the images no pull towards them.
3. ``probe``: whether the image embedding holds an attribute at all: a logistic-regression
   probe on the image embeddings of single-object scenes, beside zero-shot accuracy.

Needs torch (``pip install .[train]``). One thread per run; about 1 s per step of 64 scenes
for the ViT on the development machine. Usage::

    python benchmarks/shape_learning.py [--steps 300] [--batch 64] [--every 50]
        [--only supervised|text|probe] [--runs vit,vit-flat,cnn] [--model MODEL_DIR]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
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


def _pixels(b: world.ShapesBatch, grey: bool, texture: float = 1.0) -> torch.Tensor:
    images = np.where(b.foreground[..., None], b.images, np.uint8(128)) if grey else b.images
    return toytrain.to_pixels(toytrain.flatten_background(images, b.foreground, texture))


@contextlib.contextmanager
def _radii(radii: dict | None):
    """Temporarily draw objects with other radius ranges ({"small": (lo, hi), "large": ...})."""
    saved = dict(world._RADIUS)
    if radii:
        world._RADIUS.update(radii)
    try:
        yield
    finally:
        world._RADIUS.clear()
        world._RADIUS.update(saved)


def supervised(name: str, model: nn.Module, grey: bool, steps: int, batch: int, every: int,
               lr: float = 1e-3, warmup: int = 20, texture=None, radii: dict | None = None,
               fixed: int = 0) -> list[tuple[int, float]]:
    """Train ``model`` on shape labels; returns [(step, test accuracy)].

    ``texture``: None for the world's grounds, a float in [0, 1] to fade every ground towards
    its mean colour (:func:`clipdecomp.toy.train.flatten_background`), or ``"ramp"`` for the
    curriculum ``texture_schedule(step, steps, 0.35, 0.35)`` (flat, then faded in). The test
    scenes get the texture of the last step. ``radii``: other object radius ranges for training
    and test scenes. ``fixed`` > 0: train on one fixed set of that many scenes, cycled in
    batches, and report the accuracy on it as well (can the model fit it at all?).
    """
    def tex(s: int) -> float:
        if texture is None:
            return 1.0
        if texture == "ramp":
            return toytrain.texture_schedule(s, steps, 0.35, 0.35)
        return float(texture)

    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    with _radii(radii):
        test = world.generate(512, seed=999, n_objects=1)
        pool = world.generate(fixed, seed=1, n_objects=1) if fixed else None
    x_test, y_test = _pixels(test, grey, tex(steps)), torch.from_numpy(test.labels["shape"][:, 0])
    if pool is not None:
        x_pool = _pixels(pool, grey, tex(steps))
        y_pool = torch.from_numpy(pool.labels["shape"][:, 0])
    curve, t0 = [], time.perf_counter()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (s + 1) / warmup)
        if pool is not None:
            rows = np.arange(s * batch, (s + 1) * batch) % fixed
            x, y = x_pool[rows], y_pool[rows]
        else:
            with _radii(radii):
                b = world.generate(batch, seed=s + 1, n_objects=1)
            x, y = _pixels(b, grey, tex(s)), torch.from_numpy(b.labels["shape"][:, 0])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (s + 1) % every == 0:
            with torch.no_grad():
                acc = float((model(x_test).argmax(-1) == y_test).float().mean())
                fit = ("" if pool is None else " train-set accuracy "
                       f"{float((model(x_pool).argmax(-1) == y_pool).float().mean()):.3f}")
            curve.append((s + 1, acc))
            print(f"  {name}: step {s + 1} loss {loss.item():.3f} test accuracy {acc:.3f}{fit} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curve


@torch.no_grad()
def text_collapse(model_dir=MODEL_DIR) -> dict[str, float]:
    """Mean off-diagonal cosine of a model's text embeddings, per varied word."""
    model, tok = toytrain.load_exported(model_dir)
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


def probe(model_dir=MODEL_DIR, n_train: int = 2000, n_test: int = 1000) -> dict[str, tuple]:
    """What the image embedding holds: per attribute, the test accuracy of a logistic-regression
    probe on the (unit) image embeddings of single-object scenes, beside zero-shot accuracy with
    the world's prompts on the same test scenes. Computed with clipdecomp itself (needs
    scikit-learn). Returns {attribute: (probe accuracy, zero-shot accuracy, chance)}."""
    from sklearn.linear_model import LogisticRegression

    import clipdecomp

    model = clipdecomp.load(model_dir)
    b = world.generate(n_train + n_test, seed=77, n_objects=1)
    emb = model.encode_image(list(b.images), progress=False)
    out = {}
    for attr in ("shape", "color", "size", "position", "background"):
        y = b.labels[attr] if attr == "background" else b.labels[attr][:, 0]
        clf = LogisticRegression(max_iter=3000).fit(emb[:n_train], y[:n_train])
        names = world.ATTRIBUTES[attr]
        cls = clipdecomp.zero_shot_classifier(model, names, templates=world.TEMPLATES[attr])
        zs = float(((emb[n_train:] @ cls).argmax(1) == y[n_train:]).mean())
        out[attr] = (float(clf.score(emb[n_train:], y[n_train:])), zs, 1 / len(names))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--only", choices=["supervised", "text", "probe"], default=None)
    ap.add_argument("--model", default=str(MODEL_DIR),
                    help="exported model folder for text and probe (default: the shipped one)")
    ap.add_argument("--runs", default="vit,vit-flat,cnn",
                    help="comma-separated supervised runs: vit, vit-flat, cnn, vit-soft, "
                    "vit-ramp, vit-big, vit-lr3e-4, vit-fixed")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: python benchmarks/" + " ".join(
        shlex.quote(x) for x in [os.path.basename(__file__)] + sys.argv[1:]))
    if a.only in (None, "text"):
        print("\ntext tower: mean cosine between prompts that differ in one word")
        for k, v in text_collapse(a.model).items():
            print(f"  {k:<32s} {v:.3f}")
    if a.only in (None, "probe"):
        print("\nimage embedding: linear probe (2,000 train / 1,000 test single-object scenes) "
              "against zero-shot")
        print("| attribute | probe | zero-shot | chance |\n|---|---|---|---|")
        for k, (pr, zs, ch) in probe(a.model).items():
            print(f"| {k} | {pr:.3f} | {zs:.3f} | {ch:.3f} |")
    if a.only in (None, "supervised"):
        big = {"small": (8.0, 11.0), "large": (12.0, 16.0)}
        table = {  # name: (title, model, grey grounds, keyword arguments of supervised())
            "vit": ("ViT, textured grounds", _vit, False, {}),
            "vit-flat": ("ViT, flat grey grounds", _vit, True, {}),
            "cnn": ("CNN, textured grounds", _cnn, False, {}),
            "vit-soft": ("ViT, textures at 30% contrast", _vit, False, {"texture": 0.3}),
            "vit-ramp": ("ViT, flat grounds fading to textured", _vit, False,
                         {"texture": "ramp"}),
            "vit-big": ("ViT, textured grounds, objects of radius 8-16 px", _vit, False,
                        {"radii": big}),
            "vit-lr3e-4": ("ViT, textured grounds, lr 3e-4, 100 warm-up steps", _vit, False,
                           {"lr": 3e-4, "warmup": 100}),
            "vit-fixed": ("ViT, textured grounds, one fixed set of 512 scenes", _vit, False,
                          {"fixed": 512}),
        }
        unknown = set(a.runs.split(",")) - set(table)
        if unknown:
            ap.error(f"unknown runs {sorted(unknown)}; choose from {sorted(table)}")
        runs = [table[k] for k in a.runs.split(",")]
        results = {}
        for name, make, grey, kw in runs:
            print(f"\n{name}")
            torch.manual_seed(0)
            results[name] = supervised(name, make(), grey, a.steps, a.batch, a.every, **kw)
        print(f"\nshape accuracy on 512 held-out scenes (chance {1 / len(world.SHAPES):.3f}), "
              f"batch {a.batch}")
        steps = [s for s, _ in next(iter(results.values()))]
        print("| run | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for name, curve in results.items():
            print(f"| {name} | " + " | ".join(f"{acc:.3f}" for _, acc in curve) + " |")


if __name__ == "__main__":
    main()
