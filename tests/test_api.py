"""pflower's Python API (pflower/api.py): the forms overrides take, and bad input refused
before anything runs. A whole run through it: tests/test_examples.py."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import pflower
from pflower.api import group_option, overrides_text, with_backend
from task.run.config import ConfigError, compose_config

from .helpers import TINY


def test_a_changed_config_composes_back_to_itself():
    cfg = pflower.config(f"{TINY} strategy=ditto model=digit_cnn_small output_dir='my runs/a'")
    cfg.lr, cfg.strategy.lam, cfg.model.width = 0.01, 0.3, 0.5
    back = compose_config(overrides_text(cfg))
    assert OmegaConf.to_container(back) == OmegaConf.to_container(cfg)
    assert back.output_dir == "my runs/a" and back.strategy.name == "ditto"


def test_trackers_and_a_custom_models_keyword_arguments_compose_back_too():
    cfg = pflower.config("logger=[tensorboard,mlflow] logger.tensorboard.dir=tb model=custom "
                         "model.target=torch.nn:Linear 'model.kwargs={in_features:4,out_features:2}'")
    assert OmegaConf.to_container(compose_config(overrides_text(cfg))) == OmegaConf.to_container(cfg)


def test_a_list_of_overrides_is_one_string_with_its_spaces_kept():
    text = overrides_text(["num_rounds=2", "output_dir=my runs/b"])
    assert compose_config(text).output_dir == "my runs/b"


def test_a_config_of_no_known_option_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="no option of conf/model/; valid choices for 'model': .*lenet5"):
        group_option("model", {"name": "transformer", "width": 1.0})


def test_backend_is_given_once():
    assert with_backend("num_rounds=2", "local") == "num_rounds=2 backend=local"
    assert with_backend("backend=local", "local").endswith("backend=local")
    with pytest.raises(ValueError, match="backend=flwr and run.. was given backend='local'"):
        with_backend("backend=flwr", "local")
    with pytest.raises(ValueError, match=r"backend='ray' is not one of \['local', 'flwr'\]"):
        pflower.run("num_rounds=1", backend="ray")


def test_bad_input_raises_the_doors_message_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="lr=-1"):
        pflower.run(f"{TINY} lr=-1 output_dir={out}")
    (out / "x.txt").parent.mkdir()
    (out / "x.txt").write_text("not a run")
    with pytest.raises(RuntimeError, match="already holds files"):
        pflower.run(f"{TINY} output_dir={out}")
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]
