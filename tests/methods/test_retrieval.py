"""HeadIndex: exact cosine top-k against brute force, in memory and on disk (float16)."""

import numpy as np
import pytest

from clipdecomp.methods import retrieval
from clipdecomp.methods.retrieval import HeadIndex, HeadIndexWriter
from clipdecomp.viz.plots import plot_retrieval_grid


def brute_force(vectors, queries, k):
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    s = q @ v.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.fixture
def heads():
    return np.random.default_rng(0).normal(size=(300, 3, 4, 12)).astype(np.float32)


def test_single_head_matches_brute_force(heads, monkeypatch):
    monkeypatch.setattr(retrieval, "_BLOCK", 64)  # several blocks: exercise the running merge
    index = HeadIndex.build(heads, heads=(2, 1))
    assert len(index) == 300 and index.dim == 12
    queries = np.random.default_rng(1).normal(size=(5, 12))
    idx, scores = index.query(queries, k=8)
    ref_i, ref_s = brute_force(heads[:, 2, 1].astype(np.float64), queries, 8)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    # one vector -> 1-D results
    i1, s1 = index.query(queries[0], k=8)
    np.testing.assert_allclose(s1, ref_s[0], atol=1e-5)
    np.testing.assert_array_equal(i1, ref_i[0])
    # an indexed image: itself first, then its neighbours
    i2, s2 = index.query(17, k=4)
    ref_i2, _ = brute_force(heads[:, 2, 1].astype(np.float64), heads[17:18, 2, 1], 4)
    np.testing.assert_array_equal(i2, ref_i2[0])
    assert i2[0] == 17 and s2[0] == pytest.approx(1.0, abs=1e-6)
    i3, _ = index.query(17, k=3, exclude=[17])
    np.testing.assert_array_equal(i3, ref_i2[0, 1:])


def test_set_of_heads_and_new_images(heads):
    index = HeadIndex.build(heads, heads=[(0, 1), (2, 3)])
    summed = heads[:, 0, 1].astype(np.float64) + heads[:, 2, 3]
    new = np.random.default_rng(2).normal(size=(3, 3, 4, 12))
    idx, scores = index.query(new, k=5)  # head terms of new images
    ref_i, ref_s = brute_force(summed, new[:, 0, 1] + new[:, 2, 3], 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)

    class Dec:
        pass

    dec = Dec()
    dec.heads = new
    np.testing.assert_array_equal(index.query(dec, k=5)[0], ref_i)
    with pytest.raises(TypeError, match="model="):
        index.query(["an image"], k=2)


def test_images_through_model(heads):
    class Model:
        def decompose(self, images):
            dec = type("D", (), {})()
            dec.heads = heads[np.asarray(images)]
            return dec

    index = HeadIndex.build(heads, heads=(1, 0), model=Model())
    idx, _ = index.query([4, 9], k=1)  # a list: "images" for the model
    np.testing.assert_array_equal(idx[:, 0], [4, 9])


def test_float16_disk_index(heads, tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "_BLOCK", 50)
    chunks = (heads[i : i + 70] for i in range(0, 300, 70))  # a generator: built chunk by chunk
    index = HeadIndex.build(chunks, heads=(1, 2), path=tmp_path / "idx")
    assert isinstance(index.vectors, np.memmap) and index.vectors.dtype == np.float16
    assert len(index) == 300 and index.path == tmp_path / "idx"
    queries = np.random.default_rng(3).normal(size=(4, 12))
    idx, scores = index.query(queries, k=10)
    ref_i, ref_s = brute_force(heads[:, 1, 2].astype(np.float64), queries, 10)
    np.testing.assert_allclose(scores, ref_s, atol=2e-3)  # float16 storage
    # what it returns is the exact top-k of the stored float16 vectors
    f16 = np.asarray(index.vectors, np.float64)
    ref16_i, _ = brute_force(f16, queries, 10)
    np.testing.assert_array_equal(idx, ref16_i)
    assert np.mean(idx == ref_i) > 0.8
    # save an in-memory index, reopen it: the same answers
    mem = HeadIndex.build(heads, heads=(1, 2))
    mem.save(tmp_path / "saved")
    back = HeadIndex.open(tmp_path / "saved")
    np.testing.assert_array_equal(back.query(queries, k=10)[0], idx)
    assert "on disk" in repr(back)


def test_ties_resolve_by_index(monkeypatch):
    monkeypatch.setattr(retrieval, "_BLOCK", 3)
    vectors = np.zeros((10, 1, 1, 2))
    vectors[:, 0, 0, 0] = 1.0
    vectors[[2, 5, 7], 0, 0] = [1.0, 1.0]  # three identical rows at 45 degrees
    index = HeadIndex.build(vectors, heads=(0, 0))
    idx, scores = index.query(np.array([1.0, 1.0]), k=4)
    assert idx[:3].tolist() == [2, 5, 7] and idx[3] == 0
    np.testing.assert_allclose(scores, [1, 1, 1, np.sqrt(0.5)], atol=1e-6)


def test_writer_and_grid(tmp_path, heads):
    with HeadIndexWriter(tmp_path / "w", heads=(0, 0)) as writer:
        writer.add(heads[:10])
        with pytest.raises(ValueError):
            writer.add(np.zeros((2, 3, 4, 5)))
    assert len(HeadIndex.open(tmp_path / "w")) == 10
    images = (np.random.default_rng(0).random((10, 8, 8, 3)) * 255).astype(np.uint8)
    fig = plot_retrieval_grid(images, np.array([[1, 2], [3, 4]]), np.ones((2, 2)),
                         query_images=images[:2], titles=["a", "b"])
    assert len(fig.axes) == 6
    chw = np.random.default_rng(0).normal(size=(10, 3, 8, 8))  # preprocessed pixels
    assert len(plot_retrieval_grid(chw, np.array([0, 1, 2])).axes) == 3


def test_index_on_real_model(b16):
    from checkpoints import random_pixels

    import clipdecomp

    model = clipdecomp.load(b16.dirs[("open_clip", "F32")], threads=1)
    pixels = random_pixels(b16, 30, seed=4)
    dec = model.decompose(pixels)
    index = HeadIndex.build(dec, heads=[(2, 0), (2, 4)], model=model)
    idx, scores = index.query(pixels[[3, 7]], k=5)  # pixels: decomposed by the model
    assert idx[:, 0].tolist() == [3, 7]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    ref_i, ref_s = brute_force(dec.heads[:, 2, 0] + dec.heads[:, 2, 4],
                               dec.heads[[3, 7], 2, 0] + dec.heads[[3, 7], 2, 4], 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_k_limits(heads):
    index = HeadIndex.build(heads[:5], heads=(0, 0))
    idx, scores = index.query(0, k=10)
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]
    idx, scores = index.query(0, k=10, exclude=range(5))
    assert idx.shape == (0,) and scores.shape == (0,)
