"""TextSpan against a plain NumPy transcription of the reference steps.

The oracle below follows ``replace_with_iterative_removal`` of the reference code
(yossigandelsman/clip_text_span, compute_complete_text_set.py) line by line, in float64:
SVD of the uncentred data, texts projected with ``V^T (V V^T)^-1 V``, centring, then the
greedy pick / reconstruct / deflate loop with the unbiased standard deviation (torch's default).
"""


import numpy as np
import pandas as pd
import pytest

from clipdecomp.methods.stats import HeadStats
from clipdecomp.methods.textspan import (
    TextSpanResult,
    textspan,
    textspan_from_stats,
    textspan_heads,
    textspan_reconstruction_curve,
)
from clipdecomp.viz.tables import format_head_table


def reference_textspan(data, text_features, iters, rank):
    """Oracle: the reference algorithm, literally. Returns (picks, reconstruction, stds)."""
    data = np.asarray(data, np.float64)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = (vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T)).T
    mean_data = data.mean(axis=0, keepdims=True)
    data = data - mean_data
    reconstruct = np.repeat(mean_data, data.shape[0], axis=0)
    picks, stds = [], []
    for _ in range(iters):
        projection = data @ text_features.T
        projection_std = projection.std(axis=0, ddof=1)
        top_n = int(np.argmax(projection_std))
        picks.append(top_n)
        stds.append(projection_std[top_n])
        text_norm = text_features[top_n] @ text_features[top_n]
        coef = (data @ text_features[top_n] / text_norm)[:, None]
        reconstruct = reconstruct + coef * text_features[top_n][None, :]
        data = data - coef * text_features[top_n][None, :]
        text_features = (
            text_features
            - (text_features @ text_features[top_n] / text_norm)[:, None]
            * text_features[top_n][None, :]
        )
    return picks, reconstruct, np.array(stds)


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(rng, n, d, m, true_rank=None, offset=0.5):
    """Anisotropic head-like terms (optionally low rank) with a non-zero mean, and texts."""
    k = d if true_rank is None else true_rank
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :k]  # [D, k]
    scales = np.geomspace(3.0, 0.2, k)
    c = (rng.normal(size=(n, k)) * scales) @ basis.T + offset * rng.normal(size=d)
    if true_rank is not None:  # keep the mean inside the span too: rank stays k
        c = (rng.normal(size=(n, k)) * scales + offset) @ basis.T
    t = unit_rows(rng.normal(size=(m, d)) + 0.5 * rng.normal(size=(m, 1)) * basis[:, 0])
    return c, t


SHAPES = [
    # N, D, M, rank, m, true_rank
    (200, 16, 50, 16, 8, None),  # rank = D
    (300, 32, 120, 10, 10, None),  # rank < D
    (120, 24, 300, 24, 20, None),  # more texts than images
    (40, 64, 100, 30, 12, None),  # N < D: C has rank <= 40
    (150, 32, 80, 6, 6, 9),  # low-rank data, rank < true rank
    (150, 48, 90, 12, 10, 12),  # low-rank data, rank = true rank
]


@pytest.mark.parametrize("n,d,m,rank,k,true_rank", SHAPES)
def test_textspan_matches_reference(n, d, m, rank, k, true_rank):
    rng = np.random.default_rng(n * 1000 + d)
    c, t = make_data(rng, n, d, m, true_rank)
    texts = [f"t{i}" for i in range(m)]
    picks, recon, stds = reference_textspan(c, t, k, rank)
    res = textspan(c, t, texts, n_texts=k, rank=rank)
    assert isinstance(res, TextSpanResult)
    assert res.indices.tolist() == picks
    assert res.texts == [texts[j] for j in picks]
    np.testing.assert_allclose(res.reconstruction, recon, atol=1e-5)
    np.testing.assert_allclose(res.std, stds, rtol=1e-8)
    # the reconstruction rebuilt from the picked directions is the reference one
    np.testing.assert_allclose(res.reconstruct(c), recon, atol=1e-5)


@pytest.mark.parametrize("n,d,m,rank,k,true_rank", SHAPES)
def test_streaming_picks_same_texts(n, d, m, rank, k, true_rank):
    rng = np.random.default_rng(n * 1000 + d + 1)
    c, t = make_data(rng, n, d, m, true_rank)
    picks, recon, stds = reference_textspan(c, t, k, rank)
    moments = (c.mean(axis=0), c.T @ c / n, n)
    fast = textspan_from_stats(moments, t, n_texts=k, rank=rank)
    assert fast.indices.tolist() == picks
    np.testing.assert_allclose(fast.std, stds, rtol=1e-6)
    assert fast.reconstruction is None
    np.testing.assert_allclose(fast.reconstruct(c), recon, atol=1e-5)
    # same reported numbers as the in-memory path
    mem = textspan(c, t, n_texts=k, rank=rank)
    np.testing.assert_allclose(fast.variance, mem.variance, rtol=1e-6)
    np.testing.assert_allclose(fast.cumulative, mem.cumulative, rtol=1e-6)


def test_streaming_from_headstats_batches():
    rng = np.random.default_rng(7)
    n, n_layers, n_heads, d = 240, 3, 2, 20
    heads = rng.normal(size=(n, n_layers, n_heads, d)) * np.geomspace(2, 0.1, d) + 0.3
    t = unit_rows(rng.normal(size=(70, d)))
    stats = HeadStats(layers=[1, 2])
    for b0 in range(0, n, 64):
        stats.update(heads[b0 : b0 + 64].astype(np.float32))
    c = heads[:, 2, 1].astype(np.float32).astype(np.float64)
    picks, _, _ = reference_textspan(c, t, 10, 12)
    fast = textspan_from_stats(stats, t, n_texts=10, rank=12, head=(2, 1))
    assert fast.indices.tolist() == picks
    with pytest.raises(ValueError, match="several heads"):
        textspan_from_stats(stats, t, n_texts=2)
    with pytest.raises(KeyError):
        textspan_from_stats(stats, t, n_texts=2, head=(0, 0))


def test_rank_above_data_rank_uses_numerical_rank():
    # rank(C) = 7 < 80: the extra singular vectors are null-space noise; both paths use only
    # the 7 real ones, i.e. they equal the reference run with rank = 7.
    rng = np.random.default_rng(3)
    c, t = make_data(rng, 100, 40, 60, true_rank=7)
    picks, recon, _ = reference_textspan(c, t, 7, 7)
    res = textspan(c, t, n_texts=7, rank=80)
    fast = textspan_from_stats((c.mean(0), c.T @ c / len(c), len(c)), t, n_texts=7, rank=80)
    assert res.rank == 7 and fast.rank == 7
    assert res.indices.tolist() == picks == fast.indices.tolist()
    np.testing.assert_allclose(res.reconstruction, recon, atol=1e-8)


def test_variance_bookkeeping():
    rng = np.random.default_rng(11)
    c, t = make_data(rng, 180, 12, 40)
    res = textspan(c, t, n_texts=12, rank=12)
    centred = c - c.mean(axis=0)
    total = (centred**2).sum() / (len(c) - 1)
    assert res.total_variance == pytest.approx(total, rel=1e-12)
    # the variance explained by pick k is the variance of C along the unit direction
    u = unit_rows(res.directions)
    np.testing.assert_allclose(res.variance, ((centred @ u.T) ** 2).sum(0) / (len(c) - 1))
    # the cumulative fraction is 1 - residual / total, after every pick
    for k in (1, 4, 12):
        resid = ((c - res.reconstruct(c, k)) ** 2).sum() / (len(c) - 1)
        assert res.cumulative[k - 1] == pytest.approx(1 - resid / total, abs=1e-10)
    # picked directions are orthogonal; std is the criterion: std**2 = variance * |t|^2
    np.testing.assert_allclose(u @ u.T, np.eye(len(u)), atol=1e-10)
    np.testing.assert_allclose(res.std**2, res.variance * (res.directions**2).sum(1))
    # with as many texts as dimensions the reconstruction is exact
    np.testing.assert_allclose(res.reconstruction, c, atol=1e-10)
    assert res.cumulative[-1] == pytest.approx(1.0)


def test_stops_when_nothing_left():
    rng = np.random.default_rng(5)
    c, t = make_data(rng, 60, 10, 30, true_rank=4)
    res = textspan(c, t, n_texts=9, rank=80)
    fast = textspan_from_stats((c.mean(0), c.T @ c / 60, 60), t, n_texts=9, rank=80)
    assert len(res) == 4 and len(fast) == 4
    assert np.all(np.isfinite(res.reconstruction))
    assert res.cumulative[-1] == pytest.approx(1.0)


def test_result_display():
    rng = np.random.default_rng(0)
    c, t = make_data(rng, 50, 6, 10)
    texts = [f"a <b>photo</b> {i}" for i in range(10)]
    res = textspan(c, t, texts, n_texts=3, rank=6)
    text = repr(res)
    assert text.splitlines()[1].startswith("1. " + res.texts[0])
    assert len(text.splitlines()) == 4
    assert "&lt;b&gt;" in res._repr_html_() and res._repr_html_().count("<li>") == 3
    frame = res.to_frame()
    assert frame["text"].tolist() == res.texts
    with pytest.raises(ValueError, match="texts"):
        textspan(c, t, texts[:3])
    with pytest.raises(ValueError, match=r"\[M, 6\]"):
        textspan(c, t[:, :4])


class StandInDecomposition:
    def __init__(self, heads):
        self.heads = heads


def test_textspan_heads_sources_agree():
    rng = np.random.default_rng(9)
    n, n_layers, n_heads, d = 150, 6, 3, 16
    heads = rng.normal(size=(n, n_layers, n_heads, d)) * np.geomspace(2, 0.2, d)
    heads += rng.normal(size=(1, n_layers, n_heads, d))
    t = unit_rows(rng.normal(size=(60, d)))
    texts = [f"text number {i}" for i in range(60)]
    df = textspan_heads(heads, t, texts, n_texts=5, rank=10, progress=False)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["layer", "head", "texts", "variance_explained"]
    assert df[["layer", "head"]].values.tolist() == [
        [layer, h] for layer in (2, 3, 4, 5) for h in range(3)
    ]
    for layer, h, picked, explained in df.itertuples(index=False):
        picks, _, _ = reference_textspan(heads[:, layer, h], t, 5, 10)
        assert picked == [texts[j] for j in picks]
        res = df.attrs["results"][(layer, h)]
        assert explained == pytest.approx(res.cumulative[-1])
    df2 = textspan_heads(StandInDecomposition(heads), t, texts, n_texts=5, rank=10,
                         progress=False)
    stats = HeadStats(layers=[-4, -3, -2, -1]).update(heads[:70]).merge(
        HeadStats(layers=[-4, -3, -2, -1]).update(heads[70:]))
    df3 = textspan_heads(stats, t, texts, n_texts=5, rank=10, progress=False)
    assert df2.texts.tolist() == df.texts.tolist() == df3.texts.tolist()
    df4 = textspan_heads(heads, t, texts, heads=[(-1, 2), (0, 1)], n_texts=2, rank=10,
                         progress=False)
    assert df4[["layer", "head"]].values.tolist() == [[5, 2], [0, 1]]
    shown = format_head_table(df, n_show=2, sep="; ")
    data = getattr(shown, "data", shown)
    assert data["texts"].iloc[0] == "; ".join(df.texts.iloc[0][:2])
    assert "<br>" in format_head_table(df).to_html()


def test_reconstruction_curve_matches_direct_computation():
    rng = np.random.default_rng(13)
    n, n_layers, n_heads, d, n_cls = 300, 5, 2, 12, 4
    heads = rng.normal(size=(n, n_layers, n_heads, d)) * np.geomspace(1, 0.1, d)
    mlps = rng.normal(size=(n, n_layers + 1, d)) * 0.5
    classifier = unit_rows(rng.normal(size=(n_cls, d))).T  # [D, C]
    emb = heads.sum((1, 2)) + mlps.sum(1)
    labels = np.argmax(emb @ classifier + 0.3 * rng.normal(size=(n, n_cls)), axis=1)
    t = unit_rows(rng.normal(size=(50, d)))
    layers = [3, 4]
    ks = (0, 1, 3, 12)
    df = textspan_reconstruction_curve(heads, mlps, labels, classifier, t, layers=layers,
                                       n_texts_list=ks, rank=12, progress=False)

    def acc(x):
        return np.mean(np.argmax(x @ classifier, 1) == labels)

    assert df.accuracy.iloc[0] == pytest.approx(acc(emb))
    ablated = heads.copy()
    ablated[:, :3] = heads[:, :3].mean(0, keepdims=True)
    assert df.accuracy.iloc[1] == pytest.approx(acc(ablated.sum((1, 2)) + mlps.sum(1)))
    for k, got in zip(ks, df.accuracy.iloc[2:]):
        rep = ablated.copy()
        for layer in layers:
            for h in range(n_heads):
                if k == 0:
                    rep[:, layer, h] = heads[:, layer, h].mean(0)
                else:
                    rep[:, layer, h] = reference_textspan(heads[:, layer, h], t, k, 12)[1]
        assert got == pytest.approx(acc(rep.sum((1, 2)) + mlps.sum(1))), k
    # with D texts per head the reconstruction is exact: same as the heads kept
    assert df.accuracy.iloc[-1] == pytest.approx(df.accuracy.iloc[1])


# ---------------------------------------------------------------------------- real model
def test_textspan_on_real_model(b16):
    from checkpoints import random_pixels, random_text_ids

    import clipdecomp

    model = clipdecomp.load(b16.dirs[("open_clip", "F32")], threads=1)
    texts = [f"text {i}" for i in range(80)]
    # unit text embeddings [80, 40]
    emb = model.encode_text(random_text_ids(b16, 80, seed=3), normalize=True)
    stats = HeadStats()
    decs = []
    for seed in range(4):  # streamed in batches; the heads also kept for the reference
        dec = model.decompose(random_pixels(b16, 30, seed=10 + seed))
        stats.update(dec)
        decs.append(dec.heads)
    heads = np.concatenate(decs)
    assert stats.n == 120 and stats.mlp_sum is not None and stats.cls_sum is not None
    df = textspan_heads(stats, emb, texts, n_texts=6, rank=12, progress=False)
    assert len(df) == 15  # the 3 layers x 5 heads of this small model
    for layer, h, picked, _ in df.itertuples(index=False):
        c = heads[:, layer, h].astype(np.float64)
        picks, _, _ = reference_textspan(c, emb.astype(np.float64), 6, 12)
        assert picked == [texts[j] for j in picks], (layer, h)
