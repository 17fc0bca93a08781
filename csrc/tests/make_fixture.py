"""Write the fixture of the C test program: tiny random CLIP checkpoints and expected outputs.

Usage: python csrc/tests/make_fixture.py OUT_DIR   (NumPy only)

OUT_DIR receives
  model_oc_f32.safetensors    open_clip layout, F32 (GELU vision, QuickGELU text)
  model_oc_f32_odd.safetensors  the same with its data at an odd address (copied, not mapped)
  model_hf_f16.safetensors    HF transformers layout, F16, with an I64 position_ids buffer
  model_oc_bf16.safetensors   open_clip layout, BF16, header not 4-byte aligned
  model_hf_vision.safetensors HF layout, image tower only, keys under a "model." prefix
  meta.txt                    the config and the sizes, "key value" per line
  <name>.bin                  little-endian arrays: images, ids (int32), probe, and the
                              expected embedding, ln_stats, heads, mlps, cls_to_cls, tokens,
                              probe_out, attn_cls, attn_mean, text
The weights are rounded to values exact in F32, F16 and BF16, so one set of expected outputs
(from the float64 NumPy oracle, tests/oracle.py) serves every file.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import oracle


def exact_in_all(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and flush magnitudes below F16's normal range to zero."""
    y = oracle.round_to(x, "BF16")
    return np.where(np.abs(y) < 2.0 ** -14, np.float32(0), y).astype(np.float32)


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    cfg = oracle.tiny_config()
    sd = {k: exact_in_all(v) for k, v in oracle.random_weights(cfg, seed=7).items()}
    rng = np.random.default_rng(11)
    B, T, n_probe = 3, 4, 5
    S, C, V = cfg["image_size"], cfg["context_length"], cfg["vocab_size"]
    images = rng.standard_normal((B, 3, S, S)).astype(np.float32)
    ids = rng.integers(1, V - 1, size=(T, C)).astype(np.int32)
    for t in range(T):  # an end-of-text token (the largest id) at varying positions
        ids[t, 2 + t:] = 0
        ids[t, 1 + t] = V - 1
    probe = rng.standard_normal((n_probe, cfg["embed_dim"])).astype(np.float32)

    oracle.write_safetensors(os.path.join(out, "model_oc_f32.safetensors"), sd, "F32",
                             metadata={"format": "pt"})
    oracle.write_safetensors(os.path.join(out, "model_oc_f32_odd.safetensors"), sd, "F32",
                             extra_pad=1)
    hf = oracle.to_hf(sd)
    pos_ids = np.arange(C, dtype="<i8")[None]
    oracle.write_safetensors(os.path.join(out, "model_hf_f16.safetensors"), hf, "F16",
                             raw={"text_model.embeddings.position_ids":
                                  ("I64", pos_ids.shape, pos_ids.tobytes())})
    oracle.write_safetensors(os.path.join(out, "model_oc_bf16.safetensors"), sd, "BF16", align=1,
                             metadata={"note": "odd \"header\" \\u00e9 padding"})
    vis = {"model." + k: v for k, v in oracle.to_hf(sd).items()
           if k.startswith(("vision_model.", "visual_projection."))}
    oracle.write_safetensors(os.path.join(out, "model_hf_vision.safetensors"), vis, "F32")

    ref = oracle.decompose(sd, cfg, images, probe=probe)
    text = oracle.encode_text(sd, cfg, ids)
    arrays = {
        "images": images, "ids": ids, "probe": probe, "embedding": ref["embedding"],
        "ln_stats": ref["ln_stats"], "heads": ref["heads"], "mlps": ref["mlps"],
        "cls_to_cls": ref["cls_to_cls"], "tokens": ref["tokens"], "probe_out": ref["probe"],
        "attn_cls": ref["attn_cls"], "attn_mean": ref["attn_mean"], "text": text,
    }
    for name, a in arrays.items():
        dt = "<i4" if a.dtype.kind == "i" else "<f4"
        a.astype(dt).tofile(os.path.join(out, name + ".bin"))
    meta = dict(cfg)
    meta["act"] = 0 if cfg["act"] == "gelu" else 1
    meta["text_act"] = 0 if cfg["text_act"] == "gelu" else 1
    meta.update(B=B, T=T, n_probe=n_probe, logit_scale=float(sd["logit_scale"]))
    with open(os.path.join(out, "meta.txt"), "w") as f:
        f.writelines(f"{k} {v}\n" for k, v in meta.items())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_fixture.py OUT_DIR")
    main(sys.argv[1])
