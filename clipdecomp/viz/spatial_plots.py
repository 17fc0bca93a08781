"""Figures for the spatial maps: a map over its image, per-text maps, per-head grids, methods
side by side.

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot (nothing is
shown twice in Jupyter, nothing accumulates in pyplot's figure list; the Figure displays itself
as the last expression of a cell), or draws into ``ax`` where it takes one.

Maps may be patch grids ``[G, G]`` or pixel maps ``[S, S]``: they are resampled bilinearly
(:func:`clipdecomp.methods.spatial.upsample`) to the image shown. A non-square image is shown as the
model sees it: its centre square, the crop of CLIP's preprocessing.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clipdecomp.engine.selection import parse_layers
from clipdecomp.methods.spatial import upsample
from clipdecomp.viz.images import display_image

__all__ = ["overlay", "plot_head_grid", "plot_methods", "plot_text_maps"]


def _new_figure(figsize: tuple[float, float], layout: Any = "constrained") -> Any:
    """A matplotlib Figure not tied to pyplot (``layout``: "constrained", None...)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout=layout)


def _resample(m: Any, side: int) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"a map must be 2-D [G, G] or [S, S]; got shape {m.shape}")
    return m if m.shape == (side, side) else upsample(m, side)


def _draw(ax: Any, image: np.ndarray | None, heat: np.ndarray | None, alpha: float, cmap: str,
          vmin: float | None, vmax: float | None, title: str | None,
          mask: np.ndarray | None = None) -> Any:
    """Image, then the map over it, then a mask contour; returns the map's image artist."""
    side = image.shape[0] if image is not None else (heat.shape[0] if heat is not None else 1)
    art = None
    if image is not None:
        ax.imshow(image, extent=(0, side, side, 0))
    if heat is not None:
        art = ax.imshow(_resample(heat, side), cmap=cmap, vmin=vmin, vmax=vmax,
                        alpha=alpha if image is not None else 1.0, extent=(0, side, side, 0))
    if mask is not None:
        mk = np.asarray(mask, dtype=np.float64)
        if mk.shape != (side, side):
            mk = upsample(mk, side)
        ax.contour(np.arange(side) + 0.5, np.arange(side) + 0.5, mk, levels=[0.5],
                   colors="white", linewidths=1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return art


def overlay(image: Any, heat: np.ndarray, ax: Any = None, alpha: float = 0.5, cmap: str = "jet",
            title: str | None = None, vmin: float | None = None, vmax: float | None = None,
            mask: np.ndarray | None = None, colorbar: bool = False) -> Any:
    """One map over its image.

    Parameters
    ----------
    image : path, PIL image, uint8 [H, W, 3] or preprocessed float [3, S, S]
    heat : [G, G] patch map or [S, S] pixel map
    ax : matplotlib Axes to draw into (default: a new figure)
    alpha : opacity of the map
    cmap : colour map
    title : axes title
    vmin, vmax : colour range (default: the map's range)
    mask : optional [S, S] or [G, G] binary mask drawn as a white contour
    colorbar : add a colour bar

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> fig = overlay(np.zeros((32, 32, 3), np.uint8), np.eye(4), title="diagonal")
    >>> len(fig.axes)
    1
    """
    if ax is None:
        fig = _new_figure((3.2, 3.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    art = _draw(ax, display_image(image), np.asarray(heat), alpha, cmap, vmin, vmax, title, mask)
    if colorbar:
        fig.colorbar(art, ax=ax, shrink=0.8)
    return fig


def plot_text_maps(image: Any, maps: np.ndarray, texts: Sequence[str], alpha: float = 0.5,
                   cmap: str = "jet", shared_scale: bool = False, ncols: int | None = None
                   ) -> Any:
    """The heat map of each text over one image
    (e.g. ``heatmap(dec, encode_text(texts, normalize=True))[b]``).

    Parameters
    ----------
    image : the image (see :func:`overlay`)
    maps : [T, G, G] maps of one image
    texts : T labels
    alpha, cmap : look of the maps
    shared_scale : one colour range for all texts (default: each map its own)
    ncols : panels per row (default: the image plus all texts on one row, up to 6)

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_text_maps(np.zeros((32, 32, 3), np.uint8), np.random.rand(2, 4, 4),
    ...                      ["a red star", "grass"])
    >>> len(fig.axes)
    3
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(texts):
        raise ValueError(f"maps must be [T, G, G] with T = {len(texts)} texts; got {maps.shape}")
    img = display_image(image)
    n = 1 + len(texts)
    ncols = ncols or min(n, 6)
    nrows = -(-n // ncols)
    fig = _new_figure((2.3 * ncols, 2.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    vmin = vmax = None
    if shared_scale:
        vmin, vmax = float(np.nanmin(maps)), float(np.nanmax(maps))
    _draw(axes[0], img, None, alpha, cmap, None, None, "image")
    for ax, m, t in zip(axes[1:], maps, texts):
        _draw(ax, img, m, alpha, cmap, vmin, vmax, t)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def plot_head_grid(maps: np.ndarray, image: Any = None, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, cmap: str = "RdBu_r", alpha: float = 0.6,
                   title: str | None = None) -> Any:
    """Per-head maps as a layers x heads grid (e.g. ``head_maps(dec, direction)[b]``).

    The colour scale is shared and symmetric around 0, so that heads that write against the
    direction show in blue and heads that write nothing fade out.

    Parameters
    ----------
    maps : [L, H, G, G] maps of one image
    image : optional image shown under every map
    layers, heads : rows and columns to show (default all; negative indices count from the end)
    cmap : a diverging colour map
    alpha : opacity of the maps over the image
    title : figure title

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_head_grid(np.random.randn(3, 4, 4, 4), layers=[-2, -1])
    >>> len(fig.axes)  # 2 x 4 maps and the colour bar
    9
    """
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise ValueError(f"maps must be [L, H, G, G]; got {maps.shape}")
    n_layers, n_heads = maps.shape[:2]
    ls = list(parse_layers(layers, n_layers))
    hs = [i % n_heads for i in (range(n_heads) if heads is None else heads)]
    img = None if image is None else display_image(image)
    sub = maps[np.ix_(ls, hs)]
    lim = float(np.nanmax(np.abs(sub))) or 1.0
    # a fixed layout (the constrained one takes seconds to solve for dozens of panels):
    # square cells of `cell` inches, margins in inches, the colour bar on the right
    cell, left, right, bottom, top = 1.25, 0.45, 1.0, 0.1, (0.65 if title else 0.35)
    fw = left + cell * len(hs) + right
    fh = bottom + cell * len(ls) + top
    fig = _new_figure((fw, fh), layout=None)
    axes = fig.subplots(len(ls), len(hs), squeeze=False,
                        gridspec_kw={"wspace": 0.06, "hspace": 0.06, "left": left / fw,
                                     "right": 1 - right / fw, "bottom": bottom / fh,
                                     "top": 1 - top / fh})
    art = None
    for r, li in enumerate(ls):
        for c, hi in enumerate(hs):
            ax = axes[r, c]
            art = _draw(ax, img, maps[li, hi], alpha, cmap, -lim, lim, None)
            if r == 0:
                ax.set_title(f"head {hi}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    cax = fig.add_axes((1 - 0.8 * right / fw, 0.25, 0.18 / fw, 0.5))
    fig.colorbar(art, cax=cax)
    if title:
        fig.suptitle(title)
    return fig


def plot_methods(image: Any, maps: Mapping[str, np.ndarray], gt_mask: np.ndarray | None = None,
                 masks: Mapping[str, np.ndarray] | None = None, alpha: float = 0.5,
                 cmap: str = "jet") -> Any:
    """Several methods' maps of one image side by side, with the ground truth if given.

    Parameters
    ----------
    image : the image (see :func:`overlay`)
    maps : method name -> [G, G] or [S, S] map (e.g. the decomposition, raw attention, rollout)
    gt_mask : optional [S, S] ground-truth mask, shown in its own panel and as a contour
    masks : optional method name -> predicted [S, S] mask, drawn as a white contour
    alpha, cmap : look of the maps

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = plot_methods(np.zeros((16, 16, 3), np.uint8),
    ...                    {"ours": np.random.rand(4, 4), "attention": np.random.rand(4, 4)},
    ...                    gt_mask=np.eye(16, dtype=bool))
    >>> len(fig.axes)
    4
    """
    img = display_image(image)
    n = 1 + (gt_mask is not None) + len(maps)
    fig = _new_figure((2.3 * n, 2.5))
    axes = fig.subplots(1, n, squeeze=False)[0]
    _draw(axes[0], img, None, alpha, cmap, None, None, "image")
    k = 1
    if gt_mask is not None:
        _draw(axes[1], img, np.asarray(gt_mask, float), 0.55, "gray", 0, 1, "ground truth")
        k = 2
    for ax, (name, m) in zip(axes[k:], maps.items()):
        mk = None if masks is None else masks.get(name)
        _draw(ax, img, np.asarray(m), alpha, cmap, None, None, name, mask=mk)
    return fig
