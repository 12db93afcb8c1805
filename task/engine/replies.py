"""Every reply is checked before it is used: a bad one is dropped, logged with its reason and
counted in the round's ``rejected_replies`` (``RoundStats.reject``)."""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, Message, MetricRecord

from task.core.messages import ARRAYS, METRICS, RoundStats, Spec, TrainReply
from task.core.params import StateDict, all_finite, as_tensor, view


def validate_train_reply(message: Message, cid: int | None, spec: Spec | None, num_train: int,
                         stats: RoundStats) -> TrainReply | None:
    """The reply of client ``cid`` (sent arrays matching ``spec``) as a TrainReply, or None
    (rejected and counted) if anything is off."""
    if cid is None or spec is None:
        stats.reject(cid, "reply from a client that was not sampled this round")
        return None
    if message.has_error():
        stats.reject(cid, f"ClientApp failed: {message.error.reason}")
        return None
    content = message.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        stats.reject(cid, f"missing '{ARRAYS}' or '{METRICS}' record")
        return None
    record = content.array_records[ARRAYS]
    stats.bytes_up += record.count_bytes()
    decoded: StateDict = {}
    problem = array_problem(record, spec, decoded)
    if problem is None:
        problem = num_examples_problem(content.metric_records[METRICS], num_train)
    if problem is not None:
        stats.reject(cid, problem)
        return None
    metrics = dict(content.metric_records[METRICS])
    if not all(math.isfinite(float(v)) for v in metrics.values() if isinstance(v, int | float)):
        stats.reject(cid, "non-finite metric")
        return None
    # The arrays as validated: read in place from the reply's bytes (as ``from_record``
    # returns them), never copied; aggregation reads them once more.
    return TrainReply(cid, decoded, int(metrics["num-examples"]), metrics)


def array_problem(record: ArrayRecord, spec: Spec, decoded: dict | None = None) -> str | None:
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


def num_examples_problem(metrics: MetricRecord, limit: int) -> str | None:
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= limit:
        return f"num-examples={n!r} is not an integer in [1, {limit}]"
    return None


def validate_eval_reply(message: Message, cid: int | None, num_test: int,
                        stats: RoundStats) -> tuple[int, dict] | None:
    """The client and its scores, or None (rejected and counted) if anything is off."""
    if cid is None:
        stats.reject(cid, "evaluation reply from an unknown node")
        return None
    if message.has_error():
        stats.reject(cid, f"ClientApp failed in evaluate: {message.error.reason}")
        return None
    if METRICS not in message.content.metric_records:
        stats.reject(cid, f"evaluation reply without '{METRICS}'")
        return None
    metrics = dict(message.content.metric_records[METRICS])
    problem = num_examples_problem(message.content.metric_records[METRICS], num_test)
    accs = [metrics.get("accuracy"), metrics.get("global_accuracy", 0.0),
            metrics.get("validation_accuracy", 0.0)]
    if problem is None and not all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs):
        problem = f"accuracy {accs} outside [0, 1]"
    if problem is None and "validation_accuracy" in metrics:
        num_val = metrics.get("num-val")
        if not isinstance(num_val, int) or isinstance(num_val, bool) or num_val < 1:
            problem = f"num-val={num_val!r} is not a positive integer"
    if problem is not None:
        stats.reject(cid, problem)
        return None
    return cid, metrics
