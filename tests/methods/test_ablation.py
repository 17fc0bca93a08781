"""Mean ablation, the ablation study and RepairedCLIP against plain NumPy sums."""

import numpy as np
import pandas as pd
import pytest

from clipdecomp.methods.ablation import (
    ComponentMeans,
    RepairedCLIP,
    ablate,
    ablation_study,
    component_means,
    load_ablation,
)
from clipdecomp.methods.stats import HeadStats
from clipdecomp.viz.plots import plot_ablation_curve

L, H, D = 4, 3, 8


class StandInDecomposition:
    """Terms that satisfy the decomposition identity, as the contract requires."""

    def __init__(self, rng, b, cls_scale=0.3):
        self.heads = rng.normal(size=(b, L, H, D)).astype(np.float32)
        self.mlps = rng.normal(size=(b, L + 1, D)).astype(np.float32)
        # class-to-class part: a piece of the heads' sum
        self.cls_to_cls = (cls_scale * self.heads.sum(2)).astype(np.float32)
        total = self.heads.sum((1, 2), dtype=np.float64) + self.mlps.sum(1, dtype=np.float64)
        self.norm = rng.uniform(5, 10, size=b).astype(np.float32)
        self.embedding = (total * self.norm[:, None]).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return StandInDecomposition(rng, 40), StandInDecomposition(rng, 25)


def test_component_means_sources(data):
    ref, other = data
    m = component_means(ref)
    np.testing.assert_allclose(m.heads, ref.heads.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.mlps, ref.mlps.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.cls_to_cls, ref.cls_to_cls.astype(np.float64).mean(0),
                               rtol=1e-12)
    assert m.n == 40
    both = component_means([ref, other])
    pooled = np.concatenate([ref.heads, other.heads]).astype(np.float64).mean(0)
    np.testing.assert_allclose(both.heads, pooled, rtol=1e-10, atol=1e-12)
    assert both.n == 65
    arrays = component_means(ref.heads, mlps=ref.mlps)
    np.testing.assert_allclose(arrays.mlps, m.mlps)
    assert arrays.cls_to_cls is None
    stats = HeadStats(layers=[-1]).update(ref).merge(HeadStats(layers=[-1]).update(other))
    from_stats = component_means(stats)
    np.testing.assert_allclose(from_stats.heads, both.heads, atol=1e-12)
    np.testing.assert_allclose(from_stats.cls_to_cls, both.cls_to_cls, atol=1e-12)


def test_means_save_load(tmp_path, data):
    m = component_means(data[0])
    m.save(tmp_path / "m.npz")
    back = ComponentMeans.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.heads, m.heads)
    np.testing.assert_array_equal(back.cls_to_cls, m.cls_to_cls)
    assert back.n == 40 and "L=4" in repr(back)


def test_ablation_identities(data):
    ref, dec = data
    means = component_means(ref)
    normalised = dec.embedding / dec.norm[:, None]
    np.testing.assert_allclose(ablate(dec, means=means), normalised, atol=1e-5)
    everything = ablate(dec, layers=range(L), mlps=True, means=means)
    expected = means.heads.sum((0, 1)) + means.mlps.sum(0)
    np.testing.assert_allclose(everything, np.broadcast_to(expected, everything.shape),
                               atol=1e-5)
    # cls ablation on fully ablated layers changes nothing (they already hold the mean)
    np.testing.assert_allclose(
        ablate(dec, layers=range(L), mlps=True, cls_to_cls=True, means=means), everything
    )


def test_ablation_against_numpy(data):
    ref, dec = data
    means = component_means(ref)
    heads = dec.heads.astype(np.float64).copy()
    mlps = dec.mlps.astype(np.float64).copy()
    cls = dec.cls_to_cls.astype(np.float64)
    heads[:, 1, 2] = means.heads[1, 2]
    heads[:, 3, 0] = means.heads[3, 0]
    heads[:, 0] = means.heads[0]
    mlps[:, [0, 4]] = means.mlps[[0, 4]]
    expected = heads.sum((1, 2)) + mlps.sum(1) + (means.cls_to_cls[2] - cls[:, 2])
    got = ablate(dec, heads=[(1, 2), (-1, 0), (0, 1)], layers=[0], mlps=[0, -1],
                 cls_to_cls=[2], means=means)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # default means: the decomposition's own
    own = ablate(dec, layers=[1])
    h2 = dec.heads.astype(np.float64).copy()
    h2[:, 1] = dec.heads[:, 1].mean(0)
    np.testing.assert_allclose(own, h2.sum((1, 2)) + dec.mlps.sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="ambiguous"):
        ablate(dec, heads=[(2, 0)], cls_to_cls=[2], means=means)
    with pytest.raises(ValueError, match="out of range"):
        ablate(dec, heads=[(L, 0)], means=means)
    with pytest.raises(ValueError, match="no mlps"):
        ablate(dec, mlps=True, means=ComponentMeans(means.heads))


def numpy_study(dec, labels, w):
    """The reference compute_ablations.py steps, transcribed."""
    attns, mlps, cls = (x.astype(np.float64) for x in (dec.heads, dec.mlps, dec.cls_to_cls))

    def acc(x):
        return np.mean(np.argmax(x @ w, 1) == labels)

    out = [acc(attns.sum((1, 2)) + mlps.sum(1))]
    mlps_mean = np.repeat(mlps.mean(0, keepdims=True), len(mlps), 0)
    out.append(acc(attns.sum((1, 2)) + mlps_mean.sum(1)))
    no_cls = attns.sum(2) - cls + cls.mean(0)[None]
    out.append(acc(no_cls.sum(1) + mlps.sum(1)))
    out.append(acc(no_cls.sum(1) + mlps_mean.sum(1)))
    per_layer = attns.sum(2)
    for layer in range(attns.shape[1]):
        cur = (per_layer[:, :layer].mean(0, keepdims=True).sum(1)
               + per_layer[:, layer].mean(0, keepdims=True) + per_layer[:, layer + 1:].sum(1))
        out.append(acc(mlps.sum(1) + cur))
    return out


def test_ablation_study_matches_reference_steps():
    rng = np.random.default_rng(5)
    dec = StandInDecomposition(rng, 300)
    w = rng.normal(size=(D, 5))
    labels = np.argmax((dec.embedding / dec.norm[:, None]) @ w + rng.normal(size=(300, 5)), 1)
    df = ablation_study(dec, labels, w)
    assert isinstance(df, pd.DataFrame)
    assert df.ablation.tolist()[:4] == ["baseline", "MLPs", "class-to-class attention",
                                        "MLPs + class-to-class attention"]
    assert df.layers_ablated.tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    np.testing.assert_allclose(df.accuracy.to_numpy(), numpy_study(dec, labels, w))
    fig = plot_ablation_curve(df)
    assert fig.axes and len(fig.axes[0].lines) >= 4


class StandInModel:
    """decompose(images) -> the rows of a fixed StandInDecomposition."""

    def __init__(self, dec):
        self.dec = dec
        self.config = type("Cfg", (), {"layers": L, "heads": H, "name": "stand-in"})()

    def decompose(self, images, **kwargs):
        idx = np.asarray(images)
        out = type("Dec", (), {})()
        for name in ("heads", "mlps", "cls_to_cls", "norm", "embedding"):
            setattr(out, name, getattr(self.dec, name)[idx])
        return out

    def encode_text(self, texts, normalize=True):
        return np.ones((len(texts), D), np.float32)


def test_repaired_clip(tmp_path, data):
    ref, dec = data
    means = component_means(ref)
    model = StandInModel(dec)
    kw = {"heads": [(3, 1), (2, 2)], "mlps": [1], "cls_to_cls": [0]}
    rep = RepairedCLIP(model, means=means, **kw)
    images = [3, 0, 7]
    expected = ablate(model.decompose(images), means=means, **kw).astype(np.float64)
    un = rep.encode_image(images, normalize=False)
    np.testing.assert_allclose(un, expected * dec.norm[images, None], rtol=1e-5, atol=1e-5)
    unit = rep.encode_image(images, normalize=True)
    np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-6)
    # nothing ablated: the model's own embedding
    plain = RepairedCLIP(model, means=means)
    np.testing.assert_allclose(plain.encode_image(images, normalize=False),
                               dec.embedding[images], rtol=1e-5)
    # passthrough and persistence
    assert rep.encode_text(["x"], normalize=True).shape == (1, D) and rep.config.name == "stand-in"
    rep.save(tmp_path / "rep.npz")
    spec, m2 = load_ablation(tmp_path / "rep.npz")
    np.testing.assert_array_equal(m2.heads, means.heads)
    assert spec == {"heads": [(2, 2), (3, 1)], "mlps": [1], "cls_to_cls": [0]}
    back = RepairedCLIP.load(tmp_path / "rep.npz", model)
    np.testing.assert_array_equal(back.encode_image(images, normalize=True), unit)
    with pytest.raises(ValueError, match="means"):
        RepairedCLIP(model)


# ---------------------------------------------------------------------------- real model
def test_repaired_clip_on_real_model(b16):
    from checkpoints import image_features, random_pixels

    import clipdecomp

    model = clipdecomp.load(b16.dirs[("open_clip", "F32")], threads=1)
    means = component_means(model.decompose(random_pixels(b16, 12, seed=1)))
    assert means.heads.shape == (3, 5, 40) and means.mlps.shape == (4, 40)
    pixels = random_pixels(b16, 5, seed=2)
    kw = {"heads": [(2, 1), (2, 3)], "layers": [0], "mlps": [0, 3], "cls_to_cls": [1]}
    rep = RepairedCLIP(model, means=means, **kw)
    expected = ablate(model.decompose(pixels), means=means, **kw).astype(np.float64)
    np.testing.assert_allclose(
        rep.encode_image(pixels, normalize=True),
        expected / np.linalg.norm(expected, axis=1, keepdims=True),
        atol=1e-5)
    # the same sum, term by term from the decomposition's arrays
    dec = model.decompose(pixels)
    heads = dec.heads.astype(np.float64)
    manual = (heads.sum((1, 2)) - heads[:, 2, [1, 3]].sum(1) + means.heads[2, [1, 3]].sum(0)
              - heads[:, 0].sum(1) + means.heads[0].sum(0)
              + dec.mlps.sum(1) - dec.mlps[:, [0, 3]].sum(1) + means.mlps[[0, 3]].sum(0)
              - dec.cls_to_cls[:, 1] + means.cls_to_cls[1])
    np.testing.assert_allclose(expected, manual, atol=1e-5)
    # nothing ablated: transformers' own image features (an independent forward)
    plain = RepairedCLIP(model, means=means)
    np.testing.assert_allclose(plain.encode_image(pixels, normalize=False),
                               image_features(b16.model, pixels), rtol=1e-4, atol=1e-4)
    # raw images go through the model's preprocessing as encode_image does
    images = [(np.random.default_rng(i).random((70, 80, 3)) * 255).astype(np.uint8)
              for i in range(3)]
    np.testing.assert_allclose(plain.encode_image(images, normalize=True),
                               model.encode_image(images, normalize=True),
                               atol=1e-5)
    assert rep.config is model.config and rep.tokenize is not None
    with pytest.raises(ValueError, match="L=4"):
        RepairedCLIP(model, means=ComponentMeans(np.zeros((4, 5, 40))))
