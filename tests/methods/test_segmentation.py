"""Zero-shot segmentation and its metrics (clipdecomp.methods.segmentation).

References: scikit-learn (average_precision_score, accuracy_score, jaccard_score,
confusion_matrix) for the metrics, and the paper's evaluation steps written out in PyTorch
(interpolate by the patch size, clip, min-max, threshold at the mean, NaN -> 0) for the maps.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    jaccard_score,
)

from clipdecomp.methods.segmentation import (
    SegmentationMeter,
    SegmentationResult,
    all_foreground,
    average_precision,
    centre_blob,
    keep_tokens,
    segment,
    segment_decomposition,
    segment_maps,
    segmentation_metrics,
)

L, H, D, C = 2, 3, 6, 5


class ArrayDec:
    """A decomposition over given arrays (tokens [B, L, N, H, D], embedding [B, D])."""

    def __init__(self, tokens, embedding, grid, patch, keep_tokens=False):
        self._tokens = np.asarray(tokens, np.float32)
        self.embedding = np.asarray(embedding, np.float32)
        _, n_layers, n, n_heads, _ = self._tokens.shape
        self.config = SimpleNamespace(layers=n_layers, heads=n_heads, n_tokens=n, grid=grid,
                                      patch_size=patch, image_size=grid * patch)
        self.keep_tokens = keep_tokens
        self.probe_calls = 0

    @property
    def tokens(self):
        if not self.keep_tokens:
            raise ValueError("tokens were not kept")
        return self._tokens

    def project_tokens(self, directions):
        self.probe_calls += 1
        return np.einsum("blnhd,td->blnht", self._tokens, directions).astype(np.float32)


def random_dec(b=3, grid=4, patch=4, seed=0, keep_tokens=False):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(b, L, 1 + grid * grid, H, D)).astype(np.float32)
    emb = tokens.sum((1, 2, 3)) + rng.normal(size=(b, D)).astype(np.float32)
    return ArrayDec(tokens, emb, grid, patch, keep_tokens)


def random_classifier(seed=3):
    w = np.random.default_rng(seed).normal(size=(D, C)).astype(np.float32)
    return w / np.linalg.norm(w, axis=0, keepdims=True)


# ------------------------------------------------------------------ the paper's steps, in torch

def reference_scores(patch_map: np.ndarray, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, as the paper's evaluation: -> (output [2, S, S] 0/1, output_AP [2, S, S])."""
    x = torch.from_numpy(np.asarray(patch_map, np.float32))[None, None]
    res = torch.nn.functional.interpolate(x, scale_factor=patch, mode="bilinear")
    res = torch.clip(res, 0, res.max())
    res = (res - res.min()) / (res.max() - res.min())
    thr = res.mean()
    fg = res.gt(thr).float()
    bg = res.le(thr).float()
    fg_ap = res.clone()
    bg_ap = 1 - res
    for t in (fg, bg, fg_ap, bg_ap):
        t[torch.isnan(t)] = 0
    return torch.cat((bg, fg), 1)[0], torch.cat((bg_ap, fg_ap), 1)[0]


def reference_metrics(patch_maps: np.ndarray, gt: np.ndarray, patch: int) -> dict:
    """pixel accuracy, IoUs and mAP of the paper's pipeline, counted with scikit-learn."""
    preds, aps = [], []
    for m, g in zip(patch_maps, gt):
        out, out_ap = reference_scores(m, patch)
        preds.append(torch.max(out, 0)[1].numpy().astype(bool))
        onehot = np.stack([~g, g]).astype(int)
        aps.append(np.nan_to_num(average_precision_score(onehot.ravel(),
                                                         out_ap.numpy().ravel())))
    pred = np.stack(preds)
    iou = jaccard_score(gt.ravel(), pred.ravel(), average=None, labels=[0, 1])
    return {"pixel_accuracy": accuracy_score(gt.ravel(), pred.ravel()), "miou": iou.mean(),
            "iou_background": iou[0], "iou_foreground": iou[1], "map": float(np.mean(aps)),
            "pred": pred}


def random_gt(b, s, seed=5):
    rng = np.random.default_rng(seed)
    gt = np.zeros((b, s, s), bool)
    for i in range(b):
        y0, x0 = rng.integers(0, s // 2, 2)
        h, w = rng.integers(s // 4, s // 2 + 1, 2)
        gt[i, y0:y0 + h, x0:x0 + w] = True
    return gt


# ---------------------------------------------------------------------------- average precision

@pytest.mark.parametrize("seed", range(6))
def test_average_precision_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    y = rng.random(n) < rng.uniform(0.05, 0.9)
    y[0] = True
    scores = rng.random(n).astype(np.float32)
    if seed % 2:  # many ties
        scores = np.round(scores * 7) / 7
    assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores),
                                                         abs=1e-12)


def test_average_precision_edge_cases():
    y = np.array([0, 1, 0, 1])
    assert average_precision(y, np.zeros(4)) == pytest.approx(average_precision_score(y,
                                                                                      np.zeros(4)))
    assert average_precision(y, np.array([0.1, 0.9, 0.2, 0.8])) == 1.0
    assert average_precision(np.zeros(4), np.arange(4)) == 0.0
    with pytest.raises(ValueError):
        average_precision(y, np.zeros(3))


# ------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_sklearn_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    b, s = 4, 12
    scores = rng.random((b, s, s)).astype(np.float32)
    gt = rng.random((b, s, s)) < 0.4
    m = segmentation_metrics(scores, gt)
    pred = scores > scores.reshape(b, -1).mean(1)[:, None, None]
    cm = confusion_matrix(gt.ravel(), pred.ravel(), labels=[0, 1])
    assert m["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    assert m["pixel_accuracy"] == pytest.approx(accuracy_score(gt.ravel(), pred.ravel()))
    iou = jaccard_score(gt.ravel(), pred.ravel(), average=None, labels=[0, 1])
    assert m["iou_background"] == pytest.approx(iou[0], abs=1e-12)
    assert m["iou_foreground"] == pytest.approx(iou[1], abs=1e-12)
    assert m["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    aps = [average_precision_score(np.r_[~g.ravel(), g.ravel()],
                                   np.r_[(1 - x).ravel(), x.ravel()])
           for x, g in zip(scores, gt)]
    assert m["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert m["n_images"] == b


def test_metrics_fixed_threshold_and_given_masks():
    rng = np.random.default_rng(9)
    scores = rng.random((3, 8, 8)).astype(np.float32)
    gt = rng.random((3, 8, 8)) < 0.5
    m = segmentation_metrics(scores, gt, threshold=0.7)
    pred = scores > 0.7
    assert m["pixel_accuracy"] == pytest.approx(accuracy_score(gt.ravel(), pred.ravel()))
    m2 = segmentation_metrics(scores, gt, masks=pred)
    assert m2["miou"] == pytest.approx(m["miou"])
    with pytest.raises(ValueError):
        SegmentationMeter(threshold="median")
    with pytest.raises(ValueError):
        segmentation_metrics(scores, gt[:, :4])


def test_meter_streams_like_one_call():
    rng = np.random.default_rng(4)
    scores = rng.random((6, 10, 10)).astype(np.float32)
    gt = rng.random((6, 10, 10)) < 0.3
    meter = SegmentationMeter()
    for i in range(0, 6, 4):
        meter.update(scores[i:i + 4], gt[i:i + 4])
    assert meter.compute() == pytest.approx(segmentation_metrics(scores, gt))


# ------------------------------------------------------------------------- maps -> segmentation

@pytest.mark.parametrize("grid,patch", [(4, 4), (7, 8), (14, 16)])
def test_segment_maps_equals_the_papers_pipeline(grid, patch):
    rng = np.random.default_rng(grid)
    maps = rng.normal(size=(3, grid, grid)).astype(np.float32)
    res = segment_maps(maps, grid * patch)
    s = grid * patch
    assert res.scores.shape == (3, s, s) and res.scores.dtype == np.float32
    assert res.masks.dtype == bool and not res.degenerate.any()
    for i in range(3):
        out, out_ap = reference_scores(maps[i], patch)
        np.testing.assert_allclose(res.scores[i], out_ap[1].numpy(), atol=1e-5)
        ref_mask = out[1].numpy() > 0.5
        near = np.abs(res.scores[i] - res.scores[i].mean()) < 1e-5
        assert np.array_equal(res.masks[i][~near], ref_mask[~near])
    gt = random_gt(3, s)
    want = reference_metrics(maps, gt, patch)
    got = res.metrics(gt)
    for k in ("pixel_accuracy", "miou", "iou_foreground"):
        assert got[k] == pytest.approx(want[k], abs=1e-4), k
    # AP depends on exact ties: torch's float32 interpolation splits a few ties that exact
    # arithmetic keeps (e.g. 0.875 x + 0.125 x at the far edge), which moves the AP of a tiny
    # image by up to 1e-2 and of a 224 x 224 one by about 1e-5. Checked exactly on our scores.
    aps = [average_precision_score(np.r_[~g.ravel(), g.ravel()],
                                   np.r_[(np.float32(1) - x).ravel(), x.ravel()])
           for x, g in zip(res.scores, gt)]
    assert got["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert got["map"] == pytest.approx(want["map"], abs=2e-4 if s >= 200 else 2e-2)


def test_degenerate_maps_score_like_the_reference():
    """A map with nothing above 0: the reference divides 0 by 0; both channels then score 0."""
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(3, 4, 4)).astype(np.float32)
    maps[1] = -np.abs(maps[1]) - 0.1
    maps[2] = 0.0
    res = segment_maps(maps, 16)
    assert res.degenerate.tolist() == [False, True, True]
    assert not res.masks[1:].any() and (res.scores[1:] == 0).all()
    gt = random_gt(3, 16)
    want = reference_metrics(maps, gt, 4)
    got = res.metrics(gt)
    for k in ("pixel_accuracy", "miou", "map"):
        assert got[k] == pytest.approx(want[k], abs=1e-4), k
    assert average_precision_score(np.r_[~gt[1].ravel(), gt[1].ravel()], np.zeros(512)) == 0.5


def test_trivial_baselines():
    fg = all_foreground(2, 8)
    gt = random_gt(2, 8)
    m = fg.metrics(gt)
    assert fg.masks.all() and m["pixel_accuracy"] == pytest.approx(gt.mean())
    assert m["iou_foreground"] == pytest.approx(gt.mean()) and m["iou_background"] == 0.0
    blob = centre_blob(3, 16)
    assert blob.scores.shape == (3, 16, 16) and blob.scores.max() == 1.0
    assert blob.masks[:, 8, 8].all() and not blob.masks[:, 0, 0].any()
    np.testing.assert_array_equal(blob.masks[0], blob.masks[0].T)
    both = SegmentationResult.concatenate([fg, all_foreground(1, 8)])
    assert len(both) == 3 and both.maps is None


# ------------------------------------------------------------------------ the decomposition

def reference_patch_maps(tokens, embedding, classifier):
    """The paper's maps: tokens summed over layers and heads, class score minus class mean."""
    collapse = tokens[:, :, 1:].astype(np.float64).sum(axis=(1, 3))  # [B, N-1, D]
    heat = collapse @ classifier.astype(np.float64)  # [B, N-1, C]
    chosen = (embedding.astype(np.float64) @ classifier).argmax(1)
    maps = np.stack([heat[i, :, chosen[i]] - heat[i].mean(1) for i in range(len(chosen))])
    g = round(np.sqrt(tokens.shape[2] - 1))
    return maps.reshape(-1, g, g), chosen


@pytest.mark.parametrize("keep", [False, True])
def test_segment_decomposition_equals_reference(keep):
    dec = random_dec(b=4, keep_tokens=keep)
    w = random_classifier()
    res = segment_decomposition(dec, w)
    maps, chosen = reference_patch_maps(dec._tokens, dec.embedding, w)
    np.testing.assert_array_equal(res.classes, chosen)
    np.testing.assert_allclose(res.maps, maps, atol=1e-4)
    assert res.scores.shape == (4, 16, 16)
    gt = random_gt(4, 16)
    want = reference_metrics(maps, gt, 4)
    got = res.metrics(gt)
    for k in ("pixel_accuracy", "miou", "map"):
        assert got[k] == pytest.approx(want[k], abs=1e-4), k
    # one probe call with one direction per distinct predicted class
    assert dec.probe_calls == (0 if keep else 1)


def test_segment_decomposition_given_classes_and_errors():
    dec = random_dec(b=2)
    w = random_classifier()
    res = segment_decomposition(dec, w, classes=[4, 0])
    heat = dec._tokens[:, :, 1:].astype(np.float64).sum((1, 3)) @ w
    np.testing.assert_allclose(res.maps[0].ravel(), heat[0, :, 4] - heat[0].mean(1), atol=1e-4)
    assert res.classes.tolist() == [4, 0]
    with pytest.raises(ValueError, match="classifier"):
        segment_decomposition(dec, w.T)
    with pytest.raises(IndexError):
        segment_decomposition(dec, w, classes=[0, C])


def test_keep_tokens_budget():
    small = SimpleNamespace(layers=2, n_tokens=17, heads=2, embed_dim=8)
    assert keep_tokens(small, 8)
    big = SimpleNamespace(layers=24, n_tokens=257, heads=16, embed_dim=768)
    assert not keep_tokens(big, 8) and keep_tokens(big, 1) is False
    assert not keep_tokens(SimpleNamespace(), 1)


class StandInModel:
    """decompose(images) -> ArrayDec with tokens a fixed linear function of the pixels."""

    def __init__(self, grid=4, patch=4, seed=0):
        self.grid, self.patch = grid, patch
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(L, H, 3, D)).astype(np.float32)
        self.config = SimpleNamespace(image_size=grid * patch, patch_size=patch, grid=grid,
                                      embed_dim=D)
        self.calls = []

    def decompose(self, images, spatial=False, attn=False):
        x = np.asarray(images, np.float32) / 255.0  # [b, S, S, 3]
        self.calls.append(len(x))
        b, g, p = len(x), self.grid, self.patch
        patches = x.reshape(b, g, p, g, p, 3).mean((2, 4)).reshape(b, g * g, 3)
        tokens = np.zeros((b, L, 1 + g * g, H, D), np.float32)
        tokens[:, :, 1:] = np.einsum("bpc,lhcd->blphd", patches, self.w)
        return ArrayDec(tokens, tokens.sum((1, 2, 3)), g, p, keep_tokens=spatial)


def test_segment_batches_like_one_pass():
    model = StandInModel()
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    w = random_classifier()
    res = segment(model, images, w, batch_size=2)
    assert model.calls == [2, 2, 1]
    one = segment(model, list(images), w, batch_size=8)
    np.testing.assert_array_equal(res.masks, one.masks)
    np.testing.assert_allclose(res.scores, one.scores)
    dec = model.decompose(images)
    maps, chosen = reference_patch_maps(dec._tokens, dec.embedding, w)
    np.testing.assert_allclose(res.maps, maps, atol=1e-4)
    assert res.classes.tolist() == chosen.tolist()
    assert segment(model, images[0], w).scores.shape == (1, 16, 16)
    with pytest.raises(ValueError):
        segment(model, images, w, classes=[0])


# --------------------------------------------------------------------- real models (the core)

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from test_spatial import make_random_model  # tests/methods/test_spatial.py

    return make_random_model(tmp_path_factory.mktemp("random_model"))


def test_segment_on_a_random_weight_model(random_model, monkeypatch):
    model = random_model
    cfg = model.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    w = rng.normal(size=(cfg.embed_dim, 4)).astype(np.float32)
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    res = segment(model, images, w, batch_size=2)
    s = cfg.image_size
    assert res.scores.shape == (3, s, s) and res.masks.shape == (3, s, s)
    assert res.masks.dtype == bool and np.isfinite(res.scores).all()
    assert res.scores.min() >= 0 and res.scores.max() <= 1
    ok = ~res.degenerate
    assert ok.any()
    assert (res.scores[ok].reshape(ok.sum(), -1).max(1) == 1).all()
    frac = res.masks[ok].reshape(ok.sum(), -1).mean(1)
    assert ((frac > 0) & (frac < 1)).all()
    # the same numbers as the reference formula on the kept tokens
    dec = model.decompose(list(images), spatial=True)
    maps, chosen = reference_patch_maps(np.asarray(dec.tokens), np.asarray(dec.embedding), w)
    assert res.classes.tolist() == chosen.tolist()
    np.testing.assert_allclose(res.maps, maps, atol=1e-5, rtol=1e-4)
    # the same through dec.project_tokens (tokens not kept: the core re-runs the forward pass)
    import clipdecomp.methods.segmentation as seg

    monkeypatch.setattr(seg, "TOKEN_BUDGET", 0)
    via_probe = segment(model, images, w, batch_size=2)
    np.testing.assert_allclose(via_probe.maps, res.maps, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(via_probe.classes, res.classes)


def _toy():
    import clipdecomp

    model = clipdecomp.load()   # the embedded model ships with the package: it must load
    from clipdecomp.toy import world

    return model, world


def test_toy_world_segmentation_beats_trivial_masks():
    from clipdecomp.methods.zeroshot import zero_shot_classifier

    model, world = _toy()
    batch = world.generate(32, seed=7, n_objects=1)
    names, _ = world.prompts("color")  # one object per scene: its colour names it
    clf = zero_shot_classifier(model, names, world.TEMPLATES["color"])
    res = segment(model, batch.images, clf, batch_size=16)
    gt = batch.foreground
    ours = res.metrics(gt)
    fg = all_foreground(len(gt), gt.shape[1]).metrics(gt)
    blob = centre_blob(len(gt), gt.shape[1]).metrics(gt)
    assert ours["miou"] > max(fg["miou"], blob["miou"]), (ours, fg, blob)
    assert ours["map"] > max(fg["map"], blob["map"]), (ours, fg, blob)
