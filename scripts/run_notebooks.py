"""Execute notebooks top to bottom and save them in place with their outputs (figures included).

    python scripts/run_notebooks.py notebooks/*.ipynb      (what `make notebooks` runs)

Each notebook runs in a fresh kernel from the repository root (so it imports this checkout),
with matplotlib's Agg backend. Outputs are committed so that a reader on a code host sees the
numbers and figures without running anything; tests/test_notebooks.py re-executes them and
checks their key numbers.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, timeout: int = 900) -> None:
    """Execute ``path`` in place; raises (and leaves the file as it was) if a cell fails."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory() as work:   # files the notebooks write go here
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": work}}).execute()
    for cell in nb.cells:                          # stable files: no per-run metadata
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(f"running {p}", flush=True)
        run(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
