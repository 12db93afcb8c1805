"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary, arXiv 2019): shared body, personal head.

    M. G. Arivazhagan et al. "Federated Learning with Personalization Layers".
    https://arxiv.org/abs/1912.00818. Reference code: PFLlib (TsingZ0/PFLlib,
    system/flcore/servers/serverper.py, clients/clientper.py).

Round t, sampled clients S_t; model = body phi (base layers) + head h (personalization layers):
    client i:  (phi_i, h_i) <- SGD_E((phi_g, h_i); CE on D_i)   (both parts train together)
               keep h_i; upload phi_i
    server:    phi_g <- sum_{i in S_t} p_i phi_i,   p_i = n_i / sum_{j in S_t} n_j
h_i starts at the run's initial head (the same on every client). Personal accuracy is
(phi_g, h_i)'s; there is no global model (no shared head). The split: task/core/split.py.
"""

from __future__ import annotations

from task.run.schema import register_strategy_schema

from .client_base import TrainResult
from .partial import HEAD_KEY, PartialClient, PartialSharing

register_strategy_schema("fedper", dict(HEAD_KEY))


class FedPer(PartialSharing):
    """Server half: sends and averages the body only."""

    name = "fedper"
    shared = "body"


class FedPerClient(PartialClient):
    """Client half: E epochs on (phi_g, h_i); upload phi_i, keep h_i."""

    name = "fedper"
    shared = "body"

    def train(self, received, config):
        model = self.personal_model(received)
        loss = self.fit(model, int(config["server-round"]))
        return TrainResult(self.keep(model, self.split()), self.data.num_train, {"train_loss": loss})
