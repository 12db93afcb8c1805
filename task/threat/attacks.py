"""Byzantine attacks, as pure functions of updates (flat vectors) and labels.

An *update* is what a client's training changed: the uploaded model minus the model it was
sent (for methods that upload models: FedAvg, FedProx, FedBN, Ditto's global model, IFCA), or
the upload itself (methods that upload updates: LG-Mix, clustered). The threat model
(task/threat/byzantine.py, task/threat/clients.py) turns a malicious update back into an upload
of the method's kind.

Where each attack runs (the threat model, see docs/clustered.md):

- on the Byzantine ClientApp, travelling over the network like any reply:
  ``gaussian`` (the update replaced by N(mean, std^2) per coordinate, 1e6 and 200 as in
  Werner et al.'s code), ``signflip`` (-scale times its own update), ``labelflip`` (trains on
  labels y -> C - 1 - y);
- by the server-side omniscient adversary (task/threat/byzantine.py), which sees every
  honest update of the round before aggregation, a simulation of colluding attackers
  who know what the honest clients send: ``bitflip`` (minus an honest update: each Byzantine
  client negates a seeded randomly chosen honest client's update), ``alie`` ("A Little Is
  Enough", Baruch et al. 2019: mu - z sigma, coordinate-wise mean and standard deviation of
  the honest updates), ``ipm`` (inner-product manipulation, Xie et al. 2020: -eps mu).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

CLIENT_ATTACKS = ("gaussian", "signflip", "labelflip")
SERVER_ATTACKS = ("bitflip", "alie", "ipm")
ATTACKS = ("none", *CLIENT_ATTACKS, *SERVER_ATTACKS)


def gaussian(like: torch.Tensor, gen: torch.Generator, mean: float = 1e6, std: float = 200.0) -> torch.Tensor:
    """An update of ``like``'s shape drawn from N(mean, std^2) per coordinate."""
    noise = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    return (noise * std + mean).to(like.dtype)


def signflip(update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """-scale * the client's own update."""
    return -scale * update


def labelflip(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels y -> C - 1 - y (every label changes when C is even)."""
    return num_classes - 1 - labels


def bitflip(honest_update: torch.Tensor) -> torch.Tensor:
    """Minus an honest client's update.

    Which honest update (``attack.honest``, task/threat/byzantine.py): ``random`` (default), a
    seeded random honest client's update of the round, each Byzantine client its own draw;
    ``first``, the honest client of lowest id, as liehe/PRFL's ``BitFlippingWorker`` negates
    ``workers[0]``'s gradient. The Byzantine-robust code of Karimireddy et al. negates the
    Byzantine worker's own honest gradient instead: that is ``attack=signflip attack.scale=1``.
    """
    return -honest_update


def alie_z(num_clients: int, num_byzantine: int, rule: str = "baruch") -> float:
    """z_max with s = floor(n/2 + 1) - b supporters needed for a majority.

    ``baruch`` (Baruch et al. 2019, the paper): z = Phi^-1((n - s) / n);
    ``prfl`` (the Byzantine-robust code of Karimireddy, He, Jaggi, which PRFL builds on):
    z = Phi^-1((n - b - s) / (n - b)), over the honest clients only.
    """
    n, b = num_clients, num_byzantine
    s = math.floor(n / 2 + 1) - b
    p = (n - s) / n if rule == "baruch" else (n - b - s) / max(n - b, 1)
    return NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


def alie(honest_updates: torch.Tensor, num_byzantine: int, z: float | None = None,
         rule: str = "baruch") -> torch.Tensor:
    """mu - z sigma over the honest updates (rows); z = ``alie_z(n, b, rule)`` if None, with n
    the number of all clients in the round (honest and Byzantine). sigma is the population
    standard deviation under ``baruch`` (the paper's), the unbiased one under ``prfl`` (its
    code's ``torch.std``)."""
    n = len(honest_updates) + num_byzantine
    z = alie_z(n, num_byzantine, rule) if z is None else z
    mu = honest_updates.mean(0)
    sigma = honest_updates.std(0, unbiased=rule == "prfl" and len(honest_updates) > 1)
    return mu - z * sigma


def ipm(honest_updates: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """-eps times the mean of the honest updates (rows)."""
    return -eps * honest_updates.mean(0)
