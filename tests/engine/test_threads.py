"""One model from several Python threads at once gives the numbers of sequential use, and a model
pickles by its source (path, config, tokenizer files), never by its weights.

The C core releases the GIL for the whole computation and holds no mutable state but the
per-token fold, built once under a lock on first use; the first-use race is exercised here on
fresh models. No torch: tiny random weights from ``tests/oracle.py``.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle
import shutil
import threading

import numpy as np
import oracle
import pytest

import clipdecomp
from clipdecomp.engine import model as model_mod
from clipdecomp.engine.config import ModelConfig
from clipdecomp.engine.safetensors_io import SafetensorsFile
from clipdecomp.engine.tokenizer import Tokenizer, _bytes_to_unicode, default_tokenizer

pytestmark = pytest.mark.usefixtures("requires_core")

TEXTS = ["a small red square", "ab", "two circles on grass", "x" * 40, "a dog", "blue"]


def byte_tokenizer(context_length: int) -> Tokenizer:
    sym = list(_bytes_to_unicode().values())
    names = sym + [s + "</w>" for s in sym] + ["<|startoftext|>", "<|endoftext|>"]
    return Tokenizer.from_vocab_merges({s: i for i, s in enumerate(names)}, [], context_length)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = oracle.tiny_config(vocab_size=514, layers=3)
    path = tmp_path_factory.mktemp("threads") / "m.safetensors"
    oracle.write_safetensors(path, oracle.random_weights(cfg, seed=7))
    return str(path), cfg


def fresh(ckpt, threads=2):
    path, cfg = ckpt
    return clipdecomp.load(path, config=ModelConfig(**cfg), threads=threads,
                           tokenizer=byte_tokenizer(cfg["context_length"]))


def job(model, i):
    """Everything a user may call, on inputs that differ with i."""
    px = np.random.default_rng(100 + i).standard_normal((3 + i % 3, 3, 16, 16)).astype(np.float32)
    dec = model.decompose(px, spatial=True, attn=True)
    directions = np.random.default_rng(i).standard_normal((2, 24)).astype(np.float32)
    out = dict(dec.arrays())
    out["probe_rerun"] = model.decompose(px).project_tokens(directions)     # re-runs the forward
    out["encode_image"] = model.encode_image(px, normalize=True)
    out["encode_text"] = model.encode_text([TEXTS[i % len(TEXTS)], TEXTS[(i + 1) % len(TEXTS)]],
                                           normalize=True)
    return out


def assert_same(a, b, what=""):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what} {k}")


def test_threads_give_sequential_results(ckpt):
    reference = fresh(ckpt)
    want = [job(reference, i) for i in range(8)]
    model = fresh(ckpt)                   # its fold is built by whichever thread comes first
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: job(model, i), range(8)))
    for i in range(8):
        assert_same(got[i], want[i], f"job {i}")


def test_first_use_of_the_fold_races_safely(ckpt):
    """Four threads ask a fresh model for per-token terms at the same instant."""
    px = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = fresh(ckpt, threads=1).decompose(px, spatial=True).tokens
    for _ in range(5):
        model = fresh(ckpt, threads=1)
        barrier = threading.Barrier(4)

        def run(model=model, barrier=barrier):
            barrier.wait()
            return model.decompose(px, spatial=True).tokens

        with cf.ThreadPoolExecutor(4) as pool:
            outs = [f.result() for f in [pool.submit(run) for _ in range(4)]]
        for t in outs:
            np.testing.assert_array_equal(t, want)


def test_threads_setting_of_each_call_is_its_own(ckpt):
    """Calls with different ``threads`` at once: each uses its own (OpenMP's setting is per
    calling thread), and the results equal a sequential run with the same setting."""
    px = np.random.default_rng(4).standard_normal((4, 3, 16, 16)).astype(np.float32)
    models = {n: fresh(ckpt, threads=n) for n in (1, 2, 3)}
    want = {n: m.decompose(px, spatial=True).tokens for n, m in models.items()}
    with cf.ThreadPoolExecutor(3) as pool:
        got = dict(zip(models, pool.map(lambda n: models[n].decompose(px, spatial=True).tokens,
                                        models)))
    for n in models:
        np.testing.assert_array_equal(got[n], want[n])


# ---------------------------------------------------------------------------------------------
# pickling


def test_pickle_round_trip_by_source(ckpt):
    path, _ = ckpt
    model = fresh(ckpt, threads=3)
    model.memory_budget = "1G"
    blob = pickle.dumps(model)
    data = SafetensorsFile(path)
    middle = data.data_start + data.data_size // 2
    with open(path, "rb") as fh:
        fh.seek(middle)
        piece = fh.read(64)
    assert piece not in blob and len(blob) < os.path.getsize(path) // 4   # no weights inside
    clone = pickle.loads(blob)
    assert clone is not model and clone._core is not model._core
    assert (clone.path, clone.config, clone.layout, clone.threads, clone.memory_budget) == \
        (model.path, model.config, model.layout, 3, 2**30)
    assert clone.logit_scale == model.logit_scale
    assert_same(job(clone, 1), job(model, 1), "clone")
    # default threads stay a default (the unpickling machine decides)
    auto = pickle.loads(pickle.dumps(fresh(ckpt, threads=None)))
    assert auto.threads == model_mod.default_threads() and not auto._threads_given


def test_pickle_needs_the_same_file(ckpt, tmp_path):
    path, cfg = ckpt
    local = tmp_path / "copy.safetensors"
    shutil.copy(path, local)
    model = clipdecomp.load(local, config=ModelConfig(**cfg), tokenizer=byte_tokenizer(8))
    blob = pickle.dumps(model)
    with open(local, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(ValueError, match="changed since the model was pickled"):
        pickle.loads(blob)
    os.remove(local)
    with pytest.raises(FileNotFoundError, match="every process must see the file"):
        pickle.loads(blob)


def test_tokenizer_travels_as_its_files(tmp_path):
    tok = default_tokenizer(77)
    assert model_mod._tokenizer_spec(tok) == ("default", 77)
    assert model_mod._make_tokenizer(("default", 77)) is tok
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    from_file = Tokenizer.from_file(tmp_path / "tokenizer.json", 16)
    spec = model_mod._tokenizer_spec(from_file)
    assert spec == ("file", str(tmp_path / "tokenizer.json"), 16)
    again = model_mod._make_tokenizer(spec)
    np.testing.assert_array_equal(again(TEXTS), from_file(TEXTS))
    assert model_mod._tokenizer_spec(None) == ("none",)


def _worker_embed(model, px):
    return model.encode_image(px, normalize=False), os.getpid()


def test_model_crosses_processes(ckpt):
    """What Dask does with a model: pickle it to another process and call it there."""
    model = fresh(ckpt, threads=1)
    px = np.random.default_rng(9).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        emb, pid = pool.submit(_worker_embed, model, px).result(timeout=120)
    assert pid != os.getpid()
    np.testing.assert_array_equal(emb, model.encode_image(px, normalize=False))
