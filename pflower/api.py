"""``pflower.run``: one run, checked at pflower-sim's door, on the local backend or ``flwr run``.

Both backends write the same outputs folder (``output_dir``; empty: ``outputs/<time>-...``
below the working directory) and give the same numbers for the same seed; ``run`` returns what
its results.json holds, plus the per-round rows of its metrics.jsonl (``"rounds"``) and the
folder (``"output_dir"``). Bad input raises before anything runs, with pflower-sim's message:
``task.run.config.ConfigError`` (a ValueError) for the config, ``RunFolderError`` for the
folder. A run that fails raises ``RunError``; Ctrl-C (a notebook's interrupt) stops the run
before its next message and raises KeyboardInterrupt, the folder resumable (``resume=<dir>``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from task.run.config import CONF_DIR, GROUPS, LOGGER, ConfigError, compose_config

if TYPE_CHECKING:
    from rich.console import Console

BACKENDS = ("local", "flwr")
Overrides = str | Sequence[str] | DictConfig | Mapping[str, Any] | None


class RunError(RuntimeError):
    """A run that started and failed (or could not start): the folder's error, and the folder."""

    def __init__(self, message: str, output_dir: Path | None = None):
        super().__init__(message)
        self.output_dir = output_dir


def config(overrides: Overrides = None) -> DictConfig:
    """The composed, validated config of ``overrides``, as a copy one may change and pass to ``run``."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose_config(overrides_text(overrides)), resolve=True))
    assert isinstance(cfg, DictConfig)
    return cfg


def overrides_text(overrides: Overrides) -> str:
    """Overrides in any accepted form as the one string the ServerApp composes (shell quoting)."""
    if overrides is None:
        return ""
    if isinstance(overrides, str):
        return overrides
    if isinstance(overrides, DictConfig | Mapping):
        return shlex.join(overrides_of(overrides))
    if not isinstance(overrides, Sequence) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(f"overrides must be a string, a list of strings or a config, not {overrides!r}")
    from task.run.launch import join_overrides

    return join_overrides(list(overrides))


def overrides_of(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """Hydra overrides that compose to ``cfg``: each group's option (the conf file whose keys and
    name it has) and every value. A partial mapping gives overrides of what it holds
    (``{"strategy": "ditto", "strategy.lam": 0.5, "num_rounds": 3}``)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    found = []  # a mapping inside a section (model.kwargs) is one value: its keys need not be in conf/
    for group in GROUPS:
        section = data.pop(group, None)
        if section is None:
            continue
        if not isinstance(section, Mapping):  # an option's name
            found.append(f"{group}={section}")
            continue
        found.append(f"{group}={group_option(group, section)}")
        found += [f"{group}.{key}={hydra_value(value)}" for key, value in section.items()]
    trackers = data.pop(LOGGER, None)  # the group of which several options merge side by side
    if trackers is not None:
        found.append(f"{LOGGER}=[{','.join(trackers) or 'none'}]")
        found += [f"{LOGGER}.{name}.{key}={hydra_value(value)}"
                  for name, section in trackers.items() for key, value in section.items()]
    return found + [f"{key}={hydra_value(value)}" for key, value in data.items()]


def group_option(group: str, section: Mapping[str, Any]) -> str:
    """The conf/<group>/ option with ``section``'s name and keys (its values matter only
    between options that share both, as digit_cnn and digit_cnn_small do)."""
    candidates = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        if option.get("name") == section.get("name") and set(option) == set(section):
            same = sum(option[k] == section[k] for k in option)
            candidates.append((same, path.stem == section.get("name"), path.stem))
    if not candidates:
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}.name={section.get('name')!r} with keys {sorted(section)} is no option "
                          f"of conf/{group}/; valid choices for '{group}': {', '.join(choices)}")
    return max(candidates)[2]


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted, so that "1" or "null" stay strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | ListConfig):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def with_backend(overrides: str, backend: str) -> str:
    """``overrides`` running on ``backend``; a different ``backend=`` in them is refused."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    given = {p.split("=", 1)[1].strip("'\"") for p in shlex.split(overrides) if p.startswith("backend=")}
    if given - {backend}:
        raise ValueError(f"the overrides say backend={sorted(given)[0]} and run() was given "
                         f"backend={backend!r}: give it once")
    return f"{overrides} backend={backend}".strip()


def run(overrides: Overrides = None, backend: str = "local", *, console: Console | None = None,
        cpus: int = 1, gpus: float | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Run one job and return its results (results.json's dict, ``rounds``, ``output_dir``).

    ``overrides``: Hydra overrides as one string (``"strategy=ditto num_rounds=5"``), a list of
    them, or a config (``pflower.config(...)``, changed as one likes; its ``backend`` key is
    replaced by the argument, a different ``backend=`` override refused). ``backend``: ``local``
    (in this process, seconds of start-up) or ``flwr`` (``flwr run``'s simulation; ``cpus``,
    ``gpus`` per ClientApp and ``ray_address`` as pflower-sim's options). ``console``: the rich
    Console the progress display draws on (``Console(quiet=True)``: nothing shown).
    """
    from task.run.launch import door, pin_output_dir, pin_paths

    if isinstance(overrides, DictConfig | Mapping):  # a config always holds a backend: the argument's wins
        overrides = [o for o in overrides_of(overrides) if not o.startswith("backend=")]
    text = pin_output_dir(pin_paths(with_backend(overrides_text(overrides), backend)))
    if backend == "flwr":
        from task.run.launch import flwr_problem

        problem = flwr_problem(ray_address)
        if problem is not None:
            raise RunError(problem)
    clients, directory, done = door(text)
    if done is None and backend == "local":
        _run_local(text, clients, directory, console)
    elif done is None:
        _run_flwr(text, clients, directory, console, cpus, gpus, ray_address)
    return load_results(directory)


def _run_local(overrides: str, clients: int, directory: Path, console: Console | None) -> None:
    from task.run.local import run_local
    from task.run.progress import RunDisplay

    with RunDisplay(int(compose_config(overrides).num_rounds), directory, console) as display:
        outcome = run_local(overrides, clients, directory, display.on_message, display.log_line)
    if outcome.status == "stopped":
        raise KeyboardInterrupt(f"run stopped; resume it with the same overrides plus resume={directory}")
    if outcome.status != "completed":
        raise RunError(f"run failed: {outcome.error}", directory)


def _run_flwr(overrides: str, clients: int, directory: Path, console: Console | None, cpus: int,
              gpus: float | None, ray_address: str | None) -> None:
    from task.run.launch import run_flwr
    from task.run.runfolder import read_status

    status = run_flwr(overrides, clients, directory, cpus, gpus, ray_address, console=console)
    if status in (130, 143):
        raise KeyboardInterrupt(f"run stopped; resume it with the same overrides plus resume={directory}")
    if status != 0:
        error = (read_status(directory) or {}).get("error") or f"pflower-sim's exit status {status}"
        raise RunError(f"run failed: {error}", directory)


def load_results(directory: Path) -> dict[str, Any]:
    """A completed run's results.json, its metrics.jsonl rows (``rounds``) and ``output_dir``."""
    from task.run.outputs import RunOutputs

    directory = Path(directory)
    try:
        results = json.loads((directory / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{directory} holds no readable results.json ({err})", directory) from None
    return {**results, "rounds": RunOutputs(directory).rounds(), "output_dir": directory}
