"""``pflower-sim``: run a pflower job in Flower simulation, and exit with how it ended.

    pflower-sim strategy=ditto num_rounds=5 strategy.lam=0.5

1. The door (``task/run/door.py``): composes the config with those overrides, loads the data,
   builds the model on one sample, and checks the output folder (one run per folder, not
   locked) and a resume; any problem is a message and exit status 2, before Flower starts.
2. Starts the run with the plain Flower command (printed; ``--dry-run`` prints only):

       flwr run . --stream --run-config 'overrides="..."' \
           --federation-config "num-supernodes=<clients> client-resources-num-cpus=1 ..."

   (submitted with ``--format json`` to learn the run id, its log followed with ``flwr log``),
   with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the local SuperLink uses the
   current environment instead of building one with ``uv sync`` for every run.
   With ``--ray-address ADDR`` (or ``RAY_ADDRESS`` in the environment) the ClientApps run on
   that Ray cluster: Flower's Ray backend calls ``ray.init()`` inside the SuperLink's
   simulation process, which reads ``RAY_ADDRESS`` from the environment it inherits from the
   SuperLink; so ``RAY_ADDRESS`` is set for the ``flwr run`` that starts the local SuperLink,
   and a local SuperLink already running with another ``RAY_ADDRESS`` is refused (exit 2)
   rather than silently running elsewhere (docs/ray_cluster.md).
   With ``backend=local`` (a config key) there is no Flower command: the run goes on in this
   process (task/run/local.py), with the same outputs, numbers, exit statuses and Ctrl-C.
   Either way a progress display (task/run/progress.py) shows the rounds: live bars on a
   terminal, one line a round elsewhere.
3. Reads the run's final status from the SuperLink (``flwr ls``): exit 0 when it completed,
   1 when it failed (the failure's message last), 130 / 143 when stopped by Ctrl-C / SIGTERM.
   Ctrl-C (or SIGTERM) stops the Flower run (``flwr stop``) and waits for it, so nothing goes
   on in the background and the folder is left unlocked and resumable; a second Ctrl-C quits
   at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from task.run.config import ConfigError, compose_config
from task.run.flower_run import FlowerRun, stop_superlink, superlink_note

ROOT = Path(__file__).resolve().parents[2]
HOLDER_EXIT_S = 60.0
OVERRIDE = re.compile(r"^[+~]{0,2}[\w./@-]+=")


def split_arguments(args: list[str]) -> list[str]:
    """Command-line arguments as single overrides.

    One argument holding several overrides (``"num_rounds=3 lr=0.1"``, as a shell user may
    quote them) is split into them; an argument that is one override with spaces in its value
    (``output_dir="my runs/a"``) stays whole.
    """
    parts = []
    for arg in args:
        pieces = shlex.split(arg) if " " in arg else [arg]
        if len(pieces) > 1 and all(OVERRIDE.match(p) for p in pieces):
            parts += pieces
        else:
            parts.append(arg)
    return parts


def join_overrides(args: list[str]) -> str:
    """The overrides string for Hydra from command-line arguments (see ``split_arguments``)."""
    return " ".join(shlex.quote(p) if " " in p else p for p in split_arguments(args))


def flwr_command(overrides: str, clients: int, cpus: int, gpus: float, launcher: str = "") -> list[str]:
    """The plain Flower command for the run (what a user can type). ``launcher``: the token of
    the folder's lock pflower-sim took at its door, which the ServerApp takes over."""
    run_config = f"overrides={_toml_string(overrides)}"
    if launcher:
        run_config += f" launcher={_toml_string(launcher)}"
    federation = (f"num-supernodes={clients} client-resources-num-cpus={cpus} "
                  f"client-resources-num-gpus={gpus}")
    return ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config,
            "--federation-config", federation]


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def local_superlink() -> tuple[int, str | None] | None:
    """The local simulation SuperLink ``flwr run`` would use: (pid, its ``RAY_ADDRESS``), or None.

    Found by its command line (``flower-superlink ... --simulation ... --port <local port>``, as
    ``flwr run`` starts it) in this network namespace (where ``127.0.0.1`` is the same);
    its environment is read from /proc (same user).
    """
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT

    ours = os.readlink("/proc/self/ns/net")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != ours:
                continue
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            # ``flower-superlink ...`` or ``python .../flower-superlink ...``
            if not any(Path(a).name == "flower-superlink" for a in args[:2]):
                continue
            if "--simulation" not in args or _option(args, "--port") != str(LOCAL_SUPERLINK_HTTP_API_PORT):
                continue
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        found = dict(v.split("=", 1) for v in environ if "=" in v)
        return int(entry.name), found.get("RAY_ADDRESS") or None
    return None


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


APP_FILES = ("client_app.py", "server_app.py")


def superlink_code_problem() -> str | None:
    """Why the local SuperLink would run other code than the submitted app (None: it would not).

    Ray adds its driver's working directory to every worker's ``sys.path``
    (``ray/_private/worker.py``: ``job_config._py_driver_sys_path``), ahead of the installed FAB;
    the driver is the SuperLink's simulation process, whose working directory is the SuperLink's,
    which is that of the ``flwr run`` that started it. A SuperLink started in another checkout
    therefore makes every ClientApp import *that* checkout's ``client_app.py`` (and ``task/``,
    ``strategies/``) while the ServerApp runs the submitted FAB.
    """
    running = local_superlink()
    if running is None:
        return None
    pid = running[0]
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None
    shadows = [f for f in APP_FILES if (cwd / f).exists()]
    if not shadows or cwd == ROOT:
        return None
    return (f"the local SuperLink (pid {pid}) runs in {cwd}, which holds {shadows[0]}: Ray puts that folder "
            f"first on every ClientApp's sys.path, so the ClientApps would run its code, not this checkout's "
            f"({ROOT}); stop it with `pflower-sim --stop-superlink` and run again")


def ray_address_problem(wanted: str | None) -> str | None:
    """Why the run would not reach the Ray cluster ``wanted`` (None: it will, or none is wanted).

    Flower's Ray backend runs ``ray.init()`` in the simulation process the SuperLink spawns,
    which inherits the SuperLink's environment, not that of ``flwr run``; ``RAY_ADDRESS`` given
    now reaches it only when ``flwr run`` starts the local SuperLink.
    """
    running = local_superlink()
    if running is None:
        return None
    pid, theirs = running
    if wanted is None:
        if theirs:
            print(f"pflower-sim: note: the local SuperLink (pid {pid}) runs simulations on the Ray "
                  f"cluster at {theirs} (its RAY_ADDRESS)", file=sys.stderr)
        return None
    if theirs == wanted:
        return None
    return (f"the local SuperLink (pid {pid}) was started with RAY_ADDRESS={theirs or '(unset)'}, and "
            f"its simulation process, where Flower's Ray backend calls ray.init(), inherits that: the "
            f"run would not reach {wanted}. Stop that SuperLink (kill {pid}) and run again; the "
            f"`flwr run` started here then starts one with RAY_ADDRESS={wanted}")


def cluster_path_warnings(overrides: str) -> list[str]:
    """Relative paths a ClientApp reads, which a Ray cluster resolves on each node against the
    directory that node's ``ray start`` ran in (docs/ray_cluster.md: what must be shared)."""
    cfg = compose_config(overrides)
    reads_files = cfg.dataset.name not in ("digits", "mnist5k")  # these come with installed packages
    paths = {"client_state_dir": str(cfg.client_state_dir or ""),
             "dataset.data_root": str(cfg.dataset.get("data_root") or "") if reads_files else ""}
    return [f"{key}={value!r} is relative: on a Ray cluster each node resolves it against the "
            "directory its `ray start` ran in; give an absolute path on storage every node mounts"
            for key, value in paths.items() if value and not Path(value).is_absolute()]


def pin_output_dir(overrides: str) -> str:
    """With no ``output_dir`` (and no resume), name the default folder now, so that the folder
    checked here and reported is the one the ServerApp writes (``outputs/<time>-...`` here)."""
    from task.run.outputs import default_output_dir

    cfg = compose_config(overrides)
    if cfg.output_dir or cfg.resume:
        return overrides
    return f"{overrides} output_dir={shlex.quote(str(default_output_dir(cfg)))}".strip()


def pin_paths(overrides: str) -> str:
    """Relative paths of one's own data, split and model file made absolute here: Flower's
    processes resolve them against the SuperLink's working directory, not this one."""
    from omegaconf import OmegaConf

    cfg = compose_config(overrides)
    pinned = {}
    for key in ("dataset.path", "partition.path"):
        value = Path(str(OmegaConf.select(cfg, key) or "")).expanduser()
        if str(value) != "." and value.exists() and not value.is_absolute():
            pinned[key] = str(value.resolve())
    where, sep, name = str(cfg.model.get("target") or "").rpartition(":")
    if sep and (where.endswith(".py") or "/" in where) and not Path(where).expanduser().is_absolute():
        pinned["model.target"] = f"{Path(where).expanduser().resolve()}:{name}"
    return " ".join([overrides, *(f"{k}={shlex.quote(v)}" for k, v in pinned.items())]).strip()


def door(overrides: str) -> tuple[int, Path, str | None]:
    """Every check that can run before Flower starts: (clients, output folder, the answer when
    there is nothing to run), or an error."""
    from strategies import lookup
    from task.data.load import build_federation
    from task.run.door import check_run, finished_already

    cfg = compose_config(overrides)
    federation = build_federation(cfg)
    server_cls, _ = lookup(cfg.strategy.name)
    directory = check_run(cfg, federation, server_cls.keeps_client_state)
    return len(federation.clients), directory, finished_already(cfg, directory)


def wait_for_holder(directory: Path, timeout: float) -> None:
    """Wait until the process holding the folder's lock (the ServerApp) has exited: after
    ``flwr stop`` the SuperLink reports the run stopped before its process is gone."""
    from task.run.runfolder import holder_alive, read_lock

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = read_lock(directory)
        if holder is None or not holder_alive(holder):
            return
        time.sleep(0.2)
    print(f"pflower-sim: the run's process still holds {directory}", file=sys.stderr)


def outcome(record: dict, directory: Path, signum: int | None) -> int:
    """The exit status for the run's final record, with the failure's message printed last.

    The folder's ``status.json`` decides, so that the exit status and the folder agree: a stop
    that came after the last round leaves a completed run (exit 0, said so).
    """
    from task.run.runfolder import read_status, release_dead_lock

    wait_for_holder(directory, HOLDER_EXIT_S)
    release_dead_lock(directory)
    status = str(record.get("status", "unknown"))
    folder = read_status(directory) or {}
    if status == "finished:completed" and folder.get("status") == "completed":
        late = " (the stop came after its last round)" if signum is not None else ""
        print(f"pflower-sim: run completed{late}; results in {directory / 'results.json'}")
        return 0
    if signum is not None:
        print(f"pflower-sim: run stopped ({folder.get('status', status)}); resume it with the same "
              f"overrides plus resume={directory}", file=sys.stderr)
        return 128 + signum
    error = folder.get("error") or record.get("status-details") or "see the log above"
    print(f"pflower-sim: run failed ({status}): {error}", file=sys.stderr)
    return 1


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pflower-sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=ditto num_rounds=5")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per ClientApp (default 1)")
    parser.add_argument("--gpus", type=float, default=None,
                        help="GPU fraction per ClientApp (default: 0.2 when CUDA is present, else 0)")
    parser.add_argument("--ray-address", default=None,
                        help="run the ClientApps on this Ray cluster (e.g. 10.0.0.1:6379, as "
                             "`ray start --head` prints; default: $RAY_ADDRESS); see docs/ray_cluster.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything; print the flwr command only")
    parser.add_argument("--stop-superlink", action="store_true",
                        help="stop the local SuperLink and SuperExec that `flwr run` left running, and exit")
    return parser.parse_args(argv)


def configured_backend(overrides: str) -> str | None:
    """The config's ``backend``; None where the config cannot be composed (the door says why)."""
    try:
        return str(compose_config(overrides).backend)
    except ConfigError:
        return None


def flwr_problem(ray_address: str | None) -> str | None:
    """Why ``flwr run`` would not run this checkout's code where asked (None: it would)."""
    return ray_address_problem(ray_address) or superlink_code_problem()


def stop_superlink_command() -> int:
    running = local_superlink()
    if running is None:
        print("pflower-sim: no local SuperLink is running")
        return 0
    stopped = stop_superlink(running[0])
    print(f"pflower-sim: stopped the local SuperLink and SuperExec (processes {stopped})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.stop_superlink:
        return stop_superlink_command()
    overrides = join_overrides(args.overrides)
    backend = configured_backend(overrides)
    ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if backend == "local" and args.ray_address:
        print("pflower-sim: --ray-address needs backend=flwr (backend=local runs every client in this "
              "process); drop one of them", file=sys.stderr)
        return 2
    # Before the door's checks (they build the federation): a run that cannot reach the
    # cluster it names is refused at once (a config that does not compose is the door's to say).
    problem = flwr_problem(ray_address) if backend == "flwr" and not args.dry_run else None
    if problem is not None:
        print(f"pflower-sim: {problem}", file=sys.stderr)
        return 2
    try:
        overrides = pin_output_dir(pin_paths(overrides))
        clients, directory, done = door(overrides)
    except (ConfigError, ValueError, OSError, KeyError, RuntimeError) as err:
        print(f"pflower-sim: {err}", file=sys.stderr)
        return 2
    if done is not None:
        print(f"pflower-sim: {done}")
        return 0
    if backend == "local":
        from task.run.local import local_command

        return local_command(overrides, clients, directory, args.dry_run)
    return run_flwr(overrides, clients, directory, args.cpus, args.gpus, ray_address, args.dry_run)


def run_flwr(overrides: str, clients: int, directory: Path, cpus: int = 1, gpus: float | None = None,
             ray_address: str | None = None, dry_run: bool = False, console=None) -> int:
    """Submit the checked run to ``flwr run``, follow it with a progress display, return the
    exit status (see the module docstring); ``console``: rich's, where the display draws."""
    from task.run.progress import RunDisplay

    if gpus is None:
        import torch

        gpus = 0.2 if torch.cuda.is_available() else 0.0
    token = ""
    if not dry_run:
        from task.run.runfolder import claim_at_door

        try:  # the folder is this run's from now on: a second run into it is refused at its door
            token = claim_at_door(directory)
        except (OSError, RuntimeError) as err:
            print(f"pflower-sim: {err}", file=sys.stderr)
            return 2
    command = flwr_command(overrides, clients, cpus, gpus, token)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    prefix = ""
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
        prefix = f"RAY_ADDRESS={shlex.quote(ray_address)} "
        for warning in cluster_path_warnings(overrides):
            print(f"pflower-sim: warning: {warning}", file=sys.stderr)
    print("+ " + prefix + shlex.join(command), flush=True)
    if dry_run:
        return 0
    from task.run.runfolder import release_door_claim

    # Only the main thread may set signal handlers (pflower.run called from another keeps them).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        with RunDisplay(int(compose_config(overrides).num_rounds), directory, console) as display:
            run = FlowerRun(command, directory, env, display)
            for s in previous:
                signal.signal(s, run.on_signal)
            if run.submit() is None:
                return 1
            record = run.follow()
        release_door_claim(directory, token)  # a ServerApp that never took the lock over
        return outcome(record, directory, run.signal)
    finally:
        release_door_claim(directory, token)
        for s, handler in previous.items():
            signal.signal(s, handler)
        running = local_superlink()
        if running is not None:
            print(f"pflower-sim: note: {superlink_note(running[0])}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
