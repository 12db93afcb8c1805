"""PFML (Yang, Tian, Zhang, ACML 2021): personalized federated mutual learning.

R. Yang, J. Tian, Y. Zhang. "Regularized Mutual Learning for Personalized Federated Learning".
ACML 2021, PMLR 157:1521-1536. https://proceedings.mlr.press/v157/yang21c.html

Client i keeps a personal model m (never uploaded) and trains a local copy w of the global
model w_t (uploaded). Deep mutual learning couples the two on every batch (peer outputs
detached, p = softmax(z / T), KL weight kappa):

    L(w) = CE(w) + kappa T^2 KL(p_m || p_w)            L(m) = CE(m) + kappa T^2 KL(p_w || p_m)

Each of the E local iterations takes one batch and solves pFedMe-style proximal problems by K
gradient steps (size ``inner_lr``) from the current iterate, with the peer outputs fixed:

    theta* ~ argmin_theta L(theta) + (lam/2) ||m - theta||^2       (centre: m before the step)
    w^     ~ argmin_v     L(v)     + (lam/2) ||w_t - v||^2         (centre: the received w_t)

then the outer updates, both from the models before this iteration (simultaneous):

    m <- m - eta grad L(m) - eta lam (m - theta*)
    w <- w - eta grad L(w) - eta lam (w - w^)

K = 0 (or lam = 0) is plain deep mutual learning: m <- m - eta grad L(m), w <- w - eta grad L(w).
Server, replies S_t with p_i = n_i / sum_{S_t} n_j:

    w_{t+1} = (1 - beta) w_t + beta sum_{i in S_t} p_i w_i         (beta = 1: FedAvg's step)

pFedMe's code (which PFML builds on) weights the mean by sample counts; the paper writes the
plain mean, equal to it when clients hold equally many samples.
m starts as the first w_t the client receives and persists (``reset_personal=true``: m <- w_t
at every round's start, as the paper's algorithm box). Personalized accuracy is m's; global
accuracy is w_t's. The outer step is torch's SGD, so the run's momentum and weight decay
apply (the paper uses neither); the inner steps are plain gradient steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from task.algorithms.mutual import iteration_batches, mutual_loss, outer_gradient, prox_steps
from task.core.params import StateDict, damped_step, message_state, model_state
from task.core.training import batches
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("pfml", {
    "K": Field(int, 0),
    "lam": Field(float, 0.0),
    "beta": Field(float, 0.0, low_open=True),  # may exceed 1: the paper's MNIST runs use 2
    "kl_weight": Field(float, 0.0),
    "temperature": Field(float, 0.0, low_open=True),
    "reset_personal": Field(bool),
    "inner_lr": Field(float, 0.0, low_open=True, nullable=True),
    "local_iterations": Field(int, 1, nullable=True),
})


class PFML(Method):
    """Server half: w_{t+1} = (1 - beta) w_t + beta sum_i p_i w_i."""

    name = "pfml"
    keeps_client_state = True

    def aggregate_replies(self, server_round, replies):
        merged = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state = damped_step(self.global_state, merged, float(self.cfg.strategy.beta))


class PFMLClient(ClientMethod):
    """Client half: E mutual-learning iterations of (m, w) with pFedMe-style inner solves."""

    name = "pfml"

    def personal_start(self, received: StateDict) -> StateDict:
        """m at the round's start: the kept m, or w_t (first round, or ``reset_personal``)."""
        if bool(self.cfg.strategy.reset_personal):
            return received
        return self.state.load("personal") or received

    def train(self, received, config):
        server_round = int(config["server-round"])
        m = self.model("personal", self.personal_start(received))
        w = self.model("global", received)
        loss_m, loss_w = self.mutual_train(m, w, received, server_round)
        self.state.save("personal", model_state(m))
        return TrainResult(message_state(w.state_dict()), self.data.num_train,
                           {"train_loss": loss_w, "personal_loss": loss_m})

    def mutual_train(self, m: nn.Module, w: nn.Module, w_t: StateDict,
                     server_round: int) -> tuple[float, float]:
        """The E local iterations; returns the mean L(m) and L(w) over them."""
        s = self.cfg.strategy
        lam, steps = float(s.lam), int(s.K)
        kappa, temp = float(s.kl_weight), float(s.temperature)
        lr = self.round_lr(server_round)
        inner_lr = lr if s.inner_lr is None else float(s.inner_lr)
        opt_m, opt_w = (torch.optim.SGD(model.parameters(), lr=lr,
                                        momentum=float(self.cfg.get("momentum", 0.0)),
                                        weight_decay=float(self.cfg.get("weight_decay", 0.0)))
                        for model in (m, w))
        m.train()
        w.train()
        totals, count = [0.0, 0.0], 0
        for idx in self.local_batches(server_round):
            x, y = self.data.x_train[idx], self.data.y_train[idx]
            z_m, z_w = m(x), w(x)
            # Inner problems first: they start from, and m's is centred at, the models before
            # this iteration's outer step; the peers' outputs are fixed for the whole iteration.
            theta = w_hat = None
            if steps > 0 and lam > 0:
                theta = self.inner_solve(m, model_state(m), x, y, z_w, lam, inner_lr, steps)
                w_hat = self.inner_solve(w, w_t, x, y, z_m, lam, inner_lr, steps)
            l_m = mutual_loss(z_m, y, z_w, kappa, temp)
            l_w = mutual_loss(z_w, y, z_m, kappa, temp)
            opt_m.zero_grad(set_to_none=True)
            opt_w.zero_grad(set_to_none=True)
            (l_m + l_w).backward()  # peers detached: each loss reaches its own model only
            if theta is not None:
                outer_gradient(m, theta, lam)
                outer_gradient(w, w_hat, lam)
            opt_m.step()
            opt_w.step()
            totals[0] += float(l_m.detach())
            totals[1] += float(l_w.detach())
            count += 1
        return totals[0] / max(count, 1), totals[1] / max(count, 1)

    def inner_solve(self, start: nn.Module, centre: StateDict, x: torch.Tensor, y: torch.Tensor,
                    peer_logits: torch.Tensor, lam: float, lr: float, steps: int) -> StateDict:
        """K steps on L(theta) + (lam/2)||centre - theta||^2 from ``start``'s weights, on a
        scratch model; returns theta's parameters."""
        s = self.cfg.strategy
        scratch = self.model("inner", model_state(start))
        scratch.train()
        peer = peer_logits.detach()
        prox_steps(scratch, lambda model: mutual_loss(model(x), y, peer, float(s.kl_weight),
                                                      float(s.temperature)),
                   centre, lam, lr, steps)
        return {n: p.detach().clone() for n, p in scratch.named_parameters()}

    def local_batches(self, server_round: int) -> Iterator[torch.Tensor]:
        """``local_iterations`` batches, or (null) ``local_epochs`` epochs of batches."""
        n, bs = self.data.num_train, int(self.cfg.batch_size)
        gen, device = self.generator(server_round), self.data.x_train.device
        drop_last = bool(self.cfg.get("drop_last", False))
        iterations = self.cfg.strategy.local_iterations
        if iterations is not None:
            yield from iteration_batches(n, bs, int(iterations), gen, device, drop_last)
            return
        for _ in range(int(self.cfg.local_epochs)):
            yield from batches(n, bs, gen, device, drop_last)

    def evaluate(self, received, config):
        personal = self.model("personal", self.state.load("personal") or received)
        return self.report(personal, self.model("global", received))
