"""The client half every method shares: data, personal state, models and the train/evaluate API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from task.core.models import build_model
from task.core.params import StateDict, load_partial, model_state
from task.core.state import PersonalState
from task.core.training import evaluate, step_generator, train_epochs
from task.data.federation import ClientData, Federation

# Model instances reused across calls in one process (one per slot): building a model costs
# more than loading a state dict into it. Weights are always loaded before use.
_MODELS: dict[tuple, nn.Module] = {}
_INITIAL: dict[tuple, StateDict] = {}


@dataclass
class TrainResult:
    """What a client sends back after training: arrays to upload and scalar metrics."""

    upload: StateDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ClientMethod:
    """Base client half: subclasses implement ``train`` and may override ``evaluate``.

    ``received`` is the state dict the server sent this client (may be empty);
    ``config`` is the message's ConfigRecord as a dict (always has ``server-round``).
    """

    name: ClassVar[str] = ""

    def __init__(self, cfg: DictConfig, cid: int, federation: Federation, state: PersonalState,
                 device: torch.device):
        self.cfg = cfg
        self.cid = cid
        self.federation = federation
        self.data: ClientData = federation.clients[cid]
        self.state = state
        self.device = device

    # --- models -------------------------------------------------------------------------
    def model(self, slot: str = "main", weights: StateDict | None = None) -> nn.Module:
        """A model instance for ``slot``, reset to the run's initial weights, then ``weights``."""
        key = (slot, *self._model_key())
        if key not in _MODELS:
            _MODELS[key] = self.new_model()
        model = _MODELS[key]
        initial = self.initial_state()
        if not weights or not weights.keys() >= initial.keys():  # else ``weights`` overwrite it all
            load_partial(model, initial)
        if weights:
            load_partial(model, weights)
        return model

    def new_model(self) -> nn.Module:
        torch.manual_seed(int(self.cfg.seed))
        return build_model(self.cfg.model, self.federation.input_shape,
                           self.federation.num_classes).to(self.device)

    def initial_state(self) -> StateDict:
        """The run's initial model weights: the same on every client and the server."""
        key = self._model_key()
        if key not in _INITIAL:
            _INITIAL[key] = model_state(self.new_model())
        return _INITIAL[key]

    def _model_key(self) -> tuple:
        return (str(self.cfg.model), self.federation.input_shape, self.federation.num_classes,
                int(self.cfg.seed), str(self.device))

    # --- training helpers ---------------------------------------------------------------
    def generator(self, server_round: int, stream: int = 0) -> torch.Generator:
        return step_generator(int(self.cfg.seed), self.cid, server_round, stream)

    def round_lr(self, server_round: int) -> float:
        """The run's learning rate in ``server_round``: lr * lr_decay**(round - 1)."""
        return float(self.cfg.lr) * float(self.cfg.get("lr_decay", 1.0)) ** (server_round - 1)

    def fit(self, model: nn.Module, server_round: int, *, epochs: int | None = None,
            lr: float | None = None, stream: int = 0, **kwargs: Any) -> float:
        """Train ``model`` on this client's training split with the run's settings.

        The run's ``momentum``, ``weight_decay``, ``drop_last`` and decayed learning rate apply
        unless given here as keyword arguments.
        """
        settings = {"momentum": float(self.cfg.get("momentum", 0.0)),
                    "weight_decay": float(self.cfg.get("weight_decay", 0.0)),
                    "drop_last": bool(self.cfg.get("drop_last", False)), **kwargs}
        return train_epochs(
            model, self.data.x_train, self.data.y_train,
            epochs=int(self.cfg.local_epochs if epochs is None else epochs),
            batch_size=int(self.cfg.batch_size),
            lr=self.round_lr(server_round) if lr is None else float(lr),
            gen=self.generator(server_round, stream), **settings,
        )

    def score(self, model: nn.Module, split: str = "test") -> tuple[float, float]:
        """(loss, accuracy) of ``model`` on this client's ``test`` or ``val`` split."""
        if split == "val":
            if self.data.x_val is None:
                raise ValueError(f"client {self.cid} has no validation split")
            return evaluate(model, self.data.x_val, self.data.y_val)
        return evaluate(model, self.data.x_test, self.data.y_test)

    def report(self, personal: nn.Module, global_model: nn.Module | None = None) -> dict[str, float]:
        """What ``evaluate`` returns: the personal model on the test split and, where the client
        has one, on its validation split (what selects the reported round); the global model
        (if the method has one) on the test split."""
        loss, acc = self.score(personal)
        scores = {"loss": loss, "accuracy": acc}
        if self.data.num_val:
            scores["validation_accuracy"] = self.score(personal, "val")[1]
        if global_model is not None:
            scores["global_accuracy"] = acc if global_model is personal else self.score(global_model)[1]
        return scores

    # --- the API the ClientApp calls ---------------------------------------------------
    def train(self, received: StateDict, config: dict) -> TrainResult:
        raise NotImplementedError

    def personalize(self, received: StateDict, config: dict) -> dict[str, float]:
        """Optional phase after aggregation (see ``Method.personalize_arrays``)."""
        raise NotImplementedError(f"{type(self).__name__} has no personalize phase")

    def adapt(self, received: StateDict, config: dict) -> dict[str, Any]:
        """Personalize a client that never trained, after the last round (``new_clients=F``), from
        the server's ``new_client_arrays``: by default one round of the method's own training,
        which saves the personal state the method keeps; the upload is dropped. Returns the
        training's metrics (for ``adapt_after``); ``evaluate`` then scores the result."""
        return self.train(received, config).metrics

    def adapt_after(self, extra: StateDict, config: dict, metrics: dict[str, Any]) -> None:
        """A new client's phase after ``adapt`` (in a later phase, so it sees what ``adapt``
        saved) where the server sent ``new_client_extra``: by default the method's personalize."""
        self.personalize(extra, config)

    def evaluate(self, received: StateDict, config: dict) -> dict[str, float]:
        """Score the personal model; by default the received model is the personal model."""
        model = self.model("main", received)
        return self.report(model, model)

    # --- Byzantine clients (attack=; task/threat/clients.py) ------------------------------
    def upload_reference(self, received: StateDict, upload: StateDict, config: dict) -> StateDict | None:
        """What the upload's update is relative to (the client-side attacks build theirs against
        it): the received model, or None where the method uploads the update itself
        (``upload-kind=update``)."""
        if config.get("upload-kind") == "update":
            return None
        return {k: received[k] for k in upload}
