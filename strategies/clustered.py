"""Federated clustering, robust by threshold clustering (Werner et al., TMLR 2023).

M. Werner, L. He, M. Jordan, M. Jaggi, S. P. Karimireddy. "Provably Personalized and Robust
Federated Learning". TMLR 2023. https://openreview.net/forum?id=B0uBSSUy0G
Authors' code: https://github.com/liehe/PRFL (``STC``, ``FCTrain`` in ``*/implementations/thresholding.py``).

Threshold clustering (``task.algorithms.robust.threshold_clustering``):

    TC(v0, {u_j}, tau, R):  v <- v0;  R times:  d_j = ||u_j - v||,
                            v <- (1/n) sum_j (u_j if d_j <= tau else v)
    tau = 0.99 * d_(floor(n q))   (``strategy.quantile`` q, ``strategy.tc_iterations`` R)

``strategy.mode=paper``: the paper's federated clustering (not the default: on a relabel
federation at pflower's defaults its random lazy initialisation merged clusters in every seed,
ARI 0.5-0.75 attack-free, see docs/clustered.md). K cluster models x_k,
centres v_k and cluster momenta m_k on the server; client i is assigned to a_i. Round t:

1. client i in S_t trains x_{a_i} (E local epochs) and uploads its update u_i = x_i - x_{a_i};
2. per cluster k, over the updates U_k of the clients that trained x_k:
       v_k <- TC(v_k, U_k, tau, R)                      (started at the previous centre)
       m_k <- beta m_k + v_k,   x_k <- x_k + m_k        (momentum after clustering, beta =
                                                         ``strategy.tc_momentum``, 0.9)
3. every client that replied: a_i <- argmin_k ||u_i - v_k||.
Round 1 (all K models still the same): the centres start at K of the round's updates drawn by
the seed (the authors' ``init="lazy"``, worker updates as initial centres), a_i is the nearest
of them, and step 2 runs from there.

``strategy.mode=robust`` (the default): pflower's additions, none of them the paper's or the authors'. Each is
a key of its own (null: the mode's value; set it to turn the defence on or off in either mode):

- ``worker_momentum`` beta_w (robust 0.9, paper 0): clients upload m_i / (1 - beta_w^s),
  m_i <- beta_w m_i + (1 - beta_w) u_i (momentum before TC, Karimireddy, He, Jaggi 2021);
- ``seeding``: ``dense`` (robust; ``clustering.initial_clusters``: farthest-first over the dense
  main body, refined by Lloyd's iterations with coordinate medians) or ``random`` (paper);
- ``merge_duplicates`` (robust true): uploads closer than ``duplicate_tolerance`` x the median
  nearest-neighbour distance count once (``robust.collapse_near_duplicates``);
- ``tc_over``: ``all`` (robust: every centre's TC pools every upload of the round, updates of
  *different* cluster models; the authors instead pool the updates computed at *one* model)
  or ``assigned`` (paper: the cluster's own clients);
- ``stay_radius`` (robust 2.0, paper 0 = off): a client whose update is within that x its
  cluster's median distance to v_{a_i} keeps a_i instead of moving to the nearest centre;
- ``tc_momentum`` (robust 0: x_k <- x_k + v_k).

``strategy.oracle``: ``true`` is the papers' oracle, per-cluster FedAvg on the true clusters
(x_k <- x_k + the configured aggregator's mean of U_k, no TC, no momentum); ``tc`` keeps the
mode's TC step with the true assignment fixed (an upper reference for the assignment alone).

``discarded_uploads``: an upload counts once, where its own cluster's TC replaced it or merging
folded it into another. A client that has never replied is scored on the cluster model of
lowest loss on its training split (IFCA's rule); its first training round uses cluster
(cid mod K), and its update then assigns it.

Departures from the authors' code, which a federation cannot run (there, every worker's model
computes a gradient on every worker's batch, and TC runs per worker over those): an update is a
whole local round (E epochs) instead of one batch's gradient, and a centre's TC pools the
updates of the clients that trained that centre's model.
"""

from __future__ import annotations

from typing import Any

import torch

from task.algorithms import clustering, robust
from task.algorithms.cluster_metrics import cluster_ari
from task.core.messages import TrainReply, array_spec
from task.core.params import StateDict, model_state, subtract
from task.core.training import evaluate
from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult
from .ifca import bundle, is_bundle, unbundle

QUANTILE = Field(float, 0.0, 1.0, low_open=True, high_open=True)
BETA = Field(float, 0.0, 1.0, high_open=True, nullable=True)
register_strategy_schema("clustered", {
    "mode": Field(str, choices=("paper", "robust")), "num_clusters": COUNT, "quantile": QUANTILE,
    "tc_iterations": COUNT, "oracle": Field(object, choices=(False, True, "tc")),
    "aggregate": Field(str, choices=("tc", "aggregator")), "worker_momentum": BETA, "tc_momentum": BETA,
    "seeding": Field(str, choices=("dense", "random"), nullable=True),
    "merge_duplicates": Field(bool, nullable=True), "duplicate_tolerance": Field(float, 0.0),
    "tc_over": Field(str, choices=("assigned", "all"), nullable=True),
    "stay_radius": Field(float, 0.0, nullable=True),
})
MODES: dict[str, dict[str, Any]] = {
    "paper": {"worker_momentum": 0.0, "tc_momentum": 0.9, "seeding": "random", "merge_duplicates": False,
              "tc_over": "assigned", "stay_radius": 0.0},
    "robust": {"worker_momentum": 0.9, "tc_momentum": 0.0, "seeding": "dense", "merge_duplicates": True,
               "tc_over": "all", "stay_radius": 2.0},
}


def setting(strategy: Any, key: str) -> Any:
    """A mode-dependent key: its value where set, else the mode's. The papers' oracle
    (``oracle=true``) is plain FedAvg: no momentum on either side."""
    if strategy.get("oracle") is True and key in ("worker_momentum", "tc_momentum"):
        return 0.0
    value = strategy.get(key)
    return MODES[str(strategy.get("mode", "robust"))][key] if value is None else value


def float_entries(state: StateDict) -> StateDict:
    """The floating entries of a state dict (an update has no integer counters)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def worker_momentum(previous: StateDict | None, delta: StateDict, beta: float) -> StateDict:
    """m_i <- beta m_i + (1 - beta) delta_i, from m_i = 0 where there is none yet."""
    if previous is None:
        return {k: (1 - beta) * v for k, v in delta.items()}
    return {k: beta * previous[k].to(v) + (1 - beta) * v for k, v in delta.items()}


def debiased(momentum: StateDict, beta: float, steps: int) -> StateDict:
    """m_i / (1 - beta^t) after t steps: a weighted mean of the t updates (weights beta^(t-s)),
    on the scale of one update however few rounds the client has had (Adam's bias correction)."""
    return {k: v / (1 - beta ** steps) for k, v in momentum.items()}


class Clustered(Method):
    """Server half: K cluster models and centres; per-cluster TC, momentum, assignment."""

    name = "clustered"
    keeps_client_state = True  # each client's worker momentum m_i (robust mode)
    has_global_model = False
    upload_is_update = True

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.K = int(cfg.strategy.num_clusters)
        self.models: list[StateDict] = [{k: v.clone() for k, v in initial_state.items()}
                                        for _ in range(self.K)]
        self.centres: list[StateDict | None] = [None] * self.K
        self.momenta: list[StateDict | None] = [None] * self.K  # m_k, momentum after TC
        self.assignment: dict[int, int] = {}
        self.started = False  # False until the first aggregation: all K models still identical
        self._trained_on: dict[int, int] = {}
        self.momentum_cluster: dict[int, int] = {}  # the cluster each client's m_i belongs to
        self._ari: float | None = None
        self._bundle: StateDict | None = None

    def option(self, key: str) -> Any:
        return setting(self.cfg.strategy, key)

    # --- assignment --------------------------------------------------------------------
    def cluster_of(self, cid: int) -> int:
        """a_i: the true cluster (oracle), the current assignment, or (cid mod K) before one."""
        if self.cfg.strategy.oracle in (True, "tc"):
            if not self.client_groups:
                raise RuntimeError("strategy.oracle needs the clients' true clusters (client_groups)")
            return int(self.client_groups[cid]) % self.K
        return self.assignment.get(cid, cid % self.K)

    def train_arrays(self, cid, server_round):
        self._trained_on[cid] = self.cluster_of(cid)
        return self.models[self._trained_on[cid]]

    def train_config(self, cid, server_round):
        # m_i averages updates of one cluster model; a client sent another one starts afresh.
        fresh = self.momentum_cluster.get(cid) != self._trained_on[cid]
        self.momentum_cluster[cid] = self._trained_on[cid]
        return {"reset-momentum": fresh}

    def expected_upload(self, cid, sent):
        return array_spec(float_entries(sent))

    def eval_arrays(self, cid):
        if self.cfg.strategy.oracle in (True, "tc") or cid in self.assignment:
            return self.models[self.cluster_of(cid)]
        if self._bundle is None:  # never replied: the client picks the model of lowest loss
            self._bundle = bundle(self.models)
        return self._bundle

    def upload_reference(self, reply, sent):
        return None

    def new_client_arrays(self, cid, server_round):
        return {}  # a new client only picks a cluster model, at scoring (eval_arrays: all K)

    def new_client_config(self, cid, server_round):
        return {}  # train_config would record a momentum cluster for a client that never trains

    # --- the round: the paper's steps in its order -----------------------------------------
    def aggregate_replies(self, server_round, replies):
        """Per cluster: v_k <- TC(v_k, U_k); x_k <- x_k + m_k (m_k <- beta m_k + v_k); then
        a_i <- the nearest centre. The defences of robust mode enter at the named steps."""
        keys = list(float_entries(self.models[0]))
        X = torch.stack([robust.flatten(r.arrays, keys) for r in replies])
        cids = [r.cid for r in replies]
        trained = [self._trained_on[c] for c in cids]
        starts: dict[int, torch.Tensor] = {}
        first = not self.started and self.cfg.strategy.oracle is False
        if first:  # all K models are the same: group the updates around K initial centres
            trained, starts = self.initial_grouping(X, server_round)
        self.started = True
        previous = {k: robust.flatten(c, keys) for k, c in enumerate(self.centres) if c is not None}
        centres = {**starts, **previous}
        tc_all = self.option("tc_over") == "all" and self.cfg.strategy.oracle is not True
        pool = self.merged_pool(X) if tc_all else None
        discarded: set[int] = set()
        for k in sorted(set(trained)):
            rows = [i for i, t in enumerate(trained) if t == k]
            if self.cfg.strategy.oracle is True:
                v = self.cluster_mean([replies[i] for i in rows], keys)
            else:
                v = self.cluster_estimate(X, rows, centres.get(k), [replies[i] for i in rows], pool,
                                          discarded)
            centres[k] = v
            self.step_cluster(k, v, keys)
        self.stats.discarded += len(discarded)
        self.assign(X, cids, trained, centres, first)
        self._bundle = None
        self._ari = self.current_ari(cids)

    def initial_grouping(self, X: torch.Tensor,
                         server_round: int) -> tuple[list[int], dict[int, torch.Tensor]]:
        """Round 1: every update's initial cluster and the K initial centres, by the paper's
        lazy initialisation (``seeding=random``) or pflower's dense seeding (``dense``)."""
        if self.option("seeding") == "dense":
            merge = self.option("merge_duplicates")
            tolerance = float(self.cfg.strategy.duplicate_tolerance) if merge else None
            labels, seeded = clustering.initial_clusters(X, self.K, float(self.cfg.strategy.quantile),
                                                         tolerance)
            return labels, dict(enumerate(seeded))
        seeds = clustering.random_seeds(len(X), self.K, int(self.cfg.seed) * 7919 + server_round)
        return clustering.nearest_centre(X, X[seeds]), {k: X[i].clone() for k, i in enumerate(seeds)}

    def merged_pool(self, X: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """The uploads TC runs over and the rows behind each (near-duplicates merged where
        ``merge_duplicates``; otherwise each row alone)."""
        if not self.option("merge_duplicates"):
            return X, [[i] for i in range(len(X))]
        groups = robust.near_duplicate_groups(X, float(self.cfg.strategy.duplicate_tolerance))
        rows = X if len(groups) == len(X) else torch.stack([X[g].mean(0) for g in groups])
        return rows, groups

    def cluster_estimate(self, X: torch.Tensor, rows: list[int], start: torch.Tensor | None,
                         replies: list[TrainReply], pool: tuple[torch.Tensor, list[list[int]]] | None,
                         discarded: set[int]) -> torch.Tensor:
        """v_k = TC(start, U, tau, R): U the cluster's updates, or ``pool`` (every upload of the
        round, ``tc_over=all``); from the coordinate median of the cluster's updates where there
        is no start. Adds to ``discarded`` the cluster's own uploads that TC replaced or merging
        folded into another (``aggregate=aggregator``: the configured aggregator, which counts)."""
        group = X[rows]
        if self.cfg.strategy.aggregate == "aggregator":
            merged = self.aggregate([{"u": row} for row in group], [r.num_examples for r in replies],
                                    center=None if start is None else {"u": start})
            return merged["u"]
        if pool is None:
            points, groups = self.merged_pool(group)
            groups = [[rows[i] for i in g] for g in groups]
        else:
            points, groups = pool
        v0 = robust.median(group).value if start is None else start
        result = robust.threshold_clustering(points, v0, float(self.cfg.strategy.quantile),
                                             int(self.cfg.strategy.tc_iterations))
        own = set(rows)
        for g, kept in zip(groups, result.kept.tolist(), strict=True):
            discarded.update(i for i in g[1:] if i in own)  # merged into the group's first
            if not kept and g[0] in own:
                discarded.update(i for i in g if i in own)
        return result.value

    def cluster_mean(self, replies: list[TrainReply], keys: list[str]) -> torch.Tensor:
        """The papers' oracle: the configured aggregator's mean of the cluster's updates
        (``aggregator=mean``: FedAvg's sample-weighted mean)."""
        merged = self.aggregate([float_entries(r.arrays) for r in replies], [r.num_examples for r in replies])
        return robust.flatten(merged, keys)

    def step_cluster(self, k: int, v: torch.Tensor, keys: list[str]) -> None:
        """v_k <- v; x_k <- x_k + v_k, or with momentum after TC x_k <- x_k + m_k."""
        self.centres[k] = robust.unflatten(v, self.models[k], keys)
        step = self.centres[k]
        beta = float(self.option("tc_momentum"))
        if beta > 0:
            previous = None if self.momenta[k] is None else robust.flatten(self.momenta[k], keys)
            step = robust.unflatten(clustering.momentum_after_tc(previous, v, beta), self.models[k], keys)
            self.momenta[k] = step
        moved = {key: self.models[k][key] + value for key, value in step.items()}
        self.models[k] = {**self.models[k], **moved}

    def assign(self, X: torch.Tensor, cids: list[int], trained: list[int],
               centres: dict[int, torch.Tensor], first: bool) -> None:
        """a_i <- argmin_k ||u_i - v_k||; with a stay radius (not in round 1), a client whose
        update is typical of the cluster it trained keeps it."""
        if self.cfg.strategy.oracle in (True, "tc"):
            self.assignment.update({c: self.cluster_of(c) for c in cids})
            return
        if not centres:
            return
        ids = sorted(centres)
        nearest = clustering.nearest_centre(X, torch.stack([centres[k] for k in ids]))
        radius = float(self.option("stay_radius"))
        stay = [False] * len(cids)
        if radius > 0 and not first:
            stay = clustering.typical(X, trained, centres, radius)
        for i, cid in enumerate(cids):
            self.assignment[cid] = trained[i] if stay[i] else ids[nearest[i]]

    def current_ari(self, replied: list[int]) -> float | None:
        if not self.client_groups:
            return None
        current = self.assignment
        if self.cfg.strategy.oracle in (True, "tc"):
            current = {c: self.cluster_of(c) for c in replied}
        return cluster_ari(current, self.client_groups, self.excluded_clients)

    def round_metrics(self, server_round):
        sizes = [0] * self.K
        for cid, k in self.assignment.items():
            if cid not in self.excluded_clients:
                sizes[k] += 1
        return {"cluster_ari": self._ari, "cluster_sizes": sizes}

    # --- checkpoint ----------------------------------------------------------------------
    def state_arrays(self):
        arrays = {**super().state_arrays(), **{f"cluster{k}": m for k, m in enumerate(self.models)}}
        arrays.update({f"centre{k}": c for k, c in enumerate(self.centres) if c is not None})
        arrays.update({f"momentum{k}": m for k, m in enumerate(self.momenta) if m is not None})
        return arrays

    def state_scalars(self):
        return {**super().state_scalars(), "assignment": {str(c): k for c, k in self.assignment.items()},
                "momentum_cluster": {str(c): k for c, k in self.momentum_cluster.items()},
                "started": self.started}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.models = [arrays[f"cluster{k}"] for k in range(self.K)]
        self.centres = [arrays.get(f"centre{k}") for k in range(self.K)]
        self.momenta = [arrays.get(f"momentum{k}") for k in range(self.K)]
        self.assignment = {int(c): int(k) for c, k in scalars.get("assignment", {}).items()}
        self.momentum_cluster = {int(c): int(k) for c, k in scalars.get("momentum_cluster", {}).items()}
        self.started = bool(scalars.get("started", False))
        self._bundle = None


class ClusteredClient(ClientMethod):
    """Client half: train the received cluster model, upload its update (robust mode: the
    worker momentum of its updates), score that model (of K, the one of lowest loss)."""

    name = "clustered"

    def train(self, received, config):
        model = self.model("main", received)
        loss = self.fit(model, int(config["server-round"]))
        delta = subtract(float_entries(model_state(model)), float_entries(received))
        beta = float(setting(self.cfg.strategy, "worker_momentum"))
        if beta == 0:
            return TrainResult(delta, self.data.num_train, {"train_loss": loss})
        fresh = bool(config.get("reset-momentum"))
        momentum = worker_momentum(None if fresh else self.state.load("momentum"), delta, beta)
        steps = 1 + (0 if fresh else int(self.state.scalars("momentum-steps").get("steps", 0)))
        self.state.save("momentum", momentum)
        self.state.save_scalars({"steps": steps}, "momentum-steps")
        return TrainResult(debiased(momentum, beta, steps), self.data.num_train, {"train_loss": loss})

    def adapt(self, received, config):
        """A new client personalizes by picking the cluster model of lowest training loss, which
        ``evaluate`` does with the K models it is sent (with the oracle: its true cluster's)."""
        return {}

    def evaluate(self, received, config):
        if is_bundle(received):  # never assigned: the cluster model of lowest training loss
            models = unbundle(received)
            losses = [evaluate(self.model("main", m), self.data.x_train, self.data.y_train)[0]
                      for m in models]
            received = models[min(range(len(models)), key=lambda j: losses[j])]
        return self.report(self.model("main", received))
