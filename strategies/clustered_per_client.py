"""Per-client threshold clustering (Werner et al., TMLR 2023), the paper's personalized form.

    client i:  u_i = x_i(after E epochs) - x_i            (its update, uploaded)
    server:    g_i = TC(u_i, {u_j : j in G(i)}, tau, R)   (TC started at i's own update)
    client i:  m_i <- beta m_i + g_i;   x_i <- x_i + m_i   (momentum after TC, the paper's)

G(i): every update of the round, or (``strategy.groups`` G) i's group when the round's replies
are split at random into G groups, as the authors' ``fc-grad-R-quantileQ-G`` runs do.
tau = 0.99 x the q-quantile of the distances (``strategy.quantile``), R = ``tc_iterations``.
Authors' code: https://github.com/liehe/PRFL (``FCTrain`` in ``*/implementations/thresholding.py``).

``strategy.mode``: ``paper`` (the default) applies the momentum after TC with beta =
``strategy.tc_momentum`` (0.9 unless set); ``robust`` is pflower's earlier form, x_i <- x_i +
g_i with no momentum (its numbers are unchanged).

Where this departs from the authors' code, which a federation cannot run: there, u_j in i's
TC is worker j's *batch gradient at x_i's model* (every model is evaluated on every worker's
batch); here u_j is client j's update of its own model x_j, a whole local round. The round's
``cluster_ari`` groups clients by the connected components of "i and j kept each other in
their TCs" (``task.algorithms.clustering.components``), a pflower measure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from task.algorithms import robust
from task.algorithms.cluster_metrics import cluster_ari
from task.algorithms.clustering import components, tc_groups
from task.core.messages import array_spec
from task.core.params import StateDict, model_state, subtract
from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

QUANTILE = Field(float, 0.0, 1.0, low_open=True, high_open=True)
MODE = Field(str, choices=("paper", "robust"))
register_strategy_schema("clustered_per_client", {
    "mode": MODE, "quantile": QUANTILE, "tc_iterations": COUNT,
    "tc_momentum": Field(float, 0.0, 1.0, high_open=True, nullable=True),
    "groups": Field(int, 1, nullable=True),
})
PAPER_TC_MOMENTUM = 0.9  # beta of the authors' runs (--momentum 0.9)


def float_entries(state: StateDict) -> StateDict:
    """The floating entries of a state dict (an update has no integer counters)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def tc_momentum(strategy: Any) -> float:
    """beta of the momentum after TC: the key where set, else the mode's (paper 0.9, robust 0)."""
    value = strategy.get("tc_momentum")
    if value is not None:
        return float(value)
    return PAPER_TC_MOMENTUM if strategy.get("mode", "paper") == "paper" else 0.0


def random_groups(n: int, groups: int | None, seed: int) -> list[list[int]]:
    """The round's replies split at random into ``groups`` groups of ceil(n / groups) (the
    authors' grouping); one group of all where ``groups`` is None."""
    if not groups or groups <= 1:
        return [list(range(n))]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    size = int(np.ceil(n / groups))
    return [sorted(order[s:s + size]) for s in range(0, n, size)]


class ClusteredPerClient(Method):
    """Server half: g_i = TC(u_i, the updates of i's group) for every client that replied."""

    name = "clustered_per_client"
    keeps_client_state = True
    has_global_model = False
    upload_is_update = True
    new_client_problem = ("moves a client's model only by the server's threshold clustering of that "
                          "round's uploads, which a client that never trains has no part in: it would "
                          "score its initial model; use strategy=clustered or ifca for new clients")

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.estimates: dict[int, StateDict] = {}
        self._ari: float | None = None

    def train_arrays(self, cid, server_round):
        return {}  # the client trains its own model

    def expected_upload(self, cid, sent):
        return array_spec(float_entries(self.global_state))

    def aggregate_replies(self, server_round, replies):
        keys = list(float_entries(self.global_state))
        X = torch.stack([robust.flatten(r.arrays, keys) for r in replies])
        strategy = self.cfg.strategy
        split = random_groups(len(replies), strategy.get("groups"), int(self.cfg.seed) * 7919 + server_round)
        labels: dict[int, int] = {}
        for g, rows in enumerate(split):
            G, kept = tc_groups(X[rows], float(strategy.quantile), int(strategy.tc_iterations))
            # A client's TC replaces the others' uploads it did not keep: counted once, in its own TC.
            self.stats.discarded += sum(max(0, len(rows) - 1 - len(k)) for k in kept)
            for i, estimate, label in zip(rows, G, components(kept), strict=True):
                self.estimates[replies[i].cid] = robust.unflatten(estimate, self.global_state, keys)
                labels[replies[i].cid] = g * len(X) + rows[label]
        if self.client_groups:
            self._ari = cluster_ari(labels, self.client_groups, self.excluded_clients)

    def personalize_arrays(self, cid, server_round):
        return self.estimates.get(cid)

    def eval_arrays(self, cid):
        return {}

    def round_metrics(self, server_round):
        return {"cluster_ari": self._ari}


class ClusteredPerClientClient(ClientMethod):
    """Client half: train x_i, upload its update, then x_i <- x_i(before) + m_i (m_i = g_i
    with no momentum)."""

    name = "clustered_per_client"

    def personal_model(self):
        return self.model("main", self.state.load("personal"))

    def train(self, received, config):
        model = self.personal_model()
        before = model_state(model)
        loss = self.fit(model, int(config["server-round"]))
        update = subtract(float_entries(model_state(model)), float_entries(before))
        if self.state.load("personal") is None:
            self.state.save("personal", before)  # x_i moves only by the server's g_i
        return TrainResult(update, self.data.num_train, {"train_loss": loss})

    def personalize(self, received, config) -> dict[str, Any]:
        before = self.state.load("personal") or model_state(self.personal_model())
        beta = tc_momentum(self.cfg.strategy)
        step = received
        if beta > 0:
            previous = self.state.load("tc-momentum")
            step = {k: g if previous is None else beta * previous[k].to(g) + g for k, g in received.items()}
            self.state.save("tc-momentum", step)
        self.state.save("personal", {k: (v + step[k].to(v)) if k in step else v
                                     for k, v in before.items()})
        return {"update_norm": float(np.sqrt(sum(float((g ** 2).sum()) for g in received.values())))}

    def evaluate(self, received, config):
        return self.report(self.personal_model())
