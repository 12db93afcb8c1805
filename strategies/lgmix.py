"""LG-Mix (Jiang, Le, Li, Dou, ICLR 2024): local/global update mixing via NTK convergence rate.

M. Jiang, A. Le, X. Li, Q. Dou. "Heterogeneous Personalized Federated Learning by Local-Global
Updates Mixing via Convergence Rate". ICLR 2024. https://openreview.net/forum?id=7pWRLDBAtc

The trace of a model's empirical NTK measures how fast it converges on the client's data; LG-Mix
approximates it by the trace of the centred covariance of the penultimate features and mixes
the local and the aggregated update of each client in proportion. Round t, client i with its
persistent personal model theta_i (the first received w_g on first participation):

1. old = theta_i; train theta_i for E = local_epochs epochs of SGD. On the training batches,
   collect the penultimate features (input of the last linear layer) of
   (a) theta_i in train mode (the training forward passes themselves) -> F_local (N x d),
   (b) the received global model w_g in eval mode                     -> F_global (N x d).
2. Delta_i = theta_i(after) - old over every floating state entry (BN affine parameters and
   running statistics included; integer counters such as num_batches_tracked are no part of
   the update and stay the client's own).
3. For F in {F_local, F_global}:  Fc = F - mean(F),  C = Fc^T Fc / N,
       t = trace(C) = sum(Fc ** 2) / N                      (feature_trace; no eigen-solver)
   (the authors' code sums C's eigenvalues but the smallest: effectively trace(C)). With
   E > 1 the features of all E epochs form F.
   c_i = t_local / (t_local + t_global).
   Upload Delta_i with c_i; keep theta_i = old + Delta_i ("pending").
4. Server, replies S_t with p_j = n_j / sum_{k in S_t} n_k:
       cbar_i = running mean of c_i over the rounds client i took part in
       Dbar   = sum_{j in S_t} p_j Delta_j
       w_g   <- w_g + Dbar
   and sends Dbar and cbar_i to each client of S_t (the ``train.personalize`` phase):
       theta_i <- old + (1 - cbar_i) Dbar + cbar_i Delta_i
                = theta_i(pending) + (1 - cbar_i) (Dbar - Delta_i).
The server never holds a client model; a client not sampled keeps theta_i unchanged. Nothing
is kept local FedBN-style: BN entries are mixed like every other entry.

Personal accuracy is theta_i's (w_g's for a client never sampled yet); global accuracy is w_g's.
``ntk_trace`` is the full empirical-NTK trace (per-sample Jacobians), a slow reference for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from task.core.messages import array_spec
from task.core.models import last_linear
from task.core.params import StateDict, model_state, subtract
from task.run import figures
from task.run.schema import register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("lgmix", {})

# Metric names of the training reply.
C_I, T_LOCAL, T_GLOBAL = "c_i", "t_local", "t_global"


def feature_trace(features: torch.Tensor) -> float:
    """trace(C) of the centred feature covariance C = Fc^T Fc / N, Fc = F - mean(F).

    Computed as sum(Fc ** 2) / N (the sum of C's eigenvalues without forming C), in float64.
    """
    f = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    if f.shape[0] == 0:
        return 0.0
    centred = f - f.mean(dim=0, keepdim=True)
    return float((centred ** 2).sum() / f.shape[0])


def mixing_coefficient(t_local: float, t_global: float) -> float:
    """c_i = t_local / (t_local + t_global) (0.5 where both traces vanish)."""
    total = t_local + t_global
    return 0.5 if total <= 0.0 else t_local / total


def float_entries(state: StateDict) -> StateDict:
    """The floating entries of a state dict (what an update Delta covers)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def mix(theta: StateDict, dbar: StateDict, delta: StateDict, cbar: float) -> StateDict:
    """theta + (1 - cbar) (Dbar - Delta) on the entries of Delta; other entries unchanged.

    With theta = old + Delta this is old + (1 - cbar) Dbar + cbar Delta.
    """
    out = {k: v.clone() for k, v in theta.items()}
    for k, d in delta.items():
        out[k] = theta[k] + (1.0 - cbar) * (dbar[k].to(theta[k]) - d.to(theta[k]))
    return out


class FeatureRecorder:
    """Penultimate features (the input of ``last_linear(model)``) of every forward pass."""

    def __init__(self, model: nn.Module):
        self.features: list[torch.Tensor] = []
        self.handle = last_linear(model).register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.features.append(args[0].detach().reshape(args[0].shape[0], -1))

    def trace(self) -> float:
        return feature_trace(torch.cat(self.features)) if self.features else 0.0

    def remove(self) -> None:
        self.handle.remove()


def ntk_trace(model: nn.Module, x: torch.Tensor) -> float:
    """Trace of the empirical NTK Gram matrix on ``x``: sum_n sum_k ||d f_k(x_n) / d theta||^2.

    Full per-sample Jacobians (torch.func functional_call + vmap + jacrev) over every
    parameter; the model is evaluated in eval mode (per-sample BN uses running statistics).
    Slow and memory-hungry: a reference for tests on tiny models only.
    """
    from torch.func import functional_call, jacrev, vmap

    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p: dict, xn: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, buffers), (xn.unsqueeze(0),)).squeeze(0)

    try:
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (N, K, *shape)}
        return float(sum((j.to(torch.float64) ** 2).sum() for j in jac.values()))
    finally:
        model.train(was_training)


class LGMix(Method):
    """Server half: w_g <- w_g + Dbar; per client the running mean cbar_i of its c_i."""

    name = "lgmix"
    keeps_client_state = True
    upload_is_update = True  # clients upload Delta_i

    def __init__(self, cfg, initial_state, partition_sizes):
        super().__init__(cfg, initial_state, partition_sizes)
        self.c_count: dict[int, int] = {}
        self.cbar: dict[int, float] = {}
        self.dbar: StateDict = {}
        self.round_values: dict[int, dict[str, dict[str, float]]] = {}

    def expected_upload(self, cid, sent):
        """A reply carries Delta_i: the floating entries of the global state."""
        return array_spec(float_entries(sent))

    def aggregate_replies(self, server_round, replies):
        values = {}
        for r in replies:
            c = float(r.metrics[C_I])
            self.update_cbar(r.cid, c)
            values[str(r.cid)] = {"c": c, "cbar": self.cbar[r.cid],
                                  "t_local": float(r.metrics[T_LOCAL]),
                                  "t_global": float(r.metrics[T_GLOBAL])}
        self.round_values = {server_round: values}
        # Dbar through the configured aggregator (mean: the p-weighted mean), centred on the last Dbar.
        self.dbar = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                   center=self.dbar or None)
        for k, d in self.dbar.items():
            self.global_state[k] = self.global_state[k] + d.to(self.global_state[k])

    def update_cbar(self, cid: int, c: float) -> None:
        """cbar_i <- cbar_i + (c - cbar_i) / count_i: the mean of c_i over i's rounds."""
        count = self.c_count.get(cid, 0) + 1
        self.c_count[cid] = count
        self.cbar[cid] = self.cbar.get(cid, 0.0) + (c - self.cbar.get(cid, 0.0)) / count

    def personalize_arrays(self, cid, server_round):
        return self.dbar

    def personalize_config(self, cid, server_round):
        return {"cbar": float(self.cbar[cid])}

    def new_client_extra(self, cid):
        """A new client mixes its first local update with the last Dbar, as in its first round."""
        return self.dbar

    def round_metrics(self, server_round):
        """Per client c_i, cbar_i and both traces, and their means over the round's clients:
        cbar is a running mean over all rounds, so the per-round c_i shows what it averages."""
        values = self.round_values.get(server_round, {})
        means = {f"lgmix_{key}_mean": float(np.mean([v[key] for v in values.values()])) if values else None
                 for key in ("c", "cbar")}
        return {"lgmix": values, **means}

    def plot(self, rows, directory):
        return [plot_cbar(rows, directory / "cbar.png")]

    def state_scalars(self):
        """Checkpointed bookkeeping: every client's cbar_i and count (Dbar lives one round only)."""
        return {**super().state_scalars(), "cbar": {str(c): v for c, v in self.cbar.items()},
                "c_count": {str(c): n for c, n in self.c_count.items()}}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.cbar = {int(c): float(v) for c, v in scalars.get("cbar", {}).items()}
        self.c_count = {int(c): int(n) for c, n in scalars.get("c_count", {}).items()}


class LGMixClient(ClientMethod):
    """Client half: train theta_i with feature hooks, upload Delta_i and c_i, then mix."""

    name = "lgmix"

    def personal_state(self, received: StateDict) -> StateDict:
        """theta_i, or the received global model on first participation."""
        return self.state.load("personal") or received

    def train(self, received, config):
        server_round = int(config["server-round"])
        old = self.personal_state(received)
        model = self.model("main", old)
        loss, t_local, t_global = self.fit_with_features(model, self.model("global", received), server_round)
        after = model_state(model)
        delta = subtract(float_entries(after), old)
        c = mixing_coefficient(t_local, t_global)
        # Pending until the personalize phase: theta_i = old + Delta_i (the purely local update).
        self.state.save("personal", after)
        self.state.save("delta", delta)
        self.state.save_scalars({"delta_round": server_round})
        metrics = {"train_loss": loss, C_I: c, T_LOCAL: t_local, T_GLOBAL: t_global}
        return TrainResult(delta, self.data.num_train, metrics)

    def fit_with_features(self, model: nn.Module, global_model: nn.Module,
                          server_round: int) -> tuple[float, float, float]:
        """Train ``model``; return (loss, t_local, t_global) of its and ``global_model``'s features.

        t_local from the training forward passes (train mode); t_global from ``global_model`` in
        eval mode on the same batches (a forward pre-hook on ``model`` feeds it each batch).
        """
        global_model.eval()
        local_features = FeatureRecorder(model)
        global_features = FeatureRecorder(global_model)

        def global_forward(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                global_model(*args)

        same_batches = model.register_forward_pre_hook(global_forward)
        try:
            loss = self.fit(model, server_round)
        finally:
            same_batches.remove()
            local_features.remove()
            global_features.remove()
        return loss, local_features.trace(), global_features.trace()

    def personalize(self, received, config):
        """theta_i <- old + (1 - cbar_i) Dbar + cbar_i Delta_i, with Dbar = ``received``."""
        server_round = int(config["server-round"])
        if int(self.state.scalars().get("delta_round", -1)) != server_round:
            raise RuntimeError(f"no pending LG-Mix update of round {server_round} to mix")
        cbar = float(config["cbar"])
        theta = mix(self.state.load("personal"), received, self.state.load("delta"), cbar)
        self.state.save("personal", theta)
        self.state.save_scalars({"delta_round": -1})
        return {"cbar": cbar}

    def adapt_after(self, extra, config, metrics):
        """A new client's cbar_i is its only c_i: the mix of its first round."""
        self.personalize(extra, {**config, "cbar": float(metrics[C_I])})

    def evaluate(self, received, config):
        personal = self.model("main", self.personal_state(received))
        return self.report(personal, self.model("global", received))


LABELLED_CLIENTS = 10  # more client lines share one legend entry
CBAR = r"$\bar{c}_i$"


def plot_cbar(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Plot each client's cbar_i over rounds from metrics.jsonl rows (key ``lgmix``) to PNG and
    PDF, with the round's mean c_i (dashed) beside the mean cbar_i (black).

    A client appears at the rounds it took part in; cbar_i is constant in between.
    """
    return figures.save(cbar_figure(rows), path)[0]


@figures.styled
def cbar_figure(rows: list[dict[str, Any]]):
    series: dict[int, list[tuple[int, float]]] = {}
    for row in rows:
        for cid, values in (row.get("lgmix") or {}).items():
            series.setdefault(int(cid), []).append((int(row["round"]), float(values["cbar"])))
    fig, ax = figures.new_figure()
    few = len(series) <= LABELLED_CLIENTS
    for i, (cid, points) in enumerate(sorted(series.items())):
        label = f"client {cid}: {CBAR}" if few else (f"each client's {CBAR}" if i == 0 else None)
        ax.plot(*zip(*points, strict=True), "o-", markersize=3, alpha=0.6, linewidth=1,
                color=None if few else "0.6", label=label)
    means = (("lgmix_cbar_mean", "k-", f"mean {CBAR}"), ("lgmix_c_mean", "k--", "mean $c_i$"))
    for key, style, label in means:
        points = [(int(r["round"]), float(r[key])) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, linewidth=2, label=label)
    ax.set(ylabel="weight of the local update", ylim=(0, 1),
           title=f"LG-Mix: the round's $c_i$ and the running mean {CBAR}")
    figures.integer_rounds(ax)
    if series:
        figures.legend(ax, "beside")
    return fig
