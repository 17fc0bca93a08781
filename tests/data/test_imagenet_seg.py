"""The ImageNet-segmentation reader, the mask geometry and the segeval command.

The reader is checked on files written in the layout of gtsegs_ijcv.mat and read back both by
it and by the reference code's own h5py indexing; the mask geometry against clipdecomp's image
preprocessing; the evaluation on a stand-in model and, when the C core is built, on a
random-weight CLIP end to end through the command line.
"""
from __future__ import annotations

import json
import pickle
import zlib
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from clipdecomp import cli
from clipdecomp.cli import segeval_main
from clipdecomp.data.imagenet_seg import (
    OPENAI_IMAGENET_TEMPLATES,
    ImageNetSegmentation,
    _classifier_in_chunks,
    evaluate_segmentation,
    imagenet_classnames,
    transform_mask,
    write_gtsegs_like,
)
from clipdecomp.engine.preprocess import preprocess
from clipdecomp.methods.segmentation import segment_decomposition, segmentation_metrics
from clipdecomp.methods.zeroshot import zero_shot_classifier


def random_items(sizes, seed=0):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for h, w in sizes:
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[y0:y0 + h // 2, x0:x0 + w // 3 + 1] = True
        masks.append(m)
    return images, masks


SIZES = [(5, 7), (8, 8), (12, 6), (9, 20), (16, 11)]


@pytest.fixture()
def mat_file(tmp_path):
    images, masks = random_items(SIZES)
    path = tmp_path / "gtsegs_like.mat"
    write_gtsegs_like(path, images, masks)
    return path, images, masks


# --------------------------------------------------------------------------------- the reader

def test_reader_round_trips(mat_file):
    path, images, masks = mat_file
    ds = ImageNetSegmentation(path)
    assert len(ds) == len(images)
    for i in range(len(ds)):
        img, m = ds[i]
        assert img.dtype == np.uint8 and m.dtype == bool
        np.testing.assert_array_equal(img, images[i])
        np.testing.assert_array_equal(m, masks[i])
    np.testing.assert_array_equal(ds[-1][0], images[-1])
    assert [m.shape for _, m in ds] == SIZES
    with pytest.raises(IndexError):
        ds[len(images)]
    with pytest.raises(TypeError):
        ds[0:2]
    clone = pickle.loads(pickle.dumps(ds))  # the open file is not pickled; it reopens
    np.testing.assert_array_equal(clone[2][1], masks[2])
    ds.close()
    with ImageNetSegmentation(path) as again:
        np.testing.assert_array_equal(again[1][0], images[1])


def test_written_layout_is_the_reference_layout(mat_file):
    """Read the file with the reference code's own indexing of gtsegs_ijcv.mat."""
    path, images, masks = mat_file
    with h5py.File(path, "r") as f:
        assert f["/value/img"].shape == (len(images), 1)
        assert len(f["/value/img"]) == len(images)
        for i in range(len(images)):
            img = np.array(f[f["/value/img"][i, 0]]).transpose((2, 1, 0))
            target = np.array(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose((1, 0))
            np.testing.assert_array_equal(img, images[i])
            np.testing.assert_array_equal(target, masks[i].astype(np.uint8))
            assert f[f["/value/img"][i, 0]].shape == (3, images[i].shape[1], images[i].shape[0])
    with open(path, "rb") as fh:
        assert fh.read(19) == b"MATLAB 7.3 MAT-file"


def test_reader_rejects_other_files(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="value/img"):
        ImageNetSegmentation(p)
    with pytest.raises(ValueError):
        write_gtsegs_like(tmp_path / "bad.mat", [np.zeros((4, 4, 3), np.uint8)],
                          [np.zeros((4, 5), bool)])


# ------------------------------------------------------------------------------- mask geometry

def test_transform_mask_known_answer():
    m = np.zeros((100, 150), bool)
    m[20:60, 30:90] = True
    out = transform_mask(m, 50)
    # shorter side 100 -> 50 (nearest takes source pixel 2i + 1), 150 -> 75, crop 12 from left
    want = np.zeros((50, 50), bool)
    want[10:30, 3:33] = True
    np.testing.assert_array_equal(out, want)
    sq = transform_mask(m, 50, "squash")
    assert sq.shape == (50, 50) and sq.sum() == pytest.approx(m.mean() * 2500, rel=0.1)
    square = np.random.default_rng(0).random((32, 32)) > 0.5
    np.testing.assert_array_equal(transform_mask(square, 32), square)
    np.testing.assert_array_equal(transform_mask(square, 32, "squash"), square)
    with pytest.raises(ValueError):
        transform_mask(m, 50, "stretch")


@pytest.mark.parametrize("h,w", [(120, 200), (200, 120), (97, 141)])
def test_mask_lines_up_with_preprocessed_image(h, w):
    """The mask follows the pixels of clipdecomp's preprocessing; squashing it does not."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = (yy - 0.3 * h) ** 2 / (0.2 * h) ** 2 + (xx - 0.7 * w) ** 2 / (0.15 * w) ** 2 < 1
    img = np.repeat((m * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    px = preprocess(img, 64, (0.0,) * 3, (1.0,) * 3)[0, 0]  # the red channel, in [0, 1]
    seen = px > 0.5
    aligned = np.mean(transform_mask(m, 64) != seen)
    squashed = np.mean(transform_mask(m, 64, "squash") != seen)
    assert aligned < 0.01
    assert squashed > 3 * aligned + 0.01


def test_imagenet_classnames():
    names = imagenet_classnames()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet paper"
    assert names[281] == "tabby cat" and names[817] == "sports car"
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)


# ----------------------------------------------------------------------------- the evaluation

class StandInDec:
    def __init__(self, tokens, embedding, attn, config):
        self._tokens, self.embedding, self.config = tokens, embedding, config
        self.attn_cls = attn[:, :, :, 0, :]
        self.attn_mean = attn.mean(2)
        self.has_tokens = False

    def project_tokens(self, directions):
        return np.einsum("blnhd,td->blnht", self._tokens, directions).astype(np.float32)


class StandInModel:
    """Tokens are a fixed linear map of patch colours; attention follows colour similarity."""

    L, H, D = 2, 2, 6

    def __init__(self, size=16, patch=4):
        g = size // patch
        self.config = SimpleNamespace(image_size=size, patch_size=patch, grid=g,
                                      n_tokens=1 + g * g, layers=self.L, heads=self.H,
                                      embed_dim=self.D, resize_mode="shortest",
                                      mean=(0.5,) * 3, std=(0.5,) * 3)
        self.w = np.random.default_rng(0).normal(size=(self.L, self.H, 3, self.D))
        self.batches = []

    def decompose(self, images, spatial=False, attn=False):
        c = self.config
        x = preprocess(images, c.image_size, c.mean, c.std)  # [b, 3, S, S]
        b, g, p = len(x), c.grid, c.patch_size
        self.batches.append(b)
        feat = x.reshape(b, 3, g, p, g, p).mean((3, 5)).reshape(b, 3, g * g).transpose(0, 2, 1)
        feat = np.concatenate([np.zeros((b, 1, 3)), feat], axis=1)  # [b, N, 3]
        tokens = np.einsum("bnc,lhcd->blnhd", feat, self.w).astype(np.float32)
        logits = np.einsum("bnc,bmc->bnm", feat, feat)[:, None, None] * np.arange(1, 5).reshape(
            1, self.L, self.H, 1, 1)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
        return StandInDec(tokens, tokens.sum((1, 2, 3)), a, c)

    def encode_text(self, texts, normalize=True):
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.D)
                        for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_evaluate_on_a_stand_in_model(mat_file):
    path, images, masks = mat_file
    model = StandInModel()
    clf = np.random.default_rng(1).normal(size=(model.D, 7)).astype(np.float32)
    ds = ImageNetSegmentation(path)
    table = evaluate_segmentation(model, ds, clf, batch_size=2, limit=4, mask_resize="image")
    assert model.batches == [2, 2]
    assert list(table.index) == ["decomposition", "raw attention", "attention rollout",
                                 "all foreground", "centre blob"]
    assert (table["n_images"] == 4).all()
    gt = np.stack([transform_mask(m, 16) for m in masks[:4]])
    assert table.loc["all foreground", "pixel_accuracy"] == pytest.approx(100 * gt.mean())
    assert table.loc["all foreground", "miou"] == pytest.approx(100 * gt.mean() / 2)
    # the decomposition row is segment_decomposition + the metrics over the same 4 images
    dec = model.decompose(images[:4], attn=True)
    res = segment_decomposition(dec, clf)
    want = segmentation_metrics(res.scores, gt, masks=res.masks, degenerate=res.degenerate)
    for k in ("pixel_accuracy", "miou", "map"):
        assert table.loc["decomposition", k] == pytest.approx(100 * want[k])
    assert ((table[["pixel_accuracy", "miou", "map"]] >= 0).all().all()
            and (table[["pixel_accuracy", "miou", "map"]] <= 100).all().all())
    with pytest.raises(ValueError):
        evaluate_segmentation(model, ds, clf, mask_resize="crop")


def test_classifier_in_chunks_equals_one_call():
    model = StandInModel()
    names = [f"class {i}" for i in range(23)]
    want = zero_shot_classifier(model, names, OPENAI_IMAGENET_TEMPLATES[:5])
    got = _classifier_in_chunks(model, names, OPENAI_IMAGENET_TEMPLATES[:5], False, chunk=4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_segeval_command_with_a_stand_in_model(mat_file, tmp_path, monkeypatch, capsys):
    path, _, _ = mat_file
    model = StandInModel()
    monkeypatch.setattr(cli, "load", lambda *a, **k: model)
    classes = tmp_path / "classes.txt"
    classes.write_text("circle\nsquare\n\nstar\n")
    out = tmp_path / "results.csv"
    clf_path = tmp_path / "clf.npy"
    rc = segeval_main(["--data", str(path), "--model", "anything", "--classes", str(classes),
                       "--templates", "simple", "--classifier", str(clf_path),
                       "--batch-size", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decomposition" in printed and "attention rollout" in printed
    table = pd.read_csv(out, index_col=0)
    assert len(table) == 5 and (table["n_images"] == len(SIZES)).all()
    clf = np.load(clf_path)
    assert clf.shape == (model.D, 3)
    np.testing.assert_allclose(np.linalg.norm(clf, axis=0), 1, atol=1e-5)
    # a second run loads the saved classifier, also when stored as [C, D]
    np.save(clf_path, clf.T)
    assert segeval_main(["--data", str(path), "--model", "x", "--classifier", str(clf_path),
                         "--limit", "2", "--no-progress"]) == 0
    assert "2 images" in capsys.readouterr().out


# ------------------------------------------------------------------ a real random-weight model

def test_segeval_end_to_end_on_a_random_weight_model(mat_file, tmp_path, capsys):
    import oracle  # tests/oracle.py

    cfg = oracle.tiny_config(image_size=32, patch_size=8)
    folder = tmp_path / "model"
    folder.mkdir()
    oracle.write_safetensors(folder / "open_clip_model.safetensors",
                             oracle.random_weights(cfg, seed=1))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": cfg["embed_dim"], "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": cfg["layers"], "width": cfg["width"],
                       "patch_size": 8, "head_width": cfg["width"] // cfg["heads"],
                       "mlp_ratio": cfg["mlp_dim"] / cfg["width"]},
        "text_cfg": {"context_length": cfg["context_length"], "vocab_size": cfg["vocab_size"],
                     "width": cfg["text_width"], "heads": cfg["text_heads"],
                     "layers": cfg["text_layers"],
                     "mlp_ratio": cfg["text_mlp_dim"] / cfg["text_width"]}}}))
    clf = np.random.default_rng(0).normal(size=(cfg["embed_dim"], 10)).astype(np.float32)
    clf /= np.linalg.norm(clf, axis=0, keepdims=True)
    np.save(tmp_path / "clf.npy", clf)
    path, _, _ = mat_file
    out = tmp_path / "r.csv"
    assert segeval_main(["--data", str(path), "--model", str(folder), "--classifier",
                         str(tmp_path / "clf.npy"), "--batch-size", "2", "--out", str(out),
                         "--no-progress"]) == 0
    table = pd.read_csv(out, index_col=0)
    assert len(table) == 6 and (table["n_images"] == len(SIZES)).all()  # with patch tokens
    vals = table[["pixel_accuracy", "miou", "map"]].to_numpy()
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 100).all()
    assert "decomposition" in capsys.readouterr().out
