"""model=custom: one's own nn.Module by model.target and model.kwargs, and every bad one refused at
the door (exit 2) with one sentence naming what is wrong."""

from __future__ import annotations

import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from task.core.custom_model import build_custom
from task.data.load import build_federation
from task.run.combinations import combination_problem
from task.run.door import DoorError, check_model_fits
from task.run.launch import main

from .helpers import TINY, tiny_cfg

NETS = '''
import random

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels, num_classes, hidden=16, act=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), act or nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class Shapes(nn.Module):
    """Records what pflower passed (input_shape, image_size) and nothing it did not name."""

    def __init__(self, input_shape, image_size, num_classes, **extra):
        super().__init__()
        self.seen = (input_shape, image_size, num_classes, extra)
        self.fc = nn.Linear(input_shape[0] * image_size * image_size, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_linear(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


class NoLinear(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class WrongOut(TinyNet):
    def forward(self, x):
        return super().forward(x)[:, :1]


class TupleOut(TinyNet):
    def forward(self, x):
        return super().forward(x), x


class Unseeded(TinyNet):
    def __init__(self, in_channels, num_classes):
        super().__init__(in_channels, num_classes)
        with torch.no_grad():
            self.fc.bias.fill_(random.random())
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "nets.py"
    path.write_text(textwrap.dedent(NETS))
    return path


@pytest.fixture(scope="module")
def tiny_federation():
    return build_federation(tiny_cfg())  # 3x16x16, 10 classes


def _model(target, kwargs=None):
    return OmegaConf.create({"name": "custom", "target": target, "kwargs": kwargs})


def test_the_data_reaches_the_model_only_through_the_parameters_it_names(nets):
    model = build_custom(_model(f"{nets}:Shapes"), (3, 16, 16), 10)
    assert model.seen == ((3, 16, 16), 16, 10, {})
    model = build_custom(_model(f"{nets}:make_linear"), (1, 8, 8), 4)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_module_targets_in_both_spellings_and_hydra_built_kwargs(nets, monkeypatch):
    monkeypatch.syspath_prepend(str(nets.parent))
    for target in ("nets:TinyNet", "nets.TinyNet"):
        kwargs = {"hidden": 5, "act": {"_target_": "torch.nn.GELU"}}
        model = build_custom(_model(target, kwargs), (3, 8, 8), 7)
        assert model.fc.in_features == 5 and isinstance(model.body[1], torch.nn.GELU)


@pytest.mark.parametrize("target,kwargs,words", [
    ("", None, "needs model.target"),
    ("nets.py", None, "names a file; add the class"),
    ("no_such_pkg.nets:Net", None, "no module named 'no_such_pkg'"),
    ("{nets}:Missing", None, "has no 'Missing'; its callables: ["),
    ("{dir}/absent.py:Net", None, "no such file"),
    ("{nets}:TinyNet", {"depth": 3}, "unexpected keyword argument 'depth'"),
    ("{nets}:TinyNet", {"num_classes": 3}, "which pflower passes from the data"),
    ("{nets}:TinyNet", {"act": {"_target_": "torch.nn.Nope"}}, "model.kwargs cannot be built"),
    ("{nets}:TinyNet", {"hidden": "wide"}, "fails: TypeError"),
    ("torch.nn:Identity", None, "has no parameters"),
    ("builtins:dict", None, "not a torch.nn.Module"),
    ("{nets}:WrongOut", None, "gives outputs of shape (2, 1)"),
    ("{nets}:TupleOut", None, "returns tuple, not a floating tensor"),
    ("{nets}:Unseeded", None, "from the same torch seed"),
    ("torch.nn:Linear", {"in_features": 3, "out_features": 10}, "does not fit dataset=digits"),
])
def test_a_bad_model_is_one_sentence_at_the_door(nets, tiny_federation, target, kwargs, words):
    target = target.format(nets=nets, dir=nets.parent)
    cfg = tiny_cfg(f"model=custom model.target='{target}'")
    cfg = OmegaConf.merge(cfg, {"model": {"kwargs": kwargs}})
    with pytest.raises(DoorError) as err:
        check_model_fits(cfg, tiny_federation)
    message = str(err.value)
    assert words in message and "\n" not in message, message


def test_pflower_sim_refuses_it_with_exit_2(nets, capsys):
    assert main(["--dry-run", TINY, "model=custom", f"model.target={nets}:NoSuchNet"]) == 2
    err = capsys.readouterr().err
    assert "has no 'NoSuchNet'" in err and "Traceback" not in err


@pytest.mark.parametrize("strategy,words", [
    ("fedper", "splits the model into a shared and a kept part"),
    ("lgmix", "reads the penultimate features at the input of the last nn.Linear"),
    ("fedbn", "has none, so it would run as FedAvg"),
])
def test_methods_refuse_a_model_without_the_parts_they_need(nets, tiny_federation, strategy, words):
    cfg = tiny_cfg(f"strategy={strategy} model=custom model.target={nets}:NoLinear")
    problem = combination_problem(cfg, tiny_federation)
    assert problem is not None and words in problem and "NoLinear" in problem


def test_body_head_methods_split_a_custom_model_at_its_last_linear(nets, tiny_federation):
    for strategy in ("fedper", "fedrep", "lgfedavg", "fedrod", "lgmix"):
        cfg = tiny_cfg(f"strategy={strategy} model=custom model.target={nets}:TinyNet")
        assert combination_problem(cfg, tiny_federation) is None


def test_model_kwargs_compose_from_the_command_line():
    from task.run.config import ConfigError, compose_config

    cfg = compose_config("model=custom 'model.kwargs={hidden:8,act:{_target_:torch.nn.GELU}}'")
    assert OmegaConf.to_container(cfg.model.kwargs) == {"hidden": 8, "act": {"_target_": "torch.nn.GELU"}}
    with pytest.raises(ConfigError, match=r"model.kwargs=\[1\]: expected a mapping"):
        compose_config("model=custom model.kwargs=[1]")
