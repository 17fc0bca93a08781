"""The HTML atlas: its numbers against the decomposition, its size, its CLI, and the page in a
real browser.

Numbers are checked against independent NumPy computations on the model's own outputs
(``encode_image`` / ``encode_text`` / the decomposition's arrays), never against the atlas's own
helpers. The ``browser`` tests open the written page in headless Chromium (``chromium
--headless --dump-dom``) with the page's self-test hook (``#selftest``), which writes what it
found (cards, images, maps, errors, a grid click) into the DOM, and take a screenshot.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipdecomp
from clipdecomp import toy
from clipdecomp.methods.textspan import textspan
from clipdecomp.viz.atlas import Atlas, dequantise, quantise, report

ROOT = Path(__file__).resolve().parents[2]
N_SHOW = 5

pytestmark = pytest.mark.skipif(not (toy.MODEL_DIR / "open_clip_config.json").exists(),
                                reason="the embedded model is not in this checkout")


def _pool():
    """The shapes-world descriptions of the shipped pool, with their attribute."""
    from clipdecomp.demo import description_pool

    return description_pool()


@pytest.fixture(scope="module")
def world():
    """16 single-object scenes through the embedded model, and the atlas of them."""
    model = clipdecomp.load()
    batch = toy.generate(16, seed=7, n_objects=1)
    dec = model.decompose(list(batch.images), spatial=True)
    texts, about = _pool()
    pool_emb = model.encode_text(texts, normalize=True)
    names, _ = toy.prompts("color")
    labels = batch.labels["color"][:, 0]
    means = clipdecomp.component_means(dec)
    repair_heads = [(5, 0), (5, 1), (4, 4)]
    atlas = report(dec, batch.images, pool=(texts, pool_emb), labels=labels, classnames=names,
                   templates=toy.TEMPLATES["color"], roles=dict(zip(texts, about)),
                   n_show=N_SHOW, views=[0, 3, 5], repair={"heads": repair_heads, "means": means})
    clf = clipdecomp.zero_shot_classifier(model, names, templates=toy.TEMPLATES["color"])
    return types.SimpleNamespace(model=model, batch=batch, dec=dec, texts=texts,
                                 pool_emb=pool_emb, names=names, labels=labels, atlas=atlas,
                                 clf=clf, means=means, repair_heads=repair_heads)


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _embedded_json(page: str) -> dict:
    m = re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.DOTALL)
    assert m, "no embedded JSON"
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------ the numbers

def test_head_contributions_add_up_to_the_similarity(world):
    """Per image and text: sum over heads of heads[l, h] . t, plus the MLPs, is cos(image, t)."""
    emb = _unit(world.model.encode_image(list(world.batch.images)))      # independent forward
    clf = _unit(np.asarray(world.clf, np.float64).T)                    # [C, D]
    for v in world.atlas.data["views"]:
        r = v["row"]
        assert len(v["texts"]) == 5 and len(v["heads"]) == 36
        # the texts are the image's five most likely classes, best first
        order = np.argsort(-(emb[r] @ clf.T), kind="stable")[:5]
        assert v["texts"] == [world.names[j] for j in order]
        for t, name in enumerate(v["texts"]):
            d = clf[world.names.index(name)]
            contrib = np.asarray(v["contributions"][t])
            assert contrib.sum() + v["mlps"][t] == pytest.approx(emb[r] @ d, abs=2e-4)
            assert v["similarity"][t] == pytest.approx(emb[r] @ d, abs=1e-4)
            want = np.einsum("lhd,d->lh", world.dec.heads[r].astype(np.float64), d).ravel()
            np.testing.assert_allclose(contrib, want, atol=2e-6, rtol=1e-4)
            assert v["heads"][int(np.argmax(contrib))] == \
                "L{}.H{}".format(*np.unravel_index(np.argmax(want), (6, 6)))


def test_top_bottom_images_are_the_extremes_of_the_projection(world):
    heads = world.dec.heads.astype(np.float64)
    cards = world.atlas.data["heads"]
    assert len(cards) == 36
    for card in cards:
        l_, h = card["layer"], card["head"]
        u = _unit(world.model.encode_text([card["direction"]])[0])
        p = heads[:, l_, h] @ u
        top = [t["row"] for t in card["top"]]
        bottom = [t["row"] for t in card["bottom"]]
        assert top == np.argsort(-p, kind="stable")[:N_SHOW].tolist(), card["id"]
        assert bottom == np.argsort(p, kind="stable")[:N_SHOW].tolist(), card["id"]
        assert top[0] == int(np.argmax(p)) and bottom[0] == int(np.argmin(p))
        np.testing.assert_allclose([t["value"] for t in card["top"]], p[top], rtol=1e-4,
                                   atol=1e-6)
        counts, edges = np.histogram(p, bins=len(card["hist"]["counts"]))
        assert card["hist"]["counts"] == counts.tolist()
        np.testing.assert_allclose(card["hist"]["edges"], edges, rtol=1e-4, atol=1e-6)


def test_nearest_images_by_the_head_alone(world):
    for card in world.atlas.data["heads"]:
        q = card["nearest"]["query"]
        assert q == card["top"][0]["row"]
        x = _unit(world.dec.heads[:, card["layer"], card["head"]])
        cos = x @ x[q]
        cos[q] = -np.inf
        want = np.argsort(-cos, kind="stable")[:N_SHOW]
        assert card["nearest"]["rows"] == want.tolist(), card["id"]
        np.testing.assert_allclose(card["nearest"]["scores"], cos[want], atol=1e-5)


def test_textspan_texts_match_the_reference_steps(world):
    """The card's texts are those of the reference TextSpan on this head's terms."""
    for card in world.atlas.data["heads"][::7]:
        c = world.dec.heads[:, card["layer"], card["head"]]
        ref = textspan(c, world.pool_emb, world.texts, n_texts=5, rank=80)
        assert [t["text"] for t in card["texts"]] == list(ref.texts), card["id"]
        np.testing.assert_allclose([t["fraction"] for t in card["texts"]], ref.fraction,
                                   rtol=1e-3, atol=1e-6)
        assert card["variance_explained"] == pytest.approx(ref.cumulative[-1], rel=1e-4)


def test_maps_are_the_heads_maps_along_the_first_text(world):
    tokens = world.dec.tokens.astype(np.float64)                        # [B, L, N, H, D]
    for card in world.atlas.data["heads"][::5]:
        u = _unit(world.model.encode_text([card["direction"]])[0])
        for item in card["top"] + card["bottom"]:
            want = (tokens[item["row"], card["layer"], 1:, card["head"]] @ u).reshape(8, 8)
            got = dequantise(item["map"])
            assert got.shape == (8, 8)
            assert np.abs(got - want).max() <= np.abs(want).max() / 254 + 1e-7
    for v in world.atlas.data["views"]:
        clf = _unit(np.asarray(world.clf, np.float64).T)
        for t, name in enumerate(v["texts"]):
            d = clf[world.names.index(name)]
            want = np.einsum("lnhd,d->n", tokens[v["row"], :, 1:], d).reshape(8, 8)
            got = dequantise(v["maps"][t])
            assert np.abs(got - want).max() <= np.abs(want).max() / 254 + 1e-6


def test_zero_shot_ablation_and_repair(world):
    d = world.atlas.data
    emb = world.model.encode_image(list(world.batch.images))
    clf = np.asarray(world.clf, np.float64)
    pred = (emb @ clf).argmax(1)
    assert d["zero_shot"]["accuracy"] == pytest.approx(np.mean(pred == world.labels), abs=1e-6)
    assert d["zero_shot"]["n"] == 16 and d["zero_shot"]["classes"] == len(world.names)
    # the ablation curve: attention layers 0..k replaced by their means over these images
    heads = world.dec.heads.astype(np.float64)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rows = {r["ablation"]: r for r in d["ablation"]}
    for k in range(6):
        x = unit - heads[:, :k + 1].sum((1, 2)) + heads[:, :k + 1].mean(0).sum((0, 1))
        name = f"attention layers 0-{k}" if k else "attention layer 0"
        assert rows[name]["layers_ablated"] == k + 1
        assert rows[name]["accuracy"] == pytest.approx(np.mean((x @ clf).argmax(1)
                                                               == world.labels), abs=1e-6)
    # the repaired class of each image view: the chosen heads at their means
    rep = unit.copy()
    for l_, h in world.repair_heads:
        rep += heads[:, l_, h].mean(0) - heads[:, l_, h]
    rpred = (rep @ clf).argmax(1)
    assert d["zero_shot"]["repaired_accuracy"] == pytest.approx(np.mean(rpred == world.labels))
    for v in d["views"]:
        assert v["predicted"] == world.names[pred[v["row"]]]
        assert v["repaired"] == world.names[rpred[v["row"]]]
        assert v["label"] == world.names[world.labels[v["row"]]]
    assert d["repair"]["heads"] == ["L5.H0", "L5.H1", "L4.H4"]


def test_roles_are_the_majority_attribute(world):
    texts, about = _pool()
    tag = dict(zip(texts, about))
    for card in world.atlas.data["heads"]:
        kinds = [tag[t["text"]] for t in card["texts"]]
        assert kinds.count(card["role"]) == max(kinds.count(k) for k in set(kinds))
    assert set(world.atlas.data["roles"]["colors"]) <= set(about)


# ------------------------------------------------------------------------------ the file

def test_page_is_one_self_contained_file(world, tmp_path):
    path = world.atlas.save(tmp_path / "atlas.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # no network: no external script, style, image or font, no fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "fetch(" not in page
    assert "XMLHttpRequest" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    data = _embedded_json(page)
    assert data == json.loads(json.dumps(world.atlas.data))
    # every image is an inline WebP that decodes; one per image shown, shared by every card
    shown = {t["row"] for c in data["heads"] for t in c["top"] + c["bottom"]}
    shown |= {r for c in data["heads"] for r in c["nearest"]["rows"]}
    shown |= {v["row"] for v in data["views"]}
    assert set(map(int, data["thumbs"])) == shown
    for uri in data["thumbs"].values():
        assert uri.startswith("data:image/webp;base64,")
        import base64
        import io

        im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert im.size == (64, 64)                # the 64-pixel scenes are not enlarged
    assert data["neurons"] == []                  # no neuron effects exist yet


def test_size_budget_embedded_model(world):
    """The module's stated budget: 36 heads x 16 images stays under 1 MB."""
    assert len(world.atlas.html().encode()) < 1_000_000


class _FakeConfig:
    layers, heads, width, embed_dim, image_size, patch_size, n_tokens = 12, 12, 768, 48, 224, 16, 197
    name = "ViT-B-16-shaped"


class _FakeDec:
    """A 12 x 12-head decomposition of random terms; ``probe`` returns maps without storing
    tokens (a broadcast array): for the size budget only."""

    config = _FakeConfig()
    has_tokens = False
    pixels = None

    def __init__(self, b: int, seed: int = 0, rows=None):
        rng = np.random.default_rng(seed)
        self.rows = np.arange(b) if rows is None else np.asarray(rows)
        n = len(self.rows)
        self.heads = rng.normal(size=(n, 12, 12, 48)).astype(np.float32) / 100
        self.mlps = rng.normal(size=(n, 13, 48)).astype(np.float32) / 100
        self.cls_to_cls = rng.normal(size=(n, 12, 48)).astype(np.float32) / 100
        self.embedding = self.heads.sum((1, 2)) + self.mlps.sum(1)
        self.norm = np.ones(n, np.float32)
        self._rng = rng

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        out = _FakeDec.__new__(_FakeDec)
        idx = np.atleast_1d(np.arange(len(self))[idx])
        for k in ("heads", "mlps", "cls_to_cls", "embedding", "norm", "rows"):
            setattr(out, k, getattr(self, k)[idx])
        out._rng = self._rng
        return out

    def project_tokens(self, u):
        maps = self._rng.normal(size=(len(self), 12, 197, 12, 1)).astype(np.float32)
        return np.broadcast_to(maps, (len(self), 12, 197, 12, len(u)))


def test_size_budget_vit_b_shape(tmp_path):
    """144 heads x 64 images, 14 x 14 maps, noisy (badly compressible) 224-pixel images: the
    stated budget of 3 MB."""
    rng = np.random.default_rng(1)
    dec = _FakeDec(64)
    images = rng.integers(0, 256, size=(64, 224, 224, 3), dtype=np.uint8)
    texts = [f"text {i}" for i in range(300)]
    pool_emb = _unit(rng.normal(size=(300, 48))).astype(np.float32)
    clf = _unit(rng.normal(size=(10, 48))).T.astype(np.float32)
    atlas = report(dec, images, pool=(texts, pool_emb), labels=rng.integers(0, 10, 64),
                   classifier=clf, n_show=6, views=8, rank=48)
    assert len(atlas.data["heads"]) == 144
    size = len(atlas.html().encode())
    assert size < 3_000_000, size                  # the module's stated budget
    m = atlas.data["heads"][0]["top"][0]["map"]
    assert m["g"] == [14, 14]


def test_repr_html_is_an_isolated_iframe(world):
    out = world.atlas._repr_html_()
    assert out.startswith("<iframe srcdoc=") and out.endswith("</iframe>")
    src = re.match(r'<iframe srcdoc="(.*?)" style=', out, re.DOTALL).group(1)
    assert html.unescape(src) == world.atlas.html()
    assert "Atlas(model: 36 head cards" in repr(world.atlas)


def test_quantise_round_trip():
    a = np.linspace(-3, 2, 49).reshape(7, 7)
    m = quantise(a)
    assert m["g"] == [7, 7] and m["s"] == 3.0
    assert np.abs(dequantise(m) - a).max() <= 3 / 254 + 1e-12
    assert dequantise(quantise(np.zeros((2, 2)))).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="NaN"):
        quantise(np.array([np.nan]))


def test_bad_input_is_refused(world, tmp_path):
    dec, imgs = world.dec, world.batch.images
    pool = (world.texts, world.pool_emb)
    with pytest.raises(ValueError, match="15 images for a decomposition of 16"):
        report(dec, imgs[:15], pool=pool)
    with pytest.raises(ValueError, match="labels must be 16 integers"):
        report(dec, imgs, pool=pool, labels=np.zeros(3, int), classifier=world.clf)
    with pytest.raises(ValueError, match="classifier must be"):
        report(dec, imgs, pool=pool, classifier=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="out of range"):
        report(dec, imgs, pool=pool, classifier=world.clf, labels=np.full(16, 99))
    with pytest.raises(ValueError, match="needs a classifier"):
        report(dec, imgs, pool=pool, texts=["a"], repair={"heads": [(5, 0)],
                                                          "means": world.means})
    with pytest.raises(ValueError, match="needs means"):
        report(dec, imgs, pool=pool, classifier=world.clf, repair={"heads": [(5, 0)]})
    with pytest.raises(ValueError, match="not a clipdecomp store"):
        report(tmp_path, pool=pool)
    with pytest.raises(TypeError, match="takes a Decomposition"):
        report(np.zeros((3, 4)), pool=pool)
    with pytest.raises(FileNotFoundError, match="no such pool file"):
        report(dec, imgs, pool=str(tmp_path / "nope.txt"), classifier=world.clf)
    with pytest.raises(ValueError, match="views"):
        report(dec, imgs, pool=pool, classifier=world.clf, views=[99])
    with pytest.raises(ValueError, match="needs texts= or a classifier"):
        report(dec, imgs, pool=pool)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        world.atlas.save(tmp_path / "missing" / "a.html")


def test_no_spatial_terms_says_so(world):
    """Without tokens and without pixels, the cards say that maps are unavailable."""
    sub = world.model.decompose(list(world.batch.images[:6]), keep_pixels=False)
    atlas = report(sub, world.batch.images[:6], pool=(world.texts, world.pool_emb),
                   classifier=world.clf, heads=[(5, 0), (4, 2)], n_show=2, views=1)
    card = atlas.data["heads"][0]
    assert "map" not in card["top"][0] and "no head maps" in card["maps_note"]
    assert "maps" not in atlas.data["views"][0] and atlas.data["views"][0]["maps_note"]
    assert [c["id"] for c in atlas.data["heads"]] == ["L4.H2", "L5.H0"]
    # with the pixels kept, probe() computes the same maps the tokens give
    again = world.model.decompose(list(world.batch.images[:6]))
    atlas2 = report(again, None, pool=(world.texts, world.pool_emb), classifier=world.clf,
                    heads=[(5, 0)], n_show=2, views=1)
    item = atlas2.data["heads"][0]["top"][0]
    tokens = world.dec.tokens[item["row"], 5, 1:, 0].astype(np.float64)
    u = _unit(world.model.encode_text([atlas2.data["heads"][0]["direction"]])[0])
    np.testing.assert_allclose(dequantise(item["map"]), (tokens @ u).reshape(8, 8),
                               atol=np.abs(tokens @ u).max() / 254 + 1e-6)


# ------------------------------------------------------------------------------ stores, CLI

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A class-per-folder set of 20 scenes (by colour) in a store keeping the last two layers."""
    root = tmp_path_factory.mktemp("scenes")
    batch = toy.generate(20, seed=11, n_objects=1)
    for i, (img, c) in enumerate(zip(batch.images, batch.labels["color"][:, 0])):
        d = root / "src" / toy.COLORS[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"s{i:02d}.png")
    from clipdecomp.data.runner import run_dataset
    from clipdecomp.engine.loading import ModelSpec

    out = root / "scenes.zarr"
    reader = run_dataset(ModelSpec(str(toy.MODEL_DIR)), root / "src", out, chunk_size=8,
                         layers="-2:", progress=False)
    return reader, out


def test_store_atlas_reads_what_it_needs(world, store):
    reader, _ = store
    means = clipdecomp.component_means(reader.stats)
    atlas = report(reader, pool=(world.texts, world.pool_emb), model=world.model, n_show=4,
                   views=2, repair={"heads": [(5, 0), (4, 3)], "means": means})
    d = atlas.data
    assert sorted({c["layer"] for c in d["heads"]}) == [4, 5] and len(d["heads"]) == 12
    assert d["ablation"] is None and "keeps layers [4, 5]" in d["ablation_note"]
    assert d["images"]["count"] == 20 and d["zero_shot"]["classes"] == len(reader.classes)
    heads = np.asarray(reader.heads[:], np.float64)                   # [N, 2, H, D]
    emb = np.asarray(reader.embedding[:], np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.asarray(reader.labels[:])
    for card in d["heads"]:
        u = _unit(world.model.encode_text([card["direction"]])[0])
        p = heads[:, card["layer"] - 4, card["head"]] @ u
        assert [t["row"] for t in card["top"]] == np.argsort(-p, kind="stable")[:4].tolist()
        assert "map" in card["top"][0]                 # computed again from the source images
    names = reader.classes
    clf = clipdecomp.zero_shot_classifier(world.model, names)
    assert d["zero_shot"]["accuracy"] == pytest.approx(
        np.mean((emb @ clf).argmax(1) == labels), abs=1e-6)
    for v in d["views"]:
        for t in range(len(v["texts"])):
            total = sum(v["contributions"][t]) + v["mlps"][t] + v["other_heads"][t]
            assert total == pytest.approx(v["similarity"][t], abs=5e-6)   # rounding of 14 numbers
            dvec = _unit(clf[:, names.index(v["texts"][t])])
            assert v["similarity"][t] == pytest.approx(emb[v["row"]] @ dvec, abs=1e-4)
            want = np.einsum("lhd,d->lh", heads[v["row"]], dvec).ravel()
            np.testing.assert_allclose(v["contributions"][t], want, atol=2e-6, rtol=1e-4)
        assert v["label"] == names[labels[v["row"]]]
    # the repair: L5.H0 and L4.H3 at the store's means (stored layers 4, 5 are positions 0, 1)
    mh = reader.stats.head_sum / reader.stats.n
    rep = emb - heads[:, 1, 0] - heads[:, 0, 3] + mh[5, 0] + mh[4, 3]
    rpred = (rep @ clf).argmax(1)
    assert d["zero_shot"]["repaired_accuracy"] == pytest.approx(np.mean(rpred == labels))
    for v in d["views"]:
        assert v["repaired"] == names[rpred[v["row"]]]
    # the thumbnails are the listed source files, re-read
    assert all(name.endswith(".png") for name in d["names"].values())


def test_store_refuses_another_model(world, store):
    reader, _ = store
    other = types.SimpleNamespace(config=types.SimpleNamespace(
        layers=12, heads=12, embed_dim=512, width=768, image_size=224, patch_size=16))
    with pytest.raises(ValueError, match="is not the store's"):
        report(reader, pool=(world.texts, world.pool_emb), model=other)


def test_cli_report(store, tmp_path):
    _, path = store
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPDECOMP_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "atlas.html"
    p = subprocess.run([sys.executable, "-m", "clipdecomp", "report", str(path), "--pool",
                        "default", "--out", str(out), "--n-show", "3", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert str(out.resolve()) in p.stdout
    data = _embedded_json(out.read_text(encoding="utf-8"))
    assert len(data["heads"]) == 12 and data["textspan"]["pool"] > 4000
    # the shipped pool's section titles are the roles
    assert all(c["role"] for c in data["heads"])
    p = subprocess.run([sys.executable, "-m", "clipdecomp", "report", str(tmp_path),
                        "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 2 and "not a clipdecomp store" in p.stderr


# ------------------------------------------------------------------------------ the browser

def _chromium() -> str | None:
    for name in (os.environ.get("CLIPDECOMP_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = _chromium()
    if exe is None:
        if os.environ.get("CLIPDECOMP_REQUIRE_BROWSER"):
            pytest.fail("CLIPDECOMP_REQUIRE_BROWSER is set but no Chromium binary was found")
        pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome) on PATH")
    return exe


def _run_chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", "--mute-audio",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=15000", *args]
    # the browser is not ours: no sanitizer runtime preloaded into it (tests/sanitize.sh)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS",
                                                            "UBSAN_OPTIONS")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False,
                          env=env)


def _selftest(exe: str, path: Path, tmp: Path) -> dict:
    p = _run_chromium(exe, tmp, "--dump-dom", path.resolve().as_uri() + "#selftest")
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'<pre id="atlas-selftest"[^>]*data-done="1"[^>]*>(.*?)</pre>', p.stdout, re.DOTALL)
    assert m, "the page's self-test did not finish:\n" + p.stdout[-2000:]
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.browser
def test_browser_renders_every_card_and_image(world, chromium, tmp_path):
    path = world.atlas.save(tmp_path / "atlas.html")
    r = _selftest(chromium, path, tmp_path)
    assert r["errors"] == []
    assert r["images"] > 0 and r["broken"] == 0
    cards = {c["id"]: c for c in r["cards"]}
    for card in world.atlas.data["heads"]:
        got = cards[card["id"]]
        assert got["found"] and got["texts"] == len(card["texts"])
        want = len(card["top"]) + len(card["bottom"]) + len(card["nearest"]["rows"]) + 1
        assert got["images"] == want
        assert got["maps"] == len(card["top"]) + len(card["bottom"])
    for v, got in zip(world.atlas.data["views"], r["views"]):
        assert got["found"] and got["row"] == v["row"] and got["maps"] == len(v["texts"])
        assert got["bars"] == 10 + 1 + 10 + 1     # 10 largest, the rest summed, 10 smallest, MLPs
    assert r["canvases"] == r["drawn"] == r["painted"] > 0
    assert r["click"]["cell"] and r["click"]["visible"]
    assert r["click"]["shown"] == r["click"]["target"]
    # the search box dims the heads none of whose texts contain the query
    q = r["find"]["query"].lower()
    hits = sum(any(q in t["text"].lower() for t in c["texts"]) for c in world.atlas.data["heads"])
    assert r["find"]["first"] and r["find"]["dimmed"] == 36 - hits


@pytest.mark.browser
def test_browser_screenshot_is_not_blank(world, chromium, tmp_path):
    path = world.atlas.save(tmp_path / "atlas.html")
    shot = tmp_path / "atlas.png"
    p = _run_chromium(chromium, tmp_path, "--window-size=1400,1000", f"--screenshot={shot}",
                      path.resolve().as_uri() + "#head=L5.H0")
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert im.shape[:2] == (1000, 1400)
    assert im.std() > 20                               # not one flat colour
    # the dark header bar, and colour (thumbnails, the grid) somewhere below it
    assert im[:20].mean() < 80
    sat = im.max(axis=2) - im.min(axis=2)
    assert (sat > 60).mean() > 0.02


@pytest.mark.browser
def test_browser_store_atlas(world, store, chromium, tmp_path):
    reader, _ = store
    atlas = report(reader, pool=(world.texts, world.pool_emb), model=world.model, n_show=3,
                   views=2)
    r = _selftest(chromium, atlas.save(tmp_path / "store.html"), tmp_path)
    assert r["errors"] == [] and r["broken"] == 0
    assert all(c["found"] for c in r["cards"]) and len(r["cards"]) == 12
    assert r["click"]["shown"] == r["click"]["target"]


@pytest.mark.browser
def test_browser_catches_a_broken_image_and_a_script_error(world, chromium, tmp_path):
    """The self-test can fail: a thumbnail that is not an image, and a card the script cannot
    draw, are both reported."""
    import copy

    data = copy.deepcopy(world.atlas.data)
    first = next(iter(data["thumbs"]))
    data["thumbs"][first] = "data:image/webp;base64,bm90IGFuIGltYWdl"
    del data["heads"][3]["hist"]
    r = _selftest(chromium, Atlas(data).save(tmp_path / "bad.html"), tmp_path)
    assert r["broken"] > 0
    assert any("failed to load IMG" in e for e in r["errors"])
    assert any("start:" in e for e in r["errors"])


def test_view_with_given_texts(world):
    texts = ["a red object", "a scene on grass", "a circle"]
    atlas = report(world.dec, world.batch.images, pool=(world.texts, world.pool_emb),
                   texts=texts, heads=[(5, 1)], n_show=2, views=[2])
    v = atlas.data["views"][0]
    assert v["texts"] == texts and "predicted" not in v
    t = _unit(world.model.encode_text(texts))
    emb = _unit(world.model.encode_image([world.batch.images[2]])[0])
    np.testing.assert_allclose(v["similarity"], t @ emb, atol=1e-4)
    want = np.einsum("lhd,td->tlh", world.dec.heads[2].astype(np.float64), t).reshape(3, -1)
    np.testing.assert_allclose(v["contributions"], want, atol=2e-6, rtol=1e-4)
    assert atlas.data["zero_shot"] is None and "no labels" in atlas.data["ablation_note"]


def test_texts_cannot_break_out_of_the_page(world):
    import copy

    data = copy.deepcopy(world.atlas.data)
    evil = "</script><script>alert(1)</script><!--"
    data["heads"][0]["texts"][0]["text"] = evil
    data["title"] = evil
    page = Atlas(data).html()
    template = (Path(clipdecomp.__file__).parent / "viz" / "atlas_template.html").read_text()
    assert page.count("</script>") == template.count("</script>")
    assert "<!--" not in page
    assert _embedded_json(page)["heads"][0]["texts"][0]["text"] == evil


@pytest.mark.browser
def test_browser_renders_the_notebook_iframe(world, chromium, tmp_path):
    """What Jupyter shows: the page inside its srcdoc iframe, scripts running there."""
    page = ("<!DOCTYPE html><html><body><p>cell output</p>" + world.atlas._repr_html_()
            + '<pre id="out"></pre><script>window.addEventListener("load", function () {'
            ' var d = document.querySelector("iframe").contentDocument;'
            ' var imgs = Array.prototype.slice.call(d.images);'
            ' document.getElementById("out").textContent = JSON.stringify({'
            ' cards: d.querySelectorAll(".head-card").length,'
            ' active: d.querySelectorAll(".head-card.active").length,'
            ' images: imgs.length, loaded: imgs.filter(function (i) {'
            ' return i.naturalWidth > 0; }).length}); });</script></body></html>')
    path = tmp_path / "notebook.html"
    path.write_text(page, encoding="utf-8")
    p = _run_chromium(chromium, tmp_path, "--dump-dom", path.resolve().as_uri())
    m = re.search(r'<pre id="out">(.*?)</pre>', p.stdout, re.DOTALL)
    assert m and m.group(1), p.stdout[-2000:]
    r = json.loads(html.unescape(m.group(1)))
    assert r["cards"] == len(world.atlas.data["heads"]) and r["active"] == 1
    assert r["images"] > 0 and r["loaded"] == r["images"]


def test_cli_report_store_without_model_path(world, store, tmp_path):
    """A store made from a model object records no path: the command asks for --model."""
    from clipdecomp.data.runner import run_dataset

    reader, _ = store
    src = Path(reader.metadata["source"]["root"])
    out_store = tmp_path / "nopath.zarr"
    run_dataset(world.model, src, out_store, chunk_size=8, layers="-1:", progress=False)
    pool = tmp_path / "pool.txt"
    pool.write_text("# colours\n" + "\n".join(world.texts[:60]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPDECOMP_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "a.html"
    cmd = [sys.executable, "-m", "clipdecomp", "report", str(out_store), "--pool", str(pool),
           "--out", str(out), "--no-progress", "--texts", "a red object|a scene on grass"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 2 and "pass --model" in p.stderr
    p = subprocess.run(cmd + ["--model", "embedded"], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _embedded_json(out.read_text(encoding="utf-8"))
    assert len(data["heads"]) == 6 and data["textspan"]["pool"] == 60
    assert data["views"][0]["texts"] == ["a red object", "a scene on grass"]
    assert {c["role"] for c in data["heads"]} == {"colours"}      # the pool file's section
