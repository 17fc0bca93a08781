"""The description pool: the shipped file, user pools, the on-disk cache of its embeddings."""
from pathlib import Path

import numpy as np


def test_shipped_pool():
    import importlib.util

    from clipdecomp.data.text_pool import DEFAULT_POOL, load_pool

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_description_pool.py"
    spec = importlib.util.spec_from_file_location("make_description_pool", script)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    generate_descriptions = maker.generate_descriptions
    assert maker.DEFAULT_POOL == DEFAULT_POOL

    pool = load_pool()
    assert len(pool) >= 3000
    assert len(set(pool)) == len(pool)
    assert len({t.lower().rstrip(".") for t in pool}) == len(pool)  # no near-duplicates
    assert all(t and not t.startswith("#") and t == t.strip() for t in pool)
    assert max(len(t.split()) for t in pool) <= 16  # short descriptions
    # the shipped file is what the generator writes
    generated = [t for _, lines in generate_descriptions() for t in lines]
    assert generated == pool
    raw = DEFAULT_POOL.read_text(encoding="utf-8").splitlines()
    assert sum(1 for line in raw if line.strip() and not line.startswith("#")) == len(pool)
    # breadth: a few words from every family the pool must cover
    text = "\n".join(pool).lower()
    for word in ("dog", "red", "texture", "wooden", "japan", "sketch", "watercolor", "sunset",
                 "rain", "aerial", "impressionist", "three", "gloomy", "circle", "brick",
                 "indoor", "desert", "candlelight", "top left"):
        assert word in text, word


def test_load_user_pool(tmp_path):
    from clipdecomp.data.text_pool import load_pool

    p = tmp_path / "pool.txt"
    p.write_text("# my pool\nA red car\n\n  A blue boat  \nA red car\n# end\n", encoding="utf-8")
    assert load_pool(p) == ["A red car", "A blue boat"]


class CountingTextModel:
    def __init__(self, seed=0, dim=8):
        self.seed, self.dim, self.calls = seed, dim, 0
        self.config = f"Cfg(name='stand-in-{seed}')"

    def encode_text(self, texts, normalize=True):
        self.calls += 1
        out = np.stack([np.random.default_rng([self.seed, sum(map(ord, t))]).normal(
            size=self.dim) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def test_encode_pool_cache(tmp_path):
    from clipdecomp.data.text_pool import encode_pool

    texts = [f"description {i}" for i in range(10)]
    model = CountingTextModel()
    first = encode_pool(model, texts, cache_dir=tmp_path, batch_size=4, progress=False)
    assert first.shape == (10, 8) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(first, model.encode_text(texts, normalize=True), atol=1e-6)
    assert len(list(tmp_path.glob("pool-*.npy"))) == 1
    calls = model.calls
    again = encode_pool(model, texts, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again, first)
    assert model.calls == calls + 1  # only the fingerprint probe ran
    other = CountingTextModel(seed=1)  # other weights: another cache entry
    encode_pool(other, texts, cache_dir=tmp_path, progress=False)
    encode_pool(model, texts[:5], cache_dir=tmp_path, progress=False)  # other texts
    assert len(list(tmp_path.glob("pool-*.npy"))) == 3
    encode_pool(model, texts, cache_dir=False, progress=False)
    assert len(list(tmp_path.glob("pool-*.npy"))) == 3


