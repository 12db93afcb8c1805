"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term in the local objective.

    client i:  w_i <- SGD_E(w_g; CE(w) + (mu/2) ||w - w_g||^2)
    server:    w_g <- sum_i p_i w_i
"""

from __future__ import annotations

from task.core.training import proximal_penalty
from task.run.schema import POSITIVE, register_strategy_schema

from .base import Method
from .fedavg import FedAvgClient

register_strategy_schema("fedprox", {"mu": POSITIVE})


class FedProx(Method):
    """Server half: as FedAvg."""

    name = "fedprox"


class FedProxClient(FedAvgClient):
    """Client half: FedAvg's local step with (mu/2)||w - w_g||^2 added to the loss."""

    name = "fedprox"

    def loss_terms(self, received):
        return {"penalty": proximal_penalty(received, float(self.cfg.strategy.mu))}
