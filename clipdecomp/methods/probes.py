"""Linear probes on decomposition terms: what each head provably holds.

TextSpan names a head by the texts that span its outputs; a probe asks the data directly. For
every head and every labelled attribute, a ridge classifier (one-vs-all targets in {-1, 1}, with
intercept, on standardised features: scikit-learn's ``RidgeClassifier``) is fitted on the head's
terms of one half of the images and scored on the other half. The attribute a head holds most is
the one whose held-out accuracy rises furthest above chance, relative to the room above chance
(``lift = (accuracy - chance) / (1 - chance)``). For grid positions the mean distance between the
predicted and the true cell (in cells) is reported too.

Shapes: N images, L layers, H heads, D embedding dim, C classes.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["RidgeProbe", "head_probes", "probe_roles"]


class RidgeProbe:
    """A multi-class ridge classifier: least squares on {-1, 1} one-vs-all targets.

    Parameters
    ----------
    alpha : ridge penalty on the (standardised, centred) features
    standardize : scale each feature to unit standard deviation on the training set first

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 5)); y = (x[:, 0] > 0).astype(int)
    >>> RidgeProbe(alpha=1.0).fit(x[:100], y[:100]).score(x[100:], y[100:]) > 0.9
    True
    """

    def __init__(self, alpha: float = 1.0, standardize: bool = True):
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.standardize = standardize

    def fit(self, x: np.ndarray, y: np.ndarray) -> RidgeProbe:
        """Fit on features ``x`` float [N, F] and integer labels ``y`` [N]."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y)
        if x.ndim != 2 or y.shape != (len(x),):
            raise ValueError(f"expected x [N, F] and y [N], got {x.shape} and {y.shape}")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("a probe needs at least two classes in its training labels")
        self.mean_ = x.mean(0)
        xc = x - self.mean_
        self.scale_ = xc.std(0) if self.standardize else np.ones(x.shape[1])
        self.scale_[self.scale_ == 0] = 1.0
        xc /= self.scale_
        t = np.where(y[:, None] == self.classes_[None, :], 1.0, -1.0)  # [N, C]
        t_mean = t.mean(0)
        gram = xc.T @ xc + self.alpha * np.eye(x.shape[1])
        self.coef_ = np.linalg.solve(gram, xc.T @ (t - t_mean))  # [F, C]
        self.intercept_ = t_mean
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Scores float [N, C]."""
        z = (np.asarray(x, np.float64) - self.mean_) / self.scale_
        return z @ self.coef_ + self.intercept_

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels [N]."""
        return self.classes_[self.decision_function(x).argmax(1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on ``x``, ``y``."""
        return float((self.predict(x) == np.asarray(y)).mean())


def _cell_distance(pred: np.ndarray, true: np.ndarray, grid: int = 3) -> float:
    """Mean Euclidean distance in cells between grid positions (row-major cell indices)."""
    dy = pred // grid - true // grid
    dx = pred % grid - true % grid
    return float(np.sqrt(dy * dy + dx * dx).mean())


def head_probes(terms: np.ndarray, labels: Mapping[str, np.ndarray],
                n_classes: Mapping[str, int] | None = None, alpha: float = 1.0,
                train_frac: float = 0.5, seed: int = 0, position_key: str = "position"
                ) -> list[dict]:
    """Fit one probe per (layer, head, attribute) on the heads' terms; score it held out.

    Parameters
    ----------
    terms : float [N, L, H, D], e.g. ``dec.heads``
    labels : attribute -> int [N] class indices, -1 where the attribute is undefined for an
        image (such images are left out of that attribute's probe)
    n_classes : attribute -> number of classes, for chance (default: classes seen in labels)
    alpha : ridge penalty (features standardised)
    train_frac : share of the defined images used for fitting (a seeded random split)
    seed : seed of the split
    position_key : the attribute whose classes are cells of a 3x3 grid (also reports
        ``cell_distance``)

    Returns
    -------
    list of dicts with ``layer``, ``head``, ``attribute``, ``accuracy``, ``chance``,
    ``lift`` = (accuracy - chance) / (1 - chance), ``n_test`` and, for positions,
    ``cell_distance``

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 100)
    >>> terms = rng.normal(size=(100, 1, 2, 4)); terms[:, 0, 1, 0] += 3 * y
    >>> rows = head_probes(terms, {"a": y})
    >>> [round(r["lift"], 1) > 0.5 for r in rows]
    [False, True]
    """
    terms = np.asarray(terms)
    if terms.ndim != 4:
        raise ValueError(f"terms must be [N, L, H, D], got shape {terms.shape}")
    n, n_layers, n_heads, _ = terms.shape
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must lie in (0, 1), got {train_frac}")
    rng = np.random.default_rng(seed)
    rows = []
    for attr, y in labels.items():
        y = np.asarray(y)
        if y.shape != (n,):
            raise ValueError(f"labels[{attr!r}] must have shape ({n},), got {y.shape}")
        idx = rng.permutation(np.flatnonzero(y >= 0))
        cut = round(train_frac * len(idx))
        tr, te = idx[:cut], idx[cut:]
        if len(te) == 0 or len(np.unique(y[tr])) < 2:
            raise ValueError(f"too few labelled images for the {attr!r} probe")
        k = n_classes[attr] if n_classes and attr in n_classes else len(np.unique(y[idx]))
        chance = 1.0 / k
        for layer in range(n_layers):
            for head in range(n_heads):
                x = terms[:, layer, head]
                probe = RidgeProbe(alpha).fit(x[tr], y[tr])
                pred = probe.predict(x[te])
                acc = float((pred == y[te]).mean())
                row = {"layer": layer, "head": head, "attribute": attr, "accuracy": acc,
                       "chance": chance, "lift": (acc - chance) / (1 - chance),
                       "n_test": len(te)}
                if attr == position_key:
                    row["cell_distance"] = _cell_distance(pred, y[te])
                rows.append(row)
    return rows


def probe_roles(rows: list[dict], relative: bool = True) -> dict[tuple[int, int], dict]:
    """Per head, the attribute its probes find most, and by how much.

    With ``relative=True`` (the default) a head's lift on an attribute is taken relative to
    the median lift of all heads on it (``excess = lift - median``), and the role is the
    attribute of the largest excess: what this head holds more than heads usually do. That
    matters when an attribute can be read from every head (the colour of the ground, say),
    where the plain largest lift would name it for every head. With ``relative=False`` the
    role is the attribute of the largest lift.

    Parameters
    ----------
    rows : output of :func:`head_probes`
    relative : rank by lift over the median of all heads (True) or by lift (False)

    Returns
    -------
    dict (layer, head) -> {"attribute", "lift", "excess", "accuracy"}

    Examples
    --------
    >>> rows = [{"layer": 0, "head": h, "attribute": a, "lift": v, "accuracy": v}
    ...         for h, (x, y) in enumerate([(0.9, 0.2), (0.9, 0.8), (0.9, 0.3)])
    ...         for a, v in (("a", x), ("b", y))]
    >>> {k: v["attribute"] for k, v in probe_roles(rows).items()}
    {(0, 0): 'a', (0, 1): 'b', (0, 2): 'a'}
    >>> {k: v["attribute"] for k, v in probe_roles(rows, relative=False).items()}
    {(0, 0): 'a', (0, 1): 'a', (0, 2): 'a'}
    """
    medians = {a: float(np.median([r["lift"] for r in rows if r["attribute"] == a]))
               for a in {r["attribute"] for r in rows}}
    out: dict[tuple[int, int], dict] = {}
    for r in rows:
        key = (int(r["layer"]), int(r["head"]))
        excess = r["lift"] - medians[r["attribute"]]
        score = excess if relative else r["lift"]
        if key not in out or score > out[key]["_score"]:
            out[key] = {"attribute": r["attribute"], "lift": r["lift"], "excess": excess,
                        "accuracy": r["accuracy"], "_score": score}
    for v in out.values():
        del v["_score"]
    return out
