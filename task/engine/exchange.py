"""Messages out and replies in, and which node serves which client.

``exchange`` pushes and pulls with a short, backing-off poll (Flower 1.41's
``send_and_receive`` sleeps 3 s between polls). In a deployment each reply's objects are
pulled on their own and given up at the exchange's deadline (task/engine/reply_pull.py): a
reply whose sender died while uploading must not cost the others the round
(tests/e2e/test_compose.py). ``Directory`` learns the clients each node
serves from a "query" message at start and whenever an unknown node appears: client identity
is the ``partition-id`` a ClientApp reports, never the Flower node id, which changes when a
node reconnects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

from task.core.bundles import bundle, unbundle
from task.core.messages import CONFIG, METRICS, hosted_clients
from task.engine import reply_pull

POLL_START_S, POLL_MAX_S = reply_pull.POLL_START_S, reply_pull.POLL_MAX_S


@dataclass
class ClientInfo:
    """What the server knows of a client: its node, and its partition's sizes."""

    cid: int
    node_id: int
    num_train: int
    num_test: int


def exchange(grid: Grid, messages: list[Message], timeout: float, bundled: bool = True
             ) -> tuple[list[tuple[Message, Message]], int]:
    """Push ``messages``, pull replies with a short backing-off poll.

    ``bundled``: the messages to one node (of one phase) go as one bundle (task/core/bundles.py)
    and come back as one reply per message all the same.
    Returns (sent message, reply) pairs and ``late``, the number of messages with no reply
    within ``timeout`` seconds; their replies, if any come later, are never read.
    """
    if not messages:
        return [], 0
    groups = _by_node(messages) if bundled else [[m] for m in messages]
    pushed = [group[0] if len(group) == 1 else bundle(group) for group in groups]
    ids = list(grid.push_messages(pushed))
    sent = dict(zip(ids, zip(pushed, groups, strict=True), strict=True))
    pending = set(ids)
    pairs: list[tuple[Message, Message]] = []
    for reply in _pull(grid, pending, time.monotonic() + timeout):
        message, group = sent[reply.metadata.reply_to_message_id]
        pairs += [(message, reply)] if len(group) == 1 else unbundle(message, reply, group)
    return pairs, sum(len(sent[i][1]) for i in pending)


def _pull(grid: Grid, pending: set[str], deadline: float) -> list[Message]:
    """The replies to ``pending`` (each one's id taken out of it) until none is pending or
    ``deadline``."""
    if isinstance(grid, HttpGrid):  # a deployment: objects to wait on, each reply on its own
        return reply_pull.pull(grid, pending, deadline)
    replies: list[Message] = []
    delay = POLL_START_S
    while pending and time.monotonic() < deadline:
        got = [r for r in grid.pull_messages(list(pending)) if r.metadata.reply_to_message_id in pending]
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
        replies += got
        if got:
            delay = POLL_START_S
        else:
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)
    return replies


def _by_node(messages: list[Message]) -> list[list[Message]]:
    """The messages grouped by (destination node, message type), in the order first seen."""
    groups: dict[tuple[int, str], list[Message]] = {}
    for msg in messages:
        groups.setdefault((msg.metadata.dst_node_id, msg.metadata.message_type), []).append(msg)
    return list(groups.values())


class Directory:
    """The clients (partition ids) each connected node serves, learnt by querying the nodes."""

    def __init__(self, partition_sizes: list[tuple[int, int]]):
        self.partition_sizes = partition_sizes
        self.num_clients = len(partition_sizes)
        self.clients: dict[int, ClientInfo] = {}
        self.state_on_disk: dict[int, bool] = {}  # client -> its node keeps personal state on disk
        self.deterministic_nodes: dict[int, bool] = {}  # node -> its ClientApp runs deterministic

    def discover(self, grid: Grid, timeout: float) -> None:
        """Query every node not known yet until every client is served, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            known = {c.node_id for c in self.clients.values()}
            unknown = [n for n in grid.get_node_ids() if n not in known]
            if unknown:
                self._query(grid, unknown, max(1.0, deadline - time.monotonic()))
            if len(self.clients) >= self.num_clients or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(self.clients) < self.num_clients:
            missing = sorted(set(range(self.num_clients)) - set(self.clients))
            raise RuntimeError(
                f"{len(self.clients)} of {self.num_clients} clients are served by the connected "
                f"SuperNodes after {timeout:.0f}s; no node serves clients {missing[:20]}.")

    def _query(self, grid: Grid, node_ids: list[int], timeout: float) -> None:
        messages = [Message(RecordDict({CONFIG: ConfigRecord({"query": "identity"})}),
                            dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        pairs, _ = exchange(grid, messages, timeout)
        for _, reply in pairs:
            if reply.has_error() or METRICS not in reply.content.metric_records:
                continue
            m = reply.content.metric_records[METRICS]
            partition, partitions = int(m["partition-id"]), int(m["num-partitions"])
            self.deterministic_nodes[reply.metadata.src_node_id] = bool(m.get("deterministic", 0))
            if not 0 <= partition < partitions <= self.num_clients:
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} says partition-id={partition} "
                    f"num-partitions={partitions}, but the config's federation has "
                    f"{self.num_clients} clients: every SuperNode needs the same num-partitions, "
                    f"at most {self.num_clients} (one SuperNode per client, or fewer that each "
                    "host several clients).")
            for cid in hosted_clients(partition, partitions, self.num_clients):
                num_train, num_test = self.partition_sizes[cid]
                self.clients[cid] = ClientInfo(cid, reply.metadata.src_node_id, num_train, num_test)
                self.state_on_disk[cid] = bool(m.get("state-on-disk", 0))
