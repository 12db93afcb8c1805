"""FedBABU (Oh, Kim, Yun, ICLR 2022): the body is federated while the head stays frozen at its
random initialisation; each client fine-tunes the whole model only to evaluate.

    J. Oh, S. Kim, S.-Y. Yun. "FedBABU: Toward Enhanced Representation for Federated Image
    Classification". https://openreview.net/forum?id=HuaYQfggn5u. Authors' code:
    https://github.com/jhoon-oh/FedBABU. Reference code: PFLlib (system/flcore/servers/
    serverbabu.py, clients/clientbabu.py).

Round t, sampled clients S_t; model = body phi + head h_0 (the run's initial head, the same
on every client and never trained, so never sent):
    client i:  phi_i <- SGD_E(phi_g; CE((phi, h_0) on D_i)),  h_0 frozen;  upload phi_i
    server:    phi_g <- sum_{i in S_t} p_i phi_i,   p_i = n_i / sum_{j in S_t} n_j
    evaluate:  (phi', h') <- SGD_{tau_f}((phi_g, h_0); CE on D_i)   (a copy; nothing kept)
               personal accuracy: (phi', h')'s;  global accuracy: (phi_g, h_0)'s
tau_f = ``strategy.ft_epochs``; ``strategy.ft_part``: ``all`` fine-tunes body and head (the
paper's and PFLlib's default), ``head`` the head only (PFLlib's ``which_module=['head']``). Where pflower
departs: PFLlib fine-tunes once, after the last round; here every evaluation fine-tunes a
fresh copy of (phi_g, h_0), so each round's personal accuracy is that of FedBABU stopped there.
No client state: a client's model is always (phi_g, h_0).
"""

from __future__ import annotations

from torch import nn

from task.core.params import StateDict, message_state, model_state
from task.core.split import Split, trainable
from task.run.schema import COUNT, Field, register_strategy_schema

from .client_base import TrainResult
from .partial import HEAD_KEY, PartialClient, PartialSharing

register_strategy_schema("fedbabu", {
    **HEAD_KEY, "ft_epochs": COUNT, "ft_part": Field(str, choices=("all", "head")),
    "ft_lr": Field(float, 0.0, low_open=True, nullable=True),
})


class FedBABU(PartialSharing):
    """Server half: sends and averages the body only; (phi_g, h_0) is a complete global model."""

    name = "fedbabu"
    shared = "body"
    keeps_client_state = False
    has_global_model = True


class FedBABUClient(PartialClient):
    """Client half: trains the body under the frozen initial head; fine-tunes a copy to score."""

    name = "fedbabu"
    shared = "body"

    def train(self, received, config):
        model = self.model("main", received)  # the body received, the head the initial one
        split = self.split()
        with trainable(model, split.body):
            loss = self.fit(model, int(config["server-round"]))
        return TrainResult(message_state_of(model, split), self.data.num_train, {"train_loss": loss})

    def evaluate(self, received, config):
        tuned = self.model("finetuned", received)
        split = self.split()
        keys = split.head if self.cfg.strategy.ft_part == "head" else split.head | split.body
        ft_lr = self.cfg.strategy.ft_lr
        with trainable(tuned, keys):  # stream 2: fine-tuning batches apart from training's
            self.fit(tuned, int(config["server-round"]), epochs=int(self.cfg.strategy.ft_epochs),
                     lr=None if ft_lr is None else float(ft_lr), stream=2)
        return self.report(tuned, self.model("main", received))



def message_state_of(model: nn.Module, split: Split) -> StateDict:
    """The body of ``model`` as an upload (FedBABU keeps nothing: its head is h_0)."""
    return message_state(split.of(model_state(model), "body"))
