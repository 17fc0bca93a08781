"""Neurons of the embedded shapes-world model: a report the demo can print.

:func:`neuron_report` computes, for one late MLP layer of a model (the embedded one by default),
the second-order statistics of its neurons over generated scenes, the texts of a few of them
over the shapes-world description pool, and how sparse their effects are:

* ``sparse_share``: the share of neurons whose effect is significant for under 2% of the
  images, measured as: the 2% of images with the largest centred effect norms carry more than
  half of the neuron's summed squared centred norm (a dense neuron's top 2% carry about 2% of
  it);
* the reference's ablation (colour classification): mean-ablating the layer's effects, then
  putting back only each neuron's top 2% ("only significant") or only the rest.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["format_neuron_report", "neuron_report"]


def _energy_top(norms: np.ndarray, share: float) -> np.ndarray:
    """``[F]``: fraction of each neuron's summed squared norm carried by its top ``share`` of
    images."""
    sq = np.sort(np.asarray(norms, np.float64) ** 2, axis=0)[::-1]     # [N, F] descending
    top = max(1, math.ceil(share * sq.shape[0]))
    total = sq.sum(0)
    return np.where(total > 0, sq[:top].sum(0) / np.where(total > 0, total, 1.0), 0.0)


def neuron_report(model: Any = None, layer: int | None = None, *, n_images: int = 500,
                  n_neurons: int = 4, n_texts: int = 5, share: float = 0.02, seed: int = 0,
                  style: str | None = None, figures: str | None = None,
                  progress: bool = False) -> dict:
    """Second-order neuron statistics of a late layer over generated scenes, a few neurons with
    their top images and texts, and the sparsity of their effects.

    Parameters
    ----------
    model : CLIP, optional
        Default: the embedded model (``clipdecomp.load()``).
    layer : int, optional
        The neuron layer (default: ``L - 2``, the last with later heads).
    n_images : int
        Generated scenes (1 to 3 objects) the statistics run over.
    n_neurons : int
        Neurons shown: those with the largest significance thresholds.
    n_texts : int
        Texts per neuron (OMP terms over the description pool).
    share : float
        The significance share (0.02: "significant for under 2% of images"); the statistics
        keep ``k = ceil(share * n_images)`` top images per neuron.
    seed : int
    style : str, optional
        Scene style (default: the model's training style, ``toy.MODEL_STYLE``).
    figures : str, optional
        A folder to write one figure per shown neuron into (``neuron_<n>.png``).
    progress : bool

    Returns
    -------
    dict
        ``layer``, ``n_images``, ``k``, ``sparse_share`` (float), ``energy_top`` (``[F]``),
        ``neurons`` (a DataFrame: ``neuron``, ``threshold``, ``top_images``, ``captions``,
        ``texts``, ``weights``, ``cosine``), ``ablation`` (a DataFrame as
        :func:`clipdecomp.neurons.neuron_ablation`), ``stats`` and ``figures`` (paths).

    Examples
    --------
    >>> rep = neuron_report(n_images=200)                     # doctest: +SKIP
    >>> print(format_neuron_report(rep))                      # doctest: +SKIP
    """
    import pandas as pd

    from clipdecomp import toy
    from clipdecomp.demo import description_pool
    from clipdecomp.engine.loading import load
    from clipdecomp.methods.neuron_stats import neuron_stats
    from clipdecomp.methods.neuron_texts import neuron_texts
    from clipdecomp.methods.neurons import check_neuron_layer, neuron_ablation
    from clipdecomp.methods.zeroshot import zero_shot_classifier

    model = model if model is not None else load()
    layer = check_neuron_layer(model, model.config.layers - 2 if layer is None else layer,
                               need_later=True)
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    style = style or toy.MODEL_STYLE
    scenes = toy.generate(int(n_images), seed=seed, style=style)
    images = list(scenes.images)
    k = max(1, math.ceil(share * len(images)))
    st = neuron_stats(model, images, layer, k=k, progress=progress)
    assert st.norms is not None   # neuron_stats keeps every image's norm
    energy = _energy_top(st.norms, share)
    texts, _ = description_pool()
    pool = model.encode_text(texts, normalize=True)
    shown = [int(n) for n in np.argsort(-st.threshold, kind="stable")[:n_neurons]]
    table = neuron_texts(st, pool, texts, k=min(n_texts, len(texts), pool.shape[1]),
                         neurons=shown)
    table.insert(2, "threshold", [float(st.threshold[n]) for n in shown])
    table.insert(3, "top_images", [[int(i) for i in st.top_images[n][:5]] for n in shown])
    table.insert(4, "captions", [[scenes.captions[i] for i in st.top_images[n][:3]]
                                 for n in shown])
    # the reference's ablation on single objects' colour, with these statistics
    test = toy.generate(max(64, len(images) // 4), seed=seed + 1, n_objects=1, style=style)
    names, _ = toy.prompts("color")
    clf = zero_shot_classifier(model, names, templates=toy.TEMPLATES["color"])
    labels = np.asarray(test.labels["color"])[:, 0]
    abl = neuron_ablation(model, list(test.images), labels, clf, st)
    paths = []
    if figures:
        import os

        from clipdecomp.viz.neuron_plots import plot_neuron

        os.makedirs(figures, exist_ok=True)
        for n in shown:
            fig = plot_neuron(model, images, st, n, table, n_images=6)
            p = os.path.join(figures, f"neuron_{n}.png")
            fig.savefig(p, dpi=100)
            paths.append(p)
    return {"layer": layer, "n_images": len(images), "k": k, "share": share,
            "sparse_share": float((energy > 0.5).mean()), "energy_top": energy,
            "neurons": pd.DataFrame(table), "ablation": abl, "stats": st, "figures": paths}


def format_neuron_report(rep: dict) -> str:
    """The report of :func:`neuron_report` as text.

    Examples
    --------
    >>> print(format_neuron_report(neuron_report(n_images=200)))  # doctest: +SKIP
    """
    pct = 100 * rep["share"]
    lines = [
        (f"neurons of layer {rep['layer']} (second-order effects over {rep['n_images']} "
        f"scenes, top {rep['k']} images = {pct:g}% per neuron):"),
        (f"  {100 * rep['sparse_share']:.1f}% of neurons have an effect significant for under "
        f"{pct:g}% of the images (their top {pct:g}% carry over half of the effect's squared "
        f"norm; median share carried: {100 * float(np.median(rep['energy_top'])):.0f}%)"),
    ]
    acc = rep["ablation"].set_index("ablation").accuracy
    lines.append("  colour accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())
                 + f" (significant effects: {100 * rep['ablation'].attrs['significant_share']:.2f}%)")
    for r in rep["neurons"].itertuples():
        lines.append(f"  neuron {r.neuron} (threshold {r.threshold:.2f}): "
                     + " | ".join(r.texts))
        lines.append(f"    top images {r.top_images}: " + " / ".join(r.captions))
    return "\n".join(lines)
