"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020).

A. Ghosh, J. Chung, D. Yin, K. Ramchandran. "An Efficient Framework for Clustered Federated
Learning". NeurIPS 2020. https://arxiv.org/abs/2006.04088 (a baseline of Werner et al.,
TMLR 2023; their code: liehe/PRFL ``*/implementations/ifca.py``).

K = ``strategy.num_clusters`` cluster models x_1..x_K on the server. Round t:
    server:    sends every sampled client all K models (keys ``k{j}/<name>``; the bytes of
               K models are counted in ``bytes_down``)
    client i:  j_i = argmin_j  CE(x_j; D_i^train)        (loss on its training split)
               x_i <- SGD_E(x_{j_i}; CE on D_i)           uploads x_i and j_i (metric ``cluster``)
    server:    x_j <- Agg({x_i : j_i = j})  for every j chosen by someone
               (Agg = the configured ``aggregator=``, by default the mean: unweighted,
               (1/|S_j|) sum x_i, as the paper's model averaging)

Options where the authors' code differs from the paper (conf/strategy/ifca.yaml):
``strategy.weighting``: ``uniform`` (the paper's mean) or ``samples`` (p_i = n_i / sum n, as
pflower's other methods); ``strategy.select_on``: ``train`` (the loss on the whole training
split, the paper's) or ``batch`` (on one batch of ``batch_size`` drawn from it with the
round's generator, as liehe/PRFL's IFCA picks on a single batch).
Initialisation: K independently initialised models (the authors' ``init='non-identical'``;
``strategy.init=identical`` starts all K from the run's initial model, which never separates).
Personal model: the cluster model the client chose when it last trained (the server sends
only that one for evaluation); before it ever trained, it picks among all K as in training.
``cluster_ari``: adjusted Rand index of the choices against the true cluster ids.
"""

from __future__ import annotations

import torch

from task.algorithms.cluster_metrics import cluster_ari
from task.core.messages import array_spec
from task.core.params import StateDict, message_state, model_state
from task.core.training import batches, evaluate
from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("ifca", {"num_clusters": COUNT,
                                  "init": Field(str, choices=("non_identical", "identical")),
                                  "weighting": Field(str, choices=("uniform", "samples")),
                                  "select_on": Field(str, choices=("train", "batch"))})
CLUSTER = "cluster"
REINIT_STREAM = 7919  # seeds of the extra initial models: seed * REINIT_STREAM + j
SELECT_STREAM = 5  # generator stream of the batch a client picks its cluster on


def bundle(models: list[StateDict]) -> StateDict:
    """K models as one state dict with keys ``k{j}/<name>``."""
    return {f"k{j}/{key}": value for j, model in enumerate(models) for key, value in model.items()}


def unbundle(arrays: StateDict) -> list[StateDict]:
    """``bundle``'s inverse (the models in order of j)."""
    models: dict[int, StateDict] = {}
    for name, value in arrays.items():
        prefix, key = name.split("/", 1)
        models.setdefault(int(prefix[1:]), {})[key] = value
    return [models[j] for j in sorted(models)]


def is_bundle(arrays: StateDict) -> bool:
    return bool(arrays) and all(k.startswith("k") and "/" in k and k.split("/", 1)[0][1:].isdigit()
                                for k in arrays)


class IFCA(Method):
    """Server half: K models; each aggregated over the clients that chose it."""

    name = "ifca"
    has_global_model = False

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.K = int(cfg.strategy.num_clusters)
        self.models: list[StateDict] = [{k: v.clone() for k, v in initial_state.items()}
                                        for _ in range(self.K)]
        self.assignment: dict[int, int] = {}
        self._bundle: StateDict | None = None
        self._ari: float | None = None

    @classmethod
    def from_model(cls, cfg, model, partition_sizes):
        strategy = cls(cfg, model_state(model), partition_sizes)
        if cfg.strategy.init == "non_identical":
            for j in range(1, strategy.K):
                torch.manual_seed(int(cfg.seed) * REINIT_STREAM + j)
                for module in model.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                strategy.models[j] = model_state(model)
        return strategy

    def all_models(self) -> StateDict:
        """The K models bundled, built once per round (one serialisation for every client)."""
        if self._bundle is None:
            self._bundle = bundle(self.models)
        return self._bundle

    def train_arrays(self, cid, server_round):
        return self.all_models()

    def expected_upload(self, cid, sent):
        return array_spec(self.models[0])

    def upload_reference(self, reply, sent):
        return self.models[self.choice(reply.metrics)]

    def choice(self, metrics: dict) -> int:
        return min(self.K - 1, max(0, int(metrics.get(CLUSTER, 0))))

    def aggregate_replies(self, server_round, replies):
        groups: dict[int, list] = {}
        for r in replies:
            j = r.metrics.get(CLUSTER)
            if not isinstance(j, int) or not 0 <= j < self.K:
                self.stats.reject(r.cid, f"cluster={j!r} is not an integer in [0, {self.K - 1}]")
                continue
            groups.setdefault(j, []).append(r)
            self.assignment[r.cid] = j
        uniform = self.cfg.strategy.get("weighting", "uniform") == "uniform"
        for j, members in sorted(groups.items()):
            weights = [1.0 if uniform else r.num_examples for r in members]
            merged = self.aggregate([r.arrays for r in members], weights,
                                    center=self.models[j], slot=f"cluster{j}")
            self.models[j] = {**self.models[j], **merged}
        self._bundle = None
        if self.client_groups:
            self._ari = cluster_ari(self.assignment, self.client_groups, self.excluded_clients)

    def eval_arrays(self, cid):
        return self.models[self.assignment[cid]] if cid in self.assignment else self.all_models()

    def new_client_arrays(self, cid, server_round):
        return {}  # a new client only picks a cluster model, at scoring (eval_arrays: all K)

    def round_metrics(self, server_round):
        sizes = [0] * self.K
        for cid, j in self.assignment.items():
            if cid not in self.excluded_clients:
                sizes[j] += 1
        return {"cluster_ari": self._ari, "cluster_sizes": sizes}

    def state_arrays(self):
        return {**super().state_arrays(), **{f"cluster{j}": m for j, m in enumerate(self.models)}}

    def state_scalars(self):
        return {**super().state_scalars(), "assignment": {str(c): j for c, j in self.assignment.items()}}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.models = [arrays[f"cluster{j}"] for j in range(self.K)]
        self.assignment = {int(c): int(j) for c, j in scalars.get("assignment", {}).items()}
        self._bundle = None


class IFCAClient(ClientMethod):
    """Client half: pick the cluster model of lowest training loss, train it, say which."""

    name = "ifca"

    def choose(self, models: list[StateDict], server_round: int = 0) -> tuple[int, list[float]]:
        """j = argmin_j CE(x_j; training split, or one batch of it), and every model's loss."""
        x, y = self.data.x_train, self.data.y_train
        if self.cfg.strategy.get("select_on", "train") == "batch":
            idx = batches(len(y), int(self.cfg.batch_size), self.generator(server_round, SELECT_STREAM),
                          x.device)[0]
            x, y = x[idx], y[idx]
        losses = [evaluate(self.model("main", m), x, y)[0] for m in models]
        return min(range(len(models)), key=lambda j: losses[j]), losses

    def train(self, received, config):
        models = unbundle(received)
        j, losses = self.choose(models, int(config["server-round"]))
        self.chosen = models[j]
        model = self.model("main", models[j])
        loss = self.fit(model, int(config["server-round"]))
        return TrainResult(message_state(model.state_dict()), self.data.num_train,
                           {"train_loss": loss, CLUSTER: j, "cluster_loss": losses[j]})

    def upload_reference(self, received, upload, config):
        return {k: self.chosen[k] for k in upload}

    def adapt(self, received, config):
        """A new client personalizes by picking the cluster model of lowest loss, which
        ``evaluate`` does with the K models it is sent: no training first."""
        return {}

    def evaluate(self, received, config):
        if is_bundle(received):
            models = unbundle(received)
            received = models[self.choose(models, int(config["server-round"]))[0]]
        return self.report(self.model("main", received))
