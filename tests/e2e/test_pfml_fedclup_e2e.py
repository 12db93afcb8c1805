"""PFML through `flwr run` (simulation, Ray backend) and FedCLUP in-process: two rounds each.

FedCLUP's messages are the train and evaluate messages of the baselines, which `flwr run`
carries in test_flwr_run.py and elsewhere; what is checked here (lam adapted once, logged every
round) is the server's, so it runs over ``tests/fake_grid.py`` with the real ServerApp and
ClientApp handlers and Flower's protobuf encoding (a `flwr run` would add ~25 s of start-up).
"""

from __future__ import annotations

import json

import pytest

from ..fake_grid import InProcessRunner
from .conftest import TINY

pytestmark = pytest.mark.slow


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pfml_reports_personal_and_global_accuracy(flwr_runner):
    out = flwr_runner.run("pfml", f"{TINY} strategy=pfml strategy.K=1 strategy.beta=2 num_rounds=2")
    # deterministic (default true) applied in the ServerApp and in the ClientApp process of
    # each of the 4 SuperNodes (what their identity replies said).
    assert ("deterministic algorithms on in the ServerApp, on in 4 of 4 ClientApp nodes"
            in flwr_runner.last_log)
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["rejected_replies"] == 0 and r["global_accuracy"] is not None for r in rows)
    results = flwr_runner.results(out)
    final = results["last_evaluated_round"]["personalized_accuracy"]
    assert final["mean"] > 0.25  # chance is 0.1 on ten digit classes
    assert len(results["per_client_accuracy"]) == 4
    assert results["bytes_up"] > 0 and results["bytes_down"] > 0


def test_fedclup_adapts_lam_and_logs_it_every_round(tmp_path):
    flwr_runner = InProcessRunner(tmp_path)
    out = flwr_runner.run("fedclup", f"{TINY} strategy=fedclup strategy.lam=0.5 strategy.adaptive=true "
                                     "strategy.adapt_at=0.5 num_rounds=2")
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["fedclup_lam"] == 0.5 and rows[0]["fedclup_eta_g"] == 2.0
    # Round 2 trains with the lam set from R^ after round 1.
    assert rows[1]["fedclup_lam"] != 0.5 and rows[1]["fedclup_lam"] > 0
    assert all(r["fedclup_R"] > 0 and r["rejected_replies"] == 0 for r in rows)
    final = flwr_runner.results(out)["last_evaluated_round"]["personalized_accuracy"]
    assert final["mean"] > 0.25
