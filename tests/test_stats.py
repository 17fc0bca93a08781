"""HeadStats: streaming sums against direct NumPy moments."""

import numpy as np
import pytest

from clipdecomp.stats import HeadStats


def random_heads(seed, n=90, n_layers=4, n_heads=3, d=10):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, n_layers, n_heads, d)) * 2 + 1).astype(np.float32)


def test_moments_match_numpy():
    x = random_heads(0)
    stats = HeadStats(chunk=5)  # several chunks in the batched product
    for b0 in range(0, len(x), 32):
        stats.update(x[b0 : b0 + 32])
    x64 = x.astype(np.float64)
    assert stats.n == len(x) and stats.layers == (0, 1, 2, 3)
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12)
    for layer in range(4):
        for h in range(3):
            c = x64[:, layer, h]
            np.testing.assert_allclose(stats.covariance[layer, h], np.cov(c.T), atol=1e-12)
            np.testing.assert_allclose(stats.covariance_of(0)[layer, h],
                                       np.cov(c.T, ddof=0), atol=1e-12)
            np.testing.assert_allclose(stats.second_moment[layer, h], c.T @ c / len(c),
                                       rtol=1e-12)
            mean, second, n = stats.head(layer, h)
            np.testing.assert_allclose(mean, c.mean(0), rtol=1e-12)
            np.testing.assert_allclose(second, c.T @ c / len(c), rtol=1e-12)
            assert n == len(x)


def test_merge_of_halves_equals_whole():
    x = random_heads(1)
    rng = np.random.default_rng(2)
    mlps = rng.normal(size=(len(x), 5, 10))
    cls = rng.normal(size=(len(x), 4, 10))
    whole = HeadStats(layers=[-2, -1]).update(x, mlps, cls)
    a = HeadStats(layers=[-2, -1]).update(x[:37], mlps[:37], cls[:37])
    b = HeadStats(layers=[-2, -1]).update(x[37:], mlps[37:], cls[37:])
    merged = a.merge(b)
    assert merged.n == whole.n and merged.layers == (2, 3)
    for name in ("sum", "sum_outer", "head_sum", "mlp_sum", "cls_sum"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), atol=1e-10)
    np.testing.assert_allclose(merged.covariance, whole.covariance, atol=1e-10)
    np.testing.assert_allclose(merged.head_sum, x.astype(np.float64).sum(0), rtol=1e-12)
    np.testing.assert_allclose(merged.mlp_sum, mlps.sum(0), rtol=1e-12)
    # merging into an empty accumulator copies
    empty = HeadStats().merge(whole)
    np.testing.assert_allclose(empty.sum_outer, whole.sum_outer)


def test_selected_layers_only():
    x = random_heads(3)
    stats = HeadStats(layers=[-1, 1]).update(x)
    assert stats.layers == (1, 3)
    assert stats.sum_outer.shape == (2, 3, 10, 10)
    c = x[:, 3, 2].astype(np.float64)
    np.testing.assert_allclose(stats.head(-1, 2)[1], c.T @ c / len(c), rtol=1e-12)
    with pytest.raises(KeyError):
        stats.head(0, 0)
    with pytest.raises(ValueError, match="out of range"):
        HeadStats(layers=[7]).update(x)


class StandInDecomposition:
    def __init__(self, heads, mlps, cls_to_cls):
        self.heads, self.mlps, self.cls_to_cls = heads, mlps, cls_to_cls


def test_update_from_decomposition_and_consistency_checks():
    x = random_heads(4, n=20)
    rng = np.random.default_rng(4)
    dec = StandInDecomposition(x, rng.normal(size=(20, 5, 10)), rng.normal(size=(20, 4, 10)))
    stats = HeadStats().update(dec)
    np.testing.assert_allclose(stats.mlp_sum, dec.mlps.sum(0))
    np.testing.assert_allclose(stats.cls_sum, dec.cls_to_cls.sum(0))
    with pytest.raises(ValueError, match="MLP"):
        stats.update(x)
    with pytest.raises(ValueError, match="do not match"):
        HeadStats().update(x).update(x[:, :2])
    with pytest.raises(ValueError, match="no data"):
        _ = HeadStats().mean
    with pytest.raises(ValueError, match="different"):
        HeadStats(layers=[0]).update(x).merge(HeadStats(layers=[1]).update(x))


def test_save_load_roundtrip(tmp_path):
    x = random_heads(5, n=15)
    stats = HeadStats(layers=[0, 2]).update(x, mlps=np.ones((15, 5, 10)))
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = HeadStats.load(path)
    assert back.n == 15 and back.layers == (0, 2) and back.n_layers == 4
    np.testing.assert_array_equal(back.sum_outer, stats.sum_outer)
    np.testing.assert_array_equal(back.mlp_sum, stats.mlp_sum)
    assert back.cls_sum is None
    back.update(x, mlps=np.ones((15, 5, 10)))  # keeps accumulating after a load
    assert back.n == 30
    assert "n=30" in repr(back)
