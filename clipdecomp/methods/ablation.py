"""Mean ablation of heads, layers, MLPs and class-to-class attention; repaired encoders.

Mean-ablating a term replaces its value for every image by its mean over a reference set of
images. The decomposition writes the normalised image embedding as a sum of terms
(``dec.heads.sum((1, 2)) + dec.mlps.sum(1) == dec.embedding / dec.norm``), so an ablated
("repaired") embedding is that sum after the replacement. Everything here works in that
normalised space, as the reference code (``compute_ablations.py``) does.

Shapes: B images, L layers, H heads, D embedding dim, C classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ComponentMeans",
    "RepairedCLIP",
    "ablate",
    "ablation_study",
    "component_means",
    "load_ablation",
]


# ---------------------------------------------------------------------------- means
@dataclass(repr=False)
class ComponentMeans:
    """Mean of every term of the decomposition over a reference set of images.

    Attributes
    ----------
    heads : ndarray float64 [L, H, D]
        Mean head terms (tokens summed).
    mlps : ndarray float64 [L+1, D] or None
        Mean MLP terms (row 0: the ln_pre term).
    cls_to_cls : ndarray float64 [L, D] or None
        Mean class-to-class attention terms (summed over heads).
    n : int
        Number of images the means were taken over.

    Examples
    --------
    >>> import numpy as np
    >>> m = ComponentMeans(np.zeros((2, 3, 4)), np.zeros((3, 4)), np.zeros((2, 4)), n=10)
    >>> m
    ComponentMeans(L=2, H=3, D=4, n=10, mlps, cls_to_cls)
    """

    heads: np.ndarray
    mlps: np.ndarray | None = None
    cls_to_cls: np.ndarray | None = None
    n: int = 0

    @property
    def n_layers(self) -> int:
        return self.heads.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write the means to one ``.npz`` file.

        Examples
        --------
        >>> import numpy as np, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "means.npz")
        >>> ComponentMeans(np.ones((1, 2, 3)), n=5).save(p)
        >>> ComponentMeans.load(p).n
        5
        """
        np.savez(path, **self._arrays("means_"))

    def _arrays(self, prefix: str) -> dict:
        out = {prefix + "heads": self.heads, prefix + "n": np.int64(self.n)}
        if self.mlps is not None:
            out[prefix + "mlps"] = self.mlps
        if self.cls_to_cls is not None:
            out[prefix + "cls_to_cls"] = self.cls_to_cls
        return out

    @classmethod
    def _from_arrays(cls, f: Any, prefix: str) -> ComponentMeans:
        def get(name):
            return np.asarray(f[prefix + name]) if prefix + name in f else None

        return cls(get("heads"), get("mlps"), get("cls_to_cls"), int(f[prefix + "n"]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ComponentMeans:
        """Read means written by :meth:`save` (example there)."""
        with np.load(path) as f:
            return cls._from_arrays({k: f[k] for k in f.files}, "means_")

    def __repr__(self) -> str:
        n_layers, n_heads, dim = self.heads.shape
        parts = [f"L={n_layers}", f"H={n_heads}", f"D={dim}", f"n={self.n}"]
        parts += [name for name in ("mlps", "cls_to_cls") if getattr(self, name) is not None]
        return f"ComponentMeans({', '.join(parts)})"


def _get(obj: Any, name: str):
    """Attribute or key ``name`` of a decomposition-like object, or None."""
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except ValueError:  # e.g. a decomposition that raises for missing optional arrays
        return None


def component_means(
    source: Any,
    mlps: np.ndarray | None = None,
    cls_to_cls: np.ndarray | None = None,
) -> ComponentMeans:
    """Means of the head, MLP and class-to-class terms over a set of images.

    Parameters
    ----------
    source : Decomposition, list of Decomposition, ndarray [B, L, H, D], HeadStats
        The reference images' terms: one decomposition, several (weighted by their sizes),
        the head terms as an array (with ``mlps`` / ``cls_to_cls`` arrays beside), or
        streaming statistics (:class:`~clipdecomp.methods.stats.HeadStats`, fed with decompositions so
        that it also summed the MLP and class-to-class terms).
    mlps : ndarray [B, L+1, D], optional
        With an array ``source``.
    cls_to_cls : ndarray [B, L, D], optional
        With an array ``source``.

    Returns
    -------
    ComponentMeans

    Examples
    --------
    >>> import numpy as np
    >>> heads = np.arange(24.0).reshape(2, 1, 3, 4)      # [B, L, H, D]
    >>> component_means(heads).heads[0, 0]
    array([6., 7., 8., 9.])
    """
    if hasattr(source, "head_sum") and hasattr(source, "sum_outer"):  # HeadStats
        if source.n == 0:
            raise ValueError("the statistics hold no images")
        n = source.n
        return ComponentMeans(
            source.head_sum / n,
            None if source.mlp_sum is None else source.mlp_sum / n,
            None if source.cls_sum is None else source.cls_sum / n,
            n,
        )
    if isinstance(source, (list, tuple)) and source and _get(source[0], "heads") is not None:
        parts = [component_means(dec) for dec in source]
        n = sum(p.n for p in parts)

        def pooled(name):
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            return sum(v * p.n for v, p in zip(values, parts)) / n

        return ComponentMeans(pooled("heads"), pooled("mlps"), pooled("cls_to_cls"), n)
    heads = _get(source, "heads")
    if heads is None:
        heads = source
    else:
        mlps = _get(source, "mlps") if mlps is None else mlps
        cls_to_cls = _get(source, "cls_to_cls") if cls_to_cls is None else cls_to_cls
    heads = np.asarray(heads)
    if heads.ndim != 4:
        raise ValueError(f"heads must be [B, L, H, D], got shape {heads.shape}")

    def mean(x):
        return None if x is None else np.asarray(x).mean(axis=0, dtype=np.float64)

    return ComponentMeans(mean(heads), mean(mlps), mean(cls_to_cls), heads.shape[0])


# ---------------------------------------------------------------------------- ablate
@dataclass
class _Spec:
    """A normalised ablation: which heads, MLP rows and class-to-class layers."""

    head_mask: np.ndarray  # bool [L, H]
    mlp_rows: list
    cls_layers: list


def _normalise_spec(
    heads: Iterable[tuple[int, int]] | None,
    layers: Iterable[int] | None,
    mlps: bool | Iterable[int],
    cls_to_cls: bool | Iterable[int],
    n_layers: int,
    n_heads: int,
) -> _Spec:
    mask = np.zeros((n_layers, n_heads), bool)
    for pair in heads or ():
        layer, h = (int(v) for v in pair)
        if not (-n_layers <= layer < n_layers and -n_heads <= h < n_heads):
            raise ValueError(f"head ({layer}, {h}) out of range for L={n_layers}, H={n_heads}")
        mask[layer, h] = True
    for layer in layers or ():
        layer = int(layer)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for L={n_layers}")
        mask[layer] = True

    def rows(sel, count, what):
        if sel is True:
            return list(range(count))
        if sel is False or sel is None:
            return []
        if isinstance(sel, (int, np.integer)):
            sel = [sel]
        out = []
        for r in sel:
            r = int(r)
            if not -count <= r < count:
                raise ValueError(f"{what} {r} out of range (0..{count - 1})")
            out.append(r % count)
        return sorted(set(out))

    mlp_rows = rows(mlps, n_layers + 1, "MLP row")
    cls_layers = rows(cls_to_cls, n_layers, "class-to-class layer")
    for layer in cls_layers:
        if mask[layer].any() and not mask[layer].all():
            raise ValueError(
                f"layer {layer}: class-to-class ablation together with some (not all) of its "
                "heads is ambiguous (class-to-class terms are summed over heads)"
            )
    # a fully ablated layer already carries the mean of its class-to-class part
    cls_layers = [layer for layer in cls_layers if not mask[layer].all()]
    return _Spec(mask, mlp_rows, cls_layers)


def _need(means: ComponentMeans, name: str) -> np.ndarray:
    value = getattr(means, name)
    if value is None:
        raise ValueError(f"the means hold no {name} terms: compute them from decompositions")
    return np.asarray(value, np.float64)


def _ablate_spec(dec: Any, spec: _Spec, means: ComponentMeans) -> np.ndarray:
    """Repaired embeddings [B, D] in float64."""
    heads = np.asarray(_get(dec, "heads"))
    mlps = _get(dec, "mlps")
    embedding, norm = _get(dec, "embedding"), _get(dec, "norm")
    if embedding is not None and norm is not None:
        total = np.asarray(embedding, np.float64) / np.asarray(norm, np.float64)[:, None]
    else:
        if mlps is None:
            raise ValueError("the decomposition has no mlps terms")
        total = heads.sum(axis=(1, 2), dtype=np.float64) + np.asarray(mlps).sum(
            axis=1, dtype=np.float64
        )
    if spec.head_mask.any():
        head_means = _need(means, "heads")
        if head_means.shape != spec.head_mask.shape + (heads.shape[-1],):
            raise ValueError(f"head means {head_means.shape} do not match heads {heads.shape}")
        for layer in np.flatnonzero(spec.head_mask.any(axis=1)):
            sel = np.flatnonzero(spec.head_mask[layer])
            total -= heads[:, layer, sel].sum(axis=1, dtype=np.float64)
            total += head_means[layer, sel].sum(axis=0)
    if spec.mlp_rows:
        if mlps is None:
            raise ValueError("the decomposition has no mlps terms")
        mlp_means = _need(means, "mlps")
        total -= np.asarray(mlps)[:, spec.mlp_rows].sum(axis=1, dtype=np.float64)
        total += mlp_means[spec.mlp_rows].sum(axis=0)
    if spec.cls_layers:
        cls = _get(dec, "cls_to_cls")
        if cls is None:
            raise ValueError("the decomposition has no cls_to_cls terms")
        cls_means = _need(means, "cls_to_cls")
        total -= np.asarray(cls)[:, spec.cls_layers].sum(axis=1, dtype=np.float64)
        total += cls_means[spec.cls_layers].sum(axis=0)
    return total


def ablate(
    dec: Any,
    heads: Iterable[tuple[int, int]] = (),
    layers: Iterable[int] = (),
    mlps: bool | Iterable[int] = False,
    cls_to_cls: bool | Iterable[int] = False,
    means: ComponentMeans | None = None,
) -> np.ndarray:
    """Repaired embeddings: the sum of all terms after mean-ablating some of them.

    Parameters
    ----------
    dec : Decomposition
        Terms of the images to repair (anything with ``heads``, ``mlps``, ``cls_to_cls`` and
        optionally ``embedding`` / ``norm``, or a dict with those keys).
    heads : iterable of (layer, head)
        Heads to replace by their mean (negative indices allowed).
    layers : iterable of int
        Attention layers to replace entirely (all their heads).
    mlps : bool or iterable of int
        ``True``: every MLP row (including row 0, the ln_pre term); or the rows to replace.
    cls_to_cls : bool or iterable of int
        Replace the class-to-class part of the attention of these layers (``True``: all) by its
        mean: ``+ means.cls_to_cls[l] - dec.cls_to_cls[:, l]``. Layers ablated entirely already
        hold that mean; combining it with some of a layer's heads is refused (ambiguous).
    means : ComponentMeans, optional
        Reference means (:func:`component_means`). Default: the means over ``dec`` itself.

    Returns
    -------
    ndarray float32 [B, D]
        Repaired embeddings in the normalised space of the decomposition (ablating nothing
        gives ``dec.embedding / dec.norm``; they are not renormalised).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dec = {"heads": rng.normal(size=(5, 2, 3, 4)), "mlps": rng.normal(size=(5, 3, 4))}
    >>> out = ablate(dec, layers=[0, 1], mlps=True)     # everything ablated: the mean sum
    >>> bool(np.allclose(out, out[0]))
    True
    """
    h = np.asarray(_get(dec, "heads"))
    if h.ndim != 4:
        raise ValueError(f"heads must be [B, L, H, D], got shape {h.shape}")
    spec = _normalise_spec(heads, layers, mlps, cls_to_cls, h.shape[1], h.shape[2])
    if means is None:
        means = component_means(dec)
    return _ablate_spec(dec, spec, means).astype(np.float32)


# ---------------------------------------------------------------------------- the study
def ablation_study(
    dec: Any,
    labels: np.ndarray,
    classifier: np.ndarray,
    means: ComponentMeans | None = None,
) -> pd.DataFrame:
    """The paper's mean-ablation table and attention-layer curve, on zero-shot accuracy.

    Rows, as in the reference ``compute_ablations.py``: the baseline; all MLP terms ablated
    (rows 0..L, the ln_pre term included); the class-to-class attention of every layer
    ablated; both; then attention layers ablated cumulatively from the first (layers 0..k, all
    heads, for k = 0..L-1; MLPs and class-to-class kept).

    Parameters
    ----------
    dec : Decomposition
        Terms of the evaluation images (``heads``, ``mlps``, ``cls_to_cls``).
    labels : ndarray int [B]
    classifier : ndarray [D, C]
        Zero-shot classifier (:func:`clipdecomp.methods.zeroshot.zero_shot_classifier`).
    means : ComponentMeans, optional
        Default: means over ``dec`` itself (what the reference does).

    Returns
    -------
    pandas.DataFrame
        Columns ``ablation`` (str), ``layers_ablated`` (int: attention layers mean-ablated,
        for the curve; 0 for the first four rows), ``accuracy`` (top-1, a fraction).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dec = {"heads": rng.normal(size=(20, 3, 2, 4)), "mlps": rng.normal(size=(20, 4, 4)),
    ...        "cls_to_cls": rng.normal(size=(20, 3, 4))}
    >>> df = ablation_study(dec, rng.integers(0, 2, 20), rng.normal(size=(4, 2)))
    >>> df.ablation.tolist()[:4]
    ['baseline', 'MLPs', 'class-to-class attention', 'MLPs + class-to-class attention']
    >>> df.layers_ablated.tolist()[4:]
    [1, 2, 3]
    """
    import pandas as pd

    from clipdecomp.methods.zeroshot import accuracy

    heads = np.asarray(_get(dec, "heads"))
    mlps = np.asarray(_get(dec, "mlps"))
    cls = _get(dec, "cls_to_cls")
    if means is None:
        means = component_means(dec)
    labels = np.asarray(labels)
    n_layers = heads.shape[1]
    per_layer = heads.sum(axis=2, dtype=np.float64)  # [B, L, D]
    attn = per_layer.sum(axis=1)  # [B, D]
    mlp_sum = mlps.sum(axis=1, dtype=np.float64)  # [B, D]
    mlp_mean = _need(means, "mlps").sum(axis=0)  # [D]

    def acc(x):
        return accuracy(x, labels, classifier, topk=1)

    rows = [("baseline", 0, acc(attn + mlp_sum)), ("MLPs", 0, acc(attn + mlp_mean))]
    if cls is not None and means.cls_to_cls is not None:
        cls = np.asarray(cls, np.float64)
        no_cls = attn - cls.sum(axis=1) + means.cls_to_cls.sum(axis=0)
        rows.append(("class-to-class attention", 0, acc(no_cls + mlp_sum)))
        rows.append(("MLPs + class-to-class attention", 0, acc(no_cls + mlp_mean)))
    layer_means = _need(means, "heads").sum(axis=1)  # [L, D]
    current = attn.copy()
    for layer in range(n_layers):
        current += layer_means[layer] - per_layer[:, layer]
        name = f"attention layers 0-{layer}" if layer else "attention layer 0"
        rows.append((name, layer + 1, acc(current + mlp_sum)))
    return pd.DataFrame(rows, columns=["ablation", "layers_ablated", "accuracy"])


# ---------------------------------------------------------------------------- repaired model
class RepairedCLIP:
    """A CLIP whose image embeddings have some terms mean-ablated.

    Same ``encode_image(images, normalize=False)`` signature and shapes as the wrapped model;
    ``preprocess``, ``tokenize``, ``encode_text``, ``config``, ``logit_scale`` (and any other
    attribute) pass through to it.

    ``encode_image(normalize=True)`` returns the repaired embedding renormalised to unit
    length; ``normalize=False`` returns the repaired sum (which lives in the normalised space
    of the decomposition) times ``||original embedding||``, so that ablating nothing gives the
    model's own unnormalised embedding.

    Parameters
    ----------
    model : CLIP
        The model (``clipdecomp.load(...)``).
    heads, layers, mlps, cls_to_cls
        What to ablate, as in :func:`ablate`.
    means : ComponentMeans
        Reference means (required: the repaired model must not depend on the batch).

    Examples
    --------
    >>> repaired = RepairedCLIP(model, heads=[(10, 3)], means=means)   # doctest: +SKIP
    >>> emb = repaired.encode_image(images, normalize=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        heads: Iterable[tuple[int, int]] = (),
        layers: Iterable[int] = (),
        mlps: bool | Iterable[int] = False,
        cls_to_cls: bool | Iterable[int] = False,
        means: ComponentMeans | None = None,
    ):
        if means is None:
            raise ValueError("RepairedCLIP needs means=component_means(...) of reference images")
        self.model = model
        self.means = means
        n_layers, n_heads = means.heads.shape[:2]
        cfg = getattr(model, "config", None)
        if cfg is not None and (cfg.layers, cfg.heads) != (n_layers, n_heads):
            raise ValueError(
                f"means are for L={n_layers}, H={n_heads}; the model has L={cfg.layers}, "
                f"H={cfg.heads}"
            )
        self._spec = _normalise_spec(heads, layers, mlps, cls_to_cls, n_layers, n_heads)
        self._requested_cls = _normalise_spec(
            (), (), False, cls_to_cls, n_layers, n_heads
        ).cls_layers
        self.ablated_heads = [tuple(int(v) for v in p) for p in np.argwhere(self._spec.head_mask)]
        self.mlp_rows = list(self._spec.mlp_rows)
        self.cls_layers = list(self._requested_cls)
        for name, value in (("mlps", self.mlp_rows), ("cls_to_cls", self._spec.cls_layers)):
            if value:
                _need(means, name)

    def encode_image(self, images: Any, normalize: bool = False, **kwargs: Any) -> np.ndarray:
        """Repaired image embeddings, float32 [B, D].

        Parameters
        ----------
        images
            Anything ``model.decompose`` takes (paths, PIL images, uint8 arrays, pixels).
        normalize : bool
            Unit-normalise. Otherwise (the default, as the model's ``encode_image``) scale by
            the original embedding's norm.
        **kwargs
            Passed to ``model.decompose`` (``batch_size``, ``progress``).

        Examples
        --------
        >>> repaired.encode_image(["cat.jpg"], normalize=True).shape  # doctest: +SKIP
        (1, 512)
        """
        dec = self.model.decompose(images, **kwargs)
        out = _ablate_spec(dec, self._spec, self.means)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-30)
        else:
            out *= np.asarray(dec.norm, np.float64)[:, None]
        return out.astype(np.float32)

    def __call__(self, images: Any, normalize: bool = False, **kwargs: Any) -> np.ndarray:
        return self.encode_image(images, normalize=normalize, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "means", "_spec"):  # not set yet (during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def spec(self) -> dict:
        """What is ablated: ``{"heads": [...], "mlps": [...], "cls_to_cls": [...]}``.

        Examples
        --------
        >>> RepairedCLIP(model, layers=[0], means=means).spec()["heads"][:2]  # doctest: +SKIP
        [(0, 0), (0, 1)]
        """
        return {"heads": self.ablated_heads, "mlps": self.mlp_rows, "cls_to_cls": self.cls_layers}

    def save(self, path: str | os.PathLike) -> None:
        """Write the ablation (what is ablated, and the means) to one ``.npz`` file.

        Examples
        --------
        >>> repaired.save("no_location_heads.npz")                        # doctest: +SKIP
        >>> again = RepairedCLIP.load("no_location_heads.npz", model)     # doctest: +SKIP
        """
        arrays = self.means._arrays("means_")
        arrays["heads"] = np.asarray(self.ablated_heads, np.int64).reshape(-1, 2)
        arrays["mlps"] = np.asarray(self.mlp_rows, np.int64)
        arrays["cls_to_cls"] = np.asarray(self.cls_layers, np.int64)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any) -> RepairedCLIP:
        """Rebuild a repaired model saved with :meth:`save` around ``model`` (example there)."""
        spec, means = load_ablation(path)
        return cls(model, means=means, **spec)

    def __repr__(self) -> str:
        name = getattr(getattr(self.model, "config", None), "name", type(self.model).__name__)
        return (
            f"RepairedCLIP({name}, {len(self.ablated_heads)} heads, mlps={self.mlp_rows}, "
            f"cls_to_cls={self.cls_layers})"
        )


def load_ablation(path: str | os.PathLike) -> tuple[dict, ComponentMeans]:
    """Read an ablation written by :meth:`RepairedCLIP.save`.

    Returns
    -------
    spec : dict
        ``heads`` (list of (layer, head)), ``mlps`` (rows), ``cls_to_cls`` (layers): keyword
        arguments of :func:`ablate` and :class:`RepairedCLIP`.
    means : ComponentMeans

    Examples
    --------
    >>> spec, means = load_ablation("no_location_heads.npz")              # doctest: +SKIP
    >>> embeddings = ablate(dec, means=means, **spec)                     # doctest: +SKIP
    """
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    spec = {
        "heads": [tuple(int(v) for v in p) for p in data["heads"].reshape(-1, 2)],
        "mlps": [int(v) for v in data["mlps"]],
        "cls_to_cls": [int(v) for v in data["cls_to_cls"]],
    }
    return spec, ComponentMeans._from_arrays(data, "means_")

