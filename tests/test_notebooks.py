"""Every notebook in notebooks/ executes top to bottom, and its key numbers are right.

After the notebook's own cells, a check cell runs in the same kernel: it recomputes each key
number independently where it can (plain NumPy from the model's embeddings, not the function
the notebook shows) and prints them as JSON; the tests assert on them. The committed notebooks
carry their outputs (``make notebooks`` writes them); these tests never write the files.
"""
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

CHECKS = {
    "quickstart.ipynb": """
import json
import numpy as np
emb1 = model.encode_image(list(single.images), normalize=True)
m = clipdecomp.segmentation_metrics(seg.scores, single.foreground[:32], masks=seg.masks,
                                    degenerate=seg.degenerate)
print("KEY", json.dumps({
    "identity": float(np.abs(total - dec.embedding / dec.norm[:, None]).max()),
    "baseline": float(table.set_index("ablation").loc["baseline", "accuracy"]),
    "accuracy_direct": float(((emb1 @ clf).argmax(1) == single.labels["color"][:, 0]).mean()),
    "miou": float(m["miou"]),
    "n_heads": int(len(heads)),
    "n_background": len(background),
    "unit_norm_error": float(np.abs(np.linalg.norm(emb, axis=1) - 1).max()),
    "maps_shape": list(maps.shape),
}))
""",
    "heads.ipynb": """
import json
import numpy as np
direct = {a: float(((dec.embedding @ w).argmax(1) == labels[a]).mean())
          for a, w in classifiers.items()}
# the repair again in NumPy: the background heads' terms replaced by their reference means
d_ref = model.decompose(list(reference.images))
x = dec_test.embedding / dec_test.norm[:, None]
for layer, head in background_heads:
    x = x - (dec_test.heads[:, layer, head] - d_ref.heads[:, layer, head].mean(0))
def worst(e):
    hit = (e @ w).argmax(1) == test.labels["y"]
    return min(float(hit[test.labels["group"] == g].mean()) for g in range(4))
print("KEY", json.dumps({
    "worst_before_direct": worst(dec_test.embedding), "worst_after_direct": worst(x),
    "identity": float(np.abs(gap).max()),
    "accuracy_direct": direct,
    "baseline": float(study.set_index("ablation").loc["baseline", "accuracy"]),
    "n_table": int(len(heads_table)),
    "curve_baseline": float(curve["accuracy"].iloc[0]),
    "curve_last": float(curve["accuracy"].iloc[-1]),
    "worst_before": float(min(before)), "worst_after": float(min(after)),
    "saved_repair_diff": float(np.abs(emb - repaired.encode_image(list(test.images[:8]),
                                                                  normalize=True)).max()),
    "n_layers": int(model.config.layers), "n_heads": int(model.config.heads),
}))
""",
    "spatial.ipynb": """
import json
import numpy as np
print("KEY", json.dumps({
    "identity": float(np.abs(maps[b].sum((1, 2)) + cls_part + mlp_part - cosine[0]).max()),
    "miou": {k: float(v) for k, v in table["miou"].items()},
    "colour_accuracy": float(accuracy),
    "maps_shape": list(maps.shape),
}))
""",
}


def run_with_check(path: Path, tmp_path: Path, monkeypatch) -> dict:
    """Execute the notebook plus its check cell; the check cell's numbers."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    line = next(ln for ln in text.splitlines() if ln.startswith("KEY "))
    return json.loads(line[4:])


def test_quickstart(tmp_path, monkeypatch):
    k = run_with_check(ROOT / "notebooks" / "quickstart.ipynb", tmp_path, monkeypatch)
    assert k["identity"] < 1e-4                        # the terms add up to the unit embedding
    # the ablation table's baseline is plain zero-shot accuracy on the same images
    assert k["baseline"] == pytest.approx(k["accuracy_direct"], abs=1e-12)
    assert k["accuracy_direct"] > 0.9                  # colour: chance is 1/9
    assert k["miou"] > 0.4                             # the demo's 71% on the same kind of scenes
    assert k["n_heads"] == 2 * 6                       # two layers of six heads were labelled
    assert k["n_background"] >= 1                      # background heads were found and ablated
    assert k["unit_norm_error"] < 1e-5
    assert k["maps_shape"] == [64, 4, 8, 8]


def test_heads(tmp_path, monkeypatch):
    k = run_with_check(ROOT / "notebooks" / "heads.ipynb", tmp_path, monkeypatch)
    assert k["identity"] < 1e-4
    acc = k["accuracy_direct"]
    assert acc["color"] > 0.9 and acc["background"] > 0.9     # chance 1/9 and 1/6
    assert k["baseline"] == pytest.approx(acc["shape"], abs=1e-12)
    assert k["n_table"] == 4 * k["n_heads"]                   # the last four layers
    assert k["curve_baseline"] == pytest.approx(acc["shape"], abs=1e-12)
    assert k["worst_before"] == pytest.approx(k["worst_before_direct"])
    assert k["worst_after"] == pytest.approx(k["worst_after_direct"])
    # the buoy/crate names lean on the ground, and the repair lifts the worst group
    assert k["worst_before"] < 0.6                            # measured 0.44
    assert k["worst_after"] - k["worst_before"] >= 0.15       # measured 0.94
    assert k["saved_repair_diff"] < 1e-6                      # saved and loaded: the same model


def test_spatial(tmp_path, monkeypatch):
    k = run_with_check(ROOT / "notebooks" / "spatial.ipynb", tmp_path, monkeypatch)
    # patches + class token + MLPs = cosine similarity of image and text
    assert k["identity"] < 1e-4
    miou = k["miou"]
    assert miou["decomposition"] > miou["raw attention"]
    assert miou["decomposition"] > miou["all foreground"]
    assert k["colour_accuracy"] > 0.9
    assert k["maps_shape"][0] == 6 and k["maps_shape"][2:] == [8, 8]   # [B, T, G, G]


def test_there_are_notebooks_with_outputs():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "heads.ipynb", "spatial.ipynb"} <= names
    assert set(CHECKS) == names                                # every notebook is checked
    for p in NOTEBOOKS:                                        # committed with their outputs
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), p.name
        assert any(o.get("output_type") in ("display_data", "execute_result")
                   and {"image/png", "image/jpeg"} & set(o.get("data", {}))
                   for c in code for o in c.outputs), p.name
