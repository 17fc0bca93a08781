"""Numerics: NaN / Inf in images and directions are refused, NaN / Inf in weights are found at
load and named, half-precision files convert exactly (inf, nan, subnormals), huge embeddings
normalise without overflow, and debug mode checks the decomposition identity as it runs.

No torch: tiny random weights from ``tests/oracle.py``, NumPy references.
"""
from __future__ import annotations

import numpy as np
import oracle
import pytest

import clipdecomp
from clipdecomp import _core as core
from clipdecomp.engine import model as model_mod
from clipdecomp.engine.config import ModelConfig
from clipdecomp.engine.decomposition import check_identity
from clipdecomp.engine.safetensors_io import SafetensorsFile

CFG = oracle.tiny_config(text_layers=0)


def write(tmp_path, sd, dtype="F32", layout="open_clip", name="m"):
    path = tmp_path / f"{name}_{layout}_{dtype}.safetensors"
    oracle.write_safetensors(path, sd if layout == "open_clip" else oracle.to_hf(sd), dtype)
    return str(path)


@pytest.fixture(scope="module")
def weights():
    return oracle.random_weights(CFG, seed=21, text=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory, weights):
    path = write(tmp_path_factory.mktemp("num"), weights)
    return clipdecomp.load(path, config=ModelConfig(**CFG), threads=1)


def pixels(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(model, bad):
    px = pixels(5)
    px[3, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"1 NaN / infinite value \(1 image; first in image 3\)"):
        model.decompose(px)
    with pytest.raises(ValueError, match=r"images\[3\]: pixels contain 1 NaN"):
        model.encode_image(list(px), normalize=True)
    with pytest.raises(ValueError, match=r"first in image 3"):
        model.encode_image(px, batch_size=2, normalize=True)  # found in batch 2, named right
    with pytest.raises(ValueError, match=r"non-finite value \((nan|inf)\) at index \[3, 1, 2, 3\]"):
        model._core.encode_image(px)


def test_non_finite_probe_directions_are_refused(model):
    dec = model.decompose(pixels(2))
    d = np.ones((2, CFG["embed_dim"]), np.float32)
    d[1, 5] = np.inf
    with pytest.raises(ValueError, match="directions contain NaN or infinite values"):
        dec.project_tokens(d)
    with pytest.raises(ValueError, match=r"probe contains a non-finite value at index \[1, 5\]"):
        model._core.encode_image(pixels(1), probe=d)


# ---------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("layout,key,hf_key", [
    ("open_clip", "visual.ln_post.weight", None),                          # kept as is
    ("open_clip", "visual.transformer.resblocks.1.mlp.c_fc.weight", None),  # packed
    ("open_clip", "visual.proj", None),                                     # transposed, packed
    ("hf", "visual.transformer.resblocks.0.attn.in_proj_weight",
     "vision_model.encoder.layers.0.self_attn.v_proj.weight"),              # q/k/v assembled
])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named_at_load(tmp_path, weights, dtype, layout, key, hf_key, bad):
    sd = dict(weights)
    t = sd[key].copy()
    flat = t.reshape(-1)
    idx = flat.size - 1 if hf_key is None else flat.size - 3   # in v_proj, the last third
    flat[idx] = bad
    sd[key] = t
    path = write(tmp_path, sd, dtype, layout)
    name = hf_key or key
    if hf_key:
        idx = idx - 2 * (flat.size // 3)
    kind = "nan" if np.isnan(bad) else ("inf" if bad > 0 else "-inf")
    with pytest.raises(ValueError, match=rf"tensor '{name}' \({dtype}\) holds a non-finite value "
                                         rf"\({kind}\) at flat index {idx} of"):
        core.Model(path, CFG)
    with pytest.raises(ValueError, match=name):
        clipdecomp.load(path, config=ModelConfig(**CFG))


def test_half_precision_overflow_in_a_file_is_named(tmp_path, weights):
    """A float32 weight past the float16 range becomes inf in a F16 file: the loader says so."""
    sd = dict(weights)
    sd["visual.class_embedding"] = sd["visual.class_embedding"].copy()
    sd["visual.class_embedding"][4] = 7e4
    with np.errstate(over="ignore"):
        path = write(tmp_path, sd, "F16")
    with pytest.raises(ValueError, match=r"'visual.class_embedding' \(F16\) holds a non-finite "
                                         r"value \(inf\) at flat index 4"):
        core.Model(path, CFG)
    core.Model(write(tmp_path, sd, "F32", name="f32"), CFG)   # fine in float32


def test_extreme_finite_half_values_load_exactly(tmp_path, weights):
    """F16 / BF16 subnormals, the largest finite values and signed zeros convert exactly: the
    model equals the float64 oracle run on the same rounded weights."""
    sd = dict(weights)
    ce = sd["visual.class_embedding"].copy()         # goes through ln_pre: large values are fine
    ce[:6] = [65504.0, -65504.0, 6e-8, -3e-5, -0.0, 2.0**-24]
    sd["visual.class_embedding"] = ce
    px = pixels(2, seed=4)
    for dtype in ("F16", "BF16"):
        rounded = {k: oracle.round_to(v, dtype) for k, v in sd.items()}
        assert rounded["visual.class_embedding"][2] != 0 or dtype == "BF16"   # a subnormal
        path = write(tmp_path, sd, dtype, name=f"x{dtype}")
        got = core.Model(path, CFG).encode_image(px, heads=True)
        want = oracle.decompose(rounded, CFG, px)
        for k in ("embedding", "heads"):
            scale = np.abs(want[k]).max()
            assert np.abs(got[k] - want[k]).max() <= 1e-4 * scale, (dtype, k)


def _bf16_reference(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float64 values, from the definition (not a bit shift)."""
    sign = np.where(bits >> 15, -1.0, 1.0)
    exp = ((bits >> 7) & 0xFF).astype(np.int64)
    man = (bits & 0x7F).astype(np.float64)
    out = np.where(exp == 0, sign * man / 128 * 2.0**-126,
                   sign * (1 + man / 128) * np.exp2(exp.astype(np.float64) - 127))
    out = np.where((exp == 255) & (man == 0), sign * np.inf, out)
    return np.where((exp == 255) & (man != 0), np.nan, out)


def test_python_reader_converts_every_half_pattern(tmp_path):
    bits = np.arange(2**16, dtype=np.uint16)
    raw = {"h": ("F16", (2**16,), bits.astype("<u2").tobytes()),
           "b": ("BF16", (2**16,), bits.astype("<u2").tobytes())}
    p = tmp_path / "all.safetensors"
    oracle.write_safetensors(p, {}, raw=raw)
    f = SafetensorsFile(p)
    h, b = f.read("h"), f.read("b")
    assert h.dtype == b.dtype == np.float32
    want_h = bits.view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(h), np.isnan(want_h))
    ok = ~np.isnan(want_h)
    np.testing.assert_array_equal(h[ok].astype(np.float64), want_h[ok])
    np.testing.assert_array_equal(np.signbit(h[ok]), np.signbit(want_h[ok]))
    want_b = _bf16_reference(bits)
    np.testing.assert_array_equal(np.isnan(b), np.isnan(want_b))
    ok = ~np.isnan(want_b)
    np.testing.assert_array_equal(b[ok].astype(np.float64), want_b[ok])


def test_huge_embeddings_normalise(tmp_path, weights):
    """Embeddings near 1e20 (float32 squares overflow): the unit vectors are still right."""
    sd = dict(weights, **{"visual.proj": weights["visual.proj"] * np.float32(1e20)})
    m = clipdecomp.load(write(tmp_path, sd, name="huge"), config=ModelConfig(**CFG))
    raw = m.encode_image(pixels(3), normalize=False).astype(np.float64)
    assert np.isfinite(raw).all() and np.abs(raw).max() > 1e19
    unit = m.encode_image(pixels(3), normalize=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)
    dec = m.decompose(pixels(3))
    np.testing.assert_allclose(dec.summed(), unit, atol=1e-4)


def test_overflowing_forward_pass_warns(tmp_path, weights):
    """Finite weights whose forward pass overflows float32: a warning naming the images, not
    silent NaN."""
    proj = weights["visual.proj"] / np.abs(weights["visual.proj"]).max()
    sd = dict(weights, **{"visual.proj": (proj * np.float32(3e38)).astype(np.float32)})
    assert np.isfinite(sd["visual.proj"]).all()
    m = clipdecomp.load(write(tmp_path, sd, name="over"), config=ModelConfig(**CFG))
    with pytest.warns(RuntimeWarning, match=r"encode_image: the embeddings of 3 image\(s\) \(the "
                                            r"first is image 0\) are NaN or infinite"):
        m.encode_image(pixels(3), normalize=True)
    with pytest.warns(RuntimeWarning, match="decompose: the embeddings of 3 image"):
        m.decompose(pixels(3))


# ---------------------------------------------------------------------------------------------
# debug mode


class Tamper:
    """Wraps the C model; on its second call, adds ``delta`` to one element of one output
    (``index[0]`` is the image within that batch)."""

    def __init__(self, inner, key, index, delta):
        self.inner, self.key, self.index, self.delta = inner, key, index, delta
        self.calls = 0

    def encode_image(self, px, **kw):
        self.calls += 1
        out = {k: np.array(v) for k, v in self.inner.encode_image(px, **kw).items()}
        if self.calls == 2:
            out[self.key][self.index] += self.delta
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def debug_on():
    model_mod.set_debug(True)
    yield
    model_mod.set_debug(None)


def test_debug_mode_passes_a_correct_decomposition(model, debug_on):
    dec = model.decompose(pixels(4), spatial=True)
    err = check_identity(dec.heads, dec.mlps, dec.embedding, dec.norm, dec.tokens)
    assert 0 <= err < 1e-5


@pytest.mark.parametrize("key,index,delta,msg", [
    ("heads", (1, 1, 3, 5), 2e-3, (r"image 3: max \|heads.sum\(\(1, 2\)\) \+ mlps.sum\(1\) - "
                                   r"embedding / norm\| = 0\.002 > 0\.001")),
    ("mlps", (0, 0, 0), -0.5, r"image 2: .* = 0\.5 > 0\.001 .*1 of 2 images"),
    ("embedding", (1, 0), np.nan, r"image 3: .* = inf > 0\.001"),
    ("tokens", (1, 0, 3, 2, 1), 5e-3, r"image 3: max \|tokens.sum\(2\) - heads\| = 0\.005"),
])
@pytest.mark.filterwarnings("ignore:decompose. the embeddings:RuntimeWarning")
def test_debug_mode_catches_a_broken_identity(model, debug_on, key, index, delta, msg):
    inner = model._core
    model._core = tamper = Tamper(inner, key, index, delta)
    try:
        with pytest.raises(RuntimeError, match=msg):
            model.decompose(pixels(6), spatial=True, batch_size=2)   # the second batch is off
        assert tamper.calls == 2                                    # stopped there
        model_mod.set_debug(False)
        tamper.calls = 0
        model.decompose(pixels(6), spatial=True, batch_size=2)       # unchecked: no error
        assert tamper.calls == 3
    finally:
        model._core = inner


def test_debug_mode_from_the_environment(monkeypatch):
    model_mod.set_debug(None)
    monkeypatch.setenv("CLIPDECOMP_DEBUG", "1")
    assert model_mod.debug_enabled()
    monkeypatch.setenv("CLIPDECOMP_DEBUG", "0")
    assert not model_mod.debug_enabled()
    model_mod.set_debug(True)
    try:
        assert model_mod.debug_enabled()
    finally:
        model_mod.set_debug(None)


def test_check_identity_against_numpy():
    rng = np.random.default_rng(0)
    heads = rng.standard_normal((3, 2, 4, 5))
    mlps = rng.standard_normal((3, 3, 5))
    total = heads.sum((1, 2)) + mlps.sum(1)
    norm = np.array([2.0, 0.5, 3.0])
    emb = total * norm[:, None]
    assert check_identity(heads, mlps, emb, norm) < 1e-12
    emb[2, 1] += 0.01 * norm[2]
    with pytest.raises(RuntimeError, match=r"image 7: .* = 0\.01 > 0\.001 .*1 of 3 images"):
        check_identity(heads, mlps, emb, norm, start=5)
    assert check_identity(heads, mlps, emb, norm, tol=0.02) == pytest.approx(0.01)
