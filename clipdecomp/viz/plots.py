"""Figures for head analysis: head-role tables, ablation curves, retrieval grids, TextSpan.

Every function returns a :class:`matplotlib.figure.Figure` (made without pyplot, so that
nothing is shown twice in Jupyter and nothing piles up in pyplot's figure list; the returned
Figure displays itself as the last expression of a cell), or draws into ``ax`` when given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp.viz.images import display_image

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "plot_ablation_curve",
    "plot_head_table",
    "plot_reconstruction_curve",
    "plot_retrieval_grid",
    "plot_textspan_variance",
]


def _figure(ax: Any, figsize: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plot_head_table(
    df: pd.DataFrame,
    kind: str = "heatmap",
    n_show: int = 3,
    ax: Any = None,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """The heads of a :func:`~clipdecomp.methods.textspan.textspan_heads` table, as a figure.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``layer``, ``head``, ``texts``, ``variance_explained``.
    kind : {"heatmap", "text"}
        ``"heatmap"``: layers x heads, colour = variance explained by the texts (annotated in
        %). ``"text"``: one row per head with its first ``n_show`` texts.
    n_show : int
        Texts per head in ``kind="text"``.
    ax : matplotlib Axes, optional
    cmap : str
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"layer": [10, 10, 11, 11], "head": [0, 1, 0, 1],
    ...                    "texts": [["a"], ["b"], ["c"], ["d"]],
    ...                    "variance_explained": [0.5, 0.6, 0.7, 0.8]})
    >>> fig = plot_head_table(df)
    """
    if kind == "text":
        rows = [
            (f"L{layer}.H{h}", f"{v:.0%}", "; ".join(map(str, list(ts)[:n_show])))
            for layer, h, ts, v in zip(df["layer"], df["head"], df["texts"],
                                       df["variance_explained"])
        ]
        width = max([len(r[2]) for r in rows] + [20])
        fig, ax = _figure(ax, (min(4 + 0.09 * width, 18), 0.3 * len(rows) + 0.8))
        ax.axis("off")
        if rows:
            table = ax.table(cellText=rows, colLabels=["head", "variance", "texts"],
                             loc="upper left", cellLoc="left",
                             colWidths=[0.1, 0.1, 0.8])
            table.auto_set_font_size(False)
            table.set_fontsize(8)
        if title:
            ax.set_title(title)
        return fig
    if kind != "heatmap":
        raise ValueError("kind must be 'heatmap' or 'text'")
    layers = sorted({int(v) for v in df["layer"]})
    heads = sorted({int(v) for v in df["head"]})
    grid = np.full((len(layers), len(heads)), np.nan)
    for layer, h, v in zip(df["layer"], df["head"], df["variance_explained"]):
        grid[layers.index(int(layer)), heads.index(int(h))] = v
    fig, ax = _figure(ax, (0.5 * len(heads) + 2.0, 0.45 * len(layers) + 1.2))
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(heads)), [str(h) for h in heads])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(heads)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="variance explained by the texts")
    ax.set_title(title or "TextSpan: variance explained per head")
    return fig


def plot_ablation_curve(df: pd.DataFrame, ax: Any = None, title: str | None = None) -> Figure:
    """Accuracy as attention layers are mean-ablated, from :func:`ablation_study`.

    The curve joins the baseline (0 layers) and the cumulative attention rows; the MLP and
    class-to-class rows, when present, are drawn as horizontal reference lines.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``ablation``, ``layers_ablated``, ``accuracy`` (a fraction).
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"ablation": ["baseline", "MLPs", "attention layer 0"],
    ...                    "layers_ablated": [0, 0, 1], "accuracy": [0.8, 0.79, 0.7]})
    >>> fig = plot_ablation_curve(df)
    """
    fig, ax = _figure(ax, (5.0, 3.4))
    names = list(df["ablation"])
    acc = 100 * np.asarray(df["accuracy"], np.float64)
    layers = np.asarray(df["layers_ablated"])
    curve = [i for i, name in enumerate(names) if name == "baseline" or layers[i] > 0]
    ax.plot(layers[curve], acc[curve], marker="o", ms=3, label="attention layers ablated")
    styles = iter([":", "--", "-."])
    for i, name in enumerate(names):
        if name != "baseline" and layers[i] == 0:
            ax.axhline(acc[i], ls=next(styles, ":"), lw=1, color="gray", alpha=0.8)
            ax.text(0, acc[i], f" {name} ablated", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("attention layers mean-ablated (from the first)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Mean ablation")
    ax.grid(alpha=0.3)
    return fig


def plot_retrieval_grid(
    images: Any,
    indices: np.ndarray,
    scores: np.ndarray | None = None,
    query_images: Any = None,
    titles: Sequence[str] | None = None,
    size: float = 1.6,
) -> Figure:
    """Grid of retrieved images: one row per query, best match first.

    Parameters
    ----------
    images : indexable collection
        ``images[i]`` is a path, PIL image, uint8 HWC array or float CHW array (e.g. an array
        [N, S, S, 3], a list of paths).
    indices : ndarray int [k] or [Q, k]
        From :meth:`HeadIndex.query <clipdecomp.methods.retrieval.HeadIndex.query>`.
    scores : ndarray [k] or [Q, k], optional
        Shown above each image.
    query_images : sequence, optional
        One image per query, drawn in a first column.
    titles : sequence of str, optional
        One label per query row.
    size : float
        Inches per image.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_retrieval_grid(np.zeros((5, 4, 4, 3), np.uint8), np.array([[0, 1], [2, 3]]))
    """
    from matplotlib.figure import Figure

    idx = np.atleast_2d(np.asarray(indices))
    sc = None if scores is None else np.atleast_2d(np.asarray(scores))
    extra = 0 if query_images is None else 1
    rows, cols = idx.shape[0], idx.shape[1] + extra
    fig = Figure(figsize=(size * max(cols, 1), size * rows + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(rows, max(cols, 1), squeeze=False))
    for r in range(rows):
        if extra:
            axes[r, 0].imshow(display_image(query_images[r], centre_crop=False))
            axes[r, 0].set_title("query", fontsize=8)
        for c in range(idx.shape[1]):
            ax = axes[r, c + extra]
            ax.imshow(display_image(images[int(idx[r, c])], centre_crop=False))
            label = f"#{int(idx[r, c])}"
            if sc is not None:
                label += f"  {sc[r, c]:.3f}"
            ax.set_title(label, fontsize=7)
        if titles is not None:
            axes[r, 0].set_ylabel(str(titles[r]), fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_textspan_variance(results: Any, ax: Any = None, title: str | None = None) -> Figure:
    """Cumulative variance explained against the number of TextSpan texts.

    Parameters
    ----------
    results : TextSpanResult, sequence or mapping of them, or a ``textspan_heads`` DataFrame
        One curve per head (a DataFrame: the results in ``df.attrs["results"]``).
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from clipdecomp.methods.textspan import textspan
    >>> rng = np.random.default_rng(0)
    >>> res = textspan(rng.normal(size=(40, 5)), np.eye(5), n_texts=4, rank=5)
    >>> fig = plot_textspan_variance(res)
    """
    if hasattr(results, "attrs") and "results" in getattr(results, "attrs", {}):
        results = results.attrs["results"]
    if isinstance(results, Mapping):
        items = list(results.items())
    elif hasattr(results, "cumulative"):
        items = [(None, results)]
    else:
        items = [(None, r) for r in results]
    fig, ax = _figure(ax, (5.0, 3.4))
    for key, res in items:
        if key is None and res.layer is not None:
            key = (res.layer, res.head)
        label = None if key is None else f"L{key[0]}.H{key[1]}"
        x = np.arange(1, len(res.cumulative) + 1)
        ax.plot(x, 100 * np.asarray(res.cumulative), marker="o", ms=2, lw=1, label=label)
    if 1 < len(items) <= 16:
        ax.legend(fontsize=6, ncol=2)
    ax.set_xlabel("texts")
    ax.set_ylabel("variance explained (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "TextSpan")
    ax.grid(alpha=0.3)
    return fig


def plot_reconstruction_curve(df: pd.DataFrame, ax: Any = None, title: str | None = None) -> Figure:
    """Accuracy against texts per head, from :func:`textspan_reconstruction_curve`.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"setting": ["baseline", "heads kept", "text span", "text span"],
    ...                    "n_texts": [None, None, 1, 10], "accuracy": [0.8, 0.78, 0.3, 0.7]})
    >>> fig = plot_reconstruction_curve(df)
    """
    fig, ax = _figure(ax, (5.0, 3.4))
    span = df[df["setting"] == "text span"]
    ax.plot(span["n_texts"].astype(float), 100 * span["accuracy"].astype(float), marker="o",
            ms=3, label="heads replaced by their text span")
    for name, ls in (("baseline", "--"), ("heads kept", ":")):
        rows = df[df["setting"] == name]
        if len(rows):
            ax.axhline(100 * float(rows["accuracy"].iloc[0]), ls=ls, color="gray", lw=1,
                       label=name)
    ax.set_xlabel("texts per head")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "TextSpan reconstruction")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
