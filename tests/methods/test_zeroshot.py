"""Zero-shot classifiers and accuracy against direct NumPy computations."""

import numpy as np
import pytest

from clipdecomp.methods.zeroshot import DEFAULT_TEMPLATES, accuracy, zero_shot_classifier


class HashTextModel:
    """Stand-in for CLIP.encode_text: a fixed random vector per string, optionally normalised."""

    def __init__(self, dim=16):
        self.dim = dim
        self.calls = []

    def vector(self, text):
        seed = sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % (2**32)
        return np.random.default_rng(seed).normal(size=self.dim) * 3.0

    def encode_text(self, texts, normalize=True):
        self.calls.append(len(texts))
        out = np.stack([self.vector(t) for t in texts]).astype(np.float32)
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def test_classifier_matches_direct_computation():
    model = HashTextModel()
    classes = ["cat", "dog", "red square"]
    templates = ["a photo of a {}.", "a drawing of a {}.", lambda c: f"{c}, up close"]
    w = zero_shot_classifier(model, classes, templates, batch_size=4)
    assert w.shape == (16, 3) and w.dtype == np.float32
    assert model.calls == [4, 4, 1]  # 9 prompts in batches of 4
    for j, c in enumerate(classes):
        prompts = [f"a photo of a {c}.", f"a drawing of a {c}.", f"{c}, up close"]
        e = np.stack([model.vector(p) for p in prompts])
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        mean = e.mean(0)
        np.testing.assert_allclose(w[:, j], mean / np.linalg.norm(mean), atol=1e-6)


def test_default_templates():
    model = HashTextModel(8)
    w = zero_shot_classifier(model, ["car"])
    assert w.shape == (8, 1)
    assert len(DEFAULT_TEMPLATES) >= 20 and all("{}" in t for t in DEFAULT_TEMPLATES)
    assert len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    e = np.stack([model.vector(t.replace("{}", "car")) for t in DEFAULT_TEMPLATES])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(w[:, 0], e.mean(0) / np.linalg.norm(e.mean(0)), atol=1e-6)
    with pytest.raises(ValueError, match="no '{}'"):
        zero_shot_classifier(model, ["car"], ["a photo"])


def test_accuracy_topk_against_loop():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 10))
    w = rng.normal(size=(10, 7))
    labels = rng.integers(0, 7, 200)
    logits = emb @ w
    for k in (1, 3, 7):
        expected = np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(200)])
        assert accuracy(emb, labels, w, topk=k) == pytest.approx(expected)
    assert accuracy(emb, labels, w, topk=(1, 3)) == (
        accuracy(emb, labels, w, topk=1),
        accuracy(emb, labels, w, topk=3),
    )
    assert accuracy(emb, labels, w) == (accuracy(emb, labels, w, topk=1),)
    # ties go to the lower class index, as argmax
    assert accuracy(np.ones((2, 2)), np.array([0, 1]), np.eye(2), topk=1) == 0.5
    with pytest.raises(ValueError):
        accuracy(emb, labels[:5], w)


class IdTextModel:
    """A real model whose strings become fixed token ids (the random checkpoints have no
    vocabulary): the same ids go to transformers for the reference."""

    def __init__(self, model, ck):
        self.model, self.ck = model, ck

    def ids(self, texts):
        t = self.ck.text_config
        out = np.zeros((len(texts), t.max_position_embeddings), np.int32)
        for i, text in enumerate(texts):
            words = [1 + sum(map(ord, w)) % (t.vocab_size - 3) for w in text.split()]
            row = [t.vocab_size - 2] + words[: t.max_position_embeddings - 2] + [t.vocab_size - 1]
            out[i, : len(row)] = row
        return out

    def encode_text(self, texts, normalize=True):
        return self.model.encode_text(self.ids(texts), normalize=normalize)


def test_classifier_on_real_model(b16):
    from checkpoints import random_pixels, text_features

    import clipdecomp

    model = clipdecomp.load(b16.dirs[("open_clip", "F32")], threads=1)
    wrapped = IdTextModel(model, b16)
    classes = ["cat", "dog", "red car", "tree"]
    templates = DEFAULT_TEMPLATES[:6]
    w = zero_shot_classifier(wrapped, classes, templates)
    for j, c in enumerate(classes):
        e = text_features(b16.model, wrapped.ids([t.replace("{}", c) for t in templates]))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        np.testing.assert_allclose(w[:, j], e.mean(0) / np.linalg.norm(e.mean(0)), atol=1e-5)
    emb = model.encode_image(random_pixels(b16, 8), normalize=True)
    labels = np.argmax(emb @ w, axis=1)
    assert accuracy(emb, labels, w, topk=1) == 1.0
