"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, ICML 2021): a shared representation (body)
learned by all clients, a personal head each client fits first.

    L. Collins et al. "Exploiting Shared Representations for Personalized Federated Learning".
    https://arxiv.org/abs/2102.07078. Authors' code: https://github.com/lgcollins/FedRep.
    Reference code: PFLlib (system/flcore/servers/serverrep.py, clients/clientrep.py).

Round t, sampled clients S_t; model = body phi + head h:
    client i:  1. h_i   <- SGD_{tau_h}(h_i;   CE((phi_g, h) on D_i)),  phi fixed at phi_g
               2. phi_i <- SGD_{tau_b}(phi_g; CE((phi, h_i) on D_i)),  h fixed at the new h_i
               keep h_i; upload phi_i
    server:    phi_g <- sum_{i in S_t} p_i phi_i,   p_i = n_i / sum_{j in S_t} n_j
tau_h = ``strategy.head_epochs``, tau_b = the run's ``local_epochs``. The authors' code counts
``--local_ep`` epochs in all, the last ``--local_rep_ep`` of them on the body; here both are
given apart. h_i starts at the run's initial head. Personal accuracy is (phi_g, h_i)'s; there
is no global model.

"Fixed" means no gradient step: BatchNorm running statistics of the body follow the batches
of the head epochs in train mode, as in PFLlib's client (task/core/split.py ``trainable``).
"""

from __future__ import annotations

from task.core.split import trainable
from task.run.schema import COUNT, register_strategy_schema

from .client_base import TrainResult
from .partial import HEAD_KEY, PartialClient, PartialSharing

register_strategy_schema("fedrep", {**HEAD_KEY, "head_epochs": COUNT})


class FedRep(PartialSharing):
    """Server half: sends and averages the body (the representation) only."""

    name = "fedrep"
    shared = "body"


class FedRepClient(PartialClient):
    """Client half: head epochs (body frozen), then body epochs (head frozen)."""

    name = "fedrep"
    shared = "body"

    def train(self, received, config):
        server_round = int(config["server-round"])
        model = self.personal_model(received)
        split = self.split()
        with trainable(model, split.head):  # 1. the head on the received representation
            head_loss = self.fit(model, server_round, epochs=int(self.cfg.strategy.head_epochs))
        with trainable(model, split.body):  # 2. the representation under the new head
            loss = self.fit(model, server_round, stream=1)
        return TrainResult(self.keep(model, split), self.data.num_train,
                           {"train_loss": loss, "head_loss": head_loss})
