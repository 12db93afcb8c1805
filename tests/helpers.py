"""Test helpers: small configs and an in-memory client context without Flower's runtime."""

from __future__ import annotations

import torch
from flwr.app import Context, RecordDict

from strategies import lookup
from task.core.models import build_model
from task.data.load import load_federation
from task.run.config import compose_config

TINY = "dataset.domains=[plain,inverted] dataset.clients_per_domain=2 dataset.image_size=16"
RUN_TINY = f"{TINY} local_epochs=2"  # the whole-run tests' job (in-process and tests/e2e)


def tiny_cfg(extra: str = ""):
    return compose_config(f"{TINY} {extra}".strip())


def make_context(cid: int, state_dir: str | None = None) -> Context:
    node_config = {"partition-id": cid, "num-partitions": 4}
    if state_dir:
        node_config["state-dir"] = state_dir
    return Context(run_id=1, node_id=100 + cid, node_config=node_config, state=RecordDict(),
                   run_config={})


def client(cfg, cid: int, context: Context | None = None, server_round: int = 1, after: bool = False):
    """The client half of cfg's strategy for client ``cid`` on CPU, in one phase of a round.

    ``after=False`` is a training phase (sees state saved before ``server_round``);
    ``after=True`` a later phase of the round (also sees what its training saved).
    """
    from task.core.state import PersonalState

    device = torch.device("cpu")
    fed = load_federation(cfg, device)
    context = context or make_context(cid)
    _, cls = lookup(cfg.strategy.name)
    state = PersonalState(context, cid, device, server_round, after_training=after)
    return cls(cfg, cid, fed, state, device)


def server(cfg):
    fed = load_federation(cfg, torch.device("cpu"))
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, fed.input_shape, fed.num_classes)
    cls, _ = lookup(cfg.strategy.name)
    return cls.from_model(cfg, model, [(c.num_train, c.num_test) for c in fed.clients])


def engine(cfg):
    """The round engine over cfg's method (``engine.method`` is the method)."""
    from task.engine.rounds import Engine

    return Engine(server(cfg))
