"""Neuron statistics of a data-set run (``run_dataset(..., neurons=)``).

* The statistics in the store equal the in-memory computation (``neuron_stats``) on the same
  images and a plain NumPy oracle of ``compute_pcas.py`` on the ``[N, F, D]`` effects of
  ``second_order``; skipped images are left out.
* An interrupted run, resumed, gives the same arrays (neuron rows and statistics included) bit
  for bit as an uninterrupted one; so does a run stopped while computing the statistics, and
  one whose neuron chunk file was deleted.
* Two Dask workers and the command line give the store of a local run.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from runs import assert_same_store, checkpoint, write_images

import clipdecomp
from clipdecomp.cli import run_main
from clipdecomp.data.runner import run_dataset
from clipdecomp.data.sources import open_source
from clipdecomp.data.store import StoreReader
from clipdecomp.engine.loading import ModelSpec
from clipdecomp.methods.neuron_stats import NeuronStatsSpec, neuron_stats
from clipdecomp.methods.neurons import second_order

pytestmark = pytest.mark.usefixtures("requires_core")

STATS = ("mean", "top_images", "top_norms", "pcs", "norms")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, b16):
    root = tmp_path_factory.mktemp("neurons")
    imgs = root / "imgs"
    write_images(imgs, 27, seed=11)
    (imgs / "part1" / "broken.png").write_text("not a png")
    path = checkpoint(b16)                     # 3 layers, 5 heads, F = 150, D = 40
    return imgs, path, clipdecomp.load(path, threads=1)


class Stopper:
    """The model, raising KeyboardInterrupt (a Ctrl-C) at its ``stop_at``-th decompose call."""

    def __init__(self, model, stop_at: int):
        self._model = model
        self.stop_at = stop_at
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def decompose(self, pixels, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self._model.decompose(pixels, **kwargs)


def oracle(eff: np.ndarray, k: int):
    """compute_pcas.py in plain NumPy on [N, F, D]: mean, centred norms [N, F], top-k rows per
    neuron (largest first), their first principal component signed by the majority rule."""
    eff = eff.astype(np.float64)
    mean = eff.mean(0)
    cen = eff - mean
    norms = np.linalg.norm(cen, axis=-1)                                  # [N, F]
    top = np.argsort(-norms, axis=0)[:k].T                                # [F, k]
    pcs = []
    for n in range(eff.shape[1]):
        x = cen[top[n], n]                                                # [k, D]
        pc = np.linalg.svd(x)[2][0]
        if (x @ pc > 0).sum() <= k // 2:
            pc = -pc
        pcs.append(pc)
    return mean, norms, top, np.take_along_axis(norms.T, top, 1), np.stack(pcs)


def valid_paths(imgs, store: StoreReader):
    src = open_source(imgs)
    ok = np.asarray(store.ok[:], bool)
    rows = np.nonzero(ok)[0]
    return rows, [src.abspath(int(i)) for i in rows]


def assert_same_neurons(a: StoreReader, b: StoreReader, layers) -> None:
    """Neuron rows and statistics of two stores, bit for bit."""
    for lay in layers:
        for name in ("coef", "aux", "ln_stats"):
            np.testing.assert_array_equal(a._root[f"neurons/{lay}/{name}"][...],
                                          b._root[f"neurons/{lay}/{name}"][...], err_msg=name)
        sa, sb = a.neuron_stats(lay), b.neuron_stats(lay)
        assert sa.n_images == sb.n_images and sa.layer == sb.layer == lay
        for name in STATS:
            np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name), err_msg=name)


def test_store_statistics_equal_in_memory_and_oracle(collection, tmp_path):
    imgs, _, model = collection
    k = 6
    r = run_dataset(model, imgs, tmp_path / "s.zarr", chunk_size=8, batch_size=3,
                    layers=[2], progress=False, neurons=NeuronStatsSpec([0, -2], k=k))
    assert r.neuron_layers == (0, 1)
    assert r.metadata["settings"]["neurons"] == {"layers": [0, 1], "k": k,
                                                 "coefficient": 100.0}
    rows, paths = valid_paths(imgs, r)
    assert len(rows) == 27 and r.n == 28                       # the broken file is skipped
    bad = np.setdiff1d(np.arange(r.n), rows)
    for lay in (0, 1):
        st = r.neuron_stats(lay)
        assert st.n_images == 27 and st.k == k and st.layer == lay
        # the in-memory computation on the same images (indices into `paths`)
        mem = neuron_stats(model, paths, lay, k=k, batch_size=5)
        eff = second_order(model, paths, lay)                             # [27, F, D]
        mean, norms, top, top_norms, pcs = oracle(eff, k)
        scale = np.abs(mean).max()
        for ref_mean, ref_top, ref_norms, ref_top_norms in (
                (mem.mean, mem.top_images, mem.norms, mem.top_norms),
                (mean, top, norms, top_norms)):
            assert np.abs(st.mean - ref_mean).max() < 1e-6 * scale
            assert np.array_equal(np.sort(st.top_images, 1), np.sort(rows[ref_top], 1))
            assert np.abs(st.top_norms - ref_top_norms).max() < 1e-5 * ref_top_norms.max()
            assert np.abs(st.norms[rows] - ref_norms).max() < 1e-5 * ref_norms.max()
        assert np.abs(st.pcs - mem.pcs).max() < 1e-4
        # the majority sign rule is decided by projections clear of 0; compare there
        cen = np.stack([eff[top[n], n] - mean[n] for n in range(eff.shape[1])])   # [F, k, D]
        clear = np.abs(np.einsum("fkd,fd->fk", cen, pcs)).min(1) > 1e-4 * scale
        assert clear.mean() > 0.9
        assert np.abs(st.pcs - pcs)[clear].max() < 1e-4
        assert np.abs(np.abs(st.pcs) - np.abs(pcs)).max() < 1e-4
        assert np.all(st.norms[bad] == 0)
        assert np.all(np.diff(st.top_norms, axis=1) <= 0)
    # the neuron group reads as saved statistics too
    from clipdecomp.methods.neuron_stats import load_neuron_stats

    back = load_neuron_stats(str(tmp_path / "s.zarr") + "/neurons/1")
    assert np.array_equal(back.pcs, r.neuron_stats(1).pcs) and back.n_images == 27


def test_interrupted_run_resumes_to_the_same_store(collection, tmp_path):
    imgs, _, model = collection
    kw = {"chunk_size": 8, "batch_size": 4, "layers": "-1:", "dtype": "float16",
          "progress": False, "neurons": {"layers": [1], "k": 4}}
    full = run_dataset(model, imgs, tmp_path / "full.zarr", **kw)
    out = tmp_path / "stopped.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_dataset(Stopper(model, stop_at=5), imgs, out, **kw)     # 2 chunks of 2 calls done
    part = StoreReader(out)
    assert part.included.sum() == 2
    with pytest.raises(ValueError, match="not computed yet"):
        part.neuron_stats(1)
    r = run_dataset(model, imgs, out, **kw)
    assert r.runs[-1]["images"] == 28 - 16
    assert_same_store(r, full)
    assert_same_neurons(r, full, [1])

    # stopped while writing the statistics: marked incomplete, arrays torn; the next run
    # computes them again
    g = zarr.open_group(os.path.join(out, "neurons", "1"), mode="r+")
    g.attrs.update({"neuron_stats": {"complete": False}})
    g["pcs"][...] = 7.0
    g["norms"][:5] = 0.0
    with pytest.raises(ValueError, match="not computed yet"):
        StoreReader(out).neuron_stats()
    r = run_dataset(model, imgs, out, **kw)
    assert r.runs[-1]["images"] == 0
    assert_same_neurons(r, full, [1])

    # a neuron chunk file deleted: that chunk is computed again, the same rows and statistics
    coef_dir = os.path.join(out, "neurons", "1", "coef", "c")
    victim = os.path.join(coef_dir, "1", "0", "0", "0")
    assert os.path.exists(victim)
    os.remove(victim)
    with pytest.warns(UserWarning, match="chunk 1"):
        r = run_dataset(model, imgs, out, **kw)
    assert r.runs[-1]["images"] == 8
    assert_same_store(r, full)
    assert_same_neurons(r, full, [1])


def test_settings_and_errors(collection, tmp_path):
    imgs, _, model = collection
    kw = {"chunk_size": 16, "batch_size": 8, "progress": False}
    out = tmp_path / "n.zarr"
    run_dataset(model, imgs, out, neurons=1, **kw)
    with pytest.raises(ValueError, match="settings.neurons"):
        run_dataset(model, imgs, out, neurons=NeuronStatsSpec(1, k=5), **kw)
    with pytest.raises(ValueError, match="settings.neurons"):
        run_dataset(model, imgs, out, **kw)
    plain = run_dataset(model, imgs, tmp_path / "plain.zarr", **kw)
    assert plain.neuron_layers == () and "neurons" not in plain.metadata["settings"]
    assert "neurons" not in plain._root
    with pytest.raises(ValueError, match="no neuron statistics"):
        plain.neuron_stats()
    with pytest.raises(ValueError, match="no neuron statistics of layer 0"):
        StoreReader(out).neuron_stats(0)
    with pytest.raises(ValueError, match="need a later layer"):
        run_dataset(model, imgs, tmp_path / "x.zarr", neurons=2, **kw)
    with pytest.raises(ValueError, match="need a later layer"):
        run_dataset(model, imgs, tmp_path / "x.zarr", neurons=[-1], **kw)
    with pytest.raises(ValueError, match="k must be"):
        run_dataset(model, imgs, tmp_path / "x.zarr", neurons={"layers": 1, "k": 0}, **kw)
    with pytest.raises(TypeError, match="unknown field"):
        run_dataset(model, imgs, tmp_path / "x.zarr", neurons={"layer": 1}, **kw)
    with pytest.raises(TypeError, match="neuron layers"):
        run_dataset(model, imgs, tmp_path / "x.zarr", neurons="9", **kw)
    assert run_main([str(imgs), "--model", checkpoint_of(model), "--out",
                     str(tmp_path / "y.zarr"), "--neurons", "1,x", "--no-progress"]) == 2
    assert run_main([str(imgs), "--model", checkpoint_of(model), "--out",
                     str(tmp_path / "y.zarr"), "--neurons", "-1", "--no-progress"]) == 2
    assert run_main([str(imgs), "--model", checkpoint_of(model), "--out",
                     str(tmp_path / "y.zarr"), "--neurons", "1", "--neuron-k", "0",
                     "--no-progress"]) == 2


def checkpoint_of(model) -> str:
    return model.path


def test_command_line_and_two_dask_workers_equal_a_local_run(collection, tmp_path):
    distributed = pytest.importorskip("distributed")
    imgs, mpath, model = collection
    kw = {"chunk_size": 6, "batch_size": 4, "layers": [1], "progress": False}
    local = run_dataset(model, imgs, tmp_path / "local.zarr", neurons={"layers": [0, 1], "k": 3},
                        **kw)
    out = tmp_path / "cli.zarr"
    assert run_main([str(imgs), "--model", mpath, "--threads", "1", "--out", str(out),
                     "--chunk-size", "6", "--batch-size", "4", "--layers", "1",
                     "--neurons", "-3,-2", "--neuron-k", "3", "--no-progress"]) == 0
    assert_same_store(StoreReader(out), local)
    assert_same_neurons(StoreReader(out), local, [0, 1])
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        r = run_dataset(ModelSpec(mpath, {"threads": 1}), imgs, tmp_path / "dask.zarr",
                        client=client, neurons=NeuronStatsSpec([0, 1], k=3), **kw)
    finally:
        client.close()
        cluster.close()
    assert r.runs[-1]["mode"] == "dask"
    assert_same_store(r, local)
    assert_same_neurons(r, local, [0, 1])
