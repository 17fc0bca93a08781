"""Second-order (and first-order) neuron effects against torch on transformers' random models.

* ``reference_hook``: a fresh float64 torch transcription of the steps of the reference code's
  second-order hook (``[B, tokens, neurons, width]`` intermediates, every later head, the
  ``(1 + 2j) F`` / ``(1 + 2j) H F`` / ``(1 + 2j)(2L + 1) H F`` shares, coefficient 100): ours
  within 1e-4 relative.
* ``mlp_through_heads``: the whole MLP output of the layer (transformers' own ``mlp`` module on
  every token) through the later heads, never split into neurons: equals our effects summed
  over neurons.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from checkpoints import random_pixels

import clipdecomp
from clipdecomp.methods import neurons

pytestmark = pytest.mark.usefixtures("requires_core")

_LOADED: dict = {}


def loaded(ck, layout: str) -> clipdecomp.CLIP:
    key = (ck.name, layout)
    if key not in _LOADED:
        _LOADED[key] = clipdecomp.load(ck.dirs[(layout, "F32")], threads=1)
    return _LOADED[key]


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@torch.no_grad()
def trace(ck, pixels: np.ndarray, layer: int) -> dict:
    """float64 transformers forward: hidden states, attentions, post-activation hidden and MLP
    output of ``layer``, ln_1 statistics per token of every layer, ln_post statistics."""
    m = copy.deepcopy(ck.model).double().eval()
    vm = m.vision_model
    got = {}
    lay = vm.encoder.layers[layer]
    h1 = lay.mlp.fc2.register_forward_hook(
        lambda mod, inp, out: got.update(act=inp[0].clone(), mlp=out.clone()))
    out = vm(pixel_values=torch.from_numpy(pixels).double(), output_attentions=True,
             output_hidden_states=True)
    h1.remove()
    hs = out.hidden_states
    ln1 = []
    for j, lj in enumerate(vm.encoder.layers):
        x = hs[j]
        ln1.append((x.mean(-1), torch.sqrt(x.var(-1, unbiased=False) + lj.layer_norm1.eps)))
    y = hs[-1][:, 0]
    post = vm.post_layernorm
    mu, sd = y.mean(-1), torch.sqrt(y.var(-1, unbiased=False) + post.eps)
    proj = m.visual_projection.weight.T
    rep = ((y - mu[:, None]) / sd[:, None] * post.weight + post.bias) @ proj
    return {"m": m, "att": out.attentions, "act": got["act"], "mlp": got["mlp"], "ln1": ln1,
            "mu": mu, "sd": sd, "rep": rep, "proj": proj}


@torch.no_grad()
def reference_hook(ck, pixels: np.ndarray, layer: int, coefficient: float = 100.0) -> np.ndarray:
    """[B, F, D], the reference's route: per later (layer, head), every token and neuron."""
    t = trace(ck, pixels, layer)
    vm = t["m"].vision_model
    L = len(vm.encoder.layers)
    H = ck.vision_config.num_attention_heads
    lay = vm.encoder.layers[layer]
    act = t["act"]                                                     # [B, N, F]
    F = act.shape[-1]
    w_p, b_p = lay.mlp.fc2.weight, lay.mlp.fc2.bias                    # [W, F], [W]
    per_neuron = torch.einsum("btn,nm->btnm", act, w_p.T) + b_p / F    # [B, N, F, W]
    total = 0
    for j in range(layer + 1, L):
        lj = vm.encoder.layers[j]
        share = (1 + 2 * j) * F
        mean, std = t["ln1"][j]
        normed = (lj.layer_norm1.weight * (per_neuron - mean[:, :, None, None] / share)
                  / std[:, :, None, None] + lj.layer_norm1.bias / share)
        W = normed.shape[-1]
        d = W // H
        wv = lj.self_attn.v_proj.weight.view(H, d, W)
        bv = lj.self_attn.v_proj.bias.view(H, d)
        wo = lj.self_attn.out_proj.weight.view(W, H, d)
        for h in range(H):
            v = torch.einsum("bnxc,dc->bnxd", normed, wv[h]) + bv[h] / share
            x = torch.einsum("bnm,bmxc->bnxc", t["att"][j][:, h], v)
            ret = torch.einsum("bnxc,dc->bnxd", x, wo[:, h]) + \
                lj.self_attn.out_proj.bias / (share * H)
            post_share = (1 + 2 * j) * (1 + 2 * L) * H * F
            post = vm.post_layernorm
            y = (post.weight * (ret[:, 0] - t["mu"][:, None, None] / post_share)
                 / t["sd"][:, None, None] + post.bias / post_share)
            total = total + y @ t["proj"]
    return (coefficient * total / t["rep"].norm(dim=-1)[:, None, None]).numpy()


@torch.no_grad()
def mlp_through_heads(ck, pixels: np.ndarray, layer: int, coefficient: float = 100.0):
    """[B, D]: the MLP output of ``layer`` (all tokens, not split) through every later head's
    class-token row, ln_1 / ln_post linearised with the layer-level shares."""
    t = trace(ck, pixels, layer)
    vm = t["m"].vision_model
    L = len(vm.encoder.layers)
    H = ck.vision_config.num_attention_heads
    M = t["mlp"]                                                       # [B, N, W]
    W = M.shape[-1]
    d = W // H
    total = 0
    for j in range(layer + 1, L):
        lj = vm.encoder.layers[j]
        mean, std = t["ln1"][j]
        s = 1 + 2 * j
        ln = lj.layer_norm1.weight * (M - mean[..., None] / s) / std[..., None] + \
            lj.layer_norm1.bias / s
        v = (lj.self_attn.v_proj(ln) - lj.self_attn.v_proj.bias * (1 - 1 / s)).view(*M.shape[:2], H, d)
        for h in range(H):
            x0 = torch.einsum("bt,btc->bc", t["att"][j][:, h, 0], v[:, :, h])
            o = x0 @ lj.self_attn.out_proj.weight[:, h * d:(h + 1) * d].T + \
                lj.self_attn.out_proj.bias / (s * H)
            ps = s * (1 + 2 * L) * H
            post = vm.post_layernorm
            y = post.weight * (o - t["mu"][:, None] / ps) / t["sd"][:, None] + post.bias / ps
            total = total + y @ t["proj"]
    return (coefficient * total / t["rep"].norm(dim=-1)[:, None]).numpy()


CASES = [("b32_quick", 0), ("b16_gelu", 0), ("b16_gelu", 1)]


@pytest.mark.parametrize("name,layer", CASES)
@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_second_order_matches_reference_hook(checkpoints, name, layer, layout):
    ck = checkpoints[name]
    px = random_pixels(ck, 3, seed=11)
    ours = neurons.second_order(loaded(ck, layout), px, layer, batch_size=2)
    ref = reference_hook(ck, px, layer)
    c = ck.vision_config
    assert ours.shape == (3, c.intermediate_size, ck.model.config.projection_dim)
    assert ours.dtype == np.float32
    assert rel(ours, ref) < 1e-4
    # per neuron, not only overall: the smallest effects too
    err = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    assert err.max() < 1e-4


@pytest.mark.parametrize("name,layer", CASES)
def test_neurons_sum_to_mlp_through_heads(checkpoints, name, layer):
    ck = checkpoints[name]
    px = random_pixels(ck, 2, seed=3)
    ours = neurons.second_order(loaded(ck, "hf"), px, layer).sum(1)
    assert rel(ours, mlp_through_heads(ck, px, layer)) < 1e-4


@pytest.mark.parametrize("name,layer", [("b32_quick", 0), ("b32_quick", 1), ("b16_gelu", 2)])
def test_first_order_sums_to_mlp_term(checkpoints, name, layer):
    ck = checkpoints[name]
    px = random_pixels(ck, 3, seed=4)
    model = loaded(ck, "open_clip")
    eff = neurons.first_order(model, px, layer, coefficient=2.5)
    dec = model.decompose(px)
    assert rel(eff.sum(1), 2.5 * dec.mlps[:, layer + 1]) < 1e-4
    # each neuron: its class-token activation along G(W_proj[:, n]), from torch
    t = trace(ck, px, layer)
    post = t["m"].vision_model.post_layernorm
    lay = t["m"].vision_model.encoder.layers[layer]
    F = t["act"].shape[-1]
    K = 2 * len(t["m"].vision_model.encoder.layers) + 1
    with torch.no_grad():
        out = t["act"][:, 0, :, None] * lay.mlp.fc2.weight.T + lay.mlp.fc2.bias / F   # [B, F, W]
        y = post.weight * (out - t["mu"][:, None, None] / (K * F)) / t["sd"][:, None, None] + \
            post.bias / (K * F)
        ref = 2.5 * (y @ t["proj"]) / t["rep"].norm(dim=-1)[:, None, None]
    assert rel(eff, ref.numpy()) < 1e-4


def test_fold_apply_fast_equals_naive(requires_core):
    core = requires_core
    rng = np.random.default_rng(0)
    B, K, F, D = 3, 5, 37, 19
    coef = rng.standard_normal((B, K, F)).astype(np.float32)
    fold = rng.standard_normal((F, K, D)).astype(np.float32)
    scale = rng.standard_normal(B).astype(np.float32)
    shift = rng.standard_normal((B, D)).astype(np.float32)
    fast = core._neuron_fold_apply(coef, fold, scale, shift)
    naive = core._neuron_fold_apply(coef, fold, scale, shift, naive=True)
    ref = np.einsum("bkn,nkd->bnd", coef.astype(np.float64), fold) * scale[:, None, None] + \
        shift[:, None]
    assert np.abs(naive - ref).max() < 1e-5
    assert np.abs(fast - ref).max() < 1e-4
    with pytest.raises(ValueError, match="must agree"):
        core._neuron_fold_apply(coef, fold[:, :4], scale, shift)


def test_recorded_activations_are_transformers(b16):
    px = random_pixels(b16, 2, seed=8)
    model = loaded(b16, "hf")
    rec = [0, 5, 149]
    (start, out), = list(neurons.neuron_forward(model, px, 1, record=rec))
    t = trace(b16, px, 1)
    assert start == 0
    assert rel(out["acts"], t["act"][:, :, rec].numpy()) < 1e-5
    assert rel(out["act_cls"], t["act"][:, 0].numpy()) < 1e-5


def test_bad_arguments(b32):
    model = loaded(b32, "hf")
    px = random_pixels(b32, 1)
    with pytest.raises(ValueError, match="later layer"):
        neurons.second_order(model, px, 1)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\)"):
        neurons.second_order(model, px, 5)
    with pytest.raises(TypeError, match="layer must be an int"):
        neurons.second_order(model, px, 0.5)
    with pytest.raises(ValueError, match="coefficient"):
        neurons.second_order(model, px, 0, coefficient=float("nan"))
    with pytest.raises(ValueError, match="neuron indices must lie"):
        list(neurons.neuron_forward(model, px, 0, record=[256]))
    with pytest.raises(ValueError, match="layer must be in"):
        model._core.neuron_coefs(px, 2)
    with pytest.raises(ValueError, match="pixels must have shape"):
        model._core.neuron_coefs(px[:, :2], 0)
    model.memory_budget = 1000
    try:
        with pytest.raises(MemoryError, match="neuron_stats"):
            neurons.second_order(model, px, 0)
    finally:
        model.memory_budget = None


# ---------------------------------------------------------------------------------------------
# streamed statistics against the in-memory computation (compute_pcas.py, transcribed)


def pcas_in_memory(effects: np.ndarray, k: int):
    """The reference's compute_pcas.py on the whole [N, F, D] array: centre by the mean over
    images, rank images by centred norm, SVD of the top k, sign by majority of projections."""
    mean = effects.mean(axis=0)
    pcs, norms, tops = [], [], []
    for n in range(effects.shape[1]):
        cur = effects[:, n] - mean[n]
        nrm = np.linalg.norm(cur, axis=-1)
        important = np.argsort(nrm)[-k:]
        _, _, vh = np.linalg.svd(cur[important], full_matrices=False)
        positive = int(((cur[important] @ vh[0]) > 0).sum())
        pcs.append(vh[0] if positive > k // 2 else -vh[0])
        norms.append(np.sort(nrm)[-k:])
        tops.append(important)
    return mean, np.stack(pcs), np.stack(norms), np.stack(tops)


def test_streamed_stats_equal_in_memory_on_arrays():
    from clipdecomp.methods.neuron_stats import EffectMean, NeuronStats

    rng = np.random.default_rng(1)
    # sparse, heavy-tailed effects, as neurons have: a few images carry most of the norm
    N, F, D, k = 90, 7, 12, 10
    eff = (rng.standard_normal((N, F, D)) * rng.exponential(1.0, (N, F, 1)) ** 3)
    eff = eff.astype(np.float32)
    acc = EffectMean(F, D)
    for s in range(0, N, 16):
        acc.update(eff[s:s + 16])
    st = NeuronStats(acc.result(), k=k)
    order = list(range(0, N, 16))[::-1]           # batches may arrive in any order
    for s in order:
        st.update(eff[s:s + 16], start=s)
    res = st.result()
    mean, pcs, norms, tops = pcas_in_memory(eff.astype(np.float64), k)
    assert np.abs(res.mean - mean).max() < 1e-5
    assert np.array_equal(np.sort(res.top_images, 1), np.sort(tops, 1))
    assert np.abs(res.top_norms[:, ::-1] - norms).max() < 1e-4 * np.abs(norms).max()
    assert np.abs(res.pcs - pcs).max() < 1e-4
    assert res.norms.shape == (N, F)
    assert np.abs(res.norms - np.linalg.norm(eff - mean, axis=-1)).max() < 1e-4
    assert np.all(np.diff(res.top_norms, axis=1) <= 0)
    assert res.significant().sum(0).tolist() == [k - 1] * F   # strictly above the k-th


@pytest.mark.parametrize("k, D", [(10, 12), (30, 6), (8, 8)])
def test_principal_directions_equal_numpy_svd(k, D):
    """The Gram-matrix route against numpy's SVD with the reference's sign rule, on both
    branches (k <= D, k > D) and on rows built so that exactly half project positively."""
    from clipdecomp.methods.neuron_stats import principal_directions

    rng = np.random.default_rng(k + D)
    x = rng.standard_normal((40, k, D)) * rng.exponential(1.0, (40, k, 1))
    x[:5, k // 2:] = -x[:5, :k // 2] if k % 2 == 0 else x[:5, k // 2:]   # exact ties
    got = principal_directions(x).astype(np.float64)
    vh = np.linalg.svd(x, full_matrices=False)[2][:, 0]
    positive = (np.einsum("fkd,fd->fk", x, vh) > 0).sum(1)
    want = vh * np.where(positive > k // 2, 1.0, -1.0)[:, None]
    assert np.abs(got - want).max() < 1e-5


def test_top_k_by_index_and_ties():
    from clipdecomp.methods.neuron_stats import NeuronStats

    eff = np.zeros((6, 2, 3), np.float32)
    eff[:, 0, 0] = [1, 3, 3, 2, 3, 0]               # neuron 0: three images tie at 3
    eff[:, 1, 1] = [5, 4, 3, 2, 1, 6]
    st = NeuronStats(np.zeros((2, 3), np.float32), k=2, keep_norms=False)
    nrm = st.update(eff[:3], index=[10, 11, 12])
    assert nrm.shape == (3, 2) and nrm[1, 0] == 3
    st.update(eff[3:], index=[13, 14, 15])
    res = st.result()
    assert res.top_images.tolist() == [[11, 12], [15, 10]]  # the first images win the tie
    assert res.top_norms.tolist() == [[3, 3], [6, 5]] and res.norms is None
    with pytest.raises(ValueError, match="index must be"):
        st.update(eff[:2], index=[1])


def test_stats_fewer_images_than_k_and_errors():
    from clipdecomp.methods.neuron_stats import NeuronStats

    eff = np.random.default_rng(2).standard_normal((4, 3, 5)).astype(np.float32)
    st = NeuronStats(eff.mean(0), k=10)
    st.update(eff)
    res = st.result()
    assert res.top_images.shape == (3, 4)
    assert sorted(res.top_images[0]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="added already"):
        st.update(eff, start=0)
    with pytest.raises(ValueError, match=r"shape \[b, 3, 5\]"):
        st.update(eff[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        st.update(np.full((1, 3, 5), np.nan), start=9)
    with pytest.raises(ValueError, match="k must be"):
        NeuronStats(eff.mean(0), k=0)


def test_neuron_stats_streamed_equal_in_memory(b16, tmp_path):
    from clipdecomp.methods.neuron_stats import load_neuron_stats, neuron_stats, save_neuron_stats

    model = loaded(b16, "open_clip")
    px = random_pixels(b16, 23, seed=21)
    res = neuron_stats(model, px, 1, k=7, batch_size=5)
    eff = neurons.second_order(model, px, 1)
    mean, pcs, norms, tops = pcas_in_memory(eff.astype(np.float64), 7)
    assert np.abs(res.mean - mean).max() < 1e-6 * np.abs(mean).max() + 1e-7
    assert np.array_equal(np.sort(res.top_images, 1), np.sort(tops, 1))
    # the sign rule counts positive projections: a projection within rounding of 0 may count
    # either way, so signs are compared only where every projection is clear of 0
    cen = np.take_along_axis(eff - mean, tops[:, :, None].transpose(1, 0, 2), 0)  # [k, F, D]
    clear = np.abs(np.einsum("kfd,fd->kf", cen, pcs)).min(0) > 1e-4
    assert clear.mean() > 0.9
    assert np.abs(res.pcs - pcs)[clear].max() < 1e-3
    assert np.abs(np.abs(res.pcs) - np.abs(pcs)).max() < 1e-3
    assert np.abs(res.top_norms[:, ::-1] - norms).max() < 1e-5 * norms.max()
    for path in (tmp_path / "s.npz", str(tmp_path / "run.zarr") + "/neurons/1"):
        back = load_neuron_stats(save_neuron_stats(res, path))
        assert back.layer == 1 and back.n_images == 23 and back.k == 7
        for key in ("mean", "top_images", "top_norms", "pcs", "norms"):
            assert np.array_equal(getattr(back, key), getattr(res, key)), key


# ---------------------------------------------------------------------------------------------
# text for neurons


@pytest.mark.parametrize("k", [1, 5, 12])
def test_omp_equals_sklearn(k):
    from sklearn.decomposition import SparseCoder
    from sklearn.linear_model import OrthogonalMatchingPursuit

    from clipdecomp.methods.neuron_texts import omp, text_dictionary

    rng = np.random.default_rng(k)
    texts = rng.standard_normal((60, 16)) + 0.3
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    dictionary = text_dictionary(texts)                 # atoms of unequal norms, as in use
    targets = rng.standard_normal((9, 16))
    ours = omp(dictionary, targets, k)
    for m in range(targets.shape[0]):
        ref = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False)
        ref.fit(dictionary.T, targets[m])
        assert np.array_equal(np.nonzero(ours[m])[0], np.nonzero(ref.coef_)[0])
        assert np.abs(ours[m] - ref.coef_).max() < 1e-8 * np.abs(ref.coef_).max()
    # the reference's own route: SparseCoder(transform_algorithm="omp")
    coder = SparseCoder(dictionary=dictionary, transform_algorithm="omp",
                        transform_n_nonzero_coefs=k, transform_alpha=1e-4)
    assert np.abs(ours - coder.transform(targets)).max() < 1e-6 * np.abs(ours).max()


def test_text_dictionary_is_the_reference_scaling():
    from clipdecomp.methods.neuron_texts import text_dictionary

    t = np.random.default_rng(0).standard_normal((30, 6))
    ref = t - t.mean(axis=0)
    ref = 100.0 * ref / np.linalg.norm(ref, axis=0, keepdims=True)
    assert np.abs(text_dictionary(t) - ref).max() < 1e-12
    with pytest.raises(ValueError, match="constant"):
        text_dictionary(np.ones((4, 3)))


def test_neuron_texts_table_and_recovery():
    from clipdecomp.methods.neuron_stats import NeuronStatsResult
    from clipdecomp.methods.neuron_texts import neuron_texts, text_dictionary

    rng = np.random.default_rng(5)
    T, D = 40, 24
    emb = rng.standard_normal((T, D))
    texts = [f"text {i}" for i in range(T)]
    dictionary = text_dictionary(emb)
    # directions built from 3 known texts each: OMP finds exactly those
    truth = [[3, 17, 29], [0, 5, 38]]
    dirs = np.stack([dictionary[t].T @ np.array([1.0, -0.5, 0.25]) for t in truth])
    stats = NeuronStatsResult(mean=np.zeros((2, D), np.float32), top_images=np.zeros((2, 1), int),
                              top_norms=np.zeros((2, 1), np.float32), pcs=dirs, norms=None,
                              n_images=1, layer=4)
    df = neuron_texts(stats, emb, texts, k=3)
    assert list(df.neuron) == [0, 1] and list(df.layer) == [4, 4]
    for row, t in zip(df.itertuples(), truth):
        assert row.texts == [texts[i] for i in t]            # largest |weight| first
        assert np.allclose(row.weights, [1.0, -0.5, 0.25])
        assert row.cosine > 1 - 1e-9
    assert df.attrs["codes"].shape == (2, T)
    one = neuron_texts(dirs, emb, texts, k=2, neurons=[1])
    assert list(one.neuron) == [1] and len(one.texts[0]) == 2
    with pytest.raises(ValueError, match="must agree"):
        neuron_texts(dirs, emb, texts[:-1])
    with pytest.raises(ValueError, match="k must be"):
        neuron_texts(dirs, emb, texts, k=0)
    with pytest.raises(ValueError, match="neurons must lie"):
        neuron_texts(dirs, emb, texts, neurons=[2])


# ---------------------------------------------------------------------------------------------
# the ablation study and segmentation, against transcriptions of the reference's scripts


def test_neuron_ablation_matches_reference_loop(b16):
    from clipdecomp.methods.neuron_stats import neuron_stats

    model = loaded(b16, "hf")
    ref_px = random_pixels(b16, 16, seed=30)
    stats = neuron_stats(model, ref_px, 1, k=3)
    px = random_pixels(b16, 7, seed=31)
    rng = np.random.default_rng(0)
    clf = rng.standard_normal((b16.model.config.projection_dim, 4))
    labels = rng.integers(0, 4, 7)
    df = neurons.neuron_ablation(model, px, labels, clf, stats, batch_size=3)

    # compute_ablations.py, per image, on the [B, F, D] effects
    eff = neurons.second_order(model, px, 1).astype(np.float64)
    emb = model.encode_image(px, normalize=False).astype(np.float64)
    rep = 100.0 * emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean, pcas, thr = stats.mean, stats.pcs, stats.top_norms[:, ::-1][:, 0]
    mean_abl = eff - mean[None]
    norms = np.linalg.norm(mean_abl, axis=-1)
    wo_sig = rep - eff.sum(1) + mean.sum(0)[None]
    wo_neurons = wo_sig.copy()
    wo_insig, pc = wo_sig.copy(), wo_sig.copy()
    for b in range(7):
        idx = norms[b] > thr
        wo_sig[b] += mean_abl[b][~idx].sum(0)
        wo_insig[b] += mean_abl[b][idx].sum(0)
        pc[b] += (np.einsum("nd,nd->n", mean_abl[b], pcas)[:, None] * pcas).sum(0)
    lg = df.attrs["logits"]
    for name, r in [("baseline", rep), ("mean-ablated", wo_neurons),
                    ("without significant", wo_sig), ("only significant", wo_insig),
                    ("principal components", pc)]:
        assert rel(lg[name], r @ clf) < 1e-4, name
        acc = df.set_index("ablation").accuracy[name]
        assert acc == float(((r @ clf).argmax(1) == labels).mean()), name
    assert df.attrs["significant_share"] == (norms > thr).mean()
    with pytest.raises(ValueError, match="labels"):
        neurons.neuron_ablation(model, px, labels[:3], clf, stats)
    with pytest.raises(ValueError, match="classifier"):
        neurons.neuron_ablation(model, px, labels, clf.T, stats)


def test_neuron_segment_matches_reference(b16):
    import torch.nn.functional as tf

    from clipdecomp.methods.neuron_stats import neuron_stats

    model = loaded(b16, "open_clip")
    stats = [neuron_stats(model, random_pixels(b16, 12, seed=40 + i), i, k=3) for i in (0, 1)]
    px = random_pixels(b16, 4, seed=41)
    clf = np.random.default_rng(1).standard_normal((b16.model.config.projection_dim, 3))
    res = neurons.neuron_segment(model, px, clf, stats, top_neurons=20, batch_size=3)

    # compute_segmentation.py: chosen neurons per class over the layers' PCs, mean of their
    # post-GELU values at the patches (from transformers), bilinear upsampling, min-max, > 0.5
    pcas = np.concatenate([s.pcs for s in stats])
    chosen = [np.argsort(np.abs(pcas @ clf[:, i]))[-20:] for i in range(3)]
    F = b16.vision_config.intermediate_size
    acts = [trace(b16, px, layer)["act"].numpy() for layer in (0, 1)]
    emb = model.encode_image(px, normalize=False)
    G, P = 4, b16.vision_config.patch_size
    for b in range(4):
        cls = int((emb[b] @ clf).argmax())
        assert res.classes[b] == cls
        rec = [acts[i // F][b, :, i % F] for i in chosen[cls]]
        m = torch.from_numpy(np.mean(np.stack(rec), 0)[1:].reshape(1, 1, G, G))
        up = tf.interpolate(m, scale_factor=P, mode="bilinear")[0, 0].numpy()
        up = (up - up.min()) / (up.max() - up.min())
        assert np.abs(res.scores[b] - up).max() < 1e-4
        assert np.mean(res.masks[b] != (up > 0.5)) < 0.01
    with pytest.raises(ValueError, match="top_neurons"):
        neurons.neuron_segment(model, px, clf, stats, top_neurons=0)


def test_plot_neuron_shows_top_images_maps_and_texts(b16):
    import matplotlib

    matplotlib.use("Agg")
    from clipdecomp.methods.neuron_stats import neuron_stats
    from clipdecomp.methods.neuron_texts import neuron_texts
    from clipdecomp.viz.neuron_plots import neuron_maps, plot_neuron

    model = loaded(b16, "hf")
    px = random_pixels(b16, 9, seed=50)
    st = neuron_stats(model, px, 1, k=4)
    maps = neuron_maps(model, px, 1, 7)
    ref = trace(b16, px, 1)["act"][:, 1:, 7].numpy().reshape(9, 4, 4)
    assert rel(maps, ref) < 1e-5
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, b16.model.config.projection_dim))
    table = neuron_texts(st, emb, [f"word {i}" for i in range(30)], k=3, neurons=[7])
    fig = plot_neuron(model, px, st, 7, table, n_images=3)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3
    for ax, i in zip(image_axes, st.top_images[7][:3]):
        assert ax.get_title().startswith(f"#{i} ")
        heat = ax.images[1].get_array()                       # the map, upsampled to the image
        assert heat.shape == (64, 64)
    shown = "".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert all(w in shown for w in table.texts.iloc[0])
    with pytest.raises(ValueError, match="neuron must be"):
        plot_neuron(model, px, st, 150)


def test_neuron_report_on_the_embedded_model(tmp_path):
    from clipdecomp.demo_neurons import format_neuron_report, neuron_report

    model = clipdecomp.load(threads=1)
    rep = neuron_report(model, n_images=60, n_neurons=2, n_texts=3, figures=str(tmp_path))
    st = rep["stats"]
    assert rep["layer"] == model.config.layers - 2 and rep["k"] == 2
    assert st.norms.shape == (60, model.config.mlp_dim)
    # the sparsity measure, recomputed plainly: top 2% (2 of 60 images) of the squared norms
    carried = []
    for n in range(st.norms.shape[1]):
        sq = sorted((float(x) ** 2 for x in st.norms[:, n]), reverse=True)
        carried.append(sum(sq[:2]) / sum(sq))
    assert np.allclose(rep["energy_top"], carried)
    assert rep["sparse_share"] == np.mean(np.array(carried) > 0.5)
    assert list(rep["neurons"].neuron) == list(np.argsort(-st.threshold, kind="stable")[:2])
    assert all(len(t) == 3 for t in rep["neurons"].texts)
    assert len(rep["figures"]) == 2 and all(os.path.getsize(p) > 0 for p in rep["figures"])
    text = format_neuron_report(rep)
    assert f"neurons of layer {rep['layer']}" in text and "under 2% of the images" in text


def test_coefficients_do_not_depend_on_the_core_chunks(b16):
    """One image per forward chunk (the capture sees several chunks of one call) gives the
    numbers of one chunk for the whole batch."""
    model = loaded(b16, "hf")
    px = random_pixels(b16, 5, seed=60)
    whole = model._core.neuron_coefs(px, 0, record=[3, 1], threads=1)
    chunked = model._core.neuron_coefs(px, 0, record=[3, 1], threads=1, scratch_budget=1)
    assert sorted(whole) == ["act_cls", "acts", "aux", "coef", "embedding", "ln_stats"]
    for k in whole:
        assert np.array_equal(whole[k], chunked[k]), k
    assert whole["coef"].shape == (5, 2, 5, 150) and whole["aux"].shape == (5, 2, 5, 2)
    # coef from its definition, with transformers' attention and ln_1 statistics
    t = trace(b16, px, 0)
    for jj, j in enumerate((1, 2)):
        a = t["att"][j][:, :, 0].numpy()                              # [B, H, N]
        w = a / t["ln1"][j][1].numpy()[:, None, :]
        assert rel(whole["coef"][:, jj], np.einsum("bht,btn->bhn", w, t["act"].numpy())) < 1e-5
        assert rel(whole["aux"][:, jj, :, 0], w.sum(-1)) < 1e-5
        mu = t["ln1"][j][0].numpy()
        assert rel(whole["aux"][:, jj, :, 1], np.einsum("bht,bt->bh", w, mu)) < 1e-4
    with pytest.raises(ValueError, match="scratch_budget"):
        model._core.neuron_coefs(px, 0, scratch_budget=-1)
