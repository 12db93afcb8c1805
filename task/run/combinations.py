"""Combinations of method, attack, aggregator and model that would run but mean nothing.

Each is refused at the door (task/run/door.py) with one sentence saying what would happen and
what to do instead. tests/test_matrix.py runs one round of every method under every attack and
every aggregator, and checks that exactly these are refused.
"""

from __future__ import annotations

from omegaconf import DictConfig

from task.algorithms.robust import byzantine_count
from task.core.models import batchnorm_keys, build_model, input_mismatch, last_linear
from task.core.split import split_model
from task.data.federation import Federation
from task.engine.new_clients import new_clients_problem, training_clients
from task.engine.rounds import sample_size
from task.run.config import ConfigError

# Methods that never average uploads through the configured aggregator, and why.
NO_AGGREGATOR = {
    "local": "trains each client alone and never aggregates",
    "clustered_per_client": "aggregates every client's update by its own threshold clustering",
}
KRUM_TYPE = ("krum", "multi_krum")


def combination_problem(cfg: DictConfig, federation: Federation) -> str | None:
    """Why this combination would run without meaning, or None."""
    for check in (_model_takes_the_inputs, _new_clients, _byzantine_majority, _attack_without_aggregation,
                  _aggregator_unused, _too_few_uploads, _fedbn_without_batchnorm, _model_without_parts):
        problem = check(cfg, federation)
        if problem is not None:
            return problem
    return None


def check_combination(cfg: DictConfig, federation: Federation) -> None:
    problem = combination_problem(cfg, federation)
    if problem is not None:
        raise ConfigError(problem)


def check_inputs(cfg: DictConfig, federation: Federation) -> None:
    """Refuse an image model on token sequences and a token model on images (before either is
    built and run on a sample)."""
    problem = _model_takes_the_inputs(cfg, federation)
    if problem is not None:
        raise ConfigError(problem)


def _model_takes_the_inputs(cfg: DictConfig, federation: Federation) -> str | None:
    mismatch = input_mismatch(str(cfg.model.name), tuple(federation.input_shape))
    return None if mismatch is None else f"dataset={cfg.dataset.name}: {mismatch}"


def _attack(cfg: DictConfig) -> str:
    return str(cfg.attack.name) if cfg.get("attack") is not None else "none"


def _aggregator(cfg: DictConfig) -> str:
    return str(cfg.aggregator.name) if cfg.get("aggregator") is not None else "mean"


def _byzantine_majority(cfg: DictConfig, federation: Federation) -> str | None:
    fraction = float(cfg.attack.get("fraction", 0.0)) if cfg.get("attack") is not None else 0.0
    if _attack(cfg) != "none" and fraction >= 0.5:
        return (f"attack.fraction={fraction} makes the Byzantine clients a majority, which no robust "
                "aggregator or clustering method claims to withstand; use attack.fraction < 0.5")
    return None


def _attack_without_aggregation(cfg: DictConfig, federation: Federation) -> str | None:
    if cfg.strategy.name == "local" and _attack(cfg) != "none":
        return (f"strategy=local never aggregates, so attack={_attack(cfg)} could harm no one and its "
                "Byzantine clients would only drop out of the summary; run strategy=local with attack=none")
    return None


def _aggregator_unused(cfg: DictConfig, federation: Federation) -> str | None:
    name, method = _aggregator(cfg), str(cfg.strategy.name)
    if name == "mean":
        return None
    if method in NO_AGGREGATOR:
        return (f"strategy={method} {NO_AGGREGATOR[method]}: aggregator={name} would not be used; "
                "leave aggregator=mean")
    if method == "clustered" and str(cfg.strategy.get("aggregate", "tc")) == "tc":
        return (f"strategy=clustered aggregates each cluster by threshold clustering "
                f"(strategy.aggregate=tc), so aggregator={name} would not be used; add "
                "strategy.aggregate=aggregator to aggregate each cluster with it instead")
    return None


def _new_clients(cfg: DictConfig, federation: Federation) -> str | None:
    from strategies import lookup

    server_cls, _ = lookup(str(cfg.strategy.name))
    return new_clients_problem(cfg, len(federation.clients), server_cls.new_client_problem)


def uploads_per_round(cfg: DictConfig, num_clients: int) -> int:
    """How many clients train in a round (the engine's sample size over the clients that train,
    all but the new ones; the expected count where each client is drawn independently)."""
    num_clients = len(training_clients(cfg, num_clients))
    if cfg.get("participation", "fixed") == "bernoulli":
        return max(1, int(float(cfg.fraction_train) * num_clients))
    return sample_size(cfg, num_clients)


def _too_few_uploads(cfg: DictConfig, federation: Federation) -> str | None:
    name = _aggregator(cfg)
    n = uploads_per_round(cfg, len(federation.clients))
    if name in KRUM_TYPE:
        f = byzantine_count(n, float(cfg.aggregator.byzantine_fraction))
        if n - f - 2 < 1:
            return (f"aggregator={name} scores each upload by its n - f - 2 nearest others, and with "
                    f"n={n} uploads a round and f={f} that is none, so it would keep an arbitrary "
                    f"upload; it needs at least {f + 3} uploads a round (more clients or fraction_train)")
    if name == "bulyan" and n < 3:
        return (f"aggregator=bulyan needs at least 3 uploads a round (it has {n}); with fewer it would "
                "fall back to the median: use aggregator=median, or more clients")
    if name == "trimmed_mean" and int(float(cfg.aggregator.beta) * n) == 0:
        return (f"aggregator=trimmed_mean with beta={cfg.aggregator.beta} trims floor(beta * n) = 0 of "
                f"the {n} uploads a round, so it is the plain mean; raise beta to at least {1 / n:.3g}")
    return None


def _fedbn_without_batchnorm(cfg: DictConfig, federation: Federation) -> str | None:
    if cfg.strategy.name != "fedbn":
        return None
    model = build_model(cfg.model, federation.input_shape, federation.num_classes)
    if not batchnorm_keys(model):
        instead = ("use a model with BatchNorm (model=digit_cnn)" if len(federation.input_shape) == 3
                   else "no token model has BatchNorm: use another method")
        return (f"strategy=fedbn keeps each client's BatchNorm layers local, and model={_model_label(cfg)} "
                f"has none, so it would run as FedAvg; {instead}")
    return None


def _model_label(cfg: DictConfig) -> str:
    return f"custom ({cfg.model.get('target')})" if cfg.model.name == "custom" else str(cfg.model.name)


def _model_without_parts(cfg: DictConfig, federation: Federation) -> str | None:
    """A body/head method on a model with no head to find (task/core/split.py), or LG-Mix (whose
    penultimate features are the input of the last nn.Linear) on a model without one."""
    method = str(cfg.strategy.name)
    if "head" not in cfg.strategy and method != "lgmix":
        return None
    model = build_model(cfg.model, federation.input_shape, federation.num_classes)
    try:
        if method == "lgmix":
            last_linear(model)
        else:
            split_model(model, cfg.strategy.get("head"))
    except ValueError as err:
        what = ("splits the model into a shared and a kept part" if method != "lgmix"
                else "reads the penultimate features at the input of the last nn.Linear")
        return f"strategy={method} {what}, and model={_model_label(cfg)} cannot be: {err}"
    return None
