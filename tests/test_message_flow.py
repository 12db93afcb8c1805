"""The round's messages as a deployment pays for them: how many, what rides on what, and what a
node caches on its disk (in deployment every message is a fresh ClientApp process)."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, RecordDict

import client_app
from task.core.messages import METRICS, hosted_clients
from task.data import node_cache
from task.data.load import load_federation
from task.data.node_cache import cached_config, node_federation
from task.engine.rounds import Engine

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg


def _types(grid: FakeGrid) -> list[str]:
    return [m.metadata.message_type for m in grid.pushed]


def test_lgmix_evaluation_rides_on_personalize_and_scores_what_an_evaluate_message_would():
    st = server(tiny_cfg("strategy=lgmix"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=lgmix")
    run.discover(grid, 10)
    grid.pushed.clear()
    row = run.run_round(grid, 1, timeout=10, evaluate=True)
    # Two messages per client (train, personalize carrying the evaluation), not three.
    assert sorted(_types(grid)) == ["train"] * 4 + ["train.personalize"] * 4
    assert row["evaluated_clients"] == 4 and row["rejected_replies"] == 0
    # Separate evaluate messages, sent now, score exactly what the merged ones reported.
    messages = list(run.configure_evaluate(1, None, ConfigRecord(), grid))
    replies, _ = run._exchange(grid, messages, 10)
    separate = {run._reply_cid[r.metadata.reply_to_message_id]: r.content.metric_records[METRICS]["accuracy"]
                for r in replies}
    assert separate == row["per_client_accuracy"]


def test_ditto_round_sends_train_and_evaluate_only():
    st = server(tiny_cfg("strategy=ditto"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=ditto")
    run.discover(grid, 10)
    grid.pushed.clear()
    run.run_round(grid, 1, timeout=10, evaluate=True)
    assert sorted(_types(grid)) == ["evaluate"] * 4 + ["train"] * 4


def test_a_client_that_never_answers_is_named_in_missing_clients():
    def tamper(msg, reply):
        return None if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101 else reply

    st = server(tiny_cfg("strategy=ditto"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=ditto", tamper=tamper)
    run.discover(grid, 10)
    row = run.run_round(grid, 1, timeout=0.3, evaluate=False)
    assert row["missing_clients"] == [1] and row["late_replies"] == 1
    healthy = run.run_round(FakeGrid(4, f"{TINY} strategy=ditto"), 2, timeout=10, evaluate=False)
    assert "missing_clients" not in healthy


def test_node_disk_cache_holds_the_same_config_and_the_served_partitions(tmp_path, monkeypatch):
    overrides = f"{TINY} strategy=ditto"
    cache = tmp_path / "cache"
    first, again = cached_config(overrides, cache), cached_config(overrides, cache)
    assert list(cache.glob("config-*.yaml")) and first == again == tiny_cfg("strategy=ditto")
    device = torch.device("cpu")
    full = load_federation(first, device)
    served = node_federation(first, device, cache, lambda n: hosted_clients(1, 2, n))
    served = node_federation(first, device, cache, lambda n: hosted_clients(1, 2, n))  # from disk
    assert sorted(served.clients) == [1, 3] and served.input_shape == full.input_shape
    for cid in (1, 3):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(served.clients[cid], name), getattr(full.clients[cid], name))
    # A changed config, or changed code that builds the data, is another key: no stale read.
    assert cached_config(f"{overrides} seed=7", cache).seed == 7
    monkeypatch.setattr(node_cache, "DATA_CODE", ("data/load.py",))
    node_federation(first, device, cache, lambda n: hosted_clients(1, 2, n))
    assert len(list(cache.glob("data-*.pt"))) == 2


def test_a_deployed_node_trains_from_its_cache_as_from_a_fresh_build(tmp_path):
    def node(state_dir: str | None) -> Context:
        config = {"partition-id": 0, "num-partitions": 4, **({"state-dir": state_dir} if state_dir else {})}
        return Context(run_id=1, node_id=100, state=RecordDict(), node_config=config,
                       run_config={"overrides": f"{TINY} strategy=ditto"})

    def train_once(context: Context):
        st = server(tiny_cfg("strategy=ditto"))
        run = Engine(st)
        grid = FakeGrid(4, f"{TINY} strategy=ditto")
        run.discover(grid, 10)
        message = next(iter(run.configure_train(1, None, ConfigRecord(), grid)))
        reply = client_app.train(message, context)
        return reply.content.array_records["arrays"].to_torch_state_dict()

    plain = train_once(node(None))
    train_once(node(str(tmp_path)))  # builds the cache
    cached = train_once(node(str(tmp_path)))  # reads it
    assert list((tmp_path / "cache").glob("data-*.pt"))
    assert all(torch.equal(plain[k], cached[k]) for k in plain)
