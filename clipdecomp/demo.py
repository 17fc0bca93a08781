"""``clipdecomp demo``: the paper's analyses, end to end, on the embedded shapes-world CLIP.

Offline and quick: it generates shapes-world images, decomposes them with a progress bar, and
then, all with clipdecomp's own functions,

1. measures zero-shot accuracy per attribute (shape, colour, size, position, background, count)
   against chance;
2. labels every head with TextSpan over a pool of shapes-world descriptions and names each
   head's role (the attribute most of its texts are about);
3. reproduces the mean-ablation table (MLPs, class-to-class attention, attention layers);
4. segments images zero-shot and scores the maps against the true masks, beside the class
   token's attention, attention rollout and trivial masks;
5. repairs a spurious correlation: worst-group accuracy on a Waterbirds-like split before and
   after mean-ablating the heads whose TextSpan texts are about the background;

and writes figures (heat maps, the head-role table, the ablation curve) into ``--out``.
``--full`` uses the larger sample sizes behind the README's table.

Examples
--------
>>> from clipdecomp.demo import run_demo
>>> report = run_demo("demo-out", n_images=64, progress=False)   # doctest: +SKIP
>>> sorted(report)                                                 # doctest: +SKIP
['ablation', 'heads', 'segmentation', 'spurious', 'zero_shot']
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import toy
from .ablation import ablate, ablation_study, component_means
from .config import check_size
from .segmentation import (
    all_foreground,
    centre_blob,
    segment_decomposition,
    segment_maps,
    segmentation_metrics,
)
from .spatial import attention_map, attention_rollout, heatmap
from .textspan import textspan_heads
from .zeroshot import accuracy, zero_shot_classifier

#: attributes with their class lists, in the order the report prints them
ATTRIBUTES = ("shape", "color", "size", "position", "background", "count")


def description_pool() -> tuple[list[str], list[str]]:
    """Descriptions of the shapes world, each tagged with the attribute it is about.

    Returns
    -------
    texts : list of M str
    about : list of M str, the attribute each text describes

    Examples
    --------
    >>> texts, about = description_pool()
    >>> len(texts) == len(about) and "background" in about
    True
    """
    texts, about = [], []
    phrasings = {
        "shape": ["a {}", "a {} shape", "an image of a {}", "a drawing of a {}"],
        "color": ["something {}", "a {} object", "a {} thing", "the colour {}"],
        "size": ["a {} object", "a {} shape"],
        "position": ["an object in the {}", "a shape at the {}", "something in the {}"],
        "background": ["a scene on {}", "{} in the background", "a picture of {}",
                       "a {} texture"],
        "count": ["{} objects", "{} shapes"],
    }
    for attr, forms in phrasings.items():
        for name in toy.ATTRIBUTES[attr]:
            for form in forms:
                t = form.format(name)
                if t not in texts:
                    texts.append(t)
                    about.append(attr)
    return texts, about


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc)


def _classifiers(model) -> dict[str, np.ndarray]:
    out = {}
    for attr in ATTRIBUTES:
        names, _ = toy.prompts(attr)
        out[attr] = zero_shot_classifier(model, names, templates=toy.TEMPLATES[attr])
    return out


def zero_shot_table(model, classifiers, n: int, seed: int) -> list[dict]:
    """Zero-shot accuracy per attribute on single-object scenes (count: 1 to 3 objects)."""
    rows = []
    single = toy.generate(n, seed=seed, n_objects=1)
    multi = toy.generate(n, seed=seed + 1)
    emb_single = model.encode_image(list(single.images))
    emb_multi = model.encode_image(list(multi.images))
    for attr in ATTRIBUTES:
        if attr == "count":
            labels, emb = multi.labels["n_objects"] - 1, emb_multi
        elif attr == "background":
            labels, emb = single.labels["background"], emb_single
        else:
            labels, emb = single.labels[attr][:, 0], emb_single
        k = len(toy.ATTRIBUTES[attr])
        rows.append({"attribute": attr, "classes": k,
                         "accuracy": float(accuracy(emb, labels, classifiers[attr], topk=1)),
                         "chance": 1.0 / k})
    return rows


def head_roles(df, about: list[str], texts: list[str], top: int = 5) -> list[dict]:
    """The role of each head: the attribute most of its first ``top`` TextSpan texts are about.

    A head is *specific* when at least 4 of its first 5 texts share one attribute.
    """
    tag = dict(zip(texts, about))
    rows = []
    for _, r in df.iterrows():
        first = list(r["texts"])[:top]
        kinds = [tag[t] for t in first]
        best = max(set(kinds), key=kinds.count)
        rows.append({"layer": int(r["layer"]), "head": int(r["head"]), "role": best,
                         "share": kinds.count(best) / len(kinds),
                         "specific": kinds.count(best) >= 0.8 * len(kinds),
                         "variance_explained": float(r["variance_explained"]),
                         "texts": first})
    return rows


def worst_group(emb: np.ndarray, y: np.ndarray, group: np.ndarray, classifier) -> tuple[float, float]:
    pred = (emb @ classifier).argmax(1)
    accs = [float((pred[group == g] == y[group == g]).mean()) for g in np.unique(group)]
    return min(accs), float((pred == y).mean())


def run_demo(out: str | os.PathLike = "clipdecomp-demo", n_images: int = 128, seed: int = 0,
             full: bool = False, progress: bool = True, model: Any = None,
             figures: bool = True) -> dict[str, Any]:
    """Run every analysis on the embedded model and write figures; returns the numbers.

    Parameters
    ----------
    out : folder for the figures and ``report.json`` (created)
    n_images : images per experiment (``full=True`` multiplies it by 8)
    seed : generation seed (the report is deterministic given the seed)
    full : the larger samples behind the README's table
    progress : show progress bars and print the report
    model : a loaded CLIP (default: :func:`clipdecomp.load` with no arguments)
    figures : write the PNG figures

    Returns
    -------
    dict with keys ``zero_shot``, ``heads``, ``ablation``, ``segmentation``, ``spurious``
    """
    from .loading import load

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = check_size(n_images, "n_images") * (8 if full else 1)
    model = model if model is not None else load()
    say = print if progress else (lambda *a, **k: None)
    say(f"model: {model.config.name} ({model.config.layers} layers x {model.config.heads} "
        f"heads, width {model.config.width}, {model.config.n_tokens} tokens)")

    classifiers = _classifiers(model)

    # 1. zero-shot accuracy per attribute
    zs = zero_shot_table(model, classifiers, n, seed)
    say("\nzero-shot accuracy (held-out generated images):")
    for r in zs:
        say(f"  {r['attribute']:<11s} {100 * r['accuracy']:5.1f}%   chance {100 * r['chance']:5.1f}%")

    # 2. decompose a general collection, TextSpan on every head
    scenes = toy.generate(n, seed=seed + 2)
    dec = model.decompose(list(scenes.images), progress=progress)
    texts, about = description_pool()
    pool_emb = model.encode_text(texts)
    layers = list(range(model.config.layers))
    df = textspan_heads(dec, pool_emb, texts, layers=layers, n_texts=5,
                        rank=min(80, model.config.embed_dim), progress=False)
    roles = head_roles(df, about, texts)
    say("\nhead roles (TextSpan, first 5 texts; * = at least 4 of 5 about one attribute):")
    for r in roles:
        if r["layer"] >= model.config.layers - 2:
            say(f"  L{r['layer']}.H{r['head']} {r['role']:<10s}{'*' if r['specific'] else ' '} "
                f"{r['variance_explained']:.2f}  " + " | ".join(r["texts"][:3]))
    n_specific = sum(r["specific"] for r in roles)
    say(f"  {n_specific} of {len(roles)} heads are specific to one property")

    # 3. mean-ablation table (colour classification on single-object scenes)
    single = toy.generate(n, seed=seed + 3, n_objects=1)
    dec1 = model.decompose(list(single.images), progress=False)
    means = component_means(dec)
    abl = ablation_study(dec1, single.labels["color"][:, 0], classifiers["color"], means)
    say("\nmean ablation (colour accuracy):")
    for _, r in abl.iterrows():
        say(f"  {r['ablation']:<36s} {100 * r['accuracy']:5.1f}%")

    # 4. zero-shot segmentation against the true masks (colour classes)
    seg_imgs = toy.generate(n, seed=seed + 4, n_objects=1)
    segdec = model.decompose(list(seg_imgs.images), spatial=True, attn=True, progress=False)
    size = model.config.image_size
    ours = segment_decomposition(segdec, classifiers["color"])
    methods = {
        "decomposition (ours)": ours,
        "class-token attention": segment_maps(attention_map(segdec), size),
        "attention rollout": segment_maps(attention_rollout(segdec), size),
        "all foreground": all_foreground(len(seg_imgs), size),
        "centred blob": centre_blob(len(seg_imgs), size),
    }
    seg = []
    for name, res in methods.items():
        m = segmentation_metrics(res.scores, seg_imgs.foreground, masks=res.masks,
                                 degenerate=res.degenerate)
        seg.append(dict(method=name, **{k: float(v) for k, v in m.items()}))
    say("\nzero-shot segmentation (pixel accuracy / mIoU / mAP, %):")
    for r in seg:
        say(f"  {r['method']:<24s} {100 * r['pixel_accuracy']:5.1f} {100 * r['miou']:5.1f} "
            f"{100 * r['map']:5.1f}")

    # 5. spurious correlation: ablate the background heads
    train = toy.spurious_split(n, seed=seed + 5, train=True)
    test = toy.spurious_split(max(n, 64), seed=seed + 6, train=False)
    cls_names = ["circle", "square"]
    clf = zero_shot_classifier(model, cls_names, templates=toy.TEMPLATES["shape"])
    dtrain = model.decompose(list(train.images), progress=False)
    dtest = model.decompose(list(test.images), progress=False)
    bg_heads = [(r["layer"], r["head"]) for r in roles if r["role"] == "background"
                and r["share"] >= 0.6]
    tmeans = component_means(dtrain)
    y, group = test.labels["y"], test.labels["group"]
    wg0, avg0 = worst_group(dtest.embedding, y, group, clf)
    rep = ablate(dtest, heads=bg_heads, means=tmeans)
    wg1, avg1 = worst_group(rep, y, group, clf)
    spurious = {"background_heads": [list(h) for h in bg_heads], "worst_group_before": wg0,
                    "average_before": avg0, "worst_group_after": wg1, "average_after": avg1}
    say(f"\nspurious split (circle/square on water/grass), {len(bg_heads)} background heads "
        f"ablated: worst-group {100 * wg0:.1f}% -> {100 * wg1:.1f}%, "
        f"average {100 * avg0:.1f}% -> {100 * avg1:.1f}%")

    report = {"zero_shot": zs, "heads": roles, "ablation": abl.to_dict("records"), "segmentation": seg,
                  "spurious": spurious}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))

    if figures:
        _figures(out, model, segdec, seg_imgs, methods, df, abl, texts)
    say(f"\nfigures and report.json written to {out.resolve()} "
        f"({time.perf_counter() - t_start:.1f} s)")
    return report


def _figures(out: Path, model, segdec, seg_imgs, methods, df, abl, texts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import plot_ablation_curve, plot_head_table
    from .spatial_plots import plot_methods, plot_text_maps

    # the image's own colour and background against two others; each map minus the mean of
    # the four, so that what all texts share (mostly "an object is here") cancels out
    lab = seg_imgs.labels
    own_c, own_b = toy.COLORS[lab["color"][0, 0]], toy.BACKGROUNDS[lab["background"][0]]
    other_c = next(c for c in toy.COLORS if c != own_c)
    other_b = next(b for b in toy.BACKGROUNDS if b != own_b)
    def a(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    probe_texts = [f"{a(own_c)} object", f"{a(other_c)} object", f"a scene on {own_b}",
                   f"a scene on {other_b}"]
    maps = heatmap(segdec, model.encode_text(probe_texts))        # [B, T, G, G]
    maps = maps - maps.mean(axis=1, keepdims=True)
    fig = plot_text_maps(seg_imgs.images[0], maps[0], probe_texts, shared_scale=True)
    fig.savefig(out / "heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plot_methods(seg_imgs.images[0], {k: v.scores[0] for k, v in methods.items()
                                            if "all" not in k}, gt_mask=seg_imgs.foreground[0])
    fig.savefig(out / "segmentation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plot_head_table(df)
    fig.savefig(out / "head_roles.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plot_ablation_curve(abl)
    fig.savefig(out / "ablation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def demo_main(argv=None) -> int:
    """Entry point of ``clipdecomp demo``."""
    ap = argparse.ArgumentParser(prog="clipdecomp demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="clipdecomp-demo", help="folder for figures and report")
    ap.add_argument("--n-images", type=int, default=128, help="images per experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="8x the images (the README's numbers)")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    run_demo(args.out, n_images=args.n_images, seed=args.seed, full=args.full,
             figures=not args.no_figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(demo_main())
