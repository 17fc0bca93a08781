"""SigLIP / SigLIP 2 against transformers' SiglipModel and Siglip2Model on random weights.

Tolerances (largest absolute difference over largest absolute reference value, float32 core
against float32 torch): image and text features within 1e-4. The pooling head's terms (per
head, per (token, head), the MLP term) within 1e-4 of a direct float64 torch computation from
transformers' own pooling-head tensors; the deep terms within 1e-4 of a float64 transcription
of the derivation (docs/decomposition.md) over transformers' per-layer activations, and they sum
to the attention part within 1e-5.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clipdecomp.engine.core import extension
from clipdecomp.engine.siglip import (
    SigLIP,
    SiglipConfig,
    SiglipDecomposition,
    SiglipTokenizer,
    canonicalize,
    load_siglip,
    siglip_config_from_hf,
    siglip_config_from_open_clip,
)
from clipdecomp.methods.ablation import ablate, component_means
from clipdecomp.methods.segmentation import segment_decomposition
from clipdecomp.methods.siglip import (
    accuracy_by_part,
    head_orthogonality,
    pool_head_maps,
    textspan_pool_heads,
)
from clipdecomp.methods.spatial import heatmap
from clipdecomp.methods.textspan import textspan_heads

transformers = pytest.importorskip("transformers")

#: (name, vision geometry, text geometry); odd head counts and head widths; w42h7's image
#: side is not a multiple of its patch (the convolution drops the last 2 pixels)
GEOMETRIES = {
    "w60h5": ({"hidden_size": 60, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 5, "image_size": 32, "patch_size": 8},
              {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
                   "num_attention_heads": 3, "vocab_size": 101, "max_position_embeddings": 16}),
    "w42h7": ({"hidden_size": 42, "intermediate_size": 70, "num_hidden_layers": 3,
                   "num_attention_heads": 7, "image_size": 30, "patch_size": 7},
              {"hidden_size": 36, "intermediate_size": 40, "num_hidden_layers": 1,
                   "num_attention_heads": 9, "vocab_size": 57, "max_position_embeddings": 12}),
    "w64h4": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "image_size": 48, "patch_size": 16},
              {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "vocab_size": 80, "max_position_embeddings": 10}),
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (transformers zero-initialises biases and scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.08
            if name.endswith(("layer_norm1.weight", "layer_norm2.weight")) or "layernorm.weight" in name or "post_layernorm.weight" in name or "final_layer_norm.weight" in name:
                p.copy_(1.0 + noise)
            else:
                p.add_(noise)


_MODELS: dict = {}


def siglip_model(name: str, tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """A random SiglipModel of one geometry and the directory it was saved to."""
    if name not in _MODELS:
        vis, txt = GEOMETRIES[name]
        torch.manual_seed(0)
        cfg = transformers.SiglipConfig(vision_config=vis,
                                        text_config={**txt, "projection_size": vis["hidden_size"]})
        m = transformers.SiglipModel(cfg).eval()
        _perturb(m, 1)
        d = str(tmp_path_factory.mktemp(f"siglip_{name}"))
        m.save_pretrained(d)
        _MODELS[name] = (m, d)
    return _MODELS[name]


def siglip2_model(tmp_path_factory) -> tuple[torch.nn.Module, str, int]:
    """A random Siglip2Model (NaFlex) with a 4 x 4 native grid of 8-pixel patches."""
    if "siglip2" not in _MODELS:
        torch.manual_seed(0)
        cfg = transformers.Siglip2Config(
            vision_config={"hidden_size": 60, "intermediate_size": 72, "num_hidden_layers": 2,
                               "num_attention_heads": 3, "num_patches": 16, "patch_size": 8},
            text_config={"hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 5, "vocab_size": 90, "max_position_embeddings": 12,
                             "projection_size": 60})
        m = transformers.Siglip2Model(cfg).eval()
        _perturb(m, 2)
        d = str(tmp_path_factory.mktemp("siglip2"))
        m.save_pretrained(d)
        _MODELS["siglip2"] = (m, d, 4)
    return _MODELS["siglip2"]


def to_open_clip(sd: dict) -> dict:
    """transformers' SiglipModel tensors under open_clip's timm-based SigLIP names."""
    out: dict = {}
    pre = {"vision_model.embeddings.patch_embedding.": "visual.trunk.patch_embed.proj.",
           "vision_model.post_layernorm.": "visual.trunk.norm.",
           "vision_model.head.attention.out_proj.": "visual.trunk.attn_pool.proj.",
           "vision_model.head.layernorm.": "visual.trunk.attn_pool.norm.",
           "vision_model.head.mlp.": "visual.trunk.attn_pool.mlp.",
           "text_model.final_layer_norm.": "text.ln_final.",
           "text_model.head.": "text.text_projection."}
    qkv: dict = {}
    for k, v in sd.items():
        v = v.detach().clone().contiguous()
        if k == "vision_model.embeddings.position_embedding.weight":
            out["visual.trunk.pos_embed"] = v[None]
        elif k == "vision_model.head.probe":
            out["visual.trunk.attn_pool.latent"] = v
        elif k.startswith("vision_model.head.attention.in_proj_"):
            kind = k.rsplit("_", 1)[1]
            w = v.shape[0] // 3
            out[f"visual.trunk.attn_pool.q.{kind}"] = v[:w].contiguous()
            out[f"visual.trunk.attn_pool.kv.{kind}"] = v[w:].contiguous()
        elif k == "text_model.embeddings.token_embedding.weight":
            out["text.token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["text.positional_embedding"] = v
        elif ".encoder.layers." in k:
            tower, _, _, i, rest = k.split(".", 4)
            vis = tower == "vision_model"
            base = f"visual.trunk.blocks.{i}." if vis else f"text.transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj",
                                                                         "v_proj"):
                qkv.setdefault((base, vis, rest.split(".")[2]), {})[rest.split(".")[1]] = v
                continue
            names = ({"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj":
                      "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if vis else
                     {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj":
                      "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"})
            mod, kind = rest.rsplit(".", 1)
            out[base + names[mod] + "." + kind] = v
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v
        else:
            src = next(p for p in pre if k.startswith(p))
            out[pre[src] + k[len(src):]] = v
    for (base, vis, kind), parts in qkv.items():
        cat = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]]).contiguous()
        out[base + ("attn.qkv." + kind if vis else "attn.in_proj_" + kind)] = cat
    return out


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def ids(n: int, ctx: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, ctx)).astype(np.int32)


def _pooled(out):
    return getattr(out, "pooler_output", out)


# ----------------------------------------------------------------------------------------------
# features


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_features_match_siglip_model(name, tmp_path_factory):
    m, d = siglip_model(name, tmp_path_factory)
    model = load_siglip(d, threads=1)
    c = model.config
    x = pixels(3, c.image_size)
    t = ids(4, c.context_length, c.vocab_size)
    with torch.no_grad():
        want_i = _pooled(m.get_image_features(pixel_values=torch.from_numpy(x))).numpy()
        want_t = _pooled(m.get_text_features(input_ids=torch.from_numpy(t).long())).numpy()
        out = m(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(t).long())
    got_i = model.encode_image(x, normalize=False)
    got_t = model.encode_text(t, normalize=False)
    assert rel(got_i, want_i) < 1e-4
    assert rel(got_t, want_t) < 1e-4
    assert model.logit_scale == pytest.approx(float(m.logit_scale.detach().exp()), rel=1e-6)
    assert model.logit_bias == pytest.approx(float(m.logit_bias.detach()), rel=1e-6)
    assert rel(model.logits(got_i, got_t), out.logits_per_image.numpy()) < 1e-4


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_open_clip_layout(name, tmp_path_factory, tmp_path):
    from safetensors.torch import save_file

    m, d = siglip_model(name, tmp_path_factory)
    hf_model = load_siglip(d, threads=1)
    c = hf_model.config
    path = str(tmp_path / "open_clip_model.safetensors")
    save_file(to_open_clip(m.state_dict()), path)
    core = extension().Model(path, c.to_core_dict(), "auto")
    assert core.layout == "open_clip"
    oc = SigLIP(core, c, threads=1)
    x = pixels(2, c.image_size, seed=21)
    t = ids(3, c.context_length, c.vocab_size, seed=21)
    want_i = _pooled(m.get_image_features(pixel_values=torch.from_numpy(x))).numpy()
    want_t = _pooled(m.get_text_features(input_ids=torch.from_numpy(t).long())).numpy()
    assert rel(oc.encode_image(x, normalize=False), want_i) < 1e-4
    assert rel(oc.encode_text(t, normalize=False), want_t) < 1e-4
    a, b = oc.decompose(x, depth="deep"), hf_model.decompose(x, depth="deep")
    assert np.abs(a.heads - b.heads).max() < 1e-6 and np.abs(a.mlps - b.mlps).max() < 1e-6
    assert oc.logit_bias == pytest.approx(float(m.logit_bias.detach()), rel=1e-6)


#: open_clip's model config of ViT-B-16-SigLIP (its model_configs/ViT-B-16-SigLIP.json)
OC_B16 = {"embed_dim": 768, "init_logit_bias": -10, "custom_text": True,
          "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224",
                         "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
          "text_cfg": {"context_length": 64, "vocab_size": 32000, "width": 768, "heads": 12,
                       "layers": 12, "no_causal_mask": True, "proj_bias": True,
                       "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}


def test_open_clip_config():
    cfg = siglip_config_from_open_clip({"model_cfg": OC_B16, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
        "resize_mode": "squash"}})
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim) == \
        (224, 16, 768, 12, 12, 3072)
    assert (cfg.context_length, cfg.vocab_size, cfg.text_width, cfg.text_layers,
            cfg.text_heads, cfg.text_mlp_dim) == (64, 32000, 768, 12, 12, 3072)
    assert (cfg.act, cfg.text_act) == ("gelu_tanh", "gelu")   # open_clip's text GELU is exact
    tanh = {**OC_B16, "text_cfg": {**OC_B16["text_cfg"], "act_kwargs": {"approximate": "tanh"}}}
    assert siglip_config_from_open_clip(tanh).text_act == "gelu_tanh"
    so = {**OC_B16, "embed_dim": 1152, "vision_cfg": {**OC_B16["vision_cfg"], "image_size": 384,
                                   "timm_model_name": "vit_so400m_patch14_siglip_384"}}
    c2 = siglip_config_from_open_clip(so)
    assert (c2.image_size, c2.patch_size, c2.width, c2.layers, c2.heads, c2.mlp_dim) == \
        (384, 14, 1152, 27, 16, 4304)
    gap = {**OC_B16, "vision_cfg": {**OC_B16["vision_cfg"],
                                    "timm_model_name": "vit_base_patch16_siglip_gap_224"}}
    with pytest.raises(ValueError, match="attention-pooling head"):
        siglip_config_from_open_clip(gap)
    with pytest.raises(ValueError, match="not a timm SigLIP"):
        siglip_config_from_open_clip({"vision_cfg": {"timm_model_name": "convnext_base"}})


def test_canonicalize_tokenizer_option(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"</s>": 1, "<unk>": 2, "a": 3, "cat": 4},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = SiglipTokenizer.from_dir(tmp_path, context_length=4, canonical=True)
    assert tok(["A, CAT!"]).tolist() == [[3, 4, 1, 1]]
    assert canonicalize("A  Photo, of a CAT!") == "a photo of a cat"


def test_vision_model_saved_alone(tmp_path):
    """transformers' SiglipVisionModel saves its keys without "vision_model."."""
    torch.manual_seed(3)
    cfg = transformers.SiglipVisionConfig(hidden_size=36, intermediate_size=50,
                                          num_hidden_layers=2, num_attention_heads=3,
                                          image_size=24, patch_size=8)
    m = transformers.SiglipVisionModel(cfg).eval()
    _perturb(m, 4)
    m.save_pretrained(str(tmp_path))
    model = load_siglip(tmp_path, threads=1)
    assert not model.config.has_text
    x = pixels(2, 24, seed=4)
    want = m(pixel_values=torch.from_numpy(x)).pooler_output.numpy()
    assert rel(model.encode_image(x, normalize=False), want) < 1e-4
    dec = model.decompose(x, depth="deep")
    assert np.abs(dec.summed() - dec.embedding / dec.norm[:, None]).max() < 1e-5
    with pytest.raises(ValueError, match="no text tower"):
        model.encode_text([[0] * 64])


def _patchify(x: np.ndarray, p: int) -> np.ndarray:
    """[B, 3, S, S] -> [B, G*G, P*P*3] in Siglip2's (py, px, c) order."""
    b, c, s, _ = x.shape
    g = s // p
    return x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)


def test_features_match_siglip2_model(tmp_path_factory):
    m, d, g = siglip2_model(tmp_path_factory)
    model = load_siglip(d, threads=1)
    c = model.config
    assert (c.image_size, c.grid) == (8 * g, g)
    x = pixels(2, c.image_size, seed=3)
    t = ids(3, c.context_length, c.vocab_size, seed=3)
    with torch.no_grad():
        want_i = _pooled(m.get_image_features(
            pixel_values=torch.from_numpy(_patchify(x, c.patch_size)),
            pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
            spatial_shapes=torch.tensor([[g, g]] * 2))).numpy()
        want_t = _pooled(m.get_text_features(input_ids=torch.from_numpy(t).long())).numpy()
    assert rel(model.encode_image(x, normalize=False), want_i) < 1e-4
    assert rel(model.encode_text(t, normalize=False), want_t) < 1e-4


# ----------------------------------------------------------------------------------------------
# the pooling head's terms against torch


def _head_tensors(m, x: np.ndarray):
    """float64 torch tensors of the pooling head on transformers' own hidden states."""
    vm = m.vision_model
    with torch.no_grad():
        hs = vm(pixel_values=torch.from_numpy(x)).last_hidden_state.double()  # post_layernorm'd
        pooled = _pooled(m.get_image_features(pixel_values=torch.from_numpy(x))).double()
    head = vm.head
    w = head.attention.in_proj_weight.detach().double()
    b = head.attention.in_proj_bias.detach().double()
    wd = w.shape[1]
    return hs, pooled, head, w[:wd], w[wd:2 * wd], w[2 * wd:], b[:wd], b[wd:2 * wd], b[2 * wd:]


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_pool_terms_match_torch(name, tmp_path_factory):
    m, d = siglip_model(name, tmp_path_factory)
    model = load_siglip(d, threads=1)
    c = model.config
    x = pixels(2, c.image_size, seed=5)
    dec = model.decompose(x, spatial=True)
    hs, pooled, head, wq, wk, wv, bq, bk, bv = _head_tensors(m, x)
    nh, dh = c.heads, c.head_dim
    bsz, n, wd = hs.shape
    probe = head.probe.detach().double().reshape(1, wd)
    q = (probe @ wq.T + bq).reshape(nh, dh)
    k = (hs @ wk.T + bk).reshape(bsz, n, nh, dh)
    v = (hs @ wv.T + bv).reshape(bsz, n, nh, dh)
    p = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / dh ** 0.5, dim=-1)
    wo = head.attention.out_proj.weight.detach().double().reshape(wd, nh, dh)
    bo = head.attention.out_proj.bias.detach().double()
    norm = pooled.norm(dim=-1)[:, None, None]
    # per (token, head): p[h, i] W_O[:, h] v_h(y_i) + b_O / (N H)
    tok = torch.einsum("bhn,bnhd,ohd->bnho", p, v, wo) + bo / (n * nh)
    attn = tok.sum((1, 2))
    mlp = head.mlp(head.layernorm(attn.float())).double()
    assert rel(dec.tokens[:, 0], (tok / norm[..., None]).numpy()) < 1e-4
    assert rel(dec.heads[:, 0], (tok.sum(1) / norm).numpy()) < 1e-4
    assert rel(dec.mlps[:, 0], (mlp / norm[:, 0]).numpy()) < 1e-4
    assert rel(dec.pool_attn, p.numpy()) < 1e-4
    # the terms sum to the unit embedding, and the reference part split is the embedding's
    e = dec.embedding / dec.norm[:, None]
    assert np.abs(dec.summed() - e).max() < 1e-5
    assert rel(attn + mlp, pooled) < 1e-4


def _deep_oracle(m, x: np.ndarray, c: SiglipConfig, tokens: bool = False):
    """The deep terms, transcribed from docs/decomposition.md over transformers' activations
    (with ``tokens``, also the heads' per-token terms ``[B, L, N, H, D]``)."""
    vm = m.vision_model.double()
    caps: dict = {"z": [], "mlp": []}
    hooks = [vm.embeddings.register_forward_hook(lambda mod, i, o: caps.__setitem__("emb", o))]
    for layer in vm.encoder.layers:
        hooks.append(layer.self_attn.out_proj.register_forward_pre_hook(
            lambda mod, i: caps["z"].append(i[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda mod, i, o: caps["mlp"].append(o)))
    try:
        out = vm(pixel_values=torch.from_numpy(x).double())
        pooled = vm.head(out.last_hidden_state)
    finally:
        for h in hooks:
            h.remove()
    params = {k: v.detach().double().clone() for k, v in vm.named_parameters()}
    m.float()
    L, nh, dh, wd = c.layers, c.heads, c.head_dim, c.width
    K = 2 * L + 1
    emb = caps["emb"]
    xl = emb + sum(caps["mlp"])
    terms_heads = []
    for li, layer in enumerate(vm.encoder.layers):
        wo = layer.self_attn.out_proj.weight.detach().double().reshape(wd, nh, dh)
        bo = layer.self_attn.out_proj.bias.detach().double()
        z = caps["z"][li].reshape(*caps["z"][li].shape[:2], nh, dh)
        th = torch.einsum("bnhd,ohd->bnho", z, wo) + bo / nh      # [B, N, H', W]
        xl = xl + th.sum(2)
        terms_heads.append(th)
    ln = vm.post_layernorm
    mu = xl.mean(-1)
    sigma = (xl.var(-1, unbiased=False) + ln.eps).sqrt()
    gamma, beta = ln.weight.detach().double(), ln.bias.detach().double()
    head = vm.head
    w = head.attention.in_proj_weight.detach().double()
    b = head.attention.in_proj_bias.detach().double()
    y = out.last_hidden_state
    q = ((head.probe.detach().double().reshape(1, wd) @ w[:wd].T) + b[:wd]).reshape(nh, dh)
    k = (y @ w[wd:2 * wd].T + b[wd:2 * wd]).reshape(*y.shape[:2], nh, dh)
    p = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / dh ** 0.5, dim=-1)
    wv = w[2 * wd:].reshape(nh, dh, wd)
    wo = head.attention.out_proj.weight.detach().double().reshape(wd, nh, dh)
    pconst = (beta @ w[2 * wd:].T + b[2 * wd:]) @ params["head.attention.out_proj.weight"].T + \
        params["head.attention.out_proj.bias"]
    cw = p / sigma[:, None, :]                                      # [B, H, N]

    def mapped(t, kt):  # t [B, N, W] -> [B, W]
        u = torch.einsum("bhn,bnw->bhw", cw, t) - torch.einsum("bhn,bn->bh", cw, mu)[..., None] / kt
        return torch.einsum("ohd,hdw,bhw->bo", wo, wv, u * gamma) + pconst / kt

    def mapped_per_token(t, kt):  # t [B, N, W] -> [B, N, W]: the sum over i left out
        n = t.shape[1]
        u = cw[:, :, :, None] * (t - mu[..., None] / kt)[:, None]          # [B, H, N, W]
        return torch.einsum("ohd,hdw,bhnw->bno", wo, wv, u * gamma) + pconst / (kt * n)

    norm = pooled.norm(dim=-1, keepdim=True)
    mlps = [mapped(emb, K)] + [mapped(t, K) for t in caps["mlp"]]
    heads = [[mapped(th[:, :, h], K * nh) for h in range(nh)] for th in terms_heads]
    mlps_t = torch.stack(mlps, 1) / norm[:, None]
    heads_t = torch.stack([torch.stack(r, 1) for r in heads], 1) / norm[:, None, None]
    if not tokens:
        return heads_t.numpy(), mlps_t.numpy()
    toks = torch.stack([torch.stack([mapped_per_token(th[:, :, h], K * nh) for h in range(nh)], 2)
                        for th in terms_heads], 1)                       # [B, L, N, H, W]
    return heads_t.numpy(), mlps_t.numpy(), (toks / norm[:, None, None, None]).numpy()


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_deep_terms(name, tmp_path_factory):
    m, d = siglip_model(name, tmp_path_factory)
    model = load_siglip(d, threads=1)
    c = model.config
    x = pixels(2, c.image_size, seed=7)
    dec = model.decompose(x, depth="deep")
    L, H, D = c.layers, c.heads, c.width
    assert dec.heads.shape == (2, L, H, D) and dec.mlps.shape == (2, L + 2, D)
    # the deep terms sum to the attention part, and everything to the unit embedding
    assert np.abs(dec.heads.sum((1, 2)) + dec.mlps[:, :-1].sum(1) - dec.attention_part).max() < 1e-5
    assert np.abs(dec.summed() - dec.embedding / dec.norm[:, None]).max() < 1e-5
    heads, mlps = _deep_oracle(m, x, c)
    assert rel(dec.heads, heads) < 1e-4
    assert rel(dec.mlps[:, :-1], mlps) < 1e-4
    # the pooling MLP row is the reference decomposition's MLP term
    pool = model.decompose(x)
    assert np.abs(dec.mlps[:, -1] - pool.mlps[:, 0]).max() < 1e-6


def test_one_copy_of_every_weight(tmp_path_factory):
    """The core keeps each parameter once, at 4 bytes (w64h4's widths are multiples of the GEMM
    panel): no plain copy of an out-projection or of the pooling head's W_V / W_O beside the
    packed one (the deep decomposition unpacks them per call; test_deep_terms and
    test_deep_token_terms check its numbers). The pooling head keeps its query (W) instead of
    W_Q (W x W), and its constant (W)."""
    from clipdecomp.engine.safetensors_io import SafetensorsFile

    _, d = siglip_model("w64h4", tmp_path_factory)
    model = load_siglip(d, threads=1)
    tensors = SafetensorsFile(os.path.join(d, "model.safetensors")).tensors
    params = sum(t.numel for k, t in tensors.items() if k not in ("logit_scale", "logit_bias"))
    W = model.config.width
    assert model._core.nbytes == 4 * (params - W * W + 2 * W)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_deep_token_terms(name, tmp_path_factory):
    """Each encoder head's term at each token the pooling head reads: against the transcription
    of docs/decomposition.md over transformers' activations, summing over tokens to the heads'
    deep terms, and with the rest to the unit embedding."""
    m, d = siglip_model(name, tmp_path_factory)
    model = load_siglip(d, threads=1)
    c = model.config
    x = pixels(2, c.image_size, seed=13)
    dec = model.decompose(x, depth="deep", spatial=True)
    L, H, N, D = c.layers, c.heads, c.n_tokens, c.width
    assert dec.tokens.shape == (2, L, N, H, D)
    heads, mlps, toks = _deep_oracle(m, x, c, tokens=True)
    assert rel(dec.tokens, toks) < 1e-4
    assert rel(dec.heads, heads) < 1e-4 and rel(dec.mlps[:, :-1], mlps) < 1e-4
    assert np.abs(dec.tokens.sum(2) - dec.heads).max() < 1e-5
    e = dec.embedding / dec.norm[:, None]
    assert np.abs(dec.tokens.sum((1, 2, 3)) + dec.mlps.sum(1) - e).max() < 1e-5
    # the same numbers as without them, and chunked over batches and threads
    plain = model.decompose(x, depth="deep")
    np.testing.assert_array_equal(dec.heads, plain.heads)
    two = load_siglip(d, threads=2).decompose(x, depth="deep", spatial=True, batch_size=1)
    assert np.abs(two.tokens - dec.tokens).max() < 1e-6
    # only the tokens asked of the core: the coefficients come without the row terms
    alone = model._core.encode_image(x, tokens=True)
    np.testing.assert_array_equal(alone["tokens"], dec.tokens)


def test_deep_terms_siglip2(tmp_path_factory):
    _, d, _ = siglip2_model(tmp_path_factory)
    model = load_siglip(d, threads=1)
    x = pixels(3, model.config.image_size, seed=9)
    dec = model.decompose(x, depth="deep", batch_size=2)
    assert np.abs(dec.summed() - dec.embedding / dec.norm[:, None]).max() < 1e-5
    assert np.abs(dec.heads.sum((1, 2)) + dec.mlps[:, :-1].sum(1) - dec.attention_part).max() < 1e-5


def test_threads_and_batches_agree(tmp_path_factory):
    _, d = siglip_model("w60h5", tmp_path_factory)
    x = pixels(5, 32, seed=11)
    a = load_siglip(d, threads=1).decompose(x, depth="deep", batch_size=5)
    b = load_siglip(d, threads=2).decompose(x, depth="deep", batch_size=2)
    assert np.abs(a.heads - b.heads).max() < 1e-6
    assert np.abs(a.embedding - b.embedding).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# the tools on SigLIP decompositions, and the reference's outputs


@pytest.fixture(scope="module")
def pool_dec(tmp_path_factory) -> SiglipDecomposition:
    _, d = siglip_model("w60h5", tmp_path_factory)
    return load_siglip(d, threads=1).decompose(pixels(6, 32, seed=13), spatial=True)


def test_heatmaps_and_head_maps(pool_dec):
    dec = pool_dec
    t = np.random.default_rng(0).normal(size=(2, 60)).astype(np.float32)
    maps = heatmap(dec, t)                                            # [B, T, G, G]
    want = np.einsum("bnhd,td->btn", dec.tokens[:, 0].astype(np.float64), t).reshape(6, 2, 4, 4)
    assert np.abs(maps - want).max() < 1e-5
    hm = pool_head_maps(dec, t[0])                                    # [B, H, G, G]
    want_h = np.einsum("bnhd,d->bhn", dec.tokens[:, 0].astype(np.float64), t[0]).reshape(6, 5, 4, 4)
    assert np.abs(hm - want_h).max() < 1e-5
    # the patches' maps plus the MLP term give the similarity with each direction
    sim = (dec.embedding / dec.norm[:, None]) @ t.T
    assert np.abs(maps.sum((2, 3)) + dec.mlps[:, 0] @ t.T - sim).max() < 1e-4


def test_segmentation_ablation_on_siglip(pool_dec):
    dec = pool_dec
    w = np.random.default_rng(1).normal(size=(60, 3))
    w /= np.linalg.norm(w, axis=0)
    res = segment_decomposition(dec, w)
    assert res.scores.shape == (6, 32, 32)
    cls = np.argmax(dec.embedding @ w, axis=1)
    # the map before normalisation: each patch's score for the class minus its mean score
    per = np.einsum("bnhd,dk->bnk", dec.tokens[:, 0].astype(np.float64), w)
    want = per[np.arange(6), :, cls] - per.mean(-1)
    assert np.abs(res.maps.reshape(6, -1) - want).max() < 1e-4
    # ablating nothing gives the unit embedding; ablating every head leaves their mean
    means = component_means(dec)
    assert np.abs(ablate(dec, means=means) - dec.embedding / dec.norm[:, None]).max() < 1e-5
    out = ablate(dec, layers=[0], means=means)
    assert np.abs(out - (dec.heads[:, 0].mean(0).sum(0) + dec.mlps[:, 0])).max() < 1e-5


def test_reference_outputs(pool_dec):
    dec = pool_dec
    # head orthogonality: a loop transcription of the reference's statistic
    x = dec.pool_heads.astype(np.float64)
    c = x - x.mean(0)
    want = np.zeros((5, 5))
    for b in range(6):
        for h in range(5):
            for g in range(5):
                want[h, g] += abs(c[b, h] @ c[b, g]) / (np.linalg.norm(c[b, h]) *
                                                        np.linalg.norm(c[b, g])) / 6
    assert np.abs(head_orthogonality(dec) - want).max() < 1e-12
    # accuracies of the parts
    w = np.random.default_rng(2).normal(size=(60, 4))
    labels = np.array([0, 1, 2, 3, 0, 1])
    acc = accuracy_by_part(dec, w, labels)
    for key, part in (("mlp", dec.pool_mlp), ("attention", dec.pool_heads.sum(1)),
                      ("embedding", dec.embedding)):
        assert acc[key] == pytest.approx(100 * np.mean(np.argmax(part @ w, 1) == labels))
    # TextSpan per pooling head, D texts at rank D by default
    texts = np.random.default_rng(3).normal(size=(80, 60))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    res = textspan_pool_heads(dec, texts, n_texts=4, rank=60)
    assert len(res) == 5 and all(len(r.indices) == 4 for r in res)
    # the head tables of the package on the same terms pick the same texts
    table = textspan_heads(dec, texts, layers=[0], n_texts=4, rank=60, progress=False)
    picks = [list(table.attrs["results"][(0, h)].indices) for h in range(5)]
    assert picks == [list(r.indices) for r in res]


def test_retrieval_on_siglip(pool_dec):
    from clipdecomp.methods.retrieval import HeadIndex

    idx = HeadIndex.build(pool_dec, heads=[(0, 1), (0, 3)])
    q = pool_dec.heads[2, 0, 1] + pool_dec.heads[2, 0, 3]
    indices, scores = idx.query(q, k=1)
    assert int(indices[0]) == 2 and scores[0] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# tokenizer, config, errors


def test_tokenizer_pads_like_transformers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "photo": 4, "of": 5, "cat": 6, "dog": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "</s>"}))
    ours = SiglipTokenizer.from_dir(tmp_path, context_length=8)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                pad_token="</s>")
    texts = ["a photo of a cat", "dog", "a a a a a a a a a a a"]
    want = fast(texts, padding="max_length", max_length=8, truncation=True)["input_ids"]
    assert ours(texts).tolist() == want


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type 'clip'"):
        siglip_config_from_hf({"model_type": "clip"})
    with pytest.raises(ValueError, match="not a square grid"):
        siglip_config_from_hf({"model_type": "siglip2", "vision_config": {"num_patches": 200}})
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        siglip_config_from_hf({"model_type": "siglip", "vision_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="maps to 32 dims"):
        siglip_config_from_hf({"model_type": "siglip", "vision_config": {"hidden_size": 64,
                               "num_attention_heads": 4}, "text_config": {"projection_size": 32}})
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_clip_224"}}}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a timm SigLIP"):
        load_siglip(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or"):
        load_siglip(tmp_path / "..")


def test_clip_loader_points_to_load_siglip(tmp_path_factory):
    import clipdecomp

    _, d = siglip_model("w60h5", tmp_path_factory)
    with pytest.raises(ValueError, match="load_siglip"):
        clipdecomp.load(d)


def test_core_refuses_wrong_options(tmp_path_factory):
    _, d = siglip_model("w60h5", tmp_path_factory)
    model = load_siglip(d, threads=1)
    x = pixels(1, 32)
    for opt in ("token_embeddings", "cls_to_cls", "attn"):
        with pytest.raises(ValueError, match="no class token"):
            model._core.encode_image(x, **{opt: True})
    with pytest.raises(ValueError, match="no class token"):
        model._core.encode_image(x, probe=np.ones((1, model.config.width), np.float32))
    with pytest.raises(ValueError, match="spatial=True"):
        _ = model.decompose(x).tokens
    with pytest.raises(ValueError, match="depth='deep', spatial=True"):
        _ = model.decompose(x, depth="deep").tokens
    # a CLIP config on SigLIP weights: the anchor tensor is missing, said plainly
    cfg = {**model.config.to_core_dict()}
    cfg.pop("family")
    with pytest.raises(ValueError, match="class_embedding"):
        extension().Model(os.path.join(d, "model.safetensors"), cfg, "auto")

