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

and writes figures (heat maps, the head-role table, the ablation curve) and the HTML atlas
(``atlas.html``, :func:`clipdecomp.report`) into ``--out``.
``--full`` uses the larger sample sizes behind the README's table.

Examples
--------
>>> from clipdecomp.demo import run_demo
>>> report = run_demo("demo-out", n_images=64, progress=False)   # doctest: +SKIP
>>> sorted(report)                                                 # doctest: +SKIP
['ablation', 'heads', 'segmentation', 'spurious', 'zero_shot']
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipdecomp import toy
from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.methods.ablation import ablate, ablation_study, component_means
from clipdecomp.methods.probes import head_probes, probe_roles
from clipdecomp.methods.segmentation import (
    all_foreground,
    centre_blob,
    segment_decomposition,
    segment_maps,
    segmentation_metrics,
)
from clipdecomp.methods.spatial import attention_map, attention_rollout, head_map, heatmap
from clipdecomp.methods.textspan import textspan_heads
from clipdecomp.methods.zeroshot import accuracy, zero_shot_classifier
from clipdecomp.viz.atlas import report as atlas_report

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
    return progress_bar(it, enabled=enabled, desc=desc)


def _classifiers(model) -> dict[str, np.ndarray]:
    out = {}
    for attr in ATTRIBUTES:
        names, _ = toy.prompts(attr)
        out[attr] = zero_shot_classifier(model, names, templates=toy.TEMPLATES[attr])
    return out


def zero_shot_table(model, classifiers, n: int, seed: int, style: str = "smooth"
                    ) -> list[dict]:
    """Zero-shot accuracy per attribute on single-object scenes (count: 1 to 3 objects)."""
    rows = []
    single = toy.generate(n, seed=seed, n_objects=1, style=style)
    multi = toy.generate(n, seed=seed + 1, style=style)
    emb_single = model.encode_image(list(single.images), normalize=True)
    emb_multi = model.encode_image(list(multi.images), normalize=True)
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
        best = max(kinds, key=kinds.count)   # a tie goes to the attribute of the earlier text
        rows.append({"layer": int(r["layer"]), "head": int(r["head"]), "role": best,
                         "share": kinds.count(best) / len(kinds),
                         "specific": kinds.count(best) >= 0.8 * len(kinds),
                         "variance_explained": float(r["variance_explained"]),
                         "texts": first})
    return rows


def worst_group(emb: np.ndarray, y: np.ndarray, group: np.ndarray, classifier
                ) -> tuple[float, float, list[float]]:
    """Worst-group accuracy, average accuracy and the accuracy of each group (sorted ids)."""
    pred = (emb @ classifier).argmax(1)
    accs = [float((pred[group == g] == y[group == g]).mean()) for g in np.unique(group)]
    return min(accs), float((pred == y).mean()), accs


def spurious_repair(model, roles: list[dict], n: int, seed: int, style: str
                    ) -> tuple[dict[str, Any], Any]:
    """The Waterbirds experiment on the spurious split: worst-group accuracy of the zero-shot
    classifier for the classes' own names ("a buoy", "a crate", as Waterbirds asks for "a
    waterbird": words the model saw only beside their usual ground), before and after
    mean-ablating the heads whose TextSpan texts are mostly (at least 3 of 5) about the ground.

    Means come from ``n`` scenes of the training distribution (seed ``seed + 5``); the balanced
    test split has ``max(n, 64)`` scenes (seed ``seed + 6``).

    Returns
    -------
    (report, means): the report dict (``classes``, ``background_heads``, ``worst_group_before``
    / ``_after``, ``average_before`` / ``_after``, ``groups``, ``groups_before`` / ``_after``)
    and the component means used for the ablation
    """
    train = toy.spurious_split(n, seed=seed + 5, train=True, style=style)
    test = toy.spurious_split(max(n, 64), seed=seed + 6, train=False, style=style)
    shapes = ["circle", "square"]
    cls_names = [toy.SPURIOUS_NAMES[c] for c in shapes]
    clf = zero_shot_classifier(model, cls_names, templates=toy.TEMPLATES["shape"])
    dtrain = model.decompose(list(train.images), progress=False)
    dtest = model.decompose(list(test.images), progress=False)
    bg_heads = [(r["layer"], r["head"]) for r in roles if r["role"] == "background"
                and r["share"] >= 0.6]
    means = component_means(dtrain)
    y, group = test.labels["y"], test.labels["group"]
    wg0, avg0, groups0 = worst_group(dtest.embedding, y, group, clf)
    wg1, avg1, groups1 = worst_group(ablate(dtest, heads=bg_heads, means=means), y, group, clf)
    report = {"classes": cls_names, "background_heads": [list(h) for h in bg_heads],
              "worst_group_before": wg0, "average_before": avg0, "worst_group_after": wg1,
              "average_after": avg1,
              "groups": [f"{c} ({sh}) on {b}" for c, sh in zip(cls_names, shapes)
                         for b in ("water", "grass")],
              "groups_before": groups0, "groups_after": groups1}
    return report, means


def probe_ground_truth(model, roles: list[dict], n: int, seed: int, style: str
                       ) -> dict[str, Any]:
    """Fit linear probes per head and attribute (:func:`clipdecomp.methods.probes.head_probes`) and
    set ``probe_role`` / ``probe_lift`` / ``agrees`` on each row of ``roles`` (in place).

    Shape, colour, size, position and background are probed on scenes of one object, count on
    scenes of one to three.

    Returns
    -------
    dict with ``agreement`` (share of heads whose TextSpan role is the probes' attribute),
    ``agreement_specific`` (the same over the specific heads) and ``probes`` (every row)
    """
    single = toy.generate(n, seed=seed, n_objects=1, style=style)
    multi = toy.generate(n, seed=seed + 1, style=style)
    d1 = model.decompose(list(single.images), progress=False)
    d2 = model.decompose(list(multi.images), progress=False)
    lab = single.labels
    labels = {a: lab[a][:, 0] for a in ("shape", "color", "size", "position")}
    labels["background"] = lab["background"]
    n_classes = {a: len(toy.ATTRIBUTES[a]) for a in ATTRIBUTES}
    rows = head_probes(d1.heads, labels, n_classes=n_classes, seed=seed)
    rows += head_probes(d2.heads, {"count": multi.labels["n_objects"] - 1},
                        n_classes=n_classes, seed=seed)
    best = probe_roles(rows)
    for r in roles:
        b = best[(r["layer"], r["head"])]
        r["probe_role"], r["probe_lift"] = b["attribute"], float(b["lift"])
        r["probe_excess"] = float(b["excess"])
        r["agrees"] = r["probe_role"] == r["role"]
    spec = [r for r in roles if r["specific"]]
    return {"agreement": float(np.mean([r["agrees"] for r in roles])),
            "agreement_specific": float(np.mean([r["agrees"] for r in spec])) if spec else None,
            "probes": rows}


_FORMS = {"shape": "a {}", "position": "an object in the {}", "color": "a {} object",
          "background": "a scene on {}", "size": "a {} object", "count": "{} objects"}


def _right_wrong_texts(batch, attribute: str) -> tuple[list[str], list[str]]:
    """Per image of one-object scenes: a text naming its ``attribute`` value and one naming
    another value (half the class list further on)."""
    names = toy.ATTRIBUTES[attribute]
    idx = batch.labels["background"] if attribute == "background" else \
        batch.labels[attribute][:, 0]
    wrong = (idx + len(names) // 2) % len(names)
    form = _FORMS[attribute]
    return [form.format(names[i]) for i in idx], [form.format(names[i]) for i in wrong]


def head_contrast(model, dec, batch, layer: int, head: int, attribute: str) -> dict[str, Any]:
    """How much more a head's map lights the object for the right text than for a wrong one.

    For each image (one object), the right text names the object's ``attribute`` value
    ("a star", "an object in the top left") and the wrong text another value; the contrast is
    the mean of the head's map (:func:`clipdecomp.methods.spatial.head_map`) over the patches the
    object covers, right text minus wrong text.

    Returns
    -------
    dict with ``layer``, ``head``, ``attribute``, ``contrast`` (mean over images), ``share``
    (of images where the right text lights the object more) and ``texts`` (of image 0)
    """
    right, wrong = _right_wrong_texts(batch, attribute)
    names = sorted(set(right) | set(wrong))
    emb = dict(zip(names, model.encode_text(names, normalize=True)))
    g = round((model.config.n_tokens - 1) ** 0.5)
    patch = model.config.image_size // g
    fg = batch.foreground.reshape(len(batch), g, patch, g, patch).mean((2, 4)) > 0.25
    maps = {t: head_map(dec, layer, head, emb[t]) for t in names}  # each [B, G, G]
    vals = np.zeros(len(batch))
    for i in range(len(batch)):
        m = maps[right[i]][i] - maps[wrong[i]][i]
        vals[i] = float(m[fg[i]].mean()) if fg[i].any() else 0.0
    return {"layer": layer, "head": head, "attribute": attribute, "contrast": float(vals.mean()),
            "share": float((vals > 0).mean()), "texts": [right[0], wrong[0]]}


def run_demo(out: str | os.PathLike = "clipdecomp-demo", n_images: int = 128, seed: int = 0,
             full: bool = False, progress: bool = True, model: Any = None,
             figures: bool = True, style: str | None = None) -> dict[str, Any]:
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
    style : world style of the generated scenes (default: the one the shipped model was
        trained on, ``clipdecomp.toy.MODEL_STYLE``)

    Returns
    -------
    dict with keys ``zero_shot``, ``heads``, ``ablation``, ``segmentation``, ``spurious``
    """
    from clipdecomp.engine.loading import load

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = check_size(n_images, "n_images") * (8 if full else 1)
    style = style or toy.MODEL_STYLE
    model = model if model is not None else load()
    say = print if progress else (lambda *a, **k: None)
    say(f"model: {model.config.name} ({model.config.layers} layers x {model.config.heads} "
        f"heads, width {model.config.width}, {model.config.n_tokens} tokens)")

    classifiers = _classifiers(model)

    # 1. zero-shot accuracy per attribute
    zs = zero_shot_table(model, classifiers, n, seed, style)
    say("\nzero-shot accuracy (held-out generated images):")
    for r in zs:
        say(f"  {r['attribute']:<11s} {100 * r['accuracy']:5.1f}%   chance {100 * r['chance']:5.1f}%")

    # 2. decompose a general collection, TextSpan on every head
    scenes = toy.generate(n, seed=seed + 2, style=style)
    dec = model.decompose(list(scenes.images), progress=progress)
    texts, about = description_pool()
    pool_emb = model.encode_text(texts, normalize=True)
    layers = list(range(model.config.layers))
    df = textspan_heads(dec, pool_emb, texts, layers=layers, n_texts=5,
                        rank=min(80, model.config.embed_dim), progress=False)
    roles = head_roles(df, about, texts)
    truth = probe_ground_truth(model, roles, max(4 * n, 512), seed + 7, style)
    say("\nhead roles (TextSpan, first 5 texts; * = at least 4 of 5 about one attribute; "
        "probe = what linear probes on the head's terms find more than in most heads, and "
        "the lift over chance):")
    for r in roles:
        if r["layer"] >= model.config.layers - 2:
            say(f"  L{r['layer']}.H{r['head']} {r['role']:<10s}{'*' if r['specific'] else ' '} "
                f"probe {r['probe_role']:<10s} {r['probe_lift']:.2f} "
                f"{'=' if r['agrees'] else 'x'}  {r['variance_explained']:.2f}  "
                + " | ".join(r["texts"][:3]))
    n_specific = sum(r["specific"] for r in roles)
    by_role = {a: sum(r["specific"] and r["role"] == a for r in roles) for a in ATTRIBUTES}
    say(f"  {n_specific} of {len(roles)} heads are specific to one property: "
        + ", ".join(f"{a} {k}" for a, k in by_role.items()))
    say(f"  TextSpan and the probes agree on {100 * truth['agreement']:.0f}% of the heads"
        + ("" if truth["agreement_specific"] is None else
           f" ({100 * truth['agreement_specific']:.0f}% of the specific ones)"))

    # 3. mean-ablation table (colour classification on single-object scenes)
    single = toy.generate(n, seed=seed + 3, n_objects=1, style=style)
    dec1 = model.decompose(list(single.images), progress=False)
    means = component_means(dec)
    abl = ablation_study(dec1, single.labels["color"][:, 0], classifiers["color"], means)
    say("\nmean ablation (colour accuracy):")
    for _, r in abl.iterrows():
        say(f"  {r['ablation']:<36s} {100 * r['accuracy']:5.1f}%")

    # 4. zero-shot segmentation against the true masks (colour classes)
    seg_imgs = toy.generate(n, seed=seed + 4, n_objects=1, style=style)
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
    seg: list[dict[str, Any]] = []
    for name, res in methods.items():
        m = segmentation_metrics(res.scores, seg_imgs.foreground, masks=res.masks,
                                 degenerate=res.degenerate)
        seg.append(dict(method=name, **{k: float(v) for k, v in m.items()}))
    say("\nzero-shot segmentation (pixel accuracy / mIoU / mAP, %):")
    for r in seg:
        say(f"  {r['method']:<24s} {100 * r['pixel_accuracy']:5.1f} {100 * r['miou']:5.1f} "
            f"{100 * r['map']:5.1f}")

    # 5. spurious correlation: ablate the background heads
    spurious, tmeans = spurious_repair(model, roles, n, seed, style)
    bg_heads = [tuple(h) for h in spurious["background_heads"]]
    cls_names, wg0, wg1 = spurious["classes"], spurious["worst_group_before"], \
        spurious["worst_group_after"]
    avg0, avg1 = spurious["average_before"], spurious["average_after"]
    group_names, groups0, groups1 = spurious["groups"], spurious["groups_before"], \
        spurious["groups_after"]
    say(f"\nspurious split ({cls_names[0]}/{cls_names[1]}, i.e. circle/square, on water/grass), "
        f"{len(bg_heads)} background head{'' if len(bg_heads) == 1 else 's'} "
        f"ablated: worst-group {100 * wg0:.1f}% -> {100 * wg1:.1f}%, "
        f"average {100 * avg0:.1f}% -> {100 * avg1:.1f}%")
    for name, a0, a1 in zip(group_names, groups0, groups1):
        say(f"  {name:<26s} {100 * a0:5.1f}% -> {100 * a1:5.1f}%")

    # 6. heat maps of a position head and a shape head: right text against a wrong one
    contrasts = []
    for attr in ("position", "shape"):
        # the head whose terms hold the attribute best (the probes' ground truth)
        top = max((p for p in truth["probes"] if p["attribute"] == attr),
                  key=lambda p: p["lift"])
        contrasts.append(head_contrast(model, segdec, seg_imgs, top["layer"], top["head"], attr))
    say("\nhead maps, right text minus wrong text over the object (mean; share of images > 0):")
    for c in contrasts:
        say(f"  L{c['layer']}.H{c['head']} {c['attribute']:<9s} {c['contrast']:+.4f}  "
            f"{100 * c['share']:.0f}%   e.g. '{c['texts'][0]}' vs '{c['texts'][1]}'")


    # 7. neurons of a late layer: second-order effects, their texts, how sparse they are
    from clipdecomp.demo_neurons import format_neuron_report, neuron_report

    neur = neuron_report(model, n_images=max(2 * n, 256), seed=seed + 9, style=style,
                         figures=str(out) if figures else None)
    say("\n" + format_neuron_report(neur))
    neurons = {"layer": neur["layer"], "n_images": neur["n_images"],
               "sparse_share": neur["sparse_share"],
               "median_top_share": float(np.median(neur["energy_top"])),
               "neurons": neur["neurons"].drop(columns=["captions"]).to_dict("records"),
               "ablation": neur["ablation"].to_dict("records")}
    report = {"style": style, "zero_shot": zs, "heads": roles,
              "head_probes": {k: v for k, v in truth.items() if k != "probes"},
              "probes": truth["probes"], "ablation": abl.to_dict("records"),
              "segmentation": seg, "spurious": spurious, "head_maps": contrasts,
              "neurons": neurons}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))

    if figures:
        _figures(out, model, segdec, seg_imgs, methods, df, abl, texts, contrasts)
        # the same heads, images and repair, to browse: one HTML file beside the figures
        atlas = atlas_report(segdec, seg_imgs.images, pool=(texts, pool_emb), textspan=df,
                       roles={(r["layer"], r["head"]): r["role"] for r in roles},
                       labels=seg_imgs.labels["color"][:, 0], classifier=classifiers["color"],
                       classnames=toy.prompts("color")[0], repair={"heads": bg_heads,
                                                                   "means": tmeans},
                       source_name="generated single-object scenes, colour labels",
                       title="clipdecomp demo: the embedded shapes-world CLIP"
                       ).save(out / "atlas.html")
        say(f"\natlas: {atlas.resolve()}")
    say(f"\nfigures and report.json written to {out.resolve()} "
        f"({time.perf_counter() - t_start:.1f} s)")
    return report


def _figures(out: Path, model, segdec, seg_imgs, methods, df, abl, texts, contrasts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipdecomp.viz.plots import plot_ablation_curve, plot_head_table
    from clipdecomp.viz.spatial_plots import plot_methods, plot_text_maps

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
    maps = heatmap(segdec, model.encode_text(probe_texts, normalize=True))        # [B, T, G, G]
    maps = maps - maps.mean(axis=1, keepdims=True)
    fig = plot_text_maps(seg_imgs.images[0], maps[0], probe_texts, shared_scale=True)
    fig.savefig(out / "heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    # the position head and the shape head, right text against a wrong one, on four images
    side = seg_imgs.images.shape[1]
    fig, axes = plt.subplots(len(contrasts), 12, figsize=(18, 1.9 * len(contrasts)),
                             squeeze=False)
    for r, c in enumerate(contrasts):
        right, wrong = _right_wrong_texts(seg_imgs, c["attribute"])
        for i in range(4):
            emb = model.encode_text([right[i], wrong[i]], normalize=True)
            m = np.stack([head_map(segdec, c["layer"], c["head"], e)[i] for e in emb])
            lim = float(np.abs(m).max()) or 1.0
            axes[r, 3 * i].imshow(seg_imgs.images[i])
            axes[r, 3 * i].set_title(f"L{c['layer']}.H{c['head']} ({c['attribute']})",
                                     fontsize=7)
            for j, text in enumerate((right[i], wrong[i])):
                ax = axes[r, 3 * i + 1 + j]
                ax.imshow(seg_imgs.images[i])
                ax.imshow(m[j], cmap="bwr", vmin=-lim, vmax=lim, alpha=0.6,
                          extent=(-0.5, side - 0.5, side - 0.5, -0.5))
                short = text.replace("an object in the ", "").replace("a ", "", 1)
                ax.set_title(("right: " if j == 0 else "wrong: ") + short, fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.savefig(out / "head_maps.png", dpi=110, bbox_inches="tight")
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
