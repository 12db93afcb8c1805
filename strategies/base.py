"""The server half of a method: the steps it overrides, with FedAvg's behaviour by default.

A method is driven by the round engine (task/engine/rounds.py), which a method never imports:
the engine samples clients, builds one message per client from the steps below, validates
every reply, applies the threat model (task/threat/) and calls ``aggregate_replies``, then
evaluates and checkpoints. A round, in the order the engine calls the steps:

- ``train_arrays(cid, round)`` / ``train_config(cid, round)``: what client ``cid`` is sent;
- ``expected_upload(cid, sent)``: keys, shapes and dtypes a valid reply must carry;
- ``upload_reference(reply, sent)``: what an upload is relative to (for the attacks);
- ``aggregate_replies(round, replies)``: update the server state from the valid replies;
- ``personalize_arrays(cid, round)`` / ``personalize_config``: an optional phase after it;
- ``eval_arrays(cid)``: what a client needs to score its personal model;
- ``new_client_arrays`` / ``_config`` / ``_extra``: what a held-out client that never trained
  adapts from after the last round (``new_clients=F``; default: what training would send);
- ``round_metrics(round)``: extra per-round values for metrics.jsonl;
- ``state_arrays`` / ``state_scalars`` / ``load_state``: the state a checkpoint keeps;
- ``plot(rows, directory)``: the method's own figures.

docs/architecture.md has a template method file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from task.algorithms import robust
from task.core.messages import RoundStats, Spec, TrainReply, array_spec
from task.core.params import StateDict, model_state, weighted_mean

STEP = "aggregate-step-"  # checkpoint group of a slot's last aggregate step


class Method:
    """A method's server half (FedAvg's behaviour by default)."""

    name: ClassVar[str] = ""
    # Whether a single global model exists whose accuracy the clients can report.
    has_global_model: ClassVar[bool] = True
    # Whether clients keep state between rounds (personal models, BN statistics, duals): a
    # resume is then refused unless that state was kept on disk (task/run/door.py).
    keeps_client_state: ClassVar[bool] = False
    # Whether a client uploads an update (a difference of models: LG-Mix, clustered) rather
    # than its trained model; attacks build a malicious update and send it in that form.
    upload_is_update: ClassVar[bool] = False
    # Why the method cannot personalize a client that never trained (``new_clients=F``; the door
    # refuses it with this reason), or None where it can.
    new_client_problem: ClassVar[str | None] = None

    def __init__(self, cfg: DictConfig, initial_state: StateDict, partition_sizes: list[tuple[int, int]]):
        self.cfg = cfg
        self.global_state: StateDict = {k: v.clone() for k, v in initial_state.items()}
        self.partition_sizes = partition_sizes
        self.num_clients = len(partition_sizes)
        # Ground-truth domain/cluster of every client and the groups' names (partition.json).
        self.client_groups: list[int] = []
        self.group_names: list[str] = []
        # Clients scored but left out of every summary (the threat model's Byzantine clients).
        self.excluded_clients: set[int] = set()
        # The round's counters; the engine gives each round a fresh one.
        self.stats = RoundStats()
        # slot -> the last step of that slot's aggregate (where centered clipping starts).
        self.aggregate_steps: dict[str, StateDict] = {}

    @classmethod
    def from_model(cls, cfg: DictConfig, model: torch.nn.Module,
                   partition_sizes: list[tuple[int, int]]) -> Method:
        """The method for a run whose initial model is ``model``."""
        return cls(cfg, model_state(model), partition_sizes)

    # --- training -----------------------------------------------------------------------
    def train_arrays(self, cid: int, server_round: int) -> StateDict:
        """Arrays sent to client ``cid`` for training (default: the global model)."""
        return self.global_state

    def train_config(self, cid: int, server_round: int) -> dict[str, Any]:
        """Per-client config values sent with the training message."""
        return {}

    def expected_upload(self, cid: int, sent: StateDict) -> Spec:
        """Keys, shapes and dtypes a valid reply carries (default: what was sent)."""
        return array_spec(sent)

    def upload_reference(self, reply: TrainReply, sent: StateDict) -> StateDict | None:
        """What the reply's upload is relative to (None: the upload is the update itself);
        the server-side attacks build their update against it. Default: what was sent."""
        return None if self.upload_is_update else sent

    def aggregate_replies(self, server_round: int, replies: list[TrainReply]) -> None:
        """Update the server state (default: w_g <- sum_j p_j w_j over the replies, or the
        configured robust aggregator, centred on the current w_g)."""
        merged = self.aggregate([r.arrays for r in replies], [r.num_examples for r in replies],
                                center=self.global_state)
        self.global_state.update(merged)

    def aggregate(self, states: list[StateDict], weights: list[float],
                  center: StateDict | None = None, slot: str = "global") -> StateDict:
        """The configured aggregator (``aggregator=``, task/algorithms/robust.py) over uploads.

        Every averaging of uploads goes through here. ``mean`` (the default) is exactly
        ``weighted_mean``; ``center`` is the previous aggregate. The uploads it discarded or
        clipped are counted in the round's ``discarded_uploads``.

        Centered clipping and threshold clustering start from the previous aggregate *update*
        (Karimireddy, He, Jaggi 2021: v_0 = the last round's aggregate, their momentum): for a
        method that uploads models, ``center`` is the model the clients started from (w_g), so
        they start at ``center`` plus the step the aggregate took the last time it was made
        for ``slot`` (a cluster's model has its own slot); starting at w_g itself, i.e. at a zero
        update, would shrink every honest update longer than tau towards zero.
        """
        config = self.cfg.get("aggregator")
        name = "mean" if config is None else str(config.name)
        if name == "mean":
            return weighted_mean(states, weights)
        start = center
        stepped = name in robust.FROM_PREVIOUS and center is not None and not self.upload_is_update
        if stepped and slot in self.aggregate_steps:
            step = self.aggregate_steps[slot]
            start = {**center, **{k: center[k] + d.to(center[k]) for k, d in step.items()}}
        merged, discarded = robust.aggregate_states(name, states, weights, dict(config), start)
        if stepped:
            self.aggregate_steps[slot] = {k: merged[k] - center[k] for k, v in center.items()
                                          if v.is_floating_point()}
        self.stats.discarded += discarded
        return merged

    # --- after aggregation ----------------------------------------------------------------
    def personalize_arrays(self, cid: int, server_round: int) -> StateDict | None:
        """Arrays for an optional phase after aggregation (None: no such phase).

        Where it returns arrays for a client that trained this round, that client gets a
        ``train.personalize`` message carrying them and ``personalize_config(cid, round)``,
        and its client half's ``personalize`` updates its personal state (e.g. LG-Mix's
        mixing of the local and the aggregated update).
        """
        return None

    def personalize_config(self, cid: int, server_round: int) -> dict[str, Any]:
        return {}

    def eval_arrays(self, cid: int) -> StateDict:
        """Arrays a client needs to score its personal model (default: the global model)."""
        return self.global_state

    # --- new clients (new_clients=F) -------------------------------------------------------
    def new_client_arrays(self, cid: int, server_round: int) -> StateDict:
        """What a new client adapts from after the last round (default: its training arrays);
        its client half's ``adapt`` gets them."""
        return self.train_arrays(cid, server_round)

    def new_client_config(self, cid: int, server_round: int) -> dict[str, Any]:
        return self.train_config(cid, server_round)

    def new_client_extra(self, cid: int) -> StateDict:
        """Arrays for a method's phase after a new client's own training (default: none)."""
        return {}

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra per-round values written to metrics.jsonl."""
        return {}

    # --- checkpoints and figures ------------------------------------------------------------
    def state_arrays(self) -> dict[str, StateDict]:
        """The method's array state for its checkpoint (models, corrections, centres)."""
        steps = {f"{STEP}{slot}": step for slot, step in self.aggregate_steps.items()}
        return {"global": self.global_state, **steps}

    def state_scalars(self) -> dict[str, Any]:
        """The method's JSON-able state for its checkpoint (running means, counters)."""
        return {}

    def load_state(self, arrays: dict[str, StateDict], scalars: dict[str, Any]) -> None:
        """Restore what ``state_arrays`` and ``state_scalars`` returned."""
        self.global_state = arrays["global"]
        self.aggregate_steps = {g[len(STEP):]: s for g, s in arrays.items() if g.startswith(STEP)}

    def plot(self, rows: list[dict], directory: Path) -> list[Path]:
        """Method-specific PNGs from the run's metrics rows (none by default)."""
        return []
