"""FedAvg (McMahan et al., AISTATS 2017): the global model is every client's model.

Round t, sampled clients S_t:
    client i:  w_i <- SGD_E(w_g; CE on D_i)                (E = local_epochs)
    server:    w_g <- sum_{i in S_t} p_i w_i,   p_i = n_i / sum_{j in S_t} n_j
Personalized accuracy of FedAvg = w_g scored on each client's own test split.
"""

from __future__ import annotations

from task.core.params import message_state
from task.run.schema import register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fedavg", {})


class FedAvg(Method):
    """Server half: the p-weighted mean of the returned models (Method's default)."""

    name = "fedavg"


class FedAvgClient(ClientMethod):
    """Client half: E epochs of SGD from the received global model; upload the result."""

    name = "fedavg"

    def train(self, received, config):
        model = self.model("main", received)
        loss = self.fit(model, int(config["server-round"]), **self.loss_terms(received))
        return TrainResult(message_state(model.state_dict()), self.data.num_train, {"train_loss": loss})

    def loss_terms(self, received) -> dict:
        """Extra arguments of the local objective (none for FedAvg)."""
        return {}
