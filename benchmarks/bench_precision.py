"""bf16 against fp32: the error of ``precision="bf16"`` on embeddings and on the decomposition.

For each model, the same images go through the model loaded twice, in fp32 and in bf16
(``"bf16"`` where the CPU has AVX512_BF16, else ``"bf16-emulated"``: the same roundings of
weights and activations computed by the float32 kernels, so the same numbers up to the order of
float32 sums). Measured:

* embeddings: cosine similarity to fp32 (min and mean over images), relative L2 error;
* decomposition: the largest absolute difference of a head term / an MLP term (terms are parts of
  the unit-norm embedding), the same relative to the largest term, and how far the bf16 terms
  are from adding up to the bf16 embedding (the decomposition's folds stay float32, so the
  identity holds to bf16 accuracy, not float32's);
* zero-shot (embedded model): agreement of the predicted class with fp32, per attribute;
* time of ``decompose`` in both precisions (ratio > 1: bf16 faster), and weight memory.

Models: the embedded shapes-world model on generated scenes (trained weights, the realistic
case), and random-weight vision towers of ViT-B/32 and B/16 geometry (transformers' init) on
random pixels. Writes a Markdown table to stdout and, with ``--out``, to a file::

    python benchmarks/bench_precision.py --out benchmarks/PRECISION.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import cpu_model, make_model

import clipdecomp


def _load(path, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the emulation notice
        return clipdecomp.load(path, precision=precision) if path else \
            clipdecomp.load(precision=precision)


def _best(fn, reps):
    fn()
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare(name: str, path, pixels: np.ndarray, reps: int) -> tuple[dict, object, object]:
    m32 = _load(path, "fp32")
    m16 = _load(path, "bf16")
    d32 = m32.decompose(pixels)
    d16 = m16.decompose(pixels)
    e32, e16 = d32.embedding.astype(np.float64), d16.embedding.astype(np.float64)
    cos = (e32 * e16).sum(1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)
    rel = np.linalg.norm(e16 - e32, axis=1) / np.linalg.norm(e32, axis=1)
    hd = np.abs(d16.heads.astype(np.float64) - d32.heads).max()
    md = np.abs(d16.mlps.astype(np.float64) - d32.mlps).max()
    top = max(np.abs(d32.heads).max(), np.abs(d32.mlps).max())
    total = d16.heads.sum((1, 2), dtype=np.float64) + d16.mlps.sum(1, dtype=np.float64)
    ident = np.abs(total - e16 / np.linalg.norm(e16, axis=1, keepdims=True)).max()
    t32 = _best(lambda: m32.decompose(pixels), reps)
    t16 = _best(lambda: m16.decompose(pixels), reps)
    row = {
        "model": name, "precision": m16.precision, "images": len(pixels),
        "cos min": f"{cos.min():.6f}", "cos mean": f"{cos.mean():.6f}",
        "emb rel L2": f"{np.median(rel):.1e} (max {rel.max():.1e})",
        "head max abs diff": f"{hd:.1e}", "mlp max abs diff": f"{md:.1e}",
        "diff / largest term": f"{max(hd, md) / top:.1e}",
        "identity residual": f"{ident:.1e}",
        "time fp32 / bf16": f"{t32 / t16:.2f}",
    }
    return row, m32, m16


def zero_shot_agreement(m32, m16, pixels, n: int) -> list[str]:
    from clipdecomp.demo import _classifiers

    out = []
    e32 = m32.encode_image(pixels, normalize=True)
    e16 = m16.encode_image(pixels, normalize=True)
    c32, c16 = _classifiers(m32), _classifiers(m16)
    for attr in ("shape", "color", "background", "count"):
        p32 = (e32 @ c32[attr]).argmax(1)
        p16 = (e16 @ c16[attr]).argmax(1)
        out.append(f"{attr} {np.mean(p32 == p16):.1%}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images for the embedded model")
    ap.add_argument("--random-images", type=int, default=4, help="images for B/32 and B/16")
    ap.add_argument("--models", default="toy,B32,B16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rows, notes = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "toy":
                from clipdecomp.toy import world

                batch = world.generate(args.images, seed=123)
                m = clipdecomp.load()
                px = m.preprocess(batch.images)
                row, m32, m16 = compare("embedded (trained)", None, px, args.reps)
                notes.append("embedded model, zero-shot prediction agreement with fp32: "
                             + ", ".join(zero_shot_agreement(m32, m16, px, args.images)))
            else:
                path = make_model(name, Path(tmp))
                px = rng.standard_normal((args.random_images, 3, 224, 224)).astype(np.float32)
                row, _, _ = compare(f"{name} (random weights)", path, px, args.reps)
            rows.append(row)
            print(row, flush=True)

    cols = list(rows[0])
    lines = [
        "# bf16 against fp32",
        "",
        f"Command: `python benchmarks/bench_precision.py {' '.join(argv or sys.argv[1:])}`  ",
        (f"CPU: {cpu_model()}, ISA path: {clipdecomp._core.isa()}, AVX512_BF16: "
        f"{'yes' if clipdecomp.has_bf16() else 'no (bf16-emulated: same roundings, fp32 kernels)'}"),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
