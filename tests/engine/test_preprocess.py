"""Preprocessing against transformers' CLIPImageProcessor (its Pillow backend).

Resizing and normalisation agree to 1e-5 (in fact exactly: both call Pillow's bicubic resize on
the uint8 image, then scale and normalise in float32). The centre crop differs by design:
clipdecomp follows torchvision (open_clip, the paper's code), offset ``int(round((n - S) / 2))``,
transformers takes ``(n - S) // 2``. They agree unless ``n - S`` is 3 modulo 4, where the crop
is shifted by one pixel; both cases are tested below.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from clipdecomp.engine.preprocess import center_crop_box, load_image, preprocess, resize_size

try:
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as _Processor,
    )
except ImportError:  # older transformers: the slow processor is the Pillow one
    from transformers import CLIPImageProcessor as _Processor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
S = 32
# (height, width); the last column of the comment is (long side after resize - S) % 4
SIZES = [(37, 53), (53, 37), (101, 77), (15, 15), (40, 35), (32, 32), (7, 200),
         (32, 47), (33, 90), (250, 31)]


def processor(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Processor(image_mean=list(MEAN), image_std=list(STD), **kw)


def hf(proc, image) -> np.ndarray:
    return np.asarray(proc(image, return_tensors="np")["pixel_values"][0], np.float32)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def test_resize_and_normalise_equal_transformers(images):
    """Uncropped, transformers' output cropped at torchvision's offset is ours, to 1e-5."""
    full = processor(size={"shortest_edge": S}, do_center_crop=False)
    for im in images:
        ref = hf(full, im)
        nw, nh = resize_size(im.width, im.height, S)
        assert ref.shape == (3, nh, nw)
        left, top, right, bottom = center_crop_box(nw, nh, S)
        ours = preprocess(im, S, MEAN, STD)[0]
        assert np.abs(ours - ref[:, top:bottom, left:right]).max() < 1e-5


def test_crop_offset_difference_is_documented(images):
    """Equal to transformers' full pipeline unless (n - S) % 4 == 3: then a one-pixel shift."""
    proc = processor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    full = processor(size={"shortest_edge": S}, do_center_crop=False)
    shifted = 0
    for im in images:
        nw, nh = resize_size(im.width, im.height, S)
        n = max(nw, nh)
        ours = preprocess(im, S, MEAN, STD)[0]
        ref = hf(proc, im)
        if (n - S) % 4 != 3:
            assert np.abs(ours - ref).max() < 1e-5
        else:
            shifted += 1
            assert np.abs(ours - ref).max() > 0.1
            off = (n - S) // 2 + 1             # torchvision rounds the half up to even here
            unc = hf(full, im)
            hf_crop = unc[:, :, off - 1:off - 1 + S] if nw > nh else unc[:, off - 1:off - 1 + S]
            assert np.abs(ref - hf_crop).max() < 1e-5
            our_crop = unc[:, :, off:off + S] if nw > nh else unc[:, off:off + S]
            assert np.abs(ours - our_crop).max() < 1e-5
    assert shifted >= 2


def test_squash_equals_transformers_resize(images):
    proc = processor(size={"height": S, "width": S}, do_center_crop=False)
    for im in images:
        ours = preprocess(im, S, MEAN, STD, resize_mode="squash")[0]
        assert np.abs(ours - hf(proc, im)).max() < 1e-5


def test_inputs_of_every_kind(tmp_path, images):
    im = images[0]
    arr = np.asarray(im)
    path = tmp_path / "a.png"
    im.save(path)
    want = preprocess(im, S, MEAN, STD)
    assert want.shape == (1, 3, S, S) and want.dtype == np.float32
    for x in (str(path), path, arr, [im], [arr], (str(path),)):
        assert np.array_equal(preprocess(x, S, MEAN, STD), want)
    both = preprocess([im, str(path), arr, want[0]], S, MEAN, STD)
    assert both.shape == (4, 3, S, S)
    assert all(np.array_equal(both[i], want[0]) for i in range(4))
    # preprocessed float pixels pass through unchanged (float64 is cast)
    px = np.random.default_rng(1).standard_normal((2, 3, S, S))
    assert np.array_equal(preprocess(px, S, MEAN, STD), px.astype(np.float32))
    assert np.array_equal(preprocess(px[0], S, MEAN, STD), px[:1].astype(np.float32))
    # grey, RGBA and palette images become RGB the way Pillow converts them
    grey = arr[:, :, 0]
    assert np.array_equal(preprocess(grey, S, MEAN, STD),
                          preprocess(Image.fromarray(grey).convert("RGB"), S, MEAN, STD))
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 7, np.uint8)], axis=2)
    assert np.array_equal(preprocess(rgba, S, MEAN, STD), want)


def test_normalisation_numbers():
    x = preprocess(np.full((10, 10, 3), 255, np.uint8), 8, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1], 3.0) and np.allclose(x[0, 2], 0.5)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        preprocess(str(tmp_path / "missing.jpg"), S, MEAN, STD)
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    with pytest.raises(ValueError, match="not_an_image.jpg"):
        preprocess([str(bad)], S, MEAN, STD)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\)"):
        preprocess(np.zeros((2, 3, 16, 16), np.float32), S, MEAN, STD)
    with pytest.raises(ValueError, match=r"\(5, 5, 2\)"):
        preprocess(np.zeros((5, 5, 2), np.uint8), S, MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((5, 5, 3), np.int64), S, MEAN, STD)
    nan = np.zeros((1, 3, S, S), np.float32)
    nan[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess(nan, S, MEAN, STD)
    with pytest.raises(ValueError, match=r"images\[1\].*NaN"):
        preprocess([np.zeros((3, S, S), np.float32), nan[0]], S, MEAN, STD)
    with pytest.raises(ValueError, match="empty"):
        preprocess([], S, MEAN, STD)
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess(np.zeros((5, 5, 3), np.uint8), S, MEAN, STD, resize_mode="longest")


def test_load_image_returns_rgb(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (4, 3)


def test_uint8_batch_array_is_a_batch_of_images():
    """A stacked uint8 [B, H, W, 3] array means B images, as a list of them does."""
    from clipdecomp.engine.preprocess import preprocess

    rng = np.random.default_rng(7)
    batch = rng.integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)
    a = preprocess(batch, 16, (0.5,) * 3, (0.25,) * 3)
    b = preprocess(list(batch), 16, (0.5,) * 3, (0.25,) * 3)
    assert a.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(a, b)
