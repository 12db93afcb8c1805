"""``deterministic``: every process that trains or aggregates applies it before touching CUDA.

The ClientApp handlers and the ServerApp's ``main`` run here in this process (through the
in-process grid); the `flwr run` processes are checked by tests/e2e/test_flwr_run.py, whose
ServerApp log line reports what each ClientApp node said in its identity reply.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from flwr.app import Context, RecordDict

import client_app
import server_app
from task.core.device import CUBLAS_WORKSPACE, apply_determinism, determinism_enabled
from task.engine.rounds import Engine

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg


@pytest.fixture(autouse=True)
def _restore():
    yield
    apply_determinism(True)  # the config's default, as tests/conftest.py sets it


def _spy(monkeypatch, module, name: str) -> list[bool]:
    """Record whether determinism is on each time ``module.name`` (the first step that may start
    CUDA: loading the federation onto the device) is called."""
    seen: list[bool] = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(determinism_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("deterministic", [True, False])
def test_clientapp_applies_the_key_before_loading_its_data(monkeypatch, deterministic):
    apply_determinism(not deterministic)  # the process starts in the other state
    seen = _spy(monkeypatch, client_app, "node_federation")
    overrides = f"{TINY} strategy=fedavg deterministic={str(deterministic).lower()}"
    st = server(tiny_cfg(f"strategy=fedavg deterministic={str(deterministic).lower()}"))
    run = Engine(st)
    grid = FakeGrid(4, overrides)
    run.discover(grid, 10)
    assert run.deterministic_nodes == {100 + p: deterministic for p in range(4)}
    apply_determinism(not deterministic)
    row = run.run_round(grid, 1, timeout=30, evaluate=False)
    assert row["rejected_replies"] == 0
    assert seen and all(s is deterministic for s in seen)  # every training
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    assert torch.backends.cudnn.deterministic is deterministic and not torch.backends.cudnn.benchmark
    if deterministic:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]  # kept if set before, else CUBLAS_WORKSPACE
        assert torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize("deterministic", [True, False])
def test_serverapp_applies_the_key_before_loading_its_data(monkeypatch, tmp_path, deterministic):
    apply_determinism(not deterministic)
    seen = _spy(monkeypatch, server_app, "load_federation")
    flag = str(deterministic).lower()
    overrides = f"{TINY} strategy=fedavg num_rounds=1 deterministic={flag} output_dir={tmp_path}"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"overrides": overrides})
    server_app.main(FakeGrid(4, overrides), context)
    assert seen == [deterministic]
    assert (tmp_path / "results.json").exists()


def test_deterministic_must_be_a_bool():
    with pytest.raises(Exception, match="deterministic"):
        tiny_cfg("deterministic=maybe")


def test_the_cublas_setting_is_kept_when_the_environment_has_one(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    apply_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    apply_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


class _InductorConfigWithout:
    """torch 2.9's ``torch._inductor.config``: no ``deterministic`` flag, and setting an
    unknown key raises, as its config module does."""

    def __setattr__(self, name, value):
        raise AttributeError(f"torch._inductor.config.{name} does not exist")


class _InductorConfigWith:
    deterministic = False  # torch 2.10+: the flag use_deterministic_algorithms also sets


def test_inductor_flag_is_set_only_where_torch_has_one(monkeypatch):
    with_flag = _InductorConfigWith()
    monkeypatch.setitem(sys.modules, "torch._inductor.config", with_flag)
    apply_determinism(True)
    assert with_flag.deterministic is True
    monkeypatch.setitem(sys.modules, "torch._inductor.config", _InductorConfigWithout())
    apply_determinism(True)  # raised AttributeError with torch 2.9.1 before
    assert torch.are_deterministic_algorithms_enabled()
