"""The plain patch-token baseline of zero-shot segmentation, and per-image map files.

The paper's maps sum the decomposition's per-token terms of the class token's attention. A
baseline that many users ask for takes each patch token's *own* output instead: the final
residual stream at patch n through the class token's head, ``z_n = ln_post(x_L[n]) @ proj``
(:meth:`clipdecomp.engine.model.CLIP.token_embeddings`), scored exactly like the paper's maps: the
dot product with the classifier column of the class the image embedding predicts, minus the
mean over all classes (``z_n . (w_c - mean_k w_k)``), then upsampled, clipped, min-max
normalised and thresholded at the mean (:func:`clipdecomp.methods.segmentation.segment_maps`).

Shapes: B images, N = 1 + G * G tokens, G patches per side, D embedding dim, C classes.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from clipdecomp.methods.segmentation import SegmentationResult, _check_classifier, segment_maps

__all__ = ["patch_token_maps", "save_maps", "segment_patch_tokens"]


def patch_token_maps(token_embeddings: np.ndarray, classifier: np.ndarray,
                     classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Patch-token maps ``z_n . (w_c - mean_k w_k)`` on the patch grid.

    Parameters
    ----------
    token_embeddings : ndarray [B, N, D]
        ``model.token_embeddings(images)``; row 0 is the class token.
    classifier : ndarray [D, C]
    classes : int [B], optional
        Default: the class the class token predicts, ``argmax(z_0 @ classifier)``.

    Returns
    -------
    maps : float32 [B, G, G]
    classes : int64 [B]

    Examples
    --------
    >>> import numpy as np
    >>> z = np.zeros((1, 5, 2)); z[0, 0] = [1, 0]; z[0, 1:, 1] = [1, 2, 3, 4]
    >>> maps, cls = patch_token_maps(z, np.eye(2))
    >>> cls.tolist(), maps[0].tolist()
    ([0], [[-0.5, -1.0], [-1.5, -2.0]])
    """
    z = np.asarray(token_embeddings, np.float64)
    if z.ndim != 3:
        raise ValueError(f"token_embeddings must be [B, N, D], got shape {z.shape}")
    b, n, d = z.shape
    g = round(np.sqrt(n - 1))
    if n < 2 or g * g != n - 1:
        raise ValueError(f"{n} tokens are not a class token plus a square patch grid")
    w = _check_classifier(classifier, d).astype(np.float64)
    if classes is None:
        classes = np.argmax(z[:, 0] @ w, axis=1)
    classes = np.asarray(classes, np.int64).reshape(-1)
    if len(classes) != b:
        raise ValueError(f"classes has {len(classes)} entries for {b} images")
    if classes.size and (classes.min() < 0 or classes.max() >= w.shape[1]):
        raise IndexError(f"classes must lie in 0..{w.shape[1] - 1}")
    dirs = w[:, classes].T - w.mean(axis=1)[None]  # [B, D]
    maps = np.einsum("bnd,bd->bn", z[:, 1:], dirs).reshape(b, g, g)
    return maps.astype(np.float32), classes


def segment_patch_tokens(model: Any, images: Any, classifier: np.ndarray,
                         batch_size: int = 8, classes: np.ndarray | None = None,
                         normalize: str = "image") -> SegmentationResult:
    """The patch-token baseline's scores and masks for some images.

    Parameters
    ----------
    model : a ``clipdecomp`` CLIP
    images : anything ``model.token_embeddings`` takes
    classifier : ndarray [D, C]
    batch_size : int
    classes : int [B], optional
        Default: the predicted classes.
    normalize : "image" or "batch" (see :func:`clipdecomp.methods.segmentation.segment_maps`)

    Returns
    -------
    SegmentationResult

    Examples
    --------
    >>> res = segment_patch_tokens(model, images, clf)          # doctest: +SKIP
    """
    z = model.token_embeddings(images, batch_size=batch_size)
    maps, cls = patch_token_maps(z, classifier, classes)
    size = maps.shape[-1] * int(model.config.patch_size)
    return segment_maps(maps, size, cls, normalize=normalize)


def save_maps(out_dir: str | os.PathLike, start: int, results: dict[str, SegmentationResult],
              gt: np.ndarray | None = None) -> list[str]:
    """Write one ``.npz`` per image: every method's raw map, scores and mask (and the truth).

    File ``{out_dir}/{start + i:05d}.npz`` holds, per method (spaces in its name become
    ``_``), ``<method>_map`` float32 [G, G] (when the method has one), ``<method>_scores``
    float16 [S, S] and ``<method>_mask`` bool [S, S]; ``gt`` bool [S, S] when given; ``class``.

    Returns
    -------
    list of str
        The files written.

    Examples
    --------
    >>> save_maps("maps", 0, {"decomposition": res}, gt)         # doctest: +SKIP
    """
    os.makedirs(out_dir, exist_ok=True)
    b = len(next(iter(results.values())))
    paths = []
    for i in range(b):
        arrays: dict[str, np.ndarray] = {}
        for name, res in results.items():
            key = name.replace(" ", "_")
            if res.maps is not None:
                arrays[f"{key}_map"] = np.asarray(res.maps[i], np.float32)
            arrays[f"{key}_scores"] = np.asarray(res.scores[i], np.float16)
            arrays[f"{key}_mask"] = np.asarray(res.masks[i], bool)
        if "decomposition" in results:
            arrays["class"] = np.asarray(results["decomposition"].classes[i], np.int64)
        if gt is not None:
            arrays["gt"] = np.asarray(gt[i], bool)
        path = os.path.join(out_dir, f"{start + i:05d}.npz")
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        paths.append(path)
    return paths
