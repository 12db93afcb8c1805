"""The configured federation: built once per process from its source and partition, then reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from task.data.digits import build_digits_federation
from task.data.federation import DeviceClients, Federation
from task.data.leaf import SPECS, load_leaf
from task.data.normalize import normalized
from task.data.partition_file import file_digest
from task.data.partitions import partition_source, split_validation
from task.data.sources import Source, load_source
from task.data.tiny_imagenet import load_tiny_imagenet


def build_federation(cfg: DictConfig) -> Federation:
    """Build the federation the config names (uncached; see ``load_federation``).

    ``dataset=digits`` is the built-in federation (``partition=domains`` only); every other
    dataset is a source of ``task/data/sources.py`` split by a partitioner of ``task/data/partitions.py``.
    """
    seed = int(cfg.seed)
    val_fraction = float(cfg.partition.get("val_fraction", 0.0) or 0.0)
    if cfg.dataset.name == "digits":
        if cfg.partition.name != "domains":
            raise ValueError(f"dataset=digits renders one visual domain per client group and takes "
                             f"partition=domains only (got partition={cfg.partition.name}); for label skew "
                             f"use a real dataset, e.g. dataset=mnist5k partition=dirichlet")
        dataset = cfg.dataset
        per = cfg.partition.get("clients_per_domain")
        if per is not None:
            dataset = OmegaConf.merge(dataset, {"clients_per_domain": int(per)})
        fed = build_digits_federation(dataset, seed)
    else:
        mode = str(cfg.dataset.get("normalize", "symmetric"))
        source = normalized(own_source(cfg.dataset) or read_source(cfg.dataset, val_fraction), mode)
        fed = partition_source(source, cfg.partition, seed)
    return split_validation(fed, val_fraction, seed)


def read_source(dataset: DictConfig, val_fraction: float) -> Source:
    """The whole dataset: the natural federations and Tiny-ImageNet here (their modules import
    task/data/sources.py, so it cannot dispatch to them), every other source by ``load_source``."""
    if dataset.name in SPECS:
        return load_leaf(dataset)
    if dataset.name == "tiny_imagenet":
        return load_tiny_imagenet(dataset)
    return load_source(dataset, val_fraction)


def own_source(dataset: DictConfig) -> Source | None:
    """The user's own images (``dataset=folder`` / ``hf``, docs/own_data.md), else None. Not in
    sources.py, which these modules build on (no import circle)."""
    if dataset.name == "folder":
        from task.data.image_folder import load_folder

        return load_folder(dataset)
    if dataset.name == "hf":
        from task.data.hf_source import load_hf

        return load_hf(dataset)
    return None


@lru_cache(maxsize=8)
def tree_digest(path: str) -> str:
    """A hash of every file's name, size and modification time below ``path`` (once per process:
    ``federation_key`` is asked at every message)."""
    root = Path(path).expanduser()
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        stat = file.stat()
        h.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16] if root.is_dir() else "not a folder"


def federation_key(cfg: DictConfig) -> str:
    """What identifies a federation: dataset, partition, seed (and a partition file's content)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "partition")}
    if cfg.partition.name == "file":
        parts["partition_file"] = file_digest(cfg.partition.path)
    if cfg.dataset.name in ("folder", "hf"):  # a node's cached partitions follow edited images
        parts["own_data"] = tree_digest(str(cfg.dataset.path))
    return json.dumps({**parts, "seed": int(cfg.seed)}, sort_keys=True)


@lru_cache(maxsize=2)
def _cached_federation(key: str) -> Federation:
    return build_federation(OmegaConf.create(json.loads(key)))


@lru_cache(maxsize=4)
def _federation_on(key: str, device: str) -> Federation:
    fed = _cached_federation(key)
    if torch.device(device).type == "cpu":
        return fed
    return dataclasses.replace(fed, clients=DeviceClients(fed.clients, device))


def load_federation(cfg: DictConfig, device: torch.device) -> Federation:
    """The federation as tensors on ``device``, built once per process and then reused; on a
    device other than the CPU each client's tensors move there when first read
    (``DeviceClients``), so a process moves only the clients it serves.

    Read-only data may be cached per process; per-client mutable state never is.
    """
    return _federation_on(federation_key(cfg), str(device))
