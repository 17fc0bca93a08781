"""clipdecomp against transformers' CLIPModel on the same random weights.

Tolerances (largest absolute difference over largest absolute reference value):

* F32 files, both layouts: image and text features within 1e-4 of ``get_image_features`` /
  ``get_text_features``.
* F16 / BF16 files: within 1e-4 of transformers running the same rounded weights (a half file
  is only a different set of float32 weights once read), and within 2e-2 (F16) / 1e-1 (BF16) of
  the unrounded model: the rounding of the weights itself, a property of the file.
* Decomposition: every head, MLP, class-to-class and (token, head) term within 1e-4 of a direct
  float64 torch computation from transformers' attention probabilities and hidden states; the
  terms sum to ``embedding / ||embedding||`` within 1e-5.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from checkpoints import image_features, random_pixels, random_text_ids, text_features

import clipdecomp

pytestmark = pytest.mark.usefixtures("requires_core")

NAMES = ["b32_quick", "b16_gelu"]
LAYOUTS = ["hf", "open_clip"]
HALF_BOUND = {"F16": 2e-2, "BF16": 1e-1}


def rel(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


_LOADED: dict = {}


def loaded(ck, layout: str, dtype: str = "F32", **kw) -> clipdecomp.CLIP:
    key = (ck.name, layout, dtype, tuple(sorted(kw.items())))
    if key not in _LOADED:
        _LOADED[key] = clipdecomp.load(ck.dirs[(layout, dtype)], threads=1, **kw)
    return _LOADED[key]


@pytest.fixture(params=NAMES)
def ck(request, checkpoints):
    return checkpoints[request.param]


# ---------------------------------------------------------------------------------------------
# features


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_read_from_files(ck, layout):
    model = loaded(ck, layout)
    v, t = ck.vision_config, ck.text_config
    c = model.config
    assert model.layout == layout
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.mlp_dim) == (
        v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers,
        v.num_attention_heads, v.intermediate_size)
    assert c.embed_dim == ck.model.config.projection_dim
    assert (c.context_length, c.vocab_size, c.text_width, c.text_layers, c.text_heads,
            c.text_mlp_dim) == (t.max_position_embeddings, t.vocab_size, t.hidden_size,
                                t.num_hidden_layers, t.num_attention_heads, t.intermediate_size)
    assert c.act == c.text_act == ck.act
    assert model.logit_scale == pytest.approx(float(ck.model.logit_scale.detach().exp()), rel=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_features_f32(ck, layout):
    model = loaded(ck, layout)
    px = random_pixels(ck, 5, seed=1)
    ref = image_features(ck.model, px)
    ours = model.encode_image(px, normalize=False)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert rel(ours, ref) < 1e-4
    unit = model.encode_image(px, normalize=True)
    assert rel(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True)) < 1e-4
    # open_clip's default: the raw projected embedding, not normalised
    assert rel(model.encode_image(px), ref) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_features_f32(ck, layout):
    model = loaded(ck, layout)
    ids = random_text_ids(ck, 6, seed=2)
    ref = text_features(ck.model, ids)
    ours = model.encode_text(ids, normalize=False)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert rel(ours, ref) < 1e-4
    assert rel(model.encode_text(ids, normalize=True),
               ref / np.linalg.norm(ref, axis=1, keepdims=True)) < 1e-4
    assert rel(model.encode_text(ids), ref) < 1e-4   # open_clip's default: not normalised


def test_short_texts_run_to_their_longest_only(ck):
    """A batch of short texts (the causal tower runs only up to the longest end-of-text token)
    gives transformers' features over the full context, and each text the same alone."""
    model = loaded(ck, "open_clip")
    ids = random_text_ids(ck, 7, seed=4)
    v = ck.text_config.vocab_size
    rng = np.random.default_rng(4)
    ids[:] = 0
    for i, k in enumerate([0, 1, 3, 5, 8, 2, 6]):
        row = [v - 2] + list(rng.integers(1, v - 2, size=k)) + [v - 1]
        ids[i, :len(row)] = row
    ref = text_features(ck.model, ids)
    ours = model.encode_text(ids)
    assert rel(ours, ref) < 1e-4
    alone = np.concatenate([model.encode_text(ids[i:i + 1]) for i in range(len(ids))])
    np.testing.assert_allclose(alone, ours, rtol=0, atol=1e-5 * np.abs(ours).max())


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_precision_files(ck, layout, dtype):
    model = loaded(ck, layout, dtype)
    px = random_pixels(ck, 3, seed=3)
    ids = random_text_ids(ck, 4, seed=3)
    img, txt = model.encode_image(px, normalize=False), model.encode_text(ids, normalize=False)
    rounded = ck.rounded_model(dtype)
    assert rel(img, image_features(rounded, px)) < 1e-4
    assert rel(txt, text_features(rounded, ids)) < 1e-4
    # the weights' rounding itself moves the model, within the stated bound, and visibly so
    d_img = rel(img, image_features(ck.model, px))
    assert 1e-6 < d_img < HALF_BOUND[dtype]
    assert rel(txt, text_features(ck.model, ids)) < HALF_BOUND[dtype]


def test_wrong_activation_is_visible(ck):
    """The tolerance above can fail: the other activation moves the features ten times past it."""
    other = "gelu" if ck.act == "quick_gelu" else "quick_gelu"
    model = loaded(ck, "hf", act=other)
    assert model.config.act == other and model.act_source == "act= argument"
    px = random_pixels(ck, 2, seed=4)
    assert rel(model.encode_image(px, normalize=False), image_features(ck.model, px)) > 1e-3


# ---------------------------------------------------------------------------------------------
# the decomposition, from transformers' attention probabilities and hidden states


@torch.no_grad()
def torch_decomposition(ck, pixels: np.ndarray) -> dict:
    """The reference convention of decomposition.md, computed in float64 from transformers.

    For layer l: value vectors ``v = v_proj(layer_norm1(h_l))`` per head, the class token's
    attention ``a[l, h, 0, i]`` from ``output_attentions``, and the out-projection columns of
    head h; the MLP term is ``mlp(layer_norm2(h_l[0] + attn_out[0]))``. ``post_layernorm`` is
    linearised with the image's mean and std, spreading mu and beta over K = 2L + 1 layer terms
    (and over H heads, N * H (token, head) pairs).
    """
    m = copy.deepcopy(ck.model).double().eval()
    vm = m.vision_model
    x = torch.from_numpy(pixels).double()
    out = vm(pixel_values=x, output_attentions=True, output_hidden_states=True)
    hs, att = out.hidden_states, out.attentions
    B, N, W = hs[0].shape
    L = len(vm.encoder.layers)
    H = ck.vision_config.num_attention_heads
    d = W // H
    contribs, attn_bias, mlp_terms = [], [], []
    for layer_i, layer in enumerate(vm.encoder.layers):
        h = hs[layer_i]
        v = layer.self_attn.v_proj(layer.layer_norm1(h)).view(B, N, H, d)
        a = att[layer_i][:, :, 0, :]                                   # [B, H, N]
        w_o = layer.self_attn.out_proj.weight.view(W, H, d)             # [W_out, H, d]
        c = torch.einsum("bhi,bihc,whc->bihw", a, v, w_o)               # [B, N, H, W]
        b_o = layer.self_attn.out_proj.bias
        attn_cls = c.sum((1, 2)) + b_o
        mlp = layer.mlp(layer.layer_norm2(h[:, 0] + attn_cls))
        # the reference pieces rebuild transformers' own residual stream
        assert torch.allclose(h[:, 0] + attn_cls + mlp, hs[layer_i + 1][:, 0], atol=1e-9)
        contribs.append(c)
        attn_bias.append(b_o)
        mlp_terms.append(mlp)
    y = hs[L][:, 0]
    ln = vm.post_layernorm
    mu = y.mean(-1)
    sigma = torch.sqrt(y.var(-1, unbiased=False) + ln.eps)
    proj = m.visual_projection.weight.T                                 # [W, D]
    rep = ((y - mu[:, None]) / sigma[:, None] * ln.weight + ln.bias) @ proj
    norm = rep.norm(dim=-1)
    K = 2 * L + 1

    def term(t, k):   # t [B, ..., W] -> [B, ..., D]
        shape = (B,) + (1,) * (t.ndim - 1)
        return (ln.weight * (t - mu.view(shape) / k) / sigma.view(shape) + ln.bias / k) \
            @ proj / norm.view(shape)

    heads = torch.stack([term(c.sum(1) + b / H, K * H) for c, b in zip(contribs, attn_bias)], 1)
    tokens = torch.stack([term(c + b / (N * H), K * N * H) for c, b in zip(contribs, attn_bias)],
                         1)
    mlps = torch.stack([term(hs[0][:, 0], K)] + [term(t, K) for t in mlp_terms], 1)
    return {
        "embedding": rep.numpy(), "norm": norm.numpy(), "mu": mu.numpy(), "sigma": sigma.numpy(),
        "heads": heads.numpy(), "tokens": tokens.numpy(), "mlps": mlps.numpy(),
        "cls_to_cls": tokens[:, :, 0].sum(2).numpy(),
        "attn_cls": torch.stack([a[:, :, 0, :] for a in att], 1).numpy(),
        "attn_mean": torch.stack([a.mean(1) for a in att], 1).numpy(),
    }


_REF: dict = {}


def reference(ck, seed: int = 5, n: int = 3):
    key = (ck.name, seed, n)
    if key not in _REF:
        px = random_pixels(ck, n, seed=seed)
        _REF[key] = (px, torch_decomposition(ck, px))
    return _REF[key]


def test_reference_is_transformers(ck):
    """The torch reference itself reproduces get_image_features (it checks its residual
    stream layer by layer too)."""
    px, ref = reference(ck)
    assert rel(ref["embedding"], image_features(ck.model, px)) < 1e-5
    summed = ref["heads"].sum((1, 2)) + ref["mlps"].sum(1)
    assert np.abs(summed - ref["embedding"] / ref["norm"][:, None]).max() < 1e-12


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decomposition_terms(ck, layout):
    px, ref = reference(ck)
    dec = loaded(ck, layout).decompose(px, spatial=True, attn=True, batch_size=2)
    c = ck.vision_config
    B, L, H = px.shape[0], c.num_hidden_layers, c.num_attention_heads
    N, D = (c.image_size // c.patch_size) ** 2 + 1, ck.model.config.projection_dim
    assert dec.heads.shape == (B, L, H, D)
    assert dec.mlps.shape == (B, L + 1, D)
    assert dec.cls_to_cls.shape == (B, L, D)
    assert dec.tokens.shape == (B, L, N, H, D)
    assert dec.attn_cls.shape == (B, L, H, N) and dec.attn_mean.shape == (B, L, N, N)
    for k in ("embedding", "heads", "mlps", "cls_to_cls", "tokens", "attn_cls", "attn_mean"):
        assert rel(getattr(dec, k), ref[k]) < 1e-4, k
    assert rel(dec.norm, ref["norm"]) < 1e-5
    assert rel(dec.ln_mean, ref["mu"]) < 1e-4
    assert rel(dec.ln_std, ref["sigma"]) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_and_sums(ck, layout):
    px, _ = reference(ck)
    model = loaded(ck, layout)
    dec = model.decompose(px, spatial=True)
    unit = dec.embedding / dec.norm[:, None]
    assert np.abs(dec.heads.sum((1, 2)) + dec.mlps.sum(1) - unit).max() < 1e-5
    assert np.abs(dec.summed() - unit).max() < 1e-5
    assert np.abs(dec.tokens.sum(2) - dec.heads).max() < 1e-5
    assert np.abs(dec.tokens[:, :, 0].sum(2) - dec.cls_to_cls).max() < 1e-5
    assert rel(dec.embedding, model.encode_image(px, normalize=False)) < 1e-6


def test_batching_and_subsets(b16):
    model = loaded(b16, "open_clip")
    px = random_pixels(b16, 5, seed=6)
    one = model.decompose(px, batch_size=1, progress=True)
    all_ = model.decompose(list(px), batch_size=4)
    gen = model.decompose((p for p in px), batch_size=2)
    assert np.abs(gen.heads - all_.heads).max() < 1e-6
    assert np.abs(model.encode_image(iter(px), normalize=True)
                  - model.encode_image(px, normalize=True)).max() < 1e-6
    for k in ("embedding", "heads", "mlps", "cls_to_cls"):
        assert np.abs(getattr(one, k) - getattr(all_, k)).max() < 1e-6, k
    sub = all_[1:3]
    assert len(sub) == 2 and np.array_equal(sub.heads, all_.heads[1:3])
    assert np.array_equal(all_[-1].embedding, all_.embedding[-1:])
    with pytest.raises(ValueError, match="spatial=True"):
        _ = all_.tokens
    with pytest.raises(ValueError, match="attn=True"):
        _ = all_.attn_cls
    assert "tokens" in repr(all_) and "heads" in repr(all_)


def test_project_tokens_both_routes(b32):
    model = loaded(b32, "hf")
    px = random_pixels(b32, 3, seed=7)
    rng = np.random.default_rng(7)
    dirs = rng.standard_normal((4, b32.model.config.projection_dim)).astype(np.float32)
    spatial = model.decompose(px, spatial=True)
    want = np.einsum("blnhd,td->blnht", spatial.tokens.astype(np.float64), dirs)
    assert rel(spatial.project_tokens(dirs), want) < 1e-5
    rerun = model.decompose(px)                 # tokens not kept: the core re-runs on pixels
    got = rerun.project_tokens(dirs, batch_size=2)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-4
    assert rel(rerun.project_tokens(dirs[0]), want[..., :1]) < 1e-4
    with pytest.raises(ValueError, match="directions"):
        rerun.project_tokens(dirs[:, :5])
