"""Train the small CLIP shipped with clipdecomp on the shapes world (needs torch).

The model follows the open_clip architecture (pre-norm ViT with class token, causal text
transformer read at the end-of-text token) and is exported in open_clip's key layout as F16
safetensors, so clipdecomp loads it like any other open_clip checkpoint.

Run::

    python -m clipdecomp.toy.train --out /tmp/toy_run --seed 0 --minutes 50

What makes shapes hard to learn here (measured on 2 CPU cores): a ViT with 8-pixel patches
finds the shape of a small object on a textured ground very slowly (trained on shape labels
directly, 16% after 400 steps of 64 scenes, chance 12.5%; on flat grey grounds 56%; see
``benchmarks/shape_learning.py``), and once a contrastive run has settled on colours and
grounds, its text tower maps captions that differ only in the shape word to nearly the same
point, so the images get no pull towards shapes. ``--flat-frac`` / ``--ramp-frac`` (a
background curriculum) and ``--init MODEL_DIR --fresh-text`` (keep the vision tower, restart
the text tower) address each; they need far more steps than an hour of 2 CPU cores gives.

Shapes: B images, N = 65 tokens, W width, D = 128 embedding dim, T texts, C = 20 context.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdecomp.toy import world

PAD, UNK, SOT, EOT = "[PAD]", "[UNK]", "<start_of_text>", "<end_of_text>"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

MODEL_CFG = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "patch_size": 8,
                   "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": None, "width": 128, "heads": 4,
                 "layers": 4, "mlp_ratio": 4.0},
}


# ---------------------------------------------------------------------------------------------
# Tokenizer

def build_tokenizer():
    """A word-level tokenizer over the shapes-world vocabulary.

    Ids: 0 = pad, 1 = unknown, words, then start-of-text (V - 2) and end-of-text (V - 1), so
    the end-of-text token is the largest id (CLIP reads the text feature at ``argmax(ids)``).

    Returns
    -------
    tokenizers.Tokenizer

    Examples
    --------
    >>> tok = build_tokenizer()
    >>> ids = tok.encode("a red star").ids
    >>> ids[-1] == tok.get_vocab_size() - 1
    True
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = world.vocabulary()
    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab[w] = len(vocab)
    vocab[SOT] = len(vocab)
    vocab[EOT] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    return tok


def tokenize(tok, texts: list[str], context_length: int = 20) -> np.ndarray:
    """Encode texts with start/end tokens, truncate keeping end-of-text last, pad with 0.

    Returns
    -------
    int64 [T, C]
    """
    eot = tok.get_vocab_size() - 1
    out = np.zeros((len(texts), context_length), np.int64)
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        ids = enc.ids
        if len(ids) > context_length:
            ids = ids[: context_length - 1] + [eot]
        out[i, : len(ids)] = ids
    return out


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, 64, 64, 3] -> float32 [B, 3, 64, 64], normalised with MEAN / STD."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Model (parameter names follow open_clip)

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

        self.keep_cls = False
        self.cls_heads: torch.Tensor | None = None
        self.cls_probs: torch.Tensor | None = None  # the class token's attention row [B, H, N]
        self.values: torch.Tensor | None = None  # [B, H, N, d]

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if self.keep_cls:  # each head's output at the class token, [B, H, d]
            self.cls_heads = o[:, :, 0]
            scores = (q[:, :, :1] @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
            self.cls_probs, self.values = scores.softmax(-1)[:, :, 0], v
        return self.out_proj(o.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, causal)
        return x


class Visual(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, head_width, mlp_ratio, embed_dim):
        super().__init__()
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor, heads: list[tuple[int, int]] | None = None,
                token_weights: torch.Tensor | None = None,
                directions: torch.Tensor | None = None):
        """Image embeddings [B, D]; with ``heads`` (layer, head) pairs also each head's direct
        term in the embedding, [B, len(heads), D]: the decomposition's head term summed over
        tokens, in its default (the reference's) convention, times the embedding's norm (the
        head's out-projected class-token output plus its share of the out-projection's bias,
        through ``ln_post`` linearised at the image's own final norm, and ``proj``).

        With ``token_weights`` (float [B, len(heads), G*G]) a third result: each head's
        per-patch terms (the decomposition's (token, head) terms, which heat maps and
        segmentation read, times the embedding's norm) summed with those weights,
        [B, len(heads), D]: the part of the head's term that comes from the object's patches,
        say.

        With ``directions`` (float [B, D], one per image) a last result, the image's heat map
        along its direction, [B, G*G]: every head's (token, head) terms of the patches, summed
        over layers and heads, dotted with the direction (as ``clipdecomp``'s ``heatmap``
        computes it, less a constant per image and the factor 1 / std of ``ln_post``)."""
        layers = sorted({layer for layer, _ in heads or []})
        if directions is not None:
            layers = list(range(len(self.transformer.resblocks)))
        for layer in layers:
            self.transformer.resblocks[layer].attn.keep_cls = True
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, G*G, W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        emb = self.ln_post(x[:, 0]) @ self.proj
        maps = None
        if directions is not None:
            u = (directions.float() @ self.proj.float().T) * self.ln_post.weight.float()  # [B, W]
            maps = 0.0
            for blk in self.transformer.resblocks:
                attn = blk.attn
                d = attn.out_proj.weight.shape[1] // attn.heads
                g = (u @ attn.out_proj.weight.float()).view(-1, attn.heads, d)  # [B, H, d]
                vg = (attn.values[:, :, 1:].float() @ g.unsqueeze(-1))[..., 0]  # [B, H, G*G]
                maps = maps + (attn.cls_probs[:, :, 1:] * vg).sum(1)
        if not heads:
            for layer in layers:
                attn = self.transformer.resblocks[layer].attn
                attn.keep_cls, attn.cls_heads, attn.cls_probs, attn.values = False, None, None, None
            return emb if maps is None else (emb, maps)
        r = x[:, 0].float()
        mu = r.mean(-1, keepdim=True)
        std = (r.var(-1, unbiased=False, keepdim=True) + self.ln_post.eps).sqrt()  # [B, 1]
        kh = (2 * len(self.transformer.resblocks) + 1) * self.transformer.resblocks[0].attn.heads
        knh = kh * x.shape[1]  # (token, head) terms share the mean and beta K * N * H ways
        terms, masked = [], []
        for i, (layer, h) in enumerate(heads):
            attn = self.transformer.resblocks[layer].attn
            d = attn.out_proj.weight.shape[1] // attn.heads
            w_o = attn.out_proj.weight[:, h * d:(h + 1) * d].float()  # [W, d]
            o = attn.cls_heads[:, h].float()  # [B, d]
            c = o @ w_o.T + attn.out_proj.bias.float() / attn.heads  # [B, W]
            # the reference's convention (docs/decomposition.md): a share of the total mean and
            # of beta for each of the K * H head terms
            c = (c - mu / kh) / std * self.ln_post.weight.float() + self.ln_post.bias.float() / kh
            terms.append(c @ self.proj.float())
            if token_weights is not None:
                wt = token_weights[:, i]  # [B, G*G]
                a = attn.cls_probs[:, h, 1:] * wt
                m = (a.unsqueeze(1) @ attn.values[:, h, 1:].float())[:, 0] @ w_o.T \
                    + attn.out_proj.bias.float() * wt.sum(-1, keepdim=True) / knh * kh \
                    / attn.heads  # [B, W]; b_O spread over the N * H (token, head) terms
                share = wt.sum(-1, keepdim=True) / knh
                m = (m - mu * share) / std * self.ln_post.weight.float() \
                    + self.ln_post.bias.float() * share
                masked.append(m @ self.proj.float())
        for layer in layers:
            attn = self.transformer.resblocks[layer].attn
            attn.keep_cls, attn.cls_heads, attn.cls_probs, attn.values = False, None, None, None
        out = (emb, torch.stack(terms, 1))
        if token_weights is not None:
            out += (torch.stack(masked, 1),)
        return out if maps is None else out + (maps,)


class CLIP(nn.Module):
    """open_clip-style CLIP: ``encode_image`` [B, 3, 64, 64] -> [B, D], ``encode_text``
    int [T, C] -> [T, D] (both unnormalised)."""

    def __init__(self, vocab_size: int, cfg: dict = MODEL_CFG):
        super().__init__()
        self.cfg = json.loads(json.dumps(cfg))
        v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
        self.visual = Visual(v["image_size"], v["patch_size"], v["width"], v["layers"],
                             v["head_width"], v["mlp_ratio"], d)
        w = t["width"]
        self.token_embedding = nn.Embedding(vocab_size, w)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(t["context_length"], w))
        self.transformer = Transformer(w, t["layers"], t["heads"], t["mlp_ratio"])
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(w**-0.5 * torch.randn(w, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, x: torch.Tensor, heads: list[tuple[int, int]] | None = None,
                     token_weights: torch.Tensor | None = None,
                     directions: torch.Tensor | None = None):
        return self.visual(x, heads, token_weights, directions)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(ids.shape[0]), ids.argmax(-1)]
        return x @ self.text_projection


# ---------------------------------------------------------------------------------------------
# Export

def export(model: CLIP, tokenizer, out_dir: str | os.PathLike, info: dict | None = None) -> Path:
    """Write the model as an open_clip-layout F16 checkpoint folder.

    Files: ``open_clip_model.safetensors``, ``open_clip_config.json``, ``tokenizer.json`` and
    (if ``info`` is given) ``training_info.json``.

    Parameters
    ----------
    model : CLIP
    tokenizer : tokenizers.Tokenizer
    out_dir : folder, created if needed
    info : optional dict written as training_info.json

    Returns
    -------
    Path of the folder

    Examples
    --------
    >>> tok = build_tokenizer()
    >>> export(CLIP(tok.get_vocab_size()), tok, "/tmp/toy_export")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        tensors[name] = p.detach().cpu().to(torch.float16).numpy().copy()
    tmp = out / "open_clip_model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "open_clip_model.safetensors")
    cfg = json.loads(json.dumps(model.cfg))
    cfg["text_cfg"]["vocab_size"] = tokenizer.get_vocab_size()
    config = {"model_cfg": cfg,
              "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    if info is not None:
        (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def model_config(model_dir: str | os.PathLike | None = None, head_width: int | None = None
                 ) -> dict:
    """The architecture of a toy model: an exported folder's (``open_clip_config.json``) or
    :data:`MODEL_CFG`, with the image tower's ``head_width`` replaced when given.

    Changing ``head_width`` keeps every weight's shape (width 192 in heads of 32 or of 16), so a
    run can start from weights trained with the other head count.
    """
    cfg = json.loads(json.dumps(MODEL_CFG))
    if model_dir is not None and (Path(model_dir) / "open_clip_config.json").exists():
        saved = json.loads((Path(model_dir) / "open_clip_config.json").read_text())["model_cfg"]
        cfg["vision_cfg"].update(saved["vision_cfg"])
    if head_width is not None:
        if cfg["vision_cfg"]["width"] % head_width:
            raise ValueError(f"head_width {head_width} does not divide the width "
                             f"{cfg['vision_cfg']['width']}")
        cfg["vision_cfg"]["head_width"] = head_width
    return cfg


def load_exported(model_dir: str | os.PathLike) -> tuple[CLIP, object]:
    """Load an exported folder back into the torch model (F32), in eval mode.

    Returns
    -------
    (CLIP, tokenizers.Tokenizer)

    Examples
    --------
    >>> from clipdecomp import toy
    >>> model, tok = load_exported(toy.MODEL_DIR)  # doctest: +SKIP
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    d = Path(model_dir)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    model = CLIP(tok.get_vocab_size(), model_config(d))
    w = load_file(str(d / "open_clip_model.safetensors"))
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in w.items()})
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# Zero-shot evaluation

def eval_sets(seed: int = 12345, n: int = 512, style: str = "smooth") -> dict:
    """Held-out scenes for the zero-shot check: single objects, and 1-3 objects for counts."""
    single = world.generate(n, seed=seed, n_objects=1, style=style)
    multi = world.generate(n, seed=seed + 1, n_objects=(1, 3), style=style)
    spur = world.spurious_split(n // 2, seed=seed + 2, train=False, style=style)
    return {"single": single, "multi": multi, "spurious": spur}


@torch.no_grad()
def zero_shot(model: CLIP, tok, sets: dict, batch: int = 256) -> dict[str, float]:
    """Zero-shot accuracy per attribute (prompt-ensembled class embeddings)."""
    model.eval()
    feats = {}
    for k, b in sets.items():
        if k == "spurious":
            continue
        fs = [model.encode_image(to_pixels(b.images[i : i + batch]))
              for i in range(0, len(b), batch)]
        feats[k] = F.normalize(torch.cat(fs), dim=-1)
    acc = {}
    for attr in world.ATTRIBUTES:
        names, texts = world.prompts(attr)
        flat = [t for ts in texts for t in ts]
        e = F.normalize(model.encode_text(torch.from_numpy(tokenize(tok, flat))), dim=-1)
        e = F.normalize(e.view(len(names), -1, e.shape[-1]).mean(1), dim=-1)
        if attr == "count":
            b, f = sets["multi"], feats["multi"]
            truth = b.labels["n_objects"] - 1
        elif attr == "background":
            b, f = sets["single"], feats["single"]
            truth = b.labels["background"]
        else:
            b, f = sets["single"], feats["single"]
            truth = b.labels[attr][:, 0]
        pred = (f @ e.T).argmax(-1).numpy()
        acc[attr] = float((pred == truth).mean())
    model.train()
    return acc


@torch.no_grad()
def spurious_groups(model: CLIP, tok, test: Any, batch: int = 256) -> list[float]:
    """Zero-shot accuracy of the spurious split's class names per group (the balanced test
    split; groups in :func:`clipdecomp.toy.world.spurious_split`'s order)."""
    model.eval()
    f = F.normalize(torch.cat([model.encode_image(to_pixels(test.images[i : i + batch]))
                               for i in range(0, len(test), batch)]), dim=-1)
    names = [world.SPURIOUS_NAMES[c] for c in ("circle", "square")]
    flat = [t.format(c) for c in names for t in world.TEMPLATES["shape"]]
    e = F.normalize(model.encode_text(torch.from_numpy(tokenize(tok, flat))), dim=-1)
    e = F.normalize(e.view(len(names), -1, e.shape[-1]).mean(1), dim=-1)
    right = ((f @ e.T).argmax(-1).numpy() == test.labels["y"])
    model.train()
    return [float(right[test.labels["group"] == g].mean()) for g in range(4)]


def remap_vocabulary(state: dict[str, torch.Tensor], old_tok, new_tok, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """A state dict's token embedding moved from one tokenizer's ids to another's, word by word.

    Words both vocabularies hold keep their rows; new words get fresh rows (normal, std 0.02, as
    at initialisation). Lets a continuation phase start from weights trained before the world
    gained a word.
    """
    old, new = old_tok.get_vocab(), new_tok.get_vocab()
    w = state["token_embedding.weight"]
    if old == new:
        return state
    g = torch.Generator().manual_seed(seed)
    out = 0.02 * torch.randn(len(new), w.shape[1], generator=g, dtype=w.dtype)
    for word, i in new.items():
        if word in old:
            out[i] = w[old[word]]
    return {**state, "token_embedding.weight": out}


# ---------------------------------------------------------------------------------------------
# Training

#: Prompt forms of the attribute loss (see :func:`attribute_loss`). They differ from the
#: zero-shot templates of :data:`clipdecomp.toy.TEMPLATES`, which the evaluation uses.
ATTRIBUTE_FORMS: dict[str, list[str]] = {
    "shape": ["a {}", "an image of a {}", "a drawing of a {}"],
    "color": ["a {} thing", "an image of something {}"],
    "size": ["a {} thing", "an image of a {} shape"],
    "position": ["a thing at the {}", "an image with a shape at the {}"],
    "background": ["{}", "an image of {}"],
    "count": ["{} things", "an image of {} shapes"],
}


def attribute_prompts() -> tuple[list[str], list[tuple[str, int, int]]]:
    """Every prompt of the attribute loss, and for each (attribute, class, n_forms) slices.

    Returns
    -------
    texts : list of P str (attribute by attribute, class by class, form by form)
    index : list of (attribute, n_classes, n_forms), in the order of ``texts``
    """
    texts, index = [], []
    for attr, forms in ATTRIBUTE_FORMS.items():
        names = world.ATTRIBUTES[attr]
        texts += [f.format(c) for c in names for f in forms]
        index.append((attr, len(names), len(forms)))
    return texts, index


def attribute_targets(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class index per image and attribute, -1 where the attribute is not defined.

    Shape, colour, size and position are defined for scenes of one object, background and
    count for every scene.

    Returns
    -------
    dict attribute -> int64 [B]
    """
    single = labels["n_objects"] == 1
    out = {a: np.where(single, labels[a][:, 0], -1) for a in ("shape", "color", "size", "position")}
    out["background"] = labels["background"]
    out["count"] = labels["n_objects"] - 1
    return out


def attribute_loss(img: torch.Tensor, prompt_emb: torch.Tensor, index: list, targets: dict,
                   scale: torch.Tensor, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Zero-shot classification loss of every attribute, averaged over attributes.

    Each class is the normalised mean of its prompts' unit text embeddings, and each image is
    classified against the classes of one attribute with the model's own logit scale: the same
    computation as a zero-shot evaluation, so that it pulls image and text tower together on
    each attribute from the first step (contrastive training alone lets the text tower merge
    captions that differ only in the shape or position word while the images cannot yet tell
    them apart; see benchmarks/SHAPE_LEARNING.md).

    Parameters
    ----------
    img : float [B, D] unit image embeddings
    prompt_emb : float [P, D] unit text embeddings of :func:`attribute_prompts`
    index, targets : from :func:`attribute_prompts` and :func:`attribute_targets`
    scale : the logit scale (exp of the parameter)
    weights : optional weight per attribute name (default 1 each); the average is weighted
    """
    losses, ws = [], []
    for attr, cls in class_embeddings(prompt_emb, index).items():
        t = torch.from_numpy(targets[attr])
        keep = t >= 0
        if keep.any():
            logits = scale * img[keep] @ cls.T
            losses.append(F.cross_entropy(logits, t[keep]))
            ws.append(1.0 if weights is None else weights.get(attr, 1.0))
    w = torch.tensor(ws)
    return (torch.stack(losses) * w).sum() / w.sum()


def class_embeddings(prompt_emb: torch.Tensor, index: list) -> dict[str, torch.Tensor]:
    """Unit class embeddings per attribute, [n_classes, D] each: the normalised mean of each
    class's prompts in :func:`attribute_prompts` order."""
    out, o = {}, 0
    for attr, n_cls, n_forms in index:
        e = prompt_emb[o : o + n_cls * n_forms].view(n_cls, n_forms, -1).mean(1)
        o += n_cls * n_forms
        out[attr] = F.normalize(e, dim=-1)
    return out


def head_attribute_loss(terms: torch.Tensor, prompt_emb: torch.Tensor, index: list,
                        targets: dict, scale: torch.Tensor, attrs: list[str],
                        purity: float = 0.0) -> torch.Tensor:
    """Zero-shot classification loss of single heads' direct terms, each for one attribute.

    Head ``k``'s term (``terms[:, k]``, see :meth:`Visual.forward`), normalised, is classified
    against the classes of ``attrs[k]`` as an image embedding would be: a read-out that pulls
    the direction of that head's contribution towards its attribute's texts.

    Parameters
    ----------
    terms : float [B, K, D] direct terms of K heads
    prompt_emb, index, targets, scale : as in :func:`attribute_loss`
    attrs : K attribute names
    purity : weight of a second term per head: the share of the variance of its terms over the
        batch that lies outside the span of its attribute's (centred) class embeddings, the
        variance TextSpan would explain with texts about other things

    Returns
    -------
    the mean loss over the heads whose attribute is defined for some image of the batch
    """
    cls = class_embeddings(prompt_emb, index)
    losses = []
    for k, attr in enumerate(attrs):
        t = torch.from_numpy(targets[attr])
        keep = t >= 0
        if keep.any():
            logits = scale * F.normalize(terms[keep, k], dim=-1) @ cls[attr].T
            loss = F.cross_entropy(logits, t[keep])
            if purity:
                c = terms[:, k] - terms[:, k].mean(0)
                # the centred classes span n - 1 dimensions: any n - 1 of them
                u, _ = torch.linalg.qr((cls[attr] - cls[attr].mean(0))[:-1].detach().T)
                outside = c - (c @ u) @ u.T
                loss = loss + purity * outside.pow(2).sum() / (c.pow(2).sum() + 1e-12)
            losses.append(loss)
    return torch.stack(losses).mean() if losses else terms.sum() * 0.0


def patch_weights(foreground: np.ndarray, patch: int, attrs: list[str]) -> torch.Tensor:
    """Per head, a weight per patch for :meth:`Visual.forward`'s ``token_weights``: the share of
    the patch's pixels that belong to the objects, or to the ground for "background" heads.

    Parameters
    ----------
    foreground : bool [B, S, S] object pixels
    patch : the tower's patch side (S a multiple of it)
    attrs : the attribute of each of K heads

    Returns
    -------
    float32 [B, K, (S / patch)**2], patches in row-major order as the tower's tokens
    """
    b, s, _ = foreground.shape
    g = s // patch
    frac = foreground.reshape(b, g, patch, g, patch).mean(axis=(2, 4)).reshape(b, g * g)
    w = np.stack([1.0 - frac if a == "background" else frac for a in attrs], 1)
    return torch.from_numpy(w.astype(np.float32))


def segmentation_loss(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One minus the correlation, over each image's patches, between its heat map and a target
    map, averaged over the images. Zero-shot segmentation min-max normalises a map and keeps
    what lies above its mean, so a map that is an affine function of a target segments as the
    target does.

    Parameters
    ----------
    maps : float [B, G*G] (:meth:`Visual.forward` with ``directions``)
    weights : float [B, G*G] target per patch, e.g. from :func:`patch_weights`
    """
    m = maps - maps.mean(-1, keepdim=True)
    w = weights - weights.mean(-1, keepdim=True)
    corr = (m * w).sum(-1) / (m.norm(dim=-1) * w.norm(dim=-1) + 1e-12)
    return (1.0 - corr).mean()


def make_batch(batch: int, seed: int, hard_frac: float = 0.0, focus_frac: float = 0.0,
               style: str = "smooth", spurious_frac: float = 0.0,
               spurious_p_major: float = 0.93, spurious_captions: str = "scene"
               ) -> tuple[np.ndarray, list[str], np.ndarray, dict[str, np.ndarray]]:
    """One training batch: general scenes, plus shares of "hard" and "focus" scenes.

    The hard scenes share one background and draw their colours from 3 of them, so that within
    the batch they differ mostly by shape, position, size and count: contrastive negatives that
    make those attributes pay off. The focus scenes hold one object each, all of one colour on
    one background, so that only shape, position and size tell them apart. Every part is
    balanced over the attributes it varies. The spurious scenes are the training split of
    :func:`clipdecomp.toy.world.spurious_split` (circles mostly on water, squares mostly on
    grass): a correlation in the training data, as web data carries one between waterbirds and
    water, which the spurious-split experiment then finds and removes; ``spurious_p_major`` and
    ``spurious_captions`` are its ``p_major`` and ``captions``.

    Returns
    -------
    images uint8 [B, 64, 64, 3], captions (B str), foreground bool [B, 64, 64], labels (the
    world's label arrays that every part has, concatenated)
    """
    n_hard = round(batch * hard_frac)
    n_focus = round(batch * focus_frac)
    n_spur = round(batch * spurious_frac)
    parts = [world.generate(batch - n_hard - n_focus - n_spur, seed=seed, style=style)]
    if n_hard:
        rng = np.random.default_rng(seed + 2**40)
        bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        cols = [world.COLORS[i] for i in rng.permutation(len(world.COLORS))[:3]]
        parts.append(world.generate(n_hard, seed=seed + 2**41, backgrounds=[bg], colors=cols,
                                    style=style))
    if n_focus:
        rng = np.random.default_rng(seed + 2**42)
        bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        col = world.COLORS[int(rng.integers(len(world.COLORS)))]
        parts.append(world.generate(n_focus, seed=seed + 2**43, n_objects=1, backgrounds=[bg],
                                    colors=[col], style=style))
    if n_spur:
        parts.append(world.spurious_split(n_spur, seed=seed + 2**44, train=True, style=style,
                                          p_major=spurious_p_major, captions=spurious_captions))
    keys = ("n_objects", "background", "shape", "color", "size", "position")
    labels = {k: np.concatenate([p.labels[k] for p in parts]) for k in keys}
    return (np.concatenate([p.images for p in parts]), [c for p in parts for c in p.captions],
            np.concatenate([p.foreground for p in parts]), labels)


def flatten_background(images: np.ndarray, foreground: np.ndarray, texture: float) -> np.ndarray:
    """Fade each image's background texture towards its mean background colour.

    ``texture`` = 1 leaves the images as they are, 0 paints every background pixel with the
    mean colour of that image's background (so water stays blue and brick red, and captions
    stay true). Objects are untouched. Used as a curriculum: a ViT finds the shapes of small
    objects on flat grounds far sooner than on textured ones.

    Parameters
    ----------
    images : uint8 [B, S, S, 3]
    foreground : bool [B, S, S]
    texture : float in [0, 1]

    Returns
    -------
    uint8 [B, S, S, 3] (``images`` itself when ``texture >= 1``)

    Examples
    --------
    >>> b = world.generate(2, seed=0)
    >>> flat = flatten_background(b.images, b.foreground, 0.0)
    >>> bool((flat[b.foreground] == b.images[b.foreground]).all())
    True
    """
    if texture >= 1.0:
        return images
    x = images.astype(np.float32)
    bg = ~foreground[..., None]                                   # [B, S, S, 1]
    n = np.maximum(bg.sum((1, 2)), 1)                             # [B, 1]
    mean = (x * bg).sum((1, 2)) / n                               # [B, 3]
    flat = texture * x + (1.0 - texture) * mean[:, None, None, :]
    out = np.where(bg, flat, x)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def texture_schedule(step: int, total: int, flat_frac: float, ramp_frac: float) -> float:
    """Background texture strength at ``step``: 0 for the first ``flat_frac`` of the
    schedule, then a linear ramp to 1 over the next ``ramp_frac``, then 1.

    Examples
    --------
    >>> [round(texture_schedule(s, 100, 0.3, 0.2), 3) for s in (0, 30, 40, 50, 90)]
    [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    if flat_frac <= 0 and ramp_frac <= 0:
        return 1.0
    t = step / max(1, total)
    if t < flat_frac:
        return 0.0
    if ramp_frac <= 0:
        return 1.0
    return float(min(1.0, (t - flat_frac) / ramp_frac))


def _printer(log):
    """A function that prints a time-stamped line and appends it to the open file ``log``."""
    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def pretrain_vision(out: str, seed: int = 0, steps: int = 1000, batch: int = 64,
                    lr: float = 5e-4, warmup: int = 50, threads: int = 1, bf16: bool = False,
                    style: str = "smooth", log_every: int = 100, ckpt_minutes: float = 4.0,
                    max_steps: int | None = None, resume: bool = False, n_test: int = 512,
                    init: str | None = None, weights: dict[str, float] | None = None) -> CLIP:
    """Warm-start the image tower: classify shape, colour, size, position and background of
    one-object scenes with a linear head per attribute on the image embedding.

    Contrastive training from scratch lets the text tower merge captions that differ only in
    the shape or position word while the images cannot yet tell them apart, and then the
    images get no pull towards those attributes (benchmarks/SHAPE_LEARNING.md). Supervised
    labels pull on every attribute from the first step. The heads are dropped afterwards;
    ``out/vision/state.pt`` is a whole CLIP state (its text tower as drawn) for
    :func:`train`'s ``init`` with ``fresh_text=True``.

    Batches are ``generate(batch, seed=seed * 1_000_003 + 7919 * s + 2**45, n_objects=1)``;
    resumable from ``out/vision/resume.pt`` like :func:`train`. Logs held-out accuracy of the
    heads (``n_test`` scenes) every ``log_every`` steps. ``init`` continues from an earlier
    warm-start's ``resume.pt`` (weights and heads; a new optimiser and schedule), and
    ``weights`` weighs the attributes' losses (default 1 each; the sum is divided by their
    total).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    outp = Path(out) / "vision"
    outp.mkdir(parents=True, exist_ok=True)
    log = open(outp / "train.log", "a")  # noqa: SIM115 (closed at the end; lines flushed)
    say = _printer(log)

    tok = build_tokenizer()
    model = CLIP(tok.get_vocab_size())
    attrs = ("shape", "color", "size", "position", "background")
    dim = model.visual.proj.shape[1]
    heads = nn.ModuleDict({a: nn.Linear(dim, len(world.ATTRIBUTES[a])) for a in attrs})
    params = list(model.visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    test = world.generate(n_test, seed=4242, n_objects=1, style=style)
    step, t0, last = 0, time.time(), time.time()
    w = {a: 1.0 for a in attrs} if weights is None else {a: float(weights.get(a, 0.0))
                                                          for a in attrs}
    args = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup,
            "style": style, "init": init, "weights": w}
    if init is not None:
        r = torch.load(init, map_location="cpu")
        model.load_state_dict(r["model"])
        heads.load_state_dict(r["heads"])
    if resume and (outp / "resume.pt").exists():
        r = torch.load(outp / "resume.pt", map_location="cpu")
        if r["args"] != args:
            raise ValueError(f"cannot resume {outp}: arguments differ: {r['args']} vs {args}")
        model.load_state_dict(r["model"])
        heads.load_state_dict(r["heads"])
        opt.load_state_dict(r["opt"])
        step = r["step"]
        say(f"resumed at step {step}/{steps}")

    def labels_of(b) -> dict[str, torch.Tensor]:
        out = {a: torch.from_numpy(b.labels[a][:, 0]) for a in attrs if a != "background"}
        out["background"] = torch.from_numpy(b.labels["background"])
        return out

    def save() -> None:
        torch.save(model.state_dict(), outp / "state.pt")
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(),
                    "opt": opt.state_dict(), "step": step, "args": args}, outp / "resume.tmp")
        os.replace(outp / "resume.tmp", outp / "resume.pt")

    stop = min(steps, max_steps) if max_steps is not None else steps
    while step < stop:
        cur = lr * (step + 1) / warmup if step < warmup else \
            0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = cur
        b = world.generate(batch, seed=seed * 1_000_003 + 7919 * step + 2**45, n_objects=1,
                           style=style)
        y = labels_of(b)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            e = model.encode_image(to_pixels(b.images)).float()
            loss = sum(w[a] * F.cross_entropy(heads[a](e).float(), y[a]) for a in attrs
                       if w[a]) / sum(w.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == stop:
            with torch.no_grad():
                e = torch.cat([model.encode_image(to_pixels(test.images[i : i + 256]))
                               for i in range(0, len(test), 256)])
                yt = labels_of(test)
                accs = {a: float((heads[a](e).argmax(1) == yt[a]).float().mean()) for a in attrs}
            say(f"step {step}/{steps} lr={cur:.2e} loss={loss.item():.4f} "
                + " ".join(f"{a}={v:.3f}" for a, v in accs.items())
                + f" ({(time.time() - t0) / 60:.1f} min)")
        if time.time() - last > ckpt_minutes * 60:
            save()
            last = time.time()
    save()
    log.close()
    return model


def _score(acc: dict[str, float]) -> float:
    """What "best" means for a checkpoint: the mean zero-shot accuracy plus the lowest one."""
    v = list(acc.values())
    return float(np.mean(v) + min(v))


def train(out: str, seed: int = 0, minutes: float = 50.0, steps: int | None = None,
          batch: int = 128, lr: float = 1e-3, log_every: int = 100, ckpt_minutes: float = 4.0,
          threads: int = 1, max_steps: int | None = None, warmup: int = 50,
          init: str | None = None, hard_frac: float = 0.0, focus_frac: float = 0.0,
          flat_frac: float = 0.0, ramp_frac: float = 0.0, fresh_text: bool = False,
          style: str = "smooth", attr_weight: float = 0.0, bf16: bool = False,
          resume: bool = False, spurious_frac: float = 0.0,
          attr_weights: dict[str, float] | None = None, spurious_p_major: float = 0.93,
          spurious_captions: str = "scene", head_width: int | None = None,
          head_attrs: dict[tuple[int, int], str] | None = None, head_weight: float = 1.0,
          head_purity: float = 0.0, head_mask_weight: float = 0.0,
          seg_weight: float = 0.0) -> CLIP:
    """Contrastive training on freshly generated (image, caption) pairs.

    The learning rate warms up linearly over ``warmup`` steps, then follows a cosine to 0 at
    step ``steps``. With ``steps=None`` the schedule length is fixed after 10 timed steps so that
    the run fits in ``minutes``. The run stops at ``max_steps`` (default: ``steps``) or at the
    time limit, whichever comes first; checkpoints are exported to ``out`` every
    ``ckpt_minutes``. training_info.json records the command that replays the run step for step
    (``--steps``, ``--max-steps``, ``--warmup``, ``--init``).

    Parameters
    ----------
    out : output folder: train.log, state.pt (torch weights), resume.pt (weights, optimiser
        and step, for ``resume``), model/ (the latest export) and best/ (the export with the
        best held-out zero-shot accuracies so far: mean plus minimum over the attributes)
    seed : seeds torch, NumPy and the data stream (batch ``s`` is
        ``generate(batch, seed=seed * 1_000_003 + 7919 * s + 1)``)
    init : optional state.pt of an earlier run, or an exported model folder (such as
        ``clipdecomp/toy/model``), to start from (a continuation phase)
    hard_frac, focus_frac, spurious_frac : shares of each batch drawn as hard, focus and
        spurious scenes (see :func:`make_batch`)
    spurious_p_major, spurious_captions : how the spurious scenes are drawn and captioned
        (see :func:`make_batch`)
    head_width : width of the image tower's attention heads (default: as ``init`` has it, or
        :data:`MODEL_CFG`'s 32); 16 splits each head of ``init`` in two (see
        :func:`model_config`)
    flat_frac, ramp_frac : background curriculum (see :func:`texture_schedule` and
        :func:`flatten_background`): flat grounds for the first ``flat_frac`` of the schedule,
        full textures after a further ``ramp_frac``
    fresh_text : with ``init``, keep only the vision tower and start the text tower (and the
        logit scale) anew. A text tower trained while the images carried no shape information
        maps "a red circle" and "a red star" to nearly the same point (cosine 0.98), so the
        image side gets no gradient towards shapes; a fresh one tells the words apart.
    style : world style (``clipdecomp.toy.world.STYLES``) of the training and held-out scenes
    attr_weight : weight of :func:`attribute_loss` beside the contrastive loss (0: off)
    attr_weights : weight of each attribute inside :func:`attribute_loss` (default: equal)
    bf16 : run the forward and backward passes under bfloat16 autocast (fast where the CPU
        has AVX512_BF16; the weights and the optimiser stay float32)
    resume : continue the run in ``out`` from its resume.pt, step for step (the data of each
        step depends only on the seed and the step), with the same arguments
    head_attrs : optional (layer, head) -> attribute: those heads of the image tower get a
        read-out of their own (:func:`head_attribute_loss`, weight ``head_weight``), which makes
        them carry that attribute; the rest of the model is left to learn as before;
        ``head_purity`` weighs the share of their variance outside it; ``head_mask_weight``
        weighs a second read-out of the same heads on their terms from the object's patches
        alone (the ground's for "background" heads; :func:`patch_weights`), which makes the
        heads take their attribute from the patches that show it, so their heat maps light
        the object
    seg_weight : weight of :func:`segmentation_loss` on the scenes of one object: each one's
        heat map along its colour's direction (its class embedding less the colours' mean, as
        zero-shot segmentation takes it) against the patches its object covers at least half of

    Returns
    -------
    CLIP (torch)
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    log = open(outp / "train.log", "a")  # noqa: SIM115 (closed at the end; lines flushed)
    say = _printer(log)

    tok = build_tokenizer()
    init_dir = None if init is None else Path(init) if Path(init).is_dir() else \
        Path(init).parent / "model"
    cfg = model_config(init_dir, head_width)
    model = CLIP(tok.get_vocab_size(), cfg)
    previous = None
    if init is not None:
        if Path(init).is_dir():  # an exported folder (F16 weights)
            prev_model, prev_tok = load_exported(init)
            model.load_state_dict(remap_vocabulary(prev_model.state_dict(), prev_tok, tok))
            prev_info = Path(init) / "training_info.json"
        else:  # a state.pt beside its run's model/ export
            prev_dir = Path(init).parent / "model"
            state = torch.load(init, map_location="cpu")
            if (prev_dir / "tokenizer.json").exists():
                from tokenizers import Tokenizer
                state = remap_vocabulary(
                    state, Tokenizer.from_file(str(prev_dir / "tokenizer.json")), tok)
            model.load_state_dict(state)
            prev_info = prev_dir / "training_info.json"
        if prev_info.exists():
            previous = json.loads(prev_info.read_text())
    if init is not None and fresh_text:
        fresh = CLIP(tok.get_vocab_size(), cfg).state_dict()
        model.load_state_dict({k: (v if k.startswith("visual.") else fresh[k])
                               for k, v in model.state_dict().items()})
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sets = eval_sets(style=style)
    n_params = sum(p.numel() for p in model.parameters())
    prompt_texts, prompt_index = attribute_prompts()
    prompt_ids = torch.from_numpy(tokenize(tok, prompt_texts))
    t0 = time.time()
    total = steps if steps is not None else 10**9
    stop = max_steps if max_steps is not None else total
    warm = warmup
    step, last_ckpt, ema, best, elapsed0 = 0, t0, None, None, 0.0
    args = {"seed": seed, "batch": batch, "lr": lr, "warmup": warmup, "hard_frac": hard_frac,
            "focus_frac": focus_frac, "flat_frac": flat_frac, "ramp_frac": ramp_frac,
            "style": style, "attr_weight": attr_weight, "spurious_frac": spurious_frac}
    if spurious_p_major != 0.93 or spurious_captions != "scene":
        args.update(spurious_p_major=spurious_p_major, spurious_captions=spurious_captions)
    if head_width is not None:
        args["head_width"] = head_width
    head_list = sorted(head_attrs or {})
    if head_list:
        args.update(head_attrs=format_head_attrs(head_attrs), head_weight=head_weight,
                    head_purity=head_purity)
        if head_mask_weight:
            args["head_mask_weight"] = head_mask_weight
    if seg_weight:
        args["seg_weight"] = seg_weight
    if attr_weights:
        args["attr_weights"] = dict(attr_weights)
    if resume and (outp / "resume.pt").exists():
        r = torch.load(outp / "resume.pt", map_location="cpu")
        changed = {k: (r["args"].get(k), v) for k, v in args.items() if r["args"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {out}: arguments differ from the run's "
                             f"(saved, given): {changed}")
        model.load_state_dict(r["model"])
        opt.load_state_dict(r["opt"])
        step, ema, best, total = r["step"], r["ema"], r["best"], r["total"]
        stop = max_steps if max_steps is not None else total
        elapsed0, previous = r["elapsed"], r.get("previous", previous)
        say(f"resumed at step {step}/{total}")
    say(f"seed={seed} batch={batch} lr={lr} params={n_params} vocab={tok.get_vocab_size()} "
        f"init={init} style={style} attr_weight={attr_weight} bf16={bf16}")

    def info(acc: dict[str, float] | None = None) -> dict:
        cmd = (f"python -m clipdecomp.toy.train --out OUT --seed {seed} --steps {total} "
               f"--max-steps {step} --warmup {warm} --batch {batch} --lr {lr} --minutes 1e9")
        if init is not None:
            cmd += f" --init {Path(init).name}"
        if hard_frac:
            cmd += f" --hard-frac {hard_frac}"
        if focus_frac:
            cmd += f" --focus-frac {focus_frac}"
        if flat_frac or ramp_frac:
            cmd += f" --flat-frac {flat_frac} --ramp-frac {ramp_frac}"
        if fresh_text:
            cmd += " --fresh-text"
        cmd += f" --style {style}"
        if attr_weight:
            cmd += f" --attr-weight {attr_weight}"
        if attr_weights:
            cmd += " --attr-weights " + ",".join(f"{k}={v}" for k, v in attr_weights.items())
        if spurious_frac:
            cmd += f" --spurious-frac {spurious_frac}"
        if spurious_p_major != 0.93:
            cmd += f" --spurious-p-major {spurious_p_major}"
        if spurious_captions != "scene":
            cmd += f" --spurious-captions {spurious_captions}"
        if head_width is not None:
            cmd += f" --vision-head-width {head_width}"
        if head_list:
            cmd += f" --head-attrs {format_head_attrs(head_attrs)} --head-weight {head_weight}"
            if head_purity:
                cmd += f" --head-purity {head_purity}"
            if head_mask_weight:
                cmd += f" --head-mask-weight {head_mask_weight}"
        if seg_weight:
            cmd += f" --seg-weight {seg_weight}"
        if bf16:
            cmd += " --bf16"
        d = {"seed": seed, "steps": step, "hard_frac": hard_frac, "focus_frac": focus_frac,
             "flat_frac": flat_frac, "ramp_frac": ramp_frac, "fresh_text": fresh_text,
             "style": style, "attr_weight": attr_weight, "bf16": bf16,
             "spurious_frac": spurious_frac, "attr_weights": attr_weights,
             "spurious_p_major": spurious_p_major, "spurious_captions": spurious_captions,
             "vision_head_width": cfg["vision_cfg"]["head_width"],
             "head_attrs": format_head_attrs(head_attrs) if head_list else None,
             "head_weight": head_weight if head_list else None,
             "head_purity": head_purity if head_list else None,
             "head_mask_weight": head_mask_weight if head_list else None,
             "seg_weight": seg_weight,
             "schedule_steps": total, "warmup": warm, "batch": batch, "lr": lr,
             "minutes": round((elapsed0 + time.time() - t0) / 60, 2),
             "final_loss": None if ema is None else round(ema, 4),
             "zero_shot": acc if acc is not None else zero_shot(model, tok, sets),
             "command": cmd}
        if previous is not None:
            d["init_from"] = previous
        return d

    def save_resume() -> None:
        torch.save(model.state_dict(), outp / "state.pt")
        tmp = outp / "resume.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "ema": ema, "best": best, "total": total, "args": args,
                    "elapsed": elapsed0 + time.time() - t0, "previous": previous}, tmp)
        os.replace(tmp, outp / "resume.pt")

    while step < min(total, stop):
        if steps is None and step == 10 and total == 10**9:
            per = (time.time() - t0) / 10
            total = max(100, int(minutes * 60 / (per * 1.08)))  # room for evals and exports
            stop = max_steps if max_steps is not None else total
            say(f"{per:.2f} s/step -> total {total} steps, warmup {warm}")
        if time.time() - t0 > minutes * 60:
            say("time limit reached")
            break
        if step < warm:
            cur = lr * (step + 1) / warm
        else:
            cur = 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        for g in opt.param_groups:
            g["lr"] = cur
        images, captions, fg, labels = make_batch(batch, seed * 1_000_003 + 7919 * step + 1,
                                                  hard_frac, focus_frac, style,
                                                  spurious_frac, spurious_p_major,
                                                  spurious_captions)
        texture = texture_schedule(step, total, flat_frac, ramp_frac)
        images = flatten_background(images, fg, texture)
        x = to_pixels(images)
        ids = torch.from_numpy(tokenize(tok, captions))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            single = labels["n_objects"] == 1
            dirs = weights = None
            if seg_weight and single.any():
                # each one-object scene's colour direction, from the text tower (held fixed)
                with torch.no_grad():
                    col = F.normalize(model.encode_text(prompt_ids).float(), dim=-1)
                    col = class_embeddings(col, prompt_index)["color"]
                    dirs = (col - col.mean(0))[torch.from_numpy(np.where(
                        single, labels["color"][:, 0], 0))]
            if head_list and head_mask_weight:
                weights = patch_weights(fg, cfg["vision_cfg"]["patch_size"],
                                        [head_attrs[k] for k in head_list])
            out = model.encode_image(x, head_list or None, weights, dirs)
            if not isinstance(out, tuple):
                out = (out,)
            emb, rest = out[0], list(out[1:])
            terms = rest.pop(0) if head_list else None
            masked = rest.pop(0) if weights is not None else None
            maps = rest.pop(0) if dirs is not None else None
            img = F.normalize(emb.float(), dim=-1)
            n_cap = len(captions)
            if attr_weight or head_list:
                ids = torch.cat([ids, prompt_ids])
            txt_all = F.normalize(model.encode_text(ids).float(), dim=-1)
            txt = txt_all[:n_cap]
            scale = model.logit_scale.exp()
            logits = scale * img @ txt.T
            target = torch.arange(n_cap)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            if attr_weight:
                loss = loss + attr_weight * attribute_loss(
                    img, txt_all[n_cap:], prompt_index, attribute_targets(labels), scale,
                    attr_weights)
            if terms is not None:
                loss = loss + head_weight * head_attribute_loss(
                    terms, txt_all[n_cap:], prompt_index, attribute_targets(labels), scale,
                    [head_attrs[k] for k in head_list], head_purity)
            if maps is not None:
                keep = torch.from_numpy(single)
                # the patches the object covers at least half of: the map that the mean
                # threshold of zero-shot segmentation turns into the best mask (one linear in
                # the covered share scores no better than the maps the model already makes)
                core = patch_weights(fg, cfg["vision_cfg"]["patch_size"], ["shape"])[:, 0] >= 0.5
                loss = loss + seg_weight * segmentation_loss(maps[keep], core[keep].float())
            if masked is not None:
                loss = loss + head_mask_weight * head_attribute_loss(
                    masked, txt_all[n_cap:], prompt_index, attribute_targets(labels), scale,
                    [head_attrs[k] for k in head_list])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        step += 1
        if step % log_every == 0:
            acc = zero_shot(model, tok, sets)
            accs = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
            wg = spurious_groups(model, tok, sets["spurious"])
            say(f"step {step}/{total} lr={cur:.2e} tex={texture:.2f} loss={ema:.4f} "
                f"scale={model.logit_scale.exp().item():.1f} {accs} spurious groups="
                + "/".join(f"{g:.2f}" for g in wg) + " "
                f"({(elapsed0 + time.time() - t0) / 60:.1f} min)")
            if best is None or _score(acc) > best["score"]:
                best = {"step": step, "score": _score(acc), "zero_shot": acc}
                export(model, tok, outp / "best", info(acc))
                say(f"best so far at step {step}")
        if time.time() - last_ckpt > ckpt_minutes * 60:
            save_resume()
            export(model, tok, outp / "model", info())
            last_ckpt = time.time()
            say(f"checkpoint at step {step}")
    final = info()
    save_resume()
    export(model, tok, outp / "model", final)
    say(f"done: {json.dumps(final)}")
    log.close()
    return model


def parse_head_attrs(text: str) -> dict[tuple[int, int], str]:
    """``"4.3=color,5.5=background"`` -> ``{(4, 3): "color", (5, 5): "background"}``."""
    out = {}
    for item in text.split(","):
        key, attr = item.split("=")
        layer, head = key.strip().upper().lstrip("L").split(".")
        if attr not in world.ATTRIBUTES:
            raise ValueError(f"unknown attribute {attr!r}")
        out[(int(layer), int(head.lstrip("H")))] = attr
    return out


def format_head_attrs(head_attrs: dict[tuple[int, int], str]) -> str:
    """The inverse of :func:`parse_head_attrs`."""
    return ",".join(f"{layer}.{head}={a}" for (layer, head), a in sorted(head_attrs.items()))


def main(argv: list[str] | None = None) -> None:
    """``python -m clipdecomp.toy.train ARGS``, the same as ``clipdecomp train-toy ARGS`` (its
    parser lives with every other in :mod:`clipdecomp.cli`)."""
    from clipdecomp.cli import train_toy_main

    raise SystemExit(train_toy_main(argv))


def run_from_args(a: Any) -> None:
    """Run what the parsed ``clipdecomp train-toy`` arguments ``a`` ask for (``a.out`` set
    unless ``a.eval``; ``a.attr_weights`` and ``a.vision_weights`` as dicts or None)."""
    torch.set_num_threads(a.threads)
    if a.eval is not None:
        model, tok = load_exported(a.eval)
        info = Path(a.eval) / "training_info.json"
        style = json.loads(info.read_text()).get("style", "textured") if info.exists() else \
            "textured"
        print(json.dumps(zero_shot(model, tok, eval_sets(seed=2024, n=1024, style=style)),
                         indent=2))
        return
    if a.pretrain_vision:
        pretrain_vision(a.out, a.seed, a.pretrain_vision, a.batch, a.lr, a.warmup, a.threads,
                        a.bf16, a.style, a.log_every, max_steps=a.max_steps, resume=a.resume,
                        init=a.vision_init, weights=a.vision_weights)
        return
    train(a.out, a.seed, a.minutes, a.steps, a.batch, a.lr, a.log_every, threads=a.threads,
          max_steps=a.max_steps, warmup=a.warmup, init=a.init, hard_frac=a.hard_frac,
          focus_frac=a.focus_frac, flat_frac=a.flat_frac, ramp_frac=a.ramp_frac,
          fresh_text=a.fresh_text, style=a.style, attr_weight=a.attr_weight, bf16=a.bf16,
          resume=a.resume, spurious_frac=a.spurious_frac, attr_weights=a.attr_weights,
          spurious_p_major=a.spurious_p_major, spurious_captions=a.spurious_captions,
          head_width=a.vision_head_width, head_attrs=a.head_attrs, head_weight=a.head_weight,
          head_purity=a.head_purity, head_mask_weight=a.head_mask_weight,
          seg_weight=a.seg_weight)


if __name__ == "__main__":
    main()
