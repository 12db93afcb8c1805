"""Malformed replies, failing and silent clients, checkpoints and resume."""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

import server_app
from strategies import REGISTRY
from task.core.messages import ARRAYS, METRICS, TrainReply
from task.core.params import from_record
from task.core.state import PersonalState
from task.engine.rounds import Engine

from .fake_grid import FakeGrid
from .helpers import TINY, make_context, server, tiny_cfg


def _replace_arrays(msg: Message, reply: Message, change) -> Message:
    arrays = reply.content.array_records[ARRAYS]
    new = {k: change(k, a.numpy()) for k, a in arrays.items()}
    new = {k: v for k, v in new.items() if v is not None}
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in new.items()}),
                          METRICS: reply.content.metric_records[METRICS]})
    return _with_content(msg, reply, content)


def _with_content(msg: Message, reply: Message, content: RecordDict) -> Message:
    out = Message(content, reply_to=msg)
    out.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
    return out


def _with_metrics(msg: Message, reply: Message, **changes) -> Message:
    metrics = dict(reply.content.metric_records[METRICS])
    metrics.update(changes)
    content = RecordDict({ARRAYS: reply.content.array_records[ARRAYS], METRICS: MetricRecord(metrics)})
    return _with_content(msg, reply, content)


def _first_float(fn):
    """Apply ``fn`` to the first floating array only (others unchanged)."""
    seen = []

    def change(key, value):
        if value.dtype.kind == "f" and not seen:
            seen.append(key)
            return fn(value)
        return value
    return change


MALFORMED = {
    "nan": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: np.full_like(v, np.nan))),
    "inf": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: np.full_like(v, np.inf))),
    "wrong_shape": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: np.zeros(v.size + 1, v.dtype))),
    "wrong_dtype": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: v.astype(np.float64))),
    "empty_array": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: np.zeros(0, v.dtype))),
    "missing_key": lambda m, r: _replace_arrays(m, r, _first_float(lambda v: None)),
    "extra_key": lambda m, r: _with_content(m, r, RecordDict({
        ARRAYS: ArrayRecord({**dict(r.content.array_records[ARRAYS].items()),
                             "intruder": Array(np.ones(3, np.float32))}),
        METRICS: r.content.metric_records[METRICS]})),
    "missing_arrays_record": lambda m, r: _with_content(
        m, r, RecordDict({METRICS: r.content.metric_records[METRICS]})),
    "missing_metrics_record": lambda m, r: _with_content(
        m, r, RecordDict({ARRAYS: r.content.array_records[ARRAYS]})),
    "negative_num_examples": lambda m, r: _with_metrics(m, r, **{"num-examples": -5}),
    "zero_num_examples": lambda m, r: _with_metrics(m, r, **{"num-examples": 0}),
    "huge_num_examples": lambda m, r: _with_metrics(m, r, **{"num-examples": 10**9}),
    "float_num_examples": lambda m, r: _with_metrics(m, r, **{"num-examples": 12.5}),
    "nan_metric": lambda m, r: _with_metrics(m, r, train_loss=float("nan")),
    "client_raised": lambda m, r: _error_reply(m, r),
}


def _error_reply(msg: Message, reply: Message) -> Message:
    out = Message(Error(code=0, reason="ValueError('boom')"), reply_to=msg)
    out.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
    return out


# Validation is the engine's, the same for every method but for the spec a method expects:
# every kind for these methods (each kind of upload: models, updates, float entries, bundles,
# a factorised downlink, a shared part, an interpolation), a few kinds for the others.
EVERY_KIND = {"clustered", "clustered_per_client", "ditto", "fedavg", "fedavg_ft", "fedbn", "fedclup",
              "fedprox", "fedslr", "ifca", "lgmix", "local", "pfml", "fedper", "apfl"}
FEW_KINDS = ("nan", "missing_key", "extra_key", "client_raised")
# What local uploads (no arrays): nothing else to corrupt.
LOCAL_KINDS = {"extra_key", "missing_arrays_record", "missing_metrics_record", "negative_num_examples",
               "zero_num_examples", "client_raised", "huge_num_examples", "float_num_examples", "nan_metric"}
CASES = [(name, kind) for name in sorted(REGISTRY) for kind in sorted(MALFORMED)
         if name in EVERY_KIND or kind in FEW_KINDS]
HONEST = 3  # clients 0-2 answer as they should (and a fourth where the domains need one)


def _kinds(name: str) -> list[str]:
    return [k for n, k in CASES if n == name and (name != "local" or k in LOCAL_KINDS)]


@dataclass(frozen=True)
class MalformedRound:
    """Round 1 of a method with one client's train reply corrupted by each kind."""

    row: dict
    corrupted: dict[str, int]  # kind -> the client whose reply it corrupted
    rejected: list[int]  # the clients of the engine's "rejected reply from client N" warnings
    honest: list[int]  # the clients whose replies went through untouched
    clients: int
    global_state: dict[str, torch.Tensor]  # what the round aggregated
    expected_state: dict[str, torch.Tensor]  # the honest replies aggregated by a fresh strategy


@functools.cache
def _round_with_every_kind(name: str) -> MalformedRound:
    """Round 1 of ``name`` with client ``HONEST + i``'s train reply corrupted by the i-th of
    ``_kinds(name)``: one round a method (each client's data a share of TINY's two domains),
    and the honest replies aggregated by a fresh strategy beside it."""
    kinds = _kinds(name)
    per_domain = -(-(HONEST + len(kinds)) // 2)
    corrupted = {kind: HONEST + i for i, kind in enumerate(kinds)}
    by_client = {cid: kind for kind, cid in corrupted.items()}
    honest: list[TrainReply] = []

    def tamper(msg, reply):
        if msg.metadata.message_type != "train":
            return reply
        cid = msg.metadata.dst_node_id - 100
        if cid not in by_client:
            m = reply.content.metric_records[METRICS]
            honest.append(TrainReply(cid, from_record(reply.content.array_records[ARRAYS]),
                                     int(m["num-examples"]), dict(m)))
            return reply
        return MALFORMED[by_client[cid]](msg, reply)

    overrides = f"strategy={name} dataset.clients_per_domain={per_domain}"
    st = server(tiny_cfg(overrides))
    run = Engine(st)
    grid = FakeGrid(2 * per_domain, f"{TINY} {overrides}", tamper=tamper)
    rejected = _RejectedClients()
    logging.getLogger("flwr").addHandler(rejected)
    try:
        run.discover(grid, 10)
        row = run.run_round(grid, 1, timeout=10, evaluate=False)
    finally:
        logging.getLogger("flwr").removeHandler(rejected)
    expected = server(tiny_cfg(overrides))
    for reply in honest:  # the same sends as the round made (a cluster method notes who got what)
        expected.train_arrays(reply.cid, 1)
    expected.aggregate_replies(1, honest)
    return MalformedRound(row, corrupted, rejected.clients, sorted(r.cid for r in honest), 2 * per_domain,
                          st.global_state, expected.global_state)


class _RejectedClients(logging.Handler):
    """The clients of the engine's "rejected reply from client N" warnings."""

    def __init__(self):
        super().__init__()
        self.clients: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"rejected reply from client (\d+):", record.getMessage())
        if found:
            self.clients.append(int(found.group(1)))


@pytest.mark.parametrize("name,kind", CASES)
def test_malformed_reply_is_dropped_and_the_aggregate_is_that_of_the_valid_ones(name, kind):
    if name == "local" and kind not in LOCAL_KINDS:
        pytest.skip("local uploads no arrays: nothing to corrupt")
    got = _round_with_every_kind(name)
    assert got.rejected.count(got.corrupted[kind]) == 1, (kind, got.rejected)  # this kind's client, once
    assert sorted(got.rejected) == sorted(got.corrupted.values())
    assert got.row["rejected_replies"] == len(got.corrupted)
    assert got.honest == [c for c in range(got.clients) if c not in got.corrupted.values()]
    assert set(got.global_state) == set(got.expected_state)
    for key, value in got.expected_state.items():
        assert torch.equal(got.global_state[key], value), (kind, key)


def test_all_clients_failing_skips_the_round_without_crashing():
    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    before = {k: v.clone() for k, v in st.global_state.items()}
    grid = FakeGrid(4, f"{TINY} strategy=fedavg", tamper=lambda m, r: _error_reply(m, r)
                    if m.metadata.message_type == "train" else r)
    run.discover(grid, 10)
    row = run.run_round(grid, 1, timeout=10, evaluate=True)
    assert row["rejected_replies"] == 4 and row["train_loss"] is None
    assert all(torch.equal(before[k], st.global_state[k]) for k in before)
    assert row["personalized_accuracy"] is not None  # evaluation still runs


def test_a_node_that_never_answers_is_named_at_start():
    silent = 100 + 2  # its query reply is dropped too: no client of it becomes known
    grid = FakeGrid(4, f"{TINY} strategy=fedavg",
                    tamper=lambda m, r: None if m.metadata.dst_node_id == silent else r)
    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    with pytest.raises(RuntimeError, match="no node serves clients \\[2\\]"):
        run.discover(grid, 0.5)


def test_replies_after_round_timeout_are_ignored_and_counted():
    def tamper(msg, reply):
        return None if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101 else reply

    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=fedavg", tamper=tamper)
    run.discover(grid, 10)
    row = run.run_round(grid, 1, timeout=0.3, evaluate=False)
    assert row["late_replies"] == 1 and row["rejected_replies"] == 0 and row["train_loss"] is not None


def test_a_reply_from_another_node_than_the_one_asked_is_rejected():
    def tamper(msg, reply):
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101:
            reply.metadata.__dict__["_src_node_id"] = 103
        return reply

    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=fedavg", tamper=tamper)
    run.discover(grid, 10)
    row = run.run_round(grid, 1, timeout=10, evaluate=False)
    assert row["rejected_replies"] == 1 and row["train_loss"] is not None


def test_eval_reply_with_accuracy_out_of_range_is_rejected():
    def tamper(msg, reply):
        if msg.metadata.message_type != "evaluate" or msg.metadata.dst_node_id != 100:
            return reply
        bad = MetricRecord({"accuracy": 7.0, "num-examples": 3})
        return _with_content(msg, reply, RecordDict({METRICS: bad}))

    st = server(tiny_cfg("strategy=fedavg"))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} strategy=fedavg", tamper=tamper)
    run.discover(grid, 10)
    row = run.run_round(grid, 1, timeout=10, evaluate=True)
    assert row["rejected_replies"] == 1 and len(row["per_client_accuracy"]) == 3


# --- personal state versions --------------------------------------------------------------
def test_personal_state_survives_a_restart_through_its_state_dir(tmp_path):
    saved = {"w": torch.arange(4.0)}
    PersonalState(make_context(0, str(tmp_path)), 0, torch.device("cpu"), 1).save("personal", saved)
    fresh = make_context(0, str(tmp_path))  # a restarted node: empty context.state
    loaded = PersonalState(fresh, 0, torch.device("cpu"), 2).load("personal")
    assert torch.equal(loaded["w"], saved["w"])


def test_a_resumed_round_sees_the_state_of_the_previous_round(tmp_path):
    def state(ctx, r, after=False):
        return PersonalState(ctx, 0, torch.device("cpu"), r, after_training=after)

    ctx = make_context(0, str(tmp_path))
    state(ctx, 1).save("p", {"w": torch.tensor([1.0])})
    state(ctx, 2).save("p", {"w": torch.tensor([2.0])})  # round 2 saved, then the server crashed
    assert float(state(make_context(0, str(tmp_path)), 2).load("p")["w"]) == 1.0  # redo round 2
    assert float(state(ctx, 2, after=True).load("p")["w"]) == 2.0
    assert float(state(ctx, 3).load("p")["w"]) == 2.0


def test_memory_keeps_one_version_and_the_disk_two(tmp_path):
    ctx = make_context(0, str(tmp_path))
    for r in (1, 2, 3):
        PersonalState(ctx, 0, torch.device("cpu"), r).save("p", {"w": torch.tensor([float(r)])})
    PersonalState(ctx, 0, torch.device("cpu"), 3, after_training=True).save(
        "p", {"w": torch.tensor([3.5])})  # a later phase of round 3 replaces round 3's version
    assert [k for k in ctx.state.array_records if k.startswith("client-0.p")] == ["client-0.p"]
    folder = tmp_path / "client-0"
    with np.load(folder / "p.npz") as cur, np.load(folder / "p.prev.npz") as prev:
        assert (int(cur["__round__"]), float(cur["w"][0])) == (3, 3.5)
        assert (int(prev["__round__"]), float(prev["w"][0])) == (2, 2.0)


def test_a_load_from_disk_reads_only_the_version_it_returns(tmp_path):
    """With the run's client_state_dir every message reads the disk: the previous version
    (kept for a resume) is opened but not read unless it is the one to return."""
    def state(r, after=False):
        return PersonalState(make_context(0), 0, torch.device("cpu"), r, state_dir=str(tmp_path),
                             after_training=after)

    state(1).save("p", {"w": torch.tensor([1.0])})
    state(2).save("p", {"w": torch.tensor([2.0])})
    prev = tmp_path / "client-0" / "p.prev.npz"
    with np.load(prev) as data:
        kept = {k: data[k] for k in data.files}
    # Its array now a pickle, which np.load(allow_pickle=False) refuses to read.
    np.savez(prev, __round__=np.asarray(1), w=np.array([object()], dtype=object))
    assert float(state(3).load("p")["w"]) == 2.0
    np.savez(prev, **kept)
    assert float(state(2).load("p")["w"]) == 1.0  # a resumed round 2 needs the previous one


# --- checkpoint and resume through the real ServerApp --------------------------------------
class _KilledError(Exception):
    pass


def _server_run(overrides: str, grid: FakeGrid, kill_after: int | None = None):
    if kill_after is not None:
        original = server_app.progress_line

        def progress(row, n):
            if row["round"] == kill_after:
                raise _KilledError
            return original(row, n)
        server_app.progress_line = progress
    try:
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                      run_config={"overrides": overrides}))
    finally:
        if kill_after is not None:
            server_app.progress_line = original


def killed_and_resumed(tmp_path, base: str, kill_after: int = 2) -> tuple[list[dict], list[dict]]:
    """The rows of ``base`` run whole, and of ``base`` killed after round ``kill_after`` (its
    metrics written, not its checkpoint) then resumed on fresh nodes (personal state from disk
    only), each with a client_state_dir of its own."""
    full = f"{base} output_dir={tmp_path / 'full'} client_state_dir={tmp_path / 'full-state'}"
    _server_run(full, FakeGrid(4, full))
    part = f"{base} output_dir={tmp_path / 'part'} client_state_dir={tmp_path / 'part-state'}"
    with pytest.raises(_KilledError):
        _server_run(part, FakeGrid(4, part), kill_after=kill_after)
    resumed = f"{part} resume={tmp_path / 'part'}"
    _server_run(resumed, FakeGrid(4, resumed))

    def rows(d):
        return [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    return rows("full"), rows("part")


@pytest.mark.parametrize("name", ["ditto", "fedbn"])
def test_killed_then_resumed_run_ends_like_an_uninterrupted_one(tmp_path, name):
    a, b = killed_and_resumed(tmp_path, f"{TINY} strategy={name} num_rounds=4 fraction_train=0.5")
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["per_client_accuracy"] == rb["per_client_accuracy"]
        assert ra["personalized_accuracy"] == pytest.approx(rb["personalized_accuracy"], abs=1e-12)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6, abs=1e-9)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = f"{TINY} strategy=fedavg num_rounds=1 output_dir={tmp_path / 'r'}"
    _server_run(run, FakeGrid(4, run))
    other = f"{TINY} strategy=fedavg num_rounds=2 lr=0.5 resume={tmp_path / 'r'}"
    with pytest.raises(Exception, match="differs from the saved run's in \\['lr'\\]"):
        _server_run(other, FakeGrid(4, other))
