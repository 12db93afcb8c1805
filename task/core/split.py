"""A model's split into body (the feature extractor) and head (the classifier), defined once.

Every partial-sharing method (FedPer, FedRep, FedBABU, LG-FedAvg) and any method that treats
the last layers apart uses this one definition, so "the head" means the same entries in all.

The head is, in this order of precedence:

1. ``head=`` a layer-name prefix (the config's ``strategy.head``): the module of that name and
   everything under it, e.g. ``classifier`` or ``features.9`` (a ``named_modules`` name);
2. the model's declared head: a module attribute named ``head`` or ``classifier`` (every
   model of task/core/models.py declares ``classifier``);
3. otherwise the last ``nn.Linear`` of the model (``last_linear``): a user's own nn.Module
   without either attribute still splits where its classifier usually is.

The body is every other state-dict entry (parameters and buffers: BatchNorm statistics of
the body are body). A split with an empty head or an empty body, or a prefix that names no
module, is refused with an error that says what the model offers: a method that shares one
part and keeps the other has nothing to do on such a model (``logreg``, whose only layer is
the classifier, has no body).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from task.core.models import last_linear

StateDict = dict[str, torch.Tensor]
# Attribute names a model may declare its head under, in order.
DECLARED_HEADS = ("head", "classifier")
PARTS = ("body", "head")


@dataclass(frozen=True)
class Split:
    """The head's module name and the state-dict keys of either part."""

    prefix: str
    head: frozenset[str]
    body: frozenset[str]

    def keys(self, part: str) -> frozenset[str]:
        """The keys of ``part`` ("body" or "head")."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return self.head if part == "head" else self.body

    def of(self, state: StateDict, part: str) -> StateDict:
        """The entries of ``state`` in ``part`` (state's order kept)."""
        keys = self.keys(part)
        return {k: v for k, v in state.items() if k in keys}


def head_prefix(model: nn.Module, head: str | None = None) -> str:
    """The module name of the head: ``head`` if given, else a declared head, else the last Linear."""
    if head:
        return head
    for name in DECLARED_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    try:
        linear = last_linear(model)
    except ValueError as err:
        raise ValueError(f"{type(model).__name__} declares no head ({' or '.join(DECLARED_HEADS)} "
                         "attribute) and has no nn.Linear: name its head with strategy.head="
                         "<module name>") from err
    return next(name for name, m in model.named_modules() if m is linear)


def split_model(model: nn.Module, head: str | None = None) -> Split:
    """The body/head split of ``model`` (see the module docstring for how the head is found)."""
    prefix = head_prefix(model, head)
    modules = dict(model.named_modules())
    if prefix not in modules:
        names = [n for n in modules if n and "." not in n]
        raise ValueError(f"strategy.head={prefix!r} names no module of {type(model).__name__}; "
                         f"its top-level modules: {names}")
    keys = list(model.state_dict())
    head_keys = frozenset(k for k in keys if k.startswith(f"{prefix}."))
    body_keys = frozenset(k for k in keys if k not in head_keys)
    if not any(p.requires_grad for p in modules[prefix].parameters()):
        raise ValueError(f"the head {prefix!r} of {type(model).__name__} has no parameters")
    if not body_keys:
        raise ValueError(f"the head {prefix!r} is all of {type(model).__name__}: there is no body "
                         "to share or keep (a body/head method needs a model with a feature "
                         "extractor before its classifier)")
    return Split(prefix, head_keys, body_keys)


@contextmanager
def trainable(model: nn.Module, keys: frozenset[str] | set[str]) -> Iterator[nn.Module]:
    """Within the block only the parameters named in ``keys`` take gradients (the others are
    frozen: SGD skips a parameter without a gradient); every flag is restored after, since
    client halves reuse model instances across calls.

    Buffers are not parameters: BatchNorm running statistics of a frozen part still follow the
    batches in train mode (as in PFLlib's FedRep and FedBABU clients).
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in keys)
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
