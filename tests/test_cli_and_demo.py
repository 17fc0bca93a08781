"""The main job (``clipdecomp demo``) and the small CLI commands, on a reduced size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipdecomp import toy

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "clipdecomp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)


def test_demo_runs_and_reports(tmp_path):
    p = _run("demo", "--n-images", "32", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("heatmaps.png", "segmentation.png", "head_roles.png", "ablation.png",
                 "atlas.html"):
        assert (out / name).stat().st_size > 1000, name
    assert f"atlas: {(out / 'atlas.html').resolve()}" in p.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"style", "zero_shot", "heads", "head_probes", "probes", "ablation",
                           "segmentation", "spurious", "head_maps", "neurons"}
    neur = report["neurons"]
    assert 0 <= neur["sparse_share"] <= 1 and neur["neurons"]
    assert list((out).glob("neuron_*.png"))
    assert (out / "head_maps.png").stat().st_size > 1000
    assert report["style"] == toy.MODEL_STYLE
    # every head carries the probes' verdict beside TextSpan's, and the agreement is their mean
    heads = report["heads"]
    assert all(r["probe_role"] in toy.ATTRIBUTES for r in heads)
    agree = np.mean([r["probe_role"] == r["role"] for r in heads])
    assert report["head_probes"]["agreement"] == pytest.approx(agree)
    sp = report["spurious"]
    assert min(sp["groups_before"]) == pytest.approx(sp["worst_group_before"])
    assert min(sp["groups_after"]) == pytest.approx(sp["worst_group_after"])
    assert [c["attribute"] for c in report["head_maps"]] == ["position", "shape"]
    zs = {r["attribute"]: r for r in report["zero_shot"]}
    # colour is what the embedded model learned best: far above chance on any seed
    assert zs["color"]["accuracy"] > 3 * zs["color"]["chance"]
    seg = {r["method"]: r for r in report["segmentation"]}
    assert seg["decomposition (ours)"]["miou"] > seg["all foreground"]["miou"]
    cfg = json.loads((toy.MODEL_DIR / "open_clip_config.json").read_text())["model_cfg"]
    n_heads = cfg["vision_cfg"]["layers"] * cfg["vision_cfg"]["width"] // 32
    assert len(report["heads"]) == n_heads
    assert "written to" in p.stdout


def test_demo_matches_library_calls():
    """The numbers the demo prints are the library's: recompute one independently."""
    import clipdecomp
    from clipdecomp.demo import zero_shot_table

    model = clipdecomp.load()
    names, _ = toy.prompts("color")
    clf = clipdecomp.zero_shot_classifier(model, names, templates=toy.TEMPLATES["color"])
    rows = zero_shot_table(model, {a: clf for a in ("shape", "color", "size", "position",
                                                     "background", "count")}, 16, seed=3)
    batch = toy.generate(16, seed=3, n_objects=1)
    emb = model.encode_image(list(batch.images), normalize=True)
    want = float(((emb @ clf).argmax(1) == batch.labels["color"][:, 0]).mean())
    assert {r["attribute"]: r for r in rows}["color"]["accuracy"] == pytest.approx(want)


def test_cli_info_and_pretrained(tmp_path):
    p = _run("info", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "6 layers" in p.stdout or "layers" in p.stdout
    assert "SIMD path" in p.stdout and "AVX512_BF16" in p.stdout and "bf16 products on" in p.stdout
    p = _run("info", "--precision", "bf16-emulated", cwd=tmp_path)
    assert p.returncode == 0 and "precision bf16-emulated" in p.stdout, p.stderr[-2000:]
    p = _run("pretrained", cwd=tmp_path)
    assert p.returncode == 0 and "openai" in p.stdout


def test_cli_unknown_command(tmp_path):
    p = _run("nope", cwd=tmp_path)
    assert p.returncode == 2 and "unknown command" in p.stderr


def test_description_pool_is_tagged():
    from clipdecomp.demo import description_pool

    texts, about = description_pool()
    assert len(texts) == len(set(texts)) == len(about)
    assert set(about) == {"shape", "color", "size", "position", "background", "count"}
    assert np.mean([a == "background" for a in about]) > 0.1


def test_head_contrast_against_direct_token_sums():
    """The contrast is the right text's head map minus the wrong one's over the object's
    patches, recomputed here from the per-token terms."""
    import clipdecomp
    from clipdecomp.demo import _right_wrong_texts, head_contrast

    model = clipdecomp.load()
    batch = toy.generate(6, seed=11, n_objects=1, style=toy.MODEL_STYLE)
    dec = model.decompose(list(batch.images), spatial=True)
    got = head_contrast(model, dec, batch, 4, 2, "position")
    right, wrong = _right_wrong_texts(batch, "position")
    g = model.config.image_size // model.config.patch_size
    fg = batch.foreground.reshape(6, g, 8, g, 8).mean((2, 4)) > 0.25
    vals = []
    for i in range(6):
        e = model.encode_text([right[i], wrong[i]], normalize=True).astype(np.float64)
        tok = dec.tokens[i, 4, 1:, 2].astype(np.float64)  # [N-1, D]
        diff = (tok @ e[0] - tok @ e[1]).reshape(g, g)
        vals.append(diff[fg[i]].mean())
    assert got["contrast"] == pytest.approx(np.mean(vals), rel=1e-4, abs=1e-7)
    assert got["share"] == pytest.approx(np.mean(np.array(vals) > 0))
    assert toy.POSITIONS[batch.labels["position"][0, 0]] in right[0]


def test_shipped_model_has_specific_heads_for_each_property():
    """TextSpan on the shipped model (the demo's seeds, 512 scenes): at least two heads whose
    first 4 of 5 texts are about one property, for each of shape, position, colour and
    background (measured: shape L2.H2 L5.H2, position L0.H3 L2.H3, colour L4.H3 L5.H3,
    background L0.H1 L4.H5 L5.H5); the read-out heads of the last training phase
    (training_info.json) among them, with the property they were trained to carry."""
    import json

    import clipdecomp
    from clipdecomp.demo import description_pool, head_roles

    model, style = clipdecomp.load(), toy.MODEL_STYLE
    dec = model.decompose(list(toy.generate(512, seed=2, style=style).images))
    texts, about = description_pool()
    df = clipdecomp.textspan_heads(dec, model.encode_text(texts, normalize=True), texts,
                                   layers=list(range(model.config.layers)), n_texts=5, rank=80)
    roles = head_roles(df, about, texts)
    spec = {a: [(r["layer"], r["head"]) for r in roles if r["specific"] and r["role"] == a]
            for a in ("shape", "position", "color", "background")}
    print(spec)
    for attr, heads in spec.items():
        assert len(heads) >= 2, (attr, heads)
    # (recomputed: "specific" is 4 of the first 5 texts tagged with one attribute)
    tag = dict(zip(texts, about))
    for r in roles:
        kinds = [tag[t] for t in r["texts"]]
        assert r["specific"] == (kinds.count(r["role"]) >= 4)
    info = json.loads((toy.MODEL_DIR / "training_info.json").read_text())
    planted = info["phases"][-1].get("head_attrs") or ""
    for item in filter(None, planted.split(",")):
        key, attr = item.split("=")
        layer, head = (int(x) for x in key.split("."))
        assert (layer, head) in spec[attr], (item, spec)


def test_shipped_model_spurious_repair():
    """The Waterbirds effect on the shipped model (the demo's seeds, 512 scenes): the classes'
    own names lean on the ground, and mean-ablating the heads TextSpan calls background raises
    worst-group accuracy by at least 15 points (demo --full: 50.8% -> 96.1%, 5 heads).
    Recomputed here from the per-head terms in NumPy."""
    import clipdecomp
    from clipdecomp.demo import description_pool, head_roles, spurious_repair

    model, n, style = clipdecomp.load(), 512, toy.MODEL_STYLE
    dec = model.decompose(list(toy.generate(n, seed=2, style=style).images))
    texts, about = description_pool()
    df = clipdecomp.textspan_heads(dec, model.encode_text(texts, normalize=True), texts,
                                   layers=list(range(model.config.layers)), n_texts=5, rank=80)
    roles = head_roles(df, about, texts)
    rep, _ = spurious_repair(model, roles, n, seed=0, style=style)

    train = toy.spurious_split(n, seed=5, train=True, style=style)
    test = toy.spurious_split(n, seed=6, train=False, style=style)
    d_train, d_test = model.decompose(list(train.images)), model.decompose(list(test.images))
    prompts = [t.format(c) for c in ("buoy", "crate") for t in toy.TEMPLATES["shape"]]
    e = model.encode_text(prompts, normalize=True).reshape(2, len(toy.TEMPLATES["shape"]), -1)
    clf = e.mean(1)
    clf /= np.linalg.norm(clf, axis=1, keepdims=True)
    bg = [tuple(h) for h in rep["background_heads"]]
    assert bg and all(r["role"] == "background" for r in roles if (r["layer"], r["head"]) in bg)
    x = d_test.embedding / d_test.norm[:, None]
    for layer, head in bg:
        x = x - (d_test.heads[:, layer, head] - d_train.heads[:, layer, head].mean(0))

    def groups(emb):
        hit = (emb @ clf.T).argmax(1) == test.labels["y"]
        return [float(hit[test.labels["group"] == g].mean()) for g in range(4)]

    before, after = groups(d_test.embedding), groups(x)
    assert rep["groups_before"] == pytest.approx(before)
    assert rep["groups_after"] == pytest.approx(after)
    assert min(before) < 0.7  # the names lean on the ground (0.508 at 1,024 scenes)
    assert min(after) - min(before) >= 0.15
    assert min(before[0], before[3]) > 0.95  # majority groups


def test_shipped_model_segments_and_its_heads_light_the_object():
    """Zero-shot segmentation of the demo's --full scenes (1,024 one-object scenes, seed 4):
    decomposition mIoU >= 70 and ahead of attention rollout (measured 71.1 vs 65.3). The maps
    are recomputed in NumPy from the per-token terms (all layers and heads, along the predicted
    colour's class embedding less the colours' mean) and must equal the library's. The demo's
    position and shape heads light the object more for the right text than for a wrong one in
    at least 90% of the scenes (measured 100% and 96%)."""
    import clipdecomp
    from clipdecomp.demo import _classifiers, head_contrast
    from clipdecomp.methods.segmentation import (
        segment_decomposition,
        segment_maps,
        segmentation_metrics,
    )
    from clipdecomp.methods.spatial import attention_rollout

    model = clipdecomp.load()
    imgs = toy.generate(1024, seed=4, n_objects=1, style=toy.MODEL_STYLE)
    dec = model.decompose(list(imgs.images), spatial=True, attn=True)
    w = _classifiers(model)["color"].astype(np.float64)  # [D, C]
    pred = (dec.embedding.astype(np.float64) @ w).argmax(1)
    dirs = (w - w.mean(1, keepdims=True)).T[pred]  # [B, D]
    g = model.config.image_size // model.config.patch_size
    tok = dec.tokens[:, :, 1:].astype(np.float64).sum((1, 3))  # [B, G*G, D]
    maps = np.einsum("btd,bd->bt", tok, dirs).reshape(-1, g, g)
    ours = segment_decomposition(dec, _classifiers(model)["color"])
    np.testing.assert_allclose(ours.maps, maps, rtol=0, atol=1e-5 * np.abs(maps).max())

    def miou(res):
        return segmentation_metrics(res.scores, imgs.foreground, masks=res.masks,
                                    degenerate=res.degenerate)["miou"]

    mine = miou(segment_maps(maps.astype(np.float32), model.config.image_size))
    rollout = miou(segment_maps(attention_rollout(dec), model.config.image_size))
    assert mine >= 0.70
    assert mine > rollout
    for layer, head, attr in [(2, 3, "position"), (5, 2, "shape")]:
        c = head_contrast(model, dec, imgs, layer, head, attr)
        assert c["share"] >= 0.9, (layer, head, attr, c)
