"""The round engine: drives any method (strategies/base.py ``Method``) through its rounds.

``Engine`` is a Flower ``Strategy`` (``flwr.serverapp.strategy``) whose messages are built per
client: each sampled client can get its own arrays and config from the method. A round
(``run_round``):

1. ``Directory.discover`` (task/engine/exchange.py) after a round that missed or rejected
   replies: nodes that reconnected under a new node id serve their clients again;
2. ``configure_train``: sample clients (a NumPy generator seeded by the run's seed, the same
   sequence for every method), one message each from ``train_arrays``/``train_config`` and
   the threat model's ``message_config``; ``exchange`` them;
3. ``aggregate_train``: validate every reply (task/engine/replies.py), sort by client, let the
   threat model's server-side adversary replace the Byzantine replies (task/threat/), skip the
   round below ``min_replies``, else ``aggregate_replies``;
4. ``personalize``: the method's optional phase after aggregation, carrying the round's
   evaluation for the clients it reaches;
5. ``configure_evaluate``/``aggregate_evaluate``: the other clients score their personal
   models; the summary (task/engine/evaluation.py), per-group accuracy; after the last round,
   the held-out new clients (``new_clients=F``, task/engine/new_clients.py) adapt and score;
6. the metrics row (``round_metrics``, bytes, rejections, timing) and the checkpoint
   (task/engine/checkpoint.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from task.core.messages import ARRAYS, CONFIG, EVAL_ARRAYS, RoundStats, TrainReply
from task.core.params import StateDict, to_record
from task.engine import checkpoint
from task.engine.evaluation import client_details, eval_row, eval_sample, summarize_scores
from task.engine.exchange import Directory, exchange
from task.engine.new_clients import adapt_new_clients, new_clients
from task.engine.replies import validate_eval_reply, validate_train_reply
from task.threat.byzantine import ThreatModel

if TYPE_CHECKING:
    from strategies.base import Method

Records = dict[int, tuple[StateDict, ArrayRecord]]


def sample_size(cfg, num_clients: int) -> int:
    """The fixed number of clients a round trains: ``clients_per_round``, else
    round(fraction_train x clients), at least 1."""
    count = cfg.get("clients_per_round")
    if count is not None:
        return min(num_clients, int(count))
    return max(1, min(num_clients, round(float(cfg.fraction_train) * num_clients)))


def draw_clients(rng: np.random.Generator, cfg, num_clients: int, pool: list[int] | None = None) -> list[int]:
    """One round's sample from the run's generator (the door replays it for a resume), drawn
    from ``pool`` (the clients that train; default all ``num_clients``)."""
    pool = list(range(num_clients)) if pool is None else pool
    if cfg.get("participation", "fixed") == "bernoulli":
        drawn = rng.random(len(pool)) < float(cfg.fraction_train)
        return [pool[int(i)] for i in np.flatnonzero(drawn)]
    size = sample_size(cfg, len(pool))
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=size, replace=False))


class Engine(Strategy):
    """Runs ``method``'s rounds over a Flower ``Grid``."""

    def __init__(self, method: Method):
        self.method = method
        self.cfg = method.cfg
        self.num_clients = method.num_clients
        self.directory = Directory(method.partition_sizes)
        self.clients = self.directory.clients
        self.rng = np.random.default_rng(int(self.cfg.seed))
        self.threat = ThreatModel(self.cfg, self.num_clients)
        method.excluded_clients |= set(self.threat.byzantine)
        self._sent: dict[int, StateDict] = {}  # what each sampled client was sent this round
        self._sent_specs: dict[int, dict] = {}
        self._aggregated: list[int] = []
        self._train_losses: dict[int, float] = {}  # the last aggregation's, by client
        self._scores: list[tuple[int, dict]] = []  # the last evaluation's valid scores
        self._eval_sample = eval_sample(int(self.cfg.seed), self.num_clients,
                                        float(self.cfg.get("eval_fraction", 1.0)))
        self.new_clients = dict.fromkeys(new_clients(self.cfg, self.num_clients))  # ordered, O(1) `in`
        self.training = [c for c in range(self.num_clients) if c not in self.new_clients]
        self._reply_cid: dict[str, int] = {}  # message id -> client it was sent for
        # Whether the next round first looks for nodes that reconnected under a new node id:
        # only after a round that missed or rejected replies, since asking the SuperLink for
        # every node id is O(nodes) (70 ms a round with 10,000 simulated SuperNodes).
        self._recheck_nodes = True

    @property
    def stats(self) -> RoundStats:
        return self.method.stats

    @property
    def byzantine(self) -> list[int]:
        return self.threat.byzantine

    @property
    def deterministic_nodes(self) -> dict[int, bool]:
        return self.directory.deterministic_nodes

    def discover(self, grid: Grid, timeout: float) -> None:
        self.directory.discover(grid, timeout)

    # --- the run ------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None,
              *, first_round: int = 1, on_round: Callable[[dict], None] | None = None,
              checkpoint_path: Path | None = None) -> Result:
        """Run rounds ``first_round..num_rounds``; evaluate every ``eval_every`` and the last.

        Flower's ``Strategy.start`` signature, with ``on_round`` called with every round's
        metrics row (the ServerApp writes it out), ``first_round`` for resumed runs, and the
        whole server state written to ``checkpoint_path`` after every round.
        """
        self.discover(grid, float(self.cfg.node_wait_timeout))
        self._check_client_state(first_round)
        for server_round in range(first_round, num_rounds + 1):
            evaluate = server_round % int(self.cfg.eval_every) == 0 or server_round == num_rounds
            row = self.run_round(grid, server_round, timeout, evaluate)
            if on_round is not None:
                on_round(row)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path, server_round)
        result = Result()
        result.arrays = to_record(self.method.global_state)
        return result

    def _check_client_state(self, first_round: int) -> None:
        on_disk = self.directory.state_on_disk
        if not self.method.keeps_client_state or all(on_disk.values()):
            return
        memory = sorted(c for c, disk in on_disk.items() if not disk)
        name = self.method.name
        if first_round > 1:
            raise RuntimeError(f"clients {memory[:10]} keep their state in memory only: a resumed "
                               f"{name} run needs the state on disk it was saved to")
        log(WARNING, "%s keeps per-client state in memory only (no client_state_dir or SuperNode "
            "state-dir): this run cannot be resumed after a crash", name)

    def save_checkpoint(self, path: Path, server_round: int) -> None:
        on_disk = bool(self.directory.state_on_disk) and all(self.directory.state_on_disk.values())
        checkpoint.save_checkpoint(path, self.method, server_round, self.rng, on_disk)

    def load_checkpoint(self, path: Path) -> int:
        return checkpoint.load_checkpoint(path, self.method, self.rng)

    # --- one round ------------------------------------------------------------------------
    def run_round(self, grid: Grid, server_round: int, timeout: float, evaluate: bool) -> dict:
        """Train, aggregate and (optionally) evaluate; return the round's metrics row."""
        started = time.monotonic()
        self.method.stats = RoundStats()
        if self._recheck_nodes:
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
            "per_client_train_loss": dict(self._train_losses) if train_metrics else {},
        }
        if evaluate:
            row.update(self._evaluate(grid, server_round, timeout, scored))
        if self.new_clients and server_round == int(self.cfg.num_rounds):
            row.update(adapt_new_clients(self, grid, server_round, timeout))
        row.update(self.method.round_metrics(server_round))
        row.update(self._counters(started))
        return row

    def _evaluate(self, grid: Grid, server_round: int, timeout: float,
                  scored: dict[int, Message | None]) -> dict[str, Any]:
        # Clients whose personalize message carried the evaluation get no evaluate message.
        eval_messages = [m for m in self.configure_evaluate(server_round, None, ConfigRecord(), grid)
                         if int(m.content.config_records[CONFIG]["client-id"]) not in scored]
        eval_replies, late = self._exchange(grid, eval_messages, timeout)
        self.stats.late_replies += late
        row: dict[str, Any] = {"evaluated_clients": len(eval_messages) + len(scored)}
        merged = [m for m in scored.values() if m is not None and not m.has_error()]
        self._reply_cid.update({m.metadata.reply_to_message_id: c for c, m in scored.items()
                                if m is not None})
        metrics = self.aggregate_evaluate(server_round, [*merged, *eval_replies])
        if metrics is not None:
            method = self.method
            row.update(eval_row(metrics, method.client_groups, method.group_names, method.excluded_clients))
            row.update(client_details(self._scores, method.has_global_model))
        return row

    def _counters(self, started: float) -> dict[str, Any]:
        stats = self.stats
        row: dict[str, Any] = {
            "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
            "eval_bytes_down": stats.eval_bytes_down,
            "rejected_replies": stats.rejected_replies,
            "discarded_uploads": stats.discarded,
            "late_replies": stats.late_replies,
            "seconds": time.monotonic() - started,
        }
        if stats.missing:
            row["missing_clients"] = sorted(stats.missing)
        self._recheck_nodes = bool(stats.late_replies or stats.rejected_replies)
        if stats.hosts:
            row["hosts"] = dict(sorted(stats.hosts.items()))
        if self.byzantine:
            row["byzantine_clients"] = self.byzantine
        return row

    def personalize(self, grid: Grid, server_round: int, timeout: float,
                    evaluate: bool = False) -> dict[int, Message | None]:
        """The method's optional phase after aggregation (``personalize_arrays``).

        In a round that evaluates, a client that is personalized and evaluates gets one
        message for both (``EVAL_ARRAYS``): it mixes, saves, then scores the personal model it
        just saved, exactly what a separate evaluate message would score, one ClientApp start
        fewer. Returns those clients' replies by client id.
        """
        records: Records = {}
        eval_records: Records = {}
        scores = set(self.eval_clients()) if evaluate else set()
        messages = []
        for cid in self._aggregated:
            sent = self.method.personalize_arrays(cid, server_round)
            if sent is None:
                continue
            values = {**self.method.personalize_config(cid, server_round), "server-round": server_round}
            message = self._message(cid, sent, values, f"{MessageType.TRAIN}.personalize", records)
            if cid in scores:
                arrays = self._record(eval_records, self.method.eval_arrays(cid))
                self.stats.eval_bytes_down += arrays.count_bytes()
                message.content.array_records[EVAL_ARRAYS] = arrays
            messages.append(message)
        replies, late = self._exchange(grid, messages, timeout)
        self.stats.late_replies += late
        # A merged message counts as the client's evaluate message even with no reply (None).
        scored: dict[int, Message | None] = {
            int(m.content.config_records[CONFIG]["client-id"]): None
            for m in messages if EVAL_ARRAYS in m.content.array_records}
        for reply in replies:
            cid = self._reply_cid.get(reply.metadata.reply_to_message_id)
            if reply.has_error():
                self.stats.reject(cid, f"personalize failed: {reply.error.reason}")
            if cid in scored:
                scored[cid] = reply
        return scored

    # --- Flower Strategy API ------------------------------------------------------------
    def sample(self, server_round: int) -> list[int]:
        """Client ids sampled for training this round (seeded, method-independent): a fixed
        count without replacement, or each client independently with probability
        ``fraction_train`` (``participation=bernoulli``)."""
        return draw_clients(self.rng, self.cfg, self.num_clients, self.training)

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client, with that client's own arrays and config."""
        self._sent_specs = {}
        self._sent = {}
        records: Records = {}
        messages = []
        method = self.method
        for cid in self.sample(server_round):
            sent = method.train_arrays(cid, server_round)
            self._sent_specs[cid] = method.expected_upload(cid, sent)
            self._sent[cid] = sent
            values = {**dict(config), **method.train_config(cid, server_round),
                      **self.threat.message_config(cid, method.upload_is_update),
                      "server-round": server_round}
            messages.append(self._message(cid, sent, values, MessageType.TRAIN, records))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, aggregate the valid ones, return the global model and loss."""
        metrics = self.aggregate_train_metrics(server_round, replies)
        if metrics is None:
            return None, None
        return (to_record(self.method.global_state) if self.method.has_global_model else None), metrics

    def aggregate_train_metrics(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """``aggregate_train`` without serialising the new global model (the round loop's step)."""
        valid = [r for r in (self._validate_train(m) for m in replies) if r is not None]
        valid.sort(key=lambda r: r.cid)  # arrival order must not change the floating-point sum
        method = self.method
        valid = self.threat.server_attack(server_round, valid, method.excluded_clients,
                                          lambda r: method.upload_reference(r, self._sent.get(r.cid)))
        if len(valid) < int(self.cfg.min_replies):
            log(WARNING, "round %s: %s valid replies < min_replies=%s; round skipped",
                server_round, len(valid), self.cfg.min_replies)
            return None
        method.aggregate_replies(server_round, valid)
        self._aggregated = [r.cid for r in valid]
        self._train_losses = {r.cid: float(r.metrics["train_loss"]) for r in valid
                              if "train_loss" in r.metrics}
        total = sum(r.num_examples for r in valid)
        loss = sum(r.metrics.get("train_loss", 0.0) * r.num_examples for r in valid) / total
        return MetricRecord({"train_loss": loss, "num-replies": len(valid)})

    def _validate_train(self, message: Message) -> TrainReply | None:
        cid = self._reply_cid.get(message.metadata.reply_to_message_id)
        spec = self._sent_specs.get(cid) if cid is not None else None
        num_train = self.clients[cid].num_train if spec is not None else 0
        return validate_train_reply(message, cid, spec, num_train, self.stats)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every client (or the fixed ``eval_fraction`` sample) scores its personal model."""
        records: Records = {}
        values = {**dict(config), "server-round": server_round}
        return [self._message(cid, self.method.eval_arrays(cid), values, MessageType.EVALUATE, records)
                for cid in self.eval_clients()]

    def eval_clients(self) -> list[int]:
        """The clients that evaluate: all, or the fixed seeded ``eval_fraction`` sample (never
        the new clients, scored apart)."""
        pool = sorted(self.clients) if self._eval_sample is None else self._eval_sample
        return [cid for cid in pool if cid in self.clients and cid not in self.new_clients]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, sample-weighted mean and worst client of the personal accuracies
        (task/engine/evaluation.py); Byzantine clients are scored but left out."""
        self._scores = self.scores(replies)
        return summarize_scores(self._scores, self.method.excluded_clients, self.method.has_global_model)

    def scores(self, replies: Iterable[Message]) -> list[tuple[int, dict]]:
        """The valid evaluation replies' (client, scores), by client (arrival order must not
        change the floating-point sums); the others rejected and counted."""
        scores = []
        for message in replies:
            cid = self._reply_cid.get(message.metadata.reply_to_message_id)
            num_test = self.clients[cid].num_test if cid is not None else 0
            score = validate_eval_reply(message, cid, num_test, self.stats)
            if score is not None:
                scores.append(score)
        return sorted(scores, key=lambda s: s[0])

    def summary(self) -> None:
        log(INFO, "\t├── strategy: %s (%s clients)", self.method.name, self.num_clients)
        log(INFO, "\t└── fraction_train=%s, rounds=%s", self.cfg.fraction_train, self.cfg.num_rounds)

    # --- messages -------------------------------------------------------------------------
    def _exchange(self, grid: Grid, messages: list[Message], timeout: float) -> tuple[list[Message], int]:
        """``exchange``, remembering which client each reply answers for."""
        pairs, late = exchange(grid, messages, timeout, bundled=self.cfg.node_messages == "bundled")
        self._reply_cid = {}
        answered = set()
        for sent, reply in pairs:
            self.stats.count_host(reply)
            cid = int(sent.content.config_records[CONFIG]["client-id"])
            answered |= self._note_reply(sent, reply, cid)
        sent_to = {int(m.content.config_records[CONFIG]["client-id"]) for m in messages}
        self.stats.missing |= sent_to - answered
        return [reply for _, reply in pairs], late

    def _note_reply(self, sent: Message, reply: Message, cid: int) -> set[int]:
        # The SuperLink answers for a node it found unavailable (no heartbeat): an error.
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
            self.stats.missing.add(cid)
        if reply.metadata.src_node_id in (sent.metadata.dst_node_id, SUPERLINK_NODE_ID):
            self._reply_cid[reply.metadata.reply_to_message_id] = cid
            return {cid}
        return set()

    @staticmethod
    def _record(cache: Records, sent: StateDict) -> ArrayRecord:
        """``sent`` as an ArrayRecord, serialised once per phase however many clients get it."""
        if id(sent) not in cache:
            cache[id(sent)] = (sent, to_record(sent))  # keeps ``sent`` alive: its id stays unique
        return cache[id(sent)][1]

    def _message(self, cid: int, sent: StateDict, values: dict[str, Any], kind: str,
                 records: Records) -> Message:
        """A message for client ``cid`` with ``sent`` (serialised once per phase through
        ``records``) and ``values`` plus its ``client-id``; its arrays count in ``bytes_down``
        (``eval_bytes_down`` for an evaluate message)."""
        arrays = self._record(records, sent)
        if kind == MessageType.EVALUATE:
            self.stats.eval_bytes_down += arrays.count_bytes()
        else:
            self.stats.bytes_down += arrays.count_bytes()
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**values, "client-id": cid})})
        return Message(content, dst_node_id=self.clients[cid].node_id, message_type=kind)
