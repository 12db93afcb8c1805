"""Evaluation of a fixed sample of clients (``eval_fraction``) and the round loop's bookkeeping."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from task.config import ConfigError
from task.params import to_record

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg


def _run(extra: str, rounds: int = 3):
    overrides = f"{TINY} strategy=ditto fraction_train=0.5 {extra}".strip()
    st = server(tiny_cfg(f"strategy=ditto fraction_train=0.5 {extra}".strip()))
    grid = FakeGrid(4, overrides)
    rows = []
    st.start(grid, num_rounds=rounds, timeout=30, on_round=rows.append)
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
    assert [r["train_loss"] for r in full] == [r["train_loss"] for r in part]
    for f, p in zip(full, part, strict=True):
        assert all(f["per_client_accuracy"][c] == a for c, a in p["per_client_accuracy"].items())


def test_eval_fraction_out_of_range_is_refused():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="eval_fraction"):
            tiny_cfg(f"eval_fraction={bad}")


def test_one_record_per_distinct_array_set_per_phase():
    st = server(tiny_cfg("strategy=fedavg"))
    grid = FakeGrid(4, f"{TINY} strategy=fedavg")
    st.discover(grid, 10)
    messages = list(st.configure_train(1, None, ConfigRecord(), grid))
    records = {id(m.content.array_records["arrays"]) for m in messages}
    assert len(messages) == 4 and len(records) == 1
    sent = messages[0].content.array_records["arrays"]
    expected = to_record(st.global_state)
    assert list(sent) == list(expected)
    assert all(torch.equal(torch.from_numpy(sent[k].numpy()), torch.from_numpy(expected[k].numpy()))
               for k in sent)
