"""Small random CLIP checkpoints built with transformers, in both key layouts and three dtypes.

Each :class:`Checkpoint` is a transformers ``CLIPModel`` with a small geometry whose every
parameter has been moved away from its initial value, saved

* with ``save_pretrained`` (transformers layout: ``model.safetensors`` + ``config.json``), and
* converted here, by an independent key mapping, to open_clip's layout
  (``open_clip_model.safetensors`` + ``open_clip_config.json``: fused ``in_proj``, projections
  transposed, ``quick_gelu`` flag only for QuickGELU models, as open_clip writes it),

each in F32, F16 and BF16. The geometries cover a ViT-B/32-like model (patch 32) and a
ViT-B/16-like model (patch 16), QuickGELU and exact GELU, non-default image sizes and an odd head
count (width 60, 5 heads of 12).

Text ids for tests come from :func:`random_text_ids`: start token, ids below it, end token
(the largest id), zero padding, as open_clip's tokenizer lays them out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

#: the geometries: name -> (vision, text, projection_dim)
SPECS = {
    # ViT-B/32-like: patch 32 on a 96-pixel image (grid 3, N = 10), QuickGELU
    "b32_quick": {
        "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "image_size": 96, "patch_size": 32, "hidden_act": "quick_gelu"},
        "text": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "max_position_embeddings": 16, "hidden_act": "quick_gelu"},
        "projection_dim": 48},
    # ViT-B/16-like: patch 16 on a 64-pixel image (grid 4, N = 17), exact GELU, 5 heads of 12,
    # MLP ratio 2.5
    "b16_gelu": {
        "vision": {"hidden_size": 60, "intermediate_size": 150, "num_hidden_layers": 3,
                    "num_attention_heads": 5, "image_size": 64, "patch_size": 16, "hidden_act": "gelu"},
        "text": {"vocab_size": 100, "hidden_size": 40, "intermediate_size": 100, "num_hidden_layers": 2,
                  "num_attention_heads": 5, "max_position_embeddings": 12, "hidden_act": "gelu"},
        "projection_dim": 40},
}
#: geometries built only by the tests that need them: ``b16_d32``, heads of width 32 (the
#: smallest the core's attention on AMX tiles takes)
EXTRA_SPECS = {
    "b16_d32": {
        "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "image_size": 64, "patch_size": 16, "hidden_act": "gelu"},
        "text": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "max_position_embeddings": 12, "hidden_act": "gelu"},
        "projection_dim": 32},
}
DTYPES = ("F32", "F16", "BF16")
_TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Checkpoint:
    """One random model and its files.

    Attributes
    ----------
    name : str
        Key of :data:`SPECS`.
    model : transformers.CLIPModel
        float32, eval mode, eager attention (so it returns attention probabilities).
    dirs : dict
        ``(layout, dtype) -> directory``; layout ``"hf"`` or ``"open_clip"``, dtype in
        :data:`DTYPES`.
    act : str
        ``"quick_gelu"`` or ``"gelu"``.
    """

    name: str
    model: object
    dirs: dict = field(default_factory=dict)
    act: str = ""
    _rounded: dict = field(default_factory=dict, repr=False)

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def file(self, layout: str, dtype: str = "F32") -> str:
        """The weights file of one variant."""
        name = "model.safetensors" if layout == "hf" else "open_clip_model.safetensors"
        return os.path.join(self.dirs[(layout, dtype)], name)

    def rounded_model(self, dtype: str):
        """A float32 copy of the model whose weights went through ``dtype`` and back: what a
        loader of the F16 / BF16 file computes with."""
        if dtype == "F32":
            return self.model
        if dtype not in self._rounded:
            from transformers import CLIPModel

            m = CLIPModel(self.model.config).eval()
            sd = {k: v.to(_TORCH_DTYPE[dtype]).to(torch.float32)
                  for k, v in self.model.state_dict().items()}
            m.load_state_dict(sd)
            self._rounded[dtype] = m
        return self._rounded[dtype]


def _clip_config(spec: dict):
    from transformers import CLIPConfig

    text = dict(spec["text"], bos_token_id=spec["text"]["vocab_size"] - 2,
                eos_token_id=spec["text"]["vocab_size"] - 1, pad_token_id=0)
    cfg = CLIPConfig(text_config=text, vision_config=dict(spec["vision"]),
                     projection_dim=spec["projection_dim"])
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def perturb(model, seed: int) -> None:
    """Move every parameter away from its initial value.

    Matrices get a fresh ``randn / sqrt(fan_in)`` (so activations are O(1) and QuickGELU and GELU
    give visibly different models), vectors ``0.1 * randn`` added (LayerNorm weights
    ``1 + 0.1 * randn``), embeddings ``0.5 * randn``, and ``logit_scale`` a random value.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name == "logit_scale":
            p.copy_(torch.tensor(4.0) + 0.1 * r)
        elif "embedding" in name:           # class / patch / position / token embeddings
            if p.ndim == 4:                 # patch embedding conv [W, 3, P, P]
                p.copy_(r / np.sqrt(p[0].numel()))
            else:
                p.copy_(0.5 * r)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * r)
        elif p.ndim == 2:
            p.copy_(r / np.sqrt(p.shape[1]))
        else:
            p.add_(0.1 * r)


def to_open_clip(hf: dict) -> dict:
    """transformers ``CLIPModel`` state dict -> open_clip ``CLIP`` state dict.

    Written here from the two libraries' module names, independently of clipdecomp:
    ``q/k/v_proj`` are stacked into ``attn.in_proj_{weight,bias}`` ``[3W, W]``, the projections
    (``nn.Linear`` weights ``[D, W]`` in transformers) become ``[W, D]`` matrices.
    """
    out = {}
    blocks = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
              "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    top = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for k, v in hf.items():
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[top[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.T.contiguous()
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif ".encoder.layers." in k:
            tower, rest = k.split(".encoder.layers.")
            i, leaf = rest.split(".", 1)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if ".q_proj." in leaf or ".k_proj." in leaf or ".v_proj." in leaf:
                continue   # stacked below
            mod, kind = leaf.rsplit(".", 1)
            out[prefix + blocks[mod] + "." + kind] = v
        else:
            raise KeyError(f"unexpected transformers key {k}")
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        i = 0
        while f"{tower}.encoder.layers.{i}.self_attn.q_proj.weight" in hf:
            base = f"{tower}.encoder.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                    [hf[base + f"{x}_proj.{kind}"] for x in "qkv"], 0)
            i += 1
    return out


def open_clip_config(spec: dict) -> dict:
    """The ``open_clip_config.json`` open_clip would write for this model."""
    v, t = spec["vision"], spec["text"]
    model_cfg = {
        "embed_dim": spec["projection_dim"],
        "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"],
                       "width": v["hidden_size"], "patch_size": v["patch_size"],
                       "head_width": v["hidden_size"] // v["num_attention_heads"],
                       "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
        "text_cfg": {"context_length": t["max_position_embeddings"],
                     "vocab_size": t["vocab_size"], "width": t["hidden_size"],
                     "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                     "mlp_ratio": t["intermediate_size"] / t["hidden_size"]},
    }
    if v["hidden_act"] == "quick_gelu":
        model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                               "std": [0.26862954, 0.26130258, 0.27577711]}}


def _save(tensors: dict, path: str, dtype: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(_TORCH_DTYPE[dtype]).contiguous() for k, v in tensors.items()},
              path)


def build(name: str, root: str, seed: int = 0) -> Checkpoint:
    """Build checkpoint ``name`` of :data:`SPECS` (or :data:`EXTRA_SPECS`) under ``root``."""
    from transformers import CLIPModel

    spec = {**SPECS, **EXTRA_SPECS}[name]
    torch.manual_seed(seed)
    model = CLIPModel(_clip_config(spec)).eval()
    perturb(model, seed)
    ck = Checkpoint(name, model, act=spec["vision"]["hidden_act"])
    hf_sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    oc_sd = to_open_clip(hf_sd)
    for dtype in DTYPES:
        d_hf = os.path.join(root, f"{name}_hf_{dtype}")
        d_oc = os.path.join(root, f"{name}_open_clip_{dtype}")
        os.makedirs(d_oc, exist_ok=True)
        if dtype == "F32":
            model.save_pretrained(d_hf)            # the real transformers writer
        else:
            os.makedirs(d_hf, exist_ok=True)
            model.config.to_json_file(os.path.join(d_hf, "config.json"))
            _save(hf_sd, os.path.join(d_hf, "model.safetensors"), dtype)
        _save(oc_sd, os.path.join(d_oc, "open_clip_model.safetensors"), dtype)
        with open(os.path.join(d_oc, "open_clip_config.json"), "w") as fh:
            json.dump(open_clip_config(spec), fh, indent=1)
        ck.dirs[("hf", dtype)] = d_hf
        ck.dirs[("open_clip", dtype)] = d_oc
    return ck


def random_text_ids(ck: Checkpoint, n: int, seed: int = 0) -> np.ndarray:
    """int32 ``[n, C]`` ids laid out as open_clip tokenizes: start, words, end, zeros.

    Start / end are ``V - 2`` / ``V - 1``, so the end token holds the largest id of its row (and
    is the first end token, where transformers reads the feature). Lengths vary from an empty text
    to a row with no padding at all.
    """
    t = ck.text_config
    c, v = t.max_position_embeddings, t.vocab_size
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, c), dtype=np.int32)
    for i in range(n):
        k = [0, c - 2][i] if i < 2 else int(rng.integers(1, c - 2))
        row = [v - 2] + list(rng.integers(1, v - 2, size=k)) + [v - 1]
        ids[i, :len(row)] = row
    return ids


def random_pixels(ck: Checkpoint, n: int, seed: int = 0) -> np.ndarray:
    """float32 ``[n, 3, S, S]`` preprocessed-looking pixels (standard normal)."""
    rng = np.random.default_rng(seed)
    s = ck.image_size
    return rng.standard_normal((n, 3, s, s)).astype(np.float32)


def image_features(model, pixels: np.ndarray) -> np.ndarray:
    """transformers' ``get_image_features`` as float64 NumPy ``[B, D]``."""
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    out = getattr(out, "pooler_output", out)
    return out.double().numpy()


def text_features(model, ids: np.ndarray) -> np.ndarray:
    """transformers' ``get_text_features`` as float64 NumPy ``[T, D]``."""
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    out = getattr(out, "pooler_output", out)
    return out.double().numpy()
