"""New clients (``new_clients=F``): held out of training, adapted the method's way, scored apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from task.core.messages import CONFIG
from task.engine.new_clients import NEW_CLIENT, new_clients, training_clients
from task.engine.rounds import draw_clients
from task.run.config import ConfigError
from tests.helpers import TINY, tiny_cfg


def _run(tmp_path, strategy: str, fraction: float = 0.25, num_nodes: int = 4):
    import server_app
    from tests.fake_grid import FakeGrid

    overrides = (f"{TINY} strategy={strategy} num_rounds=2 new_clients={fraction} "
                 f"output_dir={tmp_path / strategy}")
    grid = FakeGrid(4, overrides, num_nodes=num_nodes, wire=True)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config={"overrides": overrides}))
    sent = [(m.metadata.message_type, int(m.content.config_records[CONFIG]["client-id"])) for m in grid.pushed
            if "client-id" in m.content.config_records.get(CONFIG, {})]
    rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / strategy / "results.json").read_text())
    return sent, rows, results, grid


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "ditto"])
def test_new_clients_never_train_and_are_scored_apart_after_adapting(tmp_path, strategy):
    sent, rows, results, _ = _run(tmp_path, strategy)
    (held_out,) = new_clients(tiny_cfg("new_clients=0.25"), 4)
    assert results["new_clients"] == [held_out]
    trained = {cid for kind, cid in sent if kind.startswith(MessageType.TRAIN)}
    assert held_out not in trained and trained == set(range(4)) - {held_out}
    assert [kind for kind, cid in sent if cid == held_out] == [NEW_CLIENT]  # one, after the last round
    assert all(str(held_out) not in r["per_client_accuracy"] for r in rows)
    assert "new_clients" not in rows[0] and rows[-1]["new_client_accuracy"] == results["new_client_accuracy"]
    accuracy = results["new_client_accuracy"]
    assert 0.0 <= accuracy["worst"] <= accuracy["mean"] <= 1.0
    assert set(results["new_client_per_client_accuracy"]) == {str(held_out)}
    if strategy == "fedavg":  # FedAvg does not personalize: the new client scores the global model
        assert accuracy["mean"] == results["new_client_global_accuracy"]


@pytest.mark.slow
def test_new_clients_one_node_hosts_travel_in_one_bundle(tmp_path):
    _, _, results, grid = _run(tmp_path, "lgmix", fraction=0.5, num_nodes=2)
    assert results["new_clients"] == [1, 3]  # seed 0: both on the node serving c % 2 == 1
    assert [m.metadata.dst_node_id for m in grid.pushed if m.metadata.message_type == NEW_CLIENT] == [101]
    assert set(results["new_client_per_client_accuracy"]) == {"1", "3"}


def test_the_hold_out_is_seeded_and_leaves_training_sampling_alone():
    cfg = tiny_cfg("new_clients=0.5")
    assert new_clients(cfg, 4) == new_clients(cfg, 4) and len(new_clients(cfg, 4)) == 2
    assert sorted(new_clients(cfg, 4) + training_clients(cfg, 4)) == [0, 1, 2, 3]
    plain = tiny_cfg("fraction_train=0.5")
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert draw_clients(a, plain, 4) == draw_clients(b, plain, 4, [0, 1, 2, 3])  # new_clients=0: unchanged
    assert set(draw_clients(a, plain, 4, training_clients(cfg, 4))) <= set(training_clients(cfg, 4))


def test_the_door_refuses_new_clients_that_cannot_mean_anything():
    from task.data.load import build_federation
    from task.run.combinations import check_combination

    for extra, said in [("strategy=clustered_per_client new_clients=0.25", "threshold clustering"),
                        ("new_clients=0.1", "holds out none"), ("new_clients=0.9", "leaving none to train")]:
        cfg = tiny_cfg(extra)
        with pytest.raises(ConfigError, match=said):
            check_combination(cfg, build_federation(cfg))
    with pytest.raises(ConfigError, match=r"new_clients.*\[0.0, 1.0\)"):
        tiny_cfg("new_clients=1.0")
