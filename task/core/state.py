"""A client's personal state: kept in Flower's ``context.state`` and, optionally, on disk.

Every method keeps what must survive between rounds (personal model, BN statistics, sparse
part, dual variables, running scalars) through this one helper. It lives in
``context.state`` (a RecordDict that Flower keeps for the node between rounds); when the
node has a state directory (node config ``state-dir``, or the run's ``client_state_dir``),
every save is also written to disk atomically (``<dir>/client-<cid>/<name>.npz``, numpy
format, no pickle), so that a SuperNode restart loses nothing.

Each saved entry is tagged with the round that wrote it. ``load`` in round r's training
returns the newest version written before round r (later phases of round r also see round
r's own). ``context.state`` holds the newest version only; the state directory also keeps the
previous one (``<name>.prev.npz``). A run resumed from the server's checkpoint after round k
(fresh contexts, state read from disk) therefore sees every client's state as of round k,
even if the crash came while some clients had already saved round k+1. With the run's
``client_state_dir`` (simulation) the state directory is the only copy and ``context.state``
holds none (see ``PersonalState.disk_only``).
"""

from __future__ import annotations

import hashlib
import json
import os
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import log

from task.core.params import as_tensor, encode, view
from task.run.outputs import atomic_write

StateDict = dict[str, torch.Tensor]
META = "__round__"


def state_digest(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of a saved state's arrays (names, dtypes, shapes, bytes), as logged when a
    restarted node reads its state back from disk: operators and tests can check it."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:16]


class _Version:
    """One saved version of a named state: its numpy arrays and/or its ArrayRecord.

    Each form is made from the other only when asked for: a load decodes only the version it
    returns, and a save re-stores the previous version's ArrayRecord as it is.
    """

    __slots__ = ("_arrays", "_record", "_npz")

    def __init__(self, arrays: dict[str, np.ndarray] | None = None, record: Any = None,
                 npz: Any = None):
        self._arrays, self._record, self._npz = arrays, record, npz

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays (from a record: read in place from its bytes, read-only; from an open
        ``.npz``: read when first asked for, so an older version nobody loads is never read)."""
        if self._arrays is None and self._npz is not None:
            with self._npz as data:
                self._arrays = {k: data[k] for k in data.files if k != META}
            self._npz = None
        if self._arrays is None:
            self._arrays = {k: view(a) for k, a in self._record.items()}
        return self._arrays

    @property
    def record(self) -> Any:
        if self._record is None:
            from flwr.app import ArrayRecord

            self._record = ArrayRecord({k: encode(v if v.flags.c_contiguous else v.copy())
                                        for k, v in self._arrays.items()})
        return self._record


class PersonalState:
    """Named state dicts (and scalars, stored as 0-d arrays) of one client, kept across rounds."""

    def __init__(self, context: Context, cid: int, device: torch.device, server_round: int = 1,
                 state_dir: str | None = None, after_training: bool = False):
        self.record = context.state
        self.device = device
        self.round = server_round
        # Training in round r reads what rounds < r saved; later phases of round r (personalize,
        # evaluate) also see what round r's training saved.
        self.visible = server_round if after_training else server_round - 1
        root = context.node_config.get("state-dir") or state_dir
        self.dir = Path(str(root)) / f"client-{cid}" if root else None
        # The run's ``client_state_dir`` (simulation): the disk is the only copy. Flower keeps
        # every simulated node's Context in the one simulation process and pickles it to the
        # actor and back with every message, so a copy in context.state would cost the server's
        # RAM per client and be copied twice per message. A SuperNode's own ``state-dir``
        # (deployment) keeps the newest version in its memory too: no disk read per message.
        self.disk_only = self.dir is not None and not context.node_config.get("state-dir")
        # A SuperNode may host several clients: their entries in context.state are kept apart.
        self.prefix = f"client-{cid}."
        # Versions read or written in this phase: {name: [(round, version), ...]} newest first.
        self._versions: dict[str, list[tuple[int, _Version]]] = {}

    # --- public API ---------------------------------------------------------------------
    def load(self, name: str) -> StateDict | None:
        """The newest version of ``name`` visible in this phase of the round, or None."""
        arrays = self._load_arrays(name)
        if arrays is None:
            return None
        # One copy, straight to the device: the caller may write to what it loads.
        return {k: as_tensor(v).to(self.device, copy=True) for k, v in arrays.items()}

    def save(self, name: str, state: StateDict) -> None:
        """Save ``state`` as this round's version of ``name`` (the previous one stays on disk)."""
        self._save_arrays(name, {k: v.detach().cpu().numpy() for k, v in state.items()})

    def scalars(self, name: str = "scalars") -> dict[str, float]:
        arrays = self._load_arrays(name)
        return {} if arrays is None else {k: v.item() for k, v in arrays.items()}

    def save_scalars(self, values: dict[str, float], name: str = "scalars") -> None:
        self._save_arrays(name, {k: np.asarray(v, dtype=np.float64) for k, v in values.items()})

    # --- versions -----------------------------------------------------------------------
    def _load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        versions = self._read_versions(name)
        return next((v.arrays for r, v in versions if r <= self.visible), None)

    def _save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        known = self._read_versions(name)
        older = [(r, v) for r, v in known if r < self.round][:1]
        versions = [(self.round, _Version(arrays=arrays)), *older]
        self._versions[name] = versions
        self._write_record(name, versions)
        if self.dir is not None:
            self._write_disk(name, versions, rotate=bool(known) and known[0][0] < self.round)

    def _write_disk(self, name: str, versions: list[tuple[int, _Version]], rotate: bool) -> None:
        """This round's version to ``<name>.npz``; the previous one stays as ``<name>.prev.npz``.

        When the newest version on disk is an older round's, it becomes the previous one by a
        rename (no rewrite); a second save in the same round just replaces this round's file.
        """
        current, previous = self.dir / f"{name}.npz", self.dir / f"{name}.prev.npz"
        if rotate and current.exists():
            os.replace(current, previous)
        elif len(versions) > 1 and not previous.exists():
            r, v = versions[1]
            self._atomic_savez(previous.name, {**v.arrays, META: np.asarray(r)})
        r, v = versions[0]
        self._atomic_savez(current.name, {**v.arrays, META: np.asarray(r)})

    def _read_versions(self, name: str) -> list[tuple[int, _Version]]:
        if name not in self._versions:
            versions = self._read_record(name)
            if not versions and self.dir is not None:
                versions = self._read_disk(name)
            self._versions[name] = versions
        return self._versions[name]

    def _write_record(self, name: str, versions: list[tuple[int, _Version]]) -> None:
        """Only the newest version lives in ``context.state``.

        A resumed run starts with fresh contexts and reads the state directory, and a round is
        never trained twice within one run, so an older version in memory would never be read;
        keeping it would double every client's memory.
        """
        from flwr.app import ConfigRecord

        if self.disk_only:
            return
        newest_round, newest = versions[0]
        self.record.array_records[f"{self.prefix}{name}"] = newest.record
        meta = ConfigRecord({"rounds": json.dumps([newest_round])})
        self.record.config_records[f"{self.prefix}{name}.rounds"] = meta

    def _read_record(self, name: str) -> list[tuple[int, _Version]]:
        meta = self.record.config_records.get(f"{self.prefix}{name}.rounds")
        if meta is None:
            return []
        rounds = json.loads(str(meta["rounds"]))
        return [(r, _Version(record=self.record.array_records[f"{self.prefix}{name}{slot}"]))
                for slot, r in zip(("", ".prev"), rounds, strict=False)]

    def _read_disk(self, name: str) -> list[tuple[int, _Version]]:
        """The versions on disk, newest first, each read only when its arrays are asked for.

        Each file stays open until then, so a later rename (``_write_disk``'s rotation) cannot
        change what it reads.
        """
        out = []
        for slot in ("", ".prev"):
            path = self.dir / f"{name}{slot}.npz"
            if not path.exists():
                continue
            npz = np.load(path, allow_pickle=False)
            version = _Version(npz=npz)
            out.append((int(npz[META]), version))
            # Read from disk only when context.state lacks it: a restarted node or a resume
            # (with the run's client_state_dir, every message: not worth a line and a hash).
            if not self.disk_only:
                log(INFO, "client state %s of round %s read from %s (digest %s)",
                    f"{self.prefix}{name}", out[-1][0], path, state_digest(version.arrays))
        return sorted(out, key=lambda v: -v[0])

    def _atomic_savez(self, filename: str, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.dir / filename, lambda f: np.savez(f, **arrays))
