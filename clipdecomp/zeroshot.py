"""Zero-shot classifiers from class names, and top-k accuracy.

A zero-shot classifier is one unit text direction per class: the class name is written into a
set of prompt templates, each prompt is encoded and normalised, the prompts of a class are
averaged and the mean is renormalised (as open_clip's ``build_zero_shot_classifier``). Image
embeddings (or repaired embeddings, or single terms) are then scored by ``x @ classifier``.

Shapes: B images, D embedding dim, C classes, K templates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable, Union

import numpy as np

from .config import check_size

__all__ = ["DEFAULT_TEMPLATES", "SIMPLE_TEMPLATES", "accuracy", "zero_shot_classifier"]

#: The package's default prompt set: varied renderings, sizes, qualities and framings of an
#: object, in the spirit of CLIP's ImageNet prompts.
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a snapshot of a {}.",
    "a close-up photo of a {}.",
    "a photo of a {} seen from far away.",
    "a cropped photo of a {}.",
    "a photo of one {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {} in the center.",
    "a blurry photo of a {}.",
    "a sharp, detailed photo of a {}.",
    "a grainy photo of a {}.",
    "a low resolution photo of a {}.",
    "a high resolution photo of a {}.",
    "a dark photo of a {}.",
    "a brightly lit photo of a {}.",
    "an overexposed photo of a {}.",
    "a black and white photo of a {}.",
    "a faded old photo of a {}.",
    "a colorful photo of a {}.",
    "a noisy photo of a {}.",
    "a partly hidden {}.",
    "an odd-looking {}.",
    "a clean {}.",
    "a dirty {}.",
    "a drawing of a {}.",
    "a pencil sketch of a {}.",
    "a painting of a {}.",
    "a watercolor of a {}.",
    "a cartoon {}.",
    "a comic-style illustration of a {}.",
    "a 3d rendering of a {}.",
    "a pixelated image of a {}.",
    "an embroidered {}.",
    "a sculpture of a {}.",
    "a toy {}.",
    "a plastic model of a {}.",
    "an origami {}.",
    "a tattoo of a {}.",
    "graffiti of a {}.",
    "a doodle of a {}.",
    "a sticker of a {}.",
    "the {} in a video game.",
    "a poster showing a {}.",
    "a photo of my {}.",
    "a photo of a nice {}.",
    "a photo of a strange {}.",
    "there is a {} in this picture.",
    "this is a photo of a {}.",
    "an example of a {}.",
    "a {} on a plain background.",
    "a {} outdoors.",
    "a {} indoors.",
]

#: A one-prompt set, for quick checks.
SIMPLE_TEMPLATES: list[str] = ["a photo of a {}."]

Template = Union[str, Callable[[str], str]]


def _fill(template: Template, name: str) -> str:
    if callable(template):
        return str(template(name))
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the class name")
    return template.replace("{}", name)


def zero_shot_classifier(
    model: Any,
    classnames: Sequence[str],
    templates: Iterable[Template] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Zero-shot classifier: one unit text direction per class.

    Parameters
    ----------
    model : CLIP
        Anything with ``encode_text(list_of_str, normalize=True) -> [T, D]``.
    classnames : sequence of str [C]
    templates : iterable of str or callable, optional
        Prompts with ``'{}'`` where the class name goes, or callables ``name -> prompt``.
        Default: :data:`DEFAULT_TEMPLATES`.
    batch_size : int
        Prompts per ``encode_text`` call.

    Returns
    -------
    ndarray float32 [D, C]
        Column c: the renormalised mean of the normalised embeddings of class c's prompts.

    Examples
    --------
    >>> W = zero_shot_classifier(model, ["cat", "dog"])          # doctest: +SKIP
    >>> pred = (model.encode_image(images) @ W).argmax(1)        # doctest: +SKIP
    """
    batch_size = check_size(batch_size, "batch_size")
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    classnames = list(classnames)
    if not templates or not classnames:
        raise ValueError("need at least one template and one class name")
    prompts = [_fill(t, c) for c in classnames for t in templates]
    parts = [
        np.asarray(model.encode_text(prompts[i : i + batch_size], normalize=True), np.float64)
        for i in range(0, len(prompts), batch_size)
    ]
    emb = np.concatenate(parts, axis=0)  # [C*K, D]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # normalise each prompt (again, exactly)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)  # [C, D]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb.T, dtype=np.float32)


def accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    classifier: np.ndarray,
    topk: int | Sequence[int] = (1,),
) -> float | tuple[float, ...]:
    """Top-k accuracy of ``embeddings @ classifier``.

    Parameters
    ----------
    embeddings : ndarray [B, D]
        Image embeddings (normalised or not: the argmax does not care) or repaired sums.
    labels : ndarray int [B]
    classifier : ndarray [D, C]
    topk : int or sequence of int
        A single k gives a float; a sequence gives a tuple.

    Returns
    -------
    float or tuple of float
        Fraction of images whose label is among the k highest scores (ties: the lowest class
        index wins, as argmax).

    Examples
    --------
    >>> import numpy as np
    >>> emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    >>> accuracy(emb, np.array([0, 1, 1]), np.eye(2), topk=1)
    0.6666666666666666
    >>> accuracy(emb, np.array([0, 1, 1]), np.eye(2), topk=(1, 2))
    (0.6666666666666666, 1.0)
    """
    logits = np.asarray(embeddings, np.float64) @ np.asarray(classifier, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} embeddings for {labels.shape[0]} labels")
    single = np.ndim(topk) == 0
    ks = [check_size(k, "topk") for k in ([topk] if single else topk)]
    kmax = min(max(ks), logits.shape[1])
    # stable descending order: equal scores rank by class index, as argmax does
    order = np.argsort(-logits, axis=1, kind="stable")[:, :kmax]
    hits = order == labels[:, None]
    out = tuple(float(hits[:, : min(k, kmax)].any(axis=1).mean()) for k in ks)
    return out[0] if single else out
