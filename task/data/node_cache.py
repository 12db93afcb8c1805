"""What a deployed SuperNode keeps on its own disk so that a message starts fast.

In a deployment with Flower 1.41's default isolation a fresh ``flwr-clientapp`` process runs
every message (pflower's long-lived worker, deploy/worker.py, is the exception), so nothing
survives in memory from one message to the next: without a cache every message
composes the Hydra config (importing every strategy module for its schema) and builds the
whole federation to take one client's share of it. A node with a state directory keeps both,
read-only, in ``<state-dir>/cache/``:

- ``config-<key>.yaml``: the composed, validated config of the run's overrides (plain
  OmegaConf YAML, no Hydra needed to read it back);
- ``data-<key>.pt``: the partitions of the clients this node serves, as tensors
  (``torch.save``; read back with ``torch.load(mmap=True, weights_only=True)``, so no
  pickled code is ever run and the pages are mapped, not copied).

Keys hash everything the content depends on (the overrides, every file under ``conf/`` and
the config code; the dataset, partition and seed and the code that builds the data), so a
changed config or a new pflower version never reads a stale entry. Writes are
atomic (temporary file, then rename). This is per-node, read-only data: personal state
stays in task/core/state.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = TASK_DIR.parent / "conf"
CONFIG_CODE = ("run/config.py", "run/schema.py")
DATA_CODE = ("data/load.py", "data/federation.py", "data/digits.py", "data/sources.py", "data/partitions.py",
             "data/normalize.py", "data/partition_file.py", "data/leaf.py", "data/natural.py",
             "data/tiny_imagenet.py", "data/images.py", "data/image_folder.py", "data/hf_source.py")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _files_digest(root: Path, files: list[Path]) -> str:
    """One hash of ``files`` (names relative to ``root``, and contents)."""
    return _digest(*[x for p in sorted(files) for x in (str(p.relative_to(root)), p.read_bytes())])


def _conf_digest() -> str:
    """Every file under conf/ and the code that composes and validates the config."""
    return _files_digest(CONF_DIR.parent, [*CONF_DIR.rglob("*.yaml"), *[TASK_DIR / f for f in CONFIG_CODE]])


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def cached_config(overrides: str, cache_dir: Path | None) -> Any:
    """``compose_config(overrides)``, read from ``cache_dir`` when it was composed before."""
    from omegaconf import OmegaConf

    if cache_dir is None:
        from task.run.config import compose_config

        return compose_config(overrides)
    path = cache_dir / f"config-{_digest(overrides, _conf_digest())}.yaml"
    if path.exists():
        cfg = OmegaConf.load(path)
        OmegaConf.set_readonly(cfg, True)
        return cfg
    from task.run.config import compose_config

    cfg = compose_config(overrides)
    _atomic(path, lambda tmp: OmegaConf.save(cfg, tmp))
    return cfg


def node_federation(cfg: Any, device: Any, cache_dir: Path | None, served: Callable[[int], list[int]]):
    """The federation with the partitions of the clients this node serves (``served(n)`` of
    the ``n`` clients), from ``cache_dir`` when built before; ``load_federation`` without a
    cache directory.

    The result's ``clients`` maps each served client id to its ClientData (all that a client
    half reads is ``federation.clients[cid]``).
    """
    import torch

    from task.data.federation import ClientData, Federation, client_on
    from task.data.load import federation_key, load_federation

    if cache_dir is None:
        return load_federation(cfg, device)
    code = _files_digest(TASK_DIR, [TASK_DIR / f for f in DATA_CODE])
    path = cache_dir / f"data-{_digest(federation_key(cfg), code)}.pt"
    if not path.exists():
        full = load_federation(cfg, torch.device("cpu"))
        payload = {"num_classes": full.num_classes, "input_shape": list(full.input_shape),
                   "domain_names": list(full.domain_names),
                   "clients": {str(c): vars(full.clients[c]) for c in served(len(full.clients))}}
        _atomic(path, lambda tmp: torch.save(payload, tmp))
    payload = torch.load(path, mmap=True, weights_only=True)
    clients = {int(c): client_on(ClientData(**fields), device) for c, fields in payload["clients"].items()}
    return Federation(clients, int(payload["num_classes"]),  # type: ignore[arg-type]
                      tuple(payload["input_shape"]), tuple(payload["domain_names"]))
