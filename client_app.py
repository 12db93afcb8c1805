"""pflower ClientApp: load the partition and the personal state, run the method's client half."""

from __future__ import annotations

import ipaddress
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# Only what every message needs: with Flower's default isolation each deployed message is a
# fresh process (pflower's long-lived worker, deploy/worker.py, keeps one per SuperNode), so the
# method's module is imported by ``lookup`` and Hydra only when the config is not cached yet
# (task/data/node_cache.py).
from strategies import lookup
from task.core.bundles import serve_bundles
from task.core.device import configure_process, determinism_enabled, resolve_device
from task.core.messages import (
    ARRAYS,
    CONFIG,
    EVAL_ARRAYS,
    METRICS,
    NEW_CLIENT_EXTRA,
    PERSONALIZE_METRICS,
    RAY_NODE,
    hosted_clients,
)
from task.core.params import from_record, to_record
from task.core.state import PersonalState
from task.data.node_cache import cached_config, node_federation
from task.threat.clients import train_as_told

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from strategies.client_base import ClientMethod

app = ClientApp()


def client_id(context: Context, msg: Message | None = None) -> int:
    """The client a message is for: its long-lived identity, never the Flower node id.

    A SuperNode with ``partition-id=p num-partitions=P`` in its node config serves every
    client c with c % P == p; the server names the client in the message (``client-id``).
    """
    if "partition-id" not in context.node_config:
        raise KeyError("node config has no 'partition-id': start the SuperNode with "
                       "--node-config 'partition-id=<i> num-partitions=<n>'")
    partition = int(context.node_config["partition-id"])
    if msg is None or CONFIG not in msg.content.config_records:
        return partition
    cid = int(msg.content.config_records[CONFIG].get("client-id", partition))
    partitions = int(context.node_config.get("num-partitions", 1))
    if cid % partitions != partition:
        raise ValueError(f"message for client {cid} reached the node of partition {partition} "
                         f"of {partitions}, which serves clients c with c % {partitions} == {partition}")
    return cid


def node_cache_dir(context: Context) -> Path | None:
    """``<state-dir>/cache`` of a deployed SuperNode (None without a state directory, e.g. in
    simulation, whose ClientApp processes live on and cache in memory)."""
    root = context.node_config.get("state-dir")
    return Path(str(root)) / "cache" if root else None


def run_config(context: Context) -> DictConfig:
    """The run's composed config (cached on the node's disk in deployment)."""
    return cached_config(str(context.run_config.get("overrides", "")), node_cache_dir(context))


def client_method(context: Context, msg: Message, training: bool | None = None) -> ClientMethod:
    """The method's client half for this node, over cached data and its personal state
    (``training``: a phase that sees only earlier rounds' state; default: a train message)."""
    cfg = run_config(context)
    configure_process(cfg)  # before anything below can start CUDA
    if (cfg.device == "cpu" or not torch.cuda.is_available()) and int(cfg.client_threads) > 0:
        torch.set_num_threads(int(cfg.client_threads))
    device = resolve_device(str(cfg.device))
    cid = client_id(context, msg)
    partition, partitions = client_id(context), int(context.node_config.get("num-partitions", 1))
    federation = node_federation(cfg, device, node_cache_dir(context),
                                 lambda n: hosted_clients(partition, partitions, n))
    _, client_cls = lookup(cfg.strategy.name)
    server_round = int(msg.content.config_records[CONFIG]["server-round"])
    state = PersonalState(context, cid, device, server_round, cfg.client_state_dir or None,
                          after_training=not (msg.metadata.message_type == MessageType.TRAIN
                                              if training is None else training))
    return client_cls(cfg, cid, federation, state, device)


@cache
def ray_node() -> dict[str, list[int]]:
    """``{RAY_NODE: bytes of the node's IP}`` when this ClientApp runs in a Ray actor, else {}.

    Replies carry it so that a run on a Ray cluster shows which hosts trained (``hosts`` in
    metrics.jsonl). Read once per process; Ray is never imported for it (a deployment's
    ``flwr-clientapp`` does not load Ray).
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {RAY_NODE: list(ipaddress.ip_address(ray.util.get_node_ip_address()).packed)}


def _received(msg: Message, device: torch.device) -> tuple[dict, dict]:
    content = msg.content
    arrays = content.array_records.get(ARRAYS, ArrayRecord())
    return from_record(arrays, device), dict(content.config_records[CONFIG])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition of how many this node is (hence which clients it serves)."""
    partition = client_id(context)
    partitions = int(context.node_config.get("num-partitions", 0))
    cfg = run_config(context)
    configure_process(cfg)
    on_disk = bool(context.node_config.get("state-dir") or cfg.client_state_dir)
    metrics = MetricRecord({"partition-id": partition, "num-partitions": partitions,
                            "state-on-disk": int(on_disk), "deterministic": int(determinism_enabled())})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@app.train()
@serve_bundles
def train(msg: Message, context: Context) -> Message:
    method = client_method(context, msg)
    received, config = _received(msg, method.device)
    result = train_as_told(method, received, config)  # a Byzantine client's attack, if told so
    metrics = MetricRecord({**result.metrics, "num-examples": result.num_examples, **ray_node()})
    return Message(RecordDict({ARRAYS: to_record(result.upload), METRICS: metrics}), reply_to=msg)


@app.train("personalize")
@serve_bundles
def personalize(msg: Message, context: Context) -> Message:
    method = client_method(context, msg)
    received, config = _received(msg, method.device)
    metrics = MetricRecord(method.personalize(received, config))
    if EVAL_ARRAYS not in msg.content.array_records:
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)
    # The round's evaluation rides on this message (task/engine/rounds.py, ``personalize``): a
    # fresh client half scores the personal state just saved, as an evaluate message would.
    scorer = client_method(context, msg)
    eval_received = from_record(msg.content.array_records[EVAL_ARRAYS], scorer.device)
    return Message(RecordDict({METRICS: _scores(scorer, eval_received, config),
                               PERSONALIZE_METRICS: metrics}), reply_to=msg)


def _scores(method: ClientMethod, received: dict, config: dict) -> MetricRecord:
    scores = method.evaluate(received, config)
    counts = {"num-examples": method.data.num_test}
    if "validation_accuracy" in scores:
        counts["num-val"] = method.data.num_val
    return MetricRecord({**scores, **counts, **ray_node()})


@app.evaluate("new_client")
@serve_bundles
def new_client(msg: Message, context: Context) -> Message:
    """A client that never trained (``new_clients=F``): adapt the method's way, then score."""
    method = client_method(context, msg, training=True)
    received, config = _received(msg, method.device)
    metrics = method.adapt(received, config)
    if NEW_CLIENT_EXTRA in msg.content.array_records:
        after = client_method(context, msg)
        extra = from_record(msg.content.array_records[NEW_CLIENT_EXTRA], after.device)
        after.adapt_after(extra, config, metrics)
    scorer = client_method(context, msg)
    eval_received = from_record(msg.content.array_records[EVAL_ARRAYS], scorer.device)
    return Message(RecordDict({METRICS: _scores(scorer, eval_received, config)}), reply_to=msg)


@app.evaluate()
@serve_bundles
def evaluate(msg: Message, context: Context) -> Message:
    method = client_method(context, msg)
    received, config = _received(msg, method.device)
    return Message(RecordDict({METRICS: _scores(method, received, config)}), reply_to=msg)
