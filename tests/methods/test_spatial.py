"""Heat maps, per-head maps, attention baselines and bilinear upsampling (clipdecomp.methods.spatial).

References: plain NumPy einsum over dec.tokens (float64), a PyTorch attention rollout, and
torch.nn.functional.interpolate for the upsampling. The decompositions are stand-ins with the
contract's shapes; a last group runs on a real random-weight model when the core is built.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipdecomp.methods import spatial
from clipdecomp.methods.spatial import (
    attention_map,
    attention_rollout,
    head_map,
    head_maps,
    heatmap,
    upsample,
)

B, L, H, G, D, P = 2, 3, 4, 3, 8, 4
N = 1 + G * G


class StandInDec:
    """The Decomposition contract on arrays: tokens [B, L, N, H, D], probe, attention."""

    def __init__(self, seed: int = 0, keep_tokens: bool = True, attn: bool = True):
        rng = np.random.default_rng(seed)
        self._tokens = rng.normal(size=(B, L, N, H, D)).astype(np.float32)
        self.embedding = rng.normal(size=(B, D)).astype(np.float32)
        self.heads = self._tokens.sum(2)
        self.config = SimpleNamespace(layers=L, heads=H, n_tokens=N, grid=G, patch_size=P,
                                      image_size=G * P, embed_dim=D)
        self.keep_tokens = keep_tokens
        self.probe_calls = 0
        if attn:
            logits = rng.normal(size=(B, L, H, N, N)) * 2.0
            a = np.exp(logits - logits.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            self.full_attn = a  # [B, L, H, N, N]
            self._attn_cls = a[:, :, :, 0, :].astype(np.float32)
            self._attn_mean = a.mean(2).astype(np.float32)
        else:
            self._attn_cls = self._attn_mean = None

    @property
    def tokens(self) -> np.ndarray:
        if not self.keep_tokens:
            raise ValueError("tokens were not kept: decompose with spatial=True")
        return self._tokens

    @property
    def attn_cls(self) -> np.ndarray:
        if self._attn_cls is None:
            raise ValueError("no attention: decompose with attn=True")
        return self._attn_cls

    @property
    def attn_mean(self) -> np.ndarray:
        if self._attn_mean is None:
            raise ValueError("no attention: decompose with attn=True")
        return self._attn_mean

    def project_tokens(self, directions: np.ndarray) -> np.ndarray:
        self.probe_calls += 1
        return np.einsum("blnhd,td->blnht", self._tokens, directions).astype(np.float32)


def oracle_heatmap(tokens: np.ndarray, texts: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """[B, T, G, G] from the definition: sum over selected (l, h) of patch tokens . text."""
    t = tokens.astype(np.float64)
    per = np.einsum("blnhd,td->blnht", t[:, :, 1:], texts.astype(np.float64))
    out = np.einsum("blnht,lh->btn", per, sel.astype(np.float64))
    return out.reshape(tokens.shape[0], texts.shape[0], G, G)


def texts_(t: int = 5, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(t, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- heat maps

@pytest.mark.parametrize("keep", [True, False])
def test_heatmap_equals_token_dot_products(keep):
    dec = StandInDec(keep_tokens=keep)
    texts = texts_()
    got = heatmap(dec, texts)
    want = oracle_heatmap(dec._tokens, texts, np.ones((L, H), bool))
    assert got.shape == (B, 5, G, G) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert dec.probe_calls == (0 if keep else 1)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("layers,heads", [
    (-1, None), ([0, 2], None), (None, [1, 3]), ([1], 2), (None, [(0, 1), (2, 3), (-1, 0)]),
])
def test_heatmap_layer_head_selection(keep, layers, heads):
    dec = StandInDec(keep_tokens=keep)
    texts = texts_(3)
    sel = np.zeros((L, H), bool)
    if heads is not None and isinstance(heads, list) and isinstance(heads[0], tuple):
        for li, hi in heads:
            sel[li, hi] = True
    else:
        ls = range(L) if layers is None else np.atleast_1d(layers)
        hs = range(H) if heads is None else np.atleast_1d(heads)
        for li in ls:
            for hi in hs:
                sel[li, hi] = True
    got = heatmap(dec, texts, layers=layers, heads=heads)
    np.testing.assert_allclose(got, oracle_heatmap(dec._tokens, texts, sel), atol=1e-5, rtol=0)


def test_heatmap_adds_up_with_class_token_to_the_similarity():
    """Patch maps + the class-token terms = all token terms . text (the decomposition's sum)."""
    dec = StandInDec()
    texts = texts_(2)
    total = np.einsum("blnhd,td->bt", dec._tokens.astype(np.float64), texts)
    cls = np.einsum("blhd,td->bt", dec._tokens[:, :, 0].astype(np.float64), texts)
    np.testing.assert_allclose(heatmap(dec, texts).sum((2, 3)) + cls, total, atol=1e-4)


def test_heatmap_patch_order_is_row_major():
    dec = StandInDec()
    dec._tokens[:] = 0
    dec._tokens[0, 0, 1 + 1 * G + 2, 0, 0] = 1.0  # patch at row 1, column 2
    m = heatmap(dec, np.eye(D, dtype=np.float32)[:1])
    assert m[0, 0, 1, 2] == 1.0 and m.sum() == 1.0


def test_heatmap_one_text_vector_and_errors():
    dec = StandInDec()
    t = texts_(1)
    np.testing.assert_allclose(heatmap(dec, t[0]), heatmap(dec, t), atol=0)
    with pytest.raises(ValueError, match=r"\[T, 8\]"):
        heatmap(dec, np.ones((2, D + 1)))
    with pytest.raises(IndexError):
        heatmap(dec, t, layers=L)
    with pytest.raises(ValueError, match="pairs"):
        heatmap(dec, t, layers=0, heads=[(0, 1)])


@pytest.mark.parametrize("keep", [True, False])
def test_head_maps_and_head_map(keep):
    dec = StandInDec(keep_tokens=keep)
    u = texts_(1)[0]
    want = np.einsum("blnhd,d->blhn", dec._tokens[:, :, 1:].astype(np.float64), u)
    want = want.reshape(B, L, H, G, G)
    got = head_maps(dec, u)
    assert got.shape == (B, L, H, G, G)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for li, hi in [(0, 0), (2, 3), (-1, -2)]:
        np.testing.assert_allclose(head_map(dec, li, hi, u), want[:, li, hi], atol=1e-5, rtol=0)
    # the per-head maps add up to the heat map
    np.testing.assert_allclose(got.sum((1, 2)), heatmap(dec, u)[:, 0], atol=1e-5)
    with pytest.raises(ValueError):
        head_map(dec, 0, 0, np.ones((2, D)))


# ------------------------------------------------------------------------------- attention

def test_attention_map_is_class_row_mean_over_heads():
    dec = StandInDec()
    for layer in (0, -1):
        want = dec.full_attn[:, layer, :, 0, 1:].mean(1).reshape(B, G, G)
        np.testing.assert_allclose(attention_map(dec, layer), want, atol=1e-6)
    want = dec.full_attn[:, 1, [0, 2], 0, 1:].mean(1).reshape(B, G, G)
    np.testing.assert_allclose(attention_map(dec, 1, heads=[0, 2]), want, atol=1e-6)


def torch_rollout(attn: np.ndarray, residual: bool, start: int = 0) -> np.ndarray:
    """Abnar & Zuidema's rollout from full per-head attention [B, L, H, N, N], in torch."""
    a = torch.from_numpy(attn).double().mean(2)  # heads fused by the mean
    n = a.shape[-1]
    result = torch.eye(n, dtype=torch.float64).expand(a.shape[0], n, n)
    for layer in range(start, a.shape[1]):
        x = a[:, layer]
        if residual:
            x = (x + torch.eye(n, dtype=torch.float64)) / 2
        x = x / x.sum(dim=-1, keepdim=True)
        result = torch.matmul(x, result)
    return result[:, 0, 1:].reshape(a.shape[0], G, G).numpy()


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("start", [0, 1])
def test_attention_rollout_matches_torch(residual, start):
    dec = StandInDec()
    got = attention_rollout(dec, residual=residual, start_layer=start)
    np.testing.assert_allclose(got, torch_rollout(dec.full_attn, residual, start), atol=1e-5)


def test_rollout_of_one_layer_without_residual_is_the_attention():
    dec = StandInDec()
    np.testing.assert_allclose(attention_rollout(dec, residual=False, start_layer=-1),
                               attention_map(dec, -1), atol=1e-6)


def test_attention_needs_attn():
    dec = StandInDec(attn=False)
    with pytest.raises(ValueError, match="attn=True"):
        attention_map(dec)
    with pytest.raises(ValueError, match="attn=True"):
        attention_rollout(dec)


# -------------------------------------------------------------------------------- upsample

@pytest.mark.parametrize("shape,size", [
    ((2, 7, 7), 224), ((3, 5, 5), 13), ((1, 4, 6), (9, 17)), ((1, 8, 8), 3), ((2, 16, 16), 224),
    ((1, 1, 1), 4), ((2, 3, 3), 3),
])
def test_upsample_equals_torch_bilinear(shape, size):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size,
                                           mode="bilinear", align_corners=False)[:, 0].numpy()
    got = upsample(x, size)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g,p", [(14, 16), (16, 14), (7, 32), (8, 8)])
def test_upsample_equals_torch_scale_factor(g, p):
    """The reference upsamples with scale_factor=patch size."""
    x = np.random.default_rng(1).normal(size=(2, g, g)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], scale_factor=p,
                                           mode="bilinear")[:, 0].numpy()
    np.testing.assert_allclose(upsample(x, g * p), want, atol=1e-5, rtol=1e-5)


def test_upsample_shapes_and_errors():
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 4))
    assert upsample(x, 8).shape == (2, 3, 8, 8) and upsample(x, 8).dtype == np.float64
    assert upsample(np.ones((4, 4), np.uint8), 6).dtype == np.float32
    np.testing.assert_allclose(upsample(np.full((1, 3, 3), 2.5), 11), 2.5)
    with pytest.raises(ValueError):
        upsample(np.ones(4), 3)


def test_grid_side_rejects_non_square():
    with pytest.raises(ValueError):
        spatial._grid_side(11)


# --------------------------------------------------------------------- a real random model

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random-weight CLIP (S=32, P=8, L=2, H=4, D=24) through clipdecomp.load and the core."""
    return make_random_model(tmp_path_factory.mktemp("random_model"))


def make_random_model(folder):
    import oracle  # tests/oracle.py: random weights and a safetensors writer

    import clipdecomp
    from clipdecomp.engine.config import ModelConfig

    cfg = oracle.tiny_config(image_size=32, patch_size=8)
    path = folder / "random.safetensors"
    oracle.write_safetensors(path, oracle.random_weights(cfg, seed=0))
    return clipdecomp.load(path, config=ModelConfig(**cfg))


def test_real_model_heatmap_equals_tokens(random_model):
    model = random_model
    rng = np.random.default_rng(0)
    s = model.config.image_size
    images = list(rng.integers(0, 256, size=(2, s, s, 3), dtype=np.uint8))
    dec_t = model.decompose(images, spatial=True)
    dec_p = model.decompose(images)
    texts = rng.normal(size=(3, model.config.embed_dim)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    g = model.config.grid
    want = np.einsum("blnhd,td->btn", np.asarray(dec_t.tokens, np.float64)[:, :, 1:], texts)
    want = want.reshape(2, 3, g, g)
    np.testing.assert_allclose(heatmap(dec_t, texts), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(heatmap(dec_p, texts), want, atol=1e-5, rtol=0)
    u = texts[0]
    np.testing.assert_allclose(head_maps(dec_p, u), head_maps(dec_t, u), atol=1e-5, rtol=0)
