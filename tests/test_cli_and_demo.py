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
    for name in ("heatmaps.png", "segmentation.png", "head_roles.png", "ablation.png"):
        assert (out / name).stat().st_size > 1000, name
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"zero_shot", "heads", "ablation", "segmentation", "spurious"}
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
    assert "SIMD path" in p.stdout and "AVX512_BF16" in p.stdout
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
