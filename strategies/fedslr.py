"""FedSLR (Huang, Shen, Sun, Hu, Chow, Tao, Liu, TMLR 2023): low-rank global + sparse personal.

T. Huang, L. Shen, Y. Sun, W. Lin, D. Tao et al. "Fusion of Global and Local Knowledge for
Personalized Federated Learning". TMLR 2023. arXiv:2302.11051. Code: huangtiansheng/fedslr.

Every parameter of the model (Conv, Linear and norm layers) has a global part w and a personal
part p; client i's personal model is w_s + p_i. Round t, sampled clients S, N clients in all:

1. Stage 1 (global part), client i: w <- w_s; E = local_epochs epochs of SGD on
       CE(w) - <mu_i, w> + (alpha/2) ||w - w_s||^2      (weight decay ``weight_decay`` on w)
   then  mu_i <- mu_i + alpha (w_s - w_i)   (FedDyn's dual, client state);  upload w_i (dense).
2. Stage 2 (sparse personal part), same round: w = w_s (received, fixed); ``personal_epochs``
   epochs of SGD on CE(w_s + p) over p (weight decay on p), after every step
       p <- sign(p) max(|p| - lr mu_sp, 0)              (prox of lr mu_sp ||p||_1)
   p_i never leaves the client. p_i starts (authors' code) as a copy of the initial weights
   for Conv/Linear layers and as zeros for norm layers (``p_init=weights``); ``p_init=zeros``
   starts every p at zero.
3. Server (proximal step):
       h  <- h - alpha (1/N) sum_{i in S} (w_i - w_s)
       W~ <- mean_{i in S}(w_i) - (1/alpha) h              (plain mean, as the authors' code)
       w_s <- SVT_{lambda/alpha}(W~) per >= 2-D layer: U diag(max(s - lambda/alpha, 0)) V^T,
   conv [out, in, kh, kw] -> swap(1, 2) -> [out*kh, in*kw] for the SVD and back; 1-D tensors
   are not thresholded. h is checkpointed.
4. Downlink: each thresholded layer goes as A = U_r sqrt(S_r) and B = sqrt(S_r) V_r^T
   (``<layer>@U``, ``<layer>@V``) where r (m + n) < m n, dense otherwise; the client rebuilds
   w_s = A B exactly (``task.algorithms.lowrank.rebuild``, the function the server defines w_s with).

Personal accuracy is w_s + p_i's; global accuracy is w_s's. Metrics per round (key ``fedslr``):
the rank of every >= 2-D layer of w_s, the mean sparsity of p over the clients that trained,
and the bytes of one w_s message against the dense model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from task.algorithms.lowrank import (
    FACTOR_U,
    FACTOR_V,
    decode_transport,
    dual_update,
    encode_transport,
    feddyn_aggregate,
    feddyn_correction,
    full_rank,
    rank,
    rebuild,
    soft_threshold,
    sparsity,
    svt_factors,
    to_matrix,
)
from task.core.messages import array_spec
from task.core.params import StateDict, message_state, model_state, num_bytes
from task.core.training import Penalty
from task.run import figures
from task.run.schema import COUNT, POSITIVE, Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fedslr", {
    "alpha": POSITIVE,                       # FedDyn's coefficient
    "lam": Field(float, 0.0),                # nuclear-norm weight: SVT threshold lam / alpha
    "mu_sp": Field(float, 0.0),              # L1 weight of p: soft threshold lr * mu_sp
    "weight_decay": Field(float, 0.0),       # on w in stage 1 and on p in stage 2
    "personal_epochs": COUNT,
    "p_init": Field(str, choices=("weights", "zeros")),
})

P_SPARSITY = "p_sparsity"  # train-reply metric: fraction of exact zeros in p_i
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class FedSLR(Method):
    """Server half: FedDyn correction, SVT of every >= 2-D layer, factorised downlink."""

    name = "fedslr"
    keeps_client_state = True

    def __init__(self, cfg, initial_state, partition_sizes, param_keys: list[str] | None = None):
        super().__init__(cfg, initial_state, partition_sizes)
        # The entries with a FedDyn dual (the model's parameters; buffers are plainly averaged).
        keys = param_keys if param_keys is not None else [
            k for k, v in initial_state.items() if v.is_floating_point()]
        self.h: StateDict = {k: torch.zeros_like(initial_state[k]) for k in keys}
        # Factors (A, B) of every thresholded layer of w_s; empty before the first aggregation.
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._transport: StateDict | None = None
        self.p_sparsity: float | None = None

    @classmethod
    def from_model(cls, cfg, model, partition_sizes):
        return cls(cfg, model_state(model), partition_sizes, [n for n, _ in model.named_parameters()])

    @property
    def alpha(self) -> float:
        return float(self.cfg.strategy.alpha)

    # --- what is sent -------------------------------------------------------------------
    def transport(self) -> StateDict:
        """w_s as it travels: one dict object per round, so the base serialises it once."""
        if self._transport is None:
            self._transport = encode_transport(self.global_state, self.factors)
        return self._transport

    def train_arrays(self, cid, server_round):
        return self.transport()

    def eval_arrays(self, cid):
        return self.transport()

    def expected_upload(self, cid, sent):
        """The client uploads its dense w_i, whatever form w_s travelled in."""
        return array_spec(self.global_state)

    def upload_reference(self, reply, sent):
        """w_i is relative to the dense w_s (``sent`` may hold its factors instead)."""
        return self.global_state

    # --- 3. the server's proximal step --------------------------------------------------
    def aggregate_replies(self, server_round, replies):
        uploads = [r.arrays for r in replies]
        mean = self.aggregate(uploads, [1.0] * len(uploads))  # the authors' plain mean (aggregator=)
        self.h = feddyn_correction(self.h, uploads, self.global_state, self.alpha, self.num_clients)
        corrected = feddyn_aggregate(mean, self.h, self.alpha)
        self.global_state, self.factors = threshold_layers(
            corrected, float(self.cfg.strategy.lam) / self.alpha)
        self._transport = None
        found = [float(r.metrics[P_SPARSITY]) for r in replies if P_SPARSITY in r.metrics]
        self.p_sparsity = float(np.mean(found)) if found else None

    # --- 5. metrics ---------------------------------------------------------------------
    def round_metrics(self, server_round):
        ranks = {k: rank(a) for k, (a, _) in self.factors.items()}
        full = {k: full_rank(v.shape) for k, v in self.global_state.items()
                if v.dim() >= 2 and v.is_floating_point()}
        sent, dense = num_bytes(self.transport()), num_bytes(self.global_state)
        return {"fedslr": {
            "rank": {k: ranks.get(k, full[k]) for k in full},
            "full_rank": full,
            "rank_fraction": sum(ranks.get(k, full[k]) for k in full) / max(sum(full.values()), 1),
            "p_sparsity": self.p_sparsity,
            "model_bytes": sent,
            "dense_model_bytes": dense,
            "downlink_ratio": sent / dense,
        }}

    def plot(self, rows, directory):
        return [plot_fedslr(rows, Path(directory) / "fedslr.png")]

    # --- checkpoints --------------------------------------------------------------------
    def state_arrays(self):
        factors = {}
        for key, (a, b) in self.factors.items():
            factors[key + FACTOR_U], factors[key + FACTOR_V] = a, b
        return {**super().state_arrays(), "h": self.h, "factors": factors}

    def state_scalars(self):
        return {**super().state_scalars(), "p_sparsity": self.p_sparsity}

    def load_state(self, arrays, scalars):
        super().load_state(arrays, scalars)
        self.h = arrays.get("h", self.h)
        stored = arrays.get("factors", {})
        self.factors = {k[: -len(FACTOR_U)]: (v, stored[k[: -len(FACTOR_U)] + FACTOR_V])
                        for k, v in stored.items() if k.endswith(FACTOR_U)}
        self.p_sparsity = scalars.get("p_sparsity")
        self._transport = None


def threshold_layers(state: StateDict, tau: float
                     ) -> tuple[StateDict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """SVT with threshold ``tau`` of every >= 2-D floating entry (conv reshaped); 1-D as is.

    Returns the thresholded state, each such layer defined as ``rebuild(A, B)`` of its factors
    (what the client computes from the message), and the factors.
    """
    out: StateDict = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state.items():
        if value.dim() >= 2 and value.is_floating_point():
            a, b = svt_factors(to_matrix(value), tau)
            factors[key] = (a, b)
            out[key] = rebuild(a, b, value.shape)
        else:
            out[key] = value
    return out, factors


# --- client half ---------------------------------------------------------------------------
def feddyn_penalty(w_s: StateDict, mu: StateDict, alpha: float) -> Penalty:
    """-<mu, w> + (alpha/2) ||w - w_s||^2 over the model's parameters (FedDyn's local terms)."""
    def penalty(model: nn.Module) -> torch.Tensor:
        terms = [-(mu[n] * w).sum() + 0.5 * alpha * ((w - w_s[n]) ** 2).sum()
                 for n, w in model.named_parameters()]
        return torch.stack(terms).sum()
    return penalty


def initial_personal_part(model: nn.Module, initial: StateDict, mode: str) -> StateDict:
    """p_i at a client's first round: the initial weights of Conv/Linear (and other) layers and
    zeros for norm layers (``weights``, the authors' code), or zeros everywhere (``zeros``)."""
    p: StateDict = {}
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            zero = mode == "zeros" or isinstance(module, NORM_LAYERS)
            p[key] = torch.zeros_like(initial[key]) if zero else initial[key].clone()
    return p


class GlobalPlusPersonal(nn.Module):
    """The personal model w_s + p: ``base`` (holding w_s, frozen) run with every parameter
    replaced by its w_s + p. Only p trains: SGD skips the frozen w_s, whose grad stays None."""

    def __init__(self, base: nn.Module, p: StateDict):
        super().__init__()
        self.base = base.requires_grad_(False)  # a submodule: train()/eval() reach it
        self.names = list(p)
        self.p = nn.ParameterList([nn.Parameter(p[k].detach().clone()) for k in self.names])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_s = dict(self.base.named_parameters())
        merged = {k: w_s[k] + q for k, q in zip(self.names, self.p, strict=True)}
        return functional_call(self.base, merged, (x,))

    @torch.no_grad()
    def shrink(self, tau: float) -> None:
        """p <- soft_threshold(p, tau) in place."""
        for q in self.p:
            q.copy_(soft_threshold(q, tau))

    def personal_part(self) -> StateDict:
        return {k: q.detach().clone() for k, q in zip(self.names, self.p, strict=True)}


class FedSLRClient(ClientMethod):
    """Client half: stage 1 (FedDyn on w), stage 2 (sparse p on w_s + p), p kept local."""

    name = "fedslr"

    def global_weights(self, received: StateDict) -> StateDict:
        """w_s, rebuilt from the factors where it travelled factorised."""
        return decode_transport(received, {k: v.shape for k, v in self.initial_state().items()})

    def upload_reference(self, received, upload, config):
        """w_i is relative to the dense w_s, rebuilt where it travelled factorised."""
        w_s = self.global_weights(received)
        return {k: w_s[k] for k in upload}

    def personal_part(self) -> StateDict:
        p = self.state.load("p")
        if p is None:
            # Any instance of the model tells which parameters belong to norm layers.
            model = self.model("layout")
            p = initial_personal_part(model, self.initial_state(), str(self.cfg.strategy.p_init))
        return p

    def train(self, received, config):
        server_round = int(config["server-round"])
        s = self.cfg.strategy
        alpha, lr = float(s.alpha), self.round_lr(server_round)
        w_s = self.global_weights(received)
        # 1. Stage 1: FedDyn's local objective on w, from w_s.
        w = self.model("global", w_s)
        params = [n for n, _ in w.named_parameters()]
        mu = self.state.load("mu") or {n: torch.zeros_like(w_s[n]) for n in params}
        loss = self.fit(w, server_round, lr=lr, weight_decay=float(s.weight_decay),
                        penalty=feddyn_penalty(w_s, mu, alpha))
        self.state.save("mu", dual_update(mu, w_s, w.state_dict(), alpha))  # on the device
        w_i = message_state(w.state_dict())  # the upload: one copy, into its message
        # 2. Stage 2: p on w_s + p (w_s fixed), soft-thresholded after every SGD step.
        personal = GlobalPlusPersonal(self.model("base", w_s), self.personal_part())
        personal_loss = self.fit(personal, server_round, epochs=int(s.personal_epochs), lr=lr,
                                 weight_decay=float(s.weight_decay), stream=1,
                                 after_step=lambda: personal.shrink(lr * float(s.mu_sp)))
        p = personal.personal_part()
        self.state.save("p", p)
        return TrainResult(w_i, self.data.num_train, {
            "train_loss": loss, "personal_loss": personal_loss, P_SPARSITY: sparsity(p.values())})

    def evaluate(self, received, config):
        w_s = self.global_weights(received)
        personal = GlobalPlusPersonal(self.model("base", w_s), self.personal_part())
        return self.report(personal, self.model("global", w_s))


def plot_fedslr(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rank fraction of w_s, sparsity of p and the downlink ratio per round (key ``fedslr``),
    as PNG and PDF."""
    return figures.save(fedslr_figure(rows), path)[0]


@figures.styled
def fedslr_figure(rows: list[dict[str, Any]]):
    series = {"rank of w_s / full rank": "rank_fraction", "sparsity of p (mean)": P_SPARSITY,
              "w_s message / dense model (bytes)": "downlink_ratio"}
    fig, ax = figures.new_figure()
    for label, key in series.items():
        points = [(int(r["round"]), float(r["fedslr"][key])) for r in rows
                  if (r.get("fedslr") or {}).get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", markersize=3, label=label)
    ax.set(ylabel="fraction", ylim=(0, 1.05), title="FedSLR: low-rank w_s, sparse p, downlink")
    figures.integer_rounds(ax)
    figures.legend(ax)
    return fig
