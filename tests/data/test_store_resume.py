"""Resuming a store: SIGKILL of the command line at random points, and a kill in the middle
of a statistics commit. The finished store must equal an uninterrupted run: the same arrays
bit for bit, no row lost or counted twice, the same statistics (1e-12 relative).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from runs import Probe, assert_same_store, checkpoint, write_images

import clipdecomp
from clipdecomp.data.runner import run_dataset
from clipdecomp.data.store import StoreReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def collection(tmp_path_factory, b16):
    root = tmp_path_factory.mktemp("resume")
    imgs = root / "imgs"
    write_images(imgs, 100, seed=3)
    (imgs / "part0" / "broken.png").write_text("not a png")
    return root, imgs, checkpoint(b16)


def _done(out) -> int:
    try:
        return int(np.count_nonzero(zarr.open_array(os.path.join(out, "done"), mode="r")[:]))
    except Exception:  # noqa: BLE001 - not created yet, or being replaced
        return 0


def test_sigkill_at_random_points_then_resume(collection, tmp_path):
    _root, imgs, mpath = collection
    opts = ["--chunk-size", "8", "--batch-size", "4", "--layers", "-2:", "--dtype", "float16"]
    model = clipdecomp.load(mpath, threads=1)
    full = run_dataset(model, imgs, tmp_path / "full.zarr", chunk_size=8,
                       batch_size=4, layers="-2:", dtype="float16", progress=False)
    n_chunks = full.n_chunks
    assert n_chunks == 13
    out = str(tmp_path / "killed.zarr")
    cmd = [sys.executable, "-m", "clipdecomp", "run", str(imgs), "--model", mpath,
           "--loader", "runs:load_slow", "--threads", "1", "--out", out,
           "--no-progress", *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_DELAY="0.03",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    seed = int(time.time() * 1000) % 100000
    rng = np.random.default_rng(seed)
    kills = []
    for _ in range(2):
        before = _done(out)
        target = int(rng.integers(before + 1, min(before + 5, n_chunks - 4)))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _done(out) < target:
            assert proc.poll() is None, f"seed {seed}: ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, f"seed {seed}: no progress"
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.1)))  # somewhere inside a later chunk or commit
        proc.kill()
        proc.wait()
        left = _done(out)
        kills.append((target, left))
        assert left < n_chunks, f"seed {seed}: the run finished before the kill"
        assert not StoreReader(out).complete
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    r = StoreReader(out)
    assert_same_store(r, full)
    assert r.stats.n == 100  # the broken file is skipped, once
    assert r.skipped()["path"].tolist() == ["part0/broken.png"]
    # only the last (finished) run recorded a summary, and it skipped the finished chunks
    assert len(r.runs) == 1 and r.runs[0]["images"] <= 101 - 8 * kills[-1][1], (seed, kills)


def test_kill_during_a_commit_falls_back_to_the_previous_one(collection, tmp_path):
    _root, imgs, mpath = collection
    kw = {"chunk_size": 16, "batch_size": 8, "layers": [0, 2], "progress": False}
    model = clipdecomp.load(mpath, threads=1)
    full = run_dataset(model, imgs, tmp_path / "full.zarr", **kw)
    out = str(tmp_path / "torn.zarr")
    with pytest.raises(KeyboardInterrupt):
        run_dataset(Probe(model, stop_at=9), imgs, out, **kw)  # chunks 0..3 finished
    slots = []
    for k in (0, 1):
        g = zarr.open_group(os.path.join(out, "stats", f"slot{k}"), mode="r+")
        slots.append((g.attrs["generation"], k, g))
    (g_new, _k_new, newest), (g_old, _k_old, older) = sorted(slots, reverse=True)
    assert g_new == g_old + 1 and newest["included"][:].sum() == 4
    # what a kill half-way through writing the newer slot leaves: flagged incomplete, torn sums
    newest.attrs.put({"complete": False, "generation": -1})
    newest["sum_outer"][0] = np.full(newest["sum_outer"].shape[1:], 7.0)
    newest["n"][...] = 12345
    zarr.open_array(os.path.join(out, "done"), mode="r+")[:] = older["included"][:]
    part = StoreReader(out)
    assert part.included.sum() == 3 and part.stats.n == older["n"][...]
    # rows of chunk 3 were written but are not covered: not valid for readers yet
    assert not part.decomposition(slice(48, 64)).ok.any()
    r = run_dataset(model, imgs, out, **kw)
    assert r.runs[-1]["images"] == 101 - 48
    assert_same_store(r, full)
