"""encode_text of the description pool against PyTorch, batch 256, side by side.

A random-weight transformers ``CLIPModel`` whose text tower has ViT-B/16's geometry (width
512, 12 layers, 8 heads, context 77, vocabulary 49,408; a small vision tower beside it), saved
once; clipdecomp loads it, PyTorch runs ``get_text_features`` on the same token ids (clipdecomp's
tokenizer) in batches of 256 under ``torch.inference_mode`` with the same threads. The first
``--texts`` texts of clipdecomp's pool (about 4,800 in all) are encoded by both sides in
alternation, ``--rounds`` times; the medians are compared. PyTorch runs twice: on the 77-token
rows as open_clip's tokenizer gives them, and on each batch cut to its longest text, which is
what clipdecomp's causal text tower does itself (the end-of-text token never sees what follows
it, so both give the same features): the second ratio is the one of the kernels alone. Usage::

    python benchmarks/bench_text.py [--texts 1024] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import cpu_model


def make_model(root: Path) -> Path:
    """A random-weight CLIPModel with a ViT-B/16-sized text tower, saved under root."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77,
                     "vocab_size": 49408, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
                       "hidden_act": "quick_gelu"},
        projection_dim=512)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    out = root / "text_b16"
    model.save_pretrained(out, safe_serialization=True)
    return out


def run(n_texts: int = 1024, rounds: int = 3, threads: int | None = None,
        batch: int = 256) -> dict:
    """One side-by-side measurement (see the module's description)."""
    import torch
    from transformers import CLIPModel

    import clipdecomp
    from clipdecomp.data.text_pool import load_pool

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    texts = load_pool()[:n_texts]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp))
        ours = clipdecomp.load(str(path), threads=threads)
        ref = CLIPModel.from_pretrained(path).eval()
    ids = ours.tokenize(texts)
    tids = torch.from_numpy(ids.astype(np.int64))

    def run_ours():
        return ours.encode_text(ids, batch_size=batch)

    def features(x):
        out = ref.get_text_features(input_ids=x)
        # (newer transformers return an output object whose pooler_output is the projection)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def run_torch():
        with torch.inference_mode():
            return torch.cat([features(tids[i:i + batch])
                              for i in range(0, len(tids), batch)]).numpy()

    def cut(x):
        return x[:, :int(x.argmax(1).max()) + 1]  # up to the batch's last end-of-text token

    def run_torch_cut():
        with torch.inference_mode():
            return torch.cat([features(cut(tids[i:i + batch]))
                              for i in range(0, len(tids), batch)]).numpy()

    load0 = os.getloadavg()
    a, b, c = run_ours(), run_torch(), run_torch_cut()  # warm-up, and the differences
    t_ours, t_torch, t_cut = [], [], []
    for _ in range(rounds):
        for fn, ts in ((run_ours, t_ours), (run_torch, t_torch), (run_torch_cut, t_cut)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return {"texts": len(texts), "batch": batch, "threads": threads,
            "ours_texts_s": len(texts) / float(np.median(t_ours)),
            "torch_texts_s": len(texts) / float(np.median(t_torch)),
            "speedup": float(np.median(t_torch) / np.median(t_ours)),
            "torch_cut_texts_s": len(texts) / float(np.median(t_cut)),
            "speedup_cut": float(np.median(t_cut) / np.median(t_ours)),
            "max_abs_diff": float(max(np.abs(a - b).max(), np.abs(a - c).max())),
            "load_before": load0, "load_after": os.getloadavg()}


def markdown(r: dict, command: str) -> str:
    return "\n".join([
        f"Command: `{command}`  ",
        (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); load average before "
        f"{tuple(round(x, 2) for x in r['load_before'])}, after "
        f"{tuple(round(x, 2) for x in r['load_after'])}"), "",
        ("| texts | batch | threads | clipdecomp texts/s | PyTorch texts/s (77 tokens) | speedup "
         "| PyTorch texts/s (cut to the longest) | speedup | max abs diff |"),
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {r['texts']} | {r['batch']} | {r['threads']} | {r['ours_texts_s']:.1f} | "
         f"{r['torch_texts_s']:.1f} | {r['speedup']:.2f} | {r['torch_cut_texts_s']:.1f} | "
         f"{r['speedup_cut']:.2f} | {r['max_abs_diff']:.1e} |")])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_text.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    r = run(args.texts, args.rounds, args.threads)
    print(json.dumps(r), flush=True)
    print(markdown(r, command.strip()))


if __name__ == "__main__":
    main()
