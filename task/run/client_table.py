"""clients.csv: one line per client and round, from metrics.jsonl's per-client values.

A client has a line in a round where it trained or was scored; a new client (``new_clients=F``)
in the last round, with the accuracy it reached after adapting. The per-client values come
from the round's row (``per_client_accuracy`` and its siblings, task/engine/evaluation.py);
the group and sample counts are the federation's.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Protocol

CLIENTS_CSV = "clients.csv"
COLUMNS = ("round", "client", "group", "trained", "excluded", "new_client", "personal_accuracy",
           "validation_accuracy", "global_accuracy", "test_loss", "train_loss", "train_samples",
           "val_samples", "test_samples")
# column -> the row key holding it by client id
ROW_KEYS = {"personal_accuracy": "per_client_accuracy", "validation_accuracy": "per_client_validation",
            "global_accuracy": "per_client_global", "test_loss": "per_client_loss",
            "train_loss": "per_client_train_loss"}


class ClientInfo(Protocol):
    """What the table needs of a federation's client (task.data.federation.ClientData)."""

    domain_name: str
    num_train: int
    num_val: int
    num_test: int


def _by_client(row: dict, key: str) -> dict[int, float]:
    return {int(cid): value for cid, value in (row.get(key) or {}).items()}


def client_lines(row: dict, clients: Sequence[ClientInfo]) -> list[dict]:
    """The round's lines: every client that trained or was scored, by client id."""
    values = {column: _by_client(row, key) for column, key in ROW_KEYS.items()}
    # New clients (new_clients=F) are scored apart, in the last round only, after adapting.
    new = _by_client(row, "new_client_per_client_accuracy")
    values["personal_accuracy"].update(new)
    excluded = set(row.get("excluded_clients") or ())
    present = sorted(set().union(*(set(v) for v in values.values())))
    lines = []
    for cid in present:
        info = clients[cid] if cid < len(clients) else None
        line = {"round": row["round"], "client": cid, "group": info.domain_name if info else "",
                "trained": int(cid in values["train_loss"]), "excluded": int(cid in excluded),
                "new_client": int(cid in new)}
        line.update({column: values[column].get(cid, "") for column in ROW_KEYS})
        if info is not None:
            line.update(train_samples=info.num_train, val_samples=info.num_val, test_samples=info.num_test)
        lines.append(line)
    return lines


def csv_text(rows: list[dict], clients: Sequence[ClientInfo], header: bool) -> str:
    """The lines of ``rows`` as CSV text (with the header line if ``header``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerows(client_lines(row, clients))
    return buffer.getvalue()
