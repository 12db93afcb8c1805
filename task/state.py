"""A client's personal state: kept in Flower's ``context.state`` and, optionally, on disk.

Every method keeps what must survive between rounds (personal model, BN statistics, sparse
part, dual variables, running scalars) through this one helper. It lives in
``context.state`` (a RecordDict that Flower keeps for the node between rounds); when the
node is given a ``state-dir`` in its node config, every save is also written to disk
atomically (``<state-dir>/client-<cid>/<name>.npz``, numpy format, no pickle), so that a
SuperNode restart loses nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

StateDict = dict[str, torch.Tensor]
SCALARS = "scalars"


class PersonalState:
    """Named state dicts and scalars of one client, persisted across rounds."""

    def __init__(self, context: Context, cid: int, device: torch.device):
        self.record = context.state
        self.device = device
        state_dir = context.node_config.get("state-dir")
        self.dir = Path(str(state_dir)) / f"client-{cid}" if state_dir else None

    def load(self, name: str) -> StateDict | None:
        """The state dict saved under ``name``, or None if this client has none yet."""
        key = f"arrays.{name}"
        if key not in self.record.array_records and self.dir is not None:
            self._load_from_disk(name)
        if key not in self.record.array_records:
            return None
        items = self.record.array_records[key].items()
        return {k: torch.from_numpy(v.numpy().copy()).to(self.device) for k, v in items}

    def save(self, name: str, state: StateDict) -> None:
        arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
        self.record.array_records[f"arrays.{name}"] = ArrayRecord(
            {k: torch.from_numpy(a) for k, a in arrays.items()}
        )
        if self.dir is not None:
            self._atomic_write(f"{name}.npz", lambda f: np.savez(f, **arrays))

    def scalars(self) -> dict:
        """Scalars saved with ``save_scalars`` (empty if none)."""
        if SCALARS not in self.record.config_records and self.dir is not None:
            path = self.dir / f"{SCALARS}.npz"
            if path.exists():
                with np.load(path, allow_pickle=False) as data:
                    self.record.config_records[SCALARS] = ConfigRecord(
                        {k: data[k].tolist() for k in data.files})
        return dict(self.record.config_records.get(SCALARS, ConfigRecord()))

    def save_scalars(self, values: dict) -> None:
        self.record.config_records[SCALARS] = ConfigRecord(values)
        if self.dir is not None:
            self._atomic_write(f"{SCALARS}.npz",
                               lambda f: np.savez(f, **{k: np.asarray(v) for k, v in values.items()}))

    def _load_from_disk(self, name: str) -> None:
        path = self.dir / f"{name}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as data:
                self.record.array_records[f"arrays.{name}"] = ArrayRecord(
                    {k: torch.from_numpy(data[k].copy()) for k in data.files})

    def _atomic_write(self, filename: str, write) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, self.dir / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
