"""CFL, Clustered Federated Learning (Sattler, Müller, Samek, IEEE TNNLS 2020): recursive
bipartitioning of the clients by the cosine similarity of their updates.

    F. Sattler, K.-R. Müller, W. Samek. "Clustered Federated Learning: Model-Agnostic
    Distributed Multitask Optimization Under Privacy Constraints". IEEE TNNLS 32(8), 2021.
    https://arxiv.org/abs/1910.01991. Authors' code: github.com/felisat/clustered-federated-learning
    (clustered_federated_learning.ipynb, the round loop; fl_devices.py, the server's steps).

The clients start in one cluster c = {1..M} with model theta_c = theta_0 (FedAvg). Round t
(Algorithm 3), the geometry in task/algorithms/bipartition.py:

    client i in S_t:  Delta_i = SGD_E(theta_{c(i)}; D_i) - theta_{c(i)}   (it uploads the model)
    server, for every cluster c with replies:
        Delta_c = sum_{i in c} p_i Delta_i,   p_i = n_i / sum_{j in c} n_j
        if ||Delta_c|| < eps1 and max_{i in c} ||Delta_i|| > eps2:      (stationary, yet not for all)
            alpha_ij = cos(Delta_i, Delta_j);   c1, c2 = argmin max_{i in c1, j in c2} alpha_ij
            if gamma_max < sqrt((1 - alpha_cross) / 2):  c is replaced by c1, c2 (both start at theta_c)
        theta_c <- theta_c + Agg({Delta_i : i in c})     for c, or for c1 and c2 with their own
    personal model of client i: theta_{c(i)}, its cluster's model; there is no global model.

Agg is the configured ``aggregator=`` (by default the p-weighted mean, i.e. theta_c <- sum_i p_i
theta_i). The splits form a binary tree: every split's round, parent, children, their members,
alpha_cross and the two norms go to metrics.jsonl (``cfl_splits``) and the checkpoint, with the
clusters and their models, so a resume continues the same tree. Norms and similarities are
over the model's parameters (not BatchNorm statistics), as the authors' ``W``.

Options where the authors' notebook differs from the paper (conf/strategy/cfl.yaml):
``weighting``: ``samples`` (the paper's p_i) or ``uniform`` (the notebook's plain means);
``linkage``: ``single`` (the paper's exact bipartition) or ``complete`` (the notebook's
``AgglomerativeClustering(linkage="complete")``); ``warmup_rounds`` (the notebook splits only
after round 20; paper 0); ``min_split_size`` (the notebook splits clusters of more than 2
clients: 3; paper 2); ``gamma_max`` (the notebook has no such check: 0, any split with
alpha_cross < 1). Where pflower departs from both: a cluster is split only in a round where
every one of its members replied (both assume full participation; with partial participation
the criteria wait for a round that samples the whole cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.common import log

from task.algorithms import bipartition as geometry
from task.algorithms.cluster_metrics import cluster_ari
from task.core.messages import TrainReply
from task.core.params import StateDict
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .fedavg import FedAvgClient

register_strategy_schema("cfl", {
    "eps1": Field(float, 0.0, low_open=True),
    "eps2": Field(float, 0.0),
    "gamma_max": Field(float, 0.0, 1.0, high_open=True),
    "linkage": Field(str, choices=geometry.LINKAGES),
    "weighting": Field(str, choices=("samples", "uniform")),
    "warmup_rounds": Field(int, 0),
    "min_split_size": Field(int, 2),
})
MODEL = "cfl-cluster-"  # checkpoint group of a cluster's model


@dataclass
class Cluster:
    """A node of the cluster tree that is still a leaf: its id, clients and model."""

    id: int
    members: list[int]
    model: StateDict


class CFL(Method):
    """Server half: the clusters, each aggregated over its members; splits by the criteria."""

    name = "cfl"
    has_global_model = False

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.clusters = [Cluster(0, list(range(self.num_clients)), self.global_state)]
        self.next_id = 1
        self.splits: list[dict[str, Any]] = []
        self.update_keys = [k for k, v in initial_state.items() if v.is_floating_point()]
        self._norms: dict[str, list[float]] = {}
        self._ari: float | None = None
        if self.partial_participation():
            log(WARNING, "cfl splits a cluster only in a round that samples all its members: with "
                "partial participation (fraction_train=%s, clients_per_round=%s, participation=%s) "
                "a split waits for such a round", cfg.get("fraction_train"), cfg.get("clients_per_round"),
                cfg.get("participation"))

    def partial_participation(self) -> bool:
        per_round = self.cfg.get("clients_per_round")
        return (float(self.cfg.get("fraction_train", 1.0)) < 1.0
                or self.cfg.get("participation") == "bernoulli"
                or (per_round is not None and int(per_round) < self.num_clients))

    @classmethod
    def from_model(cls, cfg, model, partition_sizes):
        method = super().from_model(cfg, model, partition_sizes)
        method.update_keys = [n for n, _ in model.named_parameters()]
        return method

    def cluster_of(self, cid: int) -> Cluster:
        return next(c for c in self.clusters if cid in c.members)

    def train_arrays(self, cid, server_round):
        return self.cluster_of(cid).model

    def eval_arrays(self, cid):
        return self.cluster_of(cid).model

    # --- the round: Algorithm 3's steps in its order -----------------------------------------
    def aggregate_replies(self, server_round, replies):
        by_cid = {r.cid: r for r in replies}
        self._norms = {}
        leaves: list[Cluster] = []
        for cluster in self.clusters:
            mine = [by_cid[m] for m in cluster.members if m in by_cid]
            if not mine:
                leaves.append(cluster)
                continue
            for part, part_replies in self.split_if_due(cluster, mine, server_round):
                self.step(part, part_replies)
                leaves.append(part)
        self.clusters = leaves
        self.global_state = self.clusters[0].model
        if self.client_groups:
            assignment = {m: j for j, c in enumerate(self.clusters) for m in c.members}
            self._ari = cluster_ari(assignment, self.client_groups, self.excluded_clients)

    def weights(self, replies: list[TrainReply]) -> list[float]:
        return [1.0 if self.cfg.strategy.weighting == "uniform" else r.num_examples for r in replies]

    def updates(self, cluster: Cluster, replies: list[TrainReply]) -> torch.Tensor:
        """Delta_i = theta_i - theta_c over the parameters, one row per reply."""
        return torch.stack([torch.cat([(r.arrays[k].double() - cluster.model[k].double()).reshape(-1)
                                       for k in self.update_keys]) for r in replies])

    def split_if_due(self, cluster: Cluster, replies: list[TrainReply],
                     server_round: int) -> list[tuple[Cluster, list[TrainReply]]]:
        """[(cluster, its replies)], or the two halves where the criteria split it."""
        s = self.cfg.strategy
        X = self.updates(cluster, replies)
        mean_norm, max_norm = geometry.update_norms(X, self.weights(replies))
        self._norms[str(cluster.id)] = [mean_norm, max_norm]
        due = (server_round > int(s.warmup_rounds) and len(cluster.members) >= int(s.min_split_size)
               and len(replies) == len(cluster.members)
               and mean_norm < float(s.eps1) and max_norm > float(s.eps2))
        if not due:
            return [(cluster, replies)]
        alpha = geometry.cosine_similarities(X)
        rows1, rows2 = geometry.bipartition(alpha, str(s.linkage))
        alpha_cross = geometry.cross_similarity(alpha, rows1, rows2)
        if not geometry.separation_holds(alpha_cross, float(s.gamma_max)):
            return [(cluster, replies)]
        halves = []
        for rows in (rows1, rows2):
            members = sorted(replies[i].cid for i in rows)
            child = Cluster(self.next_id, members, {k: v.clone() for k, v in cluster.model.items()})
            self.next_id += 1
            halves.append((child, [replies[i] for i in rows]))
        self.splits.append({"round": server_round, "parent": cluster.id,
                            "children": [c.id for c, _ in halves],
                            "members": [c.members for c, _ in halves], "alpha_cross": alpha_cross,
                            "mean_norm": mean_norm, "max_norm": max_norm})
        return halves

    def step(self, cluster: Cluster, replies: list[TrainReply]) -> None:
        """theta_c <- Agg of its members' models, centred on theta_c (the mean: theta_c + Delta_c)."""
        merged = self.aggregate([r.arrays for r in replies], self.weights(replies),
                                center=cluster.model, slot=f"cluster{cluster.id}")
        cluster.model = {**cluster.model, **merged}

    # --- metrics and checkpoints ------------------------------------------------------------
    def round_metrics(self, server_round):
        return {"cfl_num_clusters": len(self.clusters),
                "cfl_clusters": [c.members for c in self.clusters],
                "cfl_norms": self._norms,  # cluster id -> [mean norm, max norm] this round
                "cfl_splits": [s for s in self.splits if s["round"] == server_round],
                "cluster_ari": self._ari}

    def state_arrays(self):
        return {**super().state_arrays(), **{f"{MODEL}{c.id}": c.model for c in self.clusters}}

    def state_scalars(self):
        return {**super().state_scalars(), "next_id": self.next_id, "splits": self.splits,
                "clusters": [{"id": c.id, "members": c.members} for c in self.clusters]}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.next_id = int(scalars["next_id"])
        self.splits = list(scalars["splits"])
        self.clusters = [Cluster(int(c["id"]), [int(m) for m in c["members"]], arrays[f"{MODEL}{c['id']}"])
                         for c in scalars["clusters"]]
        self.global_state = self.clusters[0].model


class CFLClient(FedAvgClient):
    """Client half: FedAvg's E epochs from its cluster's model; the cluster model is personal."""

    name = "cfl"

    def evaluate(self, received, config):
        return self.report(self.model("main", received))
