"""run_dataset: sources, store contents against a per-image oracle, float16, skipped images,
refusal of mismatching stores, the reader, in-process resume, the CLI entry.

The model is a small random-weight CLIP (tests/checkpoints.py, ViT-B/16-like geometry on 64-pixel
images) run by clipdecomp's C core. The oracle decomposes every image on its own, with the
model's own calls and none of the runner's; the engine is batch-independent, so stored rows
must equal the oracle bit for bit. ``Probe`` wraps the model to watch or interrupt the runner.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
from oracle import outer_tol
from PIL import Image
from runs import Probe, checkpoint, write_images

import clipdecomp
from clipdecomp.cli import run_main
from clipdecomp.data.runner import run_dataset
from clipdecomp.data.sources import class_folders, image_folder, list_file, open_source
from clipdecomp.data.store import StoreReader
from clipdecomp.engine.loading import ModelSpec
from clipdecomp.engine.selection import parse_layers
from clipdecomp.methods.ablation import component_means
from clipdecomp.methods.stats import HeadStats
from clipdecomp.methods.textspan import textspan_heads

# ------------------------------------------------------------------------------ the model


def oracle(model, paths):
    """Per-image decomposition without the runner: (ok [N], arrays dict of float32)."""
    outs, ok = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("RGB")
        except Exception:  # noqa: BLE001 - the oracle's notion of unreadable
            ok.append(False)
            outs.append(None)
            continue
        d = model.decompose(model.preprocess([im]))
        ok.append(True)
        outs.append(d)
    c = model.config
    shapes = {
        "embedding": (c.embed_dim,),
        "heads": (c.layers, c.heads, c.embed_dim),
        "mlps": (c.layers + 1, c.embed_dim),
        "cls_to_cls": (c.layers, c.embed_dim),
    }
    arrays = {
        k: np.stack([getattr(o, k)[0] if o is not None else np.zeros(s, np.float32)
                     for o in outs]).astype(np.float32)
        for k, s in shapes.items()
    }
    return np.asarray(ok), arrays


def check_stats(reader, ok, arrays, layers, rtol=1e-12):
    st = reader.stats
    v = {k: a[ok].astype(np.float64) for k, a in arrays.items()}
    assert st.n == int(ok.sum())
    np.testing.assert_allclose(st.embedding_sum, v["embedding"].sum(0), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(st.head_sum, v["heads"].sum(0), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(st.mlp_sum, v["mlps"].sum(0), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(st.cls_sum, v["cls_to_cls"].sum(0), rtol=rtol, atol=1e-12)
    x = v["heads"][:, list(layers)]
    # the second moments are the C core's (float32 products of centred chunks of rows, one
    # call per store chunk): within its bound of the float64 sum, chunk by chunk
    # (skipped images are rows of zeros in their chunk: they add nothing to the sum but
    # count in the bound)
    want = np.einsum("nlhd,nlhe->lhde", x, x)
    every_row = arrays["heads"][:, list(layers)].astype(np.float64)
    for j in range(x.shape[1]):
        for h in range(x.shape[2]):
            tol = outer_tol(every_row[:, j, h], rows=reader.chunk_size)
            err = np.abs(st.sum_outer[j, h] - want[j, h])
            assert np.all(err <= tol), f"layer {layers[j]} head {h}: {(err / tol).max():.3g}"
    return st


@pytest.fixture(scope="module")
def world(tmp_path_factory, b16):
    root = tmp_path_factory.mktemp("world")
    imgs = root / "imgs"
    paths = write_images(imgs, 23)
    path = checkpoint(b16)
    return types.SimpleNamespace(root=root, imgs=imgs, paths=sorted(paths), model_path=path,
                                 model=clipdecomp.load(path, threads=1))


# ------------------------------------------------------------------------------ sources


def test_sources(tmp_path):
    (tmp_path / "flat" / "a" / "deep").mkdir(parents=True)
    (tmp_path / "flat" / ".hidden").mkdir()
    for rel in ["x.png", "a/y.JPG", "a/deep/z.jpeg", "notes.txt", ".hidden/h.png", ".dot.png"]:
        (tmp_path / "flat" / rel).write_bytes(b"")
    src = image_folder(tmp_path / "flat")
    assert src.paths == ["a/deep/z.jpeg", "a/y.JPG", "x.png"]
    assert src.labels.tolist() == [-1, -1, -1]
    assert open_source(tmp_path / "flat").layout == "folder"  # images at the top level

    for rel in ["dog/1.png", "dog/sub/2.png", "cat/3.png", "ant/4.png"]:
        (tmp_path / "cls" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cls" / rel).write_bytes(b"")
    src = class_folders(tmp_path / "cls")
    assert src.classes == ["ant", "cat", "dog"]
    assert src.paths == ["ant/4.png", "cat/3.png", "dog/1.png", "dog/sub/2.png"]
    assert src.labels.tolist() == [0, 1, 2, 2]
    assert open_source(tmp_path / "cls").layout == "classes"
    assert open_source(tmp_path / "cls", layout="folder").labels.tolist() == [-1] * 4

    lst = tmp_path / "list.csv"
    lst.write_text("path,label\n# a comment\ncls/dog/1.png,7\n\n/abs/q.png\t3\nr, s.png,2\n")
    src = list_file(lst)
    assert src.paths == ["cls/dog/1.png", "/abs/q.png", "r, s.png"]
    assert src.labels.tolist() == [7, 3, 2] and src.classes is None
    assert src.abspath(0) == os.path.join(str(tmp_path), "cls/dog/1.png")
    assert src.abspath(1) == "/abs/q.png"
    (tmp_path / "named.tsv").write_text("a.png\tzebra\nb.png\tant\nc.png\n")
    src = open_source(tmp_path / "named.tsv")
    assert src.layout == "list" and src.classes == ["ant", "zebra"]
    assert src.labels.tolist() == [1, 0, -1]
    # the listing hash sees paths and labels
    h = src.listing_sha256()
    (tmp_path / "named.tsv").write_text("a.png\tzebra\nb.png\tzebra\nc.png\n")
    assert open_source(tmp_path / "named.tsv").listing_sha256() != h


def test_parse_layers():
    assert parse_layers(None, 4) == (0, 1, 2, 3)
    assert parse_layers("-2:", 12) == (10, 11)
    assert parse_layers("0, 5,-1", 12) == (0, 5, 11)
    assert parse_layers(slice(2, 8, 3), 12) == (2, 5)
    assert parse_layers([3, -9], 12) == (3,)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers([12], 12)
    with pytest.raises(ValueError, match="no layer"):
        parse_layers("5:2", 12)


# ------------------------------------------------------------------------------ runs


def test_run_matches_per_image_oracle(world, tmp_path, capsys):
    model = Probe(world.model)
    out = tmp_path / "s.zarr"
    r = run_dataset(model, world.imgs, out, chunk_size=5, batch_size=3, layers=[0, -1])
    assert isinstance(r, StoreReader) and r.complete and r.n == 23 and r.n_chunks == 5
    assert r.layers == (0, 2) and r.heads.shape == (23, 2, 5, 40)
    ok, want = oracle(world.model, world.paths)
    assert ok.all() and r.ok[:].all()
    np.testing.assert_array_equal(r.embedding[:], want["embedding"])
    np.testing.assert_array_equal(r.heads[:], want["heads"][:, [0, 2]])
    np.testing.assert_array_equal(r.mlps[:], want["mlps"])
    np.testing.assert_array_equal(r.cls_to_cls[:], want["cls_to_cls"])
    # the decomposition's own identity holds on the stored rows
    unit = r.embedding[:] / np.linalg.norm(r.embedding[:], axis=1, keepdims=True)
    full_heads = want["heads"]
    np.testing.assert_allclose(full_heads.sum((1, 2)) + r.mlps[:].sum(1), unit, atol=2e-6)
    assert [os.path.join(str(world.imgs), p) for p in r.paths[:]] == world.paths
    # sub-folders only at the top: read as one class per folder
    assert r.classes == ["part0", "part1"]
    np.testing.assert_array_equal(r.labels[:], ["part1" in p for p in world.paths])
    check_stats(r, ok, want, (0, 2))
    # decoding ran in the prefetch threads, never in the thread that called the model
    assert model.threads_seen and all("decode" in t for t in model.threads_seen)
    assert model.calls == sum((min(5, 23 - s) + 2) // 3 for s in range(0, 23, 5))
    err = capsys.readouterr().err
    assert "23 images done (0 skipped)" in err and "images/s" in err
    run = r.runs[-1]
    assert run["images"] == 23 and run["skipped"] == 0 and not run["interrupted"]


def test_float16_store_keeps_float32_statistics(world, tmp_path):
    r = run_dataset(world.model, world.imgs, tmp_path / "h.zarr", chunk_size=8, batch_size=4,
                    dtype="float16", layers="1:", progress=False)
    assert r.heads.dtype == np.float16 and r.embedding.dtype == np.float16
    ok, want = oracle(world.model, world.paths)
    np.testing.assert_array_equal(r.heads[:], want["heads"][:, 1:].astype(np.float16))
    np.testing.assert_array_equal(r.mlps[:], want["mlps"].astype(np.float16))
    # the statistics come from the float32 values (1e-12), which float16 could not give
    check_stats(r, ok, want, (1, 2))
    from_f16 = np.asarray(r.heads[:], np.float64)
    f16_outer = np.einsum("nlhd,nlhe->lhde", from_f16, from_f16)
    assert np.abs(f16_outer - r.stats.sum_outer).max() > 1e-3 * np.abs(f16_outer).max() * 1e-3


def test_corrupt_images_are_skipped(world, tmp_path):
    src = tmp_path / "bad"
    write_images(src, 7, seed=5)
    jpg = min(str(p) for p in src.rglob("*.jpg"))
    data = Path(jpg).read_bytes()
    (src / "part0" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "part1" / "text.png").write_text("this is not an image\n")
    r = run_dataset(world.model, src, tmp_path / "bad.zarr", chunk_size=4, batch_size=3,
                    progress=False)
    paths = [os.path.join(str(src), p) for p in r.paths[:]]
    ok, want = oracle(world.model, paths)
    assert r.n == 9 and r.complete and ok.sum() == 7
    np.testing.assert_array_equal(r.ok[:], ok)
    for f in ("embedding", "heads", "mlps", "cls_to_cls"):
        a = np.asarray(getattr(r, f)[:])
        assert np.isfinite(a).all() and (a[~ok] == 0).all()
        np.testing.assert_array_equal(a[ok], want[f][ok])
    sk = r.skipped()
    assert sorted(sk["path"]) == ["part0/truncated.jpg", "part1/text.png"]
    reasons = dict(zip(sk["path"], sk["reason"]))
    assert "truncated" in reasons["part0/truncated.jpg"].lower()
    assert "UnidentifiedImageError" in reasons["part1/text.png"]
    assert r.runs[-1]["skipped"] == 2 and r.runs[-1]["valid"] == 7
    check_stats(r, ok, want, (0, 1, 2))


def test_mismatching_store_is_refused(world, tmp_path, b16, b32):
    out = tmp_path / "m.zarr"
    kw = {"chunk_size": 8, "layers": "-1:", "progress": False}
    run_dataset(world.model, world.imgs, out, **kw)
    cases = [
        ({"dtype": "float16"}, world.model, "settings.dtype"),
        ({"layers": "-2:"}, world.model, "settings.layers"),
        ({"chunk_size": 4}, world.model, "settings.chunk_size"),
        # same geometry, other weights (the float16 file of the same model)
        ({}, clipdecomp.load(checkpoint(b16, "F16")), "model.checkpoint.size"),
        ({}, clipdecomp.load(checkpoint(b32)), "model.config.act"),
    ]
    for extra, mdl, field in cases:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            run_dataset(mdl, world.imgs, out, **(kw | extra))
    more = tmp_path / "more"
    write_images(more, 3)
    with pytest.raises(ValueError, match=r"source\.n"):
        run_dataset(world.model, more, out, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        run_dataset(world.model, tmp_path / "empty", tmp_path / "e.zarr", progress=False)
    # a folder that is not a store is not overwritten
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a clipdecomp store"):
        run_dataset(world.model, world.imgs, tmp_path / "junk", progress=False)
    # the same settings resume (nothing left to do) without complaint
    r = run_dataset(world.model, world.imgs, out, **kw)
    assert r.runs[-1]["images"] == 0 and r.complete


def test_fingerprint_sees_the_weights_not_the_header(tmp_path):
    from clipdecomp.data.chunks import checkpoint_fingerprint

    a = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "a.bin").write_bytes(a)
    fa = checkpoint_fingerprint(tmp_path / "a.bin")
    assert fa == checkpoint_fingerprint(tmp_path / "a.bin") and fa["name"] == "a.bin"
    middle = (1 << 20) + ((2 << 20) - (1 << 16)) * 8 // 15 + 100  # inside sampled block 8
    for where in (100, (3 << 20) - 100, middle):  # in the header, the last block, a block
        changed = bytearray(a)
        changed[where] ^= 1
        (tmp_path / "b.bin").write_bytes(bytes(changed))
        fb = checkpoint_fingerprint(tmp_path / "b.bin")
        assert fa["size"] == fb["size"] and fa["fingerprint"] != fb["fingerprint"], where


def test_reader_chunks_decomposition_and_stats(world, tmp_path):
    src = tmp_path / "lst.txt"
    src.write_text("".join(f"{p}\t{'cat' if i % 3 else 'dog'}\n"
                           for i, p in enumerate(world.paths)))
    r = run_dataset(world.model, src, tmp_path / "r.zarr", chunk_size=6, batch_size=4,
                    layers=[1, 2], progress=False)
    ok, want = oracle(world.model, world.paths)
    assert r.classes == ["cat", "dog"]
    np.testing.assert_array_equal(r.labels[:], [1 if i % 3 == 0 else 0 for i in range(23)])
    seen = []
    for rows, c in r.iter_chunks(["heads", "norm", "labels"], layers=[-1]):
        assert c["heads"].dtype == np.float32 and c["heads"].shape[1:] == (1, 5, 40)
        np.testing.assert_array_equal(c["heads"][:, 0], want["heads"][rows, 2])
        np.testing.assert_array_equal(c["norm"], np.linalg.norm(want["embedding"][rows], axis=1))
        assert c["ok"].all() and set(c) == {"heads", "norm", "labels", "ok"}
        seen.append((rows.start, rows.stop))
    assert seen == [(0, 6), (6, 12), (12, 18), (18, 23)]
    with pytest.raises(ValueError, match="not stored"):
        next(r.iter_chunks("heads", layers=[0]))
    dec = r.decomposition([3, 20, -1])
    assert dec.layers == (1, 2) and dec.heads.shape == (3, 2, 5, 40) and len(dec) == 3
    np.testing.assert_array_equal(dec.rows, [3, 20, 22])
    np.testing.assert_array_equal(dec.mlps, want["mlps"][[3, 20, 22]])
    np.testing.assert_array_equal(dec.heads, want["heads"][[3, 20, 22]][:, 1:])
    np.testing.assert_array_equal(dec.norm,
                                  np.linalg.norm(want["embedding"][[3, 20, 22]], axis=1))
    assert dec.config.embed_dim == 40 and dec.labels.tolist() == [1, 0, 0]
    # the statistics are a HeadStats: what HeadStats itself gives on the oracle's terms
    st = check_stats(r, ok, want, (1, 2))
    direct = HeadStats(layers=[1, 2]).update(want["heads"], want["mlps"], want["cls_to_cls"])
    for f in ("n", "layers", "n_layers", "sum", "head_sum", "mlp_sum", "cls_sum"):
        np.testing.assert_allclose(getattr(st, f), getattr(direct, f), rtol=1e-12)
    # HeadStats adds its outer products in float32 over chunks of at most 512 rows, each chunk
    # centred (csrc/moments.h): an entry's error is at most (rows + 4) 2^-24 sd_i sd_j
    sd = np.sqrt(np.diagonal(direct.covariance, axis1=-2, axis2=-1))
    tol = (23 + 4) * 2.0**-24 * sd[..., :, None] * sd[..., None, :] + 1e-15
    assert np.all(np.abs(st.covariance - direct.covariance) <= tol)
    means = component_means(st)
    np.testing.assert_allclose(means.heads, want["heads"].astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.mean_embedding, want["embedding"].astype(np.float64).mean(0),
                               rtol=1e-12)
    # and TextSpan reads it directly: the same picks as from the oracle's statistics
    pool = np.random.default_rng(0).normal(size=(30, 40))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    texts = [f"t{i}" for i in range(30)]
    a = textspan_heads(st, pool, texts, layers=[2], n_texts=3, rank=10, progress=False)
    b = textspan_heads(direct, pool, texts, layers=[2], n_texts=3, rank=10, progress=False)
    assert len(a) == 5 and a["texts"].tolist() == b["texts"].tolist()
    assert "chunks done 4/4" in repr(r)


def test_interrupted_run_resumes_exactly(world, tmp_path):
    kw = {"chunk_size": 4, "batch_size": 3, "layers": "-2:", "progress": False}
    full = run_dataset(world.model, world.imgs, tmp_path / "full.zarr", **kw)
    out = tmp_path / "part.zarr"
    for stop in (5, 4):  # two Ctrl-C, then completion
        with pytest.raises(KeyboardInterrupt):
            run_dataset(Probe(world.model, stop_at=stop), world.imgs, out, **kw)
        part = StoreReader(out)
        assert 0 < part.done[:].sum() < part.n_chunks and part.runs[-1]["interrupted"]
        assert not part.complete
    assert StoreReader(out).included.sum() == 3  # chunks of 2 calls: 2 done, then 1 more
    model = Probe(world.model)
    r = run_dataset(model, world.imgs, out, **kw)
    assert r.complete and r.runs[-1]["images"] == 23 - 12  # finished chunks not recomputed
    assert model.calls == 2 + 2 + 1
    for f in ("embedding", "heads", "mlps", "cls_to_cls", "ok", "paths", "labels"):
        np.testing.assert_array_equal(getattr(r, f)[:], getattr(full, f)[:])
    a, b = r.stats, full.stats
    assert a.n == b.n == 23
    for f in ("sum_outer", "head_sum", "mlp_sum", "cls_sum", "embedding_sum"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-12, atol=0)


def test_a_path_loads_the_image_tower_alone_and_resumes_stores_of_both(world, tmp_path,
                                                                        monkeypatch):
    """A run given a path (or a spec) loads the image tower alone; the store's identity does
    not depend on the towers, so a store made with both (as every store before) resumes with
    it, keeping its finished chunks, and gives the numbers of the model with both towers."""
    from clipdecomp.engine import loading

    kw = {"chunk_size": 4, "batch_size": 3, "layers": "-2:", "progress": False}
    full = run_dataset(world.model, world.imgs, tmp_path / "full.zarr", **kw)
    assert full.metadata["model"]["config"]["text_layers"] == 2
    out = tmp_path / "part.zarr"
    with pytest.raises(KeyboardInterrupt):   # 2 chunks done by the model with both towers
        run_dataset(Probe(world.model, stop_at=5), world.imgs, out, **kw)
    assert StoreReader(out).included.sum() == 2
    loads = []

    def recording_load(path, **kwargs):
        model = clipdecomp.load(path, **kwargs)
        loads.append((kwargs, model))
        return model

    monkeypatch.setattr(loading, "load", recording_load)
    r = run_dataset(world.model_path, world.imgs, out, **kw)
    (kwargs, model), = loads
    assert kwargs == {"towers": "image"} and model.towers == "image"
    assert not model.config.has_text and model.nbytes < world.model.nbytes
    assert r.complete and r.runs[-1]["images"] == 23 - 8   # the finished chunks were kept
    for f in ("embedding", "heads", "mlps", "cls_to_cls", "ok"):
        np.testing.assert_array_equal(getattr(r, f)[:], getattr(full, f)[:], err_msg=f)
    # a store made image-only resumes with both towers, through a spec too
    fresh = run_dataset(ModelSpec(world.model_path, {"threads": 1}), world.imgs,
                        tmp_path / "image.zarr", **kw)
    assert loads[-1][0] == {"threads": 1, "towers": "image"}
    assert fresh.metadata["model"]["config"]["text_layers"] == 0
    # the store records how to load the whole model (later commands encode text)
    assert fresh.metadata["model"]["spec"]["kwargs"] == {"threads": 1}
    again = run_dataset(world.model, world.imgs, tmp_path / "image.zarr", **kw)
    assert again.runs[-1]["images"] == 0
    # the image tower's fields still tell models apart
    other = clipdecomp.load(world.model_path, act="quick_gelu", towers="image")
    with pytest.raises(ValueError, match=r"model\.config\.act"):
        run_dataset(other, world.imgs, tmp_path / "image.zarr", **kw)


def test_model_spec_and_cli(world, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    argv = [str(world.imgs), "--model", world.model_path, "--threads", "1", "--out", str(out),
            "--chunk-size", "10", "--batch-size", "4", "--layers", "-1:", "--dtype", "float16",
            "--no-progress"]
    assert run_main(argv) == 0
    r = StoreReader(out)
    assert r.complete and r.dtype == "float16" and r.layers == (2,)
    meta = r.metadata["model"]
    assert meta["checkpoint"]["name"] == os.path.basename(world.model_path)
    assert meta["checkpoint"]["size"] == os.path.getsize(world.model_path)
    assert meta["config"]["layers"] == 3 and meta["spec"]["path"] == world.model_path
    _ok, want = oracle(world.model, world.paths)
    np.testing.assert_array_equal(r.heads[:, 0], want["heads"][:, 2].astype(np.float16))
    # the same store through a ModelSpec or a loaded model resumes (nothing to do)
    spec = ModelSpec(world.model_path, {"threads": 1})
    r2 = run_dataset(spec, world.imgs, out, chunk_size=10, layers=[2], dtype="float16",
                     progress=False)
    assert r2.runs[-1]["images"] == 0
    # a mismatch is a clear error and exit status 2
    assert run_main(argv[:-2] + ["float32", "--no-progress"]) == 2
    assert "settings.dtype" in capsys.readouterr().err


def test_model_spec_is_built_from_the_model(world):
    """What a worker loads is what load() was given: precision, threads, act... included."""
    import pickle

    from clipdecomp.engine.loading import spec_of

    model = clipdecomp.load(world.model_path, precision="bf16-emulated", threads=1,
                            act="gelu")
    spec = spec_of(model)
    assert spec is model.spec and spec.path == os.path.abspath(world.model_path)
    assert spec.kwargs == {"precision": "bf16-emulated", "threads": 1, "act": "gelu"}
    again = spec.load()
    assert again.precision == model.precision == "bf16-emulated"
    assert again.threads == 1 and again.config == model.config
    px = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(again.encode_image(px), model.encode_image(px))
    # a bf16 model is not an fp32 one: the spec of a default load differs
    assert spec_of(clipdecomp.load(world.model_path)).kwargs == {}
    # pickling (how Dask ships a model object) keeps the spec
    assert pickle.loads(pickle.dumps(model)).spec == spec
    # the embedded model's spec names its folder
    assert spec_of(clipdecomp.load()).path == str(clipdecomp.toy.MODEL_DIR)


def test_store_killed_while_being_created_is_made_again(world, tmp_path):
    import zarr

    out = tmp_path / "new.zarr"
    g = zarr.open_group(str(out), mode="w")
    g.attrs.put({"clipdecomp_creating": True})
    g.create_array("embedding", shape=(3,), dtype="float32")
    r = run_dataset(world.model, world.imgs, out, chunk_size=16, progress=False)
    assert r.complete and r.n == 23
