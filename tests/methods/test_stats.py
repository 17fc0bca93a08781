"""HeadStats and the C core's second moments (``_core._moments_update``) against float64 NumPy.

Precision (csrc/moments.h): the core adds the outer products of at most 512 rows (a chunk) in
float32, each chunk centred on its own mean, and everything else in float64. For a chunk of c
rows the error of an entry (i, j) is at most (c + 2) u / (1 - c u) * sum_r |y_ri y_rj| (the
float32 dot-product bound, u = 2^-24, plus the rounding of y = x - mean to float32), with y the
rows about the chunk mean. The chunk mean minimises the squares, so by Cauchy-Schwarz (twice,
within and across chunks) sum |y_ri y_rj| over all rows is at most n sd_i sd_j, sd the standard
deviation about the overall mean. The float64 parts (the correction terms, the sum across
chunks) add a few 2^-53 of n (|m_i m_j| + sd_i sd_j). ``outer_tol`` is that bound; it is what
the tests allow, so a wrong product, a lost or doubled row, or a missing centring (its error
scales with the mean: 1e3 times the bound in ``test_large_mean_keeps_float32_precision``) fails.
"""

import pickle

import numpy as np
import pytest
from oracle import outer_tol

from clipdecomp.methods.stats import BUFFER_ROWS, HeadStats


def random_heads(seed, n=90, n_layers=4, n_heads=3, d=10):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, n_layers, n_heads, d)) * 2 + 1).astype(np.float32)




def assert_outer_close(got, c, rows=512):
    """got [D, D] is the sum of x x^T over the rows of c [n, D] within outer_tol."""
    want = c.T @ c
    err = np.abs(got - want)
    tol = outer_tol(c, rows)
    assert np.all(err <= tol), f"max error {err.max():.3g}, max err/tol {(err / tol).max():.3g}"


# ---------------------------------------------------------------------------------------- core
@pytest.mark.parametrize(
    "n, k, d",
    [(1, 1, 1), (1, 3, 7), (5, 2, 17), (200, 3, 97), (513, 2, 33), (1100, 1, 130), (40, 2, 200)],
)
def test_core_moments_match_float64(requires_core, n, k, d):
    # odd shapes: D below / not a multiple of the vector width and of the 96-row job block,
    # D > 96 (several row blocks and 32-column tiles), one row, n not a multiple of the
    # 512-row chunk; x strided (a view), accumulated onto values already there
    rng = np.random.default_rng(n * 1000 + d)
    big = (rng.normal(size=(n, 2 * k + 1, d + 5)) * rng.uniform(0.1, 3, d + 5) + 0.5)
    big = big.astype(np.float32)
    x = big[:, 1::2, 3 : 3 + d]  # [n, K, D], strides of a view
    start = rng.normal(size=(k, d, d))
    start = start + start.transpose(0, 2, 1)  # symmetric, as an accumulator is
    outer, sums = start.copy(), np.ones((k, d))
    requires_core._moments_update(outer, sums, x)
    x64 = x.astype(np.float64)
    for h in range(k):
        assert_outer_close(outer[h] - start[h], x64[:, h])
    np.testing.assert_allclose(sums, 1 + x64.sum(0), rtol=1e-13)
    # exactly symmetric: each value is computed once for both triangles
    np.testing.assert_array_equal(outer, outer.transpose(0, 2, 1))
    # sums=None: the same second moments, bit for bit
    outer2 = start.copy()
    requires_core._moments_update(outer2, None, x)
    np.testing.assert_array_equal(outer2, outer)
    # a contiguous copy of the same rows: the same numbers
    outer3 = start.copy()
    requires_core._moments_update(outer3, None, np.ascontiguousarray(x))
    np.testing.assert_array_equal(outer3, outer)


def test_core_typical_precision(requires_core):
    # the measured error, for the record: about 1e-7 of the largest entry (float32 within a
    # chunk of 512 rows), far below the worst-case bound
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 1, 64)).astype(np.float32)
    outer = np.zeros((1, 64, 64))
    requires_core._moments_update(outer, None, x)
    want = x[:, 0].astype(np.float64).T @ x[:, 0].astype(np.float64)
    rel = np.abs(outer[0] - want).max() / np.abs(want).max()
    assert 0 < rel < 2e-6


def test_large_mean_keeps_float32_precision(requires_core):
    # rows far from the origin (mean 1000 sd): centring each chunk on its mean keeps the
    # covariance to float32 relative precision; uncentred float32 products would lose it all
    rng = np.random.default_rng(6)
    n, d = 700, 24
    x = (rng.normal(size=(n, 1, d)) + 1000.0).astype(np.float32)
    outer, sums = np.zeros((1, d, d)), np.zeros((1, d))
    requires_core._moments_update(outer, sums, x)
    c = x[:, 0].astype(np.float64)
    assert_outer_close(outer[0], c)
    cov = (outer[0] - np.outer(sums[0], sums[0]) / n) / (n - 1)
    want = np.cov(c.T)
    assert np.abs(cov - want).max() < 1e-4 * np.abs(want).max()
    # what the uncentred float32 product would give, for contrast: far off
    c32 = x[:, 0]
    naive = (c32.T @ c32).astype(np.float64)
    naive_cov = (naive - np.outer(sums[0], sums[0]) / n) / (n - 1)
    assert np.abs(naive_cov - want).max() > 1e3 * np.abs(cov - want).max()


def test_core_empty_and_zero_sizes(requires_core):
    outer, sums = np.ones((2, 3, 3)), np.ones((2, 3))
    requires_core._moments_update(outer, sums, np.zeros((0, 2, 3), np.float32))
    assert (outer == 1).all() and (sums == 1).all()
    requires_core._moments_update(np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros((4, 0, 3), np.float32))
    requires_core._moments_update(np.zeros((2, 0, 0)), None, np.zeros((4, 2, 0), np.float32))


def test_core_bad_inputs_raise(requires_core):
    k, d, n = 2, 5, 4
    x = np.ones((n, k, d), np.float32)

    def acc():
        return np.zeros((k, d, d)), np.zeros((k, d))

    outer, sums = acc()
    cases = [
        (TypeError, "outer must be a numpy.ndarray", ([[1.0]], sums, x)),
        (TypeError, "outer must be float64", (outer.astype(np.float32), sums, x)),
        (TypeError, "byte order", (outer.astype(">f8"), sums, x)),
        (ValueError, r"outer must have shape \[K, D, D\]", (np.zeros((k, d)), sums, x)),
        (ValueError, "square", (np.zeros((k, d, d + 1)), sums, x)),
        (ValueError, "C-contiguous", (np.zeros((k, d, 2 * d))[:, :, ::2], sums, x)),
        (ValueError, "read-only", (np.lib.stride_tricks.as_strided(outer, writeable=False),
                                   sums, x)),
        (TypeError, "sums must be float64", (outer, sums.astype(np.float32), x)),
        (ValueError, r"sums must have shape \[K, D\] = \[2, 5\]", (outer, np.zeros((k, d + 1)), x)),
        (ValueError, "sums must have shape", (outer, np.zeros(k * d), x)),
        (TypeError, "x must be float32", (outer, sums, x.astype(np.float64))),
        (TypeError, "x must be a numpy.ndarray", (outer, sums, x.tolist())),
        (ValueError, r"x must have shape \[n, K, D\]", (outer, sums, x[0])),
        (ValueError, r"K = 2, D = 5", (outer, sums, np.ones((n, k + 1, d), np.float32))),
        (ValueError, "contiguous rows", (outer, sums, np.ones((n, k, 2 * d), np.float32)[..., ::2])),
        (ValueError, "non-negative strides", (outer, sums, x[::-1])),
    ]
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            requires_core._moments_update(*args)
    # memory shared between the arguments
    block = np.zeros(k * d * d + k * d)
    with pytest.raises(ValueError, match="share memory"):
        requires_core._moments_update(block[: k * d * d].reshape(k, d, d), block[: k * d].reshape(k, d), x)
    raw = np.zeros(k * d * d)
    with pytest.raises(ValueError, match="share memory"):  # x inside outer
        requires_core._moments_update(raw.reshape(k, d, d), None,
                             raw.view(np.float32)[: n * k * d].reshape(n, k, d))
    with pytest.raises(TypeError):
        requires_core._moments_update(outer, sums)
    # nothing was written by the refused calls
    assert not outer.any() and not sums.any()


# ----------------------------------------------------------------------------------- HeadStats
def test_moments_match_numpy():
    x = random_heads(0)
    stats = HeadStats(buffer_rows=32)  # several buffers and a partial one
    for b0 in range(0, len(x), 32):
        stats.update(x[b0 : b0 + 32])
    x64 = x.astype(np.float64)
    assert stats.n == len(x) and stats.layers == (0, 1, 2, 3)
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sum, x64.sum(0), rtol=1e-12)
    n = len(x)
    for layer in range(4):
        for h in range(3):
            c = x64[:, layer, h]
            tol = outer_tol(c, rows=32)
            assert_outer_close(stats.sum_outer[layer, h], c, rows=32)
            assert np.all(np.abs(stats.covariance[layer, h] - np.cov(c.T)) <= tol / (n - 1) + 1e-13)
            assert np.all(np.abs(stats.covariance_of(0)[layer, h] - np.cov(c.T, ddof=0))
                          <= tol / n + 1e-13)
            assert np.all(np.abs(stats.second_moment[layer, h] - c.T @ c / n) <= tol / n)
            mean, second, count = stats.head(layer, h)
            np.testing.assert_allclose(mean, c.mean(0), rtol=1e-12)
            assert np.all(np.abs(second - c.T @ c / n) <= tol / n)
            assert count == n


def test_update_sizes_do_not_change_the_result():
    # the buffer is filled to the same rows whatever the update sizes: bit for bit the same
    x = random_heads(7, n=100, d=19)
    one = HeadStats(buffer_rows=16).update(x)  # 6 whole buffers straight from the input
    singles = HeadStats(buffer_rows=16)
    for i in range(100):
        singles.update(x[i : i + 1])
    mixed = HeadStats(buffer_rows=16)
    i = 0
    for b in (1, 7, 33, 2, 16, 41):
        mixed.update(x[i : i + b].astype(np.float64))  # another dtype: through the buffer
        i += b
    assert i == 100
    for other in (singles, mixed):
        assert other.n == one.n == 100
        np.testing.assert_array_equal(other.sum_outer, one.sum_outer)
        np.testing.assert_array_equal(other.sum, one.sum)
        np.testing.assert_array_equal(other.head_sum, one.head_sum)
    for layer in range(4):
        for h in range(3):
            assert_outer_close(one.sum_outer[layer, h], x[:, layer, h].astype(np.float64), 16)
    # non-consecutive layers (always through the buffer) give the same numbers as the
    # consecutive ones straight from the input
    sel = HeadStats(layers=[0, 2], buffer_rows=16).update(x)
    span = HeadStats(layers=[2, 3], buffer_rows=16).update(x)
    np.testing.assert_array_equal(sel.sum_outer[1], span.sum_outer[0])


def test_reads_between_updates_flush():
    x = random_heads(8, n=60)
    stats = HeadStats(buffer_rows=512)
    stats.update(x[:25])
    first = stats.sum_outer.copy()  # a read adds the 25 staged rows
    x64 = x.astype(np.float64)
    assert_outer_close(first[1, 2], x64[:25, 1, 2])
    stats.update(x[25:])
    assert stats.head(1, 2)[2] == 60
    assert_outer_close(stats.sum_outer[1, 2], x64[:, 1, 2])
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12)


def test_merge_of_halves_equals_whole():
    x = random_heads(1)
    rng = np.random.default_rng(2)
    mlps = rng.normal(size=(len(x), 5, 10))
    cls = rng.normal(size=(len(x), 4, 10))
    whole = HeadStats(layers=[-2, -1]).update(x, mlps, cls)
    a = HeadStats(layers=[-2, -1]).update(x[:37], mlps[:37], cls[:37])
    b = HeadStats(layers=[-2, -1]).update(x[37:], mlps[37:], cls[37:])
    merged = a.merge(b)  # both still hold staged rows: merge adds them first
    assert merged.n == whole.n and merged.layers == (2, 3)
    x64 = x.astype(np.float64)
    for j, layer in enumerate((2, 3)):
        for h in range(3):
            assert_outer_close(merged.sum_outer[j, h], x64[:, layer, h])
            assert_outer_close(whole.sum_outer[j, h], x64[:, layer, h])
    for name in ("sum", "head_sum", "mlp_sum", "cls_sum"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), atol=1e-10)
    np.testing.assert_allclose(merged.head_sum, x64.sum(0), rtol=1e-12)
    np.testing.assert_allclose(merged.mlp_sum, mlps.sum(0), rtol=1e-12)
    # b is unchanged by the merge (its staged rows were added to its own sums)
    assert b.n == len(x) - 37
    assert_outer_close(b.sum_outer[0, 1], x64[37:, 2, 1])
    # merging into an empty accumulator copies the numbers
    empty = HeadStats().merge(whole)
    np.testing.assert_array_equal(empty.sum_outer, whole.sum_outer)
    empty.update(x[:3], mlps[:3], cls[:3])  # and keeps accumulating
    assert empty.n == len(x) + 3


def test_selected_layers_only():
    x = random_heads(3)
    stats = HeadStats(layers=[-1, 1]).update(x)
    assert stats.layers == (1, 3)
    assert stats.sum_outer.shape == (2, 3, 10, 10)
    c = x[:, 3, 2].astype(np.float64)
    assert_outer_close(stats.sum_outer[1, 2], c)
    assert np.all(np.abs(stats.head(-1, 2)[1] - c.T @ c / len(c)) <= outer_tol(c) / len(c))
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
    # a refused update adds nothing
    before = (stats.n, stats.sum_outer.copy(), stats.head_sum.copy())
    with pytest.raises(ValueError, match="cls_to_cls must be"):
        stats.update(x, dec.mlps, dec.cls_to_cls[:3])
    assert stats.n == before[0]
    np.testing.assert_array_equal(stats.sum_outer, before[1])
    np.testing.assert_array_equal(stats.head_sum, before[2])
    with pytest.raises(ValueError, match="buffer_rows"):
        HeadStats(buffer_rows=0)


def test_save_load_roundtrip(tmp_path):
    x = random_heads(5, n=15)
    stats = HeadStats(layers=[0, 2]).update(x, mlps=np.ones((15, 5, 10)))
    path = tmp_path / "stats.npz"
    stats.save(path)  # the 15 staged rows are added first
    with np.load(path) as f:  # the file format: the same arrays as always
        assert sorted(f.files) == ["chunk", "head_sum", "layers", "mlp_sum", "n", "n_layers",
                                   "sum", "sum_outer"]
        assert_outer_close(f["sum_outer"][1, 1], x[:, 2, 1].astype(np.float64))
    back = HeadStats.load(path)
    assert back.n == 15 and back.layers == (0, 2) and back.n_layers == 4
    np.testing.assert_array_equal(back.sum_outer, stats.sum_outer)
    np.testing.assert_array_equal(back.mlp_sum, stats.mlp_sum)
    assert back.cls_sum is None
    back.update(x, mlps=np.ones((15, 5, 10)))  # keeps accumulating after a load
    assert back.n == 30
    assert "n=30" in repr(back)
    np.testing.assert_allclose(back.sum_outer, 2 * stats.sum_outer, rtol=1e-6, atol=1e-4)


def test_pickle_adds_staged_rows_and_drops_the_buffer():
    x = random_heads(9, n=40, d=16)
    stats = HeadStats().update(x)  # 40 rows staged in a 512-row buffer
    blob = pickle.dumps(stats)
    assert len(blob) < BUFFER_ROWS * 12 * 16 * 4  # not the buffer
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.sum_outer, stats.sum_outer)
    np.testing.assert_array_equal(back.sum, stats.sum)
    back.update(x)
    assert back.n == 80
    assert_outer_close(back.sum_outer[3, 1], np.concatenate([x, x])[:, 3, 1].astype(np.float64))
    # the state of earlier versions (public sum / sum_outer, no buffer) still loads
    old = {k: v for k, v in stats.__getstate__().items()
           if k not in ("_buf", "_pending", "buffer_rows", "_sum", "_sum_outer")}
    old.update(sum=stats.sum.copy(), sum_outer=stats.sum_outer.copy())
    again = HeadStats.__new__(HeadStats)
    again.__setstate__(old)
    np.testing.assert_array_equal(again.sum_outer, stats.sum_outer)
    again.update(x)
    np.testing.assert_array_equal(again.sum_outer, back.sum_outer)


def test_accumulators_set_from_outside():
    # as StoreStats does: arrays assigned to sum / sum_outer (here read-only) keep working
    x = random_heads(10, n=12, n_layers=1, n_heads=2, d=6)
    ref = HeadStats().update(x)
    stats = HeadStats()
    stats.update(x[:0])  # nothing yet
    stats.n, stats.n_layers, stats.layers = ref.n, ref.n_layers, ref.layers
    stats.head_sum = ref.head_sum.copy()
    frozen = ref.sum_outer.copy()
    frozen.setflags(write=False)
    stats.sum_outer, stats.sum = frozen, ref.sum.copy()
    stats.update(x)
    assert stats.n == 24
    assert_outer_close(stats.sum_outer[0, 1], np.concatenate([x, x])[:, 0, 1].astype(np.float64))
    np.testing.assert_array_equal(frozen, ref.sum_outer)  # the assigned array was not written
