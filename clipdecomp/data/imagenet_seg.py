"""The ImageNet-segmentation benchmark (Guillaumin et al., 2014) as the paper evaluates it.

The data is one MATLAB v7.3 file, ``gtsegs_ijcv.mat`` (an HDF5 file): 4,276 ImageNet validation
images with a binary foreground mask each. ``value/img`` and ``value/gt`` hold HDF5 object
references, one row per image: an image is stored as ``[3, W, H]`` uint8 (MATLAB's column-major
``H x W x 3`` seen from HDF5), and a ground truth is a 1x1 cell whose element is the ``[W, H]``
mask. :class:`ImageNetSegmentation` reads them lazily as ``(uint8 [H, W, 3], bool [H, W])``.

``clipdecomp segeval`` (:func:`clipdecomp.cli.segeval_main`) runs the paper's zero-shot segmentation on it with
any CLIP, beside the raw-attention and attention-rollout baselines from the same forward pass and
two trivial ones, and prints pixel accuracy, mIoU and mAP.

Shapes: B images, S model input side, H x W original image size, D embedding dim, C classes.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdecomp import assets
from clipdecomp.engine.config import check_size
from clipdecomp.engine.helpers import optional_import, progress_bar
from clipdecomp.methods.segmentation import (
    SegmentationMeter,
    all_foreground,
    centre_blob,
    keep_tokens,
    segment_decomposition,
    segment_maps,
)
from clipdecomp.methods.spatial import attention_map, attention_rollout
from clipdecomp.methods.zeroshot import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
)

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "ImageNetSegmentation",
    "evaluate_segmentation",
    "imagenet_classnames",
    "segeval_classifier",
    "transform_mask",
    "write_gtsegs_like",
]


METHODS = ("decomposition", "patch tokens", "raw attention", "attention rollout",
           "all foreground", "centre blob")


def _h5py() -> Any:
    return optional_import("h5py", "reading gtsegs_ijcv.mat needs h5py: pip install h5py "
                                   "(or pip install 'clipdecomp[data]')")


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet-1k class names, in class-index order (OpenAI's CLIP wording).

    Examples
    --------
    >>> names = imagenet_classnames()
    >>> len(names), names[0]
    (1000, 'tench')
    """
    path = assets.path("imagenet_classes.txt")
    names = path.read_text(encoding="utf-8").splitlines()
    return [n for n in names if n.strip()]


# --------------------------------------------------------------------------------------------
# the file

class ImageNetSegmentation:
    """Lazy reader of ``gtsegs_ijcv.mat``: ``ds[i] -> (uint8 [H, W, 3] image, bool [H, W] mask)``.

    The file is opened on first access (and again after pickling, so the object can go to
    worker processes); :meth:`close` or a ``with`` block closes it.

    Parameters
    ----------
    path : the ``.mat`` file (MATLAB v7.3, i.e. HDF5)

    Examples
    --------
    >>> ds = ImageNetSegmentation("gtsegs_ijcv.mat")     # doctest: +SKIP
    >>> len(ds)                                          # doctest: +SKIP
    4276
    >>> image, mask = ds[0]                              # doctest: +SKIP
    >>> image.shape[2], mask.dtype                       # doctest: +SKIP
    (3, dtype('bool'))
    """

    def __init__(self, path: str | os.PathLike):
        h5py = _h5py()
        self.path = os.fspath(path)
        with h5py.File(self.path, "r") as f:
            for key in ("value/img", "value/gt"):
                if key not in f:
                    raise ValueError(f"{self.path} has no '{key}': not an ImageNet-segmentation "
                                     "gtsegs_ijcv.mat file")
            n_img, n_gt = f["value/img"].size, f["value/gt"].size
        if n_img != n_gt:
            raise ValueError(f"{self.path}: {n_img} images but {n_gt} masks")
        self._n = int(n_img)
        self._file: Any = None
        self._img_refs: np.ndarray | None = None
        self._gt_refs: np.ndarray | None = None

    def _open(self) -> Any:
        if self._file is None:
            h5py = _h5py()
            self._file = h5py.File(self.path, "r")
            self._img_refs = self._file["value/img"][()].reshape(-1)
            self._gt_refs = self._file["value/gt"][()].reshape(-1)
        return self._file

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index) + self._n if index < 0 else int(index)
        if not 0 <= i < self._n:
            raise IndexError(f"index {int(index)} out of range for {self._n} images")
        f = self._open()
        assert self._img_refs is not None and self._gt_refs is not None   # set by _open
        img = np.asarray(f[self._img_refs[i]][()])  # [3, W, H] (or [W, H] for grey)
        if img.ndim == 2:
            img = np.repeat(img.T[:, :, None], 3, axis=2)
        else:
            img = img.transpose(2, 1, 0)  # [H, W, 3]
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        cell = f[self._gt_refs[i]]  # a 1x1 cell array: references
        mask = np.asarray(f[cell[()].reshape(-1)[0]][()]).T  # [H, W]
        if mask.shape != img.shape[:2]:
            raise ValueError(f"image {i}: mask {mask.shape} does not match image {img.shape}")
        return np.ascontiguousarray(img), np.ascontiguousarray(mask != 0)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(self._n):
            yield self[i]

    def close(self) -> None:
        """Close the file (it reopens on the next access)."""
        if self._file is not None:
            self._file.close()
        self._file = self._img_refs = self._gt_refs = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = state["_img_refs"] = state["_gt_refs"] = None
        return state

    def __repr__(self) -> str:
        return f"ImageNetSegmentation({self.path!r}, n={self._n})"


def write_gtsegs_like(path: str | os.PathLike, images: Sequence[np.ndarray],
                      masks: Sequence[np.ndarray]) -> None:
    """Write images and masks in the layout of ``gtsegs_ijcv.mat`` (for tests and small sets).

    A MATLAB v7.3 file: the 512-byte MAT header, ``value/img`` and ``value/gt`` as [n, 1]
    object references; image i as ``[3, W, H]`` uint8, mask i as a 1x1 cell holding ``[W, H]``
    uint8.

    Parameters
    ----------
    path : output file
    images : n uint8 arrays [H, W, 3]
    masks : n arrays [H, W] (nonzero = foreground)

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "tiny.mat")
    >>> write_gtsegs_like(p, [np.zeros((5, 7, 3), np.uint8)], [np.eye(5, 7, dtype=bool)])
    >>> int(ImageNetSegmentation(p)[0][1].sum())
    5
    """
    h5py = _h5py()
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    n = len(images)
    ref = h5py.ref_dtype
    with h5py.File(os.fspath(path), "w", userblock_size=512) as f:
        store = f.create_group("#refs#")
        value = f.create_group("value")
        img_refs = np.empty((n, 1), dtype=ref)
        gt_refs = np.empty((n, 1), dtype=ref)
        for i, (img, mask) in enumerate(zip(images, masks)):
            img = np.asarray(img)
            mask = np.asarray(mask)
            if img.ndim != 3 or img.shape[2] != 3 or mask.shape != img.shape[:2]:
                raise ValueError(f"item {i}: need image [H, W, 3] and mask [H, W], got "
                                 f"{img.shape} and {mask.shape}")
            d = store.create_dataset(f"img{i}", data=img.astype(np.uint8).transpose(2, 1, 0))
            d.attrs["MATLAB_class"] = np.bytes_("uint8")
            img_refs[i, 0] = d.ref
            m = store.create_dataset(f"mask{i}", data=(mask != 0).astype(np.uint8).T)
            m.attrs["MATLAB_class"] = np.bytes_("uint8")
            cell = store.create_dataset(f"gt{i}", data=np.array([[m.ref]], dtype=ref))
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            gt_refs[i, 0] = cell.ref
        for name, refs in (("img", img_refs), ("gt", gt_refs)):
            d = value.create_dataset(name, data=refs)
            d.attrs["MATLAB_class"] = np.bytes_("cell")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: clipdecomp HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(512, b"\x00"))


# --------------------------------------------------------------------------------------------
# geometry

def transform_mask(mask: np.ndarray, size: int, resize_mode: str = "shortest") -> np.ndarray:
    """Bring a ground-truth mask to the model's input grid with nearest-neighbour resampling.

    Parameters
    ----------
    mask : [H, W] (nonzero = foreground)
    size : model input side S
    resize_mode : "shortest" resizes the shorter side to S and takes the centre S x S, the
        geometry of CLIP's image preprocessing (``clipdecomp.engine.preprocess``, torchvision's
        rounding), so that mask and pixels line up; "squash" resizes straight to S x S. The
        reference evaluation code squashes the masks while cropping the images, so on
        non-square images its masks are shifted against the pixels.

    Returns
    -------
    bool [S, S]

    Examples
    --------
    >>> m = np.zeros((4, 8), bool); m[:, :4] = True
    >>> transform_mask(m, 2).astype(int).tolist()
    [[1, 0], [1, 0]]
    """
    from PIL import Image

    from clipdecomp.engine.preprocess import center_crop_box, resize_size

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got {m.shape}")
    pil = Image.fromarray((m != 0).astype(np.uint8))
    if resize_mode == "squash":
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(pil) != 0
    if resize_mode != "shortest":
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
    nw, nh = resize_size(pil.size[0], pil.size[1], size)
    if (nw, nh) != pil.size:
        pil = pil.resize((nw, nh), Image.Resampling.NEAREST)
    if (nw, nh) != (size, size):
        pil = pil.crop(center_crop_box(nw, nh, size))
    return np.asarray(pil) != 0


def _classifier_in_chunks(model: Any, names: Sequence[str], templates: Sequence[str],
                          progress: bool, chunk: int = 25) -> np.ndarray:
    """``zeroshot.zero_shot_classifier`` a few classes at a time, with a progress bar."""
    from clipdecomp.methods.zeroshot import zero_shot_classifier

    cols = []
    for start in progress_bar(range(0, len(names), chunk), enabled=progress, desc="classifier",
                              unit_scale=chunk, unit="class"):
        cols.append(zero_shot_classifier(model, names[start:start + chunk], templates))
    return np.concatenate(cols, axis=1)


# --------------------------------------------------------------------------------------------
# the evaluation

def evaluate_segmentation(model: Any, dataset: Any, classifier: np.ndarray, batch_size: int = 8,
                          limit: int | None = None, mask_resize: str = "squash",
                          progress: bool = False, normalize: str = "image",
                          save_maps: str | os.PathLike | None = None) -> Any:
    """Run the benchmark: the decomposition's zero-shot masks and the baselines.

    Parameters
    ----------
    model : a ``clipdecomp`` CLIP
    dataset : indexable of (uint8 [H, W, 3] image, bool [H, W] mask), e.g.
        :class:`ImageNetSegmentation`
    classifier : [D, C] zero-shot classifier
    batch_size : images per forward pass
    limit : evaluate the first ``limit`` images only
    mask_resize : "squash" (default: masks resized to S x S while the images are resized and
        centre-cropped, as the reference code; on non-square images the masks are then
        shifted against the pixels) or "image" (masks follow the model's image preprocessing,
        ``resize_mode`` of its config, so that they line up; see :func:`transform_mask`)
    progress : show a progress bar with the running scores of the decomposition
    normalize : "image" (min-max per image) or "batch" (over each batch of ``batch_size``
        images, as the reference; identical for batch size 1, the reference's default)
    save_maps : folder for one ``.npz`` per image with every method's map, scores and mask
        (:func:`clipdecomp.methods.seg_baselines.save_maps`)

    Returns
    -------
    pandas.DataFrame indexed by method ("decomposition", "patch tokens" (each patch token's
    own ``ln_post(x) @ proj``, see :mod:`clipdecomp.methods.seg_baselines`), "raw attention",
    "attention rollout", "all foreground", "centre blob") with columns pixel_accuracy, miou,
    map (percent) and n_images; ``attrs["mask_resize"]`` and ``attrs["normalize"]`` say which
    settings made it

    Examples
    --------
    >>> table = evaluate_segmentation(model, ImageNetSegmentation(p), clf)   # doctest: +SKIP
    """
    import pandas as pd

    from clipdecomp.methods.seg_baselines import patch_token_maps
    from clipdecomp.methods.seg_baselines import save_maps as _save_maps

    batch_size = check_size(batch_size, "batch_size")
    n = len(dataset) if limit is None else min(check_size(limit, "limit"), len(dataset))
    if n <= 0:
        raise ValueError("no images to evaluate")
    size = int(model.config.image_size)
    if mask_resize not in ("image", "squash"):
        raise ValueError(f"mask_resize must be 'image' or 'squash', got {mask_resize!r}")
    mode = getattr(model.config, "resize_mode", "shortest") if mask_resize == "image" else "squash"
    # the patch-token baseline needs the tokens' own projections (clipdecomp's CLIP has them)
    methods = [m for m in METHODS if m != "patch tokens" or hasattr(model, "token_embeddings")]
    meters = {m: SegmentationMeter() for m in methods}
    spatial = keep_tokens(model.config, batch_size)  # small models: one forward pass, no projection
    with progress_bar(total=n, enabled=progress, unit="img", desc="segeval") as bar:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            images = [im for im, _ in items]
            gt = np.stack([transform_mask(mk, size, mode) for _, mk in items])
            b = len(items)
            dec = model.decompose(images, spatial=spatial, attn=True)
            ours = segment_decomposition(dec, classifier, size=size, normalize=normalize)
            results = {"decomposition": ours}
            if "patch tokens" in meters:
                pmaps, _ = patch_token_maps(model.token_embeddings(images, batch_size=b),
                                            classifier, ours.classes)
                results["patch tokens"] = segment_maps(pmaps, size, ours.classes,
                                                       normalize=normalize)
            results |= {
                "raw attention": segment_maps(attention_map(dec), size, normalize=normalize),
                "attention rollout": segment_maps(attention_rollout(dec), size,
                                                  normalize=normalize),
                "all foreground": all_foreground(b, size),
                "centre blob": centre_blob(b, size),
            }
            for name, res in results.items():
                meters[name].update(res.scores, gt, masks=res.masks, degenerate=res.degenerate)
            if save_maps is not None:
                _save_maps(save_maps, start, results, gt)
            bar.update(b)
            if progress:
                m = meters["decomposition"].compute()
                bar.set_postfix(pixacc=f"{100 * m['pixel_accuracy']:.2f}",
                                miou=f"{100 * m['miou']:.2f}", map=f"{100 * m['map']:.2f}")
    rows = []
    for name, meter in meters.items():
        m = meter.compute()
        rows.append({"method": name, "pixel_accuracy": 100 * m["pixel_accuracy"],
                     "miou": 100 * m["miou"], "map": 100 * m["map"],
                     "n_images": m["n_images"]})
    table = pd.DataFrame(rows).set_index("method")
    table.attrs["mask_resize"] = mask_resize
    table.attrs["normalize"] = normalize
    return table


def _read_lines(path: str) -> list[str]:
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path} has no class names")
    return names


def segeval_classifier(model: Any, classifier: str | None = None, classes: str | None = None,
                       templates: str = "openai", progress: bool = True) -> np.ndarray:
    """The [D, C] zero-shot classifier of ``clipdecomp segeval``.

    Parameters
    ----------
    model : CLIP
    classifier : str, optional
        A ``.npy`` [D, C] (or [C, D]) classifier: loaded when the file exists, else built and
        saved there.
    classes : str, optional
        Text file, one class name a line (default: the ImageNet-1k classes).
    templates : {"openai", "simple"}
        Prompt templates of the classifier.
    progress : bool

    Examples
    --------
    >>> clf = segeval_classifier(model, classes="classes.txt", templates="simple")  # doctest: +SKIP
    """
    d = int(model.config.embed_dim)
    if classifier and os.path.exists(classifier):
        clf = np.load(classifier).astype(np.float32)
        if clf.ndim != 2 or d not in clf.shape:
            raise ValueError(f"{classifier}: expected a [D={d}, C] classifier, "
                             f"got {clf.shape}")
        if clf.shape[0] != d:  # stored as [C, D]
            clf = np.ascontiguousarray(clf.T)
        print(f"classifier: {classifier} ({clf.shape[1]} classes)", file=sys.stderr)
        return clf
    names = _read_lines(classes) if classes else imagenet_classnames()
    prompt_set = TEMPLATE_SETS[templates]
    print(f"building the zero-shot classifier: {len(names)} classes x {len(prompt_set)} "
          "templates", file=sys.stderr)
    clf = _classifier_in_chunks(model, names, prompt_set, progress=progress)
    if classifier:
        np.save(classifier, clf)
        print(f"saved the classifier to {classifier}", file=sys.stderr)
    return clf

