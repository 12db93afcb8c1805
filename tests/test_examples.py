"""examples/quickstart.py end to end, as a user runs it (a tiny run through pflower.run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quickstart_runs_prints_and_plots(tmp_path):
    out = tmp_path / "quickstart"
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/quickstart.py"), "num_rounds=2",
                           f"output_dir={out}"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert f"final personal accuracy {results['final_accuracy']['mean']:.3f}" in proc.stdout
    # stdout is a pipe here: the progress display's plain line a round, no bar
    assert "round 2/2 | train loss" in proc.stdout and "━" not in proc.stdout
    assert (out / "quickstart.png").stat().st_size > 0


# The notebook's code cells, run in order in one namespace, as a kernel would (no Jupyter here).
RUN_CELLS = """
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
ns = {}
for cell in cells:
    exec("".join(cell["source"]).replace("num_rounds=5", "num_rounds=2"), ns)
print("RESULT", json.dumps({"rounds": len(ns["results"]["rounds"]), "dir": str(ns["results"]["output_dir"])}))
"""


def test_the_quickstart_notebooks_cells_run(tmp_path):
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", RUN_CELLS, str(ROOT / "examples/quickstart.ipynb")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert found["rounds"] == 2 and Path(found["dir"]).parent == tmp_path / "outputs"
    assert "final personal accuracy" in proc.stdout
