"""Federated clustering, robust by threshold clustering (Werner et al., TMLR 2023).

M. Werner, L. He, M. Jordan, M. Jaggi, S. P. Karimireddy. "Provably Personalized and Robust
Federated Learning". TMLR 2023. https://openreview.net/forum?id=B0uBSSUy0G
Authors' code: https://github.com/liehe/PRFL (``STC`` in ``*/implementations/thresholding.py``).

Core primitive, threshold clustering (``task.algorithms.robust.threshold_clustering``):

    TC(v0, {u_j}, tau, R):  v <- v0;  R times:  d_j = ||u_j - v||,
                            v <- (1/n) sum_j (u_j if d_j <= tau else v)
    tau = 0.99 * d_(floor(n q))   (the q-quantile of the sorted distances, ``strategy.quantile``)

An update far from v is replaced by v itself, so no single vector pulls v by more than tau/n:
TC is the robust aggregator, no other is used (``strategy.aggregate=aggregator`` swaps in the
configured ``aggregator=`` instead, for comparison).

The authors' code runs TC per client over gradients that every client's model computes on
every other client's batch, which a federation cannot do. This module is the federated form
(ALGORITHMS.md):

``strategy=clustered`` (Federated-Clustering). K = ``strategy.num_clusters`` cluster models x_k
and update centres v_k live on the server; client i is assigned to a_i. Round t:

1. client i in S_t trains x_{a_i} locally (E epochs of SGD with the run's ``momentum``),
       delta_i = x_i(after) - x_{a_i},
   and uploads its worker momentum (``strategy.worker_momentum`` beta, 0.9; the authors' TC
   runs on the workers' momenta, which is what makes it robust: Karimireddy, He, Jaggi 2021),
       m_i <- beta m_i + (1 - beta) delta_i,      u_i = m_i / (1 - beta^s_i)
   (s_i: the client's rounds since its momentum started; the debiased u_i is a weighted mean
   of its updates, on one update's scale). m_i starts afresh (m_i = 0) when the client is sent
   another cluster's model than its momentum belongs to (``reset-momentum``).
2. per cluster k, over every update of the round (``strategy.tc_over=all``, the authors' code;
   ``assigned``: only those of the clients that trained x_k), near-duplicate uploads merged:
       U <- collapse_near_duplicates(U)          (``task.algorithms.robust``: uploads closer than
                                                  ``duplicate_tolerance`` x the median nearest-
                                                  neighbour distance count once: colluding copies such as
                                                  ALIE's or IPM's do not fill TC's radius)
       v_k <- TC(v_k, U, tau, R)                 (started at that centre: the previous v_k; in
                                                  the first round the cluster's seed, see below;
                                                  with the oracle, the coordinate median of the
                                                  cluster's updates)
       x_k <- x_k + v_k
3. reassignment: a client whose update is typical of the cluster it trained,
       ||u_i - v_{a_i}|| <= stay_radius * median_{j trained a_i} ||u_j - v_{a_i}||   (2.0),
   stays; every other client that replied moves to the nearest centre,
       a_i <- argmin_k ||u_i - v_k||.
   (The hard argmin for everyone, ``strategy.stay_radius=0``, is unstable late in training:
   the updates are then mostly SGD noise and the nearest centre flickers.)
4. cluster_ari: the adjusted Rand index of {a_i} against the true cluster ids (Byzantine
   clients left out), every round.

Initialisation: the authors' ``MultiUpdateServer(init="lazy")`` ("use the worker gradients as
initialization"). All K models start as the same initial model, so in the first round every
update is relative to the same point; the centres are then seeded from those updates
(``initial_clusters``, over the uploads with near-duplicates merged as in step 2): K seeds by
farthest-first traversal over the dense updates of the main body (``main_body``: within twice
the median distance to the coordinate-wise median; dense: distance to the floor(n q / 2)-th
nearest update at most its median over the body), started at the dense update farthest from
the median, then refined by Lloyd's iterations with coordinate medians. A Gaussian or
sign-flipped attacker is never dense (its nearest like uploads are at most the mirrors of one
cluster's), so it wins no seed and joins a cluster where TC replaces it.
A client that first replies after the first round trains cluster (cid mod K) before it is
reassigned by its update.

``strategy.oracle=true``: a_i fixed to the true cluster id (the paper's oracle baseline).

``strategy=clustered_per_client`` (the paper's per-client form, made federated): client i
keeps its personal model x_i (personal state) and uploads u_i = x_i(after) - x_i(before); the
server runs TC started at each client's own update over all updates of the round,
    g_i = TC(u_i, {u_j : j in S_t}, tau, R),
and sends each client its own g_i (the ``train.personalize`` phase): x_i <- x_i(before) + g_i.
Its cluster_ari groups clients by the connected components of "i and j kept each other in
their TCs".

Differences from the authors' code, on purpose: an update is a whole local round (E epochs)
instead of one batch's gradient, and the worker momentum is an exponential average of those
updates (the step x_k <- x_k + v_k keeps one update's scale) instead of m <- beta m + g with a
separate learning rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from task.algorithms import robust
from task.algorithms.cluster_metrics import cluster_ari
from task.core.messages import TrainReply, array_spec
from task.core.params import StateDict, model_state, subtract
from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

QUANTILE = Field(float, 0.0, 1.0, low_open=True, high_open=True)
register_strategy_schema("clustered", {
    "num_clusters": COUNT, "quantile": QUANTILE, "tc_iterations": COUNT, "oracle": Field(bool),
    "tc_over": Field(str, choices=("assigned", "all")), "aggregate": Field(str, choices=("tc", "aggregator")),
    "stay_radius": Field(float, 0.0), "worker_momentum": Field(float, 0.0, 1.0, high_open=True),
    "duplicate_tolerance": Field(float, 0.0),
})
register_strategy_schema("clustered_per_client", {"quantile": QUANTILE, "tc_iterations": COUNT})


def float_entries(state: StateDict) -> StateDict:
    """The floating entries of a state dict (an update has no integer counters)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


# --- pure steps ---------------------------------------------------------------------------
def worker_momentum(previous: StateDict | None, delta: StateDict, beta: float) -> StateDict:
    """m_i <- beta m_i + (1 - beta) delta_i, from m_i = 0 where there is none yet."""
    if previous is None:
        return {k: (1 - beta) * v for k, v in delta.items()}
    return {k: beta * previous[k].to(v) + (1 - beta) * v for k, v in delta.items()}


def debiased(momentum: StateDict, beta: float, steps: int) -> StateDict:
    """m_i / (1 - beta^t) after t steps: a weighted mean of the t updates (weights beta^(t-s)),
    on the scale of one update however few rounds the client has had (Adam's bias correction)."""
    return {k: v / (1 - beta ** steps) for k, v in momentum.items()}


def pairwise_distances(X: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j|| for the rows of X, in float64."""
    X = X.to(torch.float64)
    return torch.cdist(X, X)


def main_body(X: torch.Tensor, k: int) -> list[int]:
    """Rows within twice the median distance to the coordinate-wise median: the bulk of the
    population. A group of like uploads far from it (sign- or bit-flipped updates, Gaussian
    noise) is left out, as long as it is a minority. Every row where that leaves at most k."""
    centre = robust.median(X).value.to(torch.float64)
    d = (X.to(torch.float64) - centre).norm(dim=1)
    body = [i for i in range(len(X)) if d[i] <= 2 * d.median()]
    return body if len(body) > k else list(range(len(X)))


def seed_centres(X: torch.Tensor, k: int, quantile: float, body: list[int] | None = None) -> list[int]:
    """Row indices of K seed updates: farthest-first over the dense rows of the main body.

    A row is dense where its distance to its m-th nearest other row, m = max(1, floor(n q / 2)),
    is at most twice the median of that distance over the body: a lone outlier, or a group of
    fewer than m + 1 like uploads, is not (half the q-share of the population that TC assumes
    of a cluster, so that an honest cluster that lost some clients to Byzantine ones stays dense).
    The traversal starts at the dense row farthest from the coordinate-wise median. ``body``:
    ``main_body(X, k)`` where the caller has it already.
    """
    n = len(X)
    if n <= k:
        return list(range(n))
    body = main_body(X, k) if body is None else body
    D = pairwise_distances(X)
    m = min(len(body) - 1, max(1, int(n * quantile / 2)))
    radius = torch.sort(D[body][:, body], dim=1).values[:, m]  # column 0 is the row itself
    dense = [i for i, r in zip(body, radius, strict=True) if r <= radius.median()]
    centre = robust.median(X).value.to(torch.float64)
    from_median = (X.to(torch.float64) - centre).norm(dim=1)
    seeds = [max(dense, key=lambda i: float(from_median[i]))]
    while len(seeds) < k:
        nearest = D[:, seeds].min(dim=1).values
        candidates = [i for i in dense if i not in seeds] or [i for i in body if i not in seeds]
        seeds.append(max(candidates, key=lambda i: float(nearest[i])))
    return seeds


def initial_clusters(X: torch.Tensor, k: int, quantile: float, tolerance: float = 0.0,
                     iterations: int = 20) -> tuple[list[int], torch.Tensor]:
    """Round-1 grouping: K seeds (``seed_centres``), refined by Lloyd's iterations over the main
    body with coordinate-wise medians as centres (a seed is an extreme row of its group, so
    nearest-seed groups cut clusters; the medians move to the groups' middles). Both run on the
    rows with near-duplicates merged (``tolerance``, as in TC): a block of colluding copies
    would otherwise be half of the group it joins and drag that group's median onto itself.
    Returns every row's nearest centre and the K centres (fewer where there are at most K)."""
    rows, _ = robust.collapse_near_duplicates(X, tolerance)
    body = main_body(rows, k)
    centres = rows[seed_centres(rows, k, quantile, body)].clone()
    for _ in range(iterations):
        labels = nearest_centre(rows[body], centres)
        groups = [[i for i, lab in zip(body, labels, strict=True) if lab == j] for j in range(len(centres))]
        moved = torch.stack([robust.median(rows[g]).value if g else centres[j] for j, g in enumerate(groups)])
        if torch.equal(moved, centres):
            break
        centres = moved
    return nearest_centre(X, centres), centres


def nearest_centre(X: torch.Tensor, centres: torch.Tensor) -> list[int]:
    """For each row of X, the index of the nearest row of ``centres``."""
    return torch.cdist(X.to(torch.float64), centres.to(torch.float64)).argmin(dim=1).tolist()


def typical(X: torch.Tensor, trained: list[int], centres: dict[int, torch.Tensor],
            radius: float) -> list[bool]:
    """Whether each row is within ``radius`` times the median distance of its cluster's rows
    (the rows that ``trained`` the same cluster) to that cluster's centre."""
    d = torch.stack([(X[i] - centres[k]).norm() for i, k in enumerate(trained)])
    spread = {k: float(d[[i for i, t in enumerate(trained) if t == k]].median()) for k in set(trained)}
    return [float(d[i]) <= radius * spread[k] for i, k in enumerate(trained)]


def tc_groups(X: torch.Tensor, quantile: float, iterations: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Per-client TC: row i's aggregate TC(x_i, X) and, for each i, the rows kept in its last
    iteration (tau from the distances to the current v, as robust.threshold_clustering)."""
    out, kept = [], []
    for i in range(len(X)):
        v = X[i].clone()
        keep = torch.ones(len(X), dtype=torch.bool)
        for _ in range(iterations):
            d = (X - v).norm(dim=1)
            keep = d <= robust.tc_radius(d, quantile)
            v = torch.where(keep[:, None], X, v).mean(0)
        out.append(v)
        order = torch.argsort((X - X[i]).norm(dim=1)).tolist()  # nearest first: itself, then the next
        kept.append([j for j in order if bool(keep[j]) and j != i])
    return torch.stack(out), kept


def components(kept: list[list[int]]) -> list[int]:
    """Connected components of the graph with an edge i -- j where each kept the other in its
    TC, plus i -- its nearest kept update (``kept[i]`` is ordered nearest first). One-sided
    edges for every kept update, late in training when updates are mostly noise, chain every
    cluster into one component. Returns component ids."""
    sets = [set(js) for js in kept]
    parent = list(range(len(kept)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, js in enumerate(kept):
        for j in js:
            if i in sets[j] or j == js[0]:  # mutual, or i's first kept (its nearest) other
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(kept))]


# --- Federated-Clustering -------------------------------------------------------------------
class Clustered(Method):
    """Server half: K cluster models and update centres, per-cluster TC, reassignment."""

    name = "clustered"
    keeps_client_state = True  # each client's worker momentum m_i
    has_global_model = False
    upload_is_update = True

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.K = int(cfg.strategy.num_clusters)
        self.models: list[StateDict] = [{k: v.clone() for k, v in initial_state.items()}
                                        for _ in range(self.K)]
        self.centres: list[StateDict | None] = [None] * self.K
        self.assignment: dict[int, int] = {}
        self.started = False  # False until the first aggregation: all K models still identical
        self._trained_on: dict[int, int] = {}
        self.momentum_cluster: dict[int, int] = {}  # the cluster each client's m_i belongs to
        self._ari: float | None = None

    # --- assignment --------------------------------------------------------------------
    def cluster_of(self, cid: int) -> int:
        """a_i: the true cluster (oracle), the current assignment, or (cid mod K) before one."""
        if bool(self.cfg.strategy.oracle):
            if not self.client_groups:
                raise RuntimeError("strategy.oracle=true needs the clients' true clusters (client_groups)")
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
        return self.models[self.cluster_of(cid)]

    def upload_reference(self, reply, sent):
        return None

    # --- aggregation -------------------------------------------------------------------
    def aggregate_replies(self, server_round, replies):
        keys = list(float_entries(self.models[0]))
        X = torch.stack([robust.flatten(r.arrays, keys) for r in replies])
        trained = [self._trained_on[r.cid] for r in replies]
        oracle = bool(self.cfg.strategy.oracle)
        starts: dict[int, torch.Tensor] = {}
        if not self.started and not oracle:
            # All K models are the same: group the first updates around K seed updates, where
            # each cluster's TC then starts.
            trained, seeded = initial_clusters(X, self.K, float(self.cfg.strategy.quantile),
                                               float(self.cfg.strategy.duplicate_tolerance))
            starts = dict(enumerate(seeded))
        self.started = True
        centres = self.update_centres(X, trained, replies, keys, starts)
        if oracle:
            self.assignment.update({r.cid: self.cluster_of(r.cid) for r in replies})
        elif centres:
            self.reassign(X, trained, centres, [r.cid for r in replies], first=bool(starts))
        self._ari = self.current_ari([r.cid for r in replies])

    def reassign(self, X: torch.Tensor, trained: list[int], centres: dict[int, torch.Tensor],
                 cids: list[int], first: bool) -> None:
        """Step 3: typical clients stay; the others (all of them in the first round) move to
        the nearest centre."""
        ids = sorted(centres)
        nearest = nearest_centre(X, torch.stack([centres[k] for k in ids]))
        stay = [False] * len(cids) if first else typical(X, trained, centres,
                                                          float(self.cfg.strategy.stay_radius))
        for i, cid in enumerate(cids):
            self.assignment[cid] = trained[i] if stay[i] else ids[nearest[i]]

    def update_centres(self, X: torch.Tensor, trained: list[int], replies: list[TrainReply],
                       keys: list[str], starts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """v_k <- TC(v_k, U_k) and x_k <- x_k + v_k for every cluster with updates; all centres.

        TC starts at the previous v_k, else at ``starts[k]`` (the seed update), else at the
        coordinate median of U_k."""
        centres = {k: robust.flatten(c, keys) for k, c in enumerate(self.centres) if c is not None}
        centres = {**starts, **centres}
        # With tc_over=all every centre's TC runs over the same uploads: merge them once.
        shared = self.merged_pool(X) if self.cfg.strategy.tc_over == "all" else None
        for k in sorted(set(trained)):
            rows = [i for i, t in enumerate(trained) if t == k]
            v = self.cluster_update(X, rows, centres.get(k), [replies[i] for i in rows], shared)
            centres[k] = v
            self.centres[k] = robust.unflatten(v, self.models[k], keys)
            self.models[k] = {**self.models[k], **{key: self.models[k][key] + value for key, value
                                                   in self.centres[k].items()}}
        return centres

    def merged_pool(self, X: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The uploads with near-duplicates merged, and how many were merged."""
        return robust.collapse_near_duplicates(X, float(self.cfg.strategy.duplicate_tolerance))

    def cluster_update(self, X: torch.Tensor, rows: list[int], start: torch.Tensor | None,
                       replies: list[TrainReply],
                       shared: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """TC over the cluster's updates (or ``shared``: all updates merged, ``tc_over=all``),
        from ``start``."""
        group = X[rows]
        if self.cfg.strategy.aggregate == "aggregator":
            merged = self.aggregate([{"u": row} for row in group], [r.num_examples for r in replies],
                                    center=None if start is None else {"u": start})
            return merged["u"]
        pool, merged = shared if shared is not None else self.merged_pool(group)
        v0 = robust.median(group).value if start is None else start
        result = robust.threshold_clustering(pool, v0, float(self.cfg.strategy.quantile),
                                             int(self.cfg.strategy.tc_iterations))
        self.stats.discarded += result.discarded + merged
        return result.value

    def current_ari(self, replied: list[int]) -> float | None:
        if not self.client_groups:
            return None
        if bool(self.cfg.strategy.oracle):
            current = {c: self.cluster_of(c) for c in replied}
        else:
            current = self.assignment
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
        return arrays

    def state_scalars(self):
        return {**super().state_scalars(), "assignment": {str(c): k for c, k in self.assignment.items()},
                "momentum_cluster": {str(c): k for c, k in self.momentum_cluster.items()},
                "started": self.started}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.models = [arrays[f"cluster{k}"] for k in range(self.K)]
        self.centres = [arrays.get(f"centre{k}") for k in range(self.K)]
        self.assignment = {int(c): int(k) for c, k in scalars.get("assignment", {}).items()}
        self.momentum_cluster = {int(c): int(k) for c, k in scalars.get("momentum_cluster", {}).items()}
        self.started = bool(scalars.get("started", False))


class ClusteredClient(ClientMethod):
    """Client half: train the received cluster model, upload the worker momentum of its
    updates, score that model."""

    name = "clustered"

    def train(self, received, config):
        model = self.model("main", received)
        loss = self.fit(model, int(config["server-round"]))
        delta = subtract(float_entries(model_state(model)), float_entries(received))
        beta = float(self.cfg.strategy.worker_momentum)
        fresh = bool(config.get("reset-momentum"))
        momentum = worker_momentum(None if fresh else self.state.load("momentum"), delta, beta)
        steps = 1 + (0 if fresh else int(self.state.scalars("momentum-steps").get("steps", 0)))
        self.state.save("momentum", momentum)
        self.state.save_scalars({"steps": steps}, "momentum-steps")
        return TrainResult(debiased(momentum, beta, steps), self.data.num_train, {"train_loss": loss})

    def evaluate(self, received, config):
        return self.report(self.model("main", received))


# --- the per-client form ----------------------------------------------------------------------
class ClusteredPerClient(Method):
    """Server half: g_i = TC(u_i, all updates) for every client that replied, sent back to it."""

    name = "clustered_per_client"
    keeps_client_state = True
    has_global_model = False
    upload_is_update = True

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
        G, kept = tc_groups(X, float(self.cfg.strategy.quantile), int(self.cfg.strategy.tc_iterations))
        self.stats.discarded += sum(max(0, len(replies) - 1 - len(k)) for k in kept)  # kept: others
        self.estimates = {r.cid: robust.unflatten(g, self.global_state, keys)
                          for r, g in zip(replies, G, strict=True)}
        labels = components(kept)
        if self.client_groups:
            self._ari = cluster_ari({r.cid: lab for r, lab in zip(replies, labels, strict=True)},
                                    self.client_groups, self.excluded_clients)

    def personalize_arrays(self, cid, server_round):
        return self.estimates.get(cid)

    def eval_arrays(self, cid):
        return {}

    def round_metrics(self, server_round):
        return {"cluster_ari": self._ari}


class ClusteredPerClientClient(ClientMethod):
    """Client half: train x_i, upload its update, then x_i <- x_i(before) + g_i."""

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
        self.state.save("personal", {k: (v + received[k].to(v)) if k in received else v
                                     for k, v in before.items()})
        return {"update_norm": float(np.sqrt(sum(float((g ** 2).sum()) for g in received.values())))}

    def evaluate(self, received, config):
        return self.report(self.personal_model())
