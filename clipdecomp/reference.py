"""The reference code's experiments, one function and one command each, on clipdecomp stores.

The paper's public code (``yossigandelsman/clip_text_span``) runs its experiments as scripts
over ``.npy`` files of the decomposition; here they run over a store written by
``clipdecomp run`` (see ``docs/reference.md`` for the whole map):

==============================  ============================================================
reference script                clipdecomp
==============================  ============================================================
``compute_prs.py``              ``clipdecomp run ... --reference-npy DIR``
                                (:func:`write_reference_npy`)
``compute_complete_text_set``   ``clipdecomp textspan STORE`` (:func:`textspan_store`)
``compute_ablations.py``        ``clipdecomp ablate STORE`` (:func:`ablation_table_store`)
``compute_use_specific_heads``  ``clipdecomp waterbirds STORE``
                                (:func:`clipdecomp.waterbirds.waterbirds_ablation`)
==============================  ============================================================

Accuracies follow the reference: top-1 of ``sum of terms @ classifier``, the means of ablated
terms taken over the evaluated images (the store's statistics).

Shapes: N images, L layers, Lk kept layers, H heads, D embedding dim, C classes, M texts.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ablate_main",
    "ablation_table_store",
    "completeness_text",
    "reference_dataset_name",
    "textspan_main",
    "textspan_store",
    "write_reference_npy",
]


# ----------------------------------------------------------------------------------------------
# shared helpers

def open_store(store: Any):
    """A :class:`~clipdecomp.store.StoreReader` of a path (or the reader itself)."""
    from .store import StoreReader

    return store if hasattr(store, "iter_chunks") else StoreReader(store)


def _model_name(reader: Any, given: str | None = None) -> str:
    if given:
        return given
    spec = (reader.metadata.get("model") or {}).get("spec") or {}
    path = str(spec.get("path") or "")
    if path:
        name = os.path.basename(path.rstrip("/"))
        for ext in (".safetensors", ".bin", ".pt", ".pth"):
            name = name.removesuffix(ext)
        return name
    ck = (reader.metadata.get("model") or {}).get("checkpoint") or {}
    return str(ck.get("name") or "model").split(".")[0]


def reference_dataset_name(reader: Any) -> str:
    """The data-set word the reference puts in its file names, from a store's source layout.

    ImageNet validation -> ``imagenet``, CIFAR -> ``CIFAR10`` / ``CIFAR100``, binary
    Waterbirds -> ``binary_waterbirds``; otherwise the source folder's name.

    Examples
    --------
    >>> reference_dataset_name(StoreReader("val.zarr"))        # doctest: +SKIP
    'imagenet'
    """
    src = reader.metadata.get("source") or {}
    layout = src.get("layout")
    named = {"imagenet-val": "imagenet", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
             "waterbirds": "binary_waterbirds"}
    if layout in named:
        return named[layout]
    return os.path.basename(str(src.get("root", "data")).rstrip("/")) or "data"


def add_classifier_arguments(ap: argparse.ArgumentParser, default_classes: str = "store"
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


def model_from_args(args: argparse.Namespace, reader: Any):
    """Load the model named by ``--model`` or recorded in the store (cached per process)."""
    from .dataset import ModelSpec

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
    from .imagenet_seg import imagenet_classnames
    from .waterbirds import WATERBIRDS_CLASSES

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


def classifier_from_args(args: argparse.Namespace, reader: Any) -> np.ndarray:
    """The [D, C] classifier of a store command: ``--classifier`` file, or built and saved."""
    from .zeroshot import zero_shot_classifier

    d = int(reader.metadata["shapes"]["embed_dim"])
    if args.classifier and os.path.exists(args.classifier):
        clf = np.load(args.classifier)
        if clf.ndim != 2 or d not in clf.shape:
            raise ValueError(f"{args.classifier}: expected a [D={d}, C] classifier, got "
                             f"{clf.shape}")
        return np.ascontiguousarray(clf if clf.shape[0] == d else clf.T, np.float32)
    model = model_from_args(args, reader)
    clf = zero_shot_classifier(model, _classnames(args, reader), args.templates)
    if args.classifier:
        np.save(args.classifier, clf)
    return clf


def _top1_correct(x: np.ndarray, labels: np.ndarray, w: np.ndarray) -> int:
    return int(np.count_nonzero(np.argmax(x @ w, axis=1) == labels))


def _reference_percent(correct: int, n: int) -> float:
    """``accuracy(...)[0] * 100`` of the reference: a fraction of a float count, times 100."""
    return float(correct) / n * 100.0


# ----------------------------------------------------------------------------------------------
# compute_prs.py: the .npy files

def write_reference_npy(store: Any, out_dir: str | os.PathLike, dataset: str | None = None,
                        model: str | None = None, labels: bool = True) -> dict[str, str]:
    """Write a store as the ``.npy`` files of the reference's ``compute_prs.py``.

    ``{dataset}_attn_{model}.npy`` float32 [N, L, H, D] (token-summed head terms),
    ``{dataset}_mlp_{model}.npy`` float32 [N, L+1, D] (row 0: the ln_pre term) and
    ``{dataset}_cls_attn_{model}.npy`` float32 [N, L, D] (class-to-class attention summed over
    heads), rows in the store's order; and, unless ``labels=False``,
    ``{dataset}_labels.npy`` int64 [N] (the reference reads it for Waterbirds). Written chunk by
    chunk into memory-mapped files.

    Parameters
    ----------
    store : StoreReader or path
        A finished store that keeps the heads of every layer (``clipdecomp run`` without
        ``--layers``).
    out_dir : path
    dataset : str, optional
        Default: :func:`reference_dataset_name`.
    model : str, optional
        The model word of the file names (the reference: ``ViT-B-16``...). Default: the
        store's checkpoint name.
    labels : bool

    Returns
    -------
    dict
        File kind ("attn", "mlp", "cls_attn", "labels") -> path.

    Examples
    --------
    >>> write_reference_npy("val.zarr", "output_dir", "imagenet", "ViT-B-16")   # doctest: +SKIP
    """
    from numpy.lib.format import open_memmap

    reader = open_store(store)
    shapes = reader.metadata["shapes"]
    n, L, H, D = (int(shapes[k]) for k in ("n", "layers", "heads", "embed_dim"))
    if len(reader.layers) != L:
        raise ValueError(f"the store keeps the heads of layers {list(reader.layers)} only; the "
                         "reference's attn file holds every layer: run without --layers")
    if not reader.complete:
        raise ValueError("the store is not finished: run the same command again to complete it")
    dataset = dataset or reference_dataset_name(reader)
    model = _model_name(reader, model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "attn": os.path.join(out_dir, f"{dataset}_attn_{model}.npy"),
        "mlp": os.path.join(out_dir, f"{dataset}_mlp_{model}.npy"),
        "cls_attn": os.path.join(out_dir, f"{dataset}_cls_attn_{model}.npy"),
    }
    arrays = {
        "attn": open_memmap(paths["attn"], "w+", np.float32, (n, L, H, D)),
        "mlp": open_memmap(paths["mlp"], "w+", np.float32, (n, L + 1, D)),
        "cls_attn": open_memmap(paths["cls_attn"], "w+", np.float32, (n, L, D)),
    }
    lab = np.empty(n, np.int64)
    skipped = 0
    for rows, c in reader.iter_chunks(["heads", "mlps", "cls_to_cls", "labels"]):
        arrays["attn"][rows] = c["heads"]
        arrays["mlp"][rows] = c["mlps"]
        arrays["cls_attn"][rows] = c["cls_to_cls"]
        lab[rows] = c["labels"]
        skipped += int(np.count_nonzero(~c["ok"]))
    for a in arrays.values():
        a.flush()
    del arrays
    if labels:
        paths["labels"] = os.path.join(out_dir, f"{dataset}_labels.npy")
        np.save(paths["labels"], lab)
    if skipped:
        print(f"warning: {skipped} unreadable image(s) are rows of zeros in the .npy files "
              "(see StoreReader.skipped())", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------------------------
# compute_complete_text_set.py: TextSpan of every head of the last layers, and its accuracy

def completeness_text(results: dict, accuracy: float, n_unique: int) -> str:
    """The text file that ``compute_complete_text_set.py`` writes.

    Per head, in layer then head order: a dashed line, ``Layer i, Head h``, a dashed line,
    then its texts one a line; at the end a dashed line, ``Current accuracy: <percent>`` and
    ``Number of texts: <unique texts>`` (no final line break).

    Examples
    --------
    >>> from types import SimpleNamespace as NS
    >>> print(completeness_text({(11, 0): NS(texts=["a", "b"])}, 71.5, 2))
    ------------------
    Layer 11, Head 0
    ------------------
    a
    b
    ------------------
    Current accuracy: 71.5
    Number of texts: 2
    """
    dash = "-" * 18
    out = []
    for layer, head in sorted(results):
        out += [dash, f"Layer {layer}, Head {head}", dash]
        out += [str(t) for t in results[(layer, head)].texts]
    out += [dash, f"Current accuracy: {accuracy}", f"Number of texts: {n_unique}"]
    return "\n".join(out)


def textspan_store(store: Any, text_embeddings: np.ndarray, texts: Sequence[str],
                   classifier: np.ndarray, layers: Any = "-4:", n_texts: int = 20,
                   rank: int = 80, rank_mode: str = "reference", progress: bool = False):
    """TextSpan of every head of ``layers`` over a store, and the completeness accuracy.

    As ``compute_complete_text_set.py``: TextSpan picks ``n_texts`` texts per head; then every
    head of the other layers is mean-ablated, the MLP terms are kept, each analysed head is
    replaced by its reconstruction (its mean plus its centred terms projected on the picked
    directions), and the sum is classified.

    Parameters
    ----------
    store : StoreReader or path
        Must keep the heads of ``layers``.
    text_embeddings : ndarray [M, D]
    texts : sequence of str [M]
    classifier : ndarray [D, C]
    layers : str or sequence of int
        Analysed layers (default the last four, ``--layers -4:``).
    n_texts, rank : int
    rank_mode : {"reference", "clean"}
        Default ``"reference"``: the reference's picks exactly (see
        :func:`clipdecomp.textspan.textspan`).
    progress : bool

    Returns
    -------
    dict
        ``table`` (a :func:`~clipdecomp.textspan.textspan_heads` DataFrame, model layer
        numbers), ``results`` {(layer, head): TextSpanResult}, ``accuracy`` (percent, as the
        reference prints it), ``n_unique`` (distinct texts over all heads), ``layers``,
        ``n_images``.

    Examples
    --------
    >>> out = textspan_store("val.zarr", T, pool, clf)     # doctest: +SKIP
    >>> out["accuracy"], out["n_unique"]                   # doctest: +SKIP
    """
    from .dataset import parse_layers
    from .textspan import textspan_heads

    reader = open_store(store)
    L = int(reader.metadata["shapes"]["layers"])
    lays = list(parse_layers(layers, L))
    dec = reader.decomposition(layers=lays)
    ok = dec.ok
    if not ok.any():
        raise ValueError("the store holds no valid rows")
    heads = dec.heads[ok]  # [N, len(lays), H, D]
    labels = dec.labels[ok]
    if (labels < 0).any():
        raise ValueError("the store has images without labels: the accuracy needs them")
    n_heads = heads.shape[2]
    df = textspan_heads(heads, text_embeddings, texts, n_texts=n_texts, rank=rank,
                        progress=progress, rank_mode=rank_mode,
                        heads=[(j, h) for j in range(len(lays)) for h in range(n_heads)])
    df["layer"] = [lays[j] for j in df["layer"]]
    results = {}
    for (j, h), res in df.attrs["results"].items():
        res.layer = lays[j]
        results[(lays[j], h)] = res
    df.attrs["results"] = results
    # the completeness accuracy
    head_means = np.asarray(reader.stats.mean_heads, np.float64)  # [L, H, D]
    others = [x for x in range(L) if x not in lays]
    x = dec.mlps[ok].sum(axis=1, dtype=np.float64) + head_means[others].sum(axis=(0, 1))
    for (layer, h), res in results.items():
        x += res.reconstruct(heads[:, lays.index(layer), h])
    correct = _top1_correct(x, labels, np.asarray(classifier, np.float64))
    n_unique = len({t for r in results.values() for t in r.texts})
    return {"table": df, "results": results, "n_images": len(labels), "layers": lays,
            "accuracy": _reference_percent(correct, len(labels)), "n_unique": n_unique}


def _text_embeddings(args: argparse.Namespace, reader: Any, texts: list[str]) -> np.ndarray:
    from .pool import encode_pool

    if args.text_features:
        t = np.load(args.text_features)
        d = int(reader.metadata["shapes"]["embed_dim"])
        if t.shape != (len(texts), d):
            raise ValueError(f"{args.text_features}: expected [{len(texts)}, {d}] text "
                             f"features for the pool, got {t.shape}")
        return t.astype(np.float32)
    return encode_pool(model_from_args(args, reader), texts, progress=not args.no_progress)


def textspan_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp textspan STORE``: the reference's ``compute_complete_text_set.py``.

    Examples
    --------
    ``clipdecomp textspan val.zarr --pool google_3498_english --layers -4: --n-texts 20``
    """
    from .dataset import _join_layers
    from .pool import POOLS, load_pool

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
    add_classifier_arguments(ap)
    args = ap.parse_args(_join_layers(argv))
    if args.n_texts < 1 or args.rank < 1:
        ap.error("--n-texts and --rank must be >= 1")
    try:
        reader = open_store(args.store)
        texts = load_pool(args.pool)
        t = _text_embeddings(args, reader, texts)
        clf = classifier_from_args(args, reader)
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
        f"{args.n_texts}_heads_{_model_name(reader, args.model_name)}.txt")
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


# ----------------------------------------------------------------------------------------------
# compute_ablations.py

def ablation_table_store(store: Any, classifier: np.ndarray):
    """The paper's mean-ablation table over a store, as ``compute_ablations.py`` computes it.

    Rows: the baseline; all MLP terms mean-ablated; the class-to-class attention of every
    layer mean-ablated; both; then attention layers 0..k mean-ablated cumulatively (all their
    heads; MLPs and class-to-class kept) for k = 0..L-1. Means are the store's statistics (over
    its valid rows, as the reference's means over its files). The curve needs, for layer k,
    the heads of every layer after k: rows the store cannot give (layers not kept) are NaN.

    Parameters
    ----------
    store : StoreReader or path
    classifier : ndarray [D, C]

    Returns
    -------
    pandas.DataFrame
        Columns ``ablation``, ``layers_ablated`` and ``accuracy`` (percent), as
        :func:`clipdecomp.ablation.ablation_study` names them.

    Examples
    --------
    >>> ablation_table_store("val.zarr", clf)      # doctest: +SKIP
    """
    import pandas as pd

    reader = open_store(store)
    L = int(reader.metadata["shapes"]["layers"])
    kept = list(reader.layers)
    missing = [x for x in range(L) if x not in kept]
    first_curve = max(missing) if missing else 0  # layer k needs every layer after k kept
    stats = reader.stats
    w = np.asarray(classifier, np.float64)
    mlp_mean = np.asarray(stats.mean_mlps, np.float64).sum(axis=0)
    cls_mean = np.asarray(stats.mean_cls_to_cls, np.float64).sum(axis=0)
    layer_means = np.asarray(stats.mean_heads, np.float64).sum(axis=1)  # [L, D]
    names = ["baseline", "MLPs", "class-to-class attention", "MLPs + class-to-class attention"]
    counts = np.zeros(4 + L, np.int64)
    n = 0
    for _, c in reader.iter_chunks(["heads", "mlps", "cls_to_cls", "embedding", "labels"],
                                   valid_only=True):
        if not len(c["labels"]):
            continue
        y = c["labels"]
        if (y < 0).any():
            raise ValueError("the store has images without labels: the accuracy needs them")
        per_layer = np.zeros((len(y), L, w.shape[0]))
        per_layer[:, kept] = c["heads"].sum(axis=2, dtype=np.float64)
        mlps = c["mlps"].sum(axis=1, dtype=np.float64)
        if missing:  # the layers not kept, together: the embedding's share left to them
            e = c["embedding"].astype(np.float64)
            rest = e / np.linalg.norm(e, axis=1, keepdims=True) - mlps - per_layer.sum(axis=1)
        else:
            rest = 0.0
        attn = per_layer.sum(axis=1) + rest
        no_cls = attn - c["cls_to_cls"].sum(axis=1, dtype=np.float64) + cls_mean
        for i, x in enumerate((attn + mlps, attn + mlp_mean, no_cls + mlps, no_cls + mlp_mean)):
            counts[i] += _top1_correct(x, y, w)
        for k in range(first_curve, L):
            x = layer_means[: k + 1].sum(axis=0) + per_layer[:, k + 1:].sum(axis=1) + mlps
            counts[4 + k] += _top1_correct(x, y, w)
        n += len(y)
    if n == 0:
        raise ValueError("the store holds no valid rows")
    rows = [(name, 0, _reference_percent(int(counts[i]), n)) for i, name in enumerate(names)]
    for k in range(L):
        name = f"attention layers 0-{k}" if k else "attention layer 0"
        acc = _reference_percent(int(counts[4 + k]), n) if k >= first_curve or not missing \
            else float("nan")
        rows.append((name, k + 1, acc))
    df = pd.DataFrame(rows, columns=["ablation", "layers_ablated", "accuracy"])
    df.attrs["n_images"] = n
    return df


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``clipdecomp ablate STORE``: the paper's mean-ablation table (``compute_ablations.py``).

    Examples
    --------
    ``clipdecomp ablate val.zarr --classifier imagenet_classifier_ViT-B-16.npy``
    """
    ap = argparse.ArgumentParser(
        prog="clipdecomp ablate",
        description="Zero-shot accuracy after mean-ablating the MLPs, the class-to-class "
                    "attention, both, and the attention layers cumulatively, as in the paper.")
    ap.add_argument("store")
    ap.add_argument("--out", default=None, help="save the table as CSV")
    add_classifier_arguments(ap)
    args = ap.parse_args(argv)
    try:
        reader = open_store(args.store)
        clf = classifier_from_args(args, reader)
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
