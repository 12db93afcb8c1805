"""clients.csv (task/run/client_table.py): one line per client and round, agreeing with the
round's summaries in metrics.jsonl; cut back with metrics.jsonl on a resume."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest

from task.run.client_table import COLUMNS
from task.run.outputs import RunOutputs

from .fake_grid import InProcessRunner
from .helpers import TINY


def read_csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_clients_csv_agrees_with_the_rounds_summaries(tmp_path):
    overrides = (f"{TINY} strategy=fedavg num_rounds=2 eval_every=2 fraction_train=0.5 "
                 "partition.val_fraction=0.2 logger=none")
    out = InProcessRunner(tmp_path).run("run", overrides)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = read_csv(out / "clients.csv")
    assert tuple(lines[0]) == COLUMNS
    first = [x for x in lines if x["round"] == "1"]  # not evaluated: only the 2 clients that trained
    assert len(first) == 2 and all(x["trained"] == "1" and x["personal_accuracy"] == "" for x in first)
    last = [x for x in lines if x["round"] == "2"]
    assert [int(x["client"]) for x in last] == [0, 1, 2, 3]  # all evaluated, 2 trained
    assert sum(int(x["trained"]) for x in last) == 2
    assert [x["group"] for x in last] == ["plain", "plain", "inverted", "inverted"]
    acc = [float(x["personal_accuracy"]) for x in last]
    tests = [int(x["test_samples"]) for x in last]
    summary = rows[1]["personalized_accuracy"]
    assert sum(acc) / 4 == pytest.approx(summary["mean"]) and min(acc) == pytest.approx(summary["worst"])
    weighted = sum(a * n for a, n in zip(acc, tests, strict=True)) / sum(tests)
    assert weighted == pytest.approx(summary["weighted"])
    val = [float(x["validation_accuracy"]) for x in last]
    assert sum(val) / 4 == pytest.approx(rows[1]["validation_accuracy"]["mean"])
    glob = [float(x["global_accuracy"]) for x in last]
    assert sum(g * n for g, n in zip(glob, tests, strict=True)) / sum(tests) == pytest.approx(
        rows[1]["global_accuracy"])
    trained = [x for x in last if x["trained"] == "1"]
    assert all(float(x["train_loss"]) > 0 and float(x["test_loss"]) > 0 for x in trained)
    assert all(int(x["val_samples"]) > 0 and int(x["train_samples"]) > int(x["val_samples"]) for x in last)


def test_a_resume_cuts_clients_csv_back_with_metrics_jsonl(tmp_path):
    clients = [SimpleNamespace(domain_name="a", num_train=5, num_val=0, num_test=2)] * 2
    outputs = RunOutputs(tmp_path, clients=clients)
    for r in (1, 2, 3):
        outputs.append_round({"round": r, "per_client_accuracy": {0: 0.5, 1: 0.25},
                              "per_client_train_loss": {1: 0.1 * r}, "excluded_clients": [0]})
    assert len(read_csv(tmp_path / "clients.csv")) == 6
    RunOutputs(tmp_path, clients=clients).truncate_rounds(2)
    lines = read_csv(tmp_path / "clients.csv")
    assert [(x["round"], x["client"], x["excluded"], x["trained"]) for x in lines] == [
        ("1", "0", "1", "0"), ("1", "1", "0", "1"), ("2", "0", "1", "0"), ("2", "1", "0", "1")]
    assert lines[3]["train_loss"] == "0.2" and lines[3]["test_samples"] == "2"


def test_new_clients_have_a_line_of_their_own_in_the_last_round():
    from task.run.client_table import client_lines

    clients = [SimpleNamespace(domain_name=g, num_train=10, num_val=0, num_test=5)
               for g in ("plain", "plain", "inverted", "inverted")]
    row = {"round": 3, "per_client_accuracy": {"0": 0.5, "1": 0.75},
           "per_client_train_loss": {"0": 1.0, "1": 2.0},
           "new_clients": [3], "new_client_per_client_accuracy": {"3": 0.25}}
    lines = {line["client"]: line for line in client_lines(row, clients)}
    assert sorted(lines) == [0, 1, 3]
    assert lines[3]["new_client"] == 1 and lines[3]["trained"] == 0 and lines[3]["personal_accuracy"] == 0.25
    assert lines[3]["group"] == "inverted" and lines[0]["new_client"] == 0
