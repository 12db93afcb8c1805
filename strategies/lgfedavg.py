"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, 2020):
personal body (local representation), shared head (global classifier).

    P. P. Liang et al. "Think Locally, Act Globally: Federated Learning with Local and Global
    Representations". https://arxiv.org/abs/2001.01523. Authors' code:
    https://github.com/pliang279/LG-FedAvg. Reference code: PFLlib (system/flcore/servers/
    serverlg.py, clients/clientlg.py: the global model is the head).

Round t, sampled clients S_t; model = body phi (local layers) + head h (global layers):
    client i:  (phi_i, h_i) <- SGD_E((phi_i, h_g); CE on D_i)   (both parts train together)
               keep phi_i; upload h_i
    server:    h_g <- sum_{i in S_t} p_i h_i,   p_i = n_i / sum_{j in S_t} n_j
phi_i starts at the run's initial body. Personal accuracy is (phi_i, h_g)'s; there is no
global model. Where pflower departs: the paper also reports LG-FedAvg started from a
FedAvg-trained model; this module makes no such warm start (phi_i starts at the run's initial
weights). The split: task/core/split.py.
"""

from __future__ import annotations

from task.run.schema import register_strategy_schema

from .client_base import TrainResult
from .partial import HEAD_KEY, PartialClient, PartialSharing

register_strategy_schema("lgfedavg", dict(HEAD_KEY))


class LGFedAvg(PartialSharing):
    """Server half: sends and averages the head only."""

    name = "lgfedavg"
    shared = "head"


class LGFedAvgClient(PartialClient):
    """Client half: E epochs on (phi_i, h_g); upload h_i, keep phi_i."""

    name = "lgfedavg"
    shared = "head"

    def train(self, received, config):
        model = self.personal_model(received)
        loss = self.fit(model, int(config["server-round"]))
        return TrainResult(self.keep(model, self.split()), self.data.num_train, {"train_loss": loss})
