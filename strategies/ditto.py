"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): a global model and a regularised personal one.

    client i:  w_i <- SGD_E(w_g; CE(w))                               (uploaded, as FedAvg)
               v_i <- SGD_{E_p}(v_i; CE(v) + (lam/2) ||v - w_g||^2)   (kept, never uploaded)
    server:    w_g <- sum_i p_i w_i
v_i starts as the first w_g the client receives. Personal accuracy is v_i's.
"""

from __future__ import annotations

from task.core.params import message_state, model_state
from task.core.training import proximal_penalty
from task.run.schema import COUNT, POSITIVE, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("ditto", {"lam": POSITIVE, "personal_epochs": COUNT})


class Ditto(Method):
    """Server half: as FedAvg (the personal models never leave the clients)."""

    name = "ditto"
    keeps_client_state = True


class DittoClient(ClientMethod):
    """Client half: the global step, then the proximal personal step towards w_g."""

    name = "ditto"

    def train(self, received, config):
        server_round = int(config["server-round"])
        w = self.model("global", received)
        loss = self.fit(w, server_round)
        v = self.model("personal", self.state.load("personal") or received)
        penalty = proximal_penalty(received, float(self.cfg.strategy.lam))
        personal_loss = self.fit(v, server_round, epochs=int(self.cfg.strategy.personal_epochs),
                                 stream=1, penalty=penalty)
        self.state.save("personal", model_state(v))
        return TrainResult(message_state(w.state_dict()), self.data.num_train,
                           {"train_loss": loss, "personal_loss": personal_loss})

    def evaluate(self, received, config):
        personal = self.model("personal", self.state.load("personal") or received)
        return self.report(personal, self.model("global", received))
