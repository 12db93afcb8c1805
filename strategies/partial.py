"""What every partial-sharing method shares: one part of the model is federated, the other
stays on its client (FedPer, FedRep, FedBABU share the body; LG-FedAvg shares the head).

The split is task/core/split.py's (``strategy.head``: the head's module name, or null for
the model's declared head / last Linear). The server holds, sends and averages the shared
part only, so ``train_arrays``, ``expected_upload`` and ``eval_arrays`` cover the shared keys
and bytes_up / bytes_down in metrics.jsonl are those of the shared part. The client keeps
its own part in its personal state (``self.state``: on disk with a state directory, so a
run resumes exactly) and starts it, on first participation, from the run's initial weights
(the same on every client and the server).

Averaging, attacks and aggregators need nothing of their own: the upload is the trained
shared part, relative to the shared part that was sent (Method's default ``upload_reference``),
and ``Method.aggregate_replies`` averages it through ``Method.aggregate``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from task.core.params import StateDict, message_state, model_state
from task.core.split import Split, split_model
from task.run.schema import Field

from .base import Method
from .client_base import ClientMethod

# The config key every partial-sharing method declares: the head's module name (null: auto).
HEAD_KEY = {"head": Field(str, nullable=True)}
PERSONAL = "personal"  # the personal-state name of the part a client keeps
# The split of each (head, model) a process has seen (see ``PartialClient.split``).
_SPLITS: dict[tuple, Split] = {}


def configured_head(cfg) -> str | None:
    head = cfg.strategy.get("head")
    return None if head is None else str(head)


class PartialSharing(Method):
    """Server half: the global state is the shared part only; FedAvg's mean over it."""

    shared: ClassVar[str] = "body"  # "body" or "head"
    keeps_client_state = True
    # No complete model exists on the server: each client completes it with its own part.
    has_global_model = False

    @classmethod
    def from_model(cls, cfg, model, partition_sizes):
        split = split_model(model, configured_head(cfg))
        return cls(cfg, split.of(model_state(model), cls.shared), partition_sizes)


class PartialClient(ClientMethod):
    """Client half: the model is the received shared part plus the kept personal part."""

    shared: ClassVar[str] = "body"

    @property
    def kept(self) -> str:
        """The part that never leaves the client."""
        return "head" if self.shared == "body" else "body"

    def split(self) -> Split:
        """The run's split, found once per process on a model of its own (``self.model`` would
        reset a slot's weights)."""
        key = (configured_head(self.cfg), *self._model_key())
        if key not in _SPLITS:
            _SPLITS[key] = split_model(self.new_model(), key[0])
        return _SPLITS[key]

    def personal_model(self, received: StateDict, slot: str = "main") -> nn.Module:
        """Shared part from ``received``, kept part from the personal state (the run's initial
        weights until the client first trains)."""
        return self.model(slot, {**received, **(self.state.load(PERSONAL) or {})})

    def keep(self, model: nn.Module, split: Split) -> StateDict:
        """Save the kept part to the personal state; return the shared part as the upload."""
        state = model_state(model)
        self.state.save(PERSONAL, split.of(state, self.kept))
        return message_state(split.of(state, self.shared))

    def evaluate(self, received, config):
        return self.report(self.personal_model(received))
