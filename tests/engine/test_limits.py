"""Limits, each with a clear error: header size, overflowing byte counts, shapes against the
config, more tokens than the positional embedding, text longer than the context, decompression
bombs and extreme aspect ratios; and the memory budget that splits a call into batches (with the
same numbers) or refuses it with ``MemoryError`` naming the need and the budget.

No torch: tiny random weights written by ``tests/oracle.py``.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import oracle
import pytest
from PIL import Image

import clipdecomp
from clipdecomp import _core as core
from clipdecomp.engine import model as model_mod
from clipdecomp.engine import preprocess as pp
from clipdecomp.engine.config import ModelConfig
from clipdecomp.engine.helpers import format_bytes
from clipdecomp.engine.safetensors_io import SafetensorsError, SafetensorsFile
from clipdecomp.engine.tokenizer import Tokenizer, _bytes_to_unicode

V = 514   # the byte-level test vocabulary below: 256 symbols, 256 word ends, start, end


def byte_tokenizer(context_length: int) -> Tokenizer:
    """A CLIP-style tokenizer without merges: one token per character (no download)."""
    sym = list(_bytes_to_unicode().values())
    names = sym + [s + "</w>" for s in sym] + ["<|startoftext|>", "<|endoftext|>"]
    return Tokenizer.from_vocab_merges({s: i for i, s in enumerate(names)}, [], context_length)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model (S=16, P=4, N=17, W=32, L=2, H=4, D=24, C=8) with its raw config."""
    cfg = oracle.tiny_config(vocab_size=V)
    path = tmp_path_factory.mktemp("limits") / "m.safetensors"
    oracle.write_safetensors(path, oracle.random_weights(cfg, seed=3))
    model = clipdecomp.load(path, config=ModelConfig(**cfg), threads=1,
                            tokenizer=byte_tokenizer(cfg["context_length"]))
    return model, cfg, str(path)


def pixels(n, seed=0, s=16):
    return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)


def raw_file(path, header: bytes, data: bytes = b"", length: int | None = None):
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# files


def test_header_size_limit(tmp_path):
    """A header length over 100 MiB is refused for what it is, even when the file is that long
    (a sparse file: no 100 MiB written)."""
    p = tmp_path / "big.safetensors"
    n = 100 * 2**20 + 1
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", n) + b"{")
        fh.truncate(8 + n + 16)
    with pytest.raises(SafetensorsError, match=r"header length 104857601 exceeds the 104857600"):
        SafetensorsFile(p)
    with pytest.raises(ValueError, match=r"header length 104857601 exceeds the 104857600-byte"):
        core.Model(str(p), oracle.tiny_config())


@pytest.mark.parametrize("shape", [[2**32, 2**32, 2**32], [2**62, 4], [2**63 - 1, 2]])
def test_byte_counts_that_overflow(tmp_path, shape):
    """Shapes whose element or byte count overflows 64 bits are refused, never wrapped around
    to a small size that would fit the offsets."""
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}
    header = json.dumps({"visual.class_embedding": entry}).encode()
    p = raw_file(tmp_path / "o.safetensors", header, b"\0" * 16)
    with pytest.raises(ValueError, match="tensor size overflows"):
        core.Model(p, oracle.tiny_config())
    with pytest.raises(SafetensorsError, match="tensor size overflows"):
        SafetensorsFile(p)


def test_shapes_disagree_with_config(tiny):
    _, cfg, path = tiny
    with pytest.raises(ValueError, match=r"'visual.conv1.weight' has shape \[32, 3, 4, 4\], "
                                         r"expected \[48, 3, 4, 4\] from the config"):
        core.Model(path, {**cfg, "width": 48, "heads": 4})
    with pytest.raises(ValueError, match=r"c_fc.weight' has shape \[64, 32\], expected \[65, 32\]"):
        core.Model(path, {**cfg, "mlp_dim": 65})
    with pytest.raises(ValueError, match=r"config layers = 1, but the file has a block 1"):
        core.Model(path, {**cfg, "layers": 1})


def test_more_tokens_than_positional_embedding(tiny):
    """An image size / patch size giving more tokens than the checkpoint's positional embedding
    has rows: refused at load, naming the tensor and both shapes."""
    _, cfg, path = tiny
    big = {**cfg, "image_size": 32}                     # N = 1 + 8*8 = 65 > 17
    msg = (r"'visual.positional_embedding' has shape \[17, 32\], expected \[65, 32\] from the "
           r"config")
    with pytest.raises(ValueError, match=msg):
        core.Model(path, big)
    with pytest.raises(ValueError, match=msg):
        clipdecomp.load(path, config=ModelConfig(**big))
    with pytest.raises(ValueError, match=r"positional_embedding' has shape \[17, 32\], "
                                         r"expected \[5, 32\]"):
        core.Model(path, {**cfg, "image_size": 8})      # fewer: refused too, never cut


def test_pixels_of_another_size(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]; got shape \(2, 3, 32, 32\)"):
        model.decompose(pixels(2, s=32))


def test_text_longer_than_the_context(tiny):
    model, cfg, path = tiny
    c = cfg["context_length"]
    long_text = "a very long description " * 10
    ids = model.tokenize([long_text, "ab"])
    assert ids.shape == (2, c)
    assert ids[0, 0] == V - 2 and ids[0, -1] == V - 1      # cut, end token kept last
    np.testing.assert_array_equal(model.encode_text([long_text], normalize=True),
                                  model.encode_text(ids[:1], normalize=True))
    f = SafetensorsFile(path)
    want = oracle.encode_text({k: f.read(k) for k in f}, cfg, ids[:1])
    got = model.encode_text(ids[:1], normalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=rf"context length {c}; got shape \(1, {c + 1}\)"):
        model.encode_text(np.zeros((1, c + 1), np.int32), normalize=True)
    with pytest.raises(ValueError, match=rf"longer than the model's context of {c} tokens"):
        model.tokenize(["x"], context_length=c + 1)
    with pytest.raises(ValueError, match=rf"ids must have shape \[T, {c}\]"):
        model._core.encode_text(np.zeros((1, c + 5), np.int32))
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {V}\)"):
        model.encode_text(np.full((1, c), V, np.int32), normalize=True)


# ---------------------------------------------------------------------------------------------
# images


def test_decompression_bomb_names_the_file(tiny, tmp_path, monkeypatch):
    model, _, _ = tiny
    p = tmp_path / "bomb.png"
    Image.new("RGB", (80, 80)).save(p)                 # 6400 pixels > 2 * 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=rf"{p}: refused as a possible decompression bomb.*"
                                         "MAX_IMAGE_PIXELS"):
        model.preprocess(p)
    with pytest.raises(ValueError, match="bomb.png: refused"):
        model.encode_image([str(p)], normalize=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**8)
    assert model.preprocess(p).shape == (1, 3, 16, 16)


def test_truncated_image_file(tiny, tmp_path):
    model, _, _ = tiny
    p = tmp_path / "cut.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(p)
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png: not an image Pillow can read"):
        model.encode_image([str(p)], normalize=True)


def test_extreme_aspect_ratio_resamples_only_the_crop(monkeypatch):
    """A 1 x 1,000,000 image would be resized to 16 x 16,000,000 before the centre crop; the crop
    region is resampled instead, and the result matches the two-step resize."""
    requested = []
    real_resize = Image.Image.resize

    def spy(self, size, *a, **k):
        requested.append(size[0] * size[1])
        return real_resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    mean, std = (0.5,) * 3, (0.25,) * 3
    thin = np.random.default_rng(0).integers(0, 256, (10**6, 1, 3), dtype=np.uint8)
    out = pp.preprocess(thin, 16, mean, std)
    assert out.shape == (1, 3, 16, 16) and np.isfinite(out).all()
    assert max(requested) <= 16 * 16
    # the crop-region resampling equals resize-then-crop, to one uint8 level
    img = np.random.default_rng(1).integers(0, 256, (40, 2000, 3), dtype=np.uint8)
    two_step = pp.preprocess(img, 16, mean, std)
    monkeypatch.setattr(pp, "_MAX_RESIZED_PIXELS", 0)
    requested.clear()
    one_step = pp.preprocess(img, 16, mean, std)
    assert requested == [16 * 16]
    assert np.abs(one_step - two_step).max() <= 1.01 / 255 / 0.25


# ---------------------------------------------------------------------------------------------
# the memory budget


class CountingCore:
    """Wraps the C model, counting encode_image calls and the batch of each."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def encode_image(self, px, **kw):
        self.batches.append(px.shape[0])
        return self.inner.encode_image(px, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_small_budget_splits_batches_with_the_same_results(tiny):
    model, cfg, _ = tiny
    px = pixels(7, seed=5)
    ref = model.decompose(px, spatial=True, attn=True, batch_size=7)
    directions = np.random.default_rng(2).standard_normal((3, cfg["embed_dim"]))
    ref_probe = model.decompose(px, batch_size=7).project_tokens(directions, batch_size=7)
    ref_emb = model.encode_image(px, batch_size=7, normalize=True)
    plan = model.estimate_memory(7, spatial=True, attn=True, batch_size=7)
    assert plan.batch_size == 7
    spy = CountingCore(model._core)
    model._core, inner = spy, model._core
    try:
        model.memory_budget = plan.need(2)              # room for two images at a time
        dec = model.decompose(px, spatial=True, attn=True, batch_size=7)
        assert spy.batches == [2, 2, 2, 1]
        for k, v in ref.arrays().items():
            np.testing.assert_array_equal(dec.arrays()[k], v, err_msg=k)
        np.testing.assert_array_equal(dec.pixels, ref.pixels)
        spy.batches.clear()
        probe_plan = model_mod.plan_memory(model.config, 7, 1, decompose=False, probe=3,
                                           threads=model.threads)
        model.memory_budget = probe_plan.need(3)
        got = model.decompose(px, batch_size=7).project_tokens(directions, batch_size=7)
        np.testing.assert_array_equal(got, ref_probe)
        assert spy.batches[-3:] == [3, 3, 1]
        enc_plan = model_mod.plan_memory(model.config, 7, 1, decompose=False,
                                         threads=model.threads)
        model.memory_budget = enc_plan.need(1)
        spy.batches.clear()
        np.testing.assert_array_equal(model.encode_image(px, batch_size=7, normalize=True), ref_emb)
        assert spy.batches == [1] * 7
    finally:
        model._core = inner
        model.memory_budget = None


def test_memory_error_names_need_and_budget(tiny):
    model, _, _ = tiny
    plan = model.estimate_memory(3, spatial=True)
    model.memory_budget = plan.need(1) - 1
    try:
        with pytest.raises(MemoryError) as e:
            model.decompose(pixels(3), spatial=True)
        msg = str(e.value)
        assert "decompose with spatial=True of 3 images" in msg
        assert format_bytes(plan.need(1)) in msg
        assert f"memory budget of {format_bytes(plan.need(1) - 1)}" in msg
        assert "dec.project_tokens" in msg and "set_memory_budget" in msg
        model.decompose(pixels(3))                     # without tokens it fits
    finally:
        model.memory_budget = None


def test_plan_counts_the_returned_arrays(tiny):
    """The plan's bytes per image are the bytes of what decompose returns (an independent count
    from the arrays themselves)."""
    model, _, _ = tiny
    for spatial, attn, keep in [(False, False, True), (True, True, False), (True, False, True)]:
        dec = model.decompose(pixels(2), spatial=spatial, attn=attn, keep_pixels=keep)
        got = sum(a.nbytes for a in dec.arrays().values())
        got += dec.pixels.nbytes if keep else 0
        plan = model.estimate_memory(2, spatial=spatial, attn=attn, keep_pixels=keep)
        assert plan.images * plan.result_per_image == got


def test_budget_settings(tiny, monkeypatch):
    model, _, _ = tiny
    monkeypatch.delenv("CLIPDECOMP_MEMORY_BUDGET", raising=False)
    assert model_mod.get_memory_budget() == pytest.approx(
        0.5 * model_mod.available_memory(), rel=0.05)
    monkeypatch.setenv("CLIPDECOMP_MEMORY_BUDGET", "3K")
    assert model_mod.get_memory_budget() == 3 * 1024
    with pytest.raises(MemoryError, match=r"memory budget of 3\.0 KiB"):
        model.decompose(pixels(1))
    model_mod.set_memory_budget("1G")                  # the process setting beats the variable
    try:
        assert model_mod.get_memory_budget() == 2**30
        model.memory_budget = 100                      # the model's own beats both
        with pytest.raises(MemoryError, match="100 bytes"):
            model.encode_image(pixels(1), normalize=True)
        model.memory_budget = None
        assert model.encode_image(pixels(1), normalize=True).shape == (1, 24)
    finally:
        model_mod.set_memory_budget(None)
    monkeypatch.setenv("CLIPDECOMP_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="CLIPDECOMP_MEMORY_BUDGET"):
        model.encode_image(pixels(1), normalize=True)


@pytest.mark.parametrize("text,want", [("512M", 512 * 2**20), ("2GiB", 2 * 2**30),
                                       ("1.5k", 1536), (" 7 ", 7), (10**12, 10**12),
                                       (2.5e9, 2_500_000_000)])
def test_budget_sizes(text, want):
    assert model_mod._parse_bytes(text, "x") == want


@pytest.mark.parametrize("bad,exc", [("", ValueError), ("12Q", ValueError), (0, ValueError),
                                     (-5, ValueError), (True, TypeError), ([1], TypeError),
                                     (float("nan"), ValueError)])
def test_budget_size_errors(bad, exc):
    with pytest.raises(exc):
        model_mod._parse_bytes(bad, "x")


def test_available_memory_reads_meminfo():
    want = None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    want = int(line.split()[1]) * 1024
    got = model_mod.available_memory()
    assert got > 0
    if want is not None:
        assert math.isclose(got, want, rel_tol=0.2)
