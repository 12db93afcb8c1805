"""pFedMe's Moreau-envelope inner solve and Per-FedAvg's MAML meta-gradient, as pure functions.

Shared by ``strategies/pfedme.py`` and ``strategies/perfedavg.py`` and their tests; f is the
cross-entropy of a module on one batch, every step a plain gradient step.

- ``moreau_steps(theta, x, y, w, lam, lr, K, l2)``: K steps on
  f(theta) + (lam/2) ||theta - w||^2 + (l2/2) ||theta||^2, in place (pFedMe's h_i; l2 = the
  authors' optimizer's ``mu``, 0 in the paper).
- ``meta_gradient(model, batches, alpha, hessian, delta)``: Per-FedAvg's
      w~ = w - alpha grad f(w; D)
      FO: grad f(w~; D')
      HF: (I - alpha d_H) grad f(w~; D'),  d_H g ~ grad^2 f(w; D'') g
  at the model's current parameters (which it leaves untouched).
- ``hessian_vector``: grad^2 f(w; D'') v by central finite differences (the paper's
  [grad f(w + delta v) - grad f(w - delta v)] / (2 delta)) or exactly by double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
HESSIANS = ("finite_difference", "autograd")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def can_train_on(model: nn.Module, batch_size: int) -> bool:
    """False for a single-sample batch of a model with BatchNorm (it cannot train on one)."""
    return batch_size >= 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_loss(model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
    """f(params; batch): the cross-entropy of ``model`` run with ``params`` (its buffers its own)."""
    x, y = batch
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def gradient(model: nn.Module, params: Params, batch: Batch, create_graph: bool = False) -> Params:
    """grad f(params; batch), one tensor per parameter name."""
    loss = batch_loss(model, params, batch)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads, strict=True))


# --- pFedMe -----------------------------------------------------------------------------
@torch.no_grad()
def _descend(params: dict[str, nn.Parameter], grads: Params, lr: float) -> None:
    for name, p in params.items():
        p.sub_(lr * grads[name])


def moreau_steps(theta: nn.Module, batch: Batch, w: Params, lam: float, lr: float, steps: int,
                 l2: float = 0.0) -> float:
    """theta <- theta - lr (grad f(theta) + lam (theta - w) + l2 theta), ``steps`` times on one
    batch, in place; returns f(theta) before the last step."""
    params = trainable_parameters(theta)
    loss = torch.zeros(())
    for _ in range(int(steps)):
        loss = F.cross_entropy(theta(batch[0]), batch[1])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        with torch.no_grad():
            for name, p in params.items():
                grads[name] = grads[name] + lam * (p - w[name].to(p)) + l2 * p
        _descend(params, grads, lr)
    return float(loss.detach())


# --- Per-FedAvg --------------------------------------------------------------------------
def hessian_vector(model: nn.Module, params: Params, batch: Batch, vector: Params,
                   method: str = "finite_difference", delta: float = 1e-3) -> Params:
    """grad^2 f(params; batch) vector, by ``method`` (one of HESSIANS)."""
    if method == "autograd":
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        grads = gradient(model, live, batch, create_graph=True)
        dot = sum((grads[n] * vector[n].detach()).sum() for n in live)
        return dict(zip(live, torch.autograd.grad(dot, list(live.values())), strict=True))
    if method != "finite_difference":
        raise ValueError(f"hessian must be one of {HESSIANS}, got {method!r}")
    plus = {n: (p.detach() + delta * vector[n]).requires_grad_(True) for n, p in params.items()}
    minus = {n: (p.detach() - delta * vector[n]).requires_grad_(True) for n, p in params.items()}
    g_plus, g_minus = gradient(model, plus, batch), gradient(model, minus, batch)
    return {n: (g_plus[n] - g_minus[n]) / (2 * delta) for n in params}


def meta_gradient(model: nn.Module, batches: list[Batch], alpha: float, variant: str = "fo",
                  hessian: str = "finite_difference", delta: float = 1e-3) -> tuple[Params, float]:
    """Per-FedAvg's step direction at the model's parameters w, and f(w~; D').

    ``batches``: [D, D'] (FO) or [D, D', D''] (HF).
    """
    w = {n: p.detach() for n, p in trainable_parameters(model).items()}
    live = {n: p.clone().requires_grad_(True) for n, p in w.items()}
    g = gradient(model, live, batches[0])                                   # grad f(w; D)
    w_tilde = {n: (w[n] - alpha * g[n]).requires_grad_(True) for n in w}    # w~
    loss = batch_loss(model, w_tilde, batches[1])
    outer = dict(zip(w_tilde, torch.autograd.grad(loss, list(w_tilde.values())), strict=True))
    if variant == "fo":
        return outer, float(loss.detach())
    if variant != "hf":
        raise ValueError(f"variant must be 'fo' or 'hf', got {variant!r}")
    hv = hessian_vector(model, w, batches[2], outer, hessian, delta)
    return {n: outer[n] - alpha * hv[n] for n in w}, float(loss.detach())


@torch.no_grad()
def set_gradients(model: nn.Module, grads: Params) -> None:
    """Each trainable parameter's ``.grad`` := grads[name] (an optimizer then steps on it)."""
    for name, p in trainable_parameters(model).items():
        p.grad = grads[name].detach().clone()


def adapt(model: nn.Module, batches: list[Batch], alpha: float) -> None:
    """w <- w - alpha grad f(w; D) for each batch D in turn, in place (the evaluation's step)."""
    params = trainable_parameters(model)
    for batch in batches:
        loss = F.cross_entropy(model(batch[0]), batch[1])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        _descend(params, grads, alpha)
