"""Stores under stress: chunk files deleted or truncated between runs, two runs on one store,
source files replaced under the same name, and the precision of the model recorded (and
carried to Dask workers).

The reference for every store is an uninterrupted run of the same model over the same images;
stores must equal it array for array (assert_same_store), statistics to 1e-12.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from runs import assert_same_store, checkpoint, write_images

import clipdecomp
from clipdecomp import toy
from clipdecomp.data.runner import run_dataset
from clipdecomp.data.store import StoreReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = {"chunk_size": 4, "batch_size": 3, "layers": "-2:", "progress": False}


@pytest.fixture(scope="module")
def model():
    return clipdecomp.load(threads=1)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard") / "imgs"
    write_images(root, 18, seed=11)
    (root / "part1" / "broken.png").write_text("not a png")
    return root


@pytest.fixture(scope="module")
def full(model, imgs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.zarr"
    return run_dataset(model, imgs, out, **OPTS)


def _chunk_file(store, array, chunk):
    """The file of row-chunk ``chunk`` of a store array (zarr v3 default key encoding)."""
    d = os.path.join(store, array, "c", str(chunk))
    while os.path.isdir(d):
        d = os.path.join(d, "0")
    return d


# ------------------------------------------------------------------ 5. chunk files on resume


def test_resume_recomputes_deleted_and_truncated_chunks(model, imgs, full, tmp_path):
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS)
    os.remove(_chunk_file(out, "heads", 1))                     # deleted
    f = _chunk_file(out, "embedding", 3)
    with open(f, "r+b") as fh:                                  # truncated
        fh.truncate(os.path.getsize(f) // 2)
    os.remove(_chunk_file(out, "ok", 4))                        # the validity of a chunk
    with pytest.warns(UserWarning) as rec:
        st = run_dataset(model, imgs, out, **OPTS)
    msg = " ".join(str(w.message) for w in rec)
    for c in (1, 3, 4):
        assert f"chunk {c} " in msg, msg
    assert "chunk 0 " not in msg and "chunk 2 " not in msg
    assert "checksum" in msg
    assert st.runs[-1]["images"] == 4 * 2 + 3                   # rows of chunks 1, 3 and 4
    assert_same_store(st, full)


def test_resume_of_an_intact_store_recomputes_nothing(model, imgs, full, tmp_path):
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = run_dataset(model, imgs, out, **OPTS)
    assert st.runs[-1]["images"] == 0
    assert_same_store(st, full)


def test_chunk_changed_with_the_same_size_is_recomputed(model, imgs, full, tmp_path):
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS)
    import zarr

    root = zarr.open_group(out, mode="r+")
    root["mlps"][8:12] = root["mlps"][8:12] * 2          # readable, but not what was written
    with pytest.warns(UserWarning, match="chunk 2 "):
        st = run_dataset(model, imgs, out, **OPTS)
    assert_same_store(st, full)


# ------------------------------------------------------------------ 6. one run per store


_HOLDER = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from runs import Probe
import clipdecomp
from clipdecomp.data.runner import run_dataset
m = Probe(clipdecomp.load(threads=1), delay=0.5)
run_dataset(m, {imgs!r}, {out!r}, chunk_size=4, batch_size=3, layers="-2:", progress=False)
"""


def test_second_run_on_a_store_is_refused(model, imgs, full, tmp_path):
    out = str(tmp_path / "busy.zarr")
    code = _HOLDER.format(tests=os.path.join(ROOT, "tests"), root=ROOT, imgs=str(imgs), out=out)
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ,
                            OMP_NUM_THREADS="1"), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, "done")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=rf"{out}.*process {proc.pid}"):
            run_dataset(model, imgs, out, **OPTS)
        with pytest.raises(RuntimeError, match="is in use"):
            run_dataset(model, imgs, out, **{**OPTS, "overwrite": True})
        assert proc.poll() is None          # the first run was not disturbed
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    assert_same_store(StoreReader(out), full)
    st = run_dataset(model, imgs, out, **OPTS)    # free again once the holder is gone
    assert st.runs[-1]["images"] == 0


def test_lock_on_the_command_line(model, imgs, tmp_path, capsys):
    from clipdecomp.cli import run_main
    from clipdecomp.data.store import store_lock

    out = str(tmp_path / "cli.zarr")
    with store_lock(out):
        rc = run_main([str(imgs), "--model", str(toy.MODEL_DIR), "--out", out,
                       "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is in use" in err and f"process {os.getpid()}" in err


# ------------------------------------------------------------------ 8. replaced source files


def test_source_file_replaced_under_the_same_name_is_noticed(model, tmp_path):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 8, seed=5)
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(paths[2])        # new content, same name
    rel = os.path.relpath(paths[2], imgs)
    with pytest.raises(ValueError, match=rf"changed since the store was made: {rel} \(size"):
        run_dataset(model, imgs, out, **OPTS)
    st = run_dataset(model, imgs, out, **OPTS, overwrite=True)
    fresh = run_dataset(model, imgs, tmp_path / "fresh.zarr", **OPTS)
    assert_same_store(st, fresh)


def test_modification_time_alone_is_noticed(model, tmp_path):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 5, seed=6)
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS)
    st = os.stat(paths[4])
    os.utime(paths[4], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(ValueError, match="modification time"):
        run_dataset(model, imgs, out, **OPTS)


def test_content_hash_option(model, tmp_path):
    imgs = tmp_path / "imgs"
    paths = write_images(imgs, 5, seed=6, fmt_cycle=("png",))
    out = str(tmp_path / "s.zarr")
    run_dataset(model, imgs, out, **OPTS, content_hash=True)
    st = os.stat(paths[1])
    with open(paths[1], "rb") as fh:
        data = bytearray(fh.read())
    data[-20] ^= 0xFF                            # same size, same time stamp, other bytes
    with open(paths[1], "wb") as fh:
        fh.write(bytes(data))
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="content"):
        run_dataset(model, imgs, out, **OPTS)
    assert StoreReader(out).metadata["source"]["content_hash"] is True


# ------------------------------------------------------------------ 9. precision


def test_store_records_precision_and_refuses_another(tmp_path, b16):
    imgs = tmp_path / "imgs"
    write_images(imgs, 6, seed=2)
    path = checkpoint(b16)
    bf = clipdecomp.load(path, threads=1, precision="bf16-emulated")
    out = str(tmp_path / "s.zarr")
    st = run_dataset(bf, imgs, out, **OPTS)
    assert st.metadata["model"]["precision"] == "bf16-emulated"
    with pytest.raises(ValueError, match="precision"):
        run_dataset(clipdecomp.load(path, threads=1), imgs, out, **OPTS)
    fp = run_dataset(clipdecomp.load(path, threads=1), imgs, tmp_path / "fp.zarr", **OPTS)
    assert fp.metadata["model"]["precision"] == "fp32"
    assert not np.array_equal(fp.embedding[:], st.embedding[:])


def test_dask_workers_run_the_precision_given(tmp_path, b16):
    distributed = pytest.importorskip("distributed")
    imgs = tmp_path / "imgs"
    write_images(imgs, 10, seed=4)
    path = checkpoint(b16)
    prec = "bf16" if clipdecomp.has_bf16() else "bf16-emulated"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # "bf16 is emulated here"
        bf = clipdecomp.load(path, threads=1, precision=prec)
    local = run_dataset(bf, imgs, tmp_path / "local.zarr", **OPTS)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        st = run_dataset(bf, imgs, tmp_path / "dask.zarr", **OPTS, client=client)
    assert st.metadata["model"]["precision"] == bf.precision
    assert_same_store(st, local)
