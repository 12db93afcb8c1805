"""pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020): personalized models by Moreau envelopes.

    C. T. Dinh, N. H. Tran, T. D. Nguyen. "Personalized Federated Learning with Moreau
    Envelopes". NeurIPS 2020. https://arxiv.org/abs/2006.08848. Authors' code:
    github.com/CharlieDinh/pFedMe (FLAlgorithms/users/userpFedMe.py, servers/serverbase.py
    ``persionalized_aggregate_parameters``, optimizers/fedoptimizer.py ``pFedMeOptimizer``).
    Reference code: PFLlib (system/flcore/clients/clientpFedMe.py, servers/serverpFedMe.py).

Client i's objective is the Moreau envelope F_i(w) = min_theta f_i(theta) + (lam/2)||theta - w||^2;
theta_i(w), its minimiser, is the personal model. Round t (Algorithm 1), sampled clients S_t:

    client i:  w_{i,0} = w_t;  theta_i = w_t
               for r = 0..R-1, one batch D_{i,r} each:
                   theta_i <- K steps of  theta - nu (grad f_i(theta; D) + lam (theta - w_{i,r}))
                              (h_i(theta; w_{i,r}) solved approximately, from the last theta_i)
                   w_{i,r+1} = w_{i,r} - eta lam (w_{i,r} - theta_i)
               upload w_{i,R};  keep theta_i
    server:    w_{t+1} = (1 - beta) w_t + beta sum_{i in S_t} p_i w_{i,R},   p_i = n_i / sum_{S_t} n_j

R = ``strategy.local_iterations`` (null: ``local_epochs`` epochs of batches), K = ``strategy.K``,
nu = ``strategy.personal_lr`` (null: the run's lr), eta = the run's (decayed) lr, lam =
``strategy.lam``, beta = ``strategy.beta``. Personal accuracy is theta_i's, the one the client's
last training ended with (the authors' ``persionalized_model_bar``; a client that never trained
is scored on w_t); global accuracy is w_t's. theta_i's forward passes are the only ones, so the
upload's BatchNorm statistics are theta_i's.

As the authors' code: theta_i restarts at w_t each round and each inner solve continues from
the previous one; p_i weights by samples (the paper writes the plain mean, equal when clients
hold equally many). Where pflower departs, an option: the authors' pFedMeOptimizer adds
mu theta (mu = 0.001) to the inner gradient, ``strategy.inner_l2`` (0, the paper's h_i, by
default); the authors train every client every round and aggregate the sampled ones, pflower
trains only the sampled ones (the same at full participation). The w step is torch's SGD on the
gradient lam (w - theta_i), so the run's ``momentum`` and ``weight_decay`` apply to it (0 by
default: the paper's step); the inner steps are plain.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from task.algorithms.meta import can_train_on, moreau_steps, trainable_parameters
from task.algorithms.mutual import iteration_batches
from task.core.params import damped_step, message_state, model_state
from task.core.training import batches
from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("pfedme", {
    "K": COUNT,
    "lam": Field(float, 0.0, low_open=True),
    "beta": Field(float, 0.0, low_open=True),  # the authors' MNIST runs use 1 and 2
    "personal_lr": Field(float, 0.0, low_open=True, nullable=True),
    "inner_l2": Field(float, 0.0),
    "local_iterations": Field(int, 1, nullable=True),
})
PERSONAL = "personal"  # theta_i in the client's state


class PFedMe(Method):
    """Server half: w_{t+1} = (1 - beta) w_t + beta sum_i p_i w_i."""

    name = "pfedme"
    keeps_client_state = True

    def aggregate_replies(self, server_round, replies):
        merged = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state = damped_step(self.global_state, merged, float(self.cfg.strategy.beta))


class PFedMeClient(ClientMethod):
    """Client half: R local iterations of (K inner steps on theta_i, one step of w towards it)."""

    name = "pfedme"

    def train(self, received, config):
        server_round = int(config["server-round"])
        s = self.cfg.strategy
        lam, eta = float(s.lam), self.round_lr(server_round)
        nu = eta if s.personal_lr is None else float(s.personal_lr)
        w = self.model("global", received)
        theta = self.model(PERSONAL, received)
        opt_w = torch.optim.SGD(w.parameters(), lr=eta, momentum=float(self.cfg.get("momentum", 0.0)),
                                weight_decay=float(self.cfg.get("weight_decay", 0.0)))
        theta.train()
        w_params = trainable_parameters(w)
        theta_params = trainable_parameters(theta)
        losses = []
        for idx in self.local_batches(server_round):
            if not can_train_on(theta, len(idx)):
                continue
            batch = (self.data.x_train[idx], self.data.y_train[idx])
            losses.append(moreau_steps(theta, batch, w_params, lam, nu, int(s.K), float(s.inner_l2)))
            opt_w.zero_grad(set_to_none=True)
            with torch.no_grad():  # grad of (lam/2)||w - theta||^2: the pull towards theta_i
                for name, p in w_params.items():
                    p.grad = lam * (p - theta_params[name])
            opt_w.step()
        kept = model_state(theta)
        self.state.save(PERSONAL, kept)
        upload = {**kept, **{n: p.detach() for n, p in w.named_parameters()}}
        return TrainResult(message_state(upload), self.data.num_train,
                           {"train_loss": float(sum(losses) / max(len(losses), 1))})

    def local_batches(self, server_round: int) -> Iterator[torch.Tensor]:
        """R = ``local_iterations`` batches, or (null) ``local_epochs`` epochs of batches."""
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
        personal = self.model(PERSONAL, self.state.load(PERSONAL) or received)
        return self.report(personal, self.model("global", received))
