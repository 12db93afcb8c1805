"""End-to-end fixtures: `flwr run` against a local SuperLink of their own (temporary FLWR_HOME, free ports).

The SuperLink that `flwr run` starts in the background, and everything it spawned, is
stopped when the tests end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers import RUN_TINY as TINY  # noqa: F401 - the e2e tests import it from here

ROOT = Path(__file__).resolve().parents[2]
# The tests that make network namespaces (fixed names) or start a dockerd (it saves the host's
# firewall as it starts and restores it as it stops): under `pytest -n 2 --dist loadgroup` they
# run one after the other on one worker. .ci/run runs all of tests/e2e on one worker.
NETWORK = pytest.mark.xdist_group("network")


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and `ip netns` (network namespaces)"
    name = f"pfd-probe-{os.getpid()}"  # every pytest-xdist worker probes as it collects
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None if probe.returncode == 0 else f"`ip netns add` fails: {probe.stderr.strip()}"


def _pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def stop_local_superlink(flwr_home: Path) -> None:
    """Kill the SuperLink started under ``flwr_home`` with its process group and children."""
    for pid in _pids_matching(f"flower-superlink.*{flwr_home}"):
        children = _pids_matching(f"--parent-pid {pid}")
        for target in [pid, *children]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(target), signal.SIGKILL)
    time.sleep(0.5)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (all held open while chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class FlwrRunner:
    """Runs `flwr run` for this project with Hydra overrides and reads the run's outputs."""

    def __init__(self, flwr_home: Path, out_root: Path):
        # Ports of our own: `flwr run` reuses any local SuperLink that answers on Flower's fixed
        # ports (39091/39093), whatever its FLWR_HOME, environment and Python; a suite run beside
        # another (a second checkout or venv on the same machine) would run on that one's SuperLink
        # and be cut off when that suite stops it.
        http_port, control_port = _free_ports(2)
        self.env = {**os.environ, "FLWR_HOME": str(flwr_home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                    "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
        self.out_root = out_root

    def run(self, name: str, overrides: str, num_supernodes: int | None = 4, timeout: float = 300,
            check: bool = True) -> Path:
        """`flwr run` with ``num_supernodes`` SuperNodes (None: Flower's default federation)."""
        out = self.out_root / name
        run_config = f'overrides="{overrides} output_dir={out}"'
        cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config]
        if num_supernodes is not None:
            cmd += ["--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
        self.last_log = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, self.last_log[-3000:]
        return out

    @staticmethod
    def results(out: Path) -> dict:
        return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="session")
def flwr_runner(tmp_path_factory):
    flwr_home = tmp_path_factory.mktemp("flwr_home")
    runner = FlwrRunner(flwr_home, tmp_path_factory.mktemp("runs"))
    yield runner
    stop_local_superlink(flwr_home)
