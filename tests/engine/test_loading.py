"""Config parsing, the pretrained table, hub resolution and the ways of calling ``load``."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

import clipdecomp
from clipdecomp.engine import hub
from clipdecomp.engine.config import (
    ModelConfig,
    config_from_hf,
    config_from_open_clip,
    config_from_tensors,
    read_config_file,
    resolve_act,
)
from clipdecomp.engine.safetensors_io import SafetensorsFile

# ---------------------------------------------------------------------------------------------
# open_clip configs

VIT_B_32 = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                         "layers": 12}}


def test_open_clip_bare_and_full_configs():
    cfg, explicit = config_from_open_clip(VIT_B_32)
    assert (cfg.heads, cfg.mlp_dim, cfg.grid, cfg.n_tokens, cfg.head_dim) == (12, 3072, 7, 50, 64)
    assert cfg.act == "gelu" and not explicit            # open_clip's default without the key
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim) == (512, 12, 8,
                                                                                  2048)
    full = {"model_cfg": dict(VIT_B_32, quick_gelu=True),
            "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}}
    cfg, explicit = config_from_open_clip(full)
    assert cfg.act == cfg.text_act == "quick_gelu" and explicit
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.resize_mode == "squash"
    assert config_from_open_clip(dict(VIT_B_32, quick_gelu=False))[0].act == "gelu"


@pytest.mark.parametrize("name,heads,mlp,n", [("ViT-H-14", 16, 5120, 257),
                                              ("ViT-g-14", 16, 6144, 257),
                                              ("ViT-bigG-14", 16, 8192, 257),
                                              ("ViT-L-14-336", 16, 4096, 577)])
def test_big_architectures(name, heads, mlp, n):
    cfg, _ = config_from_open_clip(hub.arch_config(name))
    assert (cfg.heads, cfg.mlp_dim, cfg.n_tokens) == (heads, mlp, n)


def test_unsupported_open_clip_towers_are_named():
    with pytest.raises(ValueError, match="timm model 'eva"):
        config_from_open_clip({"embed_dim": 512, "vision_cfg": {"timm_model_name": "eva_x"}})
    with pytest.raises(ValueError, match="ResNet"):
        config_from_open_clip({"embed_dim": 512, "vision_cfg": {"layers": [3, 4, 6, 3]}})
    with pytest.raises(ValueError, match="layer scale"):
        config_from_open_clip({"embed_dim": 512, "vision_cfg": {"ls_init_value": 1e-5}})
    with pytest.warns(UserWarning, match="Hugging Face text model"):
        cfg, _ = config_from_open_clip(dict(VIT_B_32, text_cfg={"hf_model_name": "roberta"}))
    assert not cfg.has_text


# ---------------------------------------------------------------------------------------------
# transformers configs


def test_hf_defaults_apply():
    cfg = config_from_hf({"model_type": "clip", "vision_config": {"patch_size": 16},
                          "text_config": {}})
    assert cfg.act == cfg.text_act == "quick_gelu"      # transformers' default hidden_act
    assert (cfg.image_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.embed_dim) == (
        224, 768, 12, 12, 3072, 512)
    assert (cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.context_length) == (512, 8, 12,
                                                                                    77)
    gelu = config_from_hf({"model_type": "clip", "projection_dim": 1024,
                           "vision_config": {"hidden_act": "gelu", "hidden_size": 1280,
                                             "num_attention_heads": 16, "patch_size": 14},
                           "text_config": {"hidden_act": "gelu"}},
                          preprocessor={"image_mean": [0.5] * 3, "image_std": [0.25] * 3,
                                        "resample": 2})
    assert gelu.act == gelu.text_act == "gelu" and gelu.embed_dim == 1024 and gelu.heads == 16
    assert gelu.mean == (0.5,) * 3 and gelu.std == (0.25,) * 3
    assert gelu.interpolation == "bilinear"


def test_hf_standalone_and_wrong_configs():
    vis = config_from_hf({"model_type": "clip_vision_model", "hidden_size": 64,
                          "num_attention_heads": 4, "projection_dim": 32, "image_size": 64,
                          "patch_size": 16})
    assert not vis.has_text and vis.embed_dim == 32
    with pytest.raises(ValueError, match="text-only"):
        config_from_hf({"model_type": "clip_text_model"})
    with pytest.raises(ValueError, match="not a CLIP config"):
        config_from_hf({"architecture": "vit_base_patch16_clip_224", "num_classes": 512})
    with pytest.raises(ValueError, match="gelu_new"):
        config_from_hf({"model_type": "clip", "vision_config": {"hidden_act": "gelu_new"}})


def test_model_config_checks_itself():
    with pytest.raises(ValueError, match="multiple of heads"):
        ModelConfig(224, 16, 768, 12, 7, 3072, 512, "gelu")
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig(224, 15, 768, 12, 12, 3072, 512, "gelu")
    cfg = ModelConfig(224, 16, 768, 12, 12, 3072, 512, "quick_gelu")
    core = cfg.to_core_dict()
    assert core["text_layers"] == 0 and core["text_act"] == "quick_gelu"
    assert set(core) == {"image_size", "patch_size", "width", "layers", "heads", "mlp_dim",
                         "embed_dim", "act", "ln_eps", "context_length", "vocab_size",
                         "text_width", "text_layers", "text_heads", "text_mlp_dim", "text_act"}


def test_activation_rule():
    cfg, _ = config_from_open_clip(VIT_B_32)
    assert resolve_act("quick_gelu", cfg, False, "x") == ("quick_gelu", "act= argument")
    assert resolve_act(None, cfg, False, "x")[0] == "gelu"
    assert resolve_act(None, None, False, "x", table_act="quick_gelu")[0] == "quick_gelu"
    with pytest.raises(ValueError, match="act="):
        resolve_act(None, None, False, "x")
    explicit, _ = config_from_open_clip(dict(VIT_B_32, quick_gelu=False))
    with pytest.warns(UserWarning, match="pretrained table"):
        assert resolve_act(None, explicit, True, "x", "quick_gelu")[0] == "quick_gelu"


def test_geometry_from_tensor_shapes(b16):
    f = SafetensorsFile(b16.file("open_clip"))
    shapes = {k: f.tensors[k].shape for k in f}
    with pytest.warns(UserWarning, match="no config file"):
        cfg = config_from_tensors(shapes, act="gelu")
    want, _ = read_config_file(os.path.join(b16.dirs[("open_clip", "F32")],
                                            "open_clip_config.json"))
    for k in ("image_size", "patch_size", "width", "layers", "mlp_dim", "embed_dim",
              "context_length", "vocab_size", "text_width", "text_layers", "text_mlp_dim"):
        assert getattr(cfg, k) == getattr(want, k), k
    hf = SafetensorsFile(b16.file("hf"))
    with pytest.warns(UserWarning):
        cfg_hf = config_from_tensors({k: hf.tensors[k].shape for k in hf}, act="gelu")
    assert cfg_hf.replace(name="") == cfg.replace(name="")


# ---------------------------------------------------------------------------------------------
# the pretrained table


def test_pretrained_table():
    pairs = clipdecomp.list_pretrained()
    for pair in [("ViT-B-32", "openai"), ("ViT-B-16", "openai"), ("ViT-L-14", "openai"),
                 ("ViT-L-14-336", "openai"), ("ViT-H-14", "laion2b_s32b_b79k"),
                 ("ViT-bigG-14", "laion2b_s39b_b160k"), ("ViT-H-14", "dfn5b"),
                 ("ViT-L-14", "metaclip_fullcc"), ("ViT-B-16-quickgelu", "openai")]:
        assert pair in pairs, pair
    assert "ViT-B-32:openai" in hub.list_pretrained(as_str=True)
    e = hub.get_entry("ViT-B/16", "openai")
    assert e.repo == "timm/vit_base_patch16_clip_224.openai" and e.act == "quick_gelu"
    assert hub.get_entry("ViT-B-32", "laion2b_s34b_b79k").act == "gelu"
    assert hub.get_entry("ViT-L-14", "laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)
    dfn = hub.get_entry("ViT-H-14", "dfn5b")
    assert dfn.act == "quick_gelu" and dfn.resize_mode == "squash" and not dfn.safetensors
    assert hub.entry_for_repo("TIMM/vit_base_patch32_clip_224.openai").model == "ViT-B-32"
    with pytest.raises(ValueError, match="known: .*laion2b"):
        hub.get_entry("ViT-B-32", "laion5b")
    with pytest.raises(ValueError, match="unknown model 'RN50'"):
        hub.get_entry("RN50", "openai")


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        hub.download("timm/vit_base_patch32_clip_224.openai")
    with pytest.raises(ImportError, match="huggingface_hub"):
        clipdecomp.load("hf-hub:timm/vit_base_patch32_clip_224.openai")


def _fake_cache(root, repo: str, files: dict) -> None:
    """A Hugging Face hub cache holding ``files`` (name -> source path) for ``repo``."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    snap = os.path.join(base, "snapshots", "0" * 40)
    os.makedirs(snap)
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as fh:
        fh.write("0" * 40)
    for name, src in files.items():
        shutil.copy(src, os.path.join(snap, name))


def test_hub_download_from_cache(b32, tmp_path):
    d = b32.dirs[("open_clip", "F32")]
    _fake_cache(tmp_path, "someone/tiny-clip",
                {n: os.path.join(d, n) for n in os.listdir(d)})
    path = hub.download("someone/tiny-clip", cache_dir=str(tmp_path), local_files_only=True)
    assert path.endswith("open_clip_model.safetensors")
    assert os.path.isfile(os.path.join(os.path.dirname(path), "open_clip_config.json"))
    with pytest.raises(RuntimeError, match="'someone/other'.*no cached copy"):
        hub.download("someone/other", cache_dir=str(tmp_path), local_files_only=True)
    # timm's model.safetensors beside a non-CLIP config.json is not taken for CLIP weights
    _fake_cache(tmp_path, "someone/timm-only", {"model.safetensors": b32.file("hf")})
    with open(tmp_path / "cfg.json", "w") as fh:
        json.dump({"architecture": "vit_base_patch32_clip_224"}, fh)
    shutil.copy(tmp_path / "cfg.json", os.path.join(
        tmp_path, "models--someone--timm-only", "snapshots", "0" * 40, "config.json"))
    with pytest.raises(RuntimeError, match="timm-only"):
        hub.download("someone/timm-only", cache_dir=str(tmp_path), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# load(), every way in (needs the C core)


@pytest.mark.usefixtures("requires_core")
def test_load_file_directory_and_config(b16, tmp_path):
    d = b16.dirs[("open_clip", "F32")]
    a = clipdecomp.load(d, threads=1)
    b = clipdecomp.load(os.path.join(d, "open_clip_model.safetensors"), threads=1)
    assert a.config == b.config and a.act_source.startswith("open_clip default")
    # a bare weights file with its config given explicitly (a path, a dict, a ModelConfig)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(d, "open_clip_model.safetensors"), lone / "w.safetensors")
    cfg_path = os.path.join(d, "open_clip_config.json")
    with open(cfg_path) as fh:
        full = json.load(fh)
    for given in (cfg_path, full, full["model_cfg"], a.config):
        m = clipdecomp.load(lone / "w.safetensors", config=given, threads=1)
        assert m.config.replace(name="") == a.config.replace(name="")
    px = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert np.allclose(m.encode_image(px, normalize=True), a.encode_image(px, normalize=True),
                       atol=1e-6)
    # no config at all: act= makes it loadable, the geometry coming from the shapes
    with pytest.warns(UserWarning, match="no config file"):
        g = clipdecomp.load(lone / "w.safetensors", act="gelu", threads=1)
    assert g.act_source == "act= argument" and g.config.width == a.config.width
    assert "act gelu (act= argument)" in repr(g)


@pytest.mark.usefixtures("requires_core")
def test_load_through_the_hub_names(b16, monkeypatch):
    weights = b16.file("open_clip")
    asked = []
    monkeypatch.setattr(hub, "download", lambda repo, **kw: asked.append(repo) or weights)
    m = clipdecomp.load("hf-hub:timm/vit_base_patch16_clip_224.openai", threads=1)
    # the table's activation wins over the config's silence, as in open_clip
    assert m.config.act == "quick_gelu" and m.act_source == "pretrained table"
    m = clipdecomp.load("ViT-B-16", pretrained="openai", threads=1)
    assert m.config.name == "ViT-B-16/openai" and m.config.act == "quick_gelu"
    m = clipdecomp.load("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", threads=1)
    assert m.config.act == "gelu"
    m = clipdecomp.load("someone/unknown-repo", threads=1)
    assert m.act_source.startswith("open_clip default")
    assert asked == ["timm/vit_base_patch16_clip_224.openai",
                     "timm/vit_base_patch16_clip_224.openai",
                     "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "someone/unknown-repo"]


@pytest.mark.usefixtures("requires_core")
def test_load_architecture_name_with_local_weights(b32, monkeypatch, tmp_path):
    spec = b32.model.config
    v, t = spec.vision_config, spec.text_config
    tiny = {"embed_dim": spec.projection_dim, "quick_gelu": True,
            "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers,
                           "width": v.hidden_size, "patch_size": v.patch_size,
                           "head_width": v.hidden_size // v.num_attention_heads,
                           "mlp_ratio": v.intermediate_size / v.hidden_size},
            "text_cfg": {"context_length": t.max_position_embeddings,
                         "vocab_size": t.vocab_size, "width": t.hidden_size,
                         "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                         "mlp_ratio": t.intermediate_size / t.hidden_size}}
    monkeypatch.setitem(hub._ARCH, "Tiny-32", tiny)
    lone = tmp_path / "w.safetensors"
    shutil.copy(b32.file("hf"), lone)
    m = clipdecomp.load("Tiny-32", pretrained=str(lone), threads=1)
    assert m.config.act == "quick_gelu" and m.layout == "hf" and m.config.heads == 4
    with pytest.raises(ValueError, match="unknown architecture 'Nope-1'"):
        clipdecomp.load("Nope-1", pretrained=str(lone))


@pytest.mark.usefixtures("requires_core")
def test_checkpoint_without_text_tower(b32, tmp_path):
    from safetensors.numpy import save_file

    f = SafetensorsFile(b32.file("open_clip"))
    vision = {k: f.read(k) for k in f if k.startswith("visual.")}
    d = tmp_path / "vision_only"
    d.mkdir()
    save_file(vision, str(d / "open_clip_model.safetensors"))
    shutil.copy(os.path.join(b32.dirs[("open_clip", "F32")], "open_clip_config.json"), d)
    m = clipdecomp.load(d, threads=1)
    assert not m.config.has_text and m.logit_scale is None and m.tokenizer is None
    with pytest.raises(ValueError, match="no text tower"):
        m.encode_text(["a cat"], normalize=True)
    with pytest.raises(ValueError, match="no tokenizer"):
        m.tokenize(["a cat"])
    px = np.zeros((1, 3, 96, 96), np.float32)
    full = clipdecomp.load(b32.dirs[("open_clip", "F32")], threads=1)
    assert np.allclose(m.encode_image(px, normalize=True), full.encode_image(px, normalize=True),
                       atol=1e-6)


@pytest.mark.usefixtures("requires_core")
def test_threads_default_and_repr(b32, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    m = clipdecomp.load(b32.dirs[("hf", "F32")])
    assert m.threads == 3
    m.threads = 1
    with pytest.raises(ValueError, match="threads"):
        m.threads = 0
    text = repr(m)
    assert "hf layout" in text and "quick_gelu" in text and "logit_scale" in text


def test_safetensors_reader_dtypes(b16):
    """F16 / BF16 tensors read back as the float32 values torch rounds them to."""
    import torch
    from safetensors.torch import load_file

    for dtype in ("F16", "BF16"):
        path = b16.file("hf", dtype)
        f = SafetensorsFile(path)
        ref = load_file(path)
        assert len(f) == len(ref)
        for k, v in ref.items():
            got = f.read(k)
            assert got.dtype == np.float32 and got.shape == tuple(v.shape)
            assert np.array_equal(got, v.to(torch.float32).numpy()), (dtype, k)
    assert float(np.exp(f.read("logit_scale"))) == pytest.approx(
        float(b16.model.logit_scale.detach().exp()), rel=1e-2)
