"""The ``clipdecomp`` command line.

    clipdecomp demo      [--out DIR] [--n-images N]        the main job, on the embedded model
    clipdecomp run       SOURCE --model M --out STORE ...   a whole collection into a Zarr store
    clipdecomp textspan  STORE --pool P --layers -4:        TextSpan head table and its accuracy
    clipdecomp ablate    STORE                              the paper's mean-ablation table
    clipdecomp waterbirds STORE --preset ViT-L-14           Waterbirds head ablation, per group
    clipdecomp report    STORE --pool NAME --out atlas.html  the HTML atlas of a store
    clipdecomp segeval   --data gtsegs_ijcv.mat --model M   the ImageNet-segmentation benchmark
    clipdecomp info      [MODEL] [--precision P]            what a checkpoint holds, the CPU path
    clipdecomp pretrained                                   the known (model, pretrained) names
"""
from __future__ import annotations

import argparse
import sys


def _info(argv) -> int:
    ap = argparse.ArgumentParser(prog="clipdecomp info", description="Describe a model.")
    ap.add_argument("model", nargs="?", default=None, help="path or name (default: embedded)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--act", default=None, choices=["gelu", "quick_gelu"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-emulated"])
    args = ap.parse_args(argv)
    import clipdecomp
    from clipdecomp import _core

    model = clipdecomp.load(args.model, pretrained=args.pretrained, act=args.act,
                            precision=args.precision)
    print(model)
    bf16 = "yes" if _core.has_bf16() else "no (precision='bf16' is emulated here)"
    print(f"SIMD path: {_core.isa()}; AVX512_BF16: {bf16}")
    return 0


def _pretrained(argv) -> int:
    argparse.ArgumentParser(prog="clipdecomp pretrained").parse_args(argv)
    import clipdecomp

    for name, tag in clipdecomp.list_pretrained():
        print(f"{name:24s} {tag}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("clipdecomp.demo", "demo_main"),
        "run": ("clipdecomp.dataset", "run_main"),
        "report": ("clipdecomp.viz.atlas", "report_main"),
        "segeval": ("clipdecomp.imagenet_seg", "segeval_main"),
        "textspan": ("clipdecomp.reference", "textspan_main"),
        "ablate": ("clipdecomp.reference", "ablate_main"),
        "waterbirds": ("clipdecomp.waterbirds", "waterbirds_main"),
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return _info(rest)
    if cmd == "pretrained":
        return _pretrained(rest)
    if cmd not in commands:
        print(f"clipdecomp: unknown command {cmd!r}\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    import importlib

    module, func = commands[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
