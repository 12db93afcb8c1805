"""``model=custom``: the user's own ``nn.Module``, named by ``model.target``, built with ``model.kwargs``.

The contract (docs/own_data.md):

- ``model.target`` names a class or a function that returns an ``nn.Module``: a module path
  with ``:`` or ``.`` before the name (``my_pkg.nets:MyNet``, ``my_pkg.nets.MyNet``), or a
  Python file (``path/to/nets.py:MyNet``). A module must be importable in every process that
  builds the model (``PYTHONPATH`` or ``pip install -e``); a file is read from its path.
- The data's shape reaches it only through the parameters its signature names:
  ``num_classes`` (int), ``in_channels`` (C), ``image_size`` (H) and ``input_shape`` ((C, H, W));
  pflower passes each one the signature has, and nothing else of its own.
- ``model.kwargs`` are the other keyword arguments; a value that is itself a mapping with a
  ``_target_`` is built first by Hydra's ``instantiate`` (``{_target_: torch.nn.GELU}``).
- The model's output is the logits, ``(batch, num_classes)`` (checked at the door).

Every problem is a :class:`ModelSpecError` (a ``ValueError``): one sentence naming the key.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

# What pflower passes a model whose signature names it, from the data's (C, H, W) and classes.
DATA_PARAMETERS = ("num_classes", "in_channels", "image_size", "input_shape")


class ModelSpecError(ValueError):
    """A ``model=custom`` that cannot be built: the message names the key and what to do."""


def split_target(target: str) -> tuple[str, str]:
    """(module or file, attribute) of ``pkg.mod:Name``, ``pkg.mod.Name`` or ``file.py:Name``."""
    if target.endswith(".py"):
        raise ModelSpecError(f"model.target={target!r} names a file; add the class or function after a "
                             f"colon: {target}:MyNet")
    if ":" in target:
        where, _, name = target.rpartition(":")
    else:
        where, _, name = target.rpartition(".")
    if not where or not name.isidentifier():
        raise ModelSpecError(f"model.target={target!r} must name a class or function as my_pkg.nets:MyNet, "
                             "my_pkg.nets.MyNet or path/to/nets.py:MyNet")
    return where, name


def _module_from_file(file: Path, target: str) -> Any:
    if not file.is_file():
        raise ModelSpecError(f"model.target={target!r}: no such file {file}")
    name = "pflower_custom_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:  # one module object per file and process (the door, then the run)
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:
        del sys.modules[name]
        raise ModelSpecError(f"model.target={target!r}: {file} fails on import "
                             f"({type(err).__name__}: {err})") from None
    return module


def _import_module(module: str, target: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModelSpecError(
            f"model.target={target!r}: no module named {err.name!r} here; make {module} importable "
            "(PYTHONPATH=$PWD, or pip install -e your package) or name a file: "
            "model.target=path/to/nets.py:MyNet") from None
    except Exception as err:
        raise ModelSpecError(f"model.target={target!r}: module {module} fails on import "
                             f"({type(err).__name__}: {err})") from None


def resolve_target(target: str) -> Callable[..., Any]:
    """The class or function ``model.target`` names."""
    if not target:
        raise ModelSpecError("model=custom needs model.target=<my_pkg.nets:MyNet or path/to/nets.py:MyNet>")
    where, name = split_target(target)
    is_file = where.endswith(".py") or "/" in where
    module = _module_from_file(Path(where).expanduser(), target) if is_file else _import_module(where, target)
    found = getattr(module, name, None)
    if found is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelSpecError(f"model.target={target!r}: {where} has no {name!r}; its callables: {public}")
    if not callable(found):
        raise ModelSpecError(f"model.target={target!r} is a {type(found).__name__}, not a class or function")
    return found


def data_arguments(factory: Callable[..., Any], input_shape: tuple[int, ...], num_classes: int
                   ) -> dict[str, Any]:
    """The data parameters ``factory``'s signature names, with this data's values."""
    values = {"num_classes": num_classes, "in_channels": input_shape[0],
              "image_size": input_shape[1], "input_shape": tuple(input_shape)}
    names = _signature(factory).parameters
    return {k: v for k, v in values.items() if k in names}


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing of the data's
        return inspect.Signature()


def user_kwargs(model: DictConfig) -> dict[str, Any]:
    """``model.kwargs`` as plain values, nested ``_target_`` mappings built by Hydra."""
    raw = model.get("kwargs") or {}
    kwargs = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw)
    clash = sorted(set(kwargs) & set(DATA_PARAMETERS))
    if clash:
        raise ModelSpecError(f"model.kwargs sets {clash}, which pflower passes from the data; remove "
                             f"{'it' if len(clash) == 1 else 'them'} from model.kwargs")
    if not any(isinstance(v, dict) for v in kwargs.values()):
        return kwargs
    from hydra.utils import instantiate

    try:
        return instantiate(kwargs, _convert_="all")
    except Exception as err:  # hydra's InstantiationException wraps the import or the call
        raise ModelSpecError(f"model.kwargs cannot be built ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None


def build_custom(model: DictConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The user's model, as ``model.target(**model.kwargs, **the data parameters it names)``."""
    target = str(model.get("target") or "")
    factory = resolve_target(target)
    kwargs = user_kwargs(model)
    kwargs.update(data_arguments(factory, input_shape, num_classes))
    try:
        _signature(factory).bind(**kwargs)
    except TypeError as err:
        accepted = [p for p in _signature(factory).parameters if p != "self"]
        raise ModelSpecError(f"model.target={target}: {err} (its parameters: {accepted}; pflower passes "
                             f"those of {list(DATA_PARAMETERS)} it names, model.kwargs the rest)") from None
    try:
        built = factory(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"model.target={target}({_shown(kwargs)}) fails: {type(err).__name__}: "
                             f"{err}") from None
    if not isinstance(built, nn.Module):
        raise ModelSpecError(f"model.target={target} returned a {type(built).__name__}, "
                             "not a torch.nn.Module")
    if not any(True for _ in built.parameters()):
        raise ModelSpecError(f"model.target={target} has no parameters: there is nothing to train")
    return built


def _shown(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def check_same_build(first: nn.Module, second: nn.Module, target: str) -> None:
    """Two builds from the same torch seed must hold the same state: the server and every client
    build their own copy, and only the state dict travels between them."""
    a, b = first.state_dict(), second.state_dict()
    if list(a) != list(b) or any(a[k].shape != b[k].shape for k in a):
        raise ModelSpecError(f"model.target={target} builds models with different state-dict entries from "
                             "the same arguments; every process must build the same layers")
    differ = [k for k in a if not a[k].equal(b[k])]
    if differ:
        raise ModelSpecError(f"model.target={target} builds different initial values of {differ[:3]} from "
                             "the same torch seed: initialise with torch's RNG (torch.nn.init, torch.rand), "
                             "not numpy's or random's, so every process starts from the same model")
