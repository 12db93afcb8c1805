"""examples/quickstart.py end to end, as a user runs it (a tiny run through pflower.run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

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
