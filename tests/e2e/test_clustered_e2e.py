"""Federated clustering and IFCA, each with a real attack.

8 relabel clients of mnist5k in 2 clusters, 2 of them Byzantine: Gaussian attackers whose
ClientApps really send N(1e6, 200^2) updates (clustered, through `flwr run` on 8 SuperNodes),
and sign-flippers (IFCA, in-process: the real ServerApp and ClientApp handlers over
``tests/fake_grid.py``, every message through Flower's protobuf encoding, since what it checks,
the median's cut, the K models sent and the attackers named, is not about transport; a
`flwr run` would add ~25 s of start-up).
"""

from __future__ import annotations

import json

import pytest

from ..fake_grid import InProcessRunner

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


def test_ifca_with_signflip_attack_sends_k_models(tmp_path):
    flwr_runner = InProcessRunner(tmp_path)
    out = flwr_runner.run("ifca", f"{RELABEL} strategy=ifca strategy.num_clusters=2 attack=signflip "
                                  "aggregator=median", num_supernodes=8)
    rows = _rows(out)
    assert all(r["cluster_ari"] is not None and -1.0 <= r["cluster_ari"] <= 1.0 for r in rows)
    assert all(r["discarded_uploads"] > 0 for r in rows)  # the median cut values per coordinate
    # Every sampled client was sent both cluster models and uploads one: 2 x as many bytes down.
    assert rows[0]["bytes_down"] >= 2 * rows[0]["bytes_up"] > 0
    assert rows[-1]["eval_bytes_down"] > 0  # the evaluation's downlink is counted apart
    assert len(flwr_runner.results(out)["last_round"]["byzantine_clients"]) == 2
