"""A plain NumPy reference of the CLIP towers and of the paper's decomposition.

Written directly from ``decomposition.md`` and independent of the C core: float64 throughout,
one image at a time, and every per-(token, head) term materialised the slow way (the reference
code's route). Used by the tests and by ``csrc/tests/make_fixture.py`` (so: NumPy only).

Weights are dicts in open_clip naming (``visual.conv1.weight`` ...); :func:`to_hf` and
:func:`from_hf` convert to and from the HF transformers names. Configs are dicts with the
``cd_config`` field names (``act`` / ``text_act`` as ``"gelu"`` or ``"quick_gelu"``).

Example
-------
>>> cfg = tiny_config()
>>> sd = random_weights(cfg, seed=0)
>>> images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
>>> out = decompose(sd, cfg, images)
>>> out["heads"].shape
(2, 2, 4, 24)
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

Weights = dict  # name -> float array

_erf = np.vectorize(math.erf, otypes=[np.float64])


def tiny_config(**overrides) -> dict:
    """A small config for tests: S=16, P=4 (N=17), W=32, L=2, H=4, D=24, text C=8, V=50.

    Example
    -------
    >>> tiny_config(act="quick_gelu")["act"]
    'quick_gelu'
    """
    cfg = {
        "image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 4, "mlp_dim": 64,
        "embed_dim": 24, "act": "gelu", "ln_eps": 1e-5, "context_length": 8, "vocab_size": 50,
        "text_width": 32, "text_layers": 2, "text_heads": 4, "text_mlp_dim": 48,
        "text_act": "quick_gelu",
    }
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------------------------
# the operations


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, biased variance: ``[..., W] -> [..., W]``."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))``."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """QuickGELU, ``x sigmoid(1.702 x)``."""
    return x / (1.0 + np.exp(-1.702 * x))


def activation(name: str):
    """The activation function called ``name`` (``"gelu"`` or ``"quick_gelu"``)."""
    return {"gelu": gelu, "quick_gelu": quick_gelu}[name]


def softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(x, w_in, b_in, w_out, b_out, heads, causal=False):
    """Multi-head self-attention of one sequence ``x [N, W]``.

    Returns ``out [N, W]`` (after the out-projection), the probabilities ``a [H, N, N]`` and
    the values ``v [H, N, d]`` (bias included).
    """
    n, w = x.shape
    d = w // heads
    qkv = x @ w_in.T + b_in
    q, k, v = (qkv[:, i * w:(i + 1) * w].reshape(n, heads, d).transpose(1, 0, 2) for i in range(3))
    s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    if causal:
        s = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, s)
    a = softmax(s)
    z = (a @ v).transpose(1, 0, 2).reshape(n, w)
    return z @ w_out.T + b_out, a, v


def _block_names(prefix: str, i: int) -> dict:
    p = f"{prefix}transformer.resblocks.{i}."
    return {k: p + k for k in (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}


def patches(image: np.ndarray, p: int) -> np.ndarray:
    """``[3, S, S] -> [G*G, 3*P*P]``: row-major over the grid, ``(c, py, px)`` within a patch."""
    g = image.shape[-1] // p
    return image.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)


def _f64(sd: Weights) -> Weights:
    return {k: np.asarray(v, np.float64) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# the towers


def vision_trace(sd: Weights, cfg: dict, image: np.ndarray) -> dict:
    """The image tower on one image ``[3, S, S]``, keeping what the decomposition needs.

    Returns a dict: ``x0 [N, W]`` (after ln_pre), per layer lists ``attn [H, N, N]``,
    ``v [H, N, d]``, ``mlp0 [W]`` (MLP output at the class token), ``y [W]`` (= x_L[0]),
    ``embedding [D]``.
    """
    sd = _f64(sd)
    eps = cfg["ln_eps"]
    act = activation(cfg["act"])
    w = cfg["width"]
    x = patches(np.asarray(image, np.float64), cfg["patch_size"]) @ \
        sd["visual.conv1.weight"].reshape(w, -1).T
    x = np.concatenate([sd["visual.class_embedding"][None], x]) + sd["visual.positional_embedding"]
    x = layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps)
    tr = {"x0": x.copy(), "attn": [], "v": [], "mlp0": []}
    for i in range(cfg["layers"]):
        n = _block_names("visual.", i)
        out, a, v = attention(layer_norm(x, sd[n["ln_1.weight"]], sd[n["ln_1.bias"]], eps),
                              sd[n["attn.in_proj_weight"]], sd[n["attn.in_proj_bias"]],
                              sd[n["attn.out_proj.weight"]], sd[n["attn.out_proj.bias"]],
                              cfg["heads"])
        x = x + out
        h = layer_norm(x, sd[n["ln_2.weight"]], sd[n["ln_2.bias"]], eps)
        m = act(h @ sd[n["mlp.c_fc.weight"]].T + sd[n["mlp.c_fc.bias"]]) @ \
            sd[n["mlp.c_proj.weight"]].T + sd[n["mlp.c_proj.bias"]]
        x = x + m
        tr["attn"].append(a)
        tr["v"].append(v)
        tr["mlp0"].append(m[0])
    tr["y"] = x[0]
    tr["embedding"] = layer_norm(x[0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"],
                                 eps) @ sd["visual.proj"]
    return tr


def encode_image(sd: Weights, cfg: dict, images: np.ndarray) -> np.ndarray:
    """``images [B, 3, S, S] -> [B, D]`` unnormalised image embeddings (float64)."""
    return np.stack([vision_trace(sd, cfg, im)["embedding"] for im in images])


def encode_text(sd: Weights, cfg: dict, ids: np.ndarray) -> np.ndarray:
    """``ids [T, C] -> [T, D]`` unnormalised text embeddings, taken at ``argmax(ids)``."""
    sd = _f64(sd)
    eps = cfg["ln_eps"]
    act = activation(cfg["text_act"])
    out = []
    for row in np.asarray(ids):
        x = sd["token_embedding.weight"][row] + sd["positional_embedding"]
        for i in range(cfg["text_layers"]):
            n = _block_names("", i)
            o, _, _ = attention(layer_norm(x, sd[n["ln_1.weight"]], sd[n["ln_1.bias"]], eps),
                                sd[n["attn.in_proj_weight"]], sd[n["attn.in_proj_bias"]],
                                sd[n["attn.out_proj.weight"]], sd[n["attn.out_proj.bias"]],
                                cfg["text_heads"], causal=True)
            x = x + o
            h = layer_norm(x, sd[n["ln_2.weight"]], sd[n["ln_2.bias"]], eps)
            x = x + act(h @ sd[n["mlp.c_fc.weight"]].T + sd[n["mlp.c_fc.bias"]]) @ \
                sd[n["mlp.c_proj.weight"]].T + sd[n["mlp.c_proj.bias"]]
        e = int(np.argmax(row))
        out.append(layer_norm(x[e], sd["ln_final.weight"], sd["ln_final.bias"], eps)
                   @ sd["text_projection"])
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# the decomposition (reference convention of decomposition.md)


def decompose(sd: Weights, cfg: dict, images: np.ndarray,
              probe: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every output of ``cd_encode_image`` for ``images [B, 3, S, S]``, the slow way.

    Returns float64 arrays: ``embedding [B, D]``, ``ln_stats [B, 3]`` (mu, sigma, ||emb||),
    ``heads [B, L, H, D]``, ``mlps [B, L+1, D]``, ``cls_to_cls [B, L, D]``,
    ``tokens [B, L, N, H, D]``, ``attn_cls [B, L, H, N]``, ``attn_mean [B, L, N, N]`` and, given
    ``probe [T, D]``, ``probe [B, L, N, H, T]``. All terms are divided by ||emb||.
    """
    sd64 = _f64(sd)
    L, H, W = cfg["layers"], cfg["heads"], cfg["width"]
    d = W // H
    gamma, beta = sd64["visual.ln_post.weight"], sd64["visual.ln_post.bias"]
    proj = sd64["visual.proj"]
    K = 2 * L + 1
    res: dict[str, list] = {k: [] for k in (
        "embedding", "ln_stats", "heads", "mlps", "cls_to_cls", "tokens", "attn_cls", "attn_mean")}
    for im in images:
        tr = vision_trace(sd, cfg, im)
        y, emb = tr["y"], tr["embedding"]
        n_tok = tr["x0"].shape[0]
        mu = y.mean()
        sigma = math.sqrt(((y - mu) ** 2).mean() + cfg["ln_eps"])
        norm = float(np.linalg.norm(emb))

        def term(t, k_t, mu=mu, sigma=sigma, norm=norm):
            return (gamma * (t - mu / k_t) / sigma + beta / k_t) @ proj / norm

        heads = np.zeros((L, H, proj.shape[1]))
        tokens = np.zeros((L, n_tok, H, proj.shape[1]))
        for layer in range(L):
            n = _block_names("visual.", layer)
            w_o, b_o = sd64[n["attn.out_proj.weight"]], sd64[n["attn.out_proj.bias"]]
            a, v = tr["attn"][layer], tr["v"][layer]
            for h in range(H):
                w_oh = w_o[:, h * d:(h + 1) * d]
                z = a[h, 0] @ v[h]
                heads[layer, h] = term(w_oh @ z + b_o / H, K * H)
                for i in range(n_tok):
                    t = w_oh @ (a[h, 0, i] * v[h, i]) + b_o / (n_tok * H)
                    tokens[layer, i, h] = term(t, K * n_tok * H)
        mlps = np.stack([term(tr["x0"][0], K)] + [term(m, K) for m in tr["mlp0"]])
        res["embedding"].append(emb)
        res["ln_stats"].append(np.array([mu, sigma, norm]))
        res["heads"].append(heads)
        res["mlps"].append(mlps)
        res["cls_to_cls"].append(tokens[:, 0].sum(1))
        res["tokens"].append(tokens)
        res["attn_cls"].append(np.stack([a[:, 0] for a in tr["attn"]]))
        res["attn_mean"].append(np.stack([a.mean(0) for a in tr["attn"]]))
    out = {k: np.stack(v) for k, v in res.items()}
    if probe is not None:
        out["probe"] = out["tokens"] @ np.asarray(probe, np.float64).T
    return out


# --------------------------------------------------------------------------------------------
# weights and files


def random_weights(cfg: dict, seed: int = 0, text: bool = True) -> Weights:
    """Random float32 weights in open_clip naming, scaled so activations stay O(1).

    Example
    -------
    >>> sd = random_weights(tiny_config(), seed=1)
    >>> sd["visual.proj"].shape
    (32, 24)
    """
    rng = np.random.default_rng(seed)

    def lin(o, i):
        return rng.standard_normal((o, i)) / math.sqrt(i)

    def vec(n, s=0.1):
        return s * rng.standard_normal(n)

    def ln(n):
        return 1.0 + 0.1 * rng.standard_normal(n), 0.1 * rng.standard_normal(n)

    def blocks(prefix, n_layers, w, f):
        for i in range(n_layers):
            n = _block_names(prefix, i)
            sd[n["ln_1.weight"]], sd[n["ln_1.bias"]] = ln(w)
            sd[n["attn.in_proj_weight"]] = lin(3 * w, w)
            sd[n["attn.in_proj_bias"]] = vec(3 * w)
            sd[n["attn.out_proj.weight"]] = lin(w, w)
            sd[n["attn.out_proj.bias"]] = vec(w)
            sd[n["ln_2.weight"]], sd[n["ln_2.bias"]] = ln(w)
            sd[n["mlp.c_fc.weight"]] = lin(f, w)
            sd[n["mlp.c_fc.bias"]] = vec(f)
            sd[n["mlp.c_proj.weight"]] = lin(w, f)
            sd[n["mlp.c_proj.bias"]] = vec(w)

    w, p = cfg["width"], cfg["patch_size"]
    g = cfg["image_size"] // p
    sd: Weights = {}
    sd["visual.class_embedding"] = vec(w, 1.0)
    sd["visual.positional_embedding"] = vec((g * g + 1, w), 0.5)
    sd["visual.conv1.weight"] = rng.standard_normal((w, 3, p, p)) / math.sqrt(3 * p * p)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = ln(w)
    blocks("visual.", cfg["layers"], w, cfg["mlp_dim"])
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = ln(w)
    sd["visual.proj"] = rng.standard_normal((w, cfg["embed_dim"])) / math.sqrt(w)
    if text and cfg.get("text_layers", 0) > 0:
        wt = cfg["text_width"]
        sd["token_embedding.weight"] = vec((cfg["vocab_size"], wt), 1.0)
        sd["positional_embedding"] = vec((cfg["context_length"], wt), 0.5)
        blocks("", cfg["text_layers"], wt, cfg["text_mlp_dim"])
        sd["ln_final.weight"], sd["ln_final.bias"] = ln(wt)
        sd["text_projection"] = rng.standard_normal((wt, cfg["embed_dim"])) / math.sqrt(wt)
        sd["logit_scale"] = np.array(math.log(1 / 0.07))
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


_HF_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_HF_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def to_hf(sd: Weights, prefix: str = "") -> Weights:
    """open_clip names -> HF transformers CLIPModel names (q/k/v split, projections (out, in)).

    Example
    -------
    >>> hf = to_hf(random_weights(tiny_config()))
    >>> hf["visual_projection.weight"].shape
    (24, 32)
    """
    out: Weights = {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[prefix + _HF_TOP[k]] = v
        elif k == "visual.proj":
            out[prefix + "visual_projection.weight"] = np.ascontiguousarray(v.T)
        elif k == "text_projection":
            out[prefix + "text_projection.weight"] = np.ascontiguousarray(v.T)
        elif ".resblocks." in k:
            tower = "vision_model" if k.startswith("visual.") else "text_model"
            rest = k.split(".resblocks.", 1)[1]
            i, leaf = rest.split(".", 1)
            base = f"{prefix}{tower}.encoder.layers.{i}."
            if leaf.startswith("attn.in_proj_"):
                kind = "weight" if leaf.endswith("weight") else "bias"
                for j, name in enumerate("qkv"):
                    part = v[j * (v.shape[0] // 3):(j + 1) * (v.shape[0] // 3)]
                    out[f"{base}self_attn.{name}_proj.{kind}"] = np.ascontiguousarray(part)
            else:
                mod, kind = leaf.rsplit(".", 1)
                out[base + _HF_BLOCK[mod] + "." + kind] = v
        else:
            raise KeyError(k)
    return out


def from_hf(hf: Weights, prefix: str = "") -> Weights:
    """HF transformers names -> open_clip names (inverse of :func:`to_hf`)."""
    inv_top = {v: k for k, v in _HF_TOP.items()}
    inv_blk = {v: k for k, v in _HF_BLOCK.items()}
    out: Weights = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for k, v in hf.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k in inv_top:
            out[inv_top[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = np.ascontiguousarray(v.T)
        elif k == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(v.T)
        elif ".encoder.layers." in k:
            tower, rest = k.split(".encoder.layers.", 1)
            i, leaf = rest.split(".", 1)
            base = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            mod, kind = leaf.rsplit(".", 1)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(base + "attn.in_proj_" + kind, {})[mod[10]] = v
            else:
                out[base + inv_blk[mod] + "." + kind] = v
    for k, parts in qkv.items():
        out[k] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN kept quiet)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.reshape(np.shape(x))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values ``x`` takes after a round trip through ``dtype`` (F32, F16, BF16)."""
    x = np.asarray(x, np.float32)
    if dtype == "F32":
        return x.copy()
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        bits = np.asarray(_bf16_bits(x).astype(np.uint32) << 16, np.uint32)
        return bits.view(np.float32).reshape(x.shape)
    raise ValueError(dtype)


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "F32",
                      metadata: dict | None = None, align: int = 8,
                      raw: dict[str, tuple] | None = None, extra_pad: int = 0) -> None:
    """Write ``tensors`` (float arrays) as a .safetensors file in ``dtype`` (F32, F16, BF16).

    ``raw`` adds entries ``name -> (dtype_name, shape, bytes)`` stored as given (e.g. an I64
    ``position_ids``). The header is padded with spaces to a multiple of ``align`` bytes, then
    by ``extra_pad`` more (to place the data at an unaligned address on purpose).

    Example
    -------
    >>> write_safetensors("/tmp/x.safetensors", {"a": np.ones((2, 3))}, dtype="BF16")
    """
    entries = []
    for name, v in tensors.items():
        v = np.asarray(v, np.float32)
        if dtype == "F32":
            buf = v.astype("<f4").tobytes()
        elif dtype == "F16":
            buf = v.astype("<f2").tobytes()
        elif dtype == "BF16":
            buf = _bf16_bits(v).astype("<u2").tobytes()
        else:
            raise ValueError(dtype)
        entries.append((name, dtype, list(v.shape), buf))
    for name, (dt, shape, buf) in (raw or {}).items():
        entries.append((name, dt, list(shape), bytes(buf)))
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dt, shape, buf in entries:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(buf)]}
        off += len(buf)
    h = json.dumps(header, separators=(",", ":")).encode()
    if align > 1:
        h += b" " * (-(8 + len(h)) % align)
    h += b" " * extra_pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for *_, buf in entries:
            f.write(buf)


# ---------------------------------------------------------------------------- second moments
U32 = 2.0**-24


def outer_tol(c, rows=512):
    """Largest |error| of sum over rows of x x^T from the C core (csrc/moments.h), for terms
    c [n, D] (float64 copy of the float32 rows) added in chunks of at most ``rows`` rows: the
    float32 dot-product bound of each centred chunk, (rows + 4) u n sd_i sd_j, plus a few float64
    roundings of n (|m_i m_j| + sd_i sd_j). See tests/methods/test_stats.py for the derivation."""
    n = len(c)
    sd, m = c.std(0), np.abs(c.mean(0))
    return (min(rows, n) + 4) * U32 * n * np.outer(sd, sd) + 1e-13 * n * (
        np.outer(m, m) + np.outer(sd, sd)
    )
