"""Local: every client trains only on its own data; nothing is aggregated or sent.

    client i:  v_i <- SGD_E(v_i; CE on D_i)    (v_i persists in the personal state)
The lower bound that any federated method should beat where clients share structure.
"""

from __future__ import annotations

from task.core.params import model_state
from task.run.schema import register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("local", {})


class Local(Method):
    """Server half: sends no arrays, expects none back, keeps no model."""

    name = "local"
    keeps_client_state = True
    has_global_model = False

    def train_arrays(self, cid, server_round):
        return {}

    def aggregate_replies(self, server_round, replies):
        return None

    def eval_arrays(self, cid):
        return {}


class LocalClient(ClientMethod):
    """Client half: trains the personal model, uploads nothing."""

    name = "local"

    def personal_model(self):
        return self.model("main", self.state.load("personal"))

    def train(self, received, config):
        model = self.personal_model()
        loss = self.fit(model, int(config["server-round"]))
        self.state.save("personal", model_state(model))
        return TrainResult({}, self.data.num_train, {"train_loss": loss})

    def evaluate(self, received, config):
        return self.report(self.personal_model())
