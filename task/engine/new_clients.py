"""New clients (``new_clients=F``): a held-out share of the clients that never trains.

As PFLlib's ``num_new_clients`` and FL-bench's ``--split user``: a seeded fraction F of the
clients is never sampled for training and never evaluated with the others. After the last
round each of them gets one ``evaluate.new_client`` message and personalizes the way its method
does (the client half's ``adapt``: by default one round of the method's own local training from
what the method would send it, the upload discarded; LG-Mix then mixes with its own c_i; the
clustered methods pick the cluster model of lowest loss), then scores its personal model on its
own test split. The scores are reported apart: ``new_client_accuracy`` (mean, weighted, worst)
in the last round's metrics row and in results.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import MessageType
from flwr.serverapp import Grid

from task.core.messages import EVAL_ARRAYS, NEW_CLIENT_EXTRA
from task.core.params import to_record
from task.engine.evaluation import SUMMARY_KEYS, summarize_accuracy

if TYPE_CHECKING:
    from task.engine.rounds import Engine

NEW_CLIENT = f"{MessageType.EVALUATE}.new_client"
NEW_CLIENT_STREAM = 0x4E3C  # second seed word of the hold-out's generator


def new_client_count(fraction: float, num_clients: int) -> int:
    return round(fraction * num_clients)


def new_clients(cfg: Any, num_clients: int) -> list[int]:
    """The held-out clients: a seeded sample of round(new_clients x clients), from a generator of
    its own (the training sample's sequence does not depend on it)."""
    count = new_client_count(float(cfg.get("new_clients", 0.0) or 0.0), num_clients)
    if count <= 0:
        return []
    rng = np.random.default_rng([int(cfg.seed), NEW_CLIENT_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=min(count, num_clients), replace=False))


def training_clients(cfg: Any, num_clients: int) -> list[int]:
    """The clients that train and are evaluated each round: all but the new ones."""
    held_out = set(new_clients(cfg, num_clients))
    return [c for c in range(num_clients) if c not in held_out]


def new_clients_problem(cfg: Any, num_clients: int, method_problem: str | None) -> str | None:
    """Why ``new_clients`` cannot be run as given (None: it can, or it is 0)."""
    fraction = float(cfg.get("new_clients", 0.0) or 0.0)
    if fraction <= 0:
        return None
    count = new_client_count(fraction, num_clients)
    if count == 0:
        return (f"new_clients={fraction} of {num_clients} clients holds out none (round({fraction} x "
                f"{num_clients}) = 0); use at least {1 / num_clients:.3g}, or 0 for no new clients")
    if count >= num_clients:
        return (f"new_clients={fraction} holds out all {num_clients} clients, leaving none to train; "
                f"use at most {(num_clients - 1) / num_clients:.3g}")
    if method_problem is not None:
        return f"new_clients={fraction}: strategy={cfg.strategy.name} {method_problem}"
    return None


def new_client_row(scores: list[tuple[int, dict]], held_out: list[int]) -> dict[str, Any]:
    """The new clients' part of the last round's row: their summary and each one's accuracy."""
    row: dict[str, Any] = {"new_clients": held_out}
    if not scores:
        row["new_client_accuracy"] = None
        return row
    summary = summarize_accuracy("acc", [(m["accuracy"], m["num-examples"]) for _, m in scores])
    row["new_client_accuracy"] = {k: float(summary[f"acc_{k}"]) for k in SUMMARY_KEYS}
    row["new_client_per_client_accuracy"] = {cid: float(m["accuracy"]) for cid, m in scores}
    glob = [(m["global_accuracy"], m["num-examples"]) for _, m in scores if "global_accuracy" in m]
    if glob:
        row["new_client_global_accuracy"] = sum(a * n for a, n in glob) / sum(n for _, n in glob)
    return row


def adapt_new_clients(engine: Engine, grid: Grid, server_round: int, timeout: float) -> dict[str, Any]:
    """The held-out clients personalize the method's way and score, one message each: the
    method's ``new_client_arrays``/``_config`` to adapt from, ``new_client_extra`` for a phase
    after it, ``eval_arrays`` to score with. Nothing they send is aggregated."""
    records: dict = {}
    eval_records: dict = {}
    messages = []
    method, stats = engine.method, engine.stats
    for cid in (c for c in engine.new_clients if c in engine.clients):
        values = {**method.new_client_config(cid, server_round), "server-round": server_round}
        message = engine._message(cid, method.new_client_arrays(cid, server_round), values, NEW_CLIENT,
                                  records)
        arrays = engine._record(eval_records, method.eval_arrays(cid))
        stats.eval_bytes_down += arrays.count_bytes()
        message.content.array_records[EVAL_ARRAYS] = arrays
        extra = method.new_client_extra(cid)
        if extra:
            message.content.array_records[NEW_CLIENT_EXTRA] = to_record(extra)
            stats.bytes_down += message.content.array_records[NEW_CLIENT_EXTRA].count_bytes()
        messages.append(message)
    replies, late = engine._exchange(grid, messages, timeout)
    stats.late_replies += late
    return new_client_row(engine.scores(replies), list(engine.new_clients))
