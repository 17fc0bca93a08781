"""Data-set sources in their official layouts: ImageNet validation + devkit, CIFAR pickles.

The devkit and the pickles are made here in the official formats (meta.mat written with
scipy, CIFAR batches as dicts of a uint8 [n, 3072] array and a label list); the orders and
labels are checked against torchvision's conventions, written out independently.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

import clipdecomp
from clipdecomp.data.sources import open_source
from clipdecomp.data.sources_extra import (
    cifar,
    imagenet_val,
    read_virtual_image,
    safe_load_pickle,
)
from clipdecomp.data.store import StoreReader

# devkit ids 1..4 are not in WordNet-id order, as in the real devkit (id 1 is n02119789)
SYNSETS = [(1, "n02119789", 0), (2, "n02100735", 0), (3, "n01440764", 0), (4, "n04243546", 0),
           (1001, "n00001740", 4)]


def write_devkit(folder, truth, mat=True):
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{t}\n" for t in truth))
    if mat:
        import scipy.io

        dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        a = np.zeros((len(SYNSETS), 1), dtype=dt)
        for i, (cid, wnid, children) in enumerate(SYNSETS):
            a[i, 0] = (np.array([[cid]], np.uint16), wnid, f"class {cid}",
                       np.array([[children]], np.uint8))
        scipy.io.savemat(data / "meta.mat", {"synsets": a})
    else:
        (data / "map_clsloc.txt").write_text("".join(
            f"{w} {c} name_{c}\n" for c, w, ch in SYNSETS if ch == 0))


@pytest.fixture
def imagenet(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 5, size=12)  # the class id of images 1..12
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, 13):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            val / f"ILSVRC2012_val_{i:08d}.JPEG")
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12", truth)
    return val, tmp_path / "ILSVRC2012_devkit_t12", truth


def test_imagenet_val_follows_torchvision_order(imagenet):
    val, devkit, truth = imagenet
    src = imagenet_val(val, devkit=devkit)
    wnid = {c: w for c, w, ch in SYNSETS if ch == 0}
    classes = sorted(wnid.values())
    assert src.classes == classes
    # torchvision: folders val/<wnid>/ILSVRC2012_val_*.JPEG, sorted by class then name
    want = sorted((classes.index(wnid[int(t)]), f"ILSVRC2012_val_{i + 1:08d}.JPEG")
                  for i, t in enumerate(truth))
    assert src.paths == [p for _, p in want]
    assert src.labels.tolist() == [k for k, _ in want]
    # the devkit's text map gives the same listing
    alt = val.parent / "alt"
    write_devkit(alt, truth, mat=False)
    src2 = imagenet_val(val, devkit=alt / "data")
    assert src2.paths == src.paths and src2.labels.tolist() == src.labels.tolist()


def test_imagenet_val_errors(imagenet, tmp_path):
    val, _devkit, truth = imagenet
    with pytest.raises(ValueError, match="ground_truth"):
        imagenet_val(val)  # no devkit found beside the images
    short = tmp_path / "short"
    write_devkit(short, truth[:5])
    with pytest.raises(ValueError, match="beyond"):
        imagenet_val(val, devkit=short)
    bad = tmp_path / "bad"
    write_devkit(bad, [7] * 12)
    with pytest.raises(ValueError, match="not a leaf class"):
        imagenet_val(val, devkit=bad)


def test_imagenet_val_layout_runs_into_a_store(imagenet, tmp_path):
    val, devkit, _ = imagenet
    # the devkit beside the images is found without devkit=
    os.rename(devkit, val / "ILSVRC2012_devkit_t12")
    src = open_source(val, layout="imagenet-val")
    model = clipdecomp.load(threads=1)
    r = clipdecomp.run_dataset(model, src, tmp_path / "in.zarr", progress=False)
    assert r.metadata["source"]["layout"] == "imagenet-val"
    np.testing.assert_array_equal(np.asarray(r.labels[:]), src.labels)
    first = model.decompose([Image.open(val / src.paths[0])])
    np.testing.assert_allclose(r.heads[0], first.heads[0], atol=1e-6)


# ------------------------------------------------------------------------------ CIFAR

def write_cifar10(root, n=7, seed=0):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                     b"data": data, b"filenames": [b"x.png"] * n}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [s.encode() for s in names], b"num_vis": 3072}, f,
                    protocol=2)
    return d, data, labels, names


def test_cifar10_pickles_read_as_torchvision(tmp_path):
    d, data, labels, names = write_cifar10(tmp_path)
    src = cifar(tmp_path)
    assert src.layout == "cifar10" and len(src) == 7
    assert src.labels.tolist() == labels
    assert src.classes == names
    # torchvision: data.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), HWC uint8
    want = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i in (0, 6):
        np.testing.assert_array_equal(read_virtual_image(src.abspath(i)), want[i])
    assert cifar(d, "cifar10").paths == src.paths
    with pytest.raises(ValueError, match="cifar-100-python"):
        cifar(tmp_path, "cifar100")


def test_cifar100_and_a_store(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (5, 3072), dtype=np.uint8)
    with open(d / "test", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [3, 1, 0, 2, 3], "coarse_labels": [0] * 5}, f,
                    protocol=4)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "bear", "cup", "dog"]}, f, protocol=4)
    src = open_source(tmp_path, layout="cifar100")
    assert src.classes == ["apple", "bear", "cup", "dog"]
    assert src.labels.tolist() == [3, 1, 0, 2, 3]
    model = clipdecomp.load(threads=1)
    r = clipdecomp.run_dataset(model, src, tmp_path / "c.zarr", progress=False, chunk_size=2)
    assert isinstance(r, StoreReader) and r.complete and bool(np.all(r.ok[:]))
    img = data[4].reshape(3, 32, 32).transpose(1, 2, 0)
    want = model.decompose([img])
    np.testing.assert_allclose(r.heads[4], want.heads[0], atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_pickles_that_name_code_are_refused(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load_pickle(pickle.dumps({"data": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load_pickle(pickle.dumps(np.float64(1.0)))  # numpy scalars need a global too
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    (d / "test_batch").write_bytes(pickle.dumps({"data": _Evil(), "labels": [0]}))
    with pytest.raises(pickle.UnpicklingError):
        cifar(tmp_path)
    # arrays, containers and Python 2 style bytes keys come through
    obj = {b"k": [1, "s", (2.5, None)], "a": np.arange(6, dtype=np.int16).reshape(2, 3)}
    got = safe_load_pickle(pickle.dumps(obj, protocol=2))
    assert got[b"k"] == [1, "s", (2.5, None)]
    np.testing.assert_array_equal(got["a"], obj["a"])


def test_bad_cifar_batches_are_clear_errors(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8),
                                                 "labels": [0]}))
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        cifar(tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8),
                                                 "labels": [0, 5]}))
    with pytest.raises(ValueError, match="outside"):
        cifar(tmp_path)
    with pytest.raises(ValueError, match="'<file>::<row>'"):
        read_virtual_image("no-row-here")
