"""Evaluation of a fixed sample of clients (``eval_fraction``), the round loop's bookkeeping, and
what a run on a Ray cluster records (the node of every reply; ``pflower-sim --ray-address``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from task.core.messages import host_name
from task.core.params import to_record
from task.engine.rounds import Engine
from task.run.config import ConfigError

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg


def _run(extra: str, rounds: int = 3):
    overrides = f"{TINY} strategy=ditto fraction_train=0.5 {extra}".strip()
    st = server(tiny_cfg(f"strategy=ditto fraction_train=0.5 {extra}".strip()))
    run = Engine(st)
    grid = FakeGrid(4, overrides)
    rows = []
    run.start(grid, num_rounds=rounds, timeout=30, on_round=rows.append)
    return rows, grid


def test_eval_fraction_scores_the_same_seeded_sample_every_round():
    rows, grid = _run("eval_fraction=0.5")
    evaluated = [sorted(r["per_client_accuracy"]) for r in rows]
    assert all(r["evaluated_clients"] == 2 for r in rows)
    assert all(e == evaluated[0] for e in evaluated) and len(evaluated[0]) == 2
    evals = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert len(evals) == 2 * len(rows)


def test_eval_fraction_leaves_training_unchanged():
    full, _ = _run("")
    part, _ = _run("eval_fraction=0.5")
    assert all(r["evaluated_clients"] == 4 for r in full)
    assert all("hosts" not in r for r in full)  # not under Ray: replies name no node
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in part]
    for f, p in zip(full, part, strict=True):
        assert all(f["per_client_accuracy"][c] == a for c, a in p["per_client_accuracy"].items())


def test_eval_fraction_out_of_range_is_refused():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="eval_fraction"):
            tiny_cfg(f"eval_fraction={bad}")


def test_one_record_per_distinct_array_set_per_phase():
    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=fedavg")
    run.discover(grid, 10)
    messages = list(run.configure_train(1, None, ConfigRecord(), grid))
    records = {id(m.content.array_records["arrays"]) for m in messages}
    assert len(messages) == 4 and len(records) == 1
    sent = messages[0].content.array_records["arrays"]
    expected = to_record(st.global_state)
    assert list(sent) == list(expected)
    assert all(torch.equal(torch.from_numpy(sent[k].numpy()), torch.from_numpy(expected[k].numpy()))
               for k in sent)


# --- Ray clusters: replies name their node; pflower-sim's --ray-address -------------------
def test_replies_under_ray_name_their_node_and_rows_count_them(monkeypatch):
    import client_app

    fake_ray = types.SimpleNamespace(is_initialized=lambda: True,
                                     util=types.SimpleNamespace(get_node_ip_address=lambda: "10.1.2.3"))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    client_app.ray_node.cache_clear()
    try:
        rows, _ = _run("", rounds=1)
    finally:
        client_app.ray_node.cache_clear()
    assert rows[0]["hosts"] == {"10.1.2.3": 2 + 4}  # 2 trained (fraction_train 0.5), 4 evaluated
    assert rows[0]["rejected_replies"] == 0


@pytest.mark.parametrize("value, name", [
    ([10, 0, 0, 1], "10.0.0.1"), ([0] * 15 + [1], "::1"), ([1, 2, 3], "unreadable"),
    ([300, 0, 0, 0], "unreadable"), (10**15, "unreadable"), ([1.5, 0.0, 0.0, 0.0], "unreadable")])
def test_host_name_never_trusts_the_reply(value, name):
    assert host_name(value) == name


def test_ray_address_reaches_only_a_superlink_started_with_it(monkeypatch, capsys):
    from task.run import launch

    monkeypatch.setattr(launch, "local_superlink", lambda: None)
    assert launch.ray_address_problem("10.0.0.1:6379") is None  # flwr run starts one with it
    monkeypatch.setattr(launch, "local_superlink", lambda: (4242, None))
    problem = launch.ray_address_problem("10.0.0.1:6379")
    assert "RAY_ADDRESS=(unset)" in problem and "kill 4242" in problem
    assert launch.ray_address_problem(None) is None
    monkeypatch.setattr(launch, "local_superlink", lambda: (4242, "10.0.0.1:6379"))
    assert launch.ray_address_problem("10.0.0.1:6379") is None
    assert launch.ray_address_problem(None) is None
    assert "Ray cluster at 10.0.0.1:6379" in capsys.readouterr().err


def test_ray_address_option_and_environment_in_the_printed_command(monkeypatch, capsys):
    from task.run.launch import main

    assert main(["--dry-run", "--ray-address", "10.0.0.1:6379", TINY]) == 0
    assert "+ RAY_ADDRESS=10.0.0.1:6379 flwr run" in capsys.readouterr().out
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert main(["--dry-run", TINY, "client_state_dir=states"]) == 0
    out = capsys.readouterr()
    assert "+ RAY_ADDRESS=10.0.0.2:6379 flwr run" in out.out
    assert "client_state_dir='states' is relative" in out.err


# --- personal state of 10,000 clients: on disk only with the run's client_state_dir ---------
def test_run_state_dir_keeps_personal_state_out_of_the_context(tmp_path):
    from task.core.state import PersonalState

    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                  state=RecordDict(), run_config={})

    def state(r, after=False):
        return PersonalState(ctx, 0, torch.device("cpu"), r, str(tmp_path), after_training=after)

    for r in (1, 2):
        state(r).save("p", {"w": torch.tensor([float(r)])})
    assert not ctx.state.array_records and not ctx.state.config_records  # nothing to pickle per message
    assert float(state(2).load("p")["w"]) == 1.0  # round 2's training sees round 1's state
    assert float(state(2, after=True).load("p")["w"]) == 2.0
    assert float(state(3).load("p")["w"]) == 2.0


def test_ditto_with_a_run_state_dir_trains_as_with_state_in_memory(tmp_path):
    memory, _ = _run("", rounds=3)
    disk, grid = _run(f"client_state_dir={tmp_path}", rounds=3)
    assert [r["train_loss"] for r in memory] == [r["train_loss"] for r in disk]
    assert [r["per_client_accuracy"] for r in memory] == [r["per_client_accuracy"] for r in disk]
    assert all(not c.state.array_records for c in grid.contexts.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-{c}" for c in range(4)]


def test_node_ids_are_asked_again_only_after_a_round_that_missed_replies():
    overrides = f"{TINY} strategy=fedavg"
    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, overrides)
    asked = []
    real = grid.get_node_ids
    grid.get_node_ids = lambda: asked.append(1) or real()
    run.discover(grid, 10)
    asked.clear()
    for r in (1, 2, 3):
        run.run_round(grid, r, 10, evaluate=False)
    assert len(asked) == 1  # the first round checks once; clean rounds after it do not
    grid.tamper = lambda msg, reply: None if msg.metadata.message_type == "train" else reply  # no replies
    run.run_round(grid, 4, 0.2, evaluate=False)
    grid.tamper = None
    asked.clear()
    run.run_round(grid, 5, 10, evaluate=False)
    assert len(asked) == 1  # after the round with late replies, the next one looks for new node ids


def test_training_and_evaluation_bytes_are_counted_apart():
    """bytes_down is what training sent (FedCLUP's trade-off is built on it); the evaluate
    messages' arrays are eval_bytes_down, so eval_every changes only that."""
    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=fedavg")
    run.discover(grid, 10)
    model = to_record(st.global_state).count_bytes()
    row = run.run_round(grid, 1, timeout=30, evaluate=True)
    assert row["bytes_down"] == row["bytes_up"] == 4 * model and row["eval_bytes_down"] == 4 * model
    quiet = run.run_round(grid, 2, timeout=30, evaluate=False)
    assert quiet["bytes_down"] == 4 * model and quiet["eval_bytes_down"] == 0
