"""The atlas: one self-contained HTML file of heads, texts, images and maps.

:func:`report` gathers, with clipdecomp's own functions, what an interpretability researcher
looks at first, and :class:`Atlas` writes it as one HTML file (thumbnails inline as WebP or
JPEG, numbers as embedded JSON, a little plain JavaScript; no server, no network, opens from
``file://``) that also renders inline in Jupyter.

* Overview: the model, the images (count, source), zero-shot accuracy when labels exist, the
  mean-ablation curve (:func:`~clipdecomp.methods.ablation.ablation_study`), and a layer x head grid
  coloured by each head's TextSpan role and variance explained; a click opens the head's card.
* Head card: the head's TextSpan texts (:func:`~clipdecomp.methods.textspan.textspan_heads`) with the
  share of variance each explains; the top and bottom images by the head's term projected on
  the unit embedding of its first text, with the head's map along that text over them
  (:func:`~clipdecomp.methods.spatial.head_map`, computed for the shown images only); the images nearest
  to the top image by this head alone (:class:`~clipdecomp.methods.retrieval.HeadIndex`); a histogram
  of the projection over all images.
* Image view: for one image and a few texts (the classifier's most likely classes, or texts
  given), each head's contribution to the image-text similarity ``heads[l, h] . text`` as a
  sorted bar chart (with the MLPs beside: all terms add up to the cosine similarity), the
  per-text heat maps (:func:`~clipdecomp.methods.spatial.heatmap`), the predicted class and the class
  a repaired model (mean-ablated heads, :func:`~clipdecomp.methods.ablation.ablate`) would give.
* Neuron cards, once stores hold neuron effects (:func:`neuron_cards` is the hook; it returns
  nothing today).

Size budget: the file holds the page (30 KB), each image shown anywhere once (a WebP
thumbnail of ``thumb_size`` px: 1-6 KB) and, per head card, ``2 * n_show`` maps quantised to
one byte a patch plus a few hundred numbers. The budget, held by the tests: **under 1 MB for
36 heads x 16 images** (the embedded model: about 0.2 MB), **under 3 MB for 144 heads x 64
images** with 14 x 14 maps and noisy 224-pixel images (a ViT-B/16: about 1.2 MB).

Shapes: N images, L layers, H heads, D embedding dim, G patches per side, T texts.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Atlas", "neuron_cards", "pool_categories", "report"]

_TEMPLATE = Path(__file__).resolve().parent / "atlas_template.html"
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
            "#9c755f", "#ff9da7", "#bab0ac")
_BATCH = 16            # images per forward pass when head maps are computed again
_HIST_BINS = 30


# --------------------------------------------------------------------------------------------
# the result

class Atlas:
    """An atlas: the embedded data and the page that draws it.

    Attributes
    ----------
    data : dict
        Everything the page shows (JSON-ready): ``model``, ``images``, ``zero_shot``,
        ``ablation``, ``heads`` (one card each), ``views`` (one image view each),
        ``thumbs`` (data URIs by image row), ``neurons``.

    Examples
    --------
    >>> atlas = clipdecomp.report(dec, images, pool=(texts, pool_emb))   # doctest: +SKIP
    >>> atlas                                    # in Jupyter: the page itself # doctest: +SKIP
    >>> atlas.save("atlas.html")                                          # doctest: +SKIP
    """

    def __init__(self, data: dict):
        self.data = data

    def html(self) -> str:
        """The whole page as one string (what :meth:`save` writes).

        Examples
        --------
        >>> page = atlas.html()                                           # doctest: +SKIP
        >>> page.startswith("<!DOCTYPE html>")                             # doctest: +SKIP
        True
        """
        text = json.dumps(self.data, separators=(",", ":"), allow_nan=False)
        # inside <script>: no "</script>", no "<!--"
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        page = _TEMPLATE.read_text(encoding="utf-8")
        title = html.escape(self.data.get("title") or "clipdecomp atlas")
        return page.replace("__ATLAS_TITLE__", title).replace("__ATLAS_DATA__", text)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (one self-contained file); returns the path.

        Examples
        --------
        >>> atlas.save("atlas.html")                                      # doctest: +SKIP
        PosixPath('atlas.html')
        """
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise FileNotFoundError(f"{path.parent}: no such folder for the atlas")
        path.write_text(self.html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # an iframe keeps the page's script and styles apart from the notebook's
        doc = html.escape(self.html(), quote=True)
        return (f'<iframe srcdoc="{doc}" style="width:100%;height:860px;border:1px solid #ddd;'
                'border-radius:4px"></iframe>')

    def __repr__(self) -> str:
        d = self.data
        return (f"Atlas({d['model']['name']}: {len(d['heads'])} head cards, "
                f"{len(d['views'])} image views, {len(d['thumbs'])} thumbnails, "
                f"{len(self.html()) / 1e6:.2f} MB)")


# --------------------------------------------------------------------------------------------
# small helpers

def _r(x: float, digits: int = 6) -> float:
    """A float rounded to ``digits`` significant digits (JSON size); NaN and inf refused."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x} in the atlas data")
    return float(f"{x:.{digits}g}")


def quantise(a: np.ndarray) -> dict:
    """A map as one signed byte a value: ``{"s": scale, "q": base64 int8}``.

    ``value = q / 127 * s`` (error at most ``s / 254``).

    Examples
    --------
    >>> m = quantise(np.array([[0.5, -1.0]]))
    >>> m["s"], dequantise(m).tolist()
    (1.0, [[0.5039370078740157, -1.0]])
    """
    a = np.asarray(a, np.float64)
    if not np.isfinite(a).all():
        raise ValueError("a map holds NaN or infinite values")
    s = float(np.abs(a).max()) if a.size else 0.0
    q = np.zeros(a.shape, np.int8) if s == 0 else np.round(a / s * 127).astype(np.int8)
    return {"s": _r(s), "g": list(a.shape), "q": base64.b64encode(q.tobytes()).decode("ascii")}


def dequantise(m: dict) -> np.ndarray:
    """The float64 map of :func:`quantise` (example there)."""
    q = np.frombuffer(base64.b64decode(m["q"]), np.int8).astype(np.float64)
    return (q / 127.0 * m["s"]).reshape(m["g"])


def _thumb_uri(img: Any, size: int) -> str:
    """A data URI of a small WebP (JPEG where Pillow lacks WebP) thumbnail."""
    from PIL import ImageOps, features

    from clipdecomp.engine.preprocess import load_image

    # the centre square, as the model's preprocessing crops it, so that maps line up
    im = load_image(img)
    side = min(size, *im.size)                  # never enlarged
    im = ImageOps.fit(im, (side, side))
    buf = io.BytesIO()
    if features.check("webp"):
        im.save(buf, format="WEBP", quality=80, method=4)
        mime = "image/webp"
    else:  # pragma: no cover - Pillow built without libwebp
        im.save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _placeholder(size: int) -> Any:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (225, 225, 225))
    d = ImageDraw.Draw(im)
    d.line((0, 0, size, size), fill=(170, 170, 170), width=2)
    d.line((0, size, size, 0), fill=(170, 170, 170), width=2)
    return im


def pool_categories(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The section title of every text of a description pool (its ``#`` lines).

    The shipped pool groups its descriptions under titles ("colours", "textures and
    patterns", ...); the atlas colours each head by the title most of its texts share.

    Parameters
    ----------
    path : path, optional
        A pool file (default: the shipped pool).

    Returns
    -------
    dict
        text -> title of the section it is in (texts before any title are left out).

    Examples
    --------
    >>> cats = pool_categories()
    >>> cats["Something bright red"], sorted(set(cats.values()))[:2]
    ('colours', ['animals', 'art movements'])
    """
    from clipdecomp.data.text_pool import DEFAULT_POOL

    out: dict[str, str] = {}
    section = None
    with open(DEFAULT_POOL if path is None else path, encoding="utf-8") as f:
        for line in f:
            t = line.strip()
            if t.startswith("#"):
                section = t.lstrip("#").strip() or None
            elif t and section is not None:
                out.setdefault(t, section)
    return out


def _resolve_pool(pool: Any, model: Any, progress: bool) -> tuple[list[str], np.ndarray, dict]:
    """(texts [M], unit embeddings [M, D], text -> category) from what ``report`` accepts."""
    from clipdecomp.data.text_pool import encode_pool, load_pool

    cats: dict[str, str] = {}
    if isinstance(pool, tuple) and len(pool) == 2:
        texts, emb = list(pool[0]), np.asarray(pool[1], np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"pool=(texts, embeddings) needs embeddings [{len(texts)}, D]; got "
                             f"shape {emb.shape}")
        return texts, emb, cats
    if pool is None or (isinstance(pool, str) and pool == "default"):
        texts = load_pool()
        cats = pool_categories()
    elif isinstance(pool, (str, os.PathLike)):
        if not os.path.isfile(pool):
            raise FileNotFoundError(f"{pool}: no such pool file (give 'default' for the "
                                    "shipped pool, or a text file with one description a line)")
        texts = load_pool(pool)
        cats = pool_categories(pool)
    else:
        texts = [str(t) for t in pool]
    if not texts:
        raise ValueError("the text pool is empty")
    if model is None:
        raise ValueError("encoding the text pool needs a model: pass model=..., or "
                         "pool=(texts, embeddings)")
    return texts, encode_pool(model, texts, progress=progress), cats


def _head_roles(results: dict, roles: Any, cats: dict, top: int) -> dict:
    """(layer, head) -> role: given directly, or the category most of the first texts share."""
    if isinstance(roles, dict) and roles and all(isinstance(k, tuple) for k in roles):
        return {(int(k[0]), int(k[1])): (None if v is None else str(v)) for k, v in roles.items()}
    tag = dict(cats)
    if isinstance(roles, dict):
        tag.update({str(k): str(v) for k, v in roles.items()})
    if not tag:
        return {}
    out = {}
    for key, res in results.items():
        kinds = [tag[t] for t in list(res.texts)[:top] if t in tag]
        out[key] = Counter(kinds).most_common(1)[0][0] if kinds else None
    return out


# --------------------------------------------------------------------------------------------
# where the terms come from: a decomposition in memory, or a store read chunk by chunk

class _DecSource:
    """A Decomposition (or anything with its arrays) held in memory: one chunk."""

    def __init__(self, dec: Any, images: Any, model: Any):
        self.dec = dec
        self.config = dec.config
        self.n_layers, self.n_heads = int(self.config.layers), int(self.config.heads)
        self.n = len(dec)
        self.kept = tuple(range(self.n_layers))
        self.model = model if model is not None else getattr(dec, "_model", None)
        if images is not None:
            images = list(images)
            if len(images) != self.n:
                raise ValueError(f"{len(images)} images for a decomposition of {self.n}")
        elif getattr(dec, "pixels", None) is None:
            raise ValueError("the atlas shows thumbnails: pass images=[...] (the decomposed "
                             "images), or decompose with keep_pixels=True")
        self.images = images
        self.source = f"{self.n} images in memory"

    def iter_layer(self, layer: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield np.arange(self.n), np.asarray(self.dec.heads[:, layer], np.float32)

    def iter_full(self) -> Iterator[tuple[np.ndarray, dict]]:
        yield np.arange(self.n), self.take(np.arange(self.n))

    def take(self, rows: np.ndarray) -> dict:
        d = self.dec
        rows = np.asarray(rows, np.int64)
        return {"heads": np.asarray(d.heads[rows]), "mlps": np.asarray(d.mlps[rows]),
                "cls_to_cls": np.asarray(d.cls_to_cls[rows]),
                "embedding": np.asarray(d.embedding[rows]), "norm": np.asarray(d.norm[rows])}

    def head_terms(self, rows: np.ndarray, layer: int, head: int) -> np.ndarray:
        return np.asarray(self.dec.heads[np.asarray(rows, np.int64), layer, head], np.float32)

    def image(self, row: int) -> Any:
        if self.images is not None:
            return self.images[row]
        c = self.config                      # undo the normalisation of the kept pixels
        px = np.asarray(self.dec.pixels[row], np.float64).transpose(1, 2, 0)
        px = px * np.asarray(c.std) + np.asarray(c.mean)
        return np.clip(np.round(px * 255), 0, 255).astype(np.uint8)

    def name(self, row: int) -> str:
        return f"image {row}"

    def spatial(self, rows: np.ndarray) -> Any:
        """A decomposition of these rows whose ``probe`` works (tokens or pixels kept)."""
        return self.dec[[int(r) for r in rows]]


class _StoreSource:
    """A data-set store: layers, statistics and rows read as needed, in flat memory."""

    def __init__(self, store: Any, model: Any):
        self.store = store
        self.config = store.config
        sh = store.metadata["shapes"]
        self.n_layers, self.n_heads = int(sh["layers"]), int(sh["heads"])
        self.n = store.n
        self.kept = tuple(int(x) for x in store.layers)
        self.model = model
        mc = getattr(model, "config", None)
        if mc is not None:
            want = {k: store.metadata["model"]["config"].get(k) for k in
                    ("layers", "heads", "embed_dim", "width", "image_size", "patch_size")}
            have = {k: getattr(mc, k, None) for k in want}
            if want != have:
                raise ValueError(f"the model ({have}) is not the store's ({want})")
        src = store.metadata["source"]
        self.root = src.get("root") or ""
        self.source = f"{src.get('layout', '?')} {self.root}"
        self._paths: dict[int, str] = {}

    def iter_layer(self, layer: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, c in self.store.iter_chunks(["heads"], layers=[layer], valid_only=True):
            yield rows, c["heads"][:, 0]

    def iter_full(self) -> Iterator[tuple[np.ndarray, dict]]:
        fields = ["embedding", "heads", "mlps", "cls_to_cls", "norm"]
        yield from self.store.iter_chunks(fields, valid_only=True)

    def take(self, rows: np.ndarray) -> dict:
        d = self.store.decomposition(np.asarray(rows, np.int64))
        for r, p in zip(d.rows.tolist(), d.paths.tolist()):
            self._paths[int(r)] = str(p)
        return {"heads": d.heads, "mlps": d.mlps, "cls_to_cls": d.cls_to_cls,
                "embedding": d.embedding, "norm": d.norm}

    def head_terms(self, rows: np.ndarray, layer: int, head: int) -> np.ndarray:
        d = self.store.decomposition(np.asarray(rows, np.int64), layers=[layer])
        return d.heads[:, 0, head]

    def _path(self, row: int) -> str:
        if row not in self._paths:
            self._paths[row] = str(self.store.paths[row])
        return os.path.join(self.root, self._paths[row])

    def image(self, row: int) -> Any:
        return self._path(row)               # loaded when its thumbnail is made

    def name(self, row: int) -> str:
        return self._paths.get(row) or str(self.store.paths[row])

    def spatial(self, rows: np.ndarray) -> Any:
        if self.model is None:
            raise ValueError("the store keeps no per-token terms, and no model was given to "
                             "compute them again for the images shown")
        from clipdecomp.engine.preprocess import load_image

        return self.model.decompose([load_image(self._path(int(r))) for r in rows])


def _open_source(source: Any, images: Any, model: Any):
    from clipdecomp.data.store import StoreReader, is_store

    if isinstance(source, (str, os.PathLike)):
        if not is_store(source):
            raise ValueError(f"{source} is not a clipdecomp store (made by clipdecomp run)")
        source = StoreReader(source)
    if isinstance(source, StoreReader):
        if images is not None:
            raise ValueError("a store reads its own images from the source it lists; "
                             "images= is for decompositions")
        return _StoreSource(source, model)
    if not all(hasattr(source, a) for a in ("heads", "mlps", "embedding", "config")):
        raise TypeError("report() takes a Decomposition, a StoreReader or a store path; got "
                        f"{type(source).__name__}")
    return _DecSource(source, images, model)


# --------------------------------------------------------------------------------------------
# the numbers

def _textspan(src: Any, pool_texts: list, pool_emb: np.ndarray, heads: Any, n_texts: int,
              rank: int, progress: bool) -> dict:
    from clipdecomp.methods.textspan import textspan_heads

    pairs = None
    if heads is not None:
        pairs = [(int(l_) % src.n_layers, int(h)) for l_, h in heads]
        missing = [p for p in pairs if p[0] not in src.kept]
        if missing:
            raise ValueError(f"heads {missing} are in layers the store does not keep "
                             f"({list(src.kept)})")
    if isinstance(src, _StoreSource):
        st = src.store.stats
        if st.n < 2:
            raise ValueError(f"the store's statistics cover {st.n} images; TextSpan needs two")
        df = textspan_heads(st, pool_emb, pool_texts, layers=src.kept, n_texts=n_texts,
                            rank=rank, progress=progress, heads=pairs)
    else:
        df = textspan_heads(src.dec, pool_emb, pool_texts, layers=src.kept, n_texts=n_texts,
                            rank=rank, progress=progress, heads=pairs)
    return df.attrs["results"]


def _projections(src: Any, dirs: dict) -> tuple[np.ndarray, dict]:
    """rows [N'] (valid) and, per head, the projection of its term on its direction [N']."""
    out: dict = {k: [] for k in dirs}
    rows_all = None
    for layer in sorted({k[0] for k in dirs}):
        hs = [k for k in dirs if k[0] == layer]
        u = np.stack([dirs[k] for k in hs]).astype(np.float64)        # [h, D]
        rows_parts = []
        for rows, heads in src.iter_layer(layer):                     # heads [C, H, D]
            sel = heads[:, [k[1] for k in hs]].astype(np.float64)     # [C, h, D]
            p = np.einsum("chd,hd->hc", sel, u)
            for i, k in enumerate(hs):
                out[k].append(p[i])
            rows_parts.append(rows)
        rows_l = np.concatenate(rows_parts)
        if rows_all is None:
            rows_all = rows_l
        elif not np.array_equal(rows_all, rows_l):  # pragma: no cover - one listing per store
            raise RuntimeError("the store's valid rows differ between layers")
    assert rows_all is not None
    return rows_all, {k: np.concatenate(v) for k, v in out.items()}


def _nearest(src: Any, queries: dict, k: int) -> dict:
    """Per head: the k rows nearest its query row by the head's term alone (cosine).

    A :class:`~clipdecomp.methods.retrieval.HeadIndex` answers each chunk (exact top-k); the chunks'
    answers are merged, so memory stays one chunk whatever the number of images.
    """
    from clipdecomp.methods.retrieval import HeadIndex

    out = {}
    for layer in sorted({key[0] for key in queries}):
        hs = [key for key in queries if key[0] == layer]
        qvec = {key: src.head_terms(np.array([queries[key]]), *key)[0] for key in hs}
        best: dict = {key: ([], []) for key in hs}
        for rows, heads in src.iter_layer(layer):
            for key in hs:
                index = HeadIndex.build(heads[:, None, key[1]][:, :, None], heads=(0, 0))
                excl = np.flatnonzero(rows == queries[key])
                idx, sc = index.query(qvec[key], k=k, exclude=excl.tolist())
                best[key][0].extend(rows[idx].tolist())
                best[key][1].extend(sc.tolist())
        for key in hs:
            r, s = np.asarray(best[key][0], np.int64), np.asarray(best[key][1], np.float64)
            order = np.lexsort((r, -s))[:k]
            out[key] = (r[order], s[order])
    return out


def _head_maps(src: Any, want: list, dirs: dict) -> tuple[dict, str | None]:
    """(row, (layer, head)) -> map [G, G] of the head along its direction, for the shown rows.

    ``dec.project_tokens`` (per-token terms, or the forward pass run again on the kept pixels) on the
    directions the images of a batch need; equal to :func:`~clipdecomp.methods.spatial.head_map` of
    each (layer, head) and direction.
    """
    per_row: dict = {}
    for r, key in want:
        per_row.setdefault(r, []).append(key)
    rows = sorted(per_row)
    out = {}
    g = math.isqrt(int(src.config.n_tokens) - 1)        # N = 1 + G*G
    notes = []
    for s in range(0, len(rows), _BATCH):
        batch = rows[s:s + _BATCH]
        keys = sorted({key for r in batch for key in per_row[r]})
        col = {k: i for i, k in enumerate(keys)}
        u = np.stack([dirs[k] for k in keys]).astype(np.float32)      # [K, D]
        try:
            p = np.asarray(src.spatial(np.asarray(batch)).project_tokens(u))   # [b, L, N, H, K]
        except (ValueError, FileNotFoundError) as e:                   # no tokens, no pixels
            notes.append(str(e))
            continue
        for i, r in enumerate(batch):
            for key in per_row[r]:
                out[(r, key)] = p[i, key[0], 1:, key[1], col[key]].reshape(g, g)
    if not notes:
        return out, None
    what = "no head maps" if not out else "head maps missing for some images"
    return out, f"{what}: {notes[0]}"


def _combine_acc(parts: list[tuple[float, int]]) -> float | None:
    n = sum(c for _, c in parts)
    return None if n == 0 else sum(a * c for a, c in parts) / n


def _accuracies(src: Any, labels: Any, classifier: np.ndarray, means: Any,
                repair: Any) -> tuple[dict, list | None, str | None]:
    """Zero-shot accuracy (and of the repaired embeddings), and the mean-ablation table,
    accumulated chunk by chunk (each is a mean over images)."""
    from clipdecomp.methods.ablation import ablation_study
    from clipdecomp.methods.zeroshot import accuracy

    zs: list[tuple[float, int]] = []
    rep: list[tuple[float, int]] = []
    table: dict[tuple[str, int], list[tuple[float, int]]] = {}
    note = None
    full = len(src.kept) == src.n_layers
    if not full:
        note = (f"the mean-ablation curve needs every layer's heads; the store keeps layers "
                f"{list(src.kept)}")
    for rows, c in src.iter_full():
        y = labels[rows]
        ok = y >= 0
        if not ok.any():
            continue
        c = {k: np.asarray(v)[ok] for k, v in c.items()}
        y = y[ok]
        emb = c["embedding"] / np.maximum(c["norm"], 1e-30)[:, None]
        zs.append((accuracy(emb, y, classifier, topk=1), len(y)))
        if repair is not None:
            rep.append((accuracy(_repaired(src, c, repair), y, classifier, topk=1), len(y)))
        if full:
            df = ablation_study(c, y, classifier, means)
            for name, la, acc in df.itertuples(index=False):
                table.setdefault((name, int(la)), []).append((acc, len(y)))
    out = {"accuracy": _combine_acc(zs), "n": int(sum(n for _, n in zs))}
    if repair is not None:
        out["repaired_accuracy"] = _combine_acc(rep)
    ablation = None
    if table:
        accs = {k: _combine_acc(v) for k, v in table.items()}
        ablation = [{"ablation": k[0], "layers_ablated": k[1],
                     "accuracy": None if acc is None else _r(acc)} for k, acc in accs.items()]
    return out, ablation, note


def _repair_spec(repair: Any, src: Any) -> dict | None:
    """``{"heads", "mlps", "cls_to_cls", "means"}`` from a RepairedCLIP or a dict."""
    if repair is None:
        return None
    if hasattr(repair, "spec") and hasattr(repair, "means"):
        spec = dict(repair.spec())
        spec["means"] = repair.means
    elif isinstance(repair, dict):
        spec = dict(repair)
        spec.setdefault("heads", [])
        if spec.get("means") is None:
            raise ValueError("repair={...} needs means=component_means(reference images)")
    else:
        raise TypeError("repair must be a RepairedCLIP (model.repaired(...)) or a dict with "
                        "heads=[(layer, head), ...] and means=...")
    spec["heads"] = [(int(a) % src.n_layers, int(b)) for a, b in spec.get("heads", [])]
    if len(src.kept) != src.n_layers:
        out = [h for h in spec["heads"] if h[0] not in src.kept]
        if out:
            raise ValueError(f"repair ablates heads {out} of layers the store does not keep")
        if spec.get("cls_to_cls"):
            raise ValueError("repairing class-to-class terms needs every layer in the store")
    return spec


def _repaired(src: Any, c: dict, spec: dict) -> np.ndarray:
    """Repaired embeddings [B, D] of rows with arrays ``c`` (:func:`~clipdecomp.methods.ablation.ablate`)."""
    from clipdecomp.methods.ablation import ComponentMeans, ablate

    means = spec["means"]
    heads = spec["heads"]
    if len(src.kept) != src.n_layers:    # the store's heads hold only the kept layers
        pos = {lay: i for i, lay in enumerate(src.kept)}
        means = ComponentMeans(np.asarray(means.heads)[list(src.kept)], means.mlps, None, means.n)
        heads = [(pos[a], b) for a, b in heads]
    return ablate(c, heads=heads, mlps=spec.get("mlps") or False,
                  cls_to_cls=spec.get("cls_to_cls") or False, means=means)


def neuron_cards(source: Any) -> list[dict]:
    """Neuron cards for the atlas: the hook for neuron effects, once stores hold them.

    No store or decomposition records neuron effects yet, so this returns an empty list and
    the atlas shows no neuron section. When they exist, each card is a dict ``{"id": "L3.N17",
    "texts": [{"text", "fraction"}], "top": [row, ...]}``, drawn like a head card.

    Examples
    --------
    >>> neuron_cards(None)
    []
    """
    effects = getattr(source, "neuron_effects", None)
    if effects is None:
        return []
    raise NotImplementedError("neuron effects are not drawn yet")  # pragma: no cover


def _classification(src: Any, labels: Any, classnames: Any, classifier: Any, templates: Any,
                    model: Any) -> tuple:
    """Checked (labels [N] or None, class names, classifier [D, C] or None)."""
    from clipdecomp.methods.zeroshot import zero_shot_classifier

    if isinstance(src, _StoreSource):
        if labels is None:
            labels = np.asarray(src.store.labels[:])
        if classnames is None and classifier is None:
            classnames = src.store.classes
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != src.n or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {src.n} integers (-1: no label); got "
                             f"{labels.dtype} of shape {labels.shape}")
    if classifier is None and classnames is not None:
        if model is None:
            raise ValueError("a zero-shot classifier from classnames needs model=...")
        classifier = zero_shot_classifier(model, list(classnames), templates=templates)
    if classifier is None:
        return labels, classnames, None
    classifier = np.asarray(classifier, np.float32)
    dim = int(src.config.embed_dim)
    if classifier.ndim != 2 or classifier.shape[0] != dim:
        raise ValueError(f"classifier must be [{dim}, C]; got {classifier.shape}")
    if classnames is None:
        classnames = [f"class {i}" for i in range(classifier.shape[1])]
    classnames = [str(c) for c in classnames]
    if len(classnames) != classifier.shape[1]:
        raise ValueError(f"{len(classnames)} class names for {classifier.shape[1]} classes")
    if labels is not None and labels.max(initial=-1) >= classifier.shape[1]:
        raise ValueError(f"label {int(labels.max())} out of range for "
                         f"{classifier.shape[1]} classes")
    return labels, classnames, classifier


def _directions(results: dict, pool_texts: list, pool_emb: Any, model: Any) -> dict:
    """(layer, head) -> the unit embedding [D] of the head's first TextSpan text."""
    dirs = {}
    for key, res in results.items():
        j = int(res.indices[0])
        if pool_emb is not None and j < len(pool_texts) and pool_texts[j] == res.texts[0]:
            v = np.asarray(pool_emb[j], np.float64)
        else:
            if model is None:
                raise ValueError("encoding the heads' first texts needs model=...")
            v = np.asarray(model.encode_text([res.texts[0]])[0], np.float64)
        dirs[key] = v / np.linalg.norm(v)
    return dirs


def _card(key: tuple, res: Any, role: Any, rows: np.ndarray, p: np.ndarray, top: np.ndarray,
          bottom: np.ndarray, nearest: tuple, maps: dict, maps_note: Any) -> dict:
    """One head card (JSON-ready)."""
    def item(i: int) -> dict:
        r = int(rows[i])
        out: dict[str, Any] = {"row": r, "value": _r(p[i])}
        if (r, key) in maps:
            out["map"] = quantise(maps[(r, key)])
        return out

    counts, edges = np.histogram(p, bins=_HIST_BINS)
    nr, ns = nearest
    return {
        "id": f"L{key[0]}.H{key[1]}", "layer": key[0], "head": key[1], "role": role,
        "variance_explained": _r(res.cumulative[-1]),
        "texts": [{"text": t, "fraction": _r(f)} for t, f in zip(res.texts, res.fraction)],
        "direction": res.texts[0],
        "top": [item(i) for i in top], "bottom": [item(i) for i in bottom],
        "nearest": {"query": int(rows[top[0]]), "rows": [int(r) for r in nr],
                    "scores": [_r(s) for s in ns]},
        "hist": {"edges": [_r(e) for e in edges], "counts": [int(c) for c in counts]},
        "maps_note": maps_note,
    }


def _thumbnails(src: Any, shown: set, size: int) -> tuple[dict, dict]:
    """Data URIs and names of the shown rows; a crossed grey square for unreadable files."""
    thumbs, names = {}, {}
    for r in sorted(shown):
        try:
            thumbs[str(r)] = _thumb_uri(src.image(r), size)
        except (FileNotFoundError, ValueError):
            thumbs[str(r)] = _thumb_uri(_placeholder(size), size)
        names[str(r)] = src.name(r)
    return thumbs, names


# --------------------------------------------------------------------------------------------
# the report

def report(
    source: Any,
    images: Sequence[Any] | np.ndarray | None = None,
    pool: Any = None,
    texts: Sequence[str] | None = None,
    labels: Any = None,
    classnames: Sequence[str] | None = None,
    *,
    model: Any = None,
    classifier: np.ndarray | None = None,
    templates: Iterable[Any] | None = None,
    heads: Iterable[tuple[int, int]] | None = None,
    textspan: Any = None,
    roles: dict | None = None,
    n_texts: int = 5,
    n_show: int = 6,
    views: int | Sequence[int] = 4,
    repair: Any = None,
    means: Any = None,
    rank: int = 80,
    thumb_size: int = 96,
    title: str | None = None,
    source_name: str | None = None,
    progress: bool = False,
) -> Atlas:
    """The atlas of a decomposition or a data-set store (see :mod:`clipdecomp.viz.atlas`).

    Parameters
    ----------
    source : Decomposition, StoreReader or path of a store
        The terms. A store is read chunk by chunk (flat memory); its statistics give TextSpan
        and the ablation means, and the images it shows are read again from the listed source.
    images : sequence of B images, optional
        With a decomposition: the images it was made from (paths, PIL images, uint8 arrays),
        for thumbnails. Default: the pixels the decomposition kept, de-normalised.
    pool : "default", path, list of str, or (texts, embeddings), optional
        TextSpan's description pool (default: the shipped pool, whose section titles become
        the heads' roles). Texts are encoded with ``model`` (cached, :func:`encode_pool`).
    texts : list of str, optional
        Texts of the image view. Default: the five classes each image scores highest.
    labels : ndarray int [B], optional
        Class labels (-1: none) for zero-shot accuracy and the ablation curve. A store's own
        labels are used by default.
    classnames : list of str, optional
        Class names for a zero-shot classifier (:func:`zero_shot_classifier` with
        ``templates``); a store's class names by default.
    model : CLIP, optional
        Encodes texts and computes head maps again where a store keeps no tokens. Default:
        the model the decomposition came from.
    classifier : ndarray [D, C], optional
        A ready classifier instead of ``classnames`` + ``model``.
    heads : list of (layer, head), optional
        The heads to give cards (default: all, or all of a store's kept layers).
    textspan : DataFrame, optional
        A :func:`textspan_heads` result to show instead of running TextSpan here.
    roles : dict, optional
        ``{(layer, head): role}``, or ``{text: category}`` (a head's role is then the category
        most of its first texts share).
    n_texts, rank : int
        TextSpan texts per head and projection rank.
    n_show : int
        Top, bottom and nearest images per head card.
    views : int or list of int
        How many image views (the first valid images), or which image rows.
    repair : RepairedCLIP or dict, optional
        A repaired model (``model.repaired(heads=..., means=...)``) or ``{"heads": [...],
        "means": ...}``: the image views give the class it predicts, the overview its accuracy.
    means : ComponentMeans, optional
        Means for the ablation curve (default: over the images themselves, or the store's).
    thumb_size : int
        Longest side of a thumbnail in pixels.
    title, source_name : str, optional
        The page's title and how the images' source is described.
    progress : bool
        Progress bars.

    Returns
    -------
    Atlas

    Examples
    --------
    >>> import clipdecomp
    >>> from clipdecomp import toy
    >>> model = clipdecomp.load()
    >>> batch = toy.generate(16, seed=0, n_objects=1)
    >>> dec = model.decompose(list(batch.images), spatial=True)
    >>> names, _ = toy.prompts("color")
    >>> atlas = clipdecomp.report(dec, batch.images, pool="default",
    ...                           labels=batch.labels["color"][:, 0], classnames=names)
    >>> atlas.save("atlas.html")                                          # doctest: +SKIP
    """
    from clipdecomp.methods.ablation import component_means

    if n_texts < 1 or n_show < 1:
        raise ValueError("n_texts and n_show must be at least 1")
    src = _open_source(source, images, model)
    model = src.model
    cfg = src.config
    n_layers, n_heads = src.n_layers, src.n_heads

    labels, classnames, classifier = _classification(src, labels, classnames, classifier,
                                                     templates, model)
    spec = _repair_spec(repair, src)
    if spec is not None and classifier is None:
        raise ValueError("repair= needs a classifier (classnames= or classifier=)")

    # TextSpan (a given table needs the pool only for its texts' embeddings, if at all)
    pool_texts: list[str] = []
    pool_emb: np.ndarray | None = None
    cats: dict[str, str] = {}
    if textspan is None or pool is not None:
        pool_texts, pool_emb, cats = _resolve_pool(pool, model, progress)
    if textspan is not None:
        results = dict(textspan.attrs["results"])
        if heads is not None:
            want = {(int(a) % n_layers, int(b)) for a, b in heads}
            results = {k: v for k, v in results.items() if k in want}
    else:
        assert pool_emb is not None  # resolved above: no table given
        results = _textspan(src, pool_texts, pool_emb, heads, n_texts, rank, progress)
    results = {k: v for k, v in results.items() if len(v.texts)}
    if not results:
        raise ValueError("TextSpan picked no text for any head (constant head terms?)")
    head_role = _head_roles(results, roles, cats, top=min(5, n_texts))

    # the direction of each head: the unit embedding of its first text
    dirs = _directions(results, pool_texts, pool_emb, model)

    rows, proj = _projections(src, dirs)
    if len(rows) < 2:
        raise ValueError(f"the atlas needs at least two valid images; got {len(rows)}")
    k = min(n_show, len(rows))
    top, bottom = {}, {}
    for key, p in proj.items():
        order = np.lexsort((rows, -p))                    # largest first, ties: lower row
        top[key] = order[:k]
        bottom[key] = np.lexsort((rows, p))[:k]
    nearest = _nearest(src, {key: int(rows[top[key][0]]) for key in proj}, k=min(k, len(rows) - 1))

    # image views
    if isinstance(views, (int, np.integer)):
        view_rows = [int(r) for r in rows[:int(views)]]
    else:
        view_rows = [int(r) for r in views]
        valid = set(rows.tolist())
        bad = [r for r in view_rows if r not in valid]
        if bad:
            raise ValueError(f"views {bad} are not valid image rows")
    view_data = _views(src, view_rows, texts, classifier, classnames, labels, spec, model)

    # head maps for every image a card shows
    want = set()
    for key in proj:
        for i in list(top[key]) + list(bottom[key]):
            want.add((int(rows[i]), key))
    maps, maps_note = _head_maps(src, sorted(want), dirs)

    # accuracies, the ablation curve
    zero_shot, ablation, abl_note = None, None, None
    if labels is not None and classifier is not None and (labels >= 0).any():
        if means is None:
            means = (component_means(src.store.stats) if isinstance(src, _StoreSource)
                     else component_means(src.dec))
        zero_shot, ablation, abl_note = _accuracies(src, labels, classifier, means, spec)
        zero_shot["classes"] = len(classnames)
    elif labels is None:
        abl_note = "no labels: zero-shot accuracy and the mean-ablation curve need them"
    else:
        abl_note = "no classifier: give classnames= (or classifier=)"

    # the cards, and the thumbnail of every image shown anywhere (once)
    cards = [_card(key, results[key], head_role.get(key), rows, proj[key], top[key],
                   bottom[key], nearest[key], maps, maps_note) for key in sorted(results)]
    shown = set(view_rows)
    for c in cards:
        shown.update(t["row"] for t in c["top"] + c["bottom"])
        shown.update(c["nearest"]["rows"] + [c["nearest"]["query"]])
    thumbs, names = _thumbnails(src, shown, thumb_size)
    class_of = {}
    if labels is not None and classnames is not None:
        class_of = {str(r): str(classnames[labels[r]]) for r in sorted(shown) if labels[r] >= 0}

    cats_used = [c for c, _ in Counter(v for v in head_role.values() if v).most_common()]
    colors = {c: _PALETTE[i] for i, c in enumerate(cats_used[:len(_PALETTE)])}
    name = getattr(cfg, "name", None) or "CLIP"
    data = {
        "format": "clipdecomp-atlas", "version": 1,
        "title": title or f"clipdecomp atlas: {name}",
        "model": {"name": name, "layers": n_layers, "heads": n_heads,
                  "width": int(getattr(cfg, "width", 0) or 0), "embed_dim": int(cfg.embed_dim),
                  "image_size": int(getattr(cfg, "image_size", 0) or 0),
                  "patch_size": int(getattr(cfg, "patch_size", 0) or 0),
                  "kept_layers": list(src.kept)},
        "images": {"count": len(rows), "source": source_name or src.source},
        "zero_shot": zero_shot and {k: (_r(v) if isinstance(v, float) else v)
                                    for k, v in zero_shot.items()},
        "ablation": ablation, "ablation_note": abl_note,
        "ablation_means_n": None if means is None else int(getattr(means, "n", 0)),
        "textspan": {"n_texts": max(len(r.texts) for r in results.values()),
                     "pool": len(pool_texts) or None},
        "roles": {"colors": colors, "other": "#c9c9c9"},
        "repair": None if spec is None else {"heads": [f"L{a}.H{b}" for a, b in spec["heads"]]},
        "heads": cards, "views": view_data,
        "thumbs": thumbs, "names": names, "classes": class_of,
        "neurons": neuron_cards(source),
    }
    return Atlas(data)


def _views(src: Any, view_rows: list, texts: Any, classifier: Any, classnames: Any,
           labels: Any, spec: Any, model: Any) -> list[dict]:
    """Per image: each head's contribution to the similarity with each text, heat maps."""
    from clipdecomp.methods.spatial import heatmap

    if not view_rows:
        return []
    if texts is not None:
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("texts= is empty")
        if model is None:
            raise ValueError("encoding texts= needs model=...")
        t_emb = np.asarray(model.encode_text(texts), np.float64)
        t_emb /= np.linalg.norm(t_emb, axis=1, keepdims=True)
    elif classifier is None:
        raise ValueError("the image view needs texts= or a classifier (classnames=)")
    c = src.take(np.asarray(view_rows))
    emb = np.asarray(c["embedding"], np.float64) / np.asarray(c["norm"], np.float64)[:, None]
    rep = None if spec is None else _repaired(src, c, spec)
    try:
        sub = src.spatial(np.asarray(view_rows))
        note = None
    except (ValueError, FileNotFoundError) as e:
        sub, note = None, f"no heat maps: {e}"
    out = []
    for i, r in enumerate(view_rows):
        v: dict = {"row": int(r)}
        if classifier is not None:
            logits = emb[i] @ np.asarray(classifier, np.float64)
            v["predicted"] = str(classnames[int(np.argmax(logits))])
            if rep is not None:
                v["repaired"] = str(classnames[int(np.argmax(rep[i] @ classifier))])
            if labels is not None and labels[r] >= 0:
                v["label"] = str(classnames[labels[r]])
        if texts is not None:
            names, dirs = texts, t_emb
        else:
            order = np.argsort(-(emb[i] @ classifier), kind="stable")[:5]
            names = [str(classnames[j]) for j in order]
            dirs = np.asarray(classifier, np.float64)[:, order].T
            dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        heads_i = np.asarray(c["heads"][i], np.float64)               # [Lk, H, D]
        contrib = np.einsum("lhd,td->tlh", heads_i, dirs)            # [T, Lk, H]
        mlp = np.asarray(c["mlps"][i], np.float64).sum(0) @ dirs.T     # [T]
        sim = emb[i] @ dirs.T                                          # [T]
        v["texts"] = names
        v["similarity"] = [_r(s) for s in sim]
        v["heads"] = [f"L{a}.H{b}" for a in src.kept for b in range(src.n_heads)]
        v["contributions"] = [[_r(x, 5) for x in row.ravel()] for row in contrib]
        v["mlps"] = [_r(x) for x in mlp]
        if len(src.kept) != src.n_layers:       # heads of the layers a store does not keep
            v["other_heads"] = [_r(x) for x in sim - contrib.sum((1, 2)) - mlp]
        if sub is not None:
            try:
                maps = heatmap(sub[i], dirs.astype(np.float32))[0]    # [T, G, G]
                v["maps"] = [quantise(m) for m in maps]
            except ValueError as e:
                note = f"no heat maps: {e}"
        if "maps" not in v:
            v["maps_note"] = note
        out.append(v)
    return out
