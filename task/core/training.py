"""Local training and evaluation loops over in-memory tensors (no DataLoader workers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]
# Extra loss term added to cross-entropy, e.g. a proximal penalty; called every step.
Penalty = Callable[[nn.Module], torch.Tensor]


def batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device,
            drop_last: bool = False):
    """Shuffled index batches over range(n), from a seeded generator (reproducible).

    ``drop_last`` drops the last incomplete batch (a DataLoader's ``drop_last``), unless it is
    the only batch: a client with fewer samples than ``batch_size`` still trains.
    """
    order = torch.randperm(n, generator=gen).to(device)
    chunks = order.split(batch_size)
    if drop_last and len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    return chunks


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    penalty: Penalty | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    after_step: Callable[[], None] | None = None,
    drop_last: bool = False,
    proximal_step: tuple[StateDict, float] | None = None,
) -> float:
    """SGD on cross-entropy (+ penalty) for ``epochs`` epochs; returns the mean batch loss.

    ``proximal_step=(anchor, lam)`` adds lam (w - anchor) to each step *after* the momentum
    buffer, w <- w - lr (m + lam (w - anchor)) with m <- momentum m + grad CE (PRFL's Ditto),
    where a penalty in the loss would pass through the buffer.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, gen, x.device, drop_last):
            if len(idx) < 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a single sample
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pulls = _proximal_pulls(model, proximal_step)
            opt.step()
            _apply_pulls(pulls, lr)
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1)


def _proximal_pulls(model: nn.Module, proximal_step: tuple[StateDict, float] | None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """lam (w - anchor) for every trainable parameter, at the weights before the step."""
    if proximal_step is None:
        return []
    anchor, lam = proximal_step
    return [(p, lam * (p.detach() - anchor[name].to(p))) for name, p in model.named_parameters()
            if p.requires_grad]


@torch.no_grad()
def _apply_pulls(pulls: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
    for p, pull in pulls:
        p.sub_(lr * pull)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    n = max(len(y), 1)
    return loss / n, correct / n


def proximal_penalty(anchor: StateDict, mu: float) -> Penalty:
    """(mu/2) ||w - anchor||^2 over the model's trainable parameters."""
    def penalty(model: nn.Module) -> torch.Tensor:
        terms = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters()]
        return 0.5 * mu * torch.stack(terms).sum()
    return penalty


def step_generator(seed: int, cid: int, server_round: int, stream: int = 0) -> torch.Generator:
    """A generator whose seed depends only on (seed, client, round, stream): reproducible."""
    return torch.Generator().manual_seed(hash((seed, cid, server_round, stream)) & 0x7FFFFFFF)
