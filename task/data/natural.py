"""Natural federations: datasets whose samples each belong to an owner (``partition=natural``).

FEMNIST's samples are written by ~3,500 writers and Shakespeare's lines spoken by ~1,100
characters: the federation is given by the data, one client per owner, each with its own
train and test samples (LEAF's ``-t sample`` split). An :class:`OwnedSource` is a
:class:`~task.data.sources.Source` that records every sample's owner; ``partition=natural``
makes one client per owner (flwr-datasets' ``NaturalIdPartitioner`` over the owner column of
the training set), in the order the owners first appear in the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.common import log

from task.data.sources import Source


@dataclass
class OwnedSource(Source):
    """A Source whose every sample has an owner: ``owner_train`` / ``owner_test`` index
    ``owner_names`` (every owner has at least one train and one test sample)."""

    owner_train: torch.Tensor | None = None
    owner_test: torch.Tensor | None = None
    owner_names: tuple[str, ...] = ()


def has_owners(source: Source) -> bool:
    return getattr(source, "owner_train", None) is not None


def natural_split(source: Source) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every owner's (train indices, test indices), owner 0 first."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if not has_owners(source):
        raise ValueError(f"partition=natural needs a dataset whose samples have owners (femnist: writers, "
                         f"shakespeare: speakers); dataset={source.name} has none: use partition=iid, "
                         "dirichlet, ...")
    owners_tr = source.owner_train.numpy()
    partitioner = NaturalIdPartitioner(partition_by="owner")
    partitioner.dataset = Dataset.from_dict({"owner": owners_tr, "idx": np.arange(len(owners_tr))})
    first = np.asarray(partitioner.load_partition(0).with_format("numpy")[:]["idx"], dtype=np.int64)
    # load_partition hashes each partition's indices (~0.1 s a client on a large set); the
    # partitioner keeps the same assignment, read once the first partition agrees with it.
    mapping = partitioner._partition_id_to_indices
    ids = partitioner.partition_id_to_natural_id
    if not np.array_equal(np.asarray(mapping[0], dtype=np.int64), first):
        raise RuntimeError("NaturalIdPartitioner's partition 0 disagrees with its index map")
    tests = _indices_by_owner(source.owner_test.numpy(), len(source.owner_names))
    shown = ", ".join(f"{p}={source.owner_names[int(ids[p])]}" for p in range(min(len(ids), 5)))
    log(INFO, "partition=natural: %d clients, one per owner (client=owner: %s%s)", len(ids), shown,
        ", ..." if len(ids) > 5 else "")
    return [(np.asarray(mapping[p], dtype=np.int64), tests[int(ids[p])]) for p in range(len(ids))]


def _indices_by_owner(owners: np.ndarray, num_owners: int) -> list[np.ndarray]:
    order = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[order], np.arange(1, num_owners))
    return np.split(order.astype(np.int64), bounds)
