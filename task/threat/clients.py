"""The simulated threat model on a Byzantine client: what it sends instead of an honest upload.

The server tells a Byzantine client so in its training message (task/threat/byzantine.py);
the ClientApp then trains through ``train_as_told``:

- ``labelflip`` trains on labels C - 1 - y;
- ``gaussian`` and ``signflip`` replace the update in the upload (task/threat/attacks.py),
  relative to what the method says its upload is relative to (``upload_reference``).

The reply travels like any other.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from task.core.params import StateDict
from task.threat import attacks

if TYPE_CHECKING:
    from strategies.client_base import ClientMethod, TrainResult

ATTACK_STREAM = 0xA77  # generator stream of a Byzantine client's random attack


def train_as_told(method: ClientMethod, received: StateDict, config: dict) -> TrainResult:
    """``method.train``, or what a Byzantine client sends instead when the config says it is one."""
    attack = str(config.get("attack", "none")) if config.get("byzantine") else "none"
    if attack == "labelflip":
        flipped = attacks.labelflip(method.data.y_train, method.federation.num_classes)
        method.data = dataclasses.replace(method.data, y_train=flipped)
    result = method.train(received, config)
    if attack in ("gaussian", "signflip") and result.upload:
        result.upload = malicious_upload(method, attack, result.upload, received, config)
    return result


def malicious_upload(method: ClientMethod, attack: str, upload: StateDict, received: StateDict,
                     config: dict) -> StateDict:
    """The upload with its update replaced by the ``gaussian`` or ``signflip`` attack's."""
    reference = method.upload_reference(received, upload, config)
    gen = method.generator(int(config["server-round"]), stream=ATTACK_STREAM)
    attack_cfg = method.cfg.attack
    out = dict(upload)
    for k, value in upload.items():
        if not value.is_floating_point():
            continue
        base = torch.zeros_like(value) if reference is None else reference[k].to(value)
        if attack == "gaussian":
            noise = attacks.gaussian(value.cpu(), gen, float(attack_cfg.mean), float(attack_cfg.std))
            update = noise.to(value)
        else:
            update = attacks.signflip(value - base, float(attack_cfg.scale))
        out[k] = base + update
    return out
