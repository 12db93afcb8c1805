"""Config composition and the declared validation schema."""

from __future__ import annotations

import pytest

from task.run.config import ConfigError, compose_config
from task.run.schema import Field


def test_default_composes_with_every_group():
    cfg = compose_config("")
    assert {"strategy", "dataset", "partition", "model"} <= set(cfg)
    assert cfg.num_rounds >= 1 and cfg.device == "auto"


def test_overrides_apply_like_a_hydra_command_line():
    cfg = compose_config("strategy=ditto num_rounds=5 strategy.lam=0.5")
    assert cfg.strategy.name == "ditto" and cfg.num_rounds == 5 and cfg.strategy.lam == 0.5


@pytest.mark.parametrize(("override", "expected"), [
    ("strategy=nope", "Valid choices for 'strategy'"),
    ("model=nope", "Valid choices for 'model'"),
    ("nope=1", "Valid top-level keys"),
    ("lr=0", "lr=0: expected finite float in (0.0"),
    ("lr=-0.1", "lr=-0.1"),
    ("fraction_train=1.5", "fraction_train=1.5"),
    ("fraction_train=0", "fraction_train=0"),
    ("num_rounds=0", "num_rounds=0"),
    ("local_epochs=0", "local_epochs=0"),
    ("device=tpu", "one of ['auto', 'cpu', 'cuda']"),
    ("strategy=ditto strategy.lam=-1", "strategy.lam=-1"),
    ("+strategy.extra=1", "unknown key strategy.extra"),
])
def test_bad_overrides_are_refused_with_the_valid_choices(override, expected):
    with pytest.raises(ConfigError) as err:
        compose_config(override)
    assert expected in str(err.value)


def test_field_bounds():
    f = Field(float, 0.0, 1.0, low_open=True)
    assert f.accepts(1.0) and f.accepts(1) and not f.accepts(0.0) and not f.accepts(True)
    assert not Field(int, 1).accepts(0.5)
