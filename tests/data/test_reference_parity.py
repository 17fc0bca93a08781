"""Each reference script's clipdecomp counterpart against a fresh transcription of its steps.

The oracles below follow the formulas of the reference code (yossigandelsman/clip_text_span,
MIT) step by step in plain NumPy, on the ``.npy`` arrays that ``clipdecomp run
--reference-npy`` writes; the commands under test read the Zarr store instead.
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
from PIL import Image

import clipdecomp
from clipdecomp import toy
from clipdecomp.cli import main as cli_main
from clipdecomp.data.reference import completeness_text, textspan_store, write_reference_npy
from clipdecomp.data.store import StoreReader
from clipdecomp.data.text_pool import POOLS, load_pool
from clipdecomp.methods.retrieval import HeadIndex
from clipdecomp.methods.segmentation import segment_maps
from clipdecomp.methods.spatial import upsample
from clipdecomp.methods.textspan import textspan, textspan_heads
from clipdecomp.methods.zeroshot import (
    CLIPDECOMP_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    zero_shot_classifier,
)

COLORS = ["red", "blue", "green"]


# ------------------------------------------------------------------------------ oracles

def oracle_textspan(data, text_features, iters, rank, loop_dtype=np.float64):
    """compute_complete_text_set.replace_with_iterative_removal, transcribed: (picks, recon).

    The projection step is the reference's exactly (float32 SVD of the float32 terms, top
    ``rank`` rows of vh, ``vh^T (vh vh^T)^-1 vh``); the greedy loop runs in ``loop_dtype``
    (the reference runs it in float32 on a GPU). The reconstruction is the algorithm's (mean
    plus the removed projections), not the aliased array the reference returns.
    """
    data = np.asarray(data, np.float32)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    tf = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(np.asarray(text_features,
                                                                       np.float32).T).T
    x = data.astype(loop_dtype)
    tf = tf.astype(loop_dtype)
    mean = x.mean(axis=0, keepdims=True)
    x = x - mean
    recon = np.repeat(mean, x.shape[0], axis=0)
    picks = []
    for _ in range(iters):
        proj = x @ tf.T
        top = int(np.argmax(proj.std(axis=0, ddof=1)))
        picks.append(top)
        t = tf[top]
        norm = t @ t
        coef = (x @ t / norm)[:, None] * t[None, :]
        recon = recon + coef
        x = x - coef
        tf = tf - (tf @ t / norm)[:, None] * t[None, :]
    return picks, recon


def oracle_ablations(attns, mlps, cls_attn, classifier, labels):
    """compute_ablations.py, transcribed: the printed accuracies (percent)."""
    def acc(x):
        return float(np.sum(np.argmax(x @ classifier, axis=1) == labels)) / len(labels) * 100

    out = {"baseline": acc(attns.sum(axis=(1, 2)) + mlps.sum(axis=1))}
    mlps_mean = np.repeat(mlps.mean(axis=0)[None], attns.shape[0], axis=0)
    out["mlps"] = acc(attns.sum(axis=(1, 2)) + mlps_mean.sum(axis=1))
    no_cls = attns.sum(axis=2) - cls_attn + cls_attn.mean(axis=0)[None]
    out["cls"] = acc(no_cls.sum(axis=1) + mlps.sum(axis=1))
    out["mlps_cls"] = acc(no_cls.sum(axis=1) + mlps_mean.sum(axis=1))
    per_layer = attns.sum(axis=2)
    curve = [out["baseline"]]
    for layer in range(attns.shape[1]):
        model = (np.sum(np.mean(per_layer[:, :layer], axis=0, keepdims=True), axis=1)
                 + np.mean(per_layer[:, layer], axis=0, keepdims=True)
                 + np.sum(per_layer[:, layer + 1:], axis=1))
        curve.append(acc(mlps.sum(axis=1) + model))
    out["curve"] = curve
    return out


def oracle_completeness(attns, mlps, classifier, text_features, lines, labels, n_last, iters,
                        rank):
    """compute_complete_text_set.main, transcribed: (per-head texts, accuracy, n unique)."""
    attns = attns.copy()
    for i in range(attns.shape[1] - n_last):
        for h in range(attns.shape[2]):
            attns[:, i, h] = np.mean(attns[:, i, h], axis=0, keepdims=True)
    texts, seen = {}, set()
    for i in range(attns.shape[1] - n_last, attns.shape[1]):
        for h in range(attns.shape[2]):
            picks, recon = oracle_textspan(attns[:, i, h], text_features, iters, rank)
            attns[:, i, h] = recon
            texts[(i, h)] = [lines[j] for j in picks]
            seen |= set(texts[(i, h)])
    x = mlps.sum(axis=1) + attns.sum(axis=(1, 2))
    correct = np.sum(np.argmax(x.astype(np.float32) @ classifier, axis=1) == labels)
    return texts, float(correct) / len(labels) * 100.0, len(seen)


# ------------------------------------------------------------------------------ the world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class image folder, its store (all layers) and the reference's .npy files."""
    root = tmp_path_factory.mktemp("refworld")
    imgs = root / "imgs"
    for k, color in enumerate(COLORS):
        batch = toy.generate(9, seed=10 + k, n_objects=1, colors=[color])
        (imgs / color).mkdir(parents=True)
        for i, im in enumerate(batch.images):
            Image.fromarray(im).save(imgs / color / f"{i:02d}.png")
    store = root / "s.zarr"
    npy = root / "npy"
    assert cli_main(["run", str(imgs), "--model", str(toy.MODEL_DIR), "--out", str(store),
                     "--chunk-size", "10", "--batch-size", "5", "--threads", "1",
                     "--no-progress", "--reference-npy", str(npy), "--npy-dataset", "toy",
                     "--npy-model", "shapes"]) == 0
    model = clipdecomp.load(threads=1)
    clf = zero_shot_classifier(model, COLORS, "single")
    np.save(root / "clf.npy", clf)
    pool = load_pool("image_descriptions_general")[:300]
    (root / "pool.txt").write_text("\n".join(pool))
    text = model.encode_text(pool, normalize=True)
    np.save(root / "text.npy", text)
    return types.SimpleNamespace(root=root, imgs=imgs, store=store, npy=npy, model=model,
                                 clf=clf, pool=pool, text=text)


def _npy(world, kind):
    name = "toy_labels.npy" if kind == "labels" else f"toy_{kind}_shapes.npy"
    return np.load(world.npy / name)


# ------------------------------------------------------------------------------ compute_prs

def test_reference_npy_files_match_the_store(world):
    r = StoreReader(world.store)
    L, H, D = 6, 6, 128
    attn, mlp, cls = _npy(world, "attn"), _npy(world, "mlp"), _npy(world, "cls_attn")
    assert attn.shape == (27, L, H, D) and mlp.shape == (27, L + 1, D)
    assert cls.shape == (27, L, D)
    assert attn.dtype == mlp.dtype == cls.dtype == np.float32
    np.testing.assert_array_equal(attn, r.heads[:])
    np.testing.assert_array_equal(mlp, r.mlps[:])
    np.testing.assert_array_equal(cls, r.cls_to_cls[:])
    np.testing.assert_array_equal(_npy(world, "labels"), np.repeat([0, 1, 2], 9))
    # the sum of the terms is the unit embedding, as the reference's files are
    emb = world.model.encode_image([Image.open(world.imgs / "blue" / "00.png")], normalize=True)
    np.testing.assert_allclose(attn[0].sum((0, 1)) + mlp[0].sum(0), emb[0], atol=2e-5)
    # and cls_to_cls is what compute_prs sums: the class token's own term, over heads
    dec = world.model.decompose([Image.open(world.imgs / "blue" / "00.png")], spatial=True)
    np.testing.assert_allclose(cls[0], dec.tokens[0, :, 0].sum(1), atol=2e-6)


def test_reference_npy_needs_every_layer(world, tmp_path):
    part = tmp_path / "part.zarr"
    clipdecomp.run_dataset(world.model, world.imgs, part, layers="-2:", progress=False)
    with pytest.raises(ValueError, match="every layer"):
        write_reference_npy(part, tmp_path / "npy")


# ------------------------------------------------------------------------------ compute_ablations

def test_ablate_command_prints_the_reference_numbers(world, capsys):
    want = oracle_ablations(_npy(world, "attn"), _npy(world, "mlp"), _npy(world, "cls_attn"),
                            world.clf, _npy(world, "labels"))
    assert cli_main(["ablate", str(world.store), "--classifier",
                     str(world.root / "clf.npy")]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(":")[0]: ln.split(":", 1)[1].strip() for ln in out.splitlines() if ":" in ln}
    assert float(lines["Baseline"]) == pytest.approx(want["baseline"], abs=1e-9)
    assert float(lines["+ MLPs ablation"]) == pytest.approx(want["mlps"], abs=1e-9)
    assert float(lines["+ CLS ablation"]) == pytest.approx(want["cls"], abs=1e-9)
    assert float(lines["+ MLPs + CLS ablation"]) == pytest.approx(want["mlps_cls"], abs=1e-9)
    curve = [float(v) for v in lines["Attention ablations"].strip("[]").split(",")]
    np.testing.assert_allclose(curve, want["curve"], atol=1e-9)
    assert len(set(want["curve"])) > 1  # the data is not degenerate


def test_ablate_on_a_store_of_the_last_layers(world, tmp_path):
    """With only the last layers kept, the rows that need no other layer's heads agree."""
    from clipdecomp.data.reference import ablation_table_store

    part = tmp_path / "last2.zarr"
    clipdecomp.run_dataset(world.model, world.imgs, part, layers="-2:", progress=False)
    got = ablation_table_store(part, world.clf)
    want = oracle_ablations(_npy(world, "attn"), _npy(world, "mlp"), _npy(world, "cls_attn"),
                            world.clf, _npy(world, "labels"))
    np.testing.assert_allclose(got.accuracy[:4], [want[k] for k in
                                                  ("baseline", "mlps", "cls", "mlps_cls")])
    acc = got.accuracy.to_numpy()
    assert np.isnan(acc[4:4 + 3]).all()  # layers 0..2 ablated need layer 3's heads
    np.testing.assert_allclose(acc[4 + 3:], want["curve"][4:])


# ------------------------------------------------------------------------------ TextSpan

def _head_like(n, dim, rank, seed):
    """Terms of rank ``rank`` with decaying spectrum (a head has rank d + 3 < D)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # [rank, D]
    coef = rng.normal(size=(n, rank)) * np.linspace(3.0, 0.3, rank) + rng.normal(size=rank)
    return (coef @ basis).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_rank_mode_picks_as_the_reference(seed):
    rng = np.random.default_rng(100 + seed)
    c = _head_like(300, 96, 19, seed)  # 19 < 80: the reference projects on 61 noise vectors
    t = rng.normal(size=(250, 96)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    picks, recon = oracle_textspan(c, t, 12, 80)
    got = textspan(c, t, n_texts=12, rank=80, rank_mode="reference")
    assert got.indices.tolist() == picks
    assert got.rank == 80
    np.testing.assert_allclose(got.reconstruction, recon, atol=1e-9)
    # the loop in float32 (the reference's precision) picks the same on this data
    assert oracle_textspan(c, t, 12, 80, loop_dtype=np.float32)[0] == picks
    # the clean mode keeps only the 19 real directions
    assert textspan(c, t, n_texts=12, rank=80).rank == 19


def test_noise_vectors_change_the_picks():
    """Why the mode exists: on rank-deficient terms the two modes disagree somewhere."""
    differ = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        c = _head_like(200, 96, 12, seed)
        t = rng.normal(size=(200, 96)).astype(np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        a = textspan(c, t, n_texts=10, rank=80, rank_mode="reference").indices
        b = textspan(c, t, n_texts=10, rank=80).indices
        assert a[0] == b[0]  # the first pick does not see the noise (C is orthogonal to it)
        differ += int(not np.array_equal(a, b))
    assert differ > 0


def test_reference_rank_mode_agrees_with_clean_when_rank_is_full():
    rng = np.random.default_rng(5)
    c = _head_like(400, 64, 64, 5)
    t = rng.normal(size=(120, 64)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    a = textspan(c, t, n_texts=15, rank=64, rank_mode="reference")
    b = textspan(c, t, n_texts=15, rank=64)
    assert a.indices.tolist() == b.indices.tolist()
    with pytest.raises(ValueError, match="rank_mode"):
        textspan(c, t, rank_mode="noisy")


def test_textspan_heads_reference_mode_needs_terms():
    from clipdecomp.methods.stats import HeadStats

    heads = np.random.default_rng(0).normal(size=(30, 2, 2, 8)).astype(np.float32)
    st = HeadStats(layers=[0, 1])
    st.update(heads)
    with pytest.raises(ValueError, match="head terms"):
        textspan_heads(st, np.eye(8), rank_mode="reference", progress=False)


def test_textspan_command_matches_the_reference_script(world, capsys, tmp_path):
    attn, mlp = _npy(world, "attn"), _npy(world, "mlp")
    labels = _npy(world, "labels")
    texts, acc, n_unique = oracle_completeness(attn, mlp, world.clf, world.text, world.pool,
                                               labels, n_last=2, iters=4, rank=80)
    out_file = tmp_path / "out.txt"
    assert cli_main(["textspan", str(world.store), "--pool", str(world.root / "pool.txt"),
                     "--text-features", str(world.root / "text.npy"), "--classifier",
                     str(world.root / "clf.npy"), "--layers", "-2:", "--n-texts", "4",
                     "--out", str(out_file), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"Current accuracy: {acc}" in printed
    assert f"Number of texts: {n_unique}" in printed
    assert "L5.H3" in printed
    # the file, line for line as the reference writes it
    dash = "-" * 18
    lines = []
    for (i, h), ts in sorted(texts.items()):
        lines += [dash, f"Layer {i}, Head {h}", dash] + ts
    lines += [dash, f"Current accuracy: {acc}", f"Number of texts: {n_unique}"]
    assert out_file.read_text() == "\n".join(lines)
    # the default file name is the reference's
    assert cli_main(["textspan", str(world.store), "--pool", str(world.root / "pool.txt"),
                     "--text-features", str(world.root / "text.npy"), "--classifier",
                     str(world.root / "clf.npy"), "--layers", "-1:", "--n-texts", "2",
                     "--output-dir", str(tmp_path), "--dataset", "imagenet", "--model-name",
                     "ViT-B-16", "--no-progress"]) == 0
    assert (tmp_path / "imagenet_completeness_pool_top_2_heads_ViT-B-16.txt").is_file()


def test_textspan_store_clean_mode_and_errors(world):
    out = textspan_store(world.store, world.text, world.pool, world.clf, layers=[-1], n_texts=3,
                         rank_mode="clean")
    assert out["layers"] == [5] and len(out["results"]) == 6
    # the clean picks are those of textspan_from_stats on the same head
    r = StoreReader(world.store)
    c = r.heads[:, 5, 2].astype(np.float64)
    want = textspan(c, world.text, n_texts=3)
    assert out["results"][(5, 2)].indices.tolist() == want.indices.tolist()
    with pytest.raises(ValueError):
        textspan_store(world.store, world.text[:, :5], world.pool, world.clf)
    assert cli_main(["textspan", str(world.store), "--pool", "no-such-pool",
                     "--classifier", str(world.root / "clf.npy")]) == 2


def test_completeness_text_format():
    res = {(1, 0): types.SimpleNamespace(texts=["b"]), (0, 1): types.SimpleNamespace(texts=["a"])}
    assert completeness_text(res, 50.0, 2) == (
        "------------------\nLayer 0, Head 1\n------------------\na\n"
        "------------------\nLayer 1, Head 0\n------------------\nb\n"
        "------------------\nCurrent accuracy: 50.0\nNumber of texts: 2")


# ------------------------------------------------------------------------------ nns.ipynb

def test_head_index_dot_mode_ranks_as_the_notebook(world):
    import heapq

    attn = _npy(world, "attn")
    head = (4, 2)
    query = attn[3, head[0], head[1]]
    db = [(-float("inf"), None) for _ in range(5)]  # the notebook's heap of the top 5
    for i in range(len(attn)):
        heapq.heappushpop(db, (float(attn[i, head[0], head[1]] @ query), i))
    want = [i for _, i in sorted(db, key=lambda x: -x[0])]
    index = HeadIndex.from_store(world.store, heads=head, metric="dot")
    idx, scores = index.query(3, k=5)
    assert idx.tolist() == want
    np.testing.assert_allclose(scores, attn[idx, 4, 2] @ query, rtol=1e-5)
    # the same index from in-memory terms, and saved to disk, float32 on disk
    mem = HeadIndex.build(attn, heads=head, metric="dot")
    assert mem.query(3, k=5)[0].tolist() == want
    on_disk = HeadIndex.from_store(world.store, heads=[(-2, 2)], metric="dot",
                                   path=world.root / "idx")
    again = HeadIndex.open(world.root / "idx")
    assert again.metric == "dot" and again.vectors.dtype == np.float32
    assert again.query(query, k=5)[0].tolist() == want == on_disk.query(3, k=5)[0].tolist()


def test_head_index_from_store_cosine_equals_build(world):
    attn = _npy(world, "attn")
    a = HeadIndex.from_store(world.store, heads=[(5, 1), (4, 0)])
    b = HeadIndex.build(attn, heads=[(5, 1), (4, 0)])
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.query(0, k=4)[0].tolist() == b.query(0, k=4)[0].tolist()
    part = world.root / "p.zarr"
    clipdecomp.run_dataset(world.model, world.imgs, part, layers="-1:", progress=False)
    with pytest.raises(ValueError, match="not stored"):
        HeadIndex.from_store(part, heads=(3, 0))
    with pytest.raises(ValueError, match="metric"):
        HeadIndex.build(attn, heads=(0, 0), metric="l2")


# ------------------------------------------------------------------------------ defaults, pools

def test_zero_shot_classifier_defaults_to_openai_templates(world):
    names = ["red", "blue"]
    default = zero_shot_classifier(world.model, names)
    e = world.model.encode_text([t.replace("{}", n) for n in names
                                 for t in OPENAI_IMAGENET_TEMPLATES], normalize=True).astype(np.float64)
    e = e.reshape(2, 80, -1).mean(1)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(default, e.T, atol=1e-5)
    own = zero_shot_classifier(world.model, names, "clipdecomp")
    np.testing.assert_allclose(own, zero_shot_classifier(world.model, names,
                                                         CLIPDECOMP_TEMPLATES), atol=1e-7)
    assert not np.allclose(own, default, atol=1e-3)
    with pytest.raises(ValueError, match="template set"):
        zero_shot_classifier(world.model, names, "nope")


def test_reference_pools_ship_verbatim_with_their_notice():
    g = load_pool("google_3498_english")
    d = load_pool("image_descriptions_general")
    assert len(g) == len(d) == 3498
    assert g[:3] == ["the", "of", "and"] and d[:2] == ["A badge", "A bag"]
    assert d[378] == "An image of a side dish "  # kept as the reference reads it
    raw = POOLS["image_descriptions_general"].read_text(encoding="utf-8")
    assert raw.split("\n") == d
    notice = (POOLS["google_3498_english"].parent / "NOTICE").read_text()
    assert "Copyright (c) 2024 Yossi Gandelsman" in notice and "MIT License" in notice
    assert load_pool("clipdecomp") == load_pool()
    with pytest.raises(ValueError, match="no description pool"):
        load_pool("google_3498")


# ------------------------------------------------------------------------------ segmentation

def test_token_embeddings_match_transformers(b16):
    import torch

    model = clipdecomp.load(b16.file("hf"), threads=1)
    rng = np.random.default_rng(0)
    px = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    got = model.token_embeddings(px)
    with torch.no_grad():
        hs = b16.model.vision_model(pixel_values=torch.from_numpy(px)).last_hidden_state
        want = b16.model.visual_projection(b16.model.vision_model.post_layernorm(hs)).numpy()
    assert got.shape == (2, 17, b16.model.config.projection_dim)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_patch_token_baseline_follows_the_paper_recipe(world):
    from clipdecomp.methods.seg_baselines import patch_token_maps, segment_patch_tokens

    ims = [np.asarray(Image.open(world.imgs / c / "01.png")) for c in COLORS]
    z = world.model.token_embeddings(ims)
    w = world.clf.astype(np.float64)
    cls = np.argmax(z[:, 0] @ w, axis=1)
    heat = z[:, 1:] @ w  # [B, N-1, C], the reference's class_heatmap with the tokens' own rows
    want = np.stack([heat[i, :, cls[i]] - heat[i].mean(axis=1) for i in range(3)])
    maps, got_cls = patch_token_maps(z, world.clf)
    assert got_cls.tolist() == cls.tolist()
    np.testing.assert_allclose(maps.reshape(3, -1), want, atol=1e-5)
    res = segment_patch_tokens(world.model, ims, world.clf)
    np.testing.assert_allclose(res.maps, maps, atol=1e-6)
    assert res.scores.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="square"):
        patch_token_maps(z[:, :11], world.clf)


def test_batch_min_max_is_the_reference_normalisation():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 4, 4)).astype(np.float32)
    res = segment_maps(maps, 16, normalize="batch")
    up = np.clip(upsample(maps, 16), 0, None)  # Res = clip(Res, 0, Res.max()) on the batch
    want = (up - up.min()) / (up.max() - up.min())
    np.testing.assert_allclose(res.scores, want, atol=1e-6)
    np.testing.assert_array_equal(res.masks, want > want.mean())
    per_image = segment_maps(maps, 16)
    assert not np.allclose(per_image.scores, res.scores)
    np.testing.assert_allclose(segment_maps(maps[:1], 16, normalize="batch").scores,
                               per_image.scores[:1])
    with pytest.raises(ValueError, match="normalize"):
        segment_maps(maps, 16, normalize="dataset")


def test_segeval_says_which_settings(tmp_path, capsys, monkeypatch):
    from clipdecomp.cli import segeval_main
    from clipdecomp.data.imagenet_seg import write_gtsegs_like

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(48, 80, 3), dtype=np.uint8) for _ in range(3)]
    masks = [rng.random(size=(48, 80)) > 0.5 for _ in range(3)]
    path = tmp_path / "gt.mat"
    write_gtsegs_like(path, images, masks)
    model = clipdecomp.load(threads=1)
    np.save(tmp_path / "clf.npy", zero_shot_classifier(model, COLORS, "single"))
    base = ["--data", str(path), "--model", str(toy.MODEL_DIR), "--classifier",
            str(tmp_path / "clf.npy"), "--no-progress", "--threads", "1"]
    assert segeval_main(base + ["--save-maps", str(tmp_path / "maps")]) == 0
    out = capsys.readouterr().out
    assert "squashed to the input size (reference)" in out and "min-max: per image" in out
    assert "patch tokens" in out
    files = sorted(os.listdir(tmp_path / "maps"))
    assert files == ["00000.npz", "00001.npz", "00002.npz"]
    with np.load(tmp_path / "maps" / "00001.npz") as f:
        assert f["decomposition_map"].shape == (8, 8)
        assert f["patch_tokens_scores"].shape == (64, 64) and f["gt"].dtype == bool
    assert segeval_main(base + ["--reference"]) == 0
    out = capsys.readouterr().out
    assert "min-max: per batch, batch size 1 (the reference's settings)" in out
    assert segeval_main(base + ["--mask-resize", "image"]) == 0
    assert "resized and cropped like the images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        segeval_main(base + ["--reference", "--mask-resize", "image"])


def test_reconstruction_curve_reference_mode_is_the_completeness_accuracy(world):
    from clipdecomp.methods.textspan import textspan_reconstruction_curve

    attn, mlp, labels = _npy(world, "attn"), _npy(world, "mlp"), _npy(world, "labels")
    _, acc, _ = oracle_completeness(attn, mlp, world.clf, world.text, world.pool, labels,
                                    n_last=2, iters=3, rank=80)
    df = textspan_reconstruction_curve(attn, mlp, labels, world.clf, world.text, world.pool,
                                       layers=[4, 5], n_texts_list=(3,), rank=80,
                                       rank_mode="reference", progress=False)
    assert 100 * df[df.setting == "text span"].accuracy.iloc[0] == pytest.approx(acc)
    picks = oracle_textspan(attn[:, 5, 1], world.text, 3, 80)[0]
    assert df.attrs["results"][(5, 1)].indices.tolist() == picks
