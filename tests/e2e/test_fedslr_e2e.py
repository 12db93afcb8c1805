"""FedSLR through `flwr run` on tiny CIFAR-10-format files with ResNet-18 (GroupNorm)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def write_cifar10(root: Path, n_train: int = 240, n_test: int = 80) -> None:
    """CIFAR-10's python batches, each class a noisy flat colour (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    palette = rng.integers(0, 256, (10, 3))

    def batch(n: int) -> dict:
        labels = np.arange(n) % 10
        noise = rng.normal(0, 40, (n, 3, 32, 32))
        x = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return {"data": x.reshape(n, -1), "labels": labels.tolist()}

    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_fedslr_on_cifar10_format_files_with_resnet18_gn(flwr_runner, tmp_path):
    write_cifar10(tmp_path)
    out = flwr_runner.run("fedslr", (
        f"dataset=cifar10 dataset.data_root={tmp_path} dataset.download=false "
        "partition=dirichlet partition.num_clients=4 partition.alpha=0.5 "
        "model=resnet18_gn model.width=0.125 strategy=fedslr strategy.lam=0.02 "
        "num_rounds=2 local_epochs=1 batch_size=20 lr=0.05 lr_decay=0.998"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rejected_replies"] == 0  # dense uploads pass after a factorised downlink
        assert 0.0 <= row["personalized_accuracy"]["worst"] <= row["personalized_accuracy"]["mean"] <= 1.0
        assert 0.0 <= row["global_accuracy"] <= 1.0
        f = row["fedslr"]
        assert set(f["rank"]) == set(f["full_rank"]) and len(f["rank"]) == 21  # 20 convs + classifier
        assert all(0 <= f["rank"][k] <= f["full_rank"][k] for k in f["rank"])
        assert 0.0 < f["p_sparsity"] <= 1.0
    first, second = rows
    assert first["fedslr"]["rank_fraction"] < 1.0  # lam / alpha = 0.2 cuts singular values in round 1
    # w_s after round 1 is cut but its factors are not yet smaller than its layers (sent dense:
    # here both rounds' training messages weigh the same); after round 2 it is sent as factors, so
    # round 2's evaluation messages are lighter than round 1's (bytes_down is training's only).
    assert second["bytes_down"] <= first["bytes_down"]
    assert second["eval_bytes_down"] < first["eval_bytes_down"]
    assert second["fedslr"]["model_bytes"] < second["fedslr"]["dense_model_bytes"]
    assert (out / "fedslr.png").stat().st_size > 0
