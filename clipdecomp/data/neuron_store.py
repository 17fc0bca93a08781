"""Neuron statistics of a whole data set, inside the store of :func:`clipdecomp.run_dataset`.

    from clipdecomp.data.runner import run_dataset
    from clipdecomp.methods.neuron_stats import NeuronStatsSpec
    store = run_dataset(model, "imagenet/val", "val.zarr", neurons=NeuronStatsSpec(9, k=100))
    st = store.neuron_stats(9)      # a NeuronStatsResult: mean, top_images, top_norms, pcs, norms

The second-order effects of the neurons of a layer (:mod:`clipdecomp.methods.neurons`) are, per
image, a fixed map of a few numbers the forward pass computes: the coefficients ``coef [J, H,
F]`` (one per later head and neuron), ``aux [J, H, 2]`` and the class token's statistics
``ln_stats [3]`` (:func:`~clipdecomp.methods.neurons.second_order_from`). A run stores these as
rows of the store, chunk by chunk, with the other rows: resumed, verified and written by Dask
workers exactly like them. When every chunk is done, a last step reads them back and computes,
with no model forward, the statistics of ``compute_pcas.py`` over the valid rows
(:func:`~clipdecomp.methods.neuron_stats.stats_from_batches`): per neuron the mean effect, the
centred norm on every image, the top ``k`` images and the first principal component over them.
``[N, F, D]`` never exists; memory is ``F * k * D`` floats for the kept top effects and a few
images' ``[F, D]`` effects.

Layout (per neuron layer l; N rows, C rows per chunk, J = L - 1 - l later layers, H heads, F
neurons, D embedding dim)::

    neurons/<l>/coef        [N, J, H, F]  float32  chunks (C, 1, H, F)   rows, as computed
    neurons/<l>/aux         [N, J, H, 2]  float32                         (whatever --dtype)
    neurons/<l>/ln_stats    [N, 3]        float32
    neurons/<l>/mean        [F, D]        float32  \\
    neurons/<l>/top_images  [F, k]        int64     |  the statistics, written when the
    neurons/<l>/top_norms   [F, k]        float32   |  store is complete; top_images are
    neurons/<l>/pcs         [F, D]        float32   |  store rows; norms are 0 on rows
    neurons/<l>/norms       [N, F]        float32  /   that are not valid

The group's attribute ``neuron_stats`` says whether the statistics are complete and which
commit of the store they were computed from; a run interrupted while computing them computes
them again. Each extra layer costs one more forward pass per image (the images of a chunk are
decoded once more for it).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clipdecomp.data import store as _store
from clipdecomp.data.sources import load_image
from clipdecomp.engine.helpers import progress_bar
from clipdecomp.methods.neuron_stats import NeuronStatsResult, NeuronStatsSpec, stats_from_batches

__all__ = ["ROW_ARRAYS", "check_model", "chunk_rows", "create_arrays", "finalize",
           "read_stats", "row_fields", "settings_of", "spec_of_settings"]

#: the per-image arrays of a neuron layer, written with every chunk
ROW_ARRAYS = ("coef", "aux", "ln_stats")
#: the statistics, written once the store is complete
STAT_ARRAYS = ("mean", "top_images", "top_norms", "pcs", "norms")


def settings_of(neurons: Any, n_layers: int) -> dict | None:
    """What a store records of ``run_dataset(..., neurons=)``: None, or the spec's fields with
    its layers checked against a model of ``n_layers`` layers (ValueError)."""
    spec = NeuronStatsSpec.of(neurons)
    return None if spec is None else spec.resolved(int(n_layers)).to_dict()


def spec_of_settings(settings: dict | None) -> NeuronStatsSpec | None:
    """The spec a store's ``settings["neurons"]`` records (None: no neuron statistics)."""
    if not settings:
        return None
    return NeuronStatsSpec(tuple(settings["layers"]), int(settings["k"]),
                           float(settings["coefficient"]))


def row_fields(settings: dict | None) -> list[str]:
    """Paths of the per-image neuron arrays in a store (``neurons/<l>/coef`` ...)."""
    spec = spec_of_settings(settings)
    if spec is None:
        return []
    return [f"neurons/{lay}/{a}" for lay in spec.layers for a in ROW_ARRAYS]


def _row_shapes(layer: int, cfg: dict) -> dict[str, tuple[int, ...]]:
    L, H, F = int(cfg["layers"]), int(cfg["heads"]), int(cfg["mlp_dim"])
    J = L - 1 - layer
    return {"coef": (J, H, F), "aux": (J, H, 2), "ln_stats": (3,)}


def create_arrays(root: Any, meta: dict) -> None:
    """Create the per-image neuron arrays of a new store (nothing without neuron settings)."""
    spec = spec_of_settings(meta["settings"].get("neurons"))
    if spec is None:
        return
    N, C = int(meta["shapes"]["n"]), int(meta["settings"]["chunk_size"])
    cfg = meta["model"]["config"]
    group = root.require_group("neurons")
    for layer in spec.layers:
        g = group.require_group(str(layer))
        for name, shape in _row_shapes(layer, cfg).items():
            chunks = (C, 1) + shape[1:] if len(shape) == 3 else (C,) + shape
            g.create_array(name, shape=(N,) + shape, chunks=chunks, dtype="float32",
                           fill_value=0)


def check_model(model: Any) -> None:
    """ValueError unless ``model`` can compute neuron effects (a CLIP whose weights file has
    the open_clip or transformers layout)."""
    layout = getattr(model, "layout", None)
    if layout not in ("open_clip", "hf") or not getattr(model, "path", None):
        raise ValueError("neurons=: neuron statistics need a CLIP model loaded from a weights "
                         f"file in the open_clip or transformers layout (this one: {layout!r})")


def chunk_rows(model: Any, paths: Sequence[str], ok: np.ndarray, spec: NeuronStatsSpec,
               batch_size: int, lock: Any = None) -> dict[str, np.ndarray]:
    """The neuron rows of one chunk: ``{"neurons/<l>/coef": [n, J, H, F], ...}`` for the
    images ``paths`` (absolute), zeros where ``ok`` is False.

    The images are decoded again (with the model's preprocessing, as the chunk's
    decomposition decoded them) and run through the model once per neuron layer; ``lock``
    (optional) is held around each model call.
    """
    from clipdecomp.methods.neurons import neuron_forward

    n = len(paths)
    cfg = model.config
    c = {"layers": cfg.layers, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim}
    out = {f"neurons/{lay}/{name}": np.zeros((n,) + shape, np.float32)
           for lay in spec.layers for name, shape in _row_shapes(lay, c).items()}
    rows = np.nonzero(np.asarray(ok, bool))[0]
    guard = lock if lock is not None else contextlib.nullcontext()
    for b0 in range(0, len(rows), batch_size):
        sel = rows[b0:b0 + batch_size]
        loaded = [load_image(model.preprocess, paths[i]) for i in sel]
        images = []
        for i, (px, err) in zip(sel, loaded):
            if px is None:
                raise ValueError(f"neurons: {paths[i]} could not be read again for its neuron "
                                 f"effects ({err}); did it change during the run?")
            images.append(px)
        pixels = np.stack(images)
        for lay in spec.layers:
            with guard:
                got = [o for _, o in neuron_forward(model, pixels, lay, batch_size=len(sel))]
            for name in ROW_ARRAYS:
                vals = np.concatenate([g[name] for g in got]).astype(np.float32, copy=False)
                if not np.all(np.isfinite(vals)):
                    raise ValueError(f"neurons: the forward pass gave non-finite neuron values "
                                     f"for layer {lay} in {paths[int(sel[0])]} or the images "
                                     "after it")
                out[f"neurons/{lay}/{name}"][sel] = vals
    return out


def _group(path: str, layer: int, mode: str) -> Any:
    return _store._zarr().open_group(os.path.join(path, "neurons", str(int(layer))), mode=mode)


def _stats_state(path: str, layer: int) -> dict:
    try:
        return dict(_group(path, layer, "r").attrs.get("neuron_stats", {}))
    except Exception:  # noqa: BLE001 - a group that cannot be read has no statistics
        return {}


def finalize(model: Any, path: str | os.PathLike, *, force: bool = False,
             progress: bool = False) -> list[int]:
    """Compute and write the neuron statistics of a complete store; returns the layers
    computed. Layers whose statistics are complete and were computed from the store's
    current commit are left as they are unless ``force``. Nothing is done (``[]``) for a store
    without neuron settings; a store with unfinished chunks is a ValueError.

    ``model`` gives the fixed maps of the effects (:func:`~clipdecomp.methods.neurons.
    neuron_fold`, from its weights file); no image is read and no forward pass is run.
    """
    path = os.fspath(path)
    reader = _store.StoreReader(path)
    spec = spec_of_settings(reader.metadata["settings"].get("neurons"))
    if spec is None:
        return []
    _, included, generation = _store.load_committed(path, reader.layers, arrays=False)
    if not included.all():
        raise ValueError(f"{path}: {int((~included).sum())} chunk(s) are not finished; the "
                         "neuron statistics are computed once every chunk is (run it again "
                         "to finish it)")
    check_model(model)
    ok = np.asarray(reader.ok[...], bool)
    if not ok.any():
        raise ValueError(f"{path}: no valid image, no neuron statistics")
    done = []
    for layer in spec.layers:
        state = _stats_state(path, layer)
        if not force and state.get("complete") and state.get("generation") == generation:
            continue
        _finalize_layer(model, path, ok, layer, spec, generation, progress)
        done.append(layer)
    return done


def _finalize_layer(model: Any, path: str, ok: np.ndarray, layer: int, spec: NeuronStatsSpec,
                    generation: int, progress: bool) -> None:
    from clipdecomp.methods.neurons import neuron_fold, second_order_from

    N, C = ok.shape[0], int(_store.StoreReader(path).chunk_size)
    F, D = int(model.config.mlp_dim), int(model.config.embed_dim)
    step = max(1, (32 << 20) // (F * D * 4))      # images per batch of [b, F, D] effects
    g = _group(path, layer, "r+")
    g.attrs.update({"neuron_stats": {"complete": False}})
    fold = neuron_fold(model, layer)
    norms = g.create_array("norms", shape=(N, F), chunks=(C, F), dtype="float32",
                           fill_value=0, overwrite=True)
    passes = iter([False, True])       # the means, then the top images (norms written)
    chunk: dict[str, Any] = {"start": 0, "norms": None}

    def on_norms(index: np.ndarray, nrm: np.ndarray) -> None:
        chunk["norms"][index - chunk["start"]] = nrm

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        second = next(passes)
        what = "top images" if second else "means"
        with progress_bar(total=N, enabled=progress, unit="img",
                          desc=f"neuron stats, layer {layer} ({what})") as bar:
            for s in range(0, N, C):
                e = min(N, s + C)
                rows = np.nonzero(ok[s:e])[0]
                chunk["start"], chunk["norms"] = s, np.zeros((e - s, F), np.float32)
                if rows.size:
                    part = {name: np.asarray(g[name][s:e]) for name in ROW_ARRAYS}
                    for b0 in range(0, rows.size, step):
                        r = rows[b0:b0 + step]
                        yield s + r, second_order_from(
                            fold, {k: v[r] for k, v in part.items()}, spec.coefficient)
                if second:
                    norms[s:e] = chunk["norms"]
                bar.update(e - s)

    res = stats_from_batches(batches, k=spec.k, keep_norms=False, on_norms=on_norms,
                             shape=(F, D), layer=layer)
    for name in STAT_ARRAYS[:-1]:
        v = getattr(res, name)
        g.create_array(name, shape=v.shape, dtype=v.dtype, overwrite=True)[...] = v
    g.attrs.update({"neuron_stats": {
        "complete": True, "generation": int(generation), "n_images": int(ok.sum()),
        "layer": int(layer), "k": int(res.k), "coefficient": spec.coefficient}})


def read_stats(path: str | os.PathLike, layer: int, norms: bool = True) -> NeuronStatsResult:
    """The neuron statistics of ``layer`` in a store (see :meth:`StoreReader.neuron_stats`)."""
    path = os.fspath(path)
    meta = _store.StoreReader(path).metadata
    spec = spec_of_settings(meta["settings"].get("neurons"))
    L = int(meta["shapes"]["layers"])
    lay = int(layer) + L if int(layer) < 0 else int(layer)
    if spec is None or lay not in spec.layers:
        have = [] if spec is None else list(spec.layers)
        raise ValueError(f"{path} has no neuron statistics of layer {layer} (its neuron "
                         f"layers: {have}); run it with neurons={layer}")
    state = _stats_state(path, lay)
    if not state.get("complete"):
        raise ValueError(f"{path}: the neuron statistics of layer {lay} are not computed yet "
                         "(the store is unfinished, or the run stopped while computing them): "
                         "run the same command again to finish them")
    g = _group(path, lay, "r")
    arrays = {name: np.asarray(g[name][...]) for name in STAT_ARRAYS[:-1]}
    return NeuronStatsResult(mean=arrays["mean"], top_images=arrays["top_images"],
                             top_norms=arrays["top_norms"], pcs=arrays["pcs"],
                             norms=np.asarray(g["norms"][...]) if norms else None,
                             n_images=int(state["n_images"]), layer=lay)
