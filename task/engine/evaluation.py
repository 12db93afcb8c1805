"""The evaluation summary of a round: which clients score, and what their scores add up to.

Personal accuracies are summarised as the mean, the sample-weighted mean and the worst
client, on the test split and (where clients have one) on the validation split; clients the
threat model marks Byzantine are scored but left out of every summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import MetricRecord

SUMMARY_KEYS = ("mean", "weighted", "worst")
EVAL_SAMPLE_STREAM = 0xE7A1  # second seed word of the evaluation sample's generator


def summarize_accuracy(prefix: str, scores: list[tuple[float, int]]) -> dict[str, float]:
    """``<prefix>_mean``, ``_weighted`` (by sample count) and ``_worst`` of (accuracy, count) pairs."""
    accuracies = [a for a, _ in scores]
    return {f"{prefix}_mean": float(np.mean(accuracies)),
            f"{prefix}_weighted": sum(a * n for a, n in scores) / sum(n for _, n in scores),
            f"{prefix}_worst": min(accuracies)}


def eval_sample(seed: int, num_clients: int, fraction: float) -> list[int] | None:
    """The fixed ``eval_fraction`` sample of clients that evaluate (None: all of them).

    Drawn once from its own generator (seeded by the run's seed), so the same clients score
    every evaluation round and training's sampling sequence is unchanged.
    """
    if fraction >= 1.0:
        return None
    size = max(1, min(num_clients, round(fraction * num_clients)))
    rng = np.random.default_rng([seed, EVAL_SAMPLE_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=size, replace=False))


def summarize_scores(scores: list[tuple[int, dict]], excluded: set[int],
                     has_global_model: bool) -> MetricRecord | None:
    """The round's evaluation summary from the validated (client, scores) pairs."""
    if not scores:
        return None
    acc = {cid: m["accuracy"] for cid, m in scores}
    counted = [(cid, m) for cid, m in scores if cid not in excluded] or scores
    result = summarize_accuracy("accuracy", [(m["accuracy"], m["num-examples"]) for _, m in counted])
    val = [(m["validation_accuracy"], m["num-val"]) for _, m in counted if "validation_accuracy" in m]
    if val:
        result.update(summarize_accuracy("validation", val))
    glob = [(m["global_accuracy"], m["num-examples"]) for _, m in counted if "global_accuracy" in m]
    if has_global_model and glob:
        result["global_accuracy"] = sum(a * k for a, k in glob) / sum(k for _, k in glob)
    result.update({f"client_{c}": a for c, a in acc.items()})
    return MetricRecord(result)


def client_details(scores: list[tuple[int, dict]], has_global_model: bool) -> dict[str, dict[int, float]]:
    """Each scored client's validation accuracy, global-model accuracy and test loss, by client
    id (clients.csv's columns beside ``per_client_accuracy``)."""
    keys = {"per_client_validation": "validation_accuracy", "per_client_loss": "loss"}
    if has_global_model:
        keys["per_client_global"] = "global_accuracy"
    details = {row_key: {cid: float(m[key]) for cid, m in scores if key in m}
               for row_key, key in keys.items()}
    return {row_key: values for row_key, values in details.items() if values}


def group_accuracy(per_client: dict[int, float], groups_of: list[int], names: list[str],
                   excluded: set[int]) -> dict[str, float]:
    """Mean accuracy of each domain/cluster's clients (over the clients that reported;
    ``excluded`` left out), keyed by the group's name."""
    groups: dict[str, list[float]] = {}
    for cid, accuracy in sorted(per_client.items()):
        if cid in excluded or cid >= len(groups_of):
            continue
        gid = groups_of[cid]
        name = names[gid] if gid < len(names) else str(gid)
        groups.setdefault(name, []).append(accuracy)
    return {name: float(np.mean(values)) for name, values in groups.items()}


def eval_row(metrics: MetricRecord, groups_of: list[int], names: list[str],
             excluded: set[int]) -> dict[str, Any]:
    """The evaluation part of a round's metrics.jsonl row."""
    per_client = {int(k.split("_", 1)[1]): float(v) for k, v in metrics.items()
                  if k.startswith("client_")}
    row = {
        "personalized_accuracy": {k: float(metrics[f"accuracy_{k}"]) for k in SUMMARY_KEYS},
        "global_accuracy": float(metrics["global_accuracy"]) if "global_accuracy" in metrics else None,
        "per_client_accuracy": per_client,
    }
    if "validation_mean" in metrics:
        row["validation_accuracy"] = {k: float(metrics[f"validation_{k}"]) for k in SUMMARY_KEYS}
    if groups_of and len(names) > 1:
        row["group_accuracy"] = group_accuracy(per_client, groups_of, names, excluded)
    if excluded:
        row["excluded_clients"] = sorted(excluded)
    return row
