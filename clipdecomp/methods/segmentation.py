"""Zero-shot segmentation from the decomposition, and the metrics the paper reports.

The method, exactly as the paper evaluates it on ImageNet-segmentation:

1. sum the token terms ``tokens[:, :, 1:]`` over layers and heads: one D-vector per patch;
2. score every patch against the zero-shot classifier's column of the class that the image
   embedding predicts, minus the mean over all classes of that patch's scores;
3. reshape to the patch grid, upsample bilinearly by the patch size, clip below at 0,
   min-max normalise per image, and call foreground every pixel above the map's mean.

Step 2 is linear in the classifier column, so the score of patch p is the dot product of its
vector with ``w_c - mean_k w_k``: one direction per predicted class, which the core evaluates in
head space (``dec.project_tokens``) without materialising the tokens. (When a batch's token terms fit in
``TOKEN_BUDGET``, as for small models, :func:`segment` keeps them instead and saves the second
forward pass that ``project_tokens`` needs.)

Metrics (over a data set): pixel accuracy and mean IoU over the two classes (background,
foreground) from intersections and unions summed over all images, and the mean over images of the
average precision of the per-pixel scores, ``(1 - s, s)`` of both channels flattened together
against one-hot (background, foreground) targets.

Shapes: B images, G patches per side, S image side in pixels, D embedding dim, C classes.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.methods.spatial import heatmap, upsample

__all__ = [
    "SegmentationMeter",
    "SegmentationResult",
    "all_foreground",
    "average_precision",
    "centre_blob",
    "keep_tokens",
    "segment",
    "segment_decomposition",
    "segment_maps",
    "segmentation_metrics",
]

Threshold = Union[str, float]

# Below this many bytes of token terms per batch, decompose keeps the tokens (one forward pass);
# above it the maps come from dec.project_tokens, which re-runs the forward without storing them.
TOKEN_BUDGET = 256 * 2**20


def keep_tokens(config: Any, batch_size: int) -> bool:
    """Whether ``batch_size`` images' token terms [B, L, N, H, D] fit in ``TOKEN_BUDGET``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> toy = SimpleNamespace(layers=6, n_tokens=65, heads=6, embed_dim=128)
    >>> vit_h = SimpleNamespace(layers=32, n_tokens=257, heads=16, embed_dim=1024)
    >>> keep_tokens(toy, 8), keep_tokens(vit_h, 8)
    (True, False)
    """
    try:
        per_image = 4 * config.layers * config.n_tokens * config.heads * config.embed_dim
    except AttributeError:
        return False
    return per_image * batch_size <= TOKEN_BUDGET


@dataclass
class SegmentationResult:
    """Per-pixel foreground scores and masks for B images.

    Attributes
    ----------
    scores : float32 [B, S, S], each image's map min-max normalised to [0, 1]
    masks : bool [B, S, S], ``scores > scores.mean()`` per image
    classes : int64 [B], the class each map was made for (-1 where none)
    maps : float32 [B, G, G] or None, the raw patch maps before upsampling
    degenerate : bool [B], images whose map was constant after clipping (no patch above 0);
        their scores are 0 and their masks empty. The reference code divides 0 by 0 there and
        scores both channels 0, which :meth:`metrics` reproduces.
    """

    scores: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    maps: np.ndarray | None = None
    degenerate: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def metrics(self, gt_masks: np.ndarray) -> dict[str, float]:
        """Pixel accuracy, mean IoU and mAP of these masks and scores against ``gt_masks``.

        Examples
        --------
        >>> res = centre_blob(2, 8)
        >>> sorted(res.metrics(np.ones((2, 8, 8), bool)))[:3]
        ['iou_background', 'iou_foreground', 'map']
        """
        return segmentation_metrics(self.scores, gt_masks, masks=self.masks,
                                    degenerate=self.degenerate)

    @staticmethod
    def concatenate(parts: Sequence[SegmentationResult]) -> SegmentationResult:
        """Join results of consecutive batches.

        Examples
        --------
        >>> SegmentationResult.concatenate([centre_blob(1, 4), centre_blob(2, 4)]).scores.shape
        (3, 4, 4)
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        maps = None
        if all(p.maps is not None for p in parts):
            maps = np.concatenate([p.maps for p in parts])
        degenerate = np.concatenate([
            p.degenerate if p.degenerate is not None else np.zeros(len(p), bool) for p in parts])
        return SegmentationResult(
            scores=np.concatenate([p.scores for p in parts]),
            masks=np.concatenate([p.masks for p in parts]),
            classes=np.concatenate([p.classes for p in parts]),
            maps=maps, degenerate=degenerate)


# --------------------------------------------------------------------------------------------
# from maps to scores and masks

def _mean_threshold(scores: np.ndarray) -> np.ndarray:
    """bool [B, S, S]: ``scores > mean`` per image, NaN ignored in the mean and background.

    The mean is rounded to the scores' float32, as the reference compares float32 tensors.
    """
    flat = scores.reshape(len(scores), -1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN image: mean NaN, no pixel
        mean = np.asarray(np.nanmean(flat, axis=1, dtype=np.float64), np.float32)
        return scores > mean[:, None, None]


def segment_maps(maps: np.ndarray, size: int, classes: np.ndarray | None = None,
                 normalize: str = "image") -> SegmentationResult:
    """Turn patch maps into scores and masks the paper's way (any method's maps).

    Upsample bilinearly to ``size`` (half-pixel centres), clip below at 0, min-max normalise per
    image, foreground = above the map's mean.

    Parameters
    ----------
    maps : [B, G, G] raw maps (larger = more foreground)
    size : output side S in pixels (the paper: G * patch size = the model's input side)
    classes : optional int [B] recorded in the result
    normalize : "image" (default) or "batch"
        ``"batch"``: min-max and the threshold's mean over the whole batch at once, as the
        reference code does (with its batch size 1 that is per image; with more images a
        map's scores depend on the other images of its batch).

    Returns
    -------
    SegmentationResult with scores float32 [B, S, S] and masks bool [B, S, S]

    Examples
    --------
    >>> import numpy as np
    >>> res = segment_maps(np.random.default_rng(0).normal(size=(2, 4, 4)), 16)
    >>> res.scores.shape, res.masks.dtype, float(res.scores.max())
    ((2, 16, 16), dtype('bool'), 1.0)
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, G, G], got shape {maps.shape}")
    if normalize not in ("image", "batch"):
        raise ValueError(f"normalize must be 'image' or 'batch', got {normalize!r}")
    b = maps.shape[0]
    up = np.maximum(upsample(maps, size), 0.0)  # float32 [B, S, S]
    if normalize == "batch" and b > 1:
        return _segment_batch(up, maps, classes)
    flat = up.reshape(b, -1)
    lo = flat.min(axis=1)[:, None, None]
    span = flat.max(axis=1)[:, None, None] - lo
    degenerate = ~(span[:, 0, 0] > 0)
    scores = np.where(span > 0, (up - lo) / np.where(span > 0, span, 1.0), 0.0)
    scores = scores.astype(np.float32)
    masks = _mean_threshold(scores)
    masks[degenerate] = False
    if classes is None:
        classes = np.full(b, -1, np.int64)
    return SegmentationResult(scores=scores, masks=masks,
                              classes=np.asarray(classes, np.int64), maps=maps,
                              degenerate=degenerate)


def _segment_batch(up: np.ndarray, maps: np.ndarray, classes: np.ndarray | None
                   ) -> SegmentationResult:
    """Batch-wise min-max and mean threshold (the reference with batch size > 1)."""
    b = up.shape[0]
    lo, hi = float(up.min()), float(up.max())
    span = hi - lo
    scores = ((up - lo) / span if span > 0 else np.zeros_like(up)).astype(np.float32)
    mean = np.float32(np.mean(scores, dtype=np.float64))
    masks = scores > mean
    degenerate = np.full(b, not span > 0)
    if classes is None:
        classes = np.full(b, -1, np.int64)
    return SegmentationResult(scores=scores, masks=masks, classes=np.asarray(classes, np.int64),
                              maps=maps, degenerate=degenerate)


def _class_directions(classifier: np.ndarray, classes: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Unique directions ``w_c - mean_k w_k`` [U, D] and, per image, its row index [B]."""
    uniq, inv = np.unique(classes, return_inverse=True)
    w = classifier.astype(np.float64)
    dirs = w[:, uniq].T - w.mean(axis=1)[None]  # [U, D]
    return dirs.astype(np.float32), inv.reshape(-1)


def _check_classifier(classifier: Any, d: int) -> np.ndarray:
    w = np.asarray(classifier, dtype=np.float32)
    if w.ndim != 2 or w.shape[0] != d:
        raise ValueError(f"classifier must be [D={d}, C], got shape {np.shape(classifier)}")
    return w


def segment_decomposition(dec: Any, classifier: np.ndarray, classes: np.ndarray | None = None,
                          size: int | None = None, normalize: str = "image"
                          ) -> SegmentationResult:
    """Zero-shot segmentation of the images of one decomposition (the paper's method).

    Parameters
    ----------
    dec : Decomposition of B images (with or without tokens)
    classifier : [D, C] zero-shot classifier (unit class embeddings as columns)
    classes : optional int [B]; default the class the image embedding predicts,
        ``argmax(dec.embedding @ classifier)``
    size : output side; default G * patch size (the model's input side)
    normalize : "image" or "batch" (see :func:`segment_maps`)

    Returns
    -------
    SegmentationResult (scores [B, S, S], masks [B, S, S], classes [B], maps [B, G, G])

    Examples
    --------
    >>> dec = model.decompose(images)                        # doctest: +SKIP
    >>> res = segment_decomposition(dec, classifier)         # doctest: +SKIP
    """
    emb = np.asarray(dec.embedding, dtype=np.float32)  # [B, D]
    w = _check_classifier(classifier, emb.shape[1])
    if classes is None:
        classes = np.argmax(emb.astype(np.float64) @ w.astype(np.float64), axis=1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    if classes.shape[0] != emb.shape[0]:
        raise ValueError(f"classes has {classes.shape[0]} entries for {emb.shape[0]} images")
    if classes.size and (classes.min() < 0 or classes.max() >= w.shape[1]):
        raise IndexError(f"classes must lie in 0..{w.shape[1] - 1}")
    dirs, inv = _class_directions(w, classes)
    maps = heatmap(dec, dirs)  # [B, U, G, G]
    maps = maps[np.arange(len(classes)), inv]  # [B, G, G]
    if size is None:
        size = maps.shape[-1] * int(dec.config.patch_size)
    return segment_maps(maps, size, classes, normalize=normalize)


def _as_batchable(images: Any) -> Any:
    """A sequence of images (list, tuple or array with a leading batch axis)."""
    if isinstance(images, (list, tuple)):
        return images
    if isinstance(images, np.ndarray):
        if images.ndim == 3:  # one image, HWC (or CHW pixels)
            return [images]
        if images.ndim == 4 and not np.issubdtype(images.dtype, np.floating):
            return list(images)  # uint8 [B, H, W, 3]: a list of HWC images
        return images  # float [B, 3, S, S] preprocessed pixels
    return [images]  # a path or a PIL image


def segment(model: Any, images: Any, classifier: np.ndarray, batch_size: int = 8,
            progress: bool = False, classes: np.ndarray | None = None) -> SegmentationResult:
    """Zero-shot segmentation of images with a CLIP model (the paper's method).

    Parameters
    ----------
    model : a ``clipdecomp`` CLIP
    images : anything ``model.preprocess`` takes (paths, PIL images, uint8 [B, H, W, 3] arrays,
        lists of them) or float32 [B, 3, S, S] already preprocessed
    classifier : [D, C] zero-shot classifier, e.g. ``clipdecomp.methods.zeroshot.zero_shot_classifier``
    batch_size : images per forward pass
    progress : show a progress bar
    classes : optional int [B]; segment these classes instead of the predicted ones

    Returns
    -------
    SegmentationResult: scores float32 [B, S, S] in [0, 1], masks bool [B, S, S],
    classes int64 [B] (predicted), maps float32 [B, G, G]

    Examples
    --------
    >>> import clipdecomp
    >>> model = clipdecomp.load()                                        # doctest: +SKIP
    >>> from clipdecomp.methods.zeroshot import zero_shot_classifier
    >>> clf = zero_shot_classifier(model, ["circle", "square"])          # doctest: +SKIP
    >>> res = segment(model, images, clf)                                # doctest: +SKIP
    >>> res.masks.shape                                                  # doctest: +SKIP
    (4, 64, 64)
    """
    images = _as_batchable(images)
    n = len(images)
    if n == 0:
        raise ValueError("no images")
    batch_size = check_size(batch_size, "batch_size")
    if classes is not None:
        classes = np.asarray(classes, np.int64).reshape(-1)
        if len(classes) != n:
            raise ValueError(f"classes has {len(classes)} entries for {n} images")
    spatial = keep_tokens(getattr(model, "config", None), batch_size)
    parts = []
    with progress_bar(total=n, enabled=progress, unit="img", desc="segment") as bar:
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            dec = model.decompose(chunk, spatial=spatial)
            cls = None if classes is None else classes[start:start + batch_size]
            parts.append(segment_decomposition(dec, classifier, cls))
            bar.update(len(chunk))
    return parts[0] if len(parts) == 1 else SegmentationResult.concatenate(parts)


# --------------------------------------------------------------------------------------------
# trivial baselines

def all_foreground(n: int, size: int) -> SegmentationResult:
    """Every pixel foreground, score 1 everywhere: a sanity floor for the metrics.

    Examples
    --------
    >>> bool(all_foreground(2, 8).masks.all())
    True
    """
    return SegmentationResult(scores=np.ones((n, size, size), np.float32),
                              masks=np.ones((n, size, size), bool),
                              classes=np.full(n, -1, np.int64),
                              degenerate=np.zeros(n, bool))


def centre_blob(n: int, size: int, sigma: float = 0.5) -> SegmentationResult:
    """A centred Gaussian, thresholded at its mean: the "objects sit in the middle" prior.

    Parameters
    ----------
    n : number of images
    size : side S
    sigma : standard deviation in units of the half side

    Examples
    --------
    >>> res = centre_blob(1, 9)
    >>> bool(res.masks[0, 4, 4]), bool(res.masks[0, 0, 0])
    (True, False)
    """
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in (-1, 1)
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    blob = np.exp(-r2 / (2.0 * sigma ** 2))
    blob = ((blob - blob.min()) / (blob.max() - blob.min())).astype(np.float32)
    scores = np.broadcast_to(blob, (n, size, size)).copy()
    return SegmentationResult(scores=scores, masks=_mean_threshold(scores),
                              classes=np.full(n, -1, np.int64), degenerate=np.zeros(n, bool))


# --------------------------------------------------------------------------------------------
# metrics

def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision, as ``sklearn.metrics.average_precision_score`` computes it.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in decreasing order
    (no interpolation). Returns 0.0 when ``y_true`` has no positive.

    Parameters
    ----------
    y_true : [M] binary labels
    y_score : [M] scores (larger = more positive)

    Examples
    --------
    >>> average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.8333333333333333
    """
    t = np.asarray(y_true).reshape(-1).astype(bool)
    s = np.asarray(y_score).reshape(-1)
    if t.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in size: {t.size} vs {s.size}")
    if t.size == 0 or not t.any():
        return 0.0
    order = np.argsort(s, kind="stable")[::-1]
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # end of each tie group
    tps = np.cumsum(t, dtype=np.float64)[last]
    precision = tps / (last + 1.0)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class SegmentationMeter:
    """Accumulates the paper's segmentation metrics over batches.

    Pixel accuracy and the IoU of each class come from counts summed over every image seen;
    mAP is the mean over images of :func:`average_precision`.

    Parameters
    ----------
    threshold : "mean" (foreground = score above the image's mean score, the paper's rule) or
        a number (foreground = score above it); used when no masks are given

    Examples
    --------
    >>> meter = SegmentationMeter()
    >>> gt = np.zeros((1, 4, 4), bool); gt[0, 1:3, 1:3] = True
    >>> _ = meter.update(gt.astype(np.float32), gt)
    >>> meter.compute()["miou"]
    1.0
    """

    def __init__(self, threshold: Threshold = "mean"):
        if not (threshold == "mean" or isinstance(threshold, (int, float))):
            raise ValueError(f"threshold must be 'mean' or a number, got {threshold!r}")
        self.threshold = threshold
        self.correct = 0
        self.labeled = 0
        self.inter = np.zeros(2, np.int64)  # (background, foreground)
        self.union = np.zeros(2, np.int64)
        self.ap: list[float] = []

    def update(self, scores: np.ndarray, gt_masks: np.ndarray, masks: np.ndarray | None = None,
               degenerate: np.ndarray | None = None) -> SegmentationMeter:
        """Add a batch.

        Parameters
        ----------
        scores : [B, S, S] foreground scores, normalised to [0, 1] (the AP uses ``1 - s``);
            NaN entries count as score 0 in both channels and as background, as in the
            reference code
        gt_masks : [B, S, S] bool (or 0/1) ground truth, True = foreground
        masks : optional bool [B, S, S] predicted masks; default from ``threshold``
        degenerate : optional bool [B]: images whose map was undefined (constant), scored as
            the reference scores them (both channels 0, all background)
        """
        s = np.asarray(scores, dtype=np.float32)
        gt = np.asarray(gt_masks)
        if s.ndim == 2:
            s, gt = s[None], gt[None]
            masks = None if masks is None else np.asarray(masks)[None]
        if s.ndim != 3 or s.shape != gt.shape:
            raise ValueError(f"scores {s.shape} and gt_masks {gt.shape} must both be [B, S, S]")
        gt = gt.astype(bool)
        b = s.shape[0]
        bad = np.isnan(s)
        if degenerate is not None:
            deg = np.asarray(degenerate, bool).reshape(-1)
            if deg.shape[0] != b:
                raise ValueError(f"degenerate has {deg.shape[0]} entries for {b} images")
            bad = bad | deg[:, None, None]
        if masks is None:
            if self.threshold == "mean":
                pred = _mean_threshold(np.where(bad, np.nan, s))
            else:
                with np.errstate(invalid="ignore"):
                    pred = s > float(self.threshold)
        else:
            pred = np.asarray(masks).astype(bool)
            if pred.shape != s.shape:
                raise ValueError(f"masks {pred.shape} must match scores {s.shape}")
        pred = pred & ~bad
        self.correct += int(np.count_nonzero(pred == gt))
        self.labeled += int(gt.size)
        self.inter += [np.count_nonzero(~pred & ~gt), np.count_nonzero(pred & gt)]
        self.union += [np.count_nonzero(~pred | ~gt), np.count_nonzero(pred | gt)]
        one = np.float32(1.0)
        for i in range(b):
            fg = np.where(bad[i], np.float32(0), s[i])
            bg = np.where(bad[i], np.float32(0), one - s[i])
            y_score = np.concatenate([bg.reshape(-1), fg.reshape(-1)])
            y_true = np.concatenate([~gt[i].reshape(-1), gt[i].reshape(-1)])
            self.ap.append(average_precision(y_true, y_score))
        return self

    def compute(self) -> dict[str, float]:
        """dict with pixel_accuracy, miou, map, iou_background, iou_foreground, n_images."""
        eps = np.spacing(1.0)
        iou = self.inter / (eps + self.union)
        return {
            "pixel_accuracy": float(self.correct / (eps + self.labeled)),
            "miou": float(iou.mean()),
            "map": float(np.mean(self.ap)) if self.ap else float("nan"),
            "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]),
            "n_images": len(self.ap),
        }


def segmentation_metrics(scores: np.ndarray, gt_masks: np.ndarray, threshold: Threshold = "mean",
                         masks: np.ndarray | None = None,
                         degenerate: np.ndarray | None = None) -> dict[str, float]:
    """Pixel accuracy, mean IoU (background, foreground) and mAP over a set of images.

    Pixel accuracy = correct pixels / all pixels, and IoU per class = intersection / union, all
    counts summed over the whole set; mIoU is the mean of the two IoUs. mAP is the mean over
    images of the average precision of ``(1 - s, s)`` flattened together against the one-hot
    (background, foreground) targets. These are the definitions of the paper's evaluation code.

    Parameters
    ----------
    scores : [B, S, S] scores in [0, 1]
    gt_masks : [B, S, S] ground-truth foreground
    threshold : "mean" (above each image's mean, the paper's rule) or a number
    masks : predicted masks to use instead of thresholding ``scores``
    degenerate : bool [B], images with an undefined map (see :class:`SegmentationMeter`)

    Returns
    -------
    dict with ``pixel_accuracy``, ``miou``, ``map`` (fractions in [0, 1]), ``iou_background``,
    ``iou_foreground``, ``n_images``

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> gt = rng.random((2, 8, 8)) > 0.5
    >>> m = segmentation_metrics(gt.astype(np.float32), gt)
    >>> m["pixel_accuracy"], m["miou"], m["map"]
    (1.0, 1.0, 1.0)
    """
    meter = SegmentationMeter(threshold)
    meter.update(scores, gt_masks, masks=masks, degenerate=degenerate)
    return meter.compute()
