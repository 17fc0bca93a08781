"""precision="bf16": the roundings against torch's bfloat16, the model against transformers
running the same roundings, and the API around it.

The oracle for a bf16 product is torch: ``x.bfloat16().float() @ w.bfloat16().float().T`` (torch
rounds to nearest even, as the core does), summed in float64. The oracle for a bf16 model is
transformers' CLIPModel with the weights of every block's linear layers and the text token
table rounded to bf16 and a pre-hook rounding each of the linear layers' inputs: the numbers that AVX512_BF16 hardware computes (up to
the order of float32 sums). This machine may lack AVX512_BF16; "bf16-emulated" computes the
same roundings with the float32 kernels, so the numerics are tested everywhere, and the
hardware kernel itself is tested by the C program built on emulated intrinsics
(tests/test_gemm.py).
"""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from checkpoints import image_features, random_pixels, random_text_ids, text_features

import clipdecomp

pytestmark = pytest.mark.usefixtures("requires_core")


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 -> float32 by torch (round to nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).bfloat16().float().numpy()


# ---------------------------------------------------------------------------------------------
# products


# (the last two have depths of whole AMX tiles: on CPUs with AMX-BF16 they run on the tiles)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 33, 17), (50, 517, 96), (13, 1100, 40),
                                   (40, 768, 48), (130, 1024, 33)])
@pytest.mark.parametrize("precision", ["bf16-emulated", "bf16"])
def test_matmul_matches_torch_bf16(requires_core, shape, precision):
    if precision == "bf16" and not requires_core.has_bf16():
        pytest.skip("no AVX512_BF16 here (the kernel runs on emulated intrinsics in test_gemm)")
    m, k, oc = shape
    rng = np.random.default_rng(k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((oc, k)).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32)
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T + b
    mag = np.abs(bf16(x)).astype(np.float64) @ np.abs(bf16(w)).T + np.abs(b)
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(k + 1) * mag
    for naive in (False, True):
        out = requires_core._matmul(x, w, b, naive=naive, precision=precision)
        assert np.all(np.abs(out - ref) <= tol), (naive, np.abs(out - ref).max())
    # and the rounding is visible: fp32 differs from it by far more than the tolerance
    full = requires_core._matmul(x, w, b)
    if k > 30:
        assert np.abs(full - ref).max() > 10 * tol.max()


def test_matmul_precision_errors(requires_core):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="precision must be"):
        requires_core._matmul(x, x, precision="fp16")
    if not requires_core.has_bf16():
        with pytest.raises(ValueError, match="AVX512_BF16"):
            requires_core._matmul(x, x, precision="bf16")


# ---------------------------------------------------------------------------------------------
# the model against transformers with the same roundings

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def rounded_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_kw):
    """transformers' eager attention with the core's bf16 roundings: q, k, v and the
    probabilities rounded to bf16; float32 sums of products and softmax."""
    def r(t):
        return t.bfloat16().float()

    w = torch.matmul(r(query), r(key).transpose(-1, -2)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32)
    return torch.matmul(r(w), r(value)).transpose(1, 2).contiguous(), w


def bf16_reference(model, attention: str = "rounded"):
    """A copy of a transformers CLIPModel whose blocks multiply in bf16: weights of every block
    linear rounded, inputs rounded by a pre-hook; the text token table rounded (the core keeps
    it in bf16); q, k, v and the attention probabilities rounded (:func:`rounded_attention`;
    ``attention="float32"`` leaves the attention in float32); the other embeddings,
    projections and LayerNorms stay float32, as in the core."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    ref = copy.deepcopy(model).eval()
    if attention == "rounded":   # with eager attention's additive (causal) masks
        AttentionInterface.register("bf16_rounded", rounded_attention)
        AttentionMaskInterface.register("bf16_rounded", eager_mask)
        for cfg in (ref.vision_model.config, ref.text_model.config):
            cfg._attn_implementation = "bf16_rounded"
    table = ref.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        table.copy_(table.bfloat16().float())
    for name, mod in ref.named_modules():
        if ".layers." in name and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            with torch.no_grad():
                mod.weight.copy_(mod.weight.bfloat16().float())
            mod.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16().float(),))
    return ref


@pytest.fixture(scope="module")
def bf16_models(checkpoints):
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in ("b32_quick", "b16_gelu"):
            ck = checkpoints[name]
            out[name] = (ck, clipdecomp.load(ck.dirs[("hf", "F32")], threads=1),
                         clipdecomp.load(ck.dirs[("open_clip", "F32")], threads=1,
                                         precision="bf16"))
    return out


@pytest.mark.parametrize("name", ["b32_quick", "b16_gelu"])
def test_model_matches_transformers_in_bf16(bf16_models, name):
    ck, m32, m16 = bf16_models[name]
    assert m16.precision in ("bf16", "bf16-emulated") and m32.precision == "fp32"
    ref = bf16_reference(ck.model)
    px = random_pixels(ck, 16, seed=7)
    ids = random_text_ids(ck, 16, seed=7)
    img16 = m16.encode_image(px, normalize=False)
    txt16 = m16.encode_text(ids, normalize=False)
    img32 = m32.encode_image(px, normalize=False)
    for ours, theirs in ((img16, image_features(ref, px)), (txt16, text_features(ref, ids))):
        err = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
        # The same roundings give the same numbers up to float32 sums in another order, except
        # where an activation lies so near a bf16 rounding boundary that those tiny differences
        # round it the other way: one step of 2**-8 in one element, which moves that row by
        # about 1e-3. Many rows are untouched by such a flip and agree to float32 accuracy;
        # the others stay within a few flips.
        assert np.mean(err < 1e-5) >= 0.25, np.round(err, 7)
        assert err.max() < 1e-2, err.max()
    # bf16 is visibly not fp32 on every image (so the agreement above means something), and
    # within bf16's reach of it
    d = np.linalg.norm(img16 - img32, axis=1) / np.linalg.norm(img32, axis=1)
    assert d.min() > 1e-4 and d.max() < 3e-2, d


@pytest.mark.parametrize("name", ["b32_quick", "b16_gelu"])
def test_decomposition_in_bf16(bf16_models, name):
    ck, m32, m16 = bf16_models[name]
    px = random_pixels(ck, 3, seed=8)
    d16, d32 = m16.decompose(px), m32.decompose(px)
    # the folds stay float32: the terms add up to the bf16 embedding to bf16 accuracy
    total = d16.heads.sum((1, 2), dtype=np.float64) + d16.mlps.sum(1, dtype=np.float64)
    unit = d16.embedding / np.linalg.norm(d16.embedding, axis=1, keepdims=True)
    assert np.abs(total - unit).max() < clipdecomp.engine.decomposition.IDENTITY_TOL_BF16
    # each term within bf16's reach of fp32's
    top = max(np.abs(d32.heads).max(), np.abs(d32.mlps).max())
    assert np.abs(d16.heads - d32.heads).max() < 3e-2 * top
    assert np.abs(d16.mlps - d32.mlps).max() < 3e-2 * top
    # debug mode's identity check accepts bf16 models (with the bf16 tolerance)
    clipdecomp.set_debug(True)
    try:
        m16.decompose(px[:1])
    finally:
        clipdecomp.set_debug(None)


# ---------------------------------------------------------------------------------------------
# attention in bf16: on AMX tiles (heads of width 32 and more, no causal mask) or rounded

@pytest.fixture(scope="module")
def d32(tmp_path_factory):
    import checkpoints as ckpts

    torch.set_num_threads(1)
    ck = ckpts.build("b16_d32", str(tmp_path_factory.mktemp("d32")), seed=5)
    return ck, clipdecomp.load(ck.dirs[("open_clip", "F32")], threads=1, precision="bf16")


def test_bf16_attention_rounds_q_k_v_and_probabilities(d32):
    """Heads of width 32: on AMX tiles where the CPU has them (else the float32 kernel on
    rounded values); the same numbers as the rounded reference either way."""
    ck, m16 = d32
    px = random_pixels(ck, 16, seed=3)
    ours = m16.encode_image(px, normalize=False)
    err = {}
    for attention in ("rounded", "float32"):
        theirs = image_features(bf16_reference(ck.model, attention), px)
        err[attention] = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert np.mean(err["rounded"] < 1e-5) >= 0.25, np.round(err["rounded"], 7)
    assert err["rounded"].max() < 1e-2, err["rounded"].max()
    # the float32 attention is visibly further: the agreement above is the roundings'
    assert np.median(err["float32"]) > 10 * np.median(err["rounded"]), err


def test_decomposition_with_bf16_attention(d32):
    ck, m16 = d32
    px = random_pixels(ck, 4, seed=4)
    d16 = m16.decompose(px, attn=True)
    total = d16.heads.sum((1, 2), dtype=np.float64) + d16.mlps.sum(1, dtype=np.float64)
    unit = d16.embedding / np.linalg.norm(d16.embedding, axis=1, keepdims=True)
    assert np.abs(total - unit).max() < clipdecomp.engine.decomposition.IDENTITY_TOL_BF16
    # the class token's attention rows it records: the reference's float32 probabilities of
    # the scores of bf16 q and k, row for row
    ref = bf16_reference(ck.model)
    with torch.no_grad():
        att = ref.vision_model(pixel_values=torch.from_numpy(px), output_attentions=True).attentions
    want = np.stack([a[:, :, 0, :].numpy() for a in att], 1)   # [B, L, H, N]
    assert d16.attn_cls.shape == want.shape
    assert np.abs(d16.attn_cls - want).max() < 1e-3 * want.max(), np.abs(d16.attn_cls - want).max()
    assert np.allclose(d16.attn_cls.sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# API


def test_precision_api(checkpoints, requires_core):
    ck = checkpoints["b32_quick"]
    path = ck.dirs[("hf", "F32")]
    with pytest.raises(ValueError, match="unknown precision"):
        clipdecomp.load(path, precision="fp16")
    if requires_core.has_bf16():
        m = clipdecomp.load(path, precision="bf16")
        assert m.precision == "bf16"
    else:
        with pytest.warns(RuntimeWarning, match="AVX512_BF16"):
            m = clipdecomp.load(path, precision="bf16")
        assert m.precision == "bf16-emulated"
    assert "precision bf16" in repr(m)
    # once only: the requires_core refuses to convert again
    other = "bf16" if m.precision == "bf16-emulated" else "bf16-emulated"
    with pytest.raises(ValueError, match="once"):
        m._core.set_precision(other)
    with pytest.raises(ValueError, match="once"):
        m._core.set_precision("fp32")
    m._core.set_precision(m.precision)   # asking for what it is already: nothing to do
    with pytest.raises(ValueError, match="precision must be"):
        m._core.set_precision("int8")
    # pickled by source, with its precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m2 = pickle.loads(pickle.dumps(m))
    assert m2.precision == m.precision
    px = random_pixels(ck, 2, seed=9)
    np.testing.assert_array_equal(m2.encode_image(px, normalize=True),
                                  m.encode_image(px, normalize=True))
    assert clipdecomp.load(path).precision == "fp32"
    assert isinstance(clipdecomp.has_bf16(), bool)


def test_generic_path_has_no_bf16(requires_core):
    """Forcing a path below avx512 (CLIPDECOMP_ISA=avx2 / generic) leaves no AVX512_BF16."""
    isa = requires_core.isa()
    requires_core.set_isa("generic")
    try:
        assert requires_core.has_bf16() is False
    finally:
        requires_core.set_isa(isa)


def test_bf16_kernel_names_the_path_and_amx_can_be_turned_off(requires_core):
    import os
    import subprocess
    import sys

    from clipdecomp.engine.core import bf16_kernel

    k = bf16_kernel()
    assert k in ("amx", "avx512bf16", "none")
    if requires_core.has_bf16():
        assert k != "none"
    code = "from clipdecomp.engine.core import bf16_kernel; print(bf16_kernel())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CLIPDECOMP_AMX": "0"}, check=False)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() in ("avx512bf16", "none")
    assert (off.stdout.strip() == "avx512bf16") == requires_core.has_bf16()
