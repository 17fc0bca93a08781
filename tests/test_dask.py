"""run_dataset on Dask: two worker processes give the arrays and statistics of a local run,
load the model once per process, resume a local run, and run from the command line.
"""
from __future__ import annotations

import os

import pytest
from test_dataset import Interrupting, StandIn, make_standin, write_images
from test_store_resume import assert_same_store

from clipdecomp.dataset import ModelSpec, run_dataset, run_main
from clipdecomp.store import StoreReader

distributed = pytest.importorskip("distributed")

LOADER = "test_dataset:load_standin"


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    imgs = root / "imgs"
    write_images(imgs, 30, seed=7)
    (imgs / "part1" / "empty.jpg").write_bytes(b"")
    return root, imgs, make_standin(root / "model.npz", seed=8, layers=4, heads=3, dim=6)


def _loads(client, path):
    def count(p=path):
        import test_dataset

        return test_dataset.LOADS.get(p, 0)

    return client.run(count)


def test_two_workers_equal_one_process(client, collection, tmp_path):
    _root, imgs, mpath = collection
    kw = {"chunk_size": 4, "batch_size": 3, "layers": [1, 3], "dtype": "float16", "progress": False}
    local = run_dataset(StandIn(mpath), imgs, tmp_path / "local.zarr", **kw)
    spec = ModelSpec(mpath, loader=LOADER)
    r = run_dataset(spec, imgs, tmp_path / "dask.zarr", client=client, **kw)
    assert_same_store(r, local)
    assert r.metadata["model"]["config"] == local.metadata["model"]["config"]
    assert r.metadata["model"]["checkpoint"] == local.metadata["model"]["checkpoint"]
    assert r.runs[-1]["mode"] == "dask" and r.runs[-1]["skipped"] == 1
    assert r.skipped()["path"].tolist() == ["part1/empty.jpg"]
    # 8 chunks, 2 processes: each process loaded the model at most once
    loads = _loads(client, mpath)
    assert len(loads) == 2 and set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1
    # a second run on the same workers reuses the cached models
    run_dataset(spec, imgs, tmp_path / "again.zarr", client=client, **kw)
    assert _loads(client, mpath) == loads


def test_cluster_resumes_a_local_run_and_by_address(client, collection, tmp_path):
    _root, imgs, mpath = collection
    kw = {"chunk_size": 5, "batch_size": 2, "layers": "-1:", "progress": False}
    full = run_dataset(StandIn(mpath), imgs, tmp_path / "full.zarr", **kw)
    out = tmp_path / "mixed.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_dataset(Interrupting(mpath, 7), imgs, out, **kw)  # 2 chunks of 3 batches done
    assert StoreReader(out).included.sum() == 2
    spec = ModelSpec(mpath, loader=LOADER)
    r = run_dataset(spec, imgs, out, scheduler=client.scheduler.address, **kw)
    assert r.runs[-1]["images"] == 31 - 10
    assert_same_store(r, full)
    assert client.status == "running"  # our client is untouched by the one run_dataset opened


def test_model_object_needs_a_spec(client, collection, tmp_path):
    _root, imgs, mpath = collection
    model = StandIn(mpath)
    del model.path
    with pytest.raises(ValueError, match="ModelSpec"):
        run_dataset(model, imgs, tmp_path / "x.zarr", client=client, progress=False)


def test_cli_with_local_workers(collection, tmp_path):
    _root, imgs, mpath = collection
    out = tmp_path / "cli.zarr"
    local = run_dataset(StandIn(mpath), imgs, tmp_path / "ref.zarr", chunk_size=16,
                        batch_size=8, progress=False)
    argv = [str(imgs), "--model", mpath, "--loader", LOADER, "--out", str(out),
            "--chunk-size", "16", "--batch-size", "8", "--workers", "2", "--no-progress"]
    assert run_main(argv) == 0
    r = StoreReader(out)
    assert r.runs[-1]["mode"] == "dask" and r.runs[-1]["workers"] == 2
    assert_same_store(r, local)
    assert os.path.isdir(out)
