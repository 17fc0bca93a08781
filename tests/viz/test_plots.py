"""Every figure of clipdecomp.viz draws the numbers it is given (checked on the artists)."""
import numpy as np
import pytest

from clipdecomp.methods.spatial import upsample
from clipdecomp.methods.textspan import textspan_heads, textspan_reconstruction_curve

L, H, G = 3, 4, 3


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_overlay_draws_the_upsampled_map_over_the_image():
    from clipdecomp.viz.spatial_plots import overlay

    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    heat = np.random.default_rng(1).normal(size=(5, 5))
    fig = overlay(img, heat, mask=np.eye(40, dtype=bool), colorbar=True, title="t")
    ax = fig.axes[0]
    shown, drawn = ax.images[0].get_array(), ax.images[1].get_array()
    np.testing.assert_array_equal(shown, img[:, 10:50])  # the centre square the model sees
    np.testing.assert_allclose(drawn, upsample(heat, 40))
    assert ax.get_title() == "t" and len(fig.axes) == 2


def test_plot_panels():
    from clipdecomp.viz.spatial_plots import plot_head_grid, plot_methods, plot_text_maps

    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 16, 16)).astype(np.float32)  # preprocessed pixels
    fig = plot_text_maps(img, rng.normal(size=(3, 4, 4)), ["a", "b", "c"], shared_scale=True)
    assert [a.get_title() for a in fig.axes] == ["image", "a", "b", "c"]
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (16, 16, 3) and 0 <= shown.min() and shown.max() <= 1
    maps = rng.normal(size=(L, H, G, G))
    fig = plot_head_grid(maps, image=img, layers=[-1], heads=[0, 2])
    assert len(fig.axes) == 3
    lim = np.abs(maps[-1][[0, 2]]).max()
    assert fig.axes[0].images[1].get_clim() == pytest.approx((-lim, lim))
    fig = plot_methods(img, {"ours": maps[0, 0], "rollout": maps[1, 1]},
                       gt_mask=np.eye(16, dtype=bool), masks={"ours": np.eye(16, dtype=bool)})
    assert [a.get_title() for a in fig.axes] == ["image", "ground truth", "ours", "rollout"]
    with pytest.raises(ValueError):
        plot_text_maps(img, rng.normal(size=(2, 4, 4)), ["only one"])
    with pytest.raises(ValueError):
        plot_head_grid(rng.normal(size=(2, 4, 4)))


def test_plots_of_head_tables():
    from clipdecomp.viz.plots import (
        plot_head_table,
        plot_reconstruction_curve,
        plot_textspan_variance,
    )

    rng = np.random.default_rng(21)
    heads = rng.normal(size=(80, 5, 3, 10)) * np.geomspace(1, 0.1, 10)
    t = unit_rows(rng.normal(size=(40, 10)))
    df = textspan_heads(heads, t, n_texts=4, rank=10, progress=False)
    fig = plot_head_table(df)
    grid = np.asarray(fig.axes[0].images[0].get_array())
    assert grid.shape == (4, 3)  # layers 1..4 x 3 heads
    np.testing.assert_allclose(grid, df.variance_explained.to_numpy().reshape(4, 3))
    text_fig = plot_head_table(df, kind="text", n_show=2)
    assert text_fig.axes[0].tables
    fig = plot_textspan_variance(df)
    lines = fig.axes[0].lines
    assert len(lines) == 12
    res = df.attrs["results"][(1, 0)]
    np.testing.assert_allclose(lines[0].get_ydata(), 100 * res.cumulative)
    curve = textspan_reconstruction_curve(heads, rng.normal(size=(80, 6, 10)),
                                          rng.integers(0, 3, 80), rng.normal(size=(10, 3)),
                                          t, n_texts_list=(1, 3), progress=False)
    fig = plot_reconstruction_curve(curve)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(),
                               100 * curve.accuracy.to_numpy()[2:])
    with pytest.raises(ValueError, match="kind"):
        plot_head_table(df, kind="pie")
