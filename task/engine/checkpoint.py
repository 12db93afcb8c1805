"""The server's whole state after a round, in one file: the method's arrays and scalars, the
sampling generator and whether the clients' state is on disk (what a resume needs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from task.core.params import StateDict
from task.run.outputs import atomic_write

if TYPE_CHECKING:
    from strategies.base import Method

CHECKPOINT = "checkpoint.npz"
CHECKPOINT_META = "__meta__"


def save_checkpoint(path: Path, method: Method, server_round: int, rng: np.random.Generator,
                    client_state_on_disk: bool) -> None:
    """Write the server state after ``server_round`` atomically to ``path``."""
    meta = {"round": server_round, "rng": rng.bit_generator.state,
            "scalars": method.state_scalars(), "strategy": method.name,
            "client_state_on_disk": client_state_on_disk}
    arrays = {f"{group}/{key}": value.detach().cpu().numpy()
              for group, state in method.state_arrays().items() for key, value in state.items()}
    arrays[CHECKPOINT_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: Path, method: Method, rng: np.random.Generator) -> int:
    """Restore what ``save_checkpoint`` wrote into ``method`` and ``rng``; return its round."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data[CHECKPOINT_META]).decode())
        if meta["strategy"] != method.name:
            raise ValueError(f"{path} is a {meta['strategy']} checkpoint, not {method.name}")
        arrays: dict[str, StateDict] = {}
        for name in data.files:
            if name != CHECKPOINT_META:
                group, key = name.split("/", 1)
                arrays.setdefault(group, {})[key] = torch.from_numpy(data[name].copy())
    rng.bit_generator.state = meta["rng"]
    method.load_state(arrays, meta["scalars"])
    return int(meta["round"])

