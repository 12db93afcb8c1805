"""FedBN (Li et al., ICLR 2021): FedAvg where every BatchNorm entry stays on its client.

    client i:  model = (w_g without BN) + (BN_i, the client's own affine and running stats)
               train E epochs; upload w_i without BN; keep BN_i
    server:    w_g <- sum_i p_i w_i over the non-BN entries only
There is no complete global model: each client scores w_g with its own BN layers.
"""

from __future__ import annotations

from task.core.models import batchnorm_keys
from task.core.params import message_state, model_state
from task.run.schema import register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fedbn", {})


class FedBN(Method):
    """Server half: averages and sends only the entries outside BatchNorm layers."""

    name = "fedbn"
    keeps_client_state = True
    has_global_model = False

    @classmethod
    def from_model(cls, cfg, model, partition_sizes):
        bn = batchnorm_keys(model)
        shared = {k: v for k, v in model_state(model).items() if k not in bn}
        return cls(cfg, shared, partition_sizes)


class FedBNClient(ClientMethod):
    """Client half: local BN entries from the personal state, shared entries from the server."""

    name = "fedbn"

    def personal_model(self, received):
        return self.model("main", {**received, **(self.state.load("bn") or {})})

    def train(self, received, config):
        model = self.personal_model(received)
        loss = self.fit(model, int(config["server-round"]))
        bn = batchnorm_keys(model)
        self.state.save("bn", model_state(model, bn))
        shared = message_state({k: v for k, v in model.state_dict().items() if k not in bn})
        return TrainResult(shared, self.data.num_train, {"train_loss": loss})

    def evaluate(self, received, config):
        return self.report(self.personal_model(received))
