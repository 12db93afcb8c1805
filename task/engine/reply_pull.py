"""A deployment's pull of replies: each reply's objects on their own, and given up at the deadline.

In a deployment the ServerApp's grid is Flower 1.41's ``HttpGrid``. Its ``pull_messages`` takes
the replies' headers off the SuperLink, then each reply's objects (its arrays) with
``pull_objects``' defaults: while an object is not there yet it retries after 1, 2, 4, 8, 10 s,
for up to two hours, one reply after the other. Seen in the compose test, where a SuperNode is
killed while it uploads its reply (the header on the SuperLink, its objects never complete):

- the pull of that reply blocked ~180 s (until the SuperLink expired the upload session), far
  past ``round_timeout``, and the replies pulled with it or after it were counted late: three
  clients missing a round where one node had died;
- with that pull bounded by the deadline and more ``pull_messages`` calls started beside a
  stalled one, CI still lost all four clients of that round once: every later call asked for
  the dead reply's id again and stalled as well, and none was left to read the others;
- with each reply pulled in a thread of its own until the deadline, the suite under load saw
  round 2 take ~190 s: the dead reply's pull ended only as the SuperLink expired the upload
  session ("the object could not be found"). With every call below in a thread of its own as
  well it still did once, every client missing: the ServerApp as a whole was held, by what is
  not known (an open defect; tests/e2e/test_compose.py now kills its node before the upload);
- a reply whose header is pulled a moment before its objects arrive waits a whole second.

``pull`` asks the SuperLink only for the replies no pull holds yet (``PullMessages``, the same
request ``HttpGrid`` makes, in a thread: a SuperLink that holds that call must not hold the
round either; once such a call has run ``STALL_S``, the replies it asked for are asked for one
by one beside it, so a hold that comes with one reply holds only that one), and pulls each
reply's objects in a daemon thread of its own, retrying after 20 ms backing off to 0.25 s
until the exchange's deadline: a dead node's reply
then becomes Flower's own error reply (``MESSAGE_UNAVAILABLE``), which the engine counts as
missing, and costs no other reply anything. ``GRACE_S`` after the deadline the exchange ends,
whatever a pull still waits on: that reply is missing (late), its thread left to end alone. Each
reply is taken as ``HttpGrid.pull_messages`` takes it (the objects, the receipt confirmed,
inflated, its message id set); tests/test_reply_pull.py fails if that function changes. The
in-memory grid of a simulation pulls no objects and keeps its own ``pull_messages``
(task/engine/exchange.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, wait
from logging import ERROR
from typing import Any

import httpx
from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.supercore import log
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE, HttpGrid

INITIAL_BACKOFF_S, BACKOFF_CAP_S = 0.02, 0.25
POLL_START_S, POLL_MAX_S = 0.005, 0.05
GRACE_S = 0.5  # after the deadline, for the pulls that end at it
STALL_S = 0.5  # a headers call running this long: its replies are asked for one by one


def pull(grid: HttpGrid, pending: set[str], deadline: float) -> list[Message]:
    """The replies to ``pending`` (each one's id taken out of it) until none is pending or
    ``deadline`` (``time.monotonic()``). Every call to the SuperLink runs in a thread of its
    own: a reply still being pulled ``GRACE_S`` after the deadline is left to its thread and
    missing (late) here, and so is a headers call that hangs, whatever holds it. Once a headers
    call has run ``STALL_S``, the replies it asked for are asked for one by one beside it."""
    replies: list[Message] = []
    taken: dict[Future, str] = {}  # a reply's object pull -> the message it answers
    asking: dict[Future, tuple[set[str], float]] = {}  # headers calls: what each asks, since when
    delay, next_ask = POLL_START_S, 0.0
    next_single: dict[str, float] = {}  # a reply asked for alone: not again before
    while pending and time.monotonic() < deadline:
        now, wanted = time.monotonic(), pending - set(taken.values())
        if not asking and now >= next_ask and wanted:
            asking[_in_thread(_headers, grid, wanted)] = (wanted, now)
        elif any(now - since > STALL_S for _, since in asking.values()):
            covered = set().union(*(ids for ids, since in asking.values()
                                    if len(ids) == 1 or now - since <= STALL_S))
            for one in wanted - covered:
                if now >= next_single.get(one, 0.0):
                    asking[_in_thread(_headers, grid, {one})] = ({one}, now)
        done = _wait([*taken, *asking], min(delay, deadline - time.monotonic()))
        for call in [f for f in done if f in asking]:
            asked, _ = asking.pop(call)
            fresh = _take(call.result(), asked, taken, grid, deadline)
            if len(asked) == 1 and not fresh:
                next_single[next(iter(asked))] = time.monotonic() + BACKOFF_CAP_S
            elif len(asked) > 1:
                delay = POLL_START_S if fresh else min(delay * 1.5, POLL_MAX_S)
                next_ask = time.monotonic() + (0.0 if fresh else delay)
        replies += _finished([f for f in done if f in taken], taken, pending)
    # The pulls bounded by the deadline end there: a moment's grace counts them (a dead node's
    # error reply names why); one that hangs on is left to its thread.
    return replies + _finished(_wait(list(taken), GRACE_S, every=True), taken, pending)


def _take(headers: list[tuple[MessageProto, ObjectTree]], asked: set[str], taken: dict[Future, str],
          grid: HttpGrid, deadline: float) -> int:
    """Start the object pull of each header that answers an ``asked`` message, once; how many."""
    fresh = 0
    for proto, tree in headers:
        answered = proto.metadata.reply_to_message_id
        if answered in asked and answered not in taken.values():
            taken[_in_thread(_reply, grid, proto, tree, deadline)] = answered
            fresh += 1
    return fresh


def _wait(futures: list[Future], timeout: float, every: bool = False) -> set[Future]:
    """The ``futures`` done within ``timeout`` s: as soon as one is (all of them: ``every``)."""
    if not futures:
        if not every:
            time.sleep(max(0.0, timeout))
        return set()
    when = ALL_COMPLETED if every else FIRST_COMPLETED
    return wait(futures, timeout=max(0.0, timeout), return_when=when)[0]


def _in_thread(function: Callable[..., Any], *args: Any) -> Future:
    """``function(*args)`` in a daemon thread of its own: one that outlives the round (an HTTP
    call that hangs) holds neither the round nor the process's exit."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as err:  # noqa: BLE001 -- handed to the Future's reader
            future.set_exception(err)

    threading.Thread(target=run, daemon=True, name="pflower-reply-pull").start()
    return future


def _finished(done: Iterable[Future], taken: dict[Future, str], pending: set[str]) -> list[Message]:
    """The replies of the ``done`` pulls that answer a pending message (taken out of both)."""
    replies = []
    for future in done:
        answered = taken.pop(future)
        if answered in pending:
            pending.discard(answered)
            replies.append(future.result())
    return replies


def _headers(grid: HttpGrid, ids: set[str]) -> list[tuple[MessageProto, ObjectTree]]:
    """The SuperLink's replies to ``ids`` without their objects: (message proto, object tree)
    pairs of the replies (``HttpGrid.pull_messages``' request)."""
    try:
        res = grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=sorted(ids)))
    except httpx.HTTPStatusError as err:
        if err.response.status_code != httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            raise
        log(ERROR, ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE)
        return []
    return list(zip(res.messages_list, res.message_object_trees, strict=True))


def _reply(grid: HttpGrid, proto: MessageProto, tree: ObjectTree, deadline: float) -> Message:
    """One reply, its objects pulled until ``deadline`` at most; Flower's error reply
    (``MESSAGE_UNAVAILABLE``) when they do not all come."""
    run_id, message_id = grid._run.run_id, proto.metadata.message_id
    try:
        contents = pull_objects(
            [t.object_id for t in iterate_object_tree(tree)],
            make_pull_object_fn_protobuf(pull_object_protobuf=grid._runtime_client.PullObject,
                                         node=grid.node, run_id=run_id),
            max_time=max(0.0, deadline - time.monotonic()),
            initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S)
    except ObjectPullError as err:
        return _unavailable(grid, run_id, proto.metadata.reply_to_message_id, err)
    grid._runtime_client.ConfirmMessageReceived(
        ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=message_id))
    message: Message = inflate_object_from_contents(message_id, contents)
    message.metadata.__dict__["_message_id"] = message_id  # as Flower does: not in the objects
    return message


def _unavailable(grid: HttpGrid, run_id: int, reply_to: str, err: Exception) -> Message:
    """Flower's error reply for a reply whose objects did not come (``HttpGrid``'s own words)."""
    metadata = Metadata(run_id=run_id, message_id="", src_node_id=grid.node.node_id,
                        dst_node_id=grid.node.node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="",
                        ttl=0, reply_to_message_id=reply_to, created_at=now().timestamp())
    reason = ("Reply message objects are unavailable. The sender may not have completed the upload "
              f"before the object-push session expired. {err}")
    return make_message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason))
