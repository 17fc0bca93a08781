"""run_dataset on Dask: two worker processes give the arrays and statistics of a local run,
load the model once per process, resume a local run, and run from the command line.
"""
from __future__ import annotations

import pytest
from runs import Probe, assert_same_store, checkpoint, write_images

import clipdecomp
from clipdecomp.cli import run_main
from clipdecomp.data.runner import run_dataset
from clipdecomp.data.store import StoreReader, config_differences
from clipdecomp.engine.loading import ModelSpec

distributed = pytest.importorskip("distributed")



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
def collection(tmp_path_factory, b32):
    root = tmp_path_factory.mktemp("dask")
    imgs = root / "imgs"
    write_images(imgs, 30, seed=7)
    (imgs / "part1" / "empty.jpg").write_bytes(b"")
    path = checkpoint(b32)  # 4 heads, 2 layers, 96-pixel images
    return imgs, path, clipdecomp.load(path, threads=1)


def _cached_models(client):
    """Per worker: the ids of the models its process has loaded."""

    def ids():
        from clipdecomp.data import distributed as d

        return sorted(id(m) for m, _ in d._MODELS.values())

    return client.run(ids)


def test_two_workers_equal_one_process(client, collection, tmp_path):
    imgs, mpath, model = collection
    kw = {"chunk_size": 4, "batch_size": 3, "layers": [1], "dtype": "float16",
          "progress": False}
    local = run_dataset(model, imgs, tmp_path / "local.zarr", **kw)
    spec = ModelSpec(mpath, {"threads": 1})
    r = run_dataset(spec, imgs, tmp_path / "dask.zarr", client=client, **kw)
    assert_same_store(r, local)
    # the same model for the store; the workers loaded its image tower alone
    got, want = r.metadata["model"]["config"], local.metadata["model"]["config"]
    assert config_differences(got, want) == []
    assert got["text_layers"] == 0 and want["text_layers"] > 0
    assert got == want | {"text_layers": 0}
    assert r.metadata["model"]["checkpoint"] == local.metadata["model"]["checkpoint"]
    assert r.runs[-1]["mode"] == "dask" and r.runs[-1]["skipped"] == 1
    assert r.skipped()["path"].tolist() == ["part1/empty.jpg"]
    # 8 chunks, 2 processes: each process holds one model, loaded once
    cached = _cached_models(client)
    assert len(cached) == 2 and all(len(v) <= 1 for v in cached.values())
    assert sum(len(v) for v in cached.values()) >= 1
    # a second run on the same workers reuses the very same model objects
    run_dataset(spec, imgs, tmp_path / "again.zarr", client=client, **kw)
    after = _cached_models(client)
    assert all(set(cached[w]) <= set(after[w]) for w in cached)
    assert all(len(v) <= 1 for v in after.values())


def test_cluster_resumes_a_local_run_and_by_address(client, collection, tmp_path):
    imgs, _, model = collection
    kw = {"chunk_size": 5, "batch_size": 2, "layers": "-1:", "progress": False}
    full = run_dataset(model, imgs, tmp_path / "full.zarr", **kw)
    out = tmp_path / "mixed.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_dataset(Probe(model, stop_at=7), imgs, out, **kw)  # 2 chunks of 3 calls done
    assert StoreReader(out).included.sum() == 2
    # a loaded model is sent as its path (and activation), never pickled
    r = run_dataset(model, imgs, out, scheduler=client.scheduler.address, **kw)
    assert r.runs[-1]["images"] == 31 - 10 and r.runs[-1]["mode"] == "dask"
    assert_same_store(r, full)
    assert client.status == "running"  # our client is untouched by the one run_dataset opened


def test_model_object_without_a_path_needs_a_spec(client, collection, tmp_path):
    imgs, _, model = collection
    probe = Probe(model)
    probe.path = None
    with pytest.raises(ValueError, match="ModelSpec"):
        run_dataset(probe, imgs, tmp_path / "x.zarr", client=client, progress=False)


def test_cli_with_local_workers(collection, tmp_path):
    imgs, mpath, model = collection
    out = tmp_path / "cli.zarr"
    local = run_dataset(model, imgs, tmp_path / "ref.zarr", chunk_size=16, batch_size=8,
                        progress=False)
    argv = [str(imgs), "--model", mpath, "--out", str(out), "--chunk-size", "16",
            "--batch-size", "8", "--workers", "1", "--no-progress"]
    assert run_main(argv) == 0
    r = StoreReader(out)
    assert r.runs[-1]["mode"] == "dask" and r.runs[-1]["workers"] == 1
    assert_same_store(r, local)
