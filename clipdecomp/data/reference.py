"""The reference code's experiments, one function and one command each, on clipdecomp stores.

The paper's public code (``yossigandelsman/clip_text_span``) runs its experiments as scripts
over ``.npy`` files of the decomposition; here they run over a store written by
``clipdecomp run`` (see ``docs/reference.md`` for the whole map; the commands' parsers are in
:mod:`clipdecomp.cli`):

==============================  ============================================================
reference script                clipdecomp
==============================  ============================================================
``compute_prs.py``              ``clipdecomp run ... --reference-npy DIR``
                                (:func:`write_reference_npy`)
``compute_complete_text_set``   ``clipdecomp textspan STORE`` (:func:`textspan_store`)
``compute_ablations.py``        ``clipdecomp ablate STORE`` (:func:`ablation_table_store`)
``compute_use_specific_heads``  ``clipdecomp waterbirds STORE``
                                (:func:`clipdecomp.methods.waterbirds.waterbirds_ablation`)
==============================  ============================================================

Accuracies follow the reference: top-1 of ``sum of terms @ classifier``, the means of ablated
terms taken over the evaluated images (the store's statistics).

Shapes: N images, L layers, Lk kept layers, H heads, D embedding dim, C classes, M texts.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipdecomp.engine.selection import parse_layers
from clipdecomp.methods.textspan import textspan_heads

__all__ = [
    "ablation_table_store",
    "completeness_text",
    "open_store",
    "reference_dataset_name",
    "reference_model_name",
    "textspan_store",
    "write_reference_npy",
]


# ----------------------------------------------------------------------------------------------
# shared helpers

def open_store(store: Any):
    """A :class:`~clipdecomp.data.store.StoreReader` of a path (or the reader itself)."""
    from clipdecomp.data.store import StoreReader

    return store if hasattr(store, "iter_chunks") else StoreReader(store)


def reference_model_name(reader: Any, given: str | None = None) -> str:
    """The model word of the reference's file names: ``given``, else the store's checkpoint
    file name without its extension (``ViT-B-16.safetensors`` -> ``ViT-B-16``)."""
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
    model = reference_model_name(reader, model)
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
        :func:`clipdecomp.methods.textspan.textspan`).
    progress : bool

    Returns
    -------
    dict
        ``table`` (a :func:`~clipdecomp.methods.textspan.textspan_heads` DataFrame, model layer
        numbers), ``results`` {(layer, head): TextSpanResult}, ``accuracy`` (percent, as the
        reference prints it), ``n_unique`` (distinct texts over all heads), ``layers``,
        ``n_images``.

    Examples
    --------
    >>> out = textspan_store("val.zarr", T, pool, clf)     # doctest: +SKIP
    >>> out["accuracy"], out["n_unique"]                   # doctest: +SKIP
    """
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
        :func:`clipdecomp.methods.ablation.ablation_study` names them.

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
