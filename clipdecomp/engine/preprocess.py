"""Image preprocessing as open_clip does it for evaluation, with Pillow and NumPy only.

``"shortest"`` (every OpenAI / LAION model): convert to RGB; resize so the shorter side is S
(bicubic; the longer side becomes ``int(S * long / short)``, as torchvision's ``Resize(S)``);
centre-crop S x S with torchvision's offset ``int(round((size - S) / 2))``; scale to [0, 1];
normalise per channel. ``"squash"`` (Apple's DFN models): resize straight to S x S.

On the crop offset: transformers' ``CLIPImageProcessor`` takes ``(size - S) // 2``. The two agree
except when ``size - S`` leaves 3 modulo 4, where torchvision's round-half-to-even lands one
pixel further: the crop then differs by a one-pixel shift. clipdecomp follows torchvision,
that is open_clip and the paper's reference code.

Accepted inputs: a path, a ``PIL.Image``, a ``uint8`` array ``[H, W]``, ``[H, W, 3]`` or
``[H, W, 4]``, a float array already preprocessed ``[3, S, S]`` or ``[B, 3, S, S]`` (checked
and passed through), or a list of any of these.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from struct import error as struct_error
from typing import Any

import numpy as np

__all__ = [
    "as_image_list",
    "center_crop_box",
    "load_image",
    "preprocess",
    "preprocess_items",
    "resize_size",
    "to_pixels",
]


#: a resize (before the centre crop) to more pixels than this resamples only the cropped region
_MAX_RESIZED_PIXELS = 2**26
#: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's draft)
#: when both sides stay at least this many times the model's input side
DRAFT_MARGIN = 4
#: info key of an image decoded at reduced size: (original width, height, scale)
_DRAFT_KEY = "clipdecomp.draft"
#: bytes per pixel to decode an image and convert it to RGB (Pillow keeps 4 bytes a pixel for
#: 8-bit images, its 32-bit modes and their float copy for 16-bit ones)
_DECODE_BYTES_8BIT, _DECODE_BYTES_HIGH = 8, 20


def _pil():
    from PIL import Image

    return Image


def resize_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size`` (torchvision's rule).

    Examples
    --------
    >>> resize_size(640, 480, 224)
    (298, 224)
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop, with torchvision's rounding.

    Examples
    --------
    >>> center_crop_box(298, 224, 224)
    (37, 0, 261, 224)
    """
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return left, top, left + size, top + size


def to_rgb(image: Any) -> Any:
    """An RGB ``PIL.Image`` of any Pillow image, high bit depths scaled to 8 bits.

    Pillow's own ``convert("RGB")`` clips 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``,
    ``I``) to 255, turning most of the image white. Here 16-bit values are scaled by 255/65535
    (``I`` images whose values fit 8 bits are taken as 8-bit), float (``F``) images in [0, 1]
    by 255 (others as 0..255), then rounded. 48-bit RGB PNGs Pillow already reads as 8-bit
    RGB (the high bytes).

    Examples
    --------
    >>> from PIL import Image
    >>> im = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    >>> np.asarray(to_rgb(im))[0, 0].tolist()
    [255, 255, 255]
    """
    Image = _pil()
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        x = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if np.nanmax(x, initial=0.0) <= 1.0 else 255.0
        elif mode == "I" and np.max(x, initial=0.0) <= 255:
            top = 255.0
        else:
            top = 65535.0
        x = np.nan_to_num(x, nan=0.0, posinf=top, neginf=0.0)
        grey = np.clip(np.rint(x * (255.0 / top)), 0, 255).astype(np.uint8)
        out = Image.fromarray(grey, mode="L").convert("RGB")
    else:
        out = image.convert("RGB")
    if _DRAFT_KEY in image.info:
        out.info[_DRAFT_KEY] = image.info[_DRAFT_KEY]
    return out


def _open_path(path: str, size: int | None) -> Any:
    """Decode a file (at reduced size when a JPEG allows it) within the memory budget."""
    Image = _pil()
    with Image.open(path) as im:
        w, h = im.size
        if size is not None and im.format == "JPEG" and min(w, h) >= 2 * DRAFT_MARGIN * size:
            drafted = im.draft("RGB", (DRAFT_MARGIN * size, DRAFT_MARGIN * size))
            if drafted is not None and im.size != (w, h):
                im.info[_DRAFT_KEY] = (w, h, round(w / drafted[1][2]))
        dw, dh = im.size
        per = _DECODE_BYTES_HIGH if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") \
            else _DECODE_BYTES_8BIT
        need = dw * dh * per
        from clipdecomp.engine.helpers import format_bytes
        from clipdecomp.engine.model import get_memory_budget

        budget = get_memory_budget()
        if need > budget:
            raise MemoryError(
                f"{path}: decoding this {w}x{h} image ({dw}x{dh} as decoded) needs about "
                f"{format_bytes(need)}, more than the memory budget of {format_bytes(budget)}. "
                "Raise it with clipdecomp.set_memory_budget(bytes) or "
                "CLIPDECOMP_MEMORY_BUDGET, or make the image smaller first")
        im.load()
        return to_rgb(im)


def load_image(item: Any, size: int | None = None) -> Any:
    """Open one image (path, PIL image, or uint8 array) as an RGB ``PIL.Image``.

    High bit depths are scaled to 8 bits (:func:`to_rgb`). With ``size`` (the model's input
    side), a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size when both sides stay at
    least ``DRAFT_MARGIN * size`` pixels (:func:`to_pixels` then maps the crop exactly). A
    file whose decoding would exceed the memory budget
    (:func:`clipdecomp.set_memory_budget`) is refused before it is decoded.

    Raises
    ------
    FileNotFoundError
        A path that does not exist (the message names it).
    ValueError
        A file that is not an image, or an array of the wrong shape / dtype.
    MemoryError
        A file whose decoding would exceed the memory budget.

    Examples
    --------
    >>> load_image(np.zeros((4, 6, 3), np.uint8)).size
    (6, 4)
    """
    Image = _pil()
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            return _open_path(path, size)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{path}: refused as a possible decompression bomb: {e} Raise "
                             "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from None
        except MemoryError as e:
            if str(e).startswith(path):
                raise
            raise MemoryError(f"{path}: not enough memory to decode this image") from None
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                IndexError, struct_error, ZeroDivisionError) as e:
            raise ValueError(f"{path}: not an image Pillow can read "
                             f"({type(e).__name__}: {e})") from None
    if isinstance(item, Image.Image):
        return to_rgb(item)
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 [H, W(, C)] (or an already preprocessed "
                         f"float [3, S, S]); got {arr.dtype} of shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"a uint8 image array must be [H, W], [H, W, 3] or [H, W, 4] "
                         f"(channels last); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def to_pixels(image: Any, image_size: int, mean: Sequence[float], std: Sequence[float],
              resize_mode: str = "shortest", interpolation: str = "bicubic") -> np.ndarray:
    """One RGB ``PIL.Image`` -> normalised float32 ``[3, S, S]``.

    Examples
    --------
    >>> from PIL import Image
    >>> to_pixels(Image.new("RGB", (50, 30)), 16, (0.5,) * 3, (0.5,) * 3).shape
    (3, 16, 16)
    """
    Image = _pil()
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(interpolation)
    if resample is None:
        raise ValueError(f"interpolation {interpolation!r} is not supported "
                         "(use 'bicubic' or 'bilinear')")
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"empty image of size {w}x{h}")
    draft = image.info.get(_DRAFT_KEY)
    if draft is not None and resize_mode in ("shortest", "squash"):
        # decoded at 1/a of its size: the geometry of the full image, sampled in this one
        ow, oh, a = draft
        if resize_mode == "shortest":
            nw, nh = resize_size(ow, oh, image_size)
            left, top, right, bottom = center_crop_box(nw, nh, image_size)
            sx, sy = ow / nw / a, oh / nh / a
            box = (left * sx, top * sy, right * sx, bottom * sy)
        else:
            box = (0, 0, ow / a, oh / a)
        image = image.resize((image_size, image_size), resample=resample, box=box)
    elif resize_mode == "shortest":
        nw, nh = resize_size(w, h, image_size)
        if nw * nh > _MAX_RESIZED_PIXELS:
            # an extreme aspect ratio: resizing the whole image first would take gigabytes, so
            # resample only the source region that the centre crop keeps (same sampling grid)
            left, top, right, bottom = center_crop_box(nw, nh, image_size)
            sx, sy = w / nw, h / nh
            image = image.resize((image_size, image_size), resample=resample,
                                 box=(left * sx, top * sy, right * sx, bottom * sy))
        else:
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), resample=resample)
            if (nw, nh) != (image_size, image_size):
                image = image.crop(center_crop_box(nw, nh, image_size))
    elif resize_mode == "squash":
        if (w, h) != (image_size, image_size):
            image = image.resize((image_size, image_size), resample=resample)
    else:
        raise ValueError(f"resize_mode {resize_mode!r} is not supported (use 'shortest' or "
                         "'squash'); preprocess the images yourself and pass float arrays")
    rgb = np.asarray(image, dtype=np.float32) / np.float32(255.0)          # [S, S, 3]
    x: np.ndarray = (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)    # [3, S, S]


def _is_float_array(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return np.issubdtype(x.dtype, np.floating)
    return hasattr(x, "__array__") and hasattr(x, "dtype") and "float" in str(x.dtype)


def _check_pixel_shape(arr: np.ndarray, image_size: int, where: str) -> None:
    """A float array must be ``[3, S, S]`` or ``[B, 3, S, S]``."""
    shape = tuple(arr.shape)
    if len(shape) == 3:
        shape4 = (1,) + shape
    else:
        shape4 = shape
    if len(shape4) != 4 or shape4[1] != 3 or shape4[2] != image_size or \
            shape4[3] != image_size:
        raise ValueError(f"{where}: a float array must be preprocessed pixels [3, {image_size}, "
                         f"{image_size}] or [B, 3, {image_size}, {image_size}]; got shape "
                         f"{shape} (pass uint8 [H, W, 3] arrays or PIL images to have them "
                         "resized and normalised)")


def _check_pixels(arr: np.ndarray, image_size: int, where: str, start: int = 0) -> np.ndarray:
    """Shape-check preprocessed pixels and return them as float32 ``[B, 3, S, S]``; NaN or
    infinite values are a ValueError naming the first image that has one (``start`` is the
    index of ``arr[0]`` in the caller's input)."""
    _check_pixel_shape(arr, image_size, where)
    if arr.ndim == 3:
        arr = arr[None]
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        count = int((~np.isfinite(arr)).sum())
        first = int(bad[0]) + start
        which = f"; first in image {first}" if arr.shape[0] > 1 or start else ""
        raise ValueError(f"{where}: pixels contain {count} NaN / infinite value"
                         f"{'s' if count != 1 else ''} ({len(bad)} image"
                         f"{'s' if len(bad) != 1 else ''}{which})")
    return arr


def as_image_list(images: Any) -> list[Any]:
    """Split an input into a list of items (one per image), without preprocessing.

    A float ``[B, 3, S, S]`` array becomes B items of ``[3, S, S]``, a uint8 ``[B, H, W, C]``
    array B images; a single image (path, PIL
    image, array) becomes a list of one; any other iterable (a generator of paths, a pandas
    Series) becomes the list of its items.
    """
    if isinstance(images, (list, tuple)):
        return list(images)
    if _is_float_array(images):
        arr = np.asarray(images)
        return list(arr) if arr.ndim == 4 else [arr]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return list(images)            # a batch of uint8 images [B, H, W, C]
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "convert") \
            or not hasattr(images, "__iter__"):
        return [images]
    return list(images)


def preprocess(images: Any, image_size: int, mean: Sequence[float], std: Sequence[float],
               resize_mode: str = "shortest", interpolation: str = "bicubic") -> np.ndarray:
    """Images -> normalised float32 pixels ``[B, 3, S, S]``.

    Parameters
    ----------
    images : path, PIL.Image, array, or list of these
        Paths and PIL images are converted to RGB; uint8 arrays are ``[H, W]``, ``[H, W, 3]``
        or ``[H, W, 4]``; float arrays must already be preprocessed ``[3, S, S]`` or
        ``[B, 3, S, S]`` and are only checked.
    image_size : int
        S.
    mean, std : sequence of 3 floats
        Per-channel normalisation.
    resize_mode : str
        ``"shortest"`` (resize + centre crop) or ``"squash"``.
    interpolation : str
        ``"bicubic"`` or ``"bilinear"``.

    Returns
    -------
    numpy.ndarray
        float32 ``[B, 3, S, S]``.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the path or the shape at fault; NaN or infinite pixels are a ValueError.

    Examples
    --------
    >>> x = preprocess([np.zeros((40, 60, 3), np.uint8)] * 2, 32, (0.5,) * 3, (0.25,) * 3)
    >>> x.shape, float(x[0, 0, 0, 0])
    ((2, 3, 32, 32), -2.0)
    """
    if _is_float_array(images):
        return _check_pixels(np.asarray(images), image_size, "images")
    items = as_image_list(images)
    return preprocess_items(items, image_size, mean, std, resize_mode, interpolation,
                            listed=isinstance(images, (list, tuple)) or len(items) > 1)


def preprocess_items(items: Sequence[Any], image_size: int, mean: Sequence[float],
                     std: Sequence[float], resize_mode: str = "shortest",
                     interpolation: str = "bicubic", start: int = 0,
                     listed: bool = True) -> np.ndarray:
    """Preprocess a list of single images into float32 ``[len(items), 3, S, S]``.

    ``start`` is the index of ``items[0]`` in the caller's whole input, so that error messages
    name the right image (``images[start + i]``).
    """
    if len(items) == 0:
        raise ValueError("no images given (an empty list)")
    out = np.empty((len(items), 3, image_size, image_size), dtype=np.float32)
    for i, item in enumerate(items):
        where = f"images[{start + i}]" if listed else "images"
        if _is_float_array(item):
            arr = np.asarray(item)
            if arr.ndim != 3:
                raise ValueError(f"{where}: a float array in a list must be one image "
                                 f"[3, {image_size}, {image_size}]; got shape {arr.shape}")
            out[i] = _check_pixels(arr, image_size, where)[0]
        else:
            try:
                img = load_image(item, image_size)
            except ValueError as e:
                if isinstance(item, (str, os.PathLike)):
                    raise
                raise ValueError(f"{where}: {e}") from None
            out[i] = to_pixels(img, image_size, mean, std, resize_mode, interpolation)
    return out
