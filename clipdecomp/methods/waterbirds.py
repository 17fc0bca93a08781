"""The Waterbirds experiment of the paper: mean-ablate the heads about place, measure groups.

Waterbirds (Sagawa et al., 2020) pastes land birds and water birds on land and water
backgrounds; a classifier that leans on the background fails on the minority groups (a water
bird on land, a land bird on water). The paper mean-ablates the heads whose TextSpan texts are
about geography and setting and reports that the worst-group accuracy rises.

* :mod:`clipdecomp.data.waterbirds` reads the binary Waterbirds layout (``metadata.csv`` and
  the images it lists).
* :func:`group_accuracy` and :func:`worst_group_accuracy` score predictions per
  (label, place) group.
* :data:`WATERBIRDS_HEADS` holds the reference's head sets (``compute_use_specific_heads.py``)
  for ViT-H/14, ViT-L/14 and ViT-B/16; :func:`waterbirds_heads` returns them by model name.
* :func:`waterbirds_ablation` ablates them as the reference does (the chosen heads, every head
  of the layers before the last four and every MLP term replaced by its mean over the
  evaluated images) and returns accuracy per group before and after; ``clipdecomp waterbirds
  STORE`` (:mod:`clipdecomp.cli`) prints it.

Shapes: N images, L layers, H heads, D embedding dim.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PLACES",
    "WATERBIRDS_CLASSES",
    "WATERBIRDS_HEADS",
    "group_accuracy",
    "waterbirds_ablation",
    "waterbirds_heads",
    "worst_group_accuracy",
]

#: Class names of binary Waterbirds, label order (the reference's classifier prompts).
WATERBIRDS_CLASSES: tuple[str, ...] = ("landbird", "waterbird")
#: Place names, in the order of the ``place`` column.
PLACES: tuple[str, ...] = ("land", "water")

#: The heads the reference mean-ablates (``compute_use_specific_heads.py``): heads whose
#: TextSpan texts are about geography ("geo") and about the setting ("setting"), per model.
WATERBIRDS_HEADS: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {
    "ViT-H-14": {
        "geo": ((31, 8), (30, 15), (30, 12), (30, 6), (29, 14), (29, 8)),
        "setting": ((31, 12), (30, 11), (29, 4)),
    },
    "ViT-L-14": {
        "geo": ((21, 1), (22, 12), (22, 13), (21, 11), (21, 14), (23, 6)),
        "setting": ((21, 3), (21, 6), (21, 8), (21, 13), (22, 2), (22, 12), (22, 15), (23, 1),
                    (23, 3), (23, 5)),
    },
    "ViT-B-16": {
        "geo": ((11, 6), (11, 0)),
        "setting": ((11, 3), (10, 11), (10, 10), (9, 8), (9, 6)),
    },
}


def waterbirds_heads(model: str, kind: str = "all") -> list[tuple[int, int]]:
    """The reference's Waterbirds head set of a model, as (layer, head) pairs.

    Parameters
    ----------
    model : {"ViT-H-14", "ViT-L-14", "ViT-B-16"}
        ``"ViT-B/16"`` and ``"vit_b_16"`` spellings work too.
    kind : {"all", "geo", "setting"}
        ``all``: geography heads then setting heads, as the reference lists them (a head in
        both lists appears twice there; here once).

    Returns
    -------
    list of (int, int)

    Examples
    --------
    >>> waterbirds_heads("ViT-B-16")
    [(11, 6), (11, 0), (11, 3), (10, 11), (10, 10), (9, 8), (9, 6)]
    """
    key = str(model).replace("/", "-").replace("_", "-").upper().replace("VIT", "ViT")
    if key not in WATERBIRDS_HEADS:
        raise ValueError(f"no Waterbirds head set for {model!r}; presets: {sorted(WATERBIRDS_HEADS)}")
    sets = WATERBIRDS_HEADS[key]
    if kind == "all":
        heads = list(sets["geo"]) + list(sets["setting"])
    elif kind in sets:
        heads = list(sets[kind])
    else:
        raise ValueError(f"kind must be 'all', 'geo' or 'setting', got {kind!r}")
    return list(dict.fromkeys(heads))


# ----------------------------------------------------------------------------------------------
# groups

def _check_groups(predictions: Any, labels: Any, places: Any):
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    g = np.asarray(places).reshape(-1)
    if not (len(p) == len(y) == len(g)):
        raise ValueError(f"{len(p)} predictions, {len(y)} labels, {len(g)} places")
    return p, y, g


def group_accuracy(predictions: Any, labels: Any, places: Any):
    """Accuracy per (label, place) group.

    Parameters
    ----------
    predictions, labels, places : array-like int [N]
        Predicted classes, true classes, and the place of each image (0 land, 1 water).

    Returns
    -------
    pandas.DataFrame
        Indexed by (``label``, ``place``) for every group present, columns ``n``,
        ``correct`` and ``accuracy`` (a fraction).

    Examples
    --------
    >>> df = group_accuracy([0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0])
    >>> df["accuracy"].tolist()
    [1.0, 0.0, 1.0, 1.0]
    """
    import pandas as pd

    p, y, g = _check_groups(predictions, labels, places)
    rows = []
    for lab in np.unique(y):
        for pl in np.unique(g):
            sel = (y == lab) & (g == pl)
            n = int(sel.sum())
            if n:
                c = int((p[sel] == lab).sum())
                rows.append({"label": int(lab), "place": int(pl), "n": n, "correct": c,
                             "accuracy": c / n})
    return pd.DataFrame(rows, columns=["label", "place", "n", "correct", "accuracy"]
                        ).set_index(["label", "place"])


def worst_group_accuracy(predictions: Any, labels: Any, places: Any) -> float:
    """The lowest accuracy over the (label, place) groups.

    Examples
    --------
    >>> worst_group_accuracy([0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0])
    0.0
    """
    df = group_accuracy(predictions, labels, places)
    if not len(df):
        raise ValueError("no images")
    return float(df["accuracy"].min())


# ----------------------------------------------------------------------------------------------
# the ablation

def _reference_repaired(heads_last: np.ndarray, last_layers: Sequence[int], ablate: Iterable,
                        head_means: np.ndarray, mlp_means: np.ndarray) -> np.ndarray:
    """The reference's "Replaced" embeddings [N, D] (float64) from the last layers' heads.

    Every head of the layers before ``last_layers`` and every MLP row carry their mean; of the
    last layers, the heads in ``ablate`` carry their mean and the others their own terms.
    """
    n_layers = head_means.shape[0]
    first = min(last_layers)
    out = mlp_means.sum(axis=0) + head_means[:first].sum(axis=(0, 1))
    out = np.broadcast_to(out, (heads_last.shape[0], out.shape[0])).copy()
    mask = np.zeros((len(last_layers), head_means.shape[1]), bool)
    n_heads = head_means.shape[1]
    for layer, h in ablate:
        layer, h = int(layer), int(h)
        if not (-n_layers <= layer < n_layers and 0 <= h < n_heads):
            raise ValueError(f"head ({layer}, {h}) is out of range for a model with {n_layers} "
                             f"layers of {n_heads} heads")
        layer %= n_layers
        if layer >= first:
            mask[list(last_layers).index(layer), int(h)] = True
    for j, layer in enumerate(last_layers):
        keep = np.flatnonzero(~mask[j])
        out += heads_last[:, j, keep].sum(axis=1, dtype=np.float64)
        out += head_means[layer, np.flatnonzero(mask[j])].sum(axis=0)
    return out


def as_head_list(heads: Any) -> list[tuple[int, int]]:
    if isinstance(heads, str):
        return waterbirds_heads(heads)
    return [(int(a), int(b)) for a, b in heads]


def _result_table(preds: dict, labels: np.ndarray, places: np.ndarray):
    import pandas as pd

    rows = []
    for name, p in preds.items():
        ga = group_accuracy(p, labels, places)
        row = {"setting": name, "accuracy": float(np.mean(p == labels)),
               "worst_group": float(ga["accuracy"].min())}
        for (lab, pl), acc in ga["accuracy"].items():
            row[f"{WATERBIRDS_CLASSES[lab]} on {PLACES[pl]}"] = acc
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


def waterbirds_ablation(source: Any, classifier: np.ndarray, places: Any,
                        heads: Any = "ViT-B-16", labels: Any = None, means: Any = None,
                        n_last: int = 4):
    """Accuracy per (label, place) group before and after the reference's Waterbirds ablation.

    The ablated ("Replaced") embedding is the sum of the terms after mean-ablating the chosen
    heads, every head of the layers before the last ``n_last`` and every MLP term, the means
    taken over the evaluated images, as ``compute_use_specific_heads.py`` does; the baseline
    is the sum of all terms. Both are classified with ``classifier``.

    Parameters
    ----------
    source : Decomposition, StoredDecomposition, StoreReader or dict
        The evaluated images' terms: heads of (at least) the last ``n_last`` layers, mlps and
        the embedding (or all heads). A store is read chunk by chunk.
    classifier : ndarray [D, 2]
        The zero-shot classifier of ("landbird", "waterbird").
    places : array-like int [N]
        Place of each image (0 land, 1 water); for a store, rows that are not valid are
        dropped from ``places`` and ``labels`` like from the terms.
    heads : str or iterable of (layer, head)
        A preset of :data:`WATERBIRDS_HEADS` ("ViT-B-16", "ViT-L-14", "ViT-H-14") or heads.
    labels : array-like int [N], optional
        Default: the source's labels.
    means : ComponentMeans or HeadStats, optional
        Default: the means over the evaluated images (the reference's choice).
    n_last : int
        Layers at the end whose heads are kept (the reference: 4).

    Returns
    -------
    pandas.DataFrame
        Rows ``baseline`` and ``heads ablated``; columns ``accuracy``, ``worst_group`` and one
        per group (``"landbird on water"``...), fractions.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dec = {"heads": rng.normal(size=(40, 12, 12, 8)), "mlps": rng.normal(size=(40, 13, 8)),
    ...        "labels": rng.integers(0, 2, 40)}
    >>> df = waterbirds_ablation(dec, rng.normal(size=(8, 2)), rng.integers(0, 2, 40))
    >>> df.index.tolist()
    ['baseline', 'heads ablated']
    """
    from clipdecomp.methods.ablation import _get, component_means

    ablate = as_head_list(heads)
    w = np.asarray(classifier, np.float64)
    if w.ndim != 2:
        raise ValueError(f"classifier must be [D, C], got {w.shape}")
    if hasattr(source, "iter_chunks"):  # a store
        return _waterbirds_from_store(source, w, places, ablate, labels, means, n_last)
    h = np.asarray(_get(source, "heads"))
    mlps = np.asarray(_get(source, "mlps"))
    if h.ndim != 4:
        raise ValueError(f"heads must be [N, L, H, D], got {h.shape}")
    layers = tuple(_get(source, "layers") or range(h.shape[1]))
    cfg = _get(source, "config")
    n_layers = int(getattr(cfg, "layers", 0) or mlps.shape[1] - 1)
    last = tuple(range(n_layers - n_last, n_layers))
    if not set(last) <= set(layers):
        raise ValueError(f"the ablation needs the heads of layers {list(last)}; the source has "
                         f"{list(layers)}")
    if means is None:
        if len(layers) != n_layers:
            raise ValueError("without all layers' heads, pass means= (e.g. a store's stats)")
        means = component_means(source)
    elif hasattr(means, "sum_outer"):
        means = component_means(means)
    labels = np.asarray(_get(source, "labels") if labels is None else labels).reshape(-1)
    places = np.asarray(places).reshape(-1)
    pos = [layers.index(x) for x in last]
    emb, norm = _get(source, "embedding"), _get(source, "norm")
    if len(layers) == n_layers:
        total = h.sum(axis=(1, 2), dtype=np.float64) + mlps.sum(axis=1, dtype=np.float64)
    elif emb is not None:
        e = np.asarray(emb, np.float64)
        total = e / (np.asarray(norm, np.float64)[:, None] if norm is not None
                     else np.linalg.norm(e, axis=1, keepdims=True))
    else:
        raise ValueError("the source needs all heads or the embedding for the baseline")
    repaired = _reference_repaired(h[:, pos], last, ablate, np.asarray(means.heads, np.float64),
                                   np.asarray(means.mlps, np.float64))
    preds = {"baseline": np.argmax(total @ w, axis=1),
             "heads ablated": np.argmax(repaired @ w, axis=1)}
    return _result_table(preds, labels, places)


def _waterbirds_from_store(reader: Any, w: np.ndarray, places: Any, ablate: list,
                           labels: Any, means: Any, n_last: int):
    from clipdecomp.methods.ablation import component_means

    n_layers = int(reader.metadata["shapes"]["layers"])
    last = tuple(range(n_layers - n_last, n_layers))
    means = component_means(reader.stats if means is None else means)
    all_kept = len(reader.layers) == n_layers
    fields = ["heads", "mlps", "labels"] + ([] if all_kept else ["embedding"])
    preds: dict[str, list] = {"baseline": [], "heads ablated": []}
    got_labels, rows = [], []
    for r, c in reader.iter_chunks(fields, layers=None if all_kept else list(last),
                                   valid_only=True):
        if not len(r):
            continue
        if all_kept:
            total = c["heads"].sum(axis=(1, 2), dtype=np.float64) + c["mlps"].sum(
                axis=1, dtype=np.float64)
            hl = c["heads"][:, list(last)]
        else:
            e = c["embedding"].astype(np.float64)
            total = e / np.linalg.norm(e, axis=1, keepdims=True)
            hl = c["heads"]
        rep = _reference_repaired(hl, last, ablate, np.asarray(means.heads, np.float64),
                                  np.asarray(means.mlps, np.float64))
        preds["baseline"].append(np.argmax(total @ w, axis=1))
        preds["heads ablated"].append(np.argmax(rep @ w, axis=1))
        got_labels.append(c["labels"])
        rows.append(r)
    if not rows:
        raise ValueError("the store holds no valid rows")
    kept = np.concatenate(rows)
    places = np.asarray(places).reshape(-1)
    if len(places) == reader.n:
        places = places[kept]
    lab = np.concatenate(got_labels) if labels is None else np.asarray(labels).reshape(-1)
    if labels is not None and len(lab) == reader.n:
        lab = lab[kept]
    return _result_table({k: np.concatenate(v) for k, v in preds.items()}, lab, places)
