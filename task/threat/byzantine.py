"""The simulated threat model on the server's side: who is Byzantine, what they are told, and
the omniscient adversary. A simulation of an attack, not a defence (docs/clustered.md).

The engine (task/engine/rounds.py) applies it around aggregation, for every method alike:

- ``choose_byzantine``: ``attack.fraction`` of the clients, drawn once with the run's seed;
- ``ThreatModel.message_config``: a Byzantine client's training message says it is one, which
  attack, and whether its method uploads an update or a model (client-side attacks:
  task/threat/clients.py);
- ``ThreatModel.server_attack``: for the attacks that need every honest update (``bitflip``,
  ``alie``, ``ipm``: colluding attackers who know what every honest client sends), the
  Byzantine replies are replaced after validation and before aggregation by the malicious
  update, in the method's upload form (relative to the method's ``upload_reference``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from task.algorithms import robust
from task.core.messages import TrainReply
from task.core.params import StateDict
from task.threat import attacks

BYZANTINE_STREAM = 0xB12A  # second seed word of the Byzantine clients' choice
ADVERSARY_STREAM = 0xADE5  # second seed word of the server-side adversary's choices


def attack_name(cfg: DictConfig) -> str:
    return str(cfg.attack.name) if cfg.get("attack") is not None else "none"


def choose_byzantine(num_clients: int, cfg: DictConfig) -> list[int]:
    """The Byzantine clients: ``attack.fraction`` of all, drawn with the run's seed from their
    own stream (training's sampling sequence is the same with or without an attack).

    ``attack=none`` with a fraction > 0 marks the same clients without any attack: a control
    run whose summary covers exactly the honest clients of the attacked runs.
    """
    attack = cfg.get("attack")
    fraction = float(attack.get("fraction", 0.0)) if attack is not None else 0.0
    size = min(num_clients, int(round(fraction * num_clients)))
    if size == 0:
        return []
    rng = np.random.default_rng([int(cfg.seed), BYZANTINE_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=size, replace=False))


# reply, the arrays its client was sent -> what its upload is relative to (None: an update)
Reference = Callable[[TrainReply], StateDict | None]


class ThreatModel:
    """The run's Byzantine clients and the server-side adversary acting for them."""

    def __init__(self, cfg: DictConfig, num_clients: int):
        self.cfg = cfg
        self.attack = attack_name(cfg)
        self.byzantine: list[int] = choose_byzantine(num_clients, cfg)

    def message_config(self, cid: int, upload_is_update: bool) -> dict[str, Any]:
        """What a Byzantine client is told with its training message (nothing for the others)."""
        if cid not in self.byzantine or self.attack == "none":
            return {}
        kind = "update" if upload_is_update else "model"
        return {"byzantine": True, "attack": self.attack, "upload-kind": kind}

    def server_attack(self, server_round: int, replies: list[TrainReply], excluded: set[int],
                      reference: Reference) -> list[TrainReply]:
        """The replies with every Byzantine one replaced by the adversary's update, for the
        server-side attacks (the others pass through unchanged)."""
        bad = [r for r in replies if r.cid in self.byzantine]
        honest = [r for r in replies if r.cid not in excluded]
        if self.attack not in attacks.SERVER_ATTACKS or not bad or not honest or not replies[0].arrays:
            return replies
        keys = [k for k, v in replies[0].arrays.items() if v.is_floating_point()]
        H = torch.stack([update_vector(r, keys, reference(r)) for r in honest])
        rng = np.random.default_rng([int(self.cfg.seed), ADVERSARY_STREAM, server_round])
        for reply in bad:
            update = self.malicious_update(H, len(bad), rng)
            base = reference(reply)
            if base is not None:
                update = update + robust.flatten(base, keys)
            reply.arrays = {**reply.arrays, **robust.unflatten(update, reply.arrays, keys)}
        return replies

    def malicious_update(self, H: torch.Tensor, num_bad: int, rng: np.random.Generator) -> torch.Tensor:
        """The attack's update from the honest updates ``H`` (one row each)."""
        if self.attack == "bitflip":
            first = self.cfg.attack.get("honest", "random") == "first"
            return attacks.bitflip(H[0 if first else int(rng.integers(len(H)))])
        if self.attack == "alie":
            z = self.cfg.attack.get("z")
            rule = str(self.cfg.attack.get("z_rule", "baruch"))
            return attacks.alie(H, num_bad, None if z is None else float(z), rule)
        return attacks.ipm(H, float(self.cfg.attack.eps))


def update_vector(reply: TrainReply, keys: list[str], reference: StateDict | None) -> torch.Tensor:
    """The reply's update as one vector: its upload, less what it is relative to."""
    vector = robust.flatten(reply.arrays, keys)
    return vector if reference is None else vector - robust.flatten(reference, keys)
