"""The local backend (task/run/local.py) against `flwr run`: the same seed, the same numbers.

One tiny two-round run each way (LG-Mix: a training, a personalize and an evaluation phase a
round, personal state kept in each node's context); every metrics.jsonl row must agree key for
key, but for what depends on the clock or the transport (``TRANSPORT_KEYS``), and so must
results.json and the personal model each client ends with (the checkpoint's global state).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from task.run.local import run_local

from .conftest import TINY

pytestmark = pytest.mark.slow

# seconds: the clock; hosts: which Ray host answered (Ray runs only under `flwr run`).
TRANSPORT_KEYS = {"seconds", "hosts"}
RESULT_CLOCK_KEYS = {"wall_seconds"}
OVERRIDES = f"{TINY} strategy=lgmix num_rounds=2"


def untimed(row: dict | None) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if k not in TRANSPORT_KEYS}


def rows(out: Path) -> list[dict]:
    return [untimed(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def results(out: Path) -> dict:
    """results.json but for its clock, and the rows it quotes but for theirs."""
    found = json.loads((out / "results.json").read_text())
    return {k: untimed(v) if k.endswith("_round") else v
            for k, v in found.items() if k not in RESULT_CLOCK_KEYS}


def test_local_backend_gives_flwr_runs_numbers_round_by_round(flwr_runner, tmp_path):
    flwr_out = flwr_runner.run("flwr", OVERRIDES, num_supernodes=4)
    local_out = tmp_path / "local"
    outcome = run_local(f"{OVERRIDES} output_dir={local_out}", 4, local_out)
    assert outcome.status == "completed", outcome.error
    want, got = rows(flwr_out), rows(local_out)
    assert [r["round"] for r in got] == [1, 2]
    for mine, theirs in zip(got, want, strict=True):
        assert mine == theirs, {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
                                if mine.get(k) != theirs.get(k)}
    assert results(local_out) == results(flwr_out)
    with np.load(flwr_out / "checkpoint.npz") as a, np.load(local_out / "checkpoint.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert sorted(p.name for p in local_out.iterdir()) == sorted(
        p.name for p in flwr_out.iterdir() if p.name != "flower.log")
