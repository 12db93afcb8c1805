"""task/engine/reply_pull.py on Flower 1.41's ``HttpGrid`` (the ServerApp's grid in a deployment)
against a fake SuperLink that withholds a reply's objects."""

from __future__ import annotations

import hashlib
import inspect
import threading
import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import http_grid

from task.engine import reply_pull
from task.engine.exchange import exchange

# sha256[:16] of Flower 1.41.0's ``HttpGrid.pull_messages``, whose reply handling reply_pull.py
# mirrors (its request, its objects' pull, the receipt, the inflation, its error reply).
PULL_MESSAGES = "67a5266a5a2ed515"


def test_the_flower_function_it_mirrors_is_unchanged():
    source = inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PULL_MESSAGES, \
        "Flower's HttpGrid.pull_messages changed: compare it with task/engine/reply_pull.py"
    assert {"max_time", "initial_backoff", "backoff_cap"} <= set(
        inspect.signature(inflatable_utils.pull_objects).parameters)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """As in a ServerApp process, where Flower has set the task's identity (messages need it)."""
    for name, value in (("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class FakeLink:
    """The SuperLink's Runtime API as HttpGrid calls it: replies to the pushed messages, whose
    objects are there after ``unavailable`` tries each, or never (``withheld`` replies)."""

    def __init__(self, unavailable: int = 0, reask_stalls: bool = False):
        self.replies: dict[str, Message] = {}  # by the message it answers
        self.objects: dict[str, bytes] = {}
        self.withheld: set[str] = set()
        self.unavailable, self.tries = unavailable, {}
        self.reasked: set[str] = set()  # the messages whose reply was asked for once taken
        self.taken: dict[str, Message] = {}
        self.reask_stalls = reask_stalls  # a reply asked for again: its header again, no objects
        self.first_pull: dict[str, float] = {}  # when each object was first asked for

    def reply(self, sent: Message, withheld: bool = False) -> None:
        cid = int(sent.content.config_records["config"]["client-id"])  # objects are content-addressed:
        reply = Message(RecordDict({"metrics": MetricRecord({"x": float(cid)})}), reply_to=sent)  # own ones
        reply.metadata.__dict__["_message_id"] = reply.object_id
        self.replies[sent.metadata.message_id] = reply
        objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        self.objects.update(objects)
        if withheld:
            self.withheld |= set(objects)

    def PullMessages(self, request):  # noqa: N802 -- Flower's RPC name
        self.reasked |= set(request.message_ids) & set(self.taken)
        again = [self.taken[i] for i in request.message_ids if i in self.taken] if self.reask_stalls else []
        self.withheld |= {m.object_id for m in again}
        found = [self.replies.pop(i) for i in request.message_ids if i in self.replies]
        self.taken.update({m.metadata.reply_to_message_id: m for m in found})
        found += again
        from flwr.app.message import remove_content_from_message

        return PullAppMessagesResponse(messages_list=[message_to_proto(remove_content_from_message(m))
                                                      for m in found],
                                       message_object_trees=[get_object_tree(m) for m in found])

    def PullObject(self, request):  # noqa: N802
        self.tries[request.object_id] = self.tries.get(request.object_id, 0) + 1
        self.first_pull.setdefault(request.object_id, time.monotonic())
        if request.object_id in self.withheld or self.tries[request.object_id] <= self.unavailable:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=self.objects[request.object_id])

    def ConfirmMessageReceived(self, request):  # noqa: N802
        return ConfirmMessageReceivedResponse()


class Grid(http_grid.HttpGrid):
    """Flower's HttpGrid on ``link``; pushing only names the messages."""

    def __init__(self, link: FakeLink):
        super().__init__(token="t")
        self._client, self._run = link, Run.create_empty(7)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            ids.append(m.metadata.message_id)
        return ids


def messages(n: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"client-id": i})}), dst_node_id=100 + i,
                    message_type=MessageType.TRAIN) for i in range(n)]


def test_a_reply_whose_objects_never_come_ends_at_the_deadline_and_the_others_are_read():
    link = FakeLink()
    grid, sent = Grid(link), messages(3)
    ids = grid.push_messages(sent)
    link.reply(sent[0], withheld=True)  # its node died while uploading: the header, no objects
    link.reply(sent[1])
    link.reply(sent[2])
    assert ids == [m.metadata.message_id for m in sent]
    result = {}
    # Flower's own pull would retry the withheld objects for up to two hours: a thread, so that
    # a regression fails here instead of hanging the suite.
    thread = threading.Thread(target=lambda: result.update(out=exchange(grid, sent, 1.0, bundled=False)),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the pull of a reply without its objects outlived the deadline"
    pairs, late = result["out"]
    assert late == 0
    by_client = {int(s.content.config_records["config"]["client-id"]): r for s, r in pairs}
    assert sorted(by_client) == [0, 1, 2]
    assert by_client[0].has_error() and by_client[0].error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert by_client[0].metadata.src_node_id == SUPERLINK_NODE_ID  # the engine counts it missing
    assert not by_client[1].has_error() and not by_client[2].has_error()
    assert [by_client[c].content.metric_records["metrics"]["x"] for c in (1, 2)] == [1.0, 2.0]


def test_replies_that_come_while_a_dead_nodes_reply_holds_a_pull_are_read_before_the_deadline():
    link = FakeLink()
    grid, sent = Grid(link), messages(3)
    grid.push_messages(sent)
    link.reply(sent[0], withheld=True)  # the first header pulled, its objects never come
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=exchange(grid, sent, 4.0, bundled=False)),
                              daemon=True)
    started = time.monotonic()
    thread.start()
    time.sleep(0.2)  # the others' replies land while the first pull waits for the dead one's objects
    link.reply(sent[1])
    link.reply(sent[2])
    arrived: dict[int, float] = {}
    while thread.is_alive() and time.monotonic() - started < 20:
        for m in (1, 2):  # their headers leave the link when a pull reads them
            if sent[m].metadata.message_id not in link.replies:
                arrived.setdefault(m, time.monotonic() - started)
        time.sleep(0.01)
    assert not thread.is_alive()
    pairs, late = result["out"]
    by_client = {int(s.content.config_records["config"]["client-id"]): r for s, r in pairs}
    assert late == 0 and sorted(by_client) == [0, 1, 2]
    assert by_client[0].has_error() and not by_client[1].has_error() and not by_client[2].has_error()
    assert sorted(arrived) == [1, 2] and max(arrived.values()) < 4.0 - 1.0  # well before the deadline


def test_objects_that_arrive_a_moment_late_are_taken_within_a_fraction_of_flowers_first_backoff():
    link = FakeLink(unavailable=3)  # Flower's backoff: 1 + 2 + 4 s (+-20%) before the 4th try
    grid, sent = Grid(link), messages(1)
    grid.push_messages(sent)
    link.reply(sent[0])
    started = time.monotonic()
    pairs, late = exchange(grid, sent, 30.0, bundled=False)
    assert late == 0 and len(pairs) == 1 and not pairs[0][1].has_error()
    assert time.monotonic() - started < 2.0  # reply_pull's backoff: 0.02 + 0.04 + 0.08 s


def test_a_dead_nodes_reply_is_asked_for_once_so_a_link_that_answers_again_stalls_nothing_else():
    # CI's compose run lost every client of a round: pulls that asked for the dead node's reply
    # again stalled as well. A link that answers such a repeat with a header whose objects never
    # come: the exchange must ask for each reply until its header is taken, and never again.
    link = FakeLink(reask_stalls=True)
    grid, sent = Grid(link), messages(4)
    grid.push_messages(sent)
    link.reply(sent[0], withheld=True)
    timers = [threading.Timer(0.3 + 0.1 * m, link.reply, (sent[m],)) for m in (1, 2, 3)]
    for timer in timers:
        timer.start()
    pairs, late = exchange(grid, sent, 3.0, bundled=False)
    by_client = {int(s.content.config_records["config"]["client-id"]): r for s, r in pairs}
    assert late == 0 and sorted(by_client) == [0, 1, 2, 3]
    assert by_client[0].has_error() and not any(by_client[c].has_error() for c in (1, 2, 3))
    assert len(link.taken) == 4 and not link.reasked


def test_a_pull_that_hangs_past_the_deadline_holds_neither_the_exchange_nor_the_others():
    class HangingLink(FakeLink):
        def PullObject(self, request):  # noqa: N802 -- a call that never answers in time
            if request.object_id in self.withheld:
                time.sleep(5)
            return super().PullObject(request)

    link = HangingLink()
    grid, sent = Grid(link), messages(2)
    grid.push_messages(sent)
    link.reply(sent[0], withheld=True)
    link.reply(sent[1])
    started = time.monotonic()
    pairs, late = exchange(grid, sent, 1.0, bundled=False)
    assert time.monotonic() - started < 1.0 + reply_pull.GRACE_S + 0.5
    assert late == 1 and [int(s.content.config_records["config"]["client-id"]) for s, _ in pairs] == [1]


def test_a_headers_call_the_superlink_holds_does_not_hold_the_exchange():
    class HoldingLink(FakeLink):
        calls = 0

        def PullMessages(self, request):  # noqa: N802 -- answers once, then hangs
            self.calls += 1
            if self.calls > 1:
                time.sleep(5)
            return super().PullMessages(request)

    link = HoldingLink()
    grid, sent = Grid(link), messages(3)
    grid.push_messages(sent)
    link.reply(sent[0], withheld=True)  # its node died uploading; client 2 never answers
    link.reply(sent[1])
    started = time.monotonic()
    pairs, late = exchange(grid, sent, 1.0, bundled=False)
    assert time.monotonic() - started < 1.0 + reply_pull.GRACE_S + 0.5
    by_client = {int(s.content.config_records["config"]["client-id"]): r for s, r in pairs}
    assert late == 1 and sorted(by_client) == [0, 1] and by_client[0].has_error()


def test_replies_asked_for_beside_a_call_the_dead_reply_holds_are_read_one_by_one():
    class DeadHoldsLink(FakeLink):
        def PullMessages(self, request):  # noqa: N802 -- a call that would return the dead reply hangs
            if self.dead in request.message_ids and self.dead in self.replies:
                time.sleep(5)
            return super().PullMessages(request)

    link = DeadHoldsLink()
    grid, sent = Grid(link), messages(3)
    grid.push_messages(sent)
    link.dead = sent[0].metadata.message_id
    link.reply(sent[0], withheld=True)
    for m in (1, 2):  # the others answer after the first call is held
        threading.Timer(0.3, link.reply, (sent[m],)).start()
    started = time.monotonic()
    pairs, late = exchange(grid, sent, 2.0, bundled=False)
    assert time.monotonic() - started < 2.0 + reply_pull.GRACE_S + 0.5
    answered = sorted(int(s.content.config_records["config"]["client-id"]) for s, _ in pairs)
    assert late == 1 and answered == [1, 2]
