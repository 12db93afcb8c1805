"""FedRoD (Chen, Chao, ICLR 2022): a generic head trained with the balanced softmax for the
federation, and a personal head on top of it for the client.

    H.-Y. Chen, W.-L. Chao. "On Bridging Generic and Personalized Federated Learning for Image
    Classification". https://openreview.net/forum?id=I1hQbx10Kxn. Authors' code:
    https://github.com/hongyouc/Fed-RoD. Reference code: PFLlib (system/flcore/servers/
    serverrod.py, clients/clientrod.py).

Model = body phi + generic head g (the model's head, task/core/split.py) + personal head p_i
(a copy of the head's module, kept on the client; the run's initial head at first).
Round t, sampled clients S_t; on every minibatch (x, y) of client i, z = phi(x):
    L_bsm = CE(g(z) + log n_i, y)              (balanced softmax; n_i: i's class counts)
    L_p   = CE(sg[g(z)] + p_i(sg[z]), y)       (sg: stop-gradient)
    (phi, g) <- (phi, g) - eta grad L_bsm;   p_i <- p_i - eta grad L_p   (the same step)
upload (phi, g); keep p_i.
    server: (phi, g) <- sum_{i in S_t} p_i (phi_i, g_i)   (FedAvg over the whole generic model)
Personal prediction: g(z) + p_i(z); global accuracy: the generic model (phi, g)'s.

Where pflower departs: the paper's personal head may also be produced by a hypernetwork
(FedRoD-hyper); this is the linear-head version PFLlib implements. A class absent from the
client's training split gets log n = -inf, as in the balanced-softmax code PFLlib uses: its
logit drops out of L_bsm, which stays finite.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from task.core.params import StateDict, message_state, model_state
from task.core.split import split_model
from task.core.training import batches
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fedrod", {"head": Field(str, nullable=True)})
PERSONAL_HEAD = "personal_head"


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """CE(logits + log counts, y): the balanced softmax of Ren et al. (NeurIPS 2020)."""
    return F.cross_entropy(logits + counts.to(logits).log(), y)


class WithPersonalHead(nn.Module):
    """g(z) + p(z): the generic model's logits plus the personal head's on the same features."""

    def __init__(self, model: nn.Module, head: nn.Module, personal: nn.Module):
        super().__init__()
        self.model, self.personal = model, personal
        self.head = head
        self.features: torch.Tensor | None = None

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(generic logits, the features z the head saw)."""
        handle = self.head.register_forward_pre_hook(self._record)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, self.features

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.features = args[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, z = self.forward_both(x)
        return logits + self.personal(z)


class FedRoD(Method):
    """Server half: FedAvg over the generic model (body and generic head)."""

    name = "fedrod"
    keeps_client_state = True


class FedRoDClient(ClientMethod):
    """Client half: L_bsm steps the generic model, L_p the personal head, on the same batches."""

    name = "fedrod"

    def both(self, received: StateDict) -> WithPersonalHead:
        model = self.model("main", received)
        prefix = split_model(model, self.cfg.strategy.get("head")).prefix
        head = dict(model.named_modules())[prefix]
        personal = copy.deepcopy(head)  # the run's initial head until the client has its own
        personal.load_state_dict(self.state.load(PERSONAL_HEAD) or {
            k.removeprefix(f"{prefix}."): v for k, v in self.initial_state().items()
            if k.startswith(f"{prefix}.")})
        return WithPersonalHead(model, head, personal)

    def train(self, received, config):
        server_round = int(config["server-round"])
        both = self.both(received)
        counts = torch.bincount(self.data.y_train, minlength=self.federation.num_classes)
        # One optimizer over disjoint parameter sets: each loss only reaches its own set.
        opt = torch.optim.SGD(both.parameters(), lr=self.round_lr(server_round),
                              momentum=float(self.cfg.get("momentum", 0.0)),
                              weight_decay=float(self.cfg.get("weight_decay", 0.0)))
        both.train()
        gen = self.generator(server_round)
        x, y = self.data.x_train, self.data.y_train
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in both.modules())
        total, steps = 0.0, 0
        for _ in range(int(self.cfg.local_epochs)):
            for idx in batches(len(y), int(self.cfg.batch_size), gen, x.device,
                               bool(self.cfg.get("drop_last", False))):
                if len(idx) < 2 and has_bn:
                    continue  # BatchNorm cannot train on a single sample
                loss_bsm, loss_p = rod_losses(both, x[idx], y[idx], counts)
                opt.zero_grad(set_to_none=True)
                (loss_bsm + loss_p).backward()
                opt.step()
                total += float(loss_bsm.detach())
                steps += 1
        self.state.save(PERSONAL_HEAD, model_state(both.personal))
        return TrainResult(message_state(both.model.state_dict()), self.data.num_train,
                           {"train_loss": total / max(steps, 1)})

    def evaluate(self, received, config):
        both = self.both(received)
        return self.report(both, both.model)


def rod_losses(both: WithPersonalHead, x: torch.Tensor, y: torch.Tensor,
               counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_bsm, L_p) of the module docstring on one batch."""
    logits, z = both.forward_both(x)
    loss_bsm = balanced_softmax_loss(logits, y, counts)
    loss_p = F.cross_entropy(logits.detach() + both.personal(z.detach()), y)
    return loss_bsm, loss_p
