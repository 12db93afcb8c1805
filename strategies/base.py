"""The server half every method shares: clients, per-node messages, validation, the round loop.

A ``PFLStrategy`` is a Flower ``Strategy`` (``flwr.serverapp.strategy``) whose messages are
built per client: each sampled client can get its own arrays (its cluster's model, its
personal mix, factors of a low-rank model) and its own config values. Subclasses override
small steps:

- ``train_arrays(cid, round)`` / ``train_config(cid, round)``: what client ``cid`` is sent;
- ``expected_upload(cid)``: keys, shapes and dtypes a valid reply must carry;
- ``aggregate_replies(round, replies)``: update the server state from the valid replies;
- ``eval_arrays(cid)``: what a client needs to score its personal model;
- ``round_metrics(round)``: extra per-round values for metrics.jsonl.

Client identity is the ``partition-id`` each ClientApp reports (a "query" message at start
and whenever an unknown node appears), never the Flower node id, which changes when a node
reconnects. Sampling draws from the sorted client ids with a NumPy generator seeded by the
run's seed, so every strategy sees the same sampling sequence.

Every reply is validated before aggregation; a bad one is dropped, logged with its reason
and counted in ``rejected_replies``. The round loop pushes and pulls messages itself with a
short, backing-off poll (Flower 1.41's ``send_and_receive`` sleeps 3 s between polls).
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from omegaconf import DictConfig

from task import attacks, robust
from task.door import CHECKPOINT_META
from task.outputs import atomic_write
from task.params import StateDict, all_finite, as_tensor, model_state, to_record, view, weighted_mean

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
# A personalize message that also carries the round's evaluation: the arrays the client scores
# its personal model with (``eval_arrays``); its reply then holds the scores in METRICS and the
# personalize phase's own metrics under PERSONALIZE_METRICS.
EVAL_ARRAYS = "eval-arrays"
PERSONALIZE_METRICS = "personalize-metrics"
# Reply metric: the bytes of the IP address of the Ray node a ClientApp ran on (client_app.ray_node).
RAY_NODE = "ray-node"
POLL_START_S = 0.005
POLL_MAX_S = 0.05
EVAL_SAMPLE_STREAM = 0xE7A1  # second seed word of the evaluation sample's generator
BYZANTINE_STREAM = 0xB12A  # second seed word of the Byzantine clients' choice
ADVERSARY_STREAM = 0xADE5  # second seed word of the server-side adversary's choices


@dataclass
class ClientInfo:
    """What the server knows of a client: its node, and its partition's sizes."""

    cid: int
    node_id: int
    num_train: int
    num_test: int


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

    bytes_up: int = 0
    bytes_down: int = 0
    rejected_replies: int = 0
    late_replies: int = 0
    # Clients sent a message this round whose reply never came (late, or a node the SuperLink
    # reports unavailable): metrics.jsonl's ``missing_clients``.
    missing: set[int] = field(default_factory=set)
    # Uploads the configured aggregator discarded or clipped (task/robust.py), over the round.
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


SUMMARY_KEYS = ("mean", "weighted", "worst")


def host_name(value: Any) -> str:
    """The IP address a ``RAY_NODE`` metric holds, or "unreadable" (a reply is never trusted)."""
    if not isinstance(value, list) or len(value) not in (4, 16):  # IPv4 or IPv6 bytes
        return "unreadable"
    try:
        return str(ipaddress.ip_address(bytes(value)))
    except (TypeError, ValueError):
        return "unreadable"


def summarize_accuracy(prefix: str, scores: list[tuple[float, int]]) -> dict[str, float]:
    """``<prefix>_mean``, ``_weighted`` (by sample count) and ``_worst`` of (accuracy, count) pairs."""
    accuracies = [a for a, _ in scores]
    return {f"{prefix}_mean": float(np.mean(accuracies)),
            f"{prefix}_weighted": sum(a * n for a, n in scores) / sum(n for _, n in scores),
            f"{prefix}_worst": min(accuracies)}


def choose_byzantine(num_clients: int, cfg: DictConfig) -> list[int]:
    """The Byzantine clients: ``attack.fraction`` of all, drawn with the run's seed from their
    own stream (training's sampling sequence is the same with or without an attack).

    ``attack=none`` with a fraction > 0 marks the same clients without any attack: a control
    run whose summary covers exactly the honest clients of the attacked runs.
    """
    attack = cfg.get("attack")
    fraction = float(attack.get("fraction", 0.0)) if attack is not None else 0.0
    size = min(num_clients, int(round(fraction * num_clients)))
    if size == 0:
        return []
    rng = np.random.default_rng([int(cfg.seed), BYZANTINE_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=size, replace=False))


def array_spec(state: StateDict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys, shapes and numpy dtype names of a state dict: what a reply must match."""
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype)) for k, v in state.items()}


def exchange(grid: Grid, messages: list[Message], timeout: float
             ) -> tuple[list[tuple[Message, Message]], int]:
    """Push ``messages``, pull replies with a short backing-off poll.

    Returns (sent message, reply) pairs and ``late``, the number of messages with no reply
    within ``timeout`` seconds; their replies, if any come later, are never read.
    """
    if not messages:
        return [], 0
    ids = list(grid.push_messages(messages))
    sent = dict(zip(ids, messages, strict=True))
    pending = set(ids)
    pairs: list[tuple[Message, Message]] = []
    deadline = time.monotonic() + timeout
    delay = POLL_START_S
    while pending and time.monotonic() < deadline:
        got = [r for r in grid.pull_messages(list(pending))
               if r.metadata.reply_to_message_id in pending]
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            pairs.append((sent[reply.metadata.reply_to_message_id], reply))
        if got:
            delay = POLL_START_S
        else:
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)
    return pairs, len(pending)


def hosted_clients(partition_id: int, num_partitions: int, num_clients: int) -> list[int]:
    """The clients a SuperNode serves: partition p of P serves every client c with c % P == p.

    One SuperNode per client (P == number of clients) is the usual deployment; fewer
    SuperNodes (e.g. ``flwr run`` with its default 2 simulated nodes) each host several
    clients, every one with its own data and personal state.
    """
    return list(range(partition_id, num_clients, num_partitions))


class PFLStrategy(Strategy):
    """Shared server half of every pflower method (FedAvg's behaviour by default)."""

    name: ClassVar[str] = ""
    # Whether a single global model exists whose accuracy the clients can report.
    has_global_model: ClassVar[bool] = True
    # Whether clients keep state between rounds (personal models, BN statistics, duals): a
    # resume is then refused unless that state was kept on disk (task/door.py).
    keeps_client_state: ClassVar[bool] = False
    # Whether a client uploads an update (a difference of models: LG-Mix, clustered) rather
    # than its trained model; attacks build a malicious update and send it in that form.
    upload_is_update: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, initial_state: StateDict, partition_sizes: list[tuple[int, int]]):
        self.cfg = cfg
        self.global_state: StateDict = {k: v.clone() for k, v in initial_state.items()}
        self.partition_sizes = partition_sizes
        self.num_clients = len(partition_sizes)
        self.clients: dict[int, ClientInfo] = {}
        self.rng = np.random.default_rng(int(cfg.seed))
        self.stats = RoundStats()
        self._sent_specs: dict[int, dict] = {}
        self._aggregated: list[int] = []
        self._eval_sample: list[int] | None = None
        self._reply_cid: dict[str, int] = {}  # message id -> client it was sent for
        self.state_on_disk: dict[int, bool] = {}  # client -> its node keeps personal state on disk
        self.deterministic_nodes: dict[int, bool] = {}  # node -> its ClientApp runs deterministic
        # Clients left out of the personalized-accuracy summary (e.g. the Byzantine ones).
        self.excluded_clients: set[int] = set()
        # Ground-truth domain/cluster of every client and the names of the groups (from the
        # federation, as partition.json has them): per-group accuracy in every metrics row.
        self.client_groups: list[int] = []
        self.group_names: list[str] = []
        # Byzantine clients (``attack=``): scored, but excluded from the summary.
        self.byzantine: list[int] = choose_byzantine(self.num_clients, cfg)
        self.excluded_clients |= set(self.byzantine)
        self._sent: dict[int, StateDict] = {}  # what each client was sent this round
        # Whether the next round first looks for nodes that reconnected under a new node id:
        # only after a round that missed or rejected replies, since asking the SuperLink for
        # every node id is O(nodes) (70 ms a round with 10,000 simulated SuperNodes).
        self._recheck_nodes = True

    @classmethod
    def from_model(cls, cfg: DictConfig, model: torch.nn.Module,
                   partition_sizes: list[tuple[int, int]]) -> PFLStrategy:
        """The strategy for a run whose initial model is ``model``."""
        return cls(cfg, model_state(model), partition_sizes)

    # --- steps a method overrides -----------------------------------------------------
    def train_arrays(self, cid: int, server_round: int) -> StateDict:
        """Arrays sent to client ``cid`` for training (default: the global model)."""
        return self.global_state

    def train_config(self, cid: int, server_round: int) -> dict[str, Any]:
        """Per-client config values sent with the training message."""
        return {}

    def expected_upload(self, cid: int, sent: StateDict) -> dict[str, tuple[tuple[int, ...], str]]:
        """Keys, shapes and dtypes a valid reply carries (default: what was sent)."""
        return array_spec(sent)

    def aggregate_replies(self, server_round: int, replies: list[TrainReply]) -> None:
        """Update the server state (default: w_g <- sum_j p_j w_j over the replies, or the
        configured robust aggregator, centred on the current w_g)."""
        merged = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state.update(merged)

    def aggregate(self, states: list[StateDict], weights: list[float],
                  center: StateDict | None = None) -> StateDict:
        """The configured aggregator (``aggregator=``, task/robust.py) over client uploads.

        Every averaging of uploads goes through here. ``mean`` (the default) is exactly
        ``weighted_mean``; ``center`` is the previous aggregate (where centered clipping and
        threshold clustering start). The uploads it discarded or clipped are counted in the
        round's ``discarded_uploads``.
        """
        config = self.cfg.get("aggregator")
        name = "mean" if config is None else str(config.name)
        if name == "mean":
            return weighted_mean(states, weights)
        merged, discarded = robust.aggregate_states(name, states, weights, dict(config), center)
        self.stats.discarded += discarded
        return merged

    # --- Byzantine clients (the simulated threat model, docs/clustered.md) ---------------
    def attack_config(self, cid: int) -> dict[str, Any]:
        """What a Byzantine client is told with its training message (nothing for the others):
        that it is Byzantine, the attack, and whether it uploads an update or a model."""
        name = str(self.cfg.attack.name) if self.cfg.get("attack") is not None else "none"
        if cid not in self.byzantine or name == "none":
            return {}
        kind = "update" if self.upload_is_update else "model"
        return {"byzantine": True, "attack": name, "upload-kind": kind}

    def upload_reference(self, reply: TrainReply) -> StateDict | None:
        """What the reply's update is relative to: the model the client was sent (None: the
        upload is the update itself)."""
        return None if self.upload_is_update else self._sent.get(reply.cid)

    def byzantine_adversary(self, server_round: int, replies: list[TrainReply]) -> list[TrainReply]:
        """The server-side omniscient adversary: a SIMULATED threat model, not a defence.

        For the attacks that need the honest clients' updates (``bitflip``, ``alie``,
        ``ipm``: colluding attackers who know what every honest client sends), the Byzantine
        replies of the round are replaced here, after validation and before aggregation, by
        the malicious update in the method's upload form. Client-side attacks (``gaussian``,
        ``signflip``, ``labelflip``) were applied on the Byzantine ClientApps already.
        """
        name = str(self.cfg.attack.name) if self.cfg.get("attack") is not None else "none"
        bad = [r for r in replies if r.cid in self.byzantine]
        honest = [r for r in replies if r.cid not in self.excluded_clients]
        if name not in attacks.SERVER_ATTACKS or not bad or not honest or not replies[0].arrays:
            return replies
        keys = [k for k, v in replies[0].arrays.items() if v.is_floating_point()]
        H = torch.stack([self._update_vector(r, keys) for r in honest])
        rng = np.random.default_rng([int(self.cfg.seed), ADVERSARY_STREAM, server_round])
        for reply in bad:
            if name == "bitflip":
                update = attacks.bitflip(H[int(rng.integers(len(honest)))])
            elif name == "alie":
                z = self.cfg.attack.get("z")
                update = attacks.alie(H, len(bad), None if z is None else float(z))
            else:
                update = attacks.ipm(H, float(self.cfg.attack.eps))
            reference = self.upload_reference(reply)
            if reference is not None:
                update = update + robust.flatten(reference, keys)
            reply.arrays = {**reply.arrays, **robust.unflatten(update, reply.arrays, keys)}
        return replies

    def _update_vector(self, reply: TrainReply, keys: list[str]) -> torch.Tensor:
        vector = robust.flatten(reply.arrays, keys)
        reference = self.upload_reference(reply)
        return vector if reference is None else vector - robust.flatten(reference, keys)

    def personalize_arrays(self, cid: int, server_round: int) -> StateDict | None:
        """Arrays for an optional third phase after aggregation (None: no such phase).

        Where it returns arrays for a client that trained this round, that client gets a
        ``train.personalize`` message carrying them and ``personalize_config(cid, round)``,
        and its client half's ``personalize`` updates its personal state (e.g. LG-Mix's
        mixing of the local and the aggregated update).
        """
        return None

    def personalize_config(self, cid: int, server_round: int) -> dict[str, Any]:
        return {}

    def eval_arrays(self, cid: int) -> StateDict:
        """Arrays a client needs to score its personal model (default: the global model)."""
        return self.global_state

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra per-round values written to metrics.jsonl."""
        return {}

    def state_arrays(self) -> dict[str, StateDict]:
        """The strategy's array state for its checkpoint (models, corrections, centres)."""
        return {"global": self.global_state}

    def state_scalars(self) -> dict[str, Any]:
        """The strategy's JSON-able state for its checkpoint (running means, counters)."""
        return {}

    def load_state(self, arrays: dict[str, StateDict], scalars: dict[str, Any]) -> None:
        """Restore what ``state_arrays`` and ``state_scalars`` returned."""
        self.global_state = arrays["global"]

    # --- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, path: Path, server_round: int) -> None:
        """Write the whole server state after ``server_round`` atomically to ``path``."""
        meta = {"round": server_round, "rng": self.rng.bit_generator.state,
                "scalars": self.state_scalars(), "strategy": self.name,
                "client_state_on_disk": bool(self.state_on_disk) and all(self.state_on_disk.values())}
        arrays = {f"{group}/{key}": value.detach().cpu().numpy()
                  for group, state in self.state_arrays().items() for key, value in state.items()}
        arrays[CHECKPOINT_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    def load_checkpoint(self, path: Path) -> int:
        """Restore the state ``save_checkpoint`` wrote; return the last completed round."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[CHECKPOINT_META]).decode())
            if meta["strategy"] != self.name:
                raise ValueError(f"{path} is a {meta['strategy']} checkpoint, not {self.name}")
            arrays: dict[str, StateDict] = {}
            for name in data.files:
                if name != CHECKPOINT_META:
                    group, key = name.split("/", 1)
                    arrays.setdefault(group, {})[key] = torch.from_numpy(data[name].copy())
        self.rng.bit_generator.state = meta["rng"]
        self.load_state(arrays, meta["scalars"])
        return int(meta["round"])

    def plot(self, rows: list[dict], directory: Path) -> list[Path]:
        """Method-specific PNGs from the run's metrics rows (none by default)."""
        return []

    # --- clients and sampling ---------------------------------------------------------
    def discover(self, grid: Grid, timeout: float) -> None:
        """Learn which clients (partition ids) each connected node serves."""
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

    def sample(self, server_round: int) -> list[int]:
        """Client ids sampled for training this round (seeded, strategy-independent)."""
        size = max(1, min(self.num_clients, round(float(self.cfg.fraction_train) * self.num_clients)))
        return sorted(int(c) for c in self.rng.choice(self.num_clients, size=size, replace=False))

    # --- Flower Strategy API ----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client, with that client's own arrays and config."""
        self._sent_specs = {}
        self._sent = {}
        records: dict[int, tuple[StateDict, ArrayRecord]] = {}
        messages = []
        for cid in self.sample(server_round):
            sent = self.train_arrays(cid, server_round)
            self._sent_specs[cid] = self.expected_upload(cid, sent)
            self._sent[cid] = sent
            values = {**dict(config), **self.train_config(cid, server_round), **self.attack_config(cid),
                      "server-round": server_round}
            messages.append(self._message(cid, sent, values, MessageType.TRAIN, records))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, aggregate the valid ones, return the global model and loss."""
        metrics = self.aggregate_train_metrics(server_round, replies)
        if metrics is None:
            return None, None
        return (to_record(self.global_state) if self.has_global_model else None), metrics

    def aggregate_train_metrics(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """``aggregate_train`` without serialising the new global model (the round loop's step)."""
        valid = [r for r in (self.validate_train_reply(m) for m in replies) if r is not None]
        valid.sort(key=lambda r: r.cid)  # arrival order must not change the floating-point sum
        valid = self.byzantine_adversary(server_round, valid)
        if len(valid) < int(self.cfg.min_replies):
            log(WARNING, "round %s: %s valid replies < min_replies=%s; round skipped",
                server_round, len(valid), self.cfg.min_replies)
            return None
        self.aggregate_replies(server_round, valid)
        self._aggregated = [r.cid for r in valid]
        total = sum(r.num_examples for r in valid)
        loss = sum(r.metrics.get("train_loss", 0.0) * r.num_examples for r in valid) / total
        return MetricRecord({"train_loss": loss, "num-replies": len(valid)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every client (or the fixed ``eval_fraction`` sample) scores its personal model."""
        records: dict[int, tuple[StateDict, ArrayRecord]] = {}
        values = {**dict(config), "server-round": server_round}
        return [self._message(cid, self.eval_arrays(cid), values, MessageType.EVALUATE, records)
                for cid in self.eval_clients()]

    def eval_clients(self) -> list[int]:
        """The clients that evaluate: all, or a fixed seeded ``eval_fraction`` sample of them.

        The sample is drawn once from its own generator (seeded by the run's seed), so the same
        clients score every evaluation round and training's sampling sequence is unchanged.
        """
        fraction = float(self.cfg.get("eval_fraction", 1.0))
        if fraction >= 1.0:
            return sorted(self.clients)
        if self._eval_sample is None:
            size = max(1, min(self.num_clients, round(fraction * self.num_clients)))
            rng = np.random.default_rng([int(self.cfg.seed), EVAL_SAMPLE_STREAM])
            self._eval_sample = sorted(int(c) for c in rng.choice(self.num_clients, size=size, replace=False))
        return [cid for cid in self._eval_sample if cid in self.clients]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, sample-weighted mean and worst client of the personal accuracies on the test
        split and (where clients have one) on their validation split; ``excluded_clients`` are
        scored but left out of the summary."""
        scores = [s for s in (self.validate_eval_reply(m) for m in replies) if s is not None]
        if not scores:
            return None
        acc = {cid: m["accuracy"] for cid, m in scores}
        counted = [(cid, m) for cid, m in scores if cid not in self.excluded_clients] or scores
        result = summarize_accuracy("accuracy", [(m["accuracy"], m["num-examples"]) for _, m in counted])
        val = [(m["validation_accuracy"], m["num-val"]) for _, m in counted if "validation_accuracy" in m]
        if val:
            result.update(summarize_accuracy("validation", val))
        glob = [(m["global_accuracy"], m["num-examples"]) for _, m in counted if "global_accuracy" in m]
        if self.has_global_model and glob:
            result["global_accuracy"] = sum(a * k for a, k in glob) / sum(k for _, k in glob)
        result.update({f"client_{c}": a for c, a in acc.items()})
        return MetricRecord(result)

    def group_accuracy(self, per_client: dict[int, float]) -> dict[str, float]:
        """Mean accuracy of each domain/cluster's clients (over the clients that reported;
        ``excluded_clients`` left out), keyed by the group's name."""
        groups: dict[str, list[float]] = {}
        for cid, accuracy in sorted(per_client.items()):
            if cid in self.excluded_clients or cid >= len(self.client_groups):
                continue
            gid = self.client_groups[cid]
            name = self.group_names[gid] if gid < len(self.group_names) else str(gid)
            groups.setdefault(name, []).append(accuracy)
        return {name: float(np.mean(values)) for name, values in groups.items()}

    def summary(self) -> None:
        log(INFO, "\t├── strategy: %s (%s clients)", self.name, self.num_clients)
        log(INFO, "\t└── fraction_train=%s, rounds=%s", self.cfg.fraction_train, self.cfg.num_rounds)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None,
              *, first_round: int = 1, on_round: Callable[[dict], None] | None = None,
              checkpoint: Path | None = None) -> Result:
        """Run rounds ``first_round..num_rounds``; evaluate every ``eval_every`` and the last.

        Flower's ``Strategy.start`` signature, with ``on_round`` called with every round's
        metrics row (the ServerApp writes it out), ``first_round`` for resumed runs, and the
        whole server state written to ``checkpoint`` after every round.
        """
        self.discover(grid, float(self.cfg.node_wait_timeout))
        if self.keeps_client_state and not all(self.state_on_disk.values()):
            memory = sorted(c for c, disk in self.state_on_disk.items() if not disk)
            if first_round > 1:
                raise RuntimeError(f"clients {memory[:10]} keep their state in memory only: a resumed "
                                   f"{self.name} run needs the state on disk it was saved to")
            log(WARNING, "%s keeps per-client state in memory only (no client_state_dir or SuperNode "
                "state-dir): this run cannot be resumed after a crash", self.name)
        result = Result()
        for server_round in range(first_round, num_rounds + 1):
            evaluate = server_round % int(self.cfg.eval_every) == 0 or server_round == num_rounds
            row = self.run_round(grid, server_round, timeout, evaluate)
            if on_round is not None:
                on_round(row)
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, server_round)
        result.arrays = to_record(self.global_state)
        return result

    # --- one round --------------------------------------------------------------------
    def run_round(self, grid: Grid, server_round: int, timeout: float, evaluate: bool) -> dict:
        """Train, aggregate and (optionally) evaluate; return the round's metrics row."""
        started = time.monotonic()
        self.stats = RoundStats()
        if self._recheck_nodes:  # picks up nodes that reconnected with a new node id
            self.discover(grid, timeout)
        messages = list(self.configure_train(server_round, None, ConfigRecord(), grid))
        replies, late = self._exchange(grid, messages, timeout)
        self.stats.late_replies += late
        train_metrics = self.aggregate_train_metrics(server_round, replies)
        scored: dict[int, Message | None] = {}
        if train_metrics is not None:
            scored = self.personalize(grid, server_round, timeout, evaluate)
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": float(train_metrics["train_loss"]) if train_metrics else None,
            "sampled_clients": len(messages),
            "personalized_accuracy": None,
            "global_accuracy": None,
        }
        if evaluate:
            # Clients whose personalize message carried the evaluation get no evaluate message.
            eval_messages = [m for m in self.configure_evaluate(server_round, None, ConfigRecord(), grid)
                             if int(m.content.config_records[CONFIG]["client-id"]) not in scored]
            eval_replies, late = self._exchange(grid, eval_messages, timeout)
            self.stats.late_replies += late
            row["evaluated_clients"] = len(eval_messages) + len(scored)
            merged = [m for m in scored.values() if m is not None and not m.has_error()]
            self._reply_cid.update({m.metadata.reply_to_message_id: c for c, m in scored.items()
                                    if m is not None})
            metrics = self.aggregate_evaluate(server_round, [*merged, *eval_replies])
            if metrics is not None:
                row.update(self._eval_row(metrics))
        row.update(self.round_metrics(server_round))
        row.update({
            "bytes_up": self.stats.bytes_up, "bytes_down": self.stats.bytes_down,
            "rejected_replies": self.stats.rejected_replies,
            "discarded_uploads": self.stats.discarded,
            "late_replies": self.stats.late_replies,
            "seconds": time.monotonic() - started,
        })
        if self.stats.missing:
            row["missing_clients"] = sorted(self.stats.missing)
        self._recheck_nodes = bool(self.stats.late_replies or self.stats.rejected_replies)
        if self.stats.hosts:
            row["hosts"] = dict(sorted(self.stats.hosts.items()))
        if self.byzantine:
            row["byzantine_clients"] = self.byzantine
        return row

    def personalize(self, grid: Grid, server_round: int, timeout: float,
                    evaluate: bool = False) -> dict[int, Message | None]:
        """The optional phase after aggregation (see ``personalize_arrays``).

        In a round that evaluates, a client that is personalized and evaluates gets one
        message for both (``EVAL_ARRAYS``): it mixes, saves, then scores the personal model it
        just saved, exactly what a separate evaluate message would score, one ClientApp start
        (in deployment, a process) fewer. Returns those clients' replies by client id.
        """
        records: dict[int, tuple[StateDict, ArrayRecord]] = {}
        eval_records: dict[int, tuple[StateDict, ArrayRecord]] = {}
        scores = set(self.eval_clients()) if evaluate else set()
        messages = []
        for cid in self._aggregated:
            sent = self.personalize_arrays(cid, server_round)
            if sent is None:
                continue
            values = {**self.personalize_config(cid, server_round), "server-round": server_round}
            message = self._message(cid, sent, values, f"{MessageType.TRAIN}.personalize", records)
            if cid in scores:
                arrays = self._record(eval_records, self.eval_arrays(cid))
                self.stats.bytes_down += arrays.count_bytes()
                message.content.array_records[EVAL_ARRAYS] = arrays
            messages.append(message)
        replies, late = self._exchange(grid, messages, timeout)
        self.stats.late_replies += late
        # A merged message counts as the client's evaluate message even with no reply (None).
        scored: dict[int, Message | None] = {
            int(m.content.config_records[CONFIG]["client-id"]): None
            for m in messages if EVAL_ARRAYS in m.content.array_records}
        for reply in replies:
            cid = self._cid_of(reply)
            if reply.has_error():
                self.stats.reject(cid, f"personalize failed: {reply.error.reason}")
            if cid in scored:
                scored[cid] = reply
        return scored

    def _eval_row(self, metrics: MetricRecord) -> dict[str, Any]:
        per_client = {int(k.split("_", 1)[1]): float(v) for k, v in metrics.items()
                      if k.startswith("client_")}
        row = {
            "personalized_accuracy": {k: float(metrics[f"accuracy_{k}"]) for k in SUMMARY_KEYS},
            "global_accuracy": float(metrics["global_accuracy"]) if "global_accuracy" in metrics else None,
            "per_client_accuracy": per_client,
        }
        if "validation_mean" in metrics:
            row["validation_accuracy"] = {k: float(metrics[f"validation_{k}"]) for k in SUMMARY_KEYS}
        if self.client_groups and len(self.group_names) > 1:
            row["group_accuracy"] = self.group_accuracy(per_client)
        if self.excluded_clients:
            row["excluded_clients"] = sorted(self.excluded_clients)
        return row

    # --- validation -------------------------------------------------------------------
    def _exchange(self, grid: Grid, messages: list[Message], timeout: float) -> tuple[list[Message], int]:
        """``exchange``, remembering which client each reply answers for (``_cid_of``)."""
        pairs, late = exchange(grid, messages, timeout)
        self._reply_cid = {}
        answered: set[int] = set()
        for sent, reply in pairs:
            self.stats.count_host(reply)
            cid = int(sent.content.config_records[CONFIG]["client-id"])
            # The SuperLink answers for a node it found unavailable (no heartbeat): an error.
            if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
                self.stats.missing.add(cid)
            if reply.metadata.src_node_id in (sent.metadata.dst_node_id, SUPERLINK_NODE_ID):
                self._reply_cid[reply.metadata.reply_to_message_id] = cid
                answered.add(cid)
        sent_to = {int(m.content.config_records[CONFIG]["client-id"]) for m in messages}
        self.stats.missing |= sent_to - answered
        return [reply for _, reply in pairs], late

    def _cid_of(self, message: Message) -> int | None:
        """The client a reply answers for (None: not a reply to this phase's messages)."""
        return self._reply_cid.get(message.metadata.reply_to_message_id)

    def validate_train_reply(self, message: Message) -> TrainReply | None:
        """The reply as a TrainReply, or None (rejected and counted) if anything is off."""
        cid = self._cid_of(message)
        if cid is None or cid not in self._sent_specs:
            self.stats.reject(cid, "reply from a client that was not sampled this round")
            return None
        if message.has_error():
            self.stats.reject(cid, f"ClientApp failed: {message.error.reason}")
            return None
        content = message.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            self.stats.reject(cid, f"missing '{ARRAYS}' or '{METRICS}' record")
            return None
        record = content.array_records[ARRAYS]
        self.stats.bytes_up += record.count_bytes()
        decoded: StateDict = {}
        problem = self._array_problem(record, self._sent_specs[cid], decoded)
        if problem is None:
            problem = self._num_examples_problem(content.metric_records[METRICS], cid, train=True)
        if problem is not None:
            self.stats.reject(cid, problem)
            return None
        metrics = dict(content.metric_records[METRICS])
        if not all(math.isfinite(float(v)) for v in metrics.values() if isinstance(v, int | float)):
            self.stats.reject(cid, "non-finite metric")
            return None
        # The arrays as validated: read in place from the reply's bytes (as ``from_record``
        # returns them), never copied; aggregation reads them once more.
        return TrainReply(cid, decoded, int(metrics["num-examples"]), metrics)

    @staticmethod
    def _array_problem(record: ArrayRecord, spec: dict, decoded: dict | None = None) -> str | None:
        """Why ``record`` does not match ``spec`` (None if it does); fills ``decoded`` as it checks
        with tensors that read the record's bytes in place (one read of each value: finiteness)."""
        if set(record.keys()) != set(spec):
            extra, missing = set(record.keys()) - set(spec), set(spec) - set(record.keys())
            return f"array keys differ (extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]})"
        for key, array in record.items():
            shape, dtype = spec[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                return f"{key}: got {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
            values = view(array)
            if tuple(values.shape) != shape or str(values.dtype) != dtype:
                return f"{key}: data is {values.dtype}{list(values.shape)}, declared {dtype}{list(shape)}"
            tensor = as_tensor(values)
            if not all_finite(tensor):
                return f"{key}: non-finite values"
            if decoded is not None:
                decoded[key] = tensor
        return None

    def _num_examples_problem(self, metrics: MetricRecord, cid: int, train: bool) -> str | None:
        n = metrics.get("num-examples")
        info = self.clients[cid]
        limit = info.num_train if train else info.num_test
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= limit:
            return f"num-examples={n!r} is not an integer in [1, {limit}]"
        return None

    def validate_eval_reply(self, message: Message) -> tuple[int, dict] | None:
        """The client and its scores, or None (rejected and counted) if anything is off."""
        cid = self._cid_of(message)
        if cid is None:
            self.stats.reject(cid, "evaluation reply from an unknown node")
            return None
        if message.has_error():
            self.stats.reject(cid, f"ClientApp failed in evaluate: {message.error.reason}")
            return None
        if METRICS not in message.content.metric_records:
            self.stats.reject(cid, f"evaluation reply without '{METRICS}'")
            return None
        metrics = dict(message.content.metric_records[METRICS])
        problem = self._num_examples_problem(message.content.metric_records[METRICS], cid, train=False)
        accs = [metrics.get("accuracy"), metrics.get("global_accuracy", 0.0),
                metrics.get("validation_accuracy", 0.0)]
        if problem is None and not all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs):
            problem = f"accuracy {accs} outside [0, 1]"
        if problem is None and "validation_accuracy" in metrics:
            num_val = metrics.get("num-val")
            if not isinstance(num_val, int) or isinstance(num_val, bool) or num_val < 1:
                problem = f"num-val={num_val!r} is not a positive integer"
        if problem is not None:
            self.stats.reject(cid, problem)
            return None
        return cid, metrics

    @staticmethod
    def _record(cache: dict[int, tuple[StateDict, ArrayRecord]], sent: StateDict) -> ArrayRecord:
        """``sent`` as an ArrayRecord, serialised once per phase however many clients get it."""
        if id(sent) not in cache:
            cache[id(sent)] = (sent, to_record(sent))  # keeps ``sent`` alive: its id stays unique
        return cache[id(sent)][1]

    def _message(self, cid: int, sent: StateDict, values: dict[str, Any], kind: str,
                 records: dict[int, tuple[StateDict, ArrayRecord]]) -> Message:
        """A message for client ``cid`` with ``sent`` (serialised once per phase through
        ``records``) and ``values`` plus its ``client-id``; its arrays count in ``bytes_down``."""
        arrays = self._record(records, sent)
        self.stats.bytes_down += arrays.count_bytes()
        config = ConfigRecord({**values, "client-id": cid})
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        return Message(content, dst_node_id=self.clients[cid].node_id, message_type=kind)

