"""Every method under every attack and every aggregator: one in-process round each (the real
round engine and ClientApp handlers), or a refusal at the door that says why. Slow-marked
(13 rounds a method, ~1-2 s each on 2 cores); CI runs it.

A new method is in the matrix as soon as it is registered."""

from __future__ import annotations

import math

import pytest
import torch

from strategies import REGISTRY
from task.algorithms.robust import AGGREGATORS
from task.data.load import load_federation
from task.engine.rounds import Engine
from task.run.combinations import combination_problem
from task.run.config import ConfigError, compose_config
from task.threat.attacks import ATTACKS

from .fake_grid import FakeGrid
from .helpers import server

# 6 clients (2 domains x 3): enough uploads a round for every aggregator's defaults (Krum's
# n - f - 2 >= 1, trimmed mean's floor(0.2 n) >= 1), and one Byzantine client at fraction 0.2.
SIX = ("dataset.domains=[plain,inverted] dataset.clients_per_domain=3 dataset.image_size=16 "
       "local_epochs=1 batch_size=32")
METHODS = sorted(REGISTRY)
# What the door refuses, by (method, attack or aggregator): nothing else may be refused.
REFUSED = {
    **{("local", a): "never aggregates" for a in ATTACKS if a != "none"},
    **{("local", g): "never aggregates" for g in AGGREGATORS if g != "mean"},
    **{("clustered_per_client", g): "threshold clustering" for g in AGGREGATORS if g != "mean"},
    **{("clustered", g): "strategy.aggregate=aggregator" for g in AGGREGATORS if g != "mean"},
}


# Attacks whose round is also evaluated (the others test training and aggregation only).
EVALUATED = ("gaussian", "ipm")
# Per method, what makes its one round cheap without changing what it exercises.
LIGHT = {"pfml": "strategy.K=1 strategy.local_iterations=2",
         "pfedme": "strategy.K=1 strategy.local_iterations=2", "perfedavg": "strategy.local_steps=2"}


def one_round(overrides: str, evaluate: bool = True) -> dict:
    method = overrides.split()[0].removeprefix("strategy=")
    overrides = f"{overrides} {LIGHT.get(method, '')}".strip()
    cfg = compose_config(f"{SIX} {overrides}")
    federation = load_federation(cfg, torch.device("cpu"))
    problem = combination_problem(cfg, federation)
    if problem is not None:
        raise ConfigError(problem)
    engine = Engine(server(cfg))
    grid = FakeGrid(6, f"{SIX} {overrides}")
    engine.discover(grid, 30)
    return engine.run_round(grid, 1, timeout=60, evaluate=evaluate)


def check(method: str, extra: str, key: tuple[str, str], evaluate: bool) -> None:
    overrides = f"strategy={method} {extra}"
    if key in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[key]):
            one_round(overrides, evaluate)
        return
    row = one_round(overrides, evaluate)
    assert row["rejected_replies"] == 0, row
    assert row["train_loss"] is not None and math.isfinite(row["train_loss"])
    if evaluate:
        assert row["personalized_accuracy"] is not None and row["evaluated_clients"] == 6


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "none"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_every_method_under_every_attack(method, attack):
    check(method, f"attack={attack}", (method, attack), evaluate=attack in EVALUATED)


@pytest.mark.parametrize("aggregator", [g for g in AGGREGATORS if g != "mean"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_every_method_with_every_aggregator(method, aggregator):
    # Aggregation is what an aggregator changes: the round is not evaluated.
    check(method, f"aggregator={aggregator}", (method, aggregator), evaluate=False)


@pytest.mark.parametrize("overrides,words", [
    ("strategy=fedavg attack=gaussian attack.fraction=0.6", "majority"),
    ("strategy=fedavg aggregator=krum fraction_train=0.34", "at least 3 uploads"),
    ("strategy=fedavg aggregator=bulyan fraction_train=0.34", "at least 3 uploads"),
    ("strategy=fedavg aggregator=trimmed_mean aggregator.beta=0.1", "plain mean"),
    ("strategy=fedbn model=mlp", "has none"),
])
def test_combinations_that_mean_nothing_are_refused(overrides, words):
    cfg = compose_config(f"{SIX} {overrides}")
    problem = combination_problem(cfg, load_federation(cfg, torch.device("cpu")))
    assert problem is not None and words in problem
    assert problem.count(". ") == 0  # one sentence


def test_the_sensible_neighbours_are_not_refused():
    for overrides in ("strategy=fedavg attack=none attack.fraction=0.6", "strategy=fedbn",
                      "strategy=clustered aggregator=median strategy.aggregate=aggregator",
                      "strategy=fedavg aggregator=krum"):
        cfg = compose_config(f"{SIX} {overrides}")
        assert combination_problem(cfg, load_federation(cfg, torch.device("cpu"))) is None, overrides
