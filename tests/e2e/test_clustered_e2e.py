"""Federated clustering under a real attack, through `flwr run` on 8 SuperNodes.

8 relabel clients of mnist5k in 2 clusters, 2 of them Byzantine: Gaussian attackers whose
ClientApps really send N(1e6, 200^2) updates over the transport. (IFCA under a sign-flip
attack runs in-process: tests/test_method_runs.py.)
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

RELABEL = ("dataset=mnist5k partition=relabel partition.num_clients=8 partition.num_clusters=2 "
           "model=mlp model.hidden=32 lr=0.01 momentum=0.9 num_rounds=2 attack.fraction=0.25")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clustered_under_gaussian_attack_finds_the_clusters(flwr_runner):
    # 3 rounds: the first uploads are debiased momenta of one update, and 6 honest clients
    # leave TC little to average; the model is clearly learning from the third round on.
    out = flwr_runner.run("clustered", f"{RELABEL} strategy=clustered strategy.num_clusters=2 "
                                       "attack=gaussian num_rounds=3")
    rows = _rows(out)
    results = flwr_runner.results(out)
    byzantine = results["last_round"]["byzantine_clients"]
    assert len(byzantine) == 2 and results["last_round"]["excluded_clients"] == byzantine
    assert rows[-1]["cluster_ari"] == 1.0  # the honest clients in their true clusters
    assert all(r["discarded_uploads"] > 0 for r in rows)  # TC replaced the far updates
    assert results["final_accuracy"]["mean"] > 0.5  # honest clients only; chance is 0.1
    assert (out / "checkpoint.npz").exists()
