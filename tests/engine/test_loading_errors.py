"""Bad inputs give one clear exception naming the problem, never a crash.

Broken weight files are tried twice: through ``clipdecomp.load`` in this process, and straight
through the C core (``clipdecomp._core.Model``) in a subprocess, which must survive every case
(a segmentation fault would show as a negative return code naming the case it died in).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import clipdecomp
from clipdecomp.engine.safetensors_io import SafetensorsError, SafetensorsFile

# ---------------------------------------------------------------------------------------------
# helpers to break a safetensors file


def read_raw(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + data)


def rewrite(src, dst, drop=(), replace=None):
    """Copy safetensors ``src`` to ``dst`` without the tensors ``drop`` and with
    ``replace = {name: float32 array}`` substituted (any shape)."""
    f = SafetensorsFile(src)
    tensors = {k: f.read(k) for k in f if k not in drop}
    tensors.update(replace or {})
    header, chunks, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    write_raw(dst, header, b"".join(chunks))


@pytest.fixture(scope="module")
def base(b32, tmp_path_factory):
    """A copy of the open_clip-layout checkpoint to break, and its config."""
    d = tmp_path_factory.mktemp("base")
    src = b32.dirs[("open_clip", "F32")]
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), d / name)
    return d


def variant(base, tmp_path, name, **kw):
    """A directory holding the base config and a modified weights file."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(base / "open_clip_config.json", d / "open_clip_config.json")
    rewrite(base / "open_clip_model.safetensors", d / "open_clip_model.safetensors", **kw)
    return d


# ---------------------------------------------------------------------------------------------
# files, through clipdecomp.load


def test_truncated_file(base, tmp_path):
    blob = (base / "open_clip_model.safetensors").read_bytes()
    d = tmp_path / "trunc"
    d.mkdir()
    shutil.copy(base / "open_clip_config.json", d)
    (d / "open_clip_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SafetensorsError, match="truncated"):
        clipdecomp.load(d)
    (d / "open_clip_model.safetensors").write_bytes(blob[:5])
    with pytest.raises(SafetensorsError, match="truncated or empty"):
        clipdecomp.load(d)


def test_header_pointing_outside_the_file(base, tmp_path):
    header, data = read_raw(base / "open_clip_model.safetensors")
    header["visual.proj"]["data_offsets"][1] = len(data) + 4096
    d = tmp_path / "outside"
    d.mkdir()
    shutil.copy(base / "open_clip_config.json", d)
    write_raw(d / "open_clip_model.safetensors", header, data)
    with pytest.raises(SafetensorsError, match="visual.proj.*outside"):
        clipdecomp.load(d)
    header["visual.proj"]["data_offsets"] = [0, 12]     # offsets that disagree with the shape
    write_raw(d / "open_clip_model.safetensors", header, data)
    with pytest.raises(SafetensorsError, match="visual.proj"):
        clipdecomp.load(d)
    (d / "open_clip_model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(SafetensorsError, match="invalid safetensors header: expected '{'"):
        clipdecomp.load(d)


def test_missing_tensor(base, tmp_path, requires_core):
    d = variant(base, tmp_path, "missing", drop=("visual.ln_post.weight",))
    with pytest.raises(Exception, match="visual.ln_post.weight") as e:
        clipdecomp.load(d)
    assert not isinstance(e.value, (SystemExit, KeyboardInterrupt))


def test_wrong_shape_tensor(base, tmp_path, requires_core):
    f = SafetensorsFile(base / "open_clip_model.safetensors")
    w, dim = f.shape("visual.proj")
    d = variant(base, tmp_path, "shape", replace={"visual.proj": np.zeros((w, dim + 1))})
    with pytest.raises(Exception, match="visual.proj"):
        clipdecomp.load(d)


def test_config_that_does_not_match_the_weights(base, tmp_path, requires_core):
    d = tmp_path / "mismatch"
    shutil.copytree(base, d)
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] *= 2
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="visual"):
        clipdecomp.load(d)


def test_unknown_layout(base, tmp_path):
    d = tmp_path / "unknown"
    d.mkdir()
    write_raw(d / "model.safetensors",
              {"encoder.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
              b"\0" * 8)
    with pytest.raises(ValueError, match="unknown layout"):
        clipdecomp.load(d / "model.safetensors", act="gelu")
    with pytest.raises(ValueError, match="unknown layout 'timm'"):
        clipdecomp.load(base, layout="timm")
    with pytest.raises(ValueError, match="'hf' was asked"):
        clipdecomp.load(base, layout="hf")


def test_pickle_files_are_refused_with_a_recipe(tmp_path):
    p = tmp_path / "open_clip_pytorch_model.bin"
    p.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="only .safetensors") as e:
        clipdecomp.load(p)
    assert "save_file" in str(e.value)
    with pytest.raises(ValueError, match="only pickled weights"):
        clipdecomp.load(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"PK")
    with pytest.raises(ValueError, match="safetensors"):
        clipdecomp.load(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="other.pt"):
        clipdecomp.load(tmp_path / "other.pt")


def test_missing_paths_and_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        clipdecomp.load(str(tmp_path / "nothing_here.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        clipdecomp.load(tmp_path)
    with pytest.raises(ValueError, match="pretrained="):
        clipdecomp.load("ViT-B-32")
    with pytest.raises(ValueError, match="known: .*openai"):
        clipdecomp.load("ViT-B-32", pretrained="no_such_tag")


def test_missing_config_without_act(base, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(base / "open_clip_model.safetensors", d)
    with pytest.raises(ValueError, match="act='quick_gelu'.*act='gelu'"):
        clipdecomp.load(d)
    with pytest.raises(ValueError, match="act='quick_gelu'"):
        clipdecomp.load(d, act="relu")


# ---------------------------------------------------------------------------------------------
# inputs, through a loaded model


@pytest.fixture(scope="module")
def model(base, requires_core):
    return clipdecomp.load(base, threads=1)


def test_image_that_is_not_an_image(model, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_text("<html>404</html>")
    with pytest.raises(ValueError, match="holiday.jpg"):
        model.encode_image([str(bad)], normalize=True)
    with pytest.raises(ValueError, match=r"images\[2\]"):
        model.decompose([np.zeros((9, 9, 3), np.uint8)] * 2 + [np.zeros((9, 9), np.float32)],
                        batch_size=2)


def test_nan_input(model):
    s = model.config.image_size
    px = np.zeros((2, 3, s, s), np.float32)
    px[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.encode_image(px, normalize=True)
    with pytest.raises(ValueError, match="NaN"):
        model.decompose(px)
    with pytest.raises(ValueError, match="NaN"):
        model.decompose(np.zeros((1, 3, s, s), np.float32)).project_tokens(
            np.full((1, model.config.embed_dim), np.nan))


def test_bad_text_ids(model):
    c = model.config
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(np.zeros((2, c.context_length + 1), np.int32), normalize=True)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        model.encode_text(np.full((1, c.context_length), c.vocab_size, np.int32), normalize=True)
    with pytest.raises(ValueError, match="strings"):
        model.encode_text(np.zeros((2, c.context_length), np.float32), normalize=True)


# ---------------------------------------------------------------------------------------------
# the C core directly, in a subprocess that must survive


CORE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clipdecomp import _core
    cases = json.loads(sys.argv[1])
    for name, path, cfg, pixels in cases:
        print("CASE", name, flush=True)
        try:
            m = _core.Model(path, cfg, "auto")
            if pixels is not None:
                px = np.full(pixels, np.nan, np.float32)
                m.encode_image(px)
            print("RESULT", name, "no error", flush=True)
        except Exception as e:
            print("RESULT", name, type(e).__name__, str(e).replace("\\n", " "), flush=True)
""")


def test_core_survives_broken_files(base, tmp_path, requires_core):
    from clipdecomp.engine.config import read_config_file

    cfg = read_config_file(base / "open_clip_config.json")[0].to_core_dict()
    s = cfg["image_size"]
    header, data = read_raw(base / "open_clip_model.safetensors")
    full = (base / "open_clip_model.safetensors").read_bytes()
    files = {}
    (tmp_path / "trunc.safetensors").write_bytes(full[: len(full) // 2])
    files["truncated"] = tmp_path / "trunc.safetensors"
    (tmp_path / "tiny.safetensors").write_bytes(full[:3])
    files["three_bytes"] = tmp_path / "tiny.safetensors"
    bad = json.loads(json.dumps(header))
    bad["visual.proj"]["data_offsets"][1] = len(data) + 4096
    write_raw(tmp_path / "outside.safetensors", bad, data)
    files["outside"] = tmp_path / "outside.safetensors"
    huge = struct.pack("<Q", 2**62) + b"{}"
    (tmp_path / "huge.safetensors").write_bytes(huge)
    files["huge_header_length"] = tmp_path / "huge.safetensors"
    rewrite(base / "open_clip_model.safetensors", tmp_path / "missing.safetensors",
            drop=("visual.ln_post.weight",))
    files["missing"] = tmp_path / "missing.safetensors"
    w, dim = SafetensorsFile(base / "open_clip_model.safetensors").shape("visual.proj")
    rewrite(base / "open_clip_model.safetensors", tmp_path / "shape.safetensors",
            replace={"visual.proj": np.zeros((w, dim + 1))})
    files["wrong_shape"] = tmp_path / "shape.safetensors"
    files["no_such_file"] = tmp_path / "nope.safetensors"
    cases = [[k, str(v), cfg, None] for k, v in files.items()]
    cases.append(["bad_config", str(base / "open_clip_model.safetensors"),
                  dict(cfg, heads=7), None])
    cases.append(["nan_pixels", str(base / "open_clip_model.safetensors"), cfg, [1, 3, s, s]])
    proc = subprocess.run([sys.executable, "-c", CORE_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout
    assert proc.returncode == 0, (
        f"the interpreter died (code {proc.returncode}) in case "
        f"{[ln for ln in out.splitlines() if ln.startswith('CASE')][-1:]}\n{proc.stderr[-2000:]}")
    results = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("RESULT")}
    assert set(results) == {c[0] for c in cases}
    for name, line in results.items():
        assert "no error" not in line, f"{name}: the requires_core accepted a broken input"
    assert "visual.ln_post.weight" in results["missing"]
    assert "visual.proj" in results["wrong_shape"]
    assert "NaN" in results["nan_pixels"] or "nan" in results["nan_pixels"].lower()
