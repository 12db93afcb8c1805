"""Whole runs of single methods, in-process: IFCA under attack, FedSLR on CIFAR-10-format
files with ResNet-18 (GroupNorm), PFML and FedCLUP, two rounds or so each.

The real ServerApp and ClientApp handlers over ``tests/fake_grid.py``, every message through
Flower's protobuf encoding (bytes counted as on the wire): what is checked (the median's cut and
the K models sent, ranks and factorised downlinks, lam adapted once, personal and global
accuracy) is the methods', not the transport's, which tests/e2e runs through `flwr run` and
deployments; a `flwr run` would add ~25 s of start-up each.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from .fake_grid import InProcessRunner
from .helpers import RUN_TINY as TINY

pytestmark = pytest.mark.slow

RELABEL = ("dataset=mnist5k partition=relabel partition.num_clients=8 partition.num_clusters=2 "
           "model=mlp model.hidden=32 lr=0.01 momentum=0.9 num_rounds=2 attack.fraction=0.25")



def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ifca_with_signflip_attack_sends_k_models(tmp_path):
    flwr_runner = InProcessRunner(tmp_path)
    out = flwr_runner.run("ifca", f"{RELABEL} strategy=ifca strategy.num_clusters=2 attack=signflip "
                                  "aggregator=median", num_supernodes=8)
    rows = rows_of(out)
    assert all(r["cluster_ari"] is not None and -1.0 <= r["cluster_ari"] <= 1.0 for r in rows)
    assert all(r["discarded_uploads"] > 0 for r in rows)  # the median cut values per coordinate
    # Every sampled client was sent both cluster models and uploads one: 2 x as many bytes down.
    assert rows[0]["bytes_down"] >= 2 * rows[0]["bytes_up"] > 0
    assert rows[-1]["eval_bytes_down"] > 0  # the evaluation's downlink is counted apart
    assert len(flwr_runner.results(out)["last_round"]["byzantine_clients"]) == 2


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


def test_fedslr_on_cifar10_format_files_with_resnet18_gn(tmp_path):
    write_cifar10(tmp_path)
    flwr_runner = InProcessRunner(tmp_path / "runs")
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


def test_pfml_reports_personal_and_global_accuracy(tmp_path):
    flwr_runner = InProcessRunner(tmp_path)
    out = flwr_runner.run("pfml", f"{TINY} strategy=pfml strategy.K=1 strategy.beta=2 num_rounds=2")
    # deterministic (default true) applied in the ServerApp and in each of the 4 nodes' ClientApp
    # (what their identity replies said).
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
