"""The Waterbirds experiment: layout, groups, presets, and the reference's ablation.

The Waterbirds-like folder is made here from the shapes world's spurious split (two shape
classes on two backgrounds) in the binary Waterbirds layout; the oracle transcribes
compute_use_specific_heads.py (yossigandelsman/clip_text_span, MIT) in NumPy.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

import clipdecomp
from clipdecomp import toy
from clipdecomp.cli import main as cli_main
from clipdecomp.data import sources_extra
from clipdecomp.data.store import StoreReader
from clipdecomp.data.waterbirds import waterbirds_metadata, waterbirds_source
from clipdecomp.methods.waterbirds import (
    WATERBIRDS_CLASSES,
    WATERBIRDS_HEADS,
    group_accuracy,
    waterbirds_ablation,
    waterbirds_heads,
    worst_group_accuracy,
)
from clipdecomp.methods.zeroshot import zero_shot_classifier


def oracle_replaced(attns, mlps, classifier, ablate):
    """compute_use_specific_heads.py, transcribed: (baseline, replaced) predictions."""
    attns, mlps = attns.copy(), mlps.copy()
    baseline = np.argmax((attns.sum(axis=(1, 2)) + mlps.sum(axis=1)) @ classifier, axis=1)
    for layer, head in ablate:
        attns[:, layer, head, :] = np.mean(attns[:, layer, head, :], axis=0, keepdims=True)
    for layer in range(attns.shape[1] - 4):
        for head in range(attns.shape[2]):
            attns[:, layer, head, :] = np.mean(attns[:, layer, head, :], axis=0, keepdims=True)
    for layer in range(mlps.shape[1]):
        mlps[:, layer] = np.mean(mlps[:, layer], axis=0, keepdims=True)
    replaced = np.argmax((attns.sum(axis=(1, 2)) + mlps.sum(axis=1)) @ classifier, axis=1)
    return baseline, replaced


def oracle_groups(pred, y, place):
    return {(a, b): float(np.mean(pred[(y == a) & (place == b)] == a))
            for a in (0, 1) for b in (0, 1) if ((y == a) & (place == b)).any()}


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    batch = toy.spurious_split(32, seed=3, train=False)
    (root / "001.Bird").mkdir()
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    split = np.array([2, 2, 2, 1] * 8)  # a quarter in the validation split
    for i, im in enumerate(batch.images):
        name = f"001.Bird/img_{i:03d}.png"
        Image.fromarray(im).save(root / name)
        lines.append(f"{i},{name},{batch.labels['y'][i]},{split[i]},{batch.labels['place'][i]},"
                     f"/x/{i}.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    test = split == 2
    model = clipdecomp.load(threads=1)
    store = root / "wb.zarr"
    assert cli_main(["run", str(root), "--layout", "waterbirds", "--model", str(toy.MODEL_DIR),
                     "--out", str(store), "--threads", "1", "--chunk-size", "7",
                     "--no-progress"]) == 0
    clf = zero_shot_classifier(model, ["circle", "square"], "single")
    np.save(root / "clf.npy", clf)
    return types.SimpleNamespace(root=root, store=store, model=model, clf=clf,
                                 y=batch.labels["y"][test], place=batch.labels["place"][test],
                                 names=[f"001.Bird/img_{i:03d}.png" for i in np.flatnonzero(test)])


def test_metadata_and_source(wb):
    meta = waterbirds_metadata(wb.root)
    assert meta["img_filename"].tolist() == wb.names
    np.testing.assert_array_equal(meta["y"], wb.y)
    np.testing.assert_array_equal(meta["place"], wb.place)
    assert len(waterbirds_metadata(wb.root, "valid")) == 8
    assert len(waterbirds_metadata(wb.root, None)) == 32
    src = waterbirds_source(wb.root)
    assert src.paths == wb.names and src.classes == list(WATERBIRDS_CLASSES)
    np.testing.assert_array_equal(src.labels, wb.y)
    with pytest.raises(ValueError, match="split"):
        waterbirds_metadata(wb.root, "val")


def test_metadata_errors(tmp_path):
    with pytest.raises(ValueError, match="metadata.csv"):
        waterbirds_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("img_filename,y,split\na.png,0,2\n")
    with pytest.raises(ValueError, match="place"):
        waterbirds_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("img_filename,y,split,place\na.png,3,2,0\n")
    with pytest.raises(ValueError, match="0 or 1"):
        waterbirds_metadata(tmp_path)


def test_group_and_worst_group_accuracy():
    rng = np.random.default_rng(0)
    y, place, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    df = group_accuracy(pred, y, place)
    want = oracle_groups(pred, y, place)
    assert {k: v for k, v in df["accuracy"].items()} == pytest.approx(want)
    assert int(df["n"].sum()) == 200
    assert worst_group_accuracy(pred, y, place) == pytest.approx(min(want.values()))
    with pytest.raises(ValueError):
        group_accuracy(pred, y[:5], place)


def test_presets_are_the_reference_head_sets():
    assert waterbirds_heads("ViT-B-16", "setting") == [(11, 3), (10, 11), (10, 10), (9, 8),
                                                       (9, 6)]
    assert waterbirds_heads("ViT-B/16", "geo") == [(11, 6), (11, 0)]
    assert len(waterbirds_heads("ViT-H-14")) == 9
    # (22, 12) is in both lists of ViT-L-14: the union has it once
    assert len(WATERBIRDS_HEADS["ViT-L-14"]["geo"]) + len(WATERBIRDS_HEADS["ViT-L-14"]["setting"]) \
        == 16 and len(waterbirds_heads("ViT-L-14")) == 15
    assert waterbirds_heads("ViT-L-14")[:2] == [(21, 1), (22, 12)]
    with pytest.raises(ValueError, match="presets"):
        waterbirds_heads("RN50")


def test_ablation_matches_the_reference_on_a_decomposition(wb):
    r = StoreReader(wb.store)
    dec = r.decomposition()
    heads = [(5, 1), (4, 3), (3, 0)]  # the toy model has 6 layers: the last four are 2..5
    base, repl = oracle_replaced(dec.heads, dec.mlps, wb.clf, heads)
    df = waterbirds_ablation(dec, wb.clf, wb.place, heads)
    assert df.loc["baseline", "accuracy"] == pytest.approx(np.mean(base == wb.y))
    assert df.loc["heads ablated", "accuracy"] == pytest.approx(np.mean(repl == wb.y))
    g = oracle_groups(repl, wb.y, wb.place)
    assert df.loc["heads ablated", "landbird on water"] == pytest.approx(g[(0, 1)])
    assert df.loc["heads ablated", "waterbird on land"] == pytest.approx(g[(1, 0)])
    assert df.loc["heads ablated", "worst_group"] == pytest.approx(min(g.values()))
    assert df.loc["baseline", "worst_group"] == pytest.approx(
        min(oracle_groups(base, wb.y, wb.place).values()))
    # the store, read chunk by chunk, gives the same table
    from_store = waterbirds_ablation(r, wb.clf, wb.place, heads)
    np.testing.assert_allclose(from_store.to_numpy(), df.to_numpy())


def test_ablation_from_a_store_of_the_last_four_layers(wb, tmp_path):
    part = tmp_path / "last4.zarr"
    clipdecomp.run_dataset(wb.model, sources_extra.waterbirds(wb.root), part,
                           layers="-4:", progress=False)
    full = StoreReader(wb.store).decomposition()
    heads = [(5, 0), (2, 4)]
    base, repl = oracle_replaced(full.heads, full.mlps, wb.clf, heads)
    df = waterbirds_ablation(StoreReader(part), wb.clf, wb.place, heads)
    assert df.loc["heads ablated", "accuracy"] == pytest.approx(np.mean(repl == wb.y))
    assert df.loc["baseline", "accuracy"] == pytest.approx(np.mean(base == wb.y))
    with pytest.raises(ValueError, match="layers"):
        waterbirds_ablation(StoreReader(part).decomposition(layers=[5]), wb.clf, wb.place,
                            heads, means=StoreReader(part).stats)


def test_waterbirds_command(wb, capsys):
    assert cli_main(["waterbirds", str(wb.store), "--heads", "5.1,4.3", "--classifier",
                     str(wb.root / "clf.npy")]) == 0
    out = capsys.readouterr().out
    dec = StoreReader(wb.store).decomposition()
    _, repl = oracle_replaced(dec.heads, dec.mlps, wb.clf, [(5, 1), (4, 3)])
    row = next(ln for ln in out.splitlines() if ln.startswith("heads ablated")).split()
    assert float(row[2]) == pytest.approx(100 * np.mean(repl == wb.y), abs=0.006)
    assert "waterbird on land" in out and "worst_group" in out
    # the preset of a model the store was not made with is refused clearly
    assert cli_main(["waterbirds", str(wb.store), "--preset", "ViT-B-16", "--classifier",
                     str(wb.root / "clf.npy")]) == 2
    assert "(11, 6) is out of range" in capsys.readouterr().err
    assert cli_main(["waterbirds", str(wb.store), "--classifier", str(wb.root / "clf.npy")]) == 2
    assert "--preset" in capsys.readouterr().err
