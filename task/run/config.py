"""Hydra composition of the run config, and its declared validation schema.

The ServerApp and every ClientApp process compose the same config from ``conf/`` with the
overrides carried in Flower's run config (key ``overrides``), then validate it against the
schema declared here and by each strategy module (``CONFIG_SCHEMA``).
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from task.run.schema import (
    COUNT,
    FRACTION,
    POSITIVE,
    STRATEGY_SCHEMAS,
    VAL_FRACTION,
    Field,
    Mapping,
    Schema,
    Sizes,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("strategy", "dataset", "partition", "model", "aggregator", "attack")
# A group of which a run may select several options (``logger=[tensorboard,mlflow]``): each
# option's file holds one key below ``logger``, so the selected ones merge side by side.
LOGGER = "logger"
# Paper presets: ``+experiment=NAME`` merges conf/experiment/NAME.yaml (``# @package _global_``)
# over the defaults; later overrides on the same command line still win.
PRESETS = "experiment"


class ConfigError(ValueError):
    """A run config that cannot be used: the message names the key and what is valid."""


SOURCE_FIELDS: Schema = {"name": Field(str), "data_root": Field(str), "download": Field(bool),
                         "normalize": Field(str, choices=("symmetric", "unit", "standard"))}

# dataset=folder (an image folder; task/data/image_folder.py) and dataset=hf (a local Hugging
# Face dataset; task/data/hf_source.py).
_IMAGES: Schema = {"name": Field(str), "path": Field(str), "image_size": Field(int, 4, 512, nullable=True),
                   "channels": Field(int, 1, 3, nullable=True),
                   "test_fraction": Field(float, 0.0, 1.0, low_open=True, high_open=True),
                   "normalize": SOURCE_FIELDS["normalize"]}
OWN_DATA_SCHEMAS: dict[str, Schema] = {
    "folder": _IMAGES,
    "hf": {**_IMAGES, "image_column": Field(str, nullable=True), "label_column": Field(str, nullable=True),
           "domain_column": Field(str, nullable=True), "train_split": Field(str), "test_split": Field(str)},
}

TOP_SCHEMA: Schema = {
    "num_rounds": COUNT,
    "backend": Field(str, choices=("flwr", "local")),
    "seed": Field(int, 0),
    "output_dir": Field(str),
    "fraction_train": FRACTION,
    "participation": Field(str, choices=("fixed", "bernoulli")),
    "clients_per_round": Field(int, 1, nullable=True),
    "local_epochs": COUNT,
    "batch_size": COUNT,
    # Above 10, plain SGD on these models overflows in the first steps (lr=1e308 used to end in
    # ~165 lines of Ray tracebacks): refused at the door instead of failing in every ClientApp.
    "lr": Field(float, 0.0, 10.0, low_open=True),
    "eval_every": COUNT,
    "eval_fraction": FRACTION,
    "new_clients": Field(float, 0.0, 1.0, high_open=True),
    "device": Field(str, choices=("auto", "cpu", "cuda")),
    "deterministic": Field(bool),
    "reuse_freed_memory_mb": Field(int, 0),
    "node_wait_timeout": POSITIVE,
    "round_timeout": POSITIVE,
    "node_messages": Field(str, choices=("bundled", "per_client")),
    "min_replies": COUNT,
    "client_threads": Field(int, 0),
    "resume": Field(str),
    "client_state_dir": Field(str),
    "momentum": Field(float, 0.0, 1.0, high_open=True),
    "weight_decay": Field(float, 0.0),
    "lr_decay": Field(float, 0.0, 1.0, low_open=True),
    "drop_last": Field(bool),
}

GROUP_SCHEMAS: dict[str, dict[str, Schema]] = {
    "strategy": STRATEGY_SCHEMAS,
    "dataset": {
        "digits": {
            "name": Field(str),
            "domains": Field(list),
            "clients_per_domain": COUNT,
            "image_size": Field(int, 8, 64),
            "test_fraction": Field(float, 0.0, 1.0, low_open=True, high_open=True),
        },
        **{name: dict(SOURCE_FIELDS) for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn",
                                                   "usps")},
        "digits5": {
            **SOURCE_FIELDS,
            "domains": Field(list),
            "image_size": Field(int, 8, 64),
            "percent": Field(float, 0.0, 1.0, low_open=True, nullable=True),
        },
        "mnist5k": {**SOURCE_FIELDS, "test_fraction": Field(float, 0.0, 1.0, low_open=True, high_open=True)},
        # The natural federations (task/data/leaf.py) and Tiny-ImageNet: local files only.
        **{name: {"name": Field(str), "data_root": Field(str), "layout": Field(str, choices=("leaf", "hf")),
                  "max_users": Field(int, 1, nullable=True),
                  "test_fraction": Field(float, 0.0, 1.0, low_open=True, high_open=True),
                  **({"normalize": SOURCE_FIELDS["normalize"]} if name == "femnist" else {})}
           for name in ("femnist", "shakespeare")},
        "tiny_imagenet": {"name": Field(str), "data_root": Field(str),
                          "normalize": SOURCE_FIELDS["normalize"], "image_size": Field(int, 8, 256),
                          "train_per_class": Field(int, 1, nullable=True)},
        **OWN_DATA_SCHEMAS,
    },
    "partition": {
        "domains": {"name": Field(str), "clients_per_domain": Field(int, 1, nullable=True),
                    "val_fraction": VAL_FRACTION},
        "iid": {"name": Field(str), "num_clients": COUNT, "val_fraction": VAL_FRACTION},
        "dirichlet": {"name": Field(str), "num_clients": COUNT, "alpha": POSITIVE,
                      "min_partition_size": Field(int, 0), "self_balancing": Field(bool),
                      "val_fraction": VAL_FRACTION},
        "pathological": {"name": Field(str), "num_clients": COUNT, "classes_per_client": COUNT,
                         "val_fraction": VAL_FRACTION},
        "rotation": {"name": Field(str), "num_clients": COUNT, "num_clusters": Field(int, 1, 4),
                     "val_fraction": VAL_FRACTION},
        "relabel": {"name": Field(str), "num_clients": COUNT, "num_clusters": COUNT,
                    "val_fraction": VAL_FRACTION},
        "class_groups": {"name": Field(str), "num_clients": COUNT, "num_clusters": COUNT,
                         "val_fraction": VAL_FRACTION},
        "file": {"name": Field(str), "path": Field(str), "val_fraction": VAL_FRACTION},
        "natural": {"name": Field(str), "val_fraction": VAL_FRACTION},
    },
    # Robust aggregation of uploads (task/algorithms/robust.py), Byzantine attacks (task/threat/).
    "aggregator": {
        "mean": {"name": Field(str)},
        "median": {"name": Field(str)},
        "trimmed_mean": {"name": Field(str), "beta": Field(float, 0.0, 0.5, high_open=True)},
        "krum": {"name": Field(str), "byzantine_fraction": Field(float, 0.0, 0.5, high_open=True)},
        "multi_krum": {"name": Field(str), "byzantine_fraction": Field(float, 0.0, 0.5, high_open=True),
                       "m": Field(int, 1, nullable=True)},
        "bulyan": {"name": Field(str), "byzantine_fraction": Field(float, 0.0, 0.25, high_open=True)},
        "centered_clipping": {"name": Field(str), "tau": POSITIVE, "iterations": COUNT},
        "threshold_clustering": {"name": Field(str), "quantile": Field(float, 0.0, 1.0, low_open=True,
                                                                       high_open=True),
                                 "iterations": COUNT},
    },
    "attack": {
        "none": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True)},
        "gaussian": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True),
                     "mean": Field(float), "std": Field(float, 0.0)},
        "signflip": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True),
                     "scale": POSITIVE},
        "labelflip": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True)},
        "bitflip": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True),
                    "honest": Field(str, choices=("random", "first"))},
        "alie": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True),
                 "z": Field(float, nullable=True), "z_rule": Field(str, choices=("baruch", "prfl"))},
        "ipm": {"name": Field(str), "fraction": Field(float, 0.0, 1.0, high_open=True), "eps": POSITIVE},
    },
    "model": {
        "digit_cnn": {"name": Field(str), "width": Field(float, 0.0, 4.0, low_open=True)},
        "mlp": {"name": Field(str), "hidden": Sizes()},
        "cnn": {"name": Field(str)},
        "lenet5": {"name": Field(str)},
        "fedavg_cnn": {"name": Field(str)},
        "resnet18_gn": {"name": Field(str), "groups": COUNT, "width": Field(float, 0.0, 4.0, low_open=True)},
        "logreg": {"name": Field(str)},
        "char_lstm": {"name": Field(str), "embedding": COUNT, "hidden": COUNT, "layers": COUNT},
        "custom": {"name": Field(str), "target": Field(str), "kwargs": Mapping()},
    },
}


# logger option -> its keys (conf/logger/<option>.yaml; none.yaml adds no key).
LOGGER_SCHEMAS: dict[str, Schema] = {
    "tensorboard": {"dir": Field(str)},
    "wandb": {"project": Field(str), "mode": Field(str, choices=("offline", "online"))},
    "mlflow": {"experiment": Field(str), "tracking_uri": Field(str)},
}


def split_overrides(overrides: str) -> list[str]:
    """Split the ``overrides`` string of the run config like a shell would."""
    return shlex.split(overrides or "")


@lru_cache(maxsize=8)
def compose_config(overrides: str = "") -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; refuse unknown names with the choices.

    Cached per process: composition costs tens of milliseconds and the config never changes
    within a run.
    """
    # Hydra is imported here, not at module level: a deployed ClientApp reading its cached
    # config (task/data/node_cache.py) then never imports it.
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    import strategies

    strategies.load_all()  # each strategy module declares its schema on import
    args = split_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (MissingConfigException, ConfigCompositionException) as err:
        raise ConfigError(_explain(err, args)) from None
    OmegaConf.set_readonly(cfg, True)
    validate(cfg)
    return cfg


def _explain(err: Exception, args: list[str]) -> str:
    text = str(err)
    unknown = re.search(r"Could not override '(\w+)\.([\w.]+)'", text)
    if unknown and unknown.group(1) in GROUPS:
        return _explain_group_key(unknown.group(1), unknown.group(2), args)
    if unknown and unknown.group(1) == LOGGER:
        return _explain_logger_key(unknown.group(2), args)
    for group in (*GROUPS, LOGGER, PRESETS):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        if f"'{group}/" in text or f"'{group}'" in text:
            return f"{text}\nValid choices for '{group}': {', '.join(options)}"
    top = ", ".join(sorted(TOP_SCHEMA)) + ", " + ", ".join((*GROUPS, LOGGER))
    return (f"{text}\nOverrides given: {args}\nValid top-level keys: {top}; "
            f"presets: +{PRESETS}=<{'|'.join(available_presets())}>")


def _explain_group_key(group: str, key: str, args: list[str]) -> str:
    """An unknown key of a config group, answered with that group's own keys."""
    rest = [a for a in args if not a.split("=", 1)[0].lstrip("+~").startswith(f"{group}.")]
    try:
        option = str(compose_config(" ".join(shlex.quote(a) for a in rest))[group].name)
    except ConfigError:
        option = next((a.split("=", 1)[1] for a in args if a.startswith(f"{group}=")), "?")
    keys = sorted(k for k in GROUP_SCHEMAS.get(group, {}).get(option, {}) if k != "name")
    valid = ", ".join(keys) if keys else "none besides name"
    return f"unknown key {group}.{key} for {group}={option}; its keys: {valid}"


def _explain_logger_key(key: str, args: list[str]) -> str:
    """An override of a key below ``logger``: a tracker not selected, or not one of its keys."""
    tracker, _, rest = key.partition(".")
    choices = ", ".join(sorted(LOGGER_SCHEMAS))
    if tracker not in LOGGER_SCHEMAS:
        return f"logger.{key}: there is no logger {tracker!r}; the loggers: {choices}"
    chosen = [a.split("=", 1)[1] for a in args if a.startswith(f"{LOGGER}=")]
    if not any(tracker in c for c in chosen):
        return (f"logger.{key} is a key of logger={tracker}, which this run does not select: add "
                f"logger={tracker} (several at once: logger=[tensorboard,{tracker}])")
    return (f"unknown key logger.{key} for logger={tracker}; its keys: "
            f"{', '.join(sorted(LOGGER_SCHEMAS[tracker]))}")


def available_presets() -> list[str]:
    """The paper presets in conf/experiment/ (``+experiment=NAME``)."""
    return sorted(p.stem for p in (CONF_DIR / PRESETS).glob("*.yaml"))


def validate(cfg: DictConfig) -> None:
    """Check every key against its declared schema; raise one ConfigError listing all problems."""
    problems = _check_section("", OmegaConf.to_container(cfg, resolve=True), TOP_SCHEMA, (*GROUPS, LOGGER))
    problems += _check_loggers(OmegaConf.to_container(cfg, resolve=True).get(LOGGER) or {})
    for group in GROUPS:
        section = OmegaConf.to_container(cfg[group], resolve=True)
        name = section.get("name")
        schemas = GROUP_SCHEMAS.get(group, {})
        if name not in schemas:
            problems.append(f"{group}.name={name!r} is not one of {sorted(schemas)}")
            continue
        problems += _check_section(f"{group}.", section, schemas[name], ())
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_loggers(section: dict) -> list[str]:
    """The selected loggers' keys (``+logger.X=...`` could add a tracker no file declares)."""
    problems = []
    for tracker, keys in section.items():
        if tracker not in LOGGER_SCHEMAS:
            problems.append(f"logger.{tracker} is not a logger; the loggers: {sorted(LOGGER_SCHEMAS)}")
        elif not isinstance(keys, dict):
            problems.append(f"logger.{tracker}={keys!r}: expected its keys {sorted(LOGGER_SCHEMAS[tracker])}")
        else:
            problems += _check_section(f"logger.{tracker}.", keys, LOGGER_SCHEMAS[tracker], ())
    return problems


def _check_section(prefix: str, section: dict, schema: Schema, skip: tuple[str, ...]) -> list[str]:
    problems = []
    for key, value in section.items():
        if key in skip:
            continue
        field = schema.get(key)
        if field is None:
            problems.append(f"unknown key {prefix}{key}; valid keys: {sorted(schema)}")
        elif not field.accepts(value):
            problems.append(f"{prefix}{key}={value!r}: expected {field.describe()}")
    return problems
