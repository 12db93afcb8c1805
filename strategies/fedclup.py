"""FedCLUP / FedProx-bilevel: the personalization degree lam and its accuracy-communication trade-off.

The bilevel FedProx objective of the ICML 2025 paper on the statistical accuracy and
communication cost of personalization (authors' code: github.com/ZLHe0/fedprox-bilevel):

    min_{w_g, {w_i}}  sum_i p_i [ L_i(w_i) + (lam/2) ||w_g - w_i||^2 ]

lam is the personalization degree: lam -> 0 is local training, lam -> inf is FedAvg (every
w_i = w_g). Round t, sampled clients S_t, p_i = n_i / sum_{j in S_t} n_j:

    client i:  w_i <- SGD_E(w_i; CE(w_i) + (lam/2) ||w_i - w_g||^2)      (w_i persists)
    server:    w_g <- (1 - lam eta_g) w_g + lam eta_g sum_{i in S_t} p_i w_i

eta_g = 1/lam (the default, as the authors' scripts) makes w_g the weighted mean of the w_i.
Adaptive lam (optional; the authors' simulation code): once, at the first round r with
r - 1 >= floor(adapt_at * num_rounds), with R^ = mean_i ||w_i - w_g|| over the clients' latest
models and the w_g they were last aggregated into, and n = samples per client,

    lam = rho / (n R^2)          if R^ >= 1 / sqrt(n)
    lam = rho / sqrt(n R^2)      otherwise                             (rho = 5)

Each round's lam, eta_g and R^ are written to metrics.jsonl (``fedclup_lam``, ...).

Where the authors' simulation code differs from the paper's description, an option:
``strategy.adapt_distance``: ``joined`` (default) averages, over the clients that replied so
far, ||w_i - w_g|| against the w_g their w_i was aggregated into; ``current`` (the authors'
code) averages over every client, its latest w_i (the initial model if it never trained)
against the current w_g (the server then keeps each client's latest upload).
``strategy.eta_rule`` (with ``eta_g: null``): ``inverse``, eta_g = 1/lam (default); ``authors``,
eta_g = 1/lam + 1/9.13, the authors' simulation's lr_global.

As the authors' code: w_i starts as the run's initial model (a client never sampled is scored
with it), the proximal term covers the trainable parameters and is centred at the w_g received
this round, and the optimizer is plain SGD at a constant rate: it carries no state, so one
made afresh every round (as here) takes the same steps as the authors' kept one (with
``momentum`` > 0 the momentum buffer starts at zero every round). The server step mixes every
floating entry; integer entries (BatchNorm counters) take the replies' maximum.
Personalized accuracy is w_i's; global accuracy is w_g's.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import log

from task.core.params import StateDict, damped_step, message_state
from task.core.training import proximal_penalty
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fedclup", {
    "lam": Field(float, 0.0, low_open=True),
    "eta_g": Field(float, 0.0, low_open=True, nullable=True),
    "adaptive": Field(bool),
    "adapt_at": Field(float, 0.0, 1.0, high_open=True),
    "adapt_n": Field(int, 1, nullable=True),
    "adapt_rho": Field(float, 0.0, low_open=True),
    "adapt_distance": Field(str, choices=("joined", "current")),
    "eta_rule": Field(str, choices=("inverse", "authors")),
})


def server_step(global_state: StateDict, merged: StateDict, lam: float, eta_g: float) -> StateDict:
    """(1 - lam eta_g) w_g + lam eta_g merged (merged = sum_i p_i w_i)."""
    return damped_step(global_state, merged, float(lam) * float(eta_g))


def adaptive_lam(r_hat: float, n: float, rho: float = 5.0) -> float:
    """rho / (n R^2) if R >= 1/sqrt(n), else rho / sqrt(n R^2) (R = mean_i ||w_i - w_g||)."""
    if r_hat <= 0.0:
        raise ValueError("adaptive lam needs R^ > 0 (every w_i equals w_g)")
    if r_hat >= 1.0 / math.sqrt(n):
        return rho / (n * r_hat ** 2)
    return rho / math.sqrt(n * r_hat ** 2)


LATEST = "latest-"  # checkpoint group of a client's latest w_i (adapt_distance=current)
AUTHORS_ETA_SHIFT = 1 / 9.13  # the authors' simulation: lr_global = 1/mu + 1/9.13


def distance(a: StateDict, b: StateDict) -> float:
    """||a - b|| over the floating entries, in float64."""
    total = sum(float(((a[k].double() - b[k].double().to(a[k].device)) ** 2).sum())
                for k in a if a[k].is_floating_point())
    return math.sqrt(total)


class FedCLUP(Method):
    """Server half: the damped server step, and the optional one-time adaptive lam."""

    name = "fedclup"
    keeps_client_state = True

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.lam = float(cfg.strategy.lam)
        self.adapted = False
        # ||w_i - w_g|| of each client's latest model and the w_g it was aggregated into.
        self.distances: dict[int, float] = {}
        # adapt_distance=current: each client's latest w_i, and the initial model for the rest.
        self.latest: dict[int, StateDict] = {}
        self.initial_state = {k: v.clone() for k, v in initial_state.items()}

    @property
    def eta_g(self) -> float:
        eta = self.cfg.strategy.eta_g
        if eta is not None:
            return float(eta)
        return 1.0 / self.lam + (AUTHORS_ETA_SHIFT if self.cfg.strategy.get("eta_rule") == "authors" else 0.0)

    def adapt_round(self) -> int:
        """The round (1-based) at which the adaptive lam is set."""
        return int(float(self.cfg.strategy.adapt_at) * int(self.cfg.num_rounds)) + 1

    def maybe_adapt(self, server_round: int) -> None:
        if not bool(self.cfg.strategy.adaptive) or self.adapted or server_round < self.adapt_round():
            return
        r_hat = self.r_hat()
        if r_hat is None or r_hat <= 0.0:
            log(WARNING, "fedclup: no client distance to adapt lam from in round %s", server_round)
            return
        n = self.cfg.strategy.adapt_n
        n = float(np.mean([n_train for n_train, _ in self.partition_sizes])) if n is None else float(n)
        self.lam = adaptive_lam(r_hat, n, float(self.cfg.strategy.adapt_rho))
        self.adapted = True
        log(INFO, "fedclup: round %s adapts lam to %.6g (R^ = %.6g, n = %.1f)",
            server_round, self.lam, r_hat, n)

    def r_hat(self) -> float | None:
        """R^: the mean distance of the clients' w_i to w_g (see ``adapt_distance``)."""
        if self.cfg.strategy.get("adapt_distance", "joined") == "current":
            initial = self.initial_state
            return float(np.mean([distance(self.latest.get(c, initial), self.global_state)
                                  for c in range(self.num_clients)]))
        return float(np.mean(list(self.distances.values()))) if self.distances else None

    def train_config(self, cid, server_round):
        self.maybe_adapt(server_round)
        return {"lam": self.lam}

    def aggregate_replies(self, server_round, replies):
        merged = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state = server_step(self.global_state, merged, self.lam, self.eta_g)
        keep = self.cfg.strategy.get("adapt_distance", "joined") == "current"
        for r in replies:
            self.distances[r.cid] = distance(r.arrays, self.global_state)
            if keep:
                self.latest[r.cid] = {k: v.clone() for k, v in r.arrays.items()}

    def round_metrics(self, server_round) -> dict[str, Any]:
        return {"fedclup_lam": self.lam, "fedclup_eta_g": self.eta_g, "fedclup_R": self.r_hat()}

    def state_arrays(self):
        return {**super().state_arrays(), **{f"{LATEST}{c}": w for c, w in self.latest.items()}}

    def state_scalars(self):
        return {**super().state_scalars(), "lam": self.lam, "adapted": self.adapted,
                "distances": {str(c): d for c, d in self.distances.items()}}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.lam = float(scalars.get("lam", self.lam))
        self.adapted = bool(scalars.get("adapted", False))
        self.distances = {int(c): float(d) for c, d in scalars.get("distances", {}).items()}
        self.latest = {int(g[len(LATEST):]): w for g, w in arrays.items() if g.startswith(LATEST)}


class FedCLUPClient(ClientMethod):
    """Client half: E epochs on CE(w_i) + (lam/2)||w_i - w_g||^2 from the kept w_i."""

    name = "fedclup"

    def personal_model(self) -> torch.nn.Module:
        """w_i: the kept one, or the run's initial model before the first participation."""
        return self.model("main", self.state.load("personal"))

    def train(self, received, config):
        lam = float(config["lam"])
        model = self.personal_model()
        loss = self.fit(model, int(config["server-round"]), penalty=proximal_penalty(received, lam))
        w_i = message_state(model.state_dict())  # kept, and uploaded without another copy
        self.state.save("personal", w_i)
        return TrainResult(w_i, self.data.num_train, {"train_loss": loss, "lam": lam})

    def evaluate(self, received, config):
        return self.report(self.personal_model(), self.model("global", received))
