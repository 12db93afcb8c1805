"""Deep mutual learning losses and the pFedMe-style proximal inner solve (PFML's building blocks).

Pure functions on logits and modules, shared by ``strategies/pfml.py`` and its tests:

- ``mutual_kl(logits, peer_logits, T)``   = T^2 KL(p_peer || p_self), batchmean, peer detached,
  with p = softmax(z / T). The T^2 factor (Hinton et al., 2015) keeps the gradient's scale
  independent of T; at the default T = 1 it is 1.
- ``mutual_loss``                          = CE(self) + kl_weight * mutual_kl.
- ``prox_steps(model, loss_fn, centre, lam, lr, K)``: K gradient steps on
  loss_fn(model) + (lam/2) ||theta - centre||^2, in place (pFedMe's inner problem).
- ``outer_gradient``                       = grad L(p) + lam (p - theta*) per parameter.
- ``iteration_batches``: E index batches of a shuffled stream that reshuffles when it runs out
  (PFML counts local work in iterations, not epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from task.core.training import batches

StateDict = dict[str, torch.Tensor]


def mutual_kl(logits: torch.Tensor, peer_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_peer || p_self) averaged over the batch; no gradient reaches the peer.

    ``F.kl_div(input, target)`` is sum target * (log target - input): with input = log p_self
    and target = log p_peer (``log_target``) it is KL(p_peer || p_self).
    """
    t = float(temperature)
    log_self = F.log_softmax(logits / t, dim=1)
    log_peer = F.log_softmax(peer_logits.detach() / t, dim=1)
    return F.kl_div(log_self, log_peer, reduction="batchmean", log_target=True) * (t * t)


def mutual_loss(logits: torch.Tensor, y: torch.Tensor, peer_logits: torch.Tensor,
                kl_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """CE(self) + kl_weight * KL(p_peer || p_self): L(w) with peer m, or L(m) with peer w."""
    loss = F.cross_entropy(logits, y)
    if kl_weight:
        loss = loss + float(kl_weight) * mutual_kl(logits, peer_logits, temperature)
    return loss


def proximity(model: nn.Module, centre: StateDict) -> torch.Tensor:
    """||theta - centre||^2 over the model's trainable parameters."""
    return torch.stack([((p - centre[n]) ** 2).sum() for n, p in model.named_parameters()]).sum()


def prox_steps(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], centre: StateDict,
               lam: float, lr: float, steps: int) -> nn.Module:
    """theta* ~ argmin_theta loss_fn(theta) + (lam/2) ||theta - centre||^2 by ``steps`` plain
    gradient steps of size ``lr`` from ``model``'s weights, in place; returns ``model``."""
    for _ in range(int(steps)):
        objective = loss_fn(model) + 0.5 * float(lam) * proximity(model, centre)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(float(lr) * g)
    return model


def outer_gradient(model: nn.Module, theta: StateDict, lam: float) -> None:
    """Add lam (p - theta*) to every parameter's ``.grad`` (already holding grad L(p)).

    An SGD step of size eta then gives p <- p - eta grad L(p) - eta lam (p - theta*).
    """
    if not lam:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            term = float(lam) * (p - theta[name])
            p.grad = term if p.grad is None else p.grad + term


def iteration_batches(n: int, batch_size: int, iterations: int, gen: torch.Generator,
                      device: torch.device, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """``iterations`` index batches over range(n): shuffled epochs, one after another."""
    done = 0
    while done < iterations:
        for idx in batches(n, batch_size, gen, device, drop_last):
            if done == iterations:
                return
            yield idx
            done += 1
