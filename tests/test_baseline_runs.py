"""Every baseline's outputs, in-process, and a federation that does not fit the config.

The real ServerApp and ClientApp handlers over ``tests/fake_grid.py``, every message through
Flower's protobuf encoding: what a baseline writes and reports does not depend on the
transport, and a `flwr run` per baseline cost ~25 s of start-up each.
tests/e2e/test_flwr_run.py asserts the same outputs of one `flwr run` (Flower's default
federation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .fake_grid import InProcessRunner
from .helpers import RUN_TINY as TINY

pytestmark = pytest.mark.slow

BASELINES = ["fedavg", "fedavg_ft", "fedprox", "fedbn", "local", "ditto", "fedper", "fedrep", "fedbabu",
             "lgfedavg", "apfl", "fedrod", "fml"]


def check_outputs(out: Path, results: dict, strategy: str) -> None:
    """What every two-round run writes: files, one metrics row a round, results above chance."""
    for name in ("config.yaml", "metrics.jsonl", "results.json", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "personalized_accuracy", "global_accuracy", "bytes_up", "bytes_down",
                "seconds"} <= set(row)
    final = results["last_evaluated_round"]["personalized_accuracy"]
    assert 0.0 <= final["worst"] <= final["mean"] <= 1.0
    assert final["mean"] > 0.25  # chance is 0.1 on ten digit classes
    assert sorted(results["per_client_accuracy"]) == ["0", "1", "2", "3"]
    assert results["wall_seconds"] > 0
    if strategy == "local":  # nothing is aggregated: no model travels either way
        assert results["bytes_up"] == 0 and results["bytes_down"] == 0
    else:  # every sampled client is sent the model it uploads again; evaluation's bytes apart
        assert results["bytes_up"] > 0 and results["bytes_down"] >= results["bytes_up"]
        assert results["eval_bytes_down"] > 0


@pytest.mark.parametrize("strategy", BASELINES)
def test_two_rounds_write_every_output(tmp_path, strategy):
    runner = InProcessRunner(tmp_path)
    out = runner.run(strategy, f"{TINY} strategy={strategy} num_rounds=2")
    check_outputs(out, runner.results(out), strategy)


def test_more_supernodes_than_clients_is_a_clear_error(tmp_path):
    runner = InProcessRunner(tmp_path)
    out = runner.run("wrong-size", f"{TINY} strategy=fedavg num_rounds=1 node_wait_timeout=60",
                     num_supernodes=5, check=False)
    assert "num-partitions=5, but the config's federation has 4 clients" in runner.last_log
    assert not (out / "results.json").exists()
