"""Loading at the size of the weights: what the core keeps, in which precision, and the budget.

The numbers of a model loaded the memory-lean way are checked against the same model loaded
the long way (float32, converted afterwards) and against files holding the same values in
another dtype; the byte counts against :func:`clipdecomp.engine.model.load_memory`, computed
from the config alone. The transformers references of the loaded models are in
``test_model.py`` / ``test_numerics.py`` / ``test_precision.py`` (they load through the same
loader).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from checkpoints import random_pixels, random_text_ids

import clipdecomp
from clipdecomp.engine import core as engine_core
from clipdecomp.engine.model import load_memory
from clipdecomp.engine.safetensors_io import SafetensorsFile

pytestmark = pytest.mark.usefixtures("requires_core")

_OUTPUTS = ("embedding", "ln_stats", "heads", "mlps", "cls_to_cls", "tokens")


def _core_outputs(core_model, px):
    r = core_model.encode_image(px, heads=True, mlps=True, cls_to_cls=True, tokens=True)
    return {k: np.array(r[k]) for k in _OUTPUTS}


def _core_config(model):
    return model.config.to_core_dict()


@pytest.mark.parametrize("layout", ["open_clip", "hf"])
@pytest.mark.parametrize("precision", ["bf16-emulated", "bf16"])
def test_converting_while_loading_equals_converting_after(b32, precision, layout):
    if precision == "bf16" and not clipdecomp.has_bf16():
        pytest.skip("this CPU has no AVX512_BF16: native bf16 is covered by test_gemm's "
                    "emulated-intrinsics program")
    path = b32.file(layout, "F32")
    ref_model = clipdecomp.load(path, threads=1)
    cfg = _core_config(ref_model)
    ext = engine_core.extension()
    direct = ext.Model(path, cfg, "auto", precision=precision)
    after = ext.Model(path, cfg, "auto")
    after.set_precision(precision)
    assert direct.precision == after.precision == precision
    assert direct.nbytes == after.nbytes
    px = random_pixels(b32, 3, seed=4)
    a, b = _core_outputs(direct, px), _core_outputs(after, px)
    for k in _OUTPUTS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = random_text_ids(b32, 4, seed=1)
    np.testing.assert_array_equal(direct.encode_text(ids), after.encode_text(ids))
    # and the bf16 model differs from the float32 one (the conversion did happen)
    assert not np.array_equal(a["heads"], _core_outputs(after.__class__(path, cfg), px)["heads"])


@pytest.mark.parametrize("layout", ["open_clip", "hf"])
def test_nbytes_is_the_planned_size(b32, b16, layout):
    for ck in (b32, b16):
        path = ck.file(layout, "F32")
        for precision in ("fp32", "bf16-emulated") + (("bf16",) if clipdecomp.has_bf16() else ()):
            for towers in ("both", "image"):
                m = clipdecomp.load(path, precision=precision, towers=towers, threads=1)
                steady, peak = load_memory(m.config, precision)
                assert m.nbytes == steady, (ck.name, precision, towers)
                assert peak > steady


def test_one_copy_of_every_weight(b32):
    """fp32: the core holds each parameter once (4 bytes each; no raw copy of the
    out-projection beside the packed one). b32's widths are multiples of the GEMM panel."""
    path = b32.file("open_clip", "F32")
    params = sum(t.numel for k, t in SafetensorsFile(path).tensors.items() if k != "logit_scale")
    m = clipdecomp.load(path, threads=1)
    assert m.nbytes == 4 * params
    vision = sum(t.numel for k, t in SafetensorsFile(path).tensors.items()
                 if k.startswith("visual."))
    assert clipdecomp.load(path, towers="image", threads=1).nbytes == 4 * vision
    # the fold is built on the first call that decomposes, and counted from then on
    m.encode_image(random_pixels(b32, 1, seed=0))
    assert m.nbytes == 4 * params
    m.decompose(random_pixels(b32, 1, seed=0))
    c = m.config
    assert m.nbytes == 4 * params + 4 * c.layers * c.width * c.embed_dim


_BLOCK_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


@pytest.mark.parametrize("precision", ["bf16-emulated", "bf16"])
def test_bf16_keeps_two_bytes_a_parameter(b32, precision):
    """A bf16 model keeps the block matrices (bf16 only; bf16-emulated keeps float32 panels of
    rounded values) and the text token table at 2 bytes a value, every other tensor at 4,
    counted from the file's tensors (b32's widths are multiples of the GEMM panel)."""
    if precision == "bf16" and not clipdecomp.has_bf16():
        pytest.skip("this CPU has no AVX512_BF16: bf16-emulated counts the token table")
    path = b32.file("open_clip", "F32")
    tensors = SafetensorsFile(path).tensors
    want = 0
    for k, t in tensors.items():
        half = k == "token_embedding.weight" or (precision == "bf16" and k.endswith(_BLOCK_MATRICES))
        want += (2 if half else 4) * t.numel * (k != "logit_scale")
    m = clipdecomp.load(path, precision=precision, threads=1)
    assert m.nbytes == want == load_memory(m.config, precision)[0]
    table = tensors["token_embedding.weight"].numel
    assert clipdecomp.load(path, threads=1).nbytes - m.nbytes >= 2 * table


_RSS_CHILD = """
import json, sys
import clipdecomp

def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

base = rss()
m = clipdecomp.load(sys.argv[1], precision=sys.argv[2], threads=1)
print(json.dumps({"grow": rss() - base, "nbytes": m.nbytes}))
"""


@pytest.mark.parametrize("precision", ["bf16-emulated", "bf16"])
def test_bf16_steady_memory_is_the_predicted_size(tmp_path, precision):
    """The resident memory a bf16 load adds to a fresh process stays within the predicted
    ``nbytes`` (plus a few MiB of interpreter objects): no float32 token table, no second copy
    of a weight, no pages of the file left mapped. The model is mostly its token table
    (49000 x 512: 96 MiB in float32, 48 MiB in bf16), so a float32 table would exceed the bound
    by far."""
    if precision == "bf16" and not clipdecomp.has_bf16():
        pytest.skip("this CPU has no AVX512_BF16: bf16-emulated keeps the same token table")
    import subprocess
    import sys

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w, f, tw, tf, v, ctx, d = 64, 128, 512, 1024, 49000, 16, 64

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def block(base, w, f):
        return {base + "ln_1.weight": np.ones(w, np.float32), base + "ln_1.bias": rand(w),
                base + "attn.in_proj_weight": rand(3 * w, w), base + "attn.in_proj_bias": rand(3 * w),
                base + "attn.out_proj.weight": rand(w, w), base + "attn.out_proj.bias": rand(w),
                base + "ln_2.weight": np.ones(w, np.float32), base + "ln_2.bias": rand(w),
                base + "mlp.c_fc.weight": rand(f, w), base + "mlp.c_fc.bias": rand(f),
                base + "mlp.c_proj.weight": rand(w, f), base + "mlp.c_proj.bias": rand(w)}

    tensors = {"visual.conv1.weight": rand(w, 3, 16, 16), "visual.class_embedding": rand(w),
               "visual.positional_embedding": rand(5, w), "visual.ln_pre.weight": rand(w),
               "visual.ln_pre.bias": rand(w), "visual.ln_post.weight": rand(w),
               "visual.ln_post.bias": rand(w), "visual.proj": rand(w, d),
               "token_embedding.weight": rand(v, tw), "positional_embedding": rand(ctx, tw),
               "ln_final.weight": rand(tw), "ln_final.bias": rand(tw),
               "text_projection": rand(tw, d),
               **block("visual.transformer.resblocks.0.", w, f),
               **block("transformer.resblocks.0.", tw, tf)}
    save_file(tensors, str(tmp_path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"embed_dim": d,
                         "vision_cfg": {"image_size": 32, "patch_size": 16, "width": w,
                                        "layers": 1, "head_width": 16, "mlp_ratio": f / w},
                         "text_cfg": {"context_length": ctx, "vocab_size": v, "width": tw,
                                      "heads": 8, "layers": 1, "mlp_ratio": tf / tw}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD,
                          str(tmp_path / "open_clip_model.safetensors"), precision],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    steady = load_memory(clipdecomp.load(str(tmp_path), threads=1).config, precision)[0]
    assert r["nbytes"] == steady
    table = v * tw
    assert 2 * table < steady < 2 * table + (16 << 20) < 4 * table
    # the process grew by the weights (and a few MiB of objects), not by a float32 table
    # (96 MiB more). Under AddressSanitizer (tests/sanitize.sh preloads it) every allocated
    # byte also costs an eighth of a byte of shadow memory.
    shadow = steady // 8 if "libasan" in os.environ.get("LD_PRELOAD", "") else 0
    assert steady * 0.9 < r["grow"] <= steady + shadow + (8 << 20), (r, steady)


def test_towers_image(b16):
    path = b16.file("open_clip", "F32")
    both = clipdecomp.load(path, threads=1)
    image = clipdecomp.load(path, towers="image", threads=1)
    assert image.towers == "image" and not image.config.has_text
    assert image.nbytes < both.nbytes
    px = random_pixels(b16, 2, seed=7)
    a = both.decompose(px, spatial=True)
    b = image.decompose(px, spatial=True)
    for k in ("embedding", "heads", "mlps", "cls_to_cls", "tokens"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    with pytest.raises(ValueError, match="towers='image'.*towers='both'"):
        image.encode_text(["a photo"])
    assert image.spec is not None and image.spec.kwargs == {"threads": 1, "towers": "image"}
    again = image.spec.load()
    assert again.towers == "image" and again.nbytes == load_memory(image.config)[0]
    restored = pickle.loads(pickle.dumps(image))
    assert restored.towers == "image" and not restored.config.has_text
    with pytest.raises(ValueError, match="unknown towers 'text'"):
        clipdecomp.load(path, towers="text")


def test_budget_refuses_a_model_before_loading_it(b32, monkeypatch):
    path = b32.file("open_clip", "F32")
    cfg = clipdecomp.load(path, threads=1).config
    steady, peak = load_memory(cfg, "fp32")

    def no_load(*args, **kwargs):
        raise AssertionError("the core was asked to load a model over the budget")

    try:
        clipdecomp.set_memory_budget(peak - 1)
        with monkeypatch.context() as mp:
            mp.setattr(engine_core, "open_model", no_load)
            with pytest.raises(MemoryError, match=r"loading needs .* more than the memory "
                               r"budget of .*towers='image'.*precision='bf16'") as e:
                clipdecomp.load(path, threads=1)
            assert path in str(e.value)
        # what fits is loaded: exactly the peak, or the image tower alone within the same budget
        clipdecomp.set_memory_budget(peak)
        assert clipdecomp.load(path, threads=1).nbytes == steady
        clipdecomp.set_memory_budget(peak - 1)
        assert clipdecomp.load(path, towers="image", threads=1).towers == "image"
        # the environment variable is a budget too
        clipdecomp.set_memory_budget(None)
        monkeypatch.setenv("CLIPDECOMP_MEMORY_BUDGET", "1K")
        with pytest.raises(MemoryError, match=r"1\.0 KiB"):
            clipdecomp.load(path, threads=1)
    finally:
        clipdecomp.set_memory_budget(None)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_files_load_as_their_float32_values(b16, dtype, tmp_path):
    """An F16 / BF16 file gives the numbers of an F32 file holding the same (rounded) values:
    the conversion while loading, and the release of each tensor's pages, lose nothing."""
    d = b16.dirs[("open_clip", dtype)]
    half = os.path.join(d, "open_clip_model.safetensors")
    from safetensors.numpy import save_file

    src = SafetensorsFile(half)
    assert {t.dtype for t in src.tensors.values()} == {dtype}
    widened = tmp_path / "open_clip_model.safetensors"
    save_file({k: src.read(k) for k in src}, str(widened))
    shutil.copy(os.path.join(d, "open_clip_config.json"), tmp_path / "open_clip_config.json")
    a = clipdecomp.load(half, threads=1)
    b = clipdecomp.load(str(widened), threads=1)
    assert a.nbytes == b.nbytes
    px = random_pixels(b16, 2, seed=3)
    da, db = a.decompose(px, spatial=True), b.decompose(px, spatial=True)
    for k in ("embedding", "heads", "mlps", "tokens"):
        np.testing.assert_array_equal(getattr(da, k), getattr(db, k), err_msg=k)
    ids = random_text_ids(b16, 3, seed=2)
    np.testing.assert_array_equal(a.encode_text(ids), b.encode_text(ids))
    with open(os.path.join(d, "open_clip_config.json")) as fh:
        assert json.load(fh)   # the config travelled with the file
