"""APFL (Deng, Kamani, Mahdavi, 2020): each client's model is a mixture of a personal model and
the global one, with a per-client mixing weight alpha_i learned by gradient descent.

    Y. Deng, M. M. Kamani, M. Mahdavi. "Adaptive Personalized Federated Learning".
    https://arxiv.org/abs/2003.13461. Authors' code: FedTorch (MLOPTPSU/FedTorch,
    fedtorch/comms/utils/flow_utils.py, the alpha update). Reference code: PFLlib
    (system/flcore/servers/serverapfl.py, clients/clientapfl.py).

Round t, sampled clients S_t; client i keeps v_i and alpha_i (v_i = w_g, alpha_i =
``strategy.alpha`` on first participation), w starts at the received w_g. Every local step, on
one minibatch xi, with the values before the step:
    vbar    = alpha_i v_i + (1 - alpha_i) w                         (the mixed model)
    w       <- w - eta grad f_i(w; xi)
    v_i     <- v_i - eta grad_v f_i(vbar; xi) = v_i - eta alpha_i grad f_i(vbar; xi)
    alpha_i <- clip(alpha_i - eta_a (<v_i - w, grad f_i(vbar; xi)> + rho alpha_i), 0, 1)
               (grad_alpha f_i(vbar) = <v_i - w, grad f_i(vbar)>; only if ``adaptive``)
upload w; keep v_i, alpha_i.
    server: w_g <- sum_{i in S_t} p_i w_i,   p_i = n_i / sum_{j in S_t} n_j
Personal accuracy is that of vbar_i = alpha_i v_i + (1 - alpha_i) w_g (w_g: the synchronised
w, which every w_i equals after the round); global accuracy is w_g's. The mixture covers the
parameters; vbar's BatchNorm statistics are v_i's, which track the mixed model's forward passes.

eta = the run's decayed lr (momentum and weight decay apply to w and v), eta_a =
``strategy.alpha_lr`` (null: eta), rho = ``strategy.alpha_reg``. Where the codes depart from
the paper: FedTorch and PFLlib add rho = 0.02 (the paper has rho = 0, pflower's default; set
``strategy.alpha_reg=0.02`` for theirs); PFLlib steps v on its own loss f_i(v) rather than on
f_i(vbar), and overwrites v_i with vbar_i after each round; pflower follows the paper.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from task.core.params import StateDict, message_state, model_state
from task.core.training import batches
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("apfl", {
    "alpha": Field(float, 0.0, 1.0), "adaptive": Field(bool),
    "alpha_lr": Field(float, 0.0, low_open=True, nullable=True), "alpha_reg": Field(float, 0.0),
})
ALPHA = "alpha"


def mixed_parameters(v: nn.Module, w: nn.Module, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """vbar = alpha v + (1 - alpha) w over the parameters (w detached: vbar's loss steps v, alpha)."""
    w_params = dict(w.named_parameters())
    return {k: alpha * p + (1 - alpha) * w_params[k].detach() for k, p in v.named_parameters()}


def apfl_step(w: nn.Module, v: nn.Module, alpha: float, x: torch.Tensor, y: torch.Tensor,
              opt_w: torch.optim.Optimizer, opt_v: torch.optim.Optimizer, alpha_lr: float,
              alpha_reg: float = 0.0, adaptive: bool = True) -> tuple[float, float, float]:
    """One APFL step on (x, y): the w, v and alpha updates of the module docstring, all from
    the values before the step. Returns (loss of w, loss of vbar, the new alpha)."""
    loss_w = F.cross_entropy(w(x), y)
    opt_w.zero_grad(set_to_none=True)
    a = torch.tensor(float(alpha), dtype=torch.float64, requires_grad=adaptive)
    # vbar's forward pass through v's modules (its BatchNorm statistics are v's).
    # alpha in the weights' dtype: the inputs may be integer tokens (dataset=shakespeare)
    weights_dtype = next(v.parameters()).dtype
    loss_v = F.cross_entropy(functional_call(v, mixed_parameters(v, w, a.to(weights_dtype)), (x,)), y)
    opt_v.zero_grad(set_to_none=True)
    # v.grad = alpha grad f(vbar); a.grad = <v - w, grad f(vbar)> (the chain rule through vbar).
    loss_v.backward()
    loss_w.backward()
    new_alpha = float(alpha)
    if adaptive:
        new_alpha = float(np.clip(alpha - alpha_lr * (float(a.grad) + alpha_reg * alpha), 0.0, 1.0))
    opt_w.step()
    opt_v.step()
    return float(loss_w.detach()), float(loss_v.detach()), new_alpha


def mixed_state(v: StateDict, w: StateDict, alpha: float, parameters: set[str]) -> StateDict:
    """vbar's state dict: alpha v + (1 - alpha) w on the parameters, v's buffers."""
    return {k: (alpha * t + (1 - alpha) * w[k].to(t)) if k in parameters else t for k, t in v.items()}


class APFL(Method):
    """Server half: FedAvg's mean of the uploaded w_i; it records each client's alpha_i."""

    name = "apfl"
    keeps_client_state = True

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.alphas: dict[int, float] = {}

    def aggregate_replies(self, server_round, replies):
        self.alphas = {r.cid: float(r.metrics[ALPHA]) for r in replies}
        super().aggregate_replies(server_round, replies)

    def round_metrics(self, server_round):
        mean = float(np.mean(list(self.alphas.values()))) if self.alphas else None
        return {"apfl_alpha": {str(c): a for c, a in sorted(self.alphas.items())}, "apfl_alpha_mean": mean}


class APFLClient(ClientMethod):
    """Client half: w, v_i and alpha_i stepped together on each batch; upload w."""

    name = "apfl"

    def alpha(self) -> float:
        return float(self.state.scalars().get(ALPHA, float(self.cfg.strategy.alpha)))

    def train(self, received, config):
        server_round = int(config["server-round"])
        w = self.model("global", received)
        v = self.model("personal", self.state.load("personal") or received)
        alpha = self.alpha()
        lr = self.round_lr(server_round)
        alpha_lr = lr if self.cfg.strategy.alpha_lr is None else float(self.cfg.strategy.alpha_lr)
        opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=float(self.cfg.get("momentum", 0.0)),
                                weight_decay=float(self.cfg.get("weight_decay", 0.0))) for m in (w, v)]
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in w.modules())
        gen = self.generator(server_round)
        w.train()
        v.train()
        x, y = self.data.x_train, self.data.y_train
        losses = []
        for _ in range(int(self.cfg.local_epochs)):
            for idx in batches(len(y), int(self.cfg.batch_size), gen, x.device,
                               bool(self.cfg.get("drop_last", False))):
                if len(idx) < 2 and has_bn:
                    continue  # BatchNorm cannot train on a single sample
                step = apfl_step(w, v, alpha, x[idx], y[idx], *opts, alpha_lr,
                                 float(self.cfg.strategy.alpha_reg), bool(self.cfg.strategy.adaptive))
                alpha = step[2]
                losses.append(step[:2])
        self.state.save("personal", model_state(v))
        self.state.save_scalars({ALPHA: alpha})
        loss_w, loss_v = (float(np.mean(c)) for c in zip(*losses, strict=True)) if losses else (0.0, 0.0)
        return TrainResult(message_state(w.state_dict()), self.data.num_train,
                           {"train_loss": loss_w, "mixed_loss": loss_v, ALPHA: alpha})

    def evaluate(self, received, config):
        v = self.state.load("personal") or received
        parameters = {k for k, _ in self.model("global").named_parameters()}
        mixed = self.model("mixed", mixed_state(v, received, self.alpha(), parameters))
        return self.report(mixed, self.model("global", received))
