"""``partition=file``: every client's exact train, test (and validation) indices from a JSON file.

A paper's split, reproduced sample for sample. The file (``partition.path``):

    {"clients": [{"train": [0, 5, ...], "test": [3, ...], "val": [7, ...], "group": 0}, ...],
     "groups": ["cluster A", "cluster B"]}

``train`` and ``val`` index the source's training set, ``test`` its test set (in the order the
source loads them: docs/data.md); ``val`` and ``group`` are optional (the group is the
ground-truth domain/cluster that per-group accuracy and ARI use; 0 where absent), as is
``groups`` (their names). Clients may share samples (some papers' splits do); one client's
train and val may not. Every problem is reported with the file, the client and the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

KEYS = ("train", "test", "val", "group")
TOP_KEYS = ("clients", "groups")


class PartitionFileError(ValueError):
    """A partition file that cannot be used; the message names the file and what is wrong."""


def read_partition_file(path: str | Path, num_train: int, num_test: int
                        ) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The clients' index arrays (``train``, ``test``, ``val`` or None, ``group``) and the group
    names, checked against a source of ``num_train`` training and ``num_test`` test samples."""
    file = Path(str(path)).expanduser()
    if not str(path):
        raise PartitionFileError("partition=file needs partition.path=<a JSON file of per-client indices>")
    try:
        spec = json.loads(file.read_text())
    except FileNotFoundError:
        raise PartitionFileError(f"partition.path={file}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PartitionFileError(f"partition.path={file} is not a readable JSON file ({err})") from None
    clients = spec.get("clients") if isinstance(spec, dict) else None
    if not isinstance(clients, list) or not clients:
        raise PartitionFileError(f"{file}: expected an object with a non-empty list \"clients\"")
    extra = sorted(set(spec) - set(TOP_KEYS))
    if extra:  # a misspelt "groups" would otherwise drop the group names without a word
        raise PartitionFileError(f"{file}: unknown top-level key(s) {extra}; valid: {list(TOP_KEYS)}")
    parsed = [_client(file, i, c, num_train, num_test) for i, c in enumerate(clients)]
    groups = max(c["group"] for c in parsed) + 1
    names = spec.get("groups") or [str(g) for g in range(groups)]
    if not isinstance(names, list) or len(names) < groups or not all(isinstance(n, str) for n in names):
        raise PartitionFileError(f"{file}: \"groups\" must list a name for each of the {groups} groups")
    return parsed, tuple(names)


def _client(file: Path, i: int, entry: Any, num_train: int, num_test: int) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise PartitionFileError(f"{file}: client {i} is not an object")
    extra = sorted(set(entry) - set(KEYS))
    if extra:
        raise PartitionFileError(f"{file}: client {i} has unknown key(s) {extra}; valid: {list(KEYS)}")
    out: dict[str, Any] = {"group": entry.get("group", 0)}
    if not isinstance(out["group"], int) or isinstance(out["group"], bool) or out["group"] < 0:
        raise PartitionFileError(f"{file}: client {i}'s group must be a non-negative integer")
    for key, size, required in (("train", num_train, True), ("test", num_test, True),
                                ("val", num_train, False)):
        if key not in entry:
            if required:
                raise PartitionFileError(f"{file}: client {i} has no \"{key}\" indices")
            out[key] = None
            continue
        out[key] = _indices(file, i, key, entry[key], size, allow_empty=key == "val")
    if out["val"] is not None and np.intersect1d(out["train"], out["val"]).size:
        raise PartitionFileError(f"{file}: client {i}'s train and val indices overlap")
    return out


def _indices(file: Path, i: int, key: str, values: Any, size: int, allow_empty: bool) -> np.ndarray:
    where = f"{file}: client {i}'s \"{key}\""
    ok = isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok:
        raise PartitionFileError(f"{where} must be a list of integers")
    if not values and not allow_empty:
        raise PartitionFileError(f"{where} is empty")
    outside = [v for v in values if not 0 <= v < size]  # Python ints: 2**70 must not overflow int64
    if outside:
        bad = outside[0]
        split = "test" if key == "test" else "training"
        raise PartitionFileError(f"{where} has index {bad} outside [0, {size - 1}] of the {split} set")
    idx = np.asarray(values, dtype=np.int64)
    if len(np.unique(idx)) != len(idx):
        raise PartitionFileError(f"{where} repeats an index")
    return idx


def file_digest(path: str | Path) -> str:
    """The file's content hash, so that a cached federation follows an edited file."""
    try:
        return hashlib.sha256(Path(str(path)).expanduser().read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"
