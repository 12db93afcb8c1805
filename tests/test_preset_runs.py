"""A paper preset, `+experiment=lgmix_digits5`, on tiny digits-5 pickles and 5 nodes.

Run in-process (the real ServerApp and ClientApp handlers over ``tests/fake_grid.py``, every
message through Flower's protobuf encoding): what a preset sets is data, model and selection,
not transport; a `flwr run` would add ~25 s of start-up.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from .fake_grid import InProcessRunner

pytestmark = pytest.mark.slow

DOMAINS = ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST_M")


def test_lgmix_digits5_preset_reports_final_best_by_validation_and_per_domain(tmp_path):
    flwr_runner = InProcessRunner(tmp_path / "runs")
    rng = np.random.default_rng(0)
    for domain in DOMAINS:  # LG-Mix's layout: train_stratified.pkl / test_stratified.pkl
        for name, n in (("train_stratified.pkl", 40), ("test_stratified.pkl", 12)):
            path = tmp_path / "digits5" / domain / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                pickle.dump((rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10), f)
    out = flwr_runner.run("preset-lgmix-digits5",
                          f"+experiment=lgmix_digits5 dataset.data_root={tmp_path} num_rounds=2 "
                          "model.width=0.125", num_supernodes=5)
    partition = json.loads((out / "partition.json").read_text())
    assert [(c["num_train"], c["num_val"]) for c in partition["clients"]] == [(30, 10)] * 5
    results = flwr_runner.results(out)
    assert results["final_accuracy"] == results["last_evaluated_round"]["personalized_accuracy"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert results["best_round"]["validation_accuracy"]["mean"] == max(
        r["validation_accuracy"]["mean"] for r in rows)
    assert set(results["group_accuracy"]) == set(DOMAINS)
    assert "best round by validation" in flwr_runner.last_log
