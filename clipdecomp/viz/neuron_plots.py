"""One figure per neuron: its top images with its spatial map over them, and its texts."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["neuron_maps", "plot_neuron"]


def _pick(images: Any, idx: Sequence[int]) -> Any:
    from clipdecomp.engine.helpers import image_list, is_pixel_array

    if is_pixel_array(images):
        return np.asarray(images)[np.asarray(idx, np.int64)]
    items = image_list(images)
    return [items[i] for i in idx]


def neuron_maps(model: Any, images: Any, layer: int, neuron: int,
                batch_size: int | None = None) -> np.ndarray:
    """The neuron's post-activation value at every patch: float32 ``[B, G, G]``.

    Examples
    --------
    >>> neuron_maps(model, images, 4, 17).shape               # doctest: +SKIP
    (8, 8, 8)
    """
    from clipdecomp.methods.neurons import neuron_forward

    g = model.config.grid
    parts = [out["acts"][:, 1:, 0].reshape(-1, g, g)
             for _, out in neuron_forward(model, images, layer, record=[int(neuron)],
                                          batch_size=batch_size)]
    return np.concatenate(parts).astype(np.float32)


def plot_neuron(model: Any, images: Any, stats: Any, neuron: int, texts: Any = None, *,
                n_images: int = 8, n_texts: int = 10, alpha: float = 0.5, cmap: str = "jet"):
    """A neuron's top images (by the norm of its second-order effect) with its map over them,
    and its texts.

    Parameters
    ----------
    model : CLIP
    images : the images ``stats`` was computed on (a list or float pixels ``[N, 3, S, S]``)
    stats : NeuronStatsResult
    neuron : int
    texts : pandas.DataFrame, a row of one, or a list of str, optional
        The neuron's texts (:func:`clipdecomp.neuron_texts.neuron_texts`); a table is searched
        for the neuron's row.
    n_images, n_texts : int
        How many of each to show.
    alpha, cmap : the maps' opacity and colour map.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_neuron(model, images, stats, 17, table)    # doctest: +SKIP
    >>> fig.savefig("neuron17.png")                           # doctest: +SKIP
    """
    from clipdecomp.viz.spatial_plots import _new_figure, overlay

    if stats.layer is None:
        raise ValueError("stats has no layer")
    F = stats.pcs.shape[0]
    if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)) \
            or not 0 <= neuron < F:
        raise ValueError(f"neuron must be an int in [0, {F}), got {neuron!r}")
    top = [int(i) for i in stats.top_images[neuron][:n_images]]
    norms = stats.top_norms[neuron][:n_images]
    picked = _pick(images, top)
    maps = neuron_maps(model, picked, stats.layer, neuron)
    words: list[str] = []
    weights: list[float] = []
    if texts is not None:
        if hasattr(texts, "columns"):                              # a table
            row = texts[texts["neuron"] == neuron]
            if len(row):
                words = list(row["texts"].iloc[0])
                weights = list(row["weights"].iloc[0])
        elif hasattr(texts, "texts"):                              # one row
            words, weights = list(texts.texts), list(getattr(texts, "weights", []))
        else:
            words = [str(t) for t in texts]
    n = len(top)
    cols = max(n, 1)
    fig = _new_figure((1.9 * cols + 3.2, 2.4), layout=None)
    gs = fig.add_gridspec(1, cols + 2, width_ratios=[1.0] * cols + [0.1, 1.7],
                          left=0.01, right=0.99, top=0.84, bottom=0.03, wspace=0.05)
    lo, hi = float(maps.min()), float(maps.max())
    for i in range(n):
        ax = fig.add_subplot(gs[0, i])
        overlay(picked[i], maps[i], ax=ax, alpha=alpha, cmap=cmap, vmin=lo, vmax=hi,
                title=f"#{top[i]}  |e|={norms[i]:.2f}")
    ax = fig.add_subplot(gs[0, cols + 1])
    ax.axis("off")
    lines = []
    for j, w in enumerate(words[:n_texts]):
        lines.append(f"{w}" + (f"  ({weights[j]:+.3g})" if j < len(weights) else ""))
    ax.text(0.0, 1.0, "\n".join(lines) if lines else "(no texts)", va="top", ha="left",
            fontsize=8, transform=ax.transAxes)
    fig.suptitle(f"layer {stats.layer}, neuron {neuron}: top {n} of {stats.n_images} images "
                 f"(threshold {stats.threshold[neuron]:.2f})", fontsize=10)
    return fig
