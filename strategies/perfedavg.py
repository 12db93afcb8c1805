"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020): FedAvg on the MAML objective.

    A. Fallah, A. Mokhtari, A. Ozdaglar. "Personalized Federated Learning with Theoretical
    Guarantees: A Model-Agnostic Meta-Learning Approach". NeurIPS 2020.
    https://arxiv.org/abs/2002.07948. No authors' code; reference codes: github.com/CharlieDinh/
    pFedMe (FLAlgorithms/users/userperavg.py, the Per-FedAvg baseline of pFedMe's paper) and
    PFLlib (system/flcore/clients/clientperavg.py).

The global model w minimises sum_i p_i f_i(w - alpha grad f_i(w)): a model one gradient step
away from every client's own. Round t (Algorithm 1), sampled clients S_t:

    client i:  w = w_t;  for tau local steps, with fresh batches D, D' (and D'' for HF):
                   w~ = w - alpha grad f_i(w; D)                          (the inner step)
                   FO:  w <- w - beta grad f_i(w~; D')
                   HF:  w <- w - beta (I - alpha d_i) grad f_i(w~; D'),
                        d_i g ~ grad^2 f_i(w; D'') g = [grad f_i(w + delta g; D'')
                                                       - grad f_i(w - delta g; D'')] / (2 delta)
               upload w
    server:    w_{t+1} = sum_{i in S_t} p_i w_i
    evaluate:  theta_i = w_t - alpha grad f_i(w_t; D)   (``adapt_steps`` steps, fresh training
               batches each): personal accuracy is theta_i's, global accuracy w_t's.

``strategy.variant``: ``fo`` (Per-FedAvg (FO)) or ``hf`` (Per-FedAvg (HF)); ``strategy.hessian``:
``autograd`` (the default: the exact Hessian-vector product by double backward, the MAML step
itself) or ``finite_difference`` (the paper's d_i, step ``strategy.delta``). A departure from
the paper: on ReLU/max-pool/BatchNorm networks the gradient jumps where a unit crosses a kink,
so d_i is dominated by the jumps, and the more the smaller delta (``digit_cnn_small`` at
initialisation, one batch of 32: ||H g|| = 590 exact, 2228 / 7033 / 32797 by differences with
delta = 1e-3 / 1e-4 / 1e-5; on a smooth network the two agree to 1e-9); HF with the paper's d_i
diverged there (mean personal accuracy 0.21 after 2 rounds of the tiny 4-client federation,
0.70 with autograd). alpha = ``strategy.alpha``,
beta = ``strategy.beta`` (null: the run's decayed lr for either); tau = ``strategy.local_steps``
(null: ``local_epochs`` x the batches of one epoch). Batches come from one shuffled stream of the
training split, reshuffled as it runs out: FO reads 2 per step, HF 3. The beta step is torch's
SGD on the step direction, so the run's ``momentum`` and ``weight_decay`` apply to it (0 by
default: the paper's step); the inner and evaluation steps are plain.

Where the codes depart from the paper, an option or a note: the paper's server takes the
plain mean (``strategy.weighting=uniform``), both codes weight by samples (``samples``, the
default as every pflower method). PFLlib's second step is taken from w~ (it never restores w),
i.e. two plain SGD steps; CharlieDinh's restores w, as here. Both codes evaluate after their
two-step ``train_one_step`` (PFLlib's first step on a *test* batch); pflower takes the paper's
alpha steps on training batches. Nothing is kept on a client between rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from task.algorithms.meta import HESSIANS, adapt, can_train_on, meta_gradient, set_gradients
from task.algorithms.mutual import iteration_batches
from task.core.params import message_state
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

STEP = Field(float, 0.0, low_open=True, nullable=True)
register_strategy_schema("perfedavg", {
    "variant": Field(str, choices=("fo", "hf")),
    "alpha": STEP, "beta": STEP,
    "hessian": Field(str, choices=HESSIANS),
    "delta": Field(float, 0.0, low_open=True),
    "local_steps": Field(int, 1, nullable=True),
    "adapt_steps": Field(int, 0),
    "weighting": Field(str, choices=("samples", "uniform")),
})
ADAPT_STREAM = 11  # generator stream of the evaluation's adaptation batches


class PerFedAvg(Method):
    """Server half: the mean of the uploaded w_i (by samples, or the paper's plain mean)."""

    name = "perfedavg"

    def aggregate_replies(self, server_round, replies):
        uniform = self.cfg.strategy.weighting == "uniform"
        merged = self.aggregate([r.arrays for r in replies],
                                [1.0 if uniform else r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state.update(merged)


class PerFedAvgClient(ClientMethod):
    """Client half: tau MAML steps from w_t (FO or HF); evaluation adapts w_t by alpha steps."""

    name = "perfedavg"

    def step_sizes(self, server_round: int) -> tuple[float, float]:
        """(alpha, beta): the configured ones, or the run's decayed lr where null."""
        s, lr = self.cfg.strategy, self.round_lr(server_round)
        return (lr if s.alpha is None else float(s.alpha)), (lr if s.beta is None else float(s.beta))

    def stream(self, server_round: int, count: int, stream: int = 0) -> Iterator[torch.Tensor]:
        """``count`` index batches of one shuffled stream over the training split."""
        return iteration_batches(self.data.num_train, int(self.cfg.batch_size), count,
                                 self.generator(server_round, stream), self.data.x_train.device,
                                 bool(self.cfg.get("drop_last", False)))

    def local_steps(self) -> int:
        steps = self.cfg.strategy.local_steps
        if steps is not None:
            return int(steps)
        per_epoch = math.ceil(self.data.num_train / int(self.cfg.batch_size))
        return int(self.cfg.local_epochs) * max(per_epoch, 1)

    def train(self, received, config):
        server_round = int(config["server-round"])
        s = self.cfg.strategy
        alpha, beta = self.step_sizes(server_round)
        model = self.model("main", received)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=beta, momentum=float(self.cfg.get("momentum", 0.0)),
                              weight_decay=float(self.cfg.get("weight_decay", 0.0)))
        per_step = 3 if s.variant == "hf" else 2
        stream = self.stream(server_round, self.local_steps() * per_step)
        losses = []
        for _ in range(self.local_steps()):
            idx = [next(stream) for _ in range(per_step)]
            if not all(can_train_on(model, len(i)) for i in idx):
                continue
            data = [(self.data.x_train[i], self.data.y_train[i]) for i in idx]
            direction, loss = meta_gradient(model, data, alpha, s.variant, s.hessian, float(s.delta))
            opt.zero_grad(set_to_none=True)
            set_gradients(model, direction)
            opt.step()
            losses.append(loss)
        return TrainResult(message_state(model.state_dict()), self.data.num_train,
                           {"train_loss": float(sum(losses) / max(len(losses), 1))})

    def personal_model(self, received, server_round: int) -> torch.nn.Module:
        """theta_i: w_t after ``adapt_steps`` alpha steps on fresh training batches."""
        alpha, _ = self.step_sizes(server_round)
        steps = int(self.cfg.strategy.adapt_steps)
        model = self.model("adapted", received)
        model.train()
        idx = [i for i in self.stream(server_round, steps, ADAPT_STREAM) if can_train_on(model, len(i))]
        adapt(model, [(self.data.x_train[i], self.data.y_train[i]) for i in idx], alpha)
        return model

    def evaluate(self, received, config):
        personal = self.personal_model(received, int(config["server-round"]))
        return self.report(personal, self.model("global", received))
