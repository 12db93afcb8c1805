"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): a global model and a regularised personal one.

    client i:  w_i <- SGD_E(w_g; CE(w))                               (uploaded, as FedAvg)
               v_i <- v_i - lr (m + lam (v_i - w_g)),  m <- beta m + grad CE(v_i)
                      for E_p epochs                                   (kept, never uploaded)
    server:    w_g <- sum_i p_i w_i
Personal accuracy is v_i's. Authors' code: litian96/ditto (``flearn/trainers_MTL/ditto.py``:
plain SGD on v, the penalty against the round's w^t; v starts as the initial model);
PRFL's Ditto (liehe/PRFL ``DittoWorker``: the penalty added after the worker's momentum).

Choices, each an option (conf/strategy/ditto.yaml):
- ``proximal: after_momentum`` (default): the proximal pull lam (v - w_g) is added to the step
  after the momentum buffer, as PRFL's Ditto; ``in_loss``: (lam/2)||v - w_g||^2 is part of the
  loss, so its gradient passes through the buffer (pflower before; with momentum 0.9 and lam 1
  it overshoots: the personal accuracy zig-zags). Without momentum the two are the same step,
  which is litian96's.
- ``personal_init: initial`` (default): v_i starts as the run's initial model, as both authors'
  codes; ``received``: as the first w_g the client receives (pflower before; the same when every
  client trains in round 1).
- The global and the personal step run one after the other (E epochs, then E_p), as the
  paper's Algorithm 1; the authors' codes interleave them batch by batch on the same batch.
"""

from __future__ import annotations

from task.core.params import message_state, model_state
from task.core.training import proximal_penalty
from task.run.schema import COUNT, POSITIVE, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("ditto", {
    "lam": POSITIVE, "personal_epochs": COUNT,
    "proximal": Field(str, choices=("after_momentum", "in_loss")),
    "personal_init": Field(str, choices=("initial", "received")),
})


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
        v = self.model("personal", self.state.load("personal") or self.personal_start(received))
        s = self.cfg.strategy
        lam = float(s.lam)
        pull = ({"proximal_step": (received, lam)} if s.proximal == "after_momentum"
                else {"penalty": proximal_penalty(received, lam)})
        personal_loss = self.fit(v, server_round, epochs=int(s.personal_epochs), stream=1, **pull)
        self.state.save("personal", model_state(v))
        return TrainResult(message_state(w.state_dict()), self.data.num_train,
                           {"train_loss": loss, "personal_loss": personal_loss})

    def personal_start(self, received):
        """v_i before its first personal step: the run's initial model, or the received w_g."""
        return self.initial_state() if self.cfg.strategy.personal_init == "initial" else received

    def evaluate(self, received, config):
        personal = self.model("personal", self.state.load("personal") or self.personal_start(received))
        return self.report(personal, self.model("global", received))
