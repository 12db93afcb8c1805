"""One message per node and phase (task/core/bundles.py, task/engine/exchange.py).

A node hosting several of a phase's clients gets one bundled message and answers with one
reply; the engine sees one reply per client all the same, so a run is the same bundled or not;
a client raising inside a bundle is that client's error reply only; a node's error reply is
every bundled client's error; the global model sent to all of a node's clients is one object.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from task.core.bundles import bundle, is_bundle, serve_bundles, unbundle
from task.core.messages import ARRAYS, CONFIG, METRICS

from .fake_grid import FakeGrid
from .helpers import TINY, engine, tiny_cfg


def _message(cid: int, arrays: ArrayRecord, node: int = 100) -> Message:
    return Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"client-id": cid, "server-round": 1})}),
                   dst_node_id=node, message_type="train")


def _run(node_messages: str, num_nodes: int):
    overrides = f"{TINY} strategy=ditto node_messages={node_messages}"
    st = engine(tiny_cfg(f"strategy=ditto node_messages={node_messages}"))
    grid = FakeGrid(4, overrides, num_nodes=num_nodes, wire=True)
    rows: list[dict] = []
    st.start(grid, num_rounds=2, timeout=60, on_round=rows.append)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows], grid


def test_a_bundled_run_is_the_per_client_run_with_one_message_per_node_and_phase():
    bundled, grid = _run("bundled", num_nodes=2)
    per_client, reference = _run("per_client", num_nodes=2)
    assert bundled == per_client and bundled[-1]["rejected_replies"] == 0
    phases = [m for m in grid.pushed if m.metadata.message_type != "query"]
    assert phases and all(is_bundle(m) for m in phases)
    assert len(phases) * 2 == len([m for m in reference.pushed if m.metadata.message_type != "query"])
    for node in (100, 101):  # the same personal states on each node, bit for bit
        mine, theirs = grid.contexts[node].state.array_records, reference.contexts[node].state.array_records
        assert set(mine) == set(theirs) and all(
            torch.equal(mine[k].to_torch_state_dict()[n], t)
            for k in mine for n, t in theirs[k].to_torch_state_dict().items())


def test_one_node_per_client_sends_no_bundle():
    _, grid = _run("bundled", num_nodes=4)
    assert not any(is_bundle(m) for m in grid.pushed)


def test_a_raising_client_is_that_clients_error_only(monkeypatch):
    def handler(msg: Message, context) -> Message:
        cid = int(msg.content.config_records[CONFIG]["client-id"])
        if cid == 2:
            raise ValueError("client 2 broke")
        return Message(RecordDict({METRICS: MetricRecord({"cid": cid})}), reply_to=msg)

    shared = ArrayRecord({"w": torch.ones(3)})
    messages = [_message(c, shared) for c in (0, 2, 4)]
    sent = bundle(messages)
    sent.metadata.__dict__["_message_id"] = "m1"
    monkeypatch.setattr(TaskIdentity, "_run_id", None)  # as in a ClientApp's Ray actor: none can be made
    reply = serve_bundles(handler)(sent, None)
    pairs = unbundle(sent, reply, messages)
    assert [m for m, _ in pairs] == messages
    assert [r.has_error() for _, r in pairs] == [False, True, False]
    assert pairs[1][1].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "client 2 broke" in pairs[1][1].error.reason
    assert [r.content.metric_records[METRICS]["cid"] for _, r in (pairs[0], pairs[2])] == [0, 4]
    # every client's reply answers its own message, from the node
    ids = [r.metadata.reply_to_message_id for _, r in pairs]
    assert ids == [m.metadata.message_id for m in messages] and len(set(ids)) == 3
    assert all(r.metadata.src_node_id == 100 for _, r in pairs)


def test_an_error_reply_to_a_bundle_is_every_clients_error_from_its_sender():
    messages = [_message(c, ArrayRecord({"w": torch.zeros(1)})) for c in (1, 3)]
    sent = bundle(messages)
    failed = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=sent)
    failed.metadata.__dict__["_src_node_id"] = 0  # the SuperLink answers for a node that is gone
    pairs = unbundle(sent, failed, messages)
    assert all(r.has_error() and r.error.reason == "gone" and r.metadata.src_node_id == 0 for _, r in pairs)


def test_the_model_sent_to_every_client_of_a_node_is_one_object():
    shared = ArrayRecord({"w": torch.randn(256)})
    one = get_all_nested_objects(bundle([_message(0, shared)]))
    three = get_all_nested_objects(bundle([_message(c, shared) for c in (0, 2, 4)]))
    arrays = [o for o in three.values() if isinstance(o, ArrayRecord)]
    assert len(arrays) == 1 and len(three) - len(one) == 2  # two more config records, no array
