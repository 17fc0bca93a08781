"""The ``clipdecomp`` command line: every argument parser of the package lives here.

    clipdecomp demo      [--out DIR] [--n-images N]        the main job, on the embedded model
    clipdecomp run       SOURCE --model M --out STORE ...   a whole collection into a Zarr store
    clipdecomp segeval   --data gtsegs_ijcv.mat --model M   the ImageNet-segmentation benchmark
    clipdecomp info      [MODEL] [--precision P]            what a checkpoint holds, the CPU path
    clipdecomp pretrained                                   the known (model, pretrained) names

Each command is a ``*_main(argv) -> int`` function (the exit status) that parses its arguments
and calls the package's functions; the modules below know nothing of argparse.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from clipdecomp.engine.core import PRECISIONS, has_bf16, isa
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
    from clipdecomp.data.sources import LAYOUTS

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
    p.add_argument("--layout", default="auto", choices=LAYOUTS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    p.add_argument("--layers", default=None,
                   help="layers whose heads to keep, e.g. -4: (the last four) or 0,5,11 "
                   "(default all)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on the Dask cluster of this scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of N worker processes")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--checkpoint-seconds", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def _join_layers(argv: Sequence[str]) -> list[str]:
    """Let ``--layers -4:`` through argparse (which reads ``-4:`` as an option)."""
    argv = list(argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--layers" and i + 1 < len(argv) and argv[i + 1][:2].lstrip("-")[:1].isdigit():
            out.append(f"--layers={argv[i + 1]}")
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
    from clipdecomp.engine.loading import ModelSpec

    args = run_parser().parse_args(_join_layers(sys.argv[1:] if argv is None else argv))
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
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"clipdecomp run: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# clipdecomp segeval


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
    ap.add_argument("--mask-resize", default="image", choices=["image", "squash"],
                    help="image: masks resized and cropped exactly like the images (default); "
                         "squash: masks resized to S x S, as the reference code does")
    ap.add_argument("--out", default=None, help="save the table as CSV")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")

    dataset = ImageNetSegmentation(args.data)
    model = load(args.model, pretrained=args.pretrained, act=args.act, threads=args.threads)
    classifier = segeval_classifier(model, args.classifier, args.classes, args.templates,
                                    progress=not args.no_progress)
    table = evaluate_segmentation(model, dataset, classifier, batch_size=args.batch_size,
                                  limit=args.limit, mask_resize=args.mask_resize,
                                  progress=not args.no_progress)
    dataset.close()
    print(f"\nImageNet-segmentation, {int(table['n_images'].iloc[0])} images, model "
          f"{args.model}" + (f" ({args.pretrained})" if args.pretrained else "")
          + f", masks: {args.mask_resize}")
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
    if args.out:
        table.to_csv(args.out)
        print(f"saved {args.out}")
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
    print(f"SIMD path: {isa()}; AVX512_BF16: {bf16}")
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
    "segeval": segeval_main,
    "info": info_main,
    "pretrained": pretrained_main,
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
