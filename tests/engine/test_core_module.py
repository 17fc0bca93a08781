"""clipdecomp._core against the plain NumPy oracle (tests/oracle.py) on tiny random weights.

Both key layouts, F32 / F16 / BF16 files, GELU and QuickGELU, every output of encode_image, the
decomposition's identities, the text tower, results written into given arrays, the memory plan,
argument checking and malformed files.
"""

from __future__ import annotations

import gc
import json
import math
import signal
import struct
import threading

import numpy as np
import oracle
import pytest

from clipdecomp import _core as core

TOL = 2e-5


def assert_close(got, want, tol=TOL, what=""):
    """max |got - want| <= tol * max |want|: float32 core against the float64 oracle."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max diff {err:.3e} vs scale {scale:.3e}"


def make_model(tmp_path, layout="open_clip", dtype="F32", act="gelu", text_act="quick_gelu",
               seed=0, prefix="", **cfg_over):
    """Write a tiny random checkpoint; return (path, cfg, open_clip weights as stored)."""
    cfg = oracle.tiny_config(act=act, text_act=text_act, **cfg_over)
    sd = {k: oracle.round_to(v, dtype) for k, v in oracle.random_weights(cfg, seed).items()}
    tensors = sd if layout == "open_clip" else oracle.to_hf(sd, prefix)
    if layout == "open_clip" and prefix:
        tensors = {prefix + k: v for k, v in sd.items()}
    path = tmp_path / f"m_{layout}_{dtype}_{act}_{seed}.safetensors"
    oracle.write_safetensors(path, tensors, dtype)
    return str(path), cfg, sd


def images_for(cfg, b=2, seed=1):
    s = cfg["image_size"]
    return np.random.default_rng(seed).standard_normal((b, 3, s, s)).astype(np.float32)


def ids_for(cfg, t=3, seed=2):
    rng = np.random.default_rng(seed)
    c, v = cfg["context_length"], cfg["vocab_size"]
    ids = rng.integers(1, v - 1, size=(t, c)).astype(np.int32)
    for i in range(t):
        ids[i, 3 + i:] = 0
        ids[i, 2 + i] = v - 1  # end of text
    return ids


CASES = [
    ("open_clip", "F32", "gelu"),
    ("hf", "F32", "quick_gelu"),
    ("open_clip", "F16", "quick_gelu"),
    ("hf", "BF16", "gelu"),
    ("open_clip", "BF16", "quick_gelu"),
    ("hf", "F16", "gelu"),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, tmp_path_factory):
    layout, dtype, act = request.param
    path, cfg, sd = make_model(tmp_path_factory.mktemp("m"), layout, dtype, act,
                               text_act="gelu" if act == "quick_gelu" else "quick_gelu",
                               seed=CASES.index(request.param))
    model = core.Model(path, cfg)
    images = images_for(cfg)
    probe = np.random.default_rng(3).standard_normal((5, cfg["embed_dim"])).astype(np.float32)
    out = model.encode_image(images, heads=True, mlps=True, cls_to_cls=True, tokens=True,
                             probe=probe, attn=True)
    ref = oracle.decompose(sd, cfg, images, probe=probe)
    return {"layout": layout, "model": model, "cfg": cfg, "sd": sd, "images": images,
            "probe": probe, "out": out, "ref": ref}


@pytest.mark.parametrize("key", ["embedding", "ln_stats", "heads", "mlps", "cls_to_cls", "tokens",
                                 "probe", "attn_cls", "attn_mean"])
def test_outputs_match_oracle(case, key):
    assert case["out"][key].dtype == np.float32
    assert_close(case["out"][key], case["ref"][key], what=key)


def test_layout_detected(case):
    assert case["model"].layout == case["layout"]
    assert case["model"].config["act"] == case["cfg"]["act"]


def test_identity(case):
    o = case["out"]
    lhs = o["heads"].sum((1, 2)) + o["mlps"].sum(1)
    rhs = o["embedding"] / o["ln_stats"][:, 2:3]
    assert np.abs(lhs - rhs).max() < 1e-5
    assert_close(o["ln_stats"][:, 2], np.linalg.norm(o["embedding"].astype(np.float64), axis=1))


def test_tokens_sum_to_heads_and_cls(case):
    o = case["out"]
    np.testing.assert_allclose(o["tokens"].sum(2), o["heads"], atol=1e-5)
    np.testing.assert_allclose(o["tokens"][:, :, 0].sum(2), o["cls_to_cls"], atol=1e-5)


def test_probe_is_tokens_dot_directions(case):
    o = case["out"]
    want = o["tokens"].astype(np.float64) @ case["probe"].T.astype(np.float64)
    assert_close(o["probe"], want, tol=1e-5)


def test_attention_maps(case):
    o = case["out"]
    np.testing.assert_allclose(o["attn_cls"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(o["attn_mean"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(o["attn_mean"][:, :, 0], o["attn_cls"].mean(2), atol=1e-6)


def test_text_matches_oracle(case):
    ids = ids_for(case["cfg"])
    got = case["model"].encode_text(ids)
    assert got.shape == (3, case["cfg"]["embed_dim"]) and got.dtype == np.float32
    assert_close(got, oracle.encode_text(case["sd"], case["cfg"], ids), what="text")
    # int64 ids (what tokenizers usually give) are accepted
    np.testing.assert_array_equal(case["model"].encode_text(ids.astype(np.int64)), got)


def test_requested_keys_only(case):
    out = case["model"].encode_image(case["images"][:1])
    assert set(out) == {"embedding", "ln_stats"}
    assert_close(out["embedding"], case["ref"]["embedding"][:1])
    out = case["model"].encode_image(case["images"], mlps=True)
    assert set(out) == {"embedding", "ln_stats", "mlps"}


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path, cfg, sd = make_model(tmp_path_factory.mktemp("s"), "open_clip", "F32", "gelu", seed=9)
    return {"path": path, "cfg": cfg, "sd": sd, "model": core.Model(path, cfg)}


def test_results_outlive_model(small):
    model = core.Model(small["path"], small["cfg"])
    out = model.encode_image(images_for(small["cfg"]), heads=True, tokens=True)
    assert out["heads"].flags.owndata and out["heads"].flags.c_contiguous
    want = out["heads"].copy()
    del model, out["tokens"]
    gc.collect()
    _ = [np.ones(1000) for _ in range(10)]
    np.testing.assert_array_equal(out["heads"], want)


def test_writes_into_given_arrays(small):
    """out= arrays (slices of larger results) are filled in place, with the numbers of a call
    that allocates, and nothing outside them is touched."""
    model, cfg = small["model"], small["cfg"]
    px = images_for(cfg, b=3, seed=4)
    opts = {"heads": True, "mlps": True, "cls_to_cls": True, "tokens": True, "attn": True,
            "token_embeddings": True, "probe": np.eye(2, cfg["embed_dim"], dtype=np.float32)}
    ref = model.encode_image(px, **opts)
    big = {k: np.full((5,) + v.shape[1:], np.nan, np.float32) for k, v in ref.items()}
    given = {k: v[1:4] for k, v in big.items()}
    got = model.encode_image(px, out=given, **opts)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k] is given[k], k
        np.testing.assert_array_equal(big[k][1:4], v, err_msg=k)
        assert np.isnan(big[k][[0, 4]]).all(), k
    # only some given: the others are allocated
    emb = np.empty((3, cfg["embed_dim"]), np.float32)
    part = model.encode_image(px, heads=True, out={"embedding": emb})
    assert part["embedding"] is emb
    np.testing.assert_array_equal(part["heads"], ref["heads"])
    # the text tower too
    ids = ids_for(cfg, t=3)
    feats = np.full((4, cfg["embed_dim"]), np.nan, np.float32)
    assert model.encode_text(ids, out=feats[1:]) is not None
    np.testing.assert_array_equal(feats[1:], model.encode_text(ids))
    assert np.isnan(feats[0]).all()


def test_given_arrays_are_checked(small):
    model, cfg = small["model"], small["cfg"]
    px = images_for(cfg, b=2)
    d = cfg["embed_dim"]
    bad = [
        ({"embedding": np.zeros((3, d), np.float32)}, ValueError, "shape"),
        ({"embedding": np.zeros((2, d), np.float64)}, ValueError, "float32"),
        ({"embedding": np.zeros((d, 2), np.float32).T}, ValueError, "C-contiguous"),
        ({"embedding": [[0.0] * d] * 2}, TypeError, "numpy array"),
        ({"tokens": np.zeros((2, 1), np.float32)}, ValueError, "not an output"),
        ({"embedding": px.reshape(-1)[:2 * d].reshape(2, d)}, ValueError, "shares memory"),
    ]
    ro = np.zeros((2, d), np.float32)
    ro.flags.writeable = False
    bad.append(({"embedding": ro}, ValueError, "read-only"))
    shared = np.zeros(2 * d + 6, np.float32)
    bad.append(({"embedding": shared[:2 * d].reshape(2, d),
                 "ln_stats": shared[2 * d - 3:2 * d + 3].reshape(2, 3)},
                ValueError, r"out\['ln_stats'\] shares memory with out\['embedding'\]"))
    for out, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            model.encode_image(px, out=out)
    with pytest.raises(TypeError, match="dict"):
        model.encode_image(px, out=[np.zeros((2, d), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        model.encode_text(ids_for(cfg, t=2), out=np.zeros((3, d), np.float32))


def test_image_plan(small):
    """The core's plan: the result bytes are those of the arrays a call returns (counted from
    the arrays), and the chunk follows the scratch budget."""
    model, cfg = small["model"], small["cfg"]
    px = images_for(cfg, b=3)
    for opts in [{}, {"heads": True, "mlps": True, "cls_to_cls": True},
                 {"tokens": True, "attn": True, "probe": 2}]:
        call = dict(opts)
        if "probe" in call:
            call["probe"] = np.ones((2, cfg["embed_dim"]), np.float32)
        got = sum(a.nbytes for a in model.encode_image(px, **call).values())
        plan = core.image_plan(cfg, 3, threads=1, **opts)
        assert plan["result_per_image"] * 3 == got, opts
        assert plan["chunk"] == 3 and plan["threads"] == 1
        # the fold F (L, W, D) that every decomposition maps its terms through
        assert plan["model_bytes"] == (4 * cfg["layers"] * cfg["width"] * cfg["embed_dim"]
                                       if opts else 0)
        one = core.image_plan(cfg, 3, threads=1, budget=plan["scratch_per_image"], **opts)
        assert one["chunk"] == 1
        two = core.image_plan(cfg, 3, threads=1, budget=2 * plan["scratch_per_image"], **opts)
        assert two["chunk"] == 2
    assert core.image_plan(cfg, 3, threads=3)["scratch_fixed"] > \
        core.image_plan(cfg, 3, threads=1)["scratch_fixed"]
    with pytest.raises(ValueError, match="heads"):
        core.image_plan({**cfg, "heads": 0}, 1)
    with pytest.raises(ValueError, match="pool_tokens"):
        core.image_plan(cfg, 1, pool_tokens=True)
    with pytest.raises(ValueError, match=">= 0"):
        core.image_plan(cfg, -1)


def test_threads_and_concurrent_calls(small):
    model, cfg = small["model"], small["cfg"]
    images = images_for(cfg, b=3)
    one = model.encode_image(images, tokens=True, threads=1)
    two = model.encode_image(images, tokens=True, threads=2)
    np.testing.assert_allclose(one["tokens"], two["tokens"], atol=1e-6)
    results = [None] * 4

    def run(i):
        results[i] = model.encode_image(images, tokens=True, heads=True)["tokens"]

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, one["tokens"], atol=1e-6)


def test_every_instruction_set_path(small):
    model, cfg, sd = small["model"], small["cfg"], small["sd"]
    images = images_for(cfg)
    ref = oracle.decompose(sd, cfg, images)
    current = core.isa()
    try:
        for name in ("generic", "avx2", "avx512"):
            try:
                core.set_isa(name)
            except ValueError:
                continue
            out = model.encode_image(images, heads=True, tokens=True, attn=True)
            for key in ("embedding", "heads", "tokens", "attn_mean"):
                assert_close(out[key], ref[key], what=f"{name}: {key}")
    finally:
        core.set_isa(current)


def test_inputs_cast_and_empty_batch(small):
    model, cfg = small["model"], small["cfg"]
    images = images_for(cfg)
    want = model.encode_image(images)["embedding"]
    np.testing.assert_array_equal(model.encode_image(images.astype(np.float64))["embedding"], want)
    wide = np.zeros((2, 3, 16, 32), np.float32)
    wide[..., ::2] = images
    np.testing.assert_array_equal(model.encode_image(wide[..., ::2])["embedding"], want)
    empty = model.encode_image(np.zeros((0, 3, 16, 16), np.float32), heads=True)
    assert empty["embedding"].shape == (0, 24) and empty["heads"].shape == (0, 2, 4, 24)


def test_input_errors(small):
    model, cfg = small["model"], small["cfg"]
    images = images_for(cfg)
    with pytest.raises(ValueError, match=r"pixels must have shape \[B, 3, 16, 16\]"):
        model.encode_image(images[:, :2])
    with pytest.raises(ValueError, match="pixels"):
        model.encode_image(images[0])
    bad = images.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"images.*\[1, 2, 3, 4\]"):
        model.encode_image(bad)
    with pytest.raises(ValueError, match=r"probe must have shape \[T, 24\]"):
        model.encode_image(images, probe=np.zeros((3, 7), np.float32))
    with pytest.raises(TypeError):
        model.encode_image(images, True)  # flags are keyword-only
    with pytest.raises(ValueError, match=r"ids must have shape \[T, 8\]"):
        model.encode_text(np.zeros((2, 7), np.int32))
    ids = ids_for(cfg)
    ids[1, 0] = cfg["vocab_size"]
    with pytest.raises(ValueError, match="vocabulary"):
        model.encode_text(ids)
    ids[1, 0] = -1
    with pytest.raises(ValueError, match="vocabulary"):
        model.encode_text(ids)
    with pytest.raises(TypeError):
        model.encode_text(ids.astype(np.float32))


def test_config_round_trip_and_errors(small):
    path, cfg = small["path"], small["cfg"]
    model = small["model"]
    assert model.config == {**cfg}
    assert model.path == path
    assert model.raw_logit_scale == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    no_act = {k: v for k, v in cfg.items() if k != "act"}
    with pytest.raises(ValueError, match="act"):
        core.Model(path, no_act)
    with pytest.raises(ValueError, match="quick_gelu"):
        core.Model(path, {**cfg, "act": "relu"})
    with pytest.raises(ValueError, match="layout"):
        core.Model(path, cfg, "timm")
    with pytest.raises(ValueError, match=r"visual\.conv1\.weight.*\[48, 3, 4, 4\]"):
        core.Model(path, {**cfg, "width": 48})
    with pytest.raises(ValueError, match=r"layers = 1, but the file has a block 1"):
        core.Model(path, {**cfg, "layers": 1})
    with pytest.raises(ValueError, match=r"resblocks\.2\.ln_1\.weight' is missing"):
        core.Model(path, {**cfg, "layers": 3})
    with pytest.raises(ValueError, match="vision_model"):
        core.Model(path, cfg, layout="hf")
    with pytest.raises(FileNotFoundError):
        core.Model(path + ".missing", cfg)
    with pytest.raises(TypeError):
        core.Model(path, list(cfg.items()))
    vis = core.Model(path, {**cfg, "text_layers": 0})
    with pytest.raises(ValueError, match="text tower"):
        vis.encode_text(ids_for(cfg))


def test_image_only_hf_file_with_prefix(tmp_path):
    cfg = oracle.tiny_config()
    sd = oracle.random_weights(cfg, seed=4, text=False)
    hf = oracle.to_hf(sd, prefix="model.")
    path = tmp_path / "vision.safetensors"
    oracle.write_safetensors(path, hf)
    with pytest.raises(ValueError, match="text_model.embeddings.token_embedding"):
        core.Model(str(path), cfg)
    model = core.Model(str(path), {**cfg, "text_layers": 0})
    assert model.layout == "hf" and model.raw_logit_scale is None
    images = images_for(cfg)
    assert_close(model.encode_image(images)["embedding"], oracle.encode_image(sd, cfg, images))


def _raw_file(path, header, data=b""):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def test_malformed_files(small, tmp_path):
    cfg = small["cfg"]
    with open(small["path"], "rb") as f:
        good = f.read()
    cases = {
        "truncated": good[: len(good) // 2],
        "tiny": b"\x01\x00",
        "huge_header": struct.pack("<Q", 1 << 40) + b"{}",
        "header_past_end": struct.pack("<Q", 1000) + b"{}",
        "not_json": struct.pack("<Q", 5) + b"{abc}",
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match="safetensors") as e:
            core.Model(str(p), cfg)
        assert str(p) in str(e.value), name
    p = _raw_file(tmp_path / "dtype.safetensors",
                  {"visual.class_embedding": {"dtype": "F7", "shape": [32],
                                              "data_offsets": [0, 128]}}, b"\0" * 128)
    with pytest.raises(ValueError, match="visual.class_embedding.*F7"):
        core.Model(p, cfg)
    p = _raw_file(tmp_path / "offsets.safetensors",
                  {"visual.class_embedding": {"dtype": "F32", "shape": [32],
                                              "data_offsets": [0, 100]}}, b"\0" * 128)
    with pytest.raises(ValueError, match="data_offsets"):
        core.Model(p, cfg)
    p = _raw_file(tmp_path / "neither.safetensors",
                  {"weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ValueError, match="neither"):
        core.Model(p, cfg)
    # a used tensor stored as I64 -> named in the message
    sd = dict(small["sd"])
    del sd["visual.class_embedding"]
    p = tmp_path / "i64.safetensors"
    oracle.write_safetensors(p, sd, raw={"visual.class_embedding":
                                         ("I64", (32,), np.zeros(32, "<i8").tobytes())})
    with pytest.raises(ValueError, match="visual.class_embedding.*I64"):
        core.Model(str(p), cfg)
    # unused non-float tensors are fine (HF position_ids)
    p = tmp_path / "posids.safetensors"
    oracle.write_safetensors(p, small["sd"], raw={"position_ids":
                                                  ("I64", (1, 8), np.arange(8, dtype="<i8").tobytes())})
    core.Model(str(p), cfg)


def test_signal_stops_the_forward(small):
    """A signal handler's exception (Ctrl-C's KeyboardInterrupt) surfaces from encode_image."""
    model, cfg = small["model"], small["cfg"]
    images = images_for(cfg, b=2000)  # a few hundred ms: the timer fires during the call

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    completed = []
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        with pytest.raises(Stop):
            model.encode_image(images, heads=True, threads=1)
            completed.append(True)
            signal.pause()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not completed, "the call finished before the signal was seen"


def test_kernels_against_numpy():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((7, 13)).astype(np.float32)
    w = rng.standard_normal((5, 13)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    want = a.astype(np.float64) @ w.T.astype(np.float64) + b
    for naive in (False, True):
        assert_close(core._matmul(a, w, b, naive=naive), want, tol=1e-5)
        assert_close(core._matmul(a, w, naive=naive), want - b, tol=1e-5)
        assert_close(core._sgemm_nt(a, w, naive=naive), a.astype(np.float64) @ w.T, tol=1e-5)
        assert_close(core._sgemm_nn(a, w.T.copy(), naive=naive), a.astype(np.float64) @ w.T,
                     tol=1e-5)
    with pytest.raises(ValueError):
        core._matmul(a, w[:, :4])
    assert core.isa() in ("avx512", "avx2", "generic")
    with pytest.raises(ValueError, match="bogus"):
        core.set_isa("bogus")
    current = core.isa()
    core.set_isa("generic")
    assert core.isa() == "generic"
    core.set_isa(current)
