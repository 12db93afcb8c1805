"""``pflower-sim``: run a pflower job in Flower simulation with the right federation size.

    pflower-sim "strategy=ditto num_rounds=5 strategy.lam=0.5"

composes the config with those overrides (so a bad override fails here, before anything
starts), counts the clients of the configured federation and runs

    flwr run . --stream --run-config 'overrides="..."' \
        --federation-config "num-supernodes=<clients> client-resources-num-cpus=1 ..."

with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the local SuperLink uses the
current environment instead of building a fresh one with ``uv sync`` for every run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from task.config import ConfigError, compose_config

ROOT = Path(__file__).resolve().parent.parent


def num_clients(overrides: str) -> int:
    """How many clients (SuperNodes) the configured federation has."""
    from task.data import build_federation

    return len(build_federation(compose_config(overrides)).clients)


def flwr_command(overrides: str, clients: int, cpus: int, gpus: float) -> list[str]:
    run_config = f"overrides={_toml_string(overrides)}"
    federation = (f"num-supernodes={clients} client-resources-num-cpus={cpus} "
                  f"client-resources-num-gpus={gpus}")
    return ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config,
            "--federation-config", federation]


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pflower-sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=ditto num_rounds=5")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per ClientApp (default 1)")
    parser.add_argument("--gpus", type=float, default=None,
                        help="GPU fraction per ClientApp (default: 0.2 when CUDA is present, else 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the flwr command only")
    args = parser.parse_args(argv)
    overrides = " ".join(shlex.quote(o) if " " in o else o for o in args.overrides)
    try:
        clients = num_clients(overrides)
    except (ConfigError, ValueError) as err:
        print(f"pflower-sim: {err}", file=sys.stderr)
        return 2
    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = 0.2 if torch.cuda.is_available() else 0.0
    command = flwr_command(overrides, clients, args.cpus, gpus)
    print("+ " + shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
