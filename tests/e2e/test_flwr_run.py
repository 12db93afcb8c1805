"""Runs through `flwr run` (simulation, Ray backend) for every baseline, and bad config."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY

pytestmark = pytest.mark.slow

BASELINES = ["fedavg", "fedavg_ft", "fedprox", "fedbn", "local", "ditto"]


@pytest.mark.parametrize("strategy", BASELINES)
def test_two_rounds_write_every_output(flwr_runner, strategy):
    out = flwr_runner.run(strategy, f"{TINY} strategy={strategy} num_rounds=2")
    # deterministic (default true) applied in the ServerApp and in every ClientApp process
    # that answered a node's identity query (server_app.run logs what the nodes reported).
    assert ("deterministic algorithms on in the ServerApp, on in 4 of 4 ClientApp nodes"
            in flwr_runner.last_log)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "personalized_accuracy", "global_accuracy", "bytes_up", "bytes_down",
                "seconds"} <= set(row)
    results = flwr_runner.results(out)
    final = results["last_evaluated_round"]["personalized_accuracy"]
    assert 0.0 <= final["worst"] <= final["mean"] <= 1.0
    assert final["mean"] > 0.25  # chance is 0.1 on ten digit classes
    assert len(results["per_client_accuracy"]) == 4
    assert results["wall_seconds"] > 0
    if strategy == "local":  # nothing is aggregated: no model travels either way
        assert results["bytes_up"] == 0 and results["bytes_down"] == 0
    else:
        assert results["bytes_up"] > 0 and results["bytes_down"] > results["bytes_up"]


def test_plain_flwr_run_with_the_default_two_supernodes(flwr_runner):
    """`flwr run .` alone (Flower's default: 2 SuperNodes): each node hosts half the clients."""
    out = flwr_runner.run("plain", f"{TINY} strategy=ditto num_rounds=2", num_supernodes=None)
    results = flwr_runner.results(out)
    assert sorted(results["per_client_accuracy"]) == ["0", "1", "2", "3"]
    assert results["last_evaluated_round"]["personalized_accuracy"]["mean"] > 0.25


def test_more_supernodes_than_clients_is_a_clear_error(flwr_runner):
    out = flwr_runner.run("wrong-size", f"{TINY} strategy=fedavg num_rounds=1 node_wait_timeout=60",
                          num_supernodes=5, check=False)
    assert "num-partitions=5, but the config's federation has 4 clients" in flwr_runner.last_log
    assert not (out / "results.json").exists()
