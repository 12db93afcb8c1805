"""What the server and the clients exchange: record names, a validated reply, a round's counters.

The method base (strategies/base.py), the round engine (task/engine/) and the ClientApp
(client_app.py) all read these; none of them imports another for them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common import log

from task.core.params import StateDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
# A personalize message that also carries the round's evaluation: the arrays the client scores
# its personal model with (``eval_arrays``); its reply then holds the scores in METRICS and the
# personalize phase's own metrics under PERSONALIZE_METRICS.
EVAL_ARRAYS = "eval-arrays"
PERSONALIZE_METRICS = "personalize-metrics"
# A new client's message (``new_clients=F``, task/engine/new_clients.py): the arrays of its
# method's phase after its own training (LG-Mix: the last aggregated update).
NEW_CLIENT_EXTRA = "new-client-extra"
# Reply metric: the bytes of the IP address of the Ray node a ClientApp ran on (client_app.ray_node).
RAY_NODE = "ray-node"

Spec = dict[str, tuple[tuple[int, ...], str]]


@dataclass
class TrainReply:
    """One validated training reply."""

    cid: int
    arrays: StateDict
    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundStats:
    """Per-round communication and failure counters."""

    # Arrays of training replies (up) and of train and personalize messages (down): what
    # training costs; evaluation's own downlink is apart, so trade-offs do not depend on eval_every.
    bytes_up: int = 0
    bytes_down: int = 0
    eval_bytes_down: int = 0
    rejected_replies: int = 0
    late_replies: int = 0
    # Clients sent a message this round whose reply never came (late, or a node the SuperLink
    # reports unavailable): metrics.jsonl's ``missing_clients``.
    missing: set[int] = field(default_factory=set)
    # Uploads the configured aggregator discarded or clipped (task/algorithms/robust.py).
    discarded: int = 0
    reasons: list[str] = field(default_factory=list)
    # Replies per Ray node (IP address) that ran the ClientApp, where replies say so.
    hosts: dict[str, int] = field(default_factory=dict)

    def count_host(self, reply: Message) -> None:
        if reply.has_error() or METRICS not in reply.content.metric_records:
            return
        node = reply.content.metric_records[METRICS].get(RAY_NODE)
        if node is not None:
            name = host_name(node)
            self.hosts[name] = self.hosts.get(name, 0) + 1

    def reject(self, cid: int | None, reason: str) -> None:
        self.rejected_replies += 1
        self.reasons.append(f"client {cid}: {reason}")
        log(WARNING, "rejected reply from client %s: %s", cid, reason)


def host_name(value: Any) -> str:
    """The IP address a ``RAY_NODE`` metric holds, or "unreadable" (a reply is never trusted)."""
    if not isinstance(value, list) or len(value) not in (4, 16):  # IPv4 or IPv6 bytes
        return "unreadable"
    try:
        return str(ipaddress.ip_address(bytes(value)))
    except (TypeError, ValueError):
        return "unreadable"


def array_spec(state: StateDict) -> Spec:
    """Keys, shapes and numpy dtype names of a state dict: what a reply must match."""
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype)) for k, v in state.items()}


def hosted_clients(partition_id: int, num_partitions: int, num_clients: int) -> list[int]:
    """The clients a SuperNode serves: partition p of P serves every client c with c % P == p.

    One SuperNode per client (P == number of clients) is the usual deployment; fewer
    SuperNodes (e.g. ``flwr run`` with its default 2 simulated nodes) each host several
    clients, every one with its own data and personal state.
    """
    return list(range(partition_id, num_clients, num_partitions))
