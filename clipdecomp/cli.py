"""The ``clipdecomp`` command line: every argument parser of the package lives here.

    clipdecomp demo      [--out DIR] [--n-images N]        the main job, on the embedded model
    clipdecomp run       SOURCE --model M --out STORE ...   a whole collection into a Zarr store
    clipdecomp textspan  STORE --pool P --layers -4:        TextSpan head table and its accuracy
    clipdecomp ablate    STORE                              the paper's mean-ablation table
    clipdecomp waterbirds STORE --preset ViT-L-14           Waterbirds head ablation, per group
    clipdecomp report    STORE --pool NAME --out atlas.html  the HTML atlas of a store
    clipdecomp segeval   --data gtsegs_ijcv.mat --model M   the ImageNet-segmentation benchmark
    clipdecomp info      [MODEL] [--precision P]            what a checkpoint holds, the CPU path
    clipdecomp pretrained                                   the known (model, pretrained) names
    clipdecomp train-toy --out DIR ...                      train the embedded model (torch)

Each command is a ``*_main(argv) -> int`` function (the exit status) that parses its arguments
and calls the package's functions; the modules below know nothing of argparse.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdecomp.engine.config import MAX_THREADS, check_size
from clipdecomp.engine.core import PRECISIONS, bf16_kernel, has_bf16, isa
from clipdecomp.engine.loading import list_pretrained, load

ACTS = ("gelu", "quick_gelu")


def _model_arguments(ap: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that name a model, as :func:`clipdecomp.load` takes them."""
    ap.add_argument("--model", required=required, help="checkpoint path or model name")
    ap.add_argument("--pretrained", default=None, help="pretrained tag, as for clipdecomp.load")
    ap.add_argument("--act", default=None, choices=ACTS,
                    help="MLP activation, when the checkpoint does not say")
    ap.add_argument("--threads", type=int, default=None, help="compute threads per process")


# ----------------------------------------------------------------------------------------------
# clipdecomp demo


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp demo``: the paper's analyses on the embedded shapes-world CLIP.

    Examples
    --------
    >>> demo_main(["--out", "demo-out", "--n-images", "64"])   # doctest: +SKIP
    0
    """
    from clipdecomp.demo import __doc__ as demo_doc
    from clipdecomp.demo import run_demo

    ap = argparse.ArgumentParser(prog="clipdecomp demo",
                                 description=(demo_doc or "").split("\n")[0])
    ap.add_argument("--out", default="clipdecomp-demo", help="folder for figures and report")
    ap.add_argument("--n-images", type=int, default=128, help="images per experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="8x the images (the README's numbers)")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    run_demo(args.out, n_images=args.n_images, seed=args.seed, full=args.full,
             figures=not args.no_figures)
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp run


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``clipdecomp run``."""
    from clipdecomp.data.sources import EXTRA_LAYOUTS, LAYOUTS

    p = argparse.ArgumentParser(
        prog="clipdecomp run",
        description="Decompose an image collection into a Zarr store (resumes if it exists).",
    )
    p.add_argument("source", help="image folder, class-per-folder root, or list file")
    p.add_argument("--model", required=True, help="checkpoint path or model name")
    p.add_argument("--out", required=True, help="the Zarr store to write or resume")
    p.add_argument("--pretrained", default=None, help="pretrained tag, as for clipdecomp.load")
    p.add_argument("--act", default=None, choices=ACTS,
                   help="MLP activation, as for clipdecomp.load")
    p.add_argument("--threads", type=int, default=None, help="compute threads per process")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="precision of the model, as for clipdecomp.load")
    p.add_argument("--loader", default=None, metavar="MODULE:FUNCTION",
                   help="load the model with FUNCTION(path, **kwargs) instead of clipdecomp.load")
    p.add_argument("--layout", default="auto", choices=LAYOUTS + EXTRA_LAYOUTS,
                   help="how to read SOURCE (imagenet-val: official validation layout with the "
                   "devkit; cifar10/cifar100: the Python pickles; waterbirds: metadata.csv, "
                   "test split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    p.add_argument("--layers", default=None,
                   help="layers whose heads to keep, e.g. -4: (the last four) or 0,5,11 "
                   "(default all)")
    p.add_argument("--neurons", default=None, metavar="LAYERS",
                   help="also compute the second-order neuron statistics of these MLP layers, "
                   "e.g. 9 or 8,9,10 or -3 (mean, norms, top-k images and principal component "
                   "of every neuron; one more forward pass per image and layer)")
    p.add_argument("--neuron-k", type=int, default=100, metavar="K",
                   help="top images per neuron for --neurons (default 100)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on the Dask cluster of this scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of N worker processes")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--checkpoint-seconds", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--content-hash", action="store_true",
                   help="record a hash of every source file (resume then checks the bytes, "
                   "not only size and modification time)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reference-npy", default=None, metavar="DIR",
                   help="also write the reference's .npy files ({dataset}_attn_{model}.npy, "
                   "_mlp_, _cls_attn_, _labels) into DIR once the store is finished")
    p.add_argument("--npy-dataset", default=None,
                   help="data-set word of the .npy names (default from --layout: imagenet, "
                   "CIFAR10, CIFAR100, binary_waterbirds; else the folder name)")
    p.add_argument("--npy-model", default=None,
                   help="model word of the .npy names (default: --model's base name)")
    return p


def _join_layers(argv: Sequence[str]) -> list[str]:
    """Let ``--layers -4:`` and ``--neurons -3,-2`` through argparse (which reads ``-4:`` as
    an option)."""
    argv = list(argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--layers", "--neurons") and i + 1 < len(argv) \
                and argv[i + 1][:2].lstrip("-")[:1].isdigit():
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def run_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp run SOURCE --model M --out STORE [options]``; returns the exit status.

    Examples
    --------
    >>> run_main(["photos", "--model", "ViT-B-16", "--out", "photos.zarr"])   # doctest: +SKIP
    0
    """
    from clipdecomp.data.runner import run_dataset
    from clipdecomp.data.store import StoreBusyError
    from clipdecomp.engine.loading import ModelSpec

    args = run_parser().parse_args(_join_layers(sys.argv[1:] if argv is None else argv))
    neurons = None
    try:
        if args.threads is not None:
            check_size(args.threads, "--threads", maximum=MAX_THREADS)
        if args.neurons is not None:
            from clipdecomp.methods.neuron_stats import NeuronStatsSpec

            try:
                layers = tuple(int(v) for v in args.neurons.split(","))
            except ValueError:
                raise ValueError(f"--neurons: expected layers such as 9 or 8,9,10, got "
                                 f"{args.neurons!r}") from None
            neurons = NeuronStatsSpec(layers, k=args.neuron_k)
    except ValueError as e:
        print(f"clipdecomp run: error: {e}", file=sys.stderr)
        return 2
    kwargs = {k: v for k, v in (("pretrained", args.pretrained), ("act", args.act),
                                ("threads", args.threads), ("precision", args.precision))
              if v is not None}
    spec = ModelSpec(args.model, kwargs, args.loader)
    try:
        run_dataset(
            spec, args.source, args.out, chunk_size=args.chunk_size, batch_size=args.batch_size,
            dtype=args.dtype, layers=args.layers, progress=not args.no_progress,
            scheduler=args.scheduler, workers=args.workers, layout=args.layout,
            decode_threads=args.decode_threads, checkpoint_seconds=args.checkpoint_seconds,
            overwrite=args.overwrite, content_hash=args.content_hash, neurons=neurons,
        )
        if args.reference_npy:
            from clipdecomp.data.reference import write_reference_npy

            written = write_reference_npy(args.out, args.reference_npy, args.npy_dataset,
                                          args.npy_model)
            if not args.no_progress:
                for path in written.values():
                    print(f"wrote {path}")
    except (ValueError, StoreBusyError) as e:
        print(f"clipdecomp run: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp segeval

_MASK_WORDS = {"squash": "squashed to the input size (reference)",
               "image": "resized and cropped like the images"}


def segeval_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp segeval``: zero-shot segmentation on ImageNet-segmentation.

    Examples
    --------
    ``clipdecomp segeval --data gtsegs_ijcv.mat --model ViT-B-16 --pretrained openai
    --classifier clf_b16.npy --out results.csv``
    """
    from clipdecomp.data.imagenet_seg import (
        TEMPLATE_SETS,
        ImageNetSegmentation,
        evaluate_segmentation,
        segeval_classifier,
    )

    ap = argparse.ArgumentParser(
        prog="clipdecomp segeval",
        description="Zero-shot segmentation on the ImageNet-segmentation benchmark "
                    "(gtsegs_ijcv.mat), as in Gandelsman et al. (ICLR 2024): the decomposition's "
                    "maps beside raw attention, attention rollout and trivial baselines.")
    ap.add_argument("--data", required=True, help="path of gtsegs_ijcv.mat")
    _model_arguments(ap)
    ap.add_argument("--classes", default=None,
                    help="text file, one class name a line (default: the ImageNet-1k classes)")
    ap.add_argument("--templates", default="openai", choices=sorted(TEMPLATE_SETS),
                    help="prompt templates of the classifier (default: OpenAI's 80, as the paper)")
    ap.add_argument("--classifier", default=None,
                    help=".npy [D, C] classifier: loaded if the file exists, else built and saved "
                         "there")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reference", action="store_true",
                    help="every choice of the reference code: --mask-resize squash, "
                         "--normalize batch, --batch-size 1")
    ap.add_argument("--mask-resize", default=None, choices=["squash", "image"],
                    help="squash (default, the reference): masks resized to S x S while the "
                         "images are resized and centre-cropped; image: masks resized and "
                         "cropped exactly like the images")
    ap.add_argument("--normalize", default=None, choices=["image", "batch"],
                    help="min-max normalisation per image (default) or over each batch "
                         "(the reference; the same at batch size 1)")
    ap.add_argument("--save-maps", default=None, metavar="DIR",
                    help="write one .npz per image with every method's map, scores and mask")
    ap.add_argument("--out", default=None, help="save the table as CSV")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        check_size(args.batch_size, "--batch-size")
        if args.limit is not None:
            check_size(args.limit, "--limit")
        if args.threads is not None:
            check_size(args.threads, "--threads", maximum=MAX_THREADS)
    except ValueError as e:
        ap.error(str(e))
    if args.reference:
        for name, value in (("mask_resize", "squash"), ("normalize", "batch")):
            if getattr(args, name) not in (None, value):
                ap.error(f"--reference sets --{name.replace('_', '-')} {value}")
            setattr(args, name, value)
        args.batch_size = 1
    args.mask_resize = args.mask_resize or "squash"
    args.normalize = args.normalize or "image"

    dataset = ImageNetSegmentation(args.data)
    model = load(args.model, pretrained=args.pretrained, act=args.act, threads=args.threads)
    classifier = segeval_classifier(model, args.classifier, args.classes, args.templates,
                                    progress=not args.no_progress)
    table = evaluate_segmentation(model, dataset, classifier, batch_size=args.batch_size,
                                  limit=args.limit, mask_resize=args.mask_resize,
                                  progress=not args.no_progress, normalize=args.normalize,
                                  save_maps=args.save_maps)
    dataset.close()
    print(f"\nImageNet-segmentation, {int(table['n_images'].iloc[0])} images, model "
          f"{args.model}" + (f" ({args.pretrained})" if args.pretrained else "")
          + f", masks: {_MASK_WORDS[args.mask_resize]}, min-max: per {args.normalize}"
          + (f", batch size {args.batch_size}" if args.normalize == "batch" else "")
          + (" (the reference's settings)" if args.reference else ""))
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
    if args.out:
        table.to_csv(args.out)
        print(f"saved {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp textspan / ablate / waterbirds: the reference's experiments over a store
# (the computations are in clipdecomp.data.reference and clipdecomp.methods.waterbirds)

def _classifier_arguments(ap: argparse.ArgumentParser, default_classes: str = "store"
                             ) -> None:
    """Options that give a zero-shot classifier to a store command."""
    ap.add_argument("--classifier", default=None,
                    help=".npy [D, C] classifier (the reference's {dataset}_classifier_{model}"
                         ".npy): loaded if the file exists, else built and saved there")
    ap.add_argument("--model", default=None,
                    help="model for the classifier and text embeddings (default: the store's)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--act", default=None, choices=["gelu", "quick_gelu"])
    ap.add_argument("--classes", default=default_classes,
                    help="class names: 'store' (the store's classes), 'imagenet', 'waterbirds' "
                         f"or a text file, one a line (default {default_classes})")
    ap.add_argument("--templates", default="openai",
                    help="prompt set: openai (default, as the paper), simple, single, clipdecomp")


_MODELS: dict = {}


def _store_model(args: argparse.Namespace, reader: Any):
    """Load the model named by ``--model`` or recorded in the store (cached per process)."""
    from clipdecomp.engine.loading import ModelSpec

    if args.model:
        kwargs = {k: v for k, v in (("pretrained", args.pretrained), ("act", args.act)) if v}
        spec = ModelSpec(args.model, kwargs)
    else:
        s = (reader.metadata.get("model") or {}).get("spec")
        if not s:
            raise ValueError("the store does not record how to load its model: give --model")
        spec = ModelSpec(s["path"], dict(s.get("kwargs") or {}))
    key = spec.key()
    if key not in _MODELS:
        _MODELS[key] = spec.load()
    return _MODELS[key]


def _classnames(args: argparse.Namespace, reader: Any) -> list[str]:
    from clipdecomp.data.imagenet_seg import imagenet_classnames
    from clipdecomp.methods.waterbirds import WATERBIRDS_CLASSES

    if args.classes == "imagenet":
        return imagenet_classnames()
    if args.classes == "waterbirds":
        return list(WATERBIRDS_CLASSES)
    if args.classes == "store":
        if not reader.classes:
            raise ValueError("the store has no class names: give --classes or --classifier")
        if (reader.metadata.get("source") or {}).get("layout") == "imagenet-val":
            return imagenet_classnames()  # WordNet ids sorted = the ImageNet class order
        return [str(c) for c in reader.classes]
    names = [ln.strip() for ln in Path(args.classes).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{args.classes} holds no class names")
    return names


def _store_classifier(args: argparse.Namespace, reader: Any) -> np.ndarray:
    """The [D, C] classifier of a store command: ``--classifier`` file, or built and saved."""
    from clipdecomp.methods.zeroshot import zero_shot_classifier

    d = int(reader.metadata["shapes"]["embed_dim"])
    if args.classifier and os.path.exists(args.classifier):
        clf = np.load(args.classifier)
        if clf.ndim != 2 or d not in clf.shape:
            raise ValueError(f"{args.classifier}: expected a [D={d}, C] classifier, got "
                             f"{clf.shape}")
        return np.ascontiguousarray(clf if clf.shape[0] == d else clf.T, np.float32)
    model = _store_model(args, reader)
    clf = zero_shot_classifier(model, _classnames(args, reader), args.templates)
    if args.classifier:
        np.save(args.classifier, clf)
    return clf




def _pool_embeddings(args: argparse.Namespace, reader: Any, texts: list[str]) -> np.ndarray:
    from clipdecomp.data.text_pool import encode_pool

    if args.text_features:
        t = np.load(args.text_features)
        d = int(reader.metadata["shapes"]["embed_dim"])
        if t.shape != (len(texts), d):
            raise ValueError(f"{args.text_features}: expected [{len(texts)}, {d}] text "
                             f"features for the pool, got {t.shape}")
        return t.astype(np.float32)
    return encode_pool(_store_model(args, reader), texts, progress=not args.no_progress)


def textspan_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp textspan STORE``: the reference's ``compute_complete_text_set.py``.

    Examples
    --------
    ``clipdecomp textspan val.zarr --pool google_3498_english --layers -4: --n-texts 20``
    """
    from clipdecomp.data.reference import (
        completeness_text,
        open_store,
        reference_dataset_name,
        reference_model_name,
        textspan_store,
    )
    from clipdecomp.data.text_pool import POOLS, load_pool

    ap = argparse.ArgumentParser(
        prog="clipdecomp textspan",
        description="TextSpan of every head of some layers over a store: the per-head table, "
                    "the zero-shot accuracy after replacing those heads by their text-span "
                    "reconstruction (the other layers' heads mean-ablated), the number of "
                    "distinct texts, and the reference's text file.")
    ap.add_argument("store")
    ap.add_argument("--pool", default="clipdecomp",
                    help=f"description pool: {', '.join(sorted(POOLS))} or a text file")
    ap.add_argument("--layers", default="-4:", help="analysed layers (default -4:, the last four)")
    ap.add_argument("--n-texts", type=int, default=20, help="texts per head (default 20)")
    ap.add_argument("--rank", type=int, default=80, help="singular vectors (default 80)")
    ap.add_argument("--rank-mode", default="reference", choices=["reference", "clean"],
                    help="reference (default): the reference's projection, pick for pick; "
                         "clean: only the singular vectors C really has")
    ap.add_argument("--text-features", default=None,
                    help=".npy [M, D] text embeddings of the pool (the reference's "
                         "{pool}_{model}.npy) instead of encoding it")
    ap.add_argument("--out", default=None, help="the text file to write (default: the "
                    "reference's name {dataset}_completeness_{pool}_top_{n}_heads_{model}.txt "
                    "in --output-dir)")
    ap.add_argument("--output-dir", default=".")
    ap.add_argument("--dataset", default=None, help="data-set word of the file name")
    ap.add_argument("--model-name", default=None, help="model word of the file name")
    ap.add_argument("--no-progress", action="store_true")
    _classifier_arguments(ap)
    args = ap.parse_args(_join_layers(sys.argv[1:] if argv is None else argv))
    if args.n_texts < 1 or args.rank < 1:
        ap.error("--n-texts and --rank must be >= 1")
    try:
        reader = open_store(args.store)
        texts = load_pool(args.pool)
        t = _pool_embeddings(args, reader, texts)
        clf = _store_classifier(args, reader)
        out = textspan_store(reader, t, texts, clf, layers=args.layers, n_texts=args.n_texts,
                             rank=args.rank, rank_mode=args.rank_mode,
                             progress=not args.no_progress)
    except (ValueError, ImportError) as e:
        print(f"clipdecomp textspan: error: {e}", file=sys.stderr)
        return 2
    pool_name = args.pool if args.pool in POOLS else Path(args.pool).stem
    path = args.out or os.path.join(
        args.output_dir,
        f"{args.dataset or reference_dataset_name(reader)}_completeness_{pool_name}_top_"
        f"{args.n_texts}_heads_{reference_model_name(reader, args.model_name)}.txt")
    Path(path).write_text(completeness_text(out["results"], out["accuracy"], out["n_unique"]),
                          encoding="utf-8")
    table = out["table"]
    print(f"TextSpan over {out['n_images']} images, layers {out['layers']}, {args.n_texts} "
          f"texts per head from {len(texts)} ({pool_name}), rank {args.rank} "
          f"({args.rank_mode})")
    for _, row in table.iterrows():
        print(f"L{row['layer']}.H{row['head']}  ({100 * row['variance_explained']:.1f}% of "
              f"variance): " + "; ".join(row["texts"]))
    print(f"Current accuracy: {out['accuracy']}")
    print(f"Number of texts: {out['n_unique']}")
    print(f"wrote {path}")
    return 0




def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp ablate STORE``: the paper's mean-ablation table (``compute_ablations.py``).

    Examples
    --------
    ``clipdecomp ablate val.zarr --classifier imagenet_classifier_ViT-B-16.npy``
    """
    from clipdecomp.data.reference import ablation_table_store, open_store

    ap = argparse.ArgumentParser(
        prog="clipdecomp ablate",
        description="Zero-shot accuracy after mean-ablating the MLPs, the class-to-class "
                    "attention, both, and the attention layers cumulatively, as in the paper.")
    ap.add_argument("store")
    ap.add_argument("--out", default=None, help="save the table as CSV")
    _classifier_arguments(ap)
    args = ap.parse_args(argv)
    try:
        reader = open_store(args.store)
        clf = _store_classifier(args, reader)
        df = ablation_table_store(reader, clf)
    except (ValueError, ImportError) as e:
        print(f"clipdecomp ablate: error: {e}", file=sys.stderr)
        return 2
    acc = df["accuracy"].tolist()
    print(f"Mean ablation, {df.attrs['n_images']} images (accuracy, %)")
    print("Baseline:", acc[0])
    print("+ MLPs ablation:", acc[1])
    print("+ CLS ablation:", acc[2])
    print("+ MLPs + CLS ablation:", acc[3])
    print("Attention ablations:", [acc[0]] + acc[4:])
    print()
    print(df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"saved {args.out}")
    return 0


def _parse_heads(text: str) -> list[tuple[int, int]]:
    out = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        a, sep, b = tok.replace("L", "").replace("H", "").partition(".")
        if not sep or not a.lstrip("-").isdigit() or not b.isdigit():
            raise ValueError(f"bad head {tok!r}: write LAYER.HEAD, e.g. 11.3")
        out.append((int(a), int(b)))
    if not out:
        raise ValueError("no heads given")
    return out


def waterbirds_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp waterbirds STORE``: the reference's Waterbirds head ablation, per group.

    Examples
    --------
    ``clipdecomp waterbirds wb.zarr --preset ViT-L-14 --model ViT-L-14 --pretrained
    laion2b_s32b_b82k``
    """
    from clipdecomp.data.reference import open_store
    from clipdecomp.data.waterbirds import places_of
    from clipdecomp.methods.waterbirds import (
        WATERBIRDS_HEADS,
        as_head_list,
        waterbirds_ablation,
        waterbirds_heads,
    )

    ap = argparse.ArgumentParser(
        prog="clipdecomp waterbirds",
        description="Mean-ablate the reference's geography and setting heads (with every head "
                    "before the last four layers and every MLP, as compute_use_specific_heads.py)"
                    " and print accuracy per (label, place) group and the worst group.")
    ap.add_argument("store", help="a store of the Waterbirds test split (clipdecomp run SOURCE "
                    "--layout waterbirds)")
    ap.add_argument("--preset", default=None, choices=sorted(WATERBIRDS_HEADS),
                    help="the reference's head set of this model (default: from the store's "
                         "model when it is one of them)")
    ap.add_argument("--heads", default=None, help="heads instead of a preset: 11.3,10.11,...")
    ap.add_argument("--metadata", default=None,
                    help="metadata.csv (default: the one in the store's source folder)")
    _classifier_arguments(ap, default_classes="waterbirds")
    args = ap.parse_args(argv)
    try:
        reader = open_store(args.store)
        if args.heads:
            heads: Any = _parse_heads(args.heads)
            what = f"heads {args.heads}"
        else:
            preset = args.preset or _preset_of(reader)
            heads = waterbirds_heads(preset)
            what = f"preset {preset}"
        meta_root = args.metadata or reader.metadata["source"]["root"]
        places = places_of([str(p) for p in np.asarray(reader.paths[:])], meta_root)
        clf = _store_classifier(args, reader)
        table = waterbirds_ablation(reader, clf, places, heads)
    except (ValueError, ImportError) as e:
        print(f"clipdecomp waterbirds: error: {e}", file=sys.stderr)
        return 2
    print(f"Waterbirds, {what}: {len(as_head_list(heads))} heads mean-ablated, with every head "
          "before the last 4 layers and every MLP term")
    print((100 * table).to_string(float_format=lambda x: f"{x:.2f}"))
    return 0


def _preset_of(reader: Any) -> str:
    from clipdecomp.methods.waterbirds import WATERBIRDS_HEADS

    spec = (reader.metadata.get("model") or {}).get("spec") or {}
    name = os.path.basename(str(spec.get("path", "")))
    for key in WATERBIRDS_HEADS:
        if key.lower() in name.lower().replace("/", "-"):
            return key
    raise ValueError("give --preset or --heads (the store's model is none of "
                     f"{sorted(WATERBIRDS_HEADS)})")


# ----------------------------------------------------------------------------------------------
# clipdecomp report


def report_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp report STORE --pool NAME --out atlas.html``; returns the exit status.

    Examples
    --------
    >>> report_main(["val.zarr", "--pool", "default", "--out", "atlas.html"])  # doctest: +SKIP
    0
    """
    ap = argparse.ArgumentParser(
        prog="clipdecomp report",
        description="Write the HTML atlas of a data-set store (made by clipdecomp run).")
    ap.add_argument("store", help="the Zarr store")
    ap.add_argument("--out", default="atlas.html", help="the HTML file to write")
    ap.add_argument("--pool", default="default",
                    help="TextSpan's description pool: 'default' (shipped) or a text file")
    ap.add_argument("--model", default=None,
                    help="checkpoint path or name, or 'embedded' (default: the one the store "
                    "records)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--act", default=None, choices=ACTS)
    ap.add_argument("--texts", default=None,
                    help="texts of the image views, separated by '|' (default: top classes)")
    ap.add_argument("--n-texts", type=int, default=5, help="TextSpan texts per head")
    ap.add_argument("--n-show", type=int, default=6, help="images per row of a head card")
    ap.add_argument("--views", type=int, default=4, help="number of image views")
    ap.add_argument("--title", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        from clipdecomp.data.store import StoreReader, is_store
        from clipdecomp.viz.atlas import report

        if not is_store(args.store):
            raise ValueError(f"{args.store} is not a clipdecomp store (made by clipdecomp run)")
        store = StoreReader(args.store)
        path = args.model
        kwargs = {k: v for k, v in (("pretrained", args.pretrained), ("act", args.act)) if v}
        if path is None:
            recorded = store.metadata["model"].get("spec") or {}
            if not recorded.get("path"):
                raise ValueError("the store does not record where its model is: pass --model "
                                 "PATH (or --model embedded for clipdecomp's own)")
            path = recorded["path"]
            kwargs = {**recorded.get("kwargs", {}), **kwargs}
        model = load(None if path == "embedded" else path, **kwargs)
        texts = None if args.texts is None else [t.strip() for t in args.texts.split("|")
                                                 if t.strip()]
        atlas = report(store, pool=args.pool, model=model, texts=texts, n_texts=args.n_texts,
                       n_show=args.n_show, views=args.views, title=args.title,
                       progress=not args.no_progress)
        out = atlas.save(args.out)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"clipdecomp report: error: {e}", file=sys.stderr)
        return 2
    print(f"atlas written to {out.resolve()} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp train-toy (python -m clipdecomp.toy.train)


def train_toy_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp train-toy``: train the embedded shapes-world CLIP (needs ``pip install
    .[train]``: torch). ``python -m clipdecomp.toy.train`` is the same command.

    Examples
    --------
    >>> train_toy_main(["--out", "run1", "--pretrain-vision", "1200", "--bf16"])  # doctest: +SKIP
    0
    """
    from clipdecomp.toy.world import STYLES

    ap = argparse.ArgumentParser(prog="clipdecomp train-toy",
                                 description="Train the embedded shapes-world CLIP (needs torch).")
    ap.add_argument("--out", help="output folder (log, checkpoints, model/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=50.0, help="time budget")
    ap.add_argument("--steps", type=int, default=None,
                    help="schedule length in steps (default: fitted to --minutes)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    ap.add_argument("--init", default=None,
                    help="start from this state.pt or exported model folder (continuation)")
    ap.add_argument("--hard-frac", type=float, default=0.0,
                    help="share of each batch on one background with 3 colours")
    ap.add_argument("--focus-frac", type=float, default=0.0,
                    help="share of each batch of single objects of one colour on one background")
    ap.add_argument("--flat-frac", type=float, default=0.0,
                    help="share of the schedule trained on flattened backgrounds")
    ap.add_argument("--ramp-frac", type=float, default=0.0,
                    help="share of the schedule over which the textures fade back in")
    ap.add_argument("--fresh-text", action="store_true",
                    help="with --init: keep the vision tower, start the text tower anew")
    ap.add_argument("--style", default="smooth", choices=sorted(STYLES),
                    help="world style of the training and held-out scenes")
    ap.add_argument("--attr-weight", type=float, default=0.0,
                    help="weight of the attribute (zero-shot classification) loss")
    ap.add_argument("--attr-weights", default=None,
                    help="weights inside the attribute loss, e.g. shape=4 (others 1)")
    ap.add_argument("--spurious-frac", type=float, default=0.0,
                    help="share of each batch from the spurious split's training distribution")
    ap.add_argument("--vision-head-width", type=int, default=None,
                    help="width of the image tower's attention heads (default: as --init has "
                         "it, else 32; 16 splits each head in two)")
    ap.add_argument("--spurious-p-major", type=float, default=0.93,
                    help="share of the spurious scenes on their class's usual ground")
    ap.add_argument("--spurious-captions", choices=("scene", "class"), default="scene",
                    help="captions of the spurious scenes: the scene described, or only the "
                         "class's own name ('a photo of a buoy.')")
    ap.add_argument("--head-attrs", default=None, metavar="L.H=ATTR,...",
                    help="image-tower heads with a read-out of their own for one attribute, "
                         "e.g. 4.3=color,5.5=background")
    ap.add_argument("--head-weight", type=float, default=1.0,
                    help="weight of the heads' read-out loss (with --head-attrs)")
    ap.add_argument("--head-purity", type=float, default=0.0,
                    help="with --head-attrs: weight of the share of each such head's variance "
                         "outside its attribute's class embeddings")
    ap.add_argument("--head-mask-weight", type=float, default=0.0,
                    help="with --head-attrs: weight of a second read-out of those heads on "
                         "their terms from the object's patches (the ground's for background "
                         "heads)")
    ap.add_argument("--seg-weight", type=float, default=0.0,
                    help="weight of a loss that correlates each one-object scene's heat map "
                         "along its colour with the patches its object covers at least half of")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its resume.pt")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain-vision", type=int, default=0, metavar="STEPS",
                    help="only warm-start the image tower with attribute labels for STEPS "
                         "steps (into OUT/vision/; then train with --init OUT/vision/state.pt "
                         "--fresh-text)")
    ap.add_argument("--vision-init", default=None,
                    help="with --pretrain-vision: continue from this warm-start resume.pt")
    ap.add_argument("--vision-weights", default=None,
                    help="with --pretrain-vision: attribute loss weights, e.g. "
                         "shape=1,color=0.25")
    ap.add_argument("--eval", metavar="MODEL_DIR", default=None,
                    help="only print the zero-shot accuracy of an exported model folder")
    a = ap.parse_args(None if argv is None else list(argv))
    if a.eval is None and a.out is None:
        ap.error("--out is required for training")
    for name in ("attr_weights", "vision_weights"):
        text = getattr(a, name)
        try:
            setattr(a, name, None if text is None else
                    {k: float(v) for k, v in (kv.split("=") for kv in text.split(","))})
        except ValueError:
            ap.error(f"--{name.replace('_', '-')}: expected NAME=WEIGHT,..., got {text!r}")
    from clipdecomp.toy import train  # torch is imported here, once the arguments are good

    if a.head_attrs is not None:
        try:
            a.head_attrs = train.parse_head_attrs(a.head_attrs)
        except ValueError:
            ap.error(f"--head-attrs: expected LAYER.HEAD=ATTRIBUTE,..., got {a.head_attrs!r}")

    train.run_from_args(a)
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp info / pretrained


def info_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp info [MODEL]``: the model's summary and the CPU path."""
    ap = argparse.ArgumentParser(prog="clipdecomp info", description="Describe a model.")
    ap.add_argument("model", nargs="?", default=None, help="path or name (default: embedded)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--act", default=None, choices=ACTS)
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    args = ap.parse_args(argv)
    model = load(args.model, pretrained=args.pretrained, act=args.act, precision=args.precision)
    print(model)
    bf16 = "yes" if has_bf16() else "no (precision='bf16' is emulated here)"
    print(f"SIMD path: {isa()}; AVX512_BF16: {bf16}; bf16 products on: {bf16_kernel()}")
    return 0


def pretrained_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp pretrained``: the known (model, pretrained) names."""
    argparse.ArgumentParser(prog="clipdecomp pretrained").parse_args(argv)
    for name, tag in list_pretrained():
        print(f"{name:24s} {tag}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "demo": demo_main,
    "run": run_main,
    "textspan": textspan_main,
    "ablate": ablate_main,
    "waterbirds": waterbirds_main,
    "report": report_main,
    "segeval": segeval_main,
    "info": info_main,
    "pretrained": pretrained_main,
    "train-toy": train_toy_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp COMMAND ...``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print((__doc__ or "").strip())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"clipdecomp: unknown command {cmd!r}\n\n{(__doc__ or '').strip()}",
              file=sys.stderr)
        return 2
    return int(COMMANDS[cmd](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
