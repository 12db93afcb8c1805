"""A Ray cluster across two hosts: ClientApps of one pflower simulation run on both.

A Ray head and a Ray worker node, each on a host of its own (a network namespace with its
own address, joined by a bridge: the deployment test's way of making hosts), started with
``ray start --head`` and ``ray start --address=...`` as on a lab's machines. ``pflower-sim
--ray-address`` then runs a tiny job from the head's host (a Ray driver runs on a node of its
cluster). Every reply names the Ray node its ClientApp ran on and metrics.jsonl counts them:
both addresses must appear. A second ``pflower-sim`` asking for another cluster is refused,
since the local SuperLink that runs the simulation keeps the RAY_ADDRESS it started with.

Skipped where network namespaces cannot be made (not root, no ``ip netns``). Every process
in the namespaces is killed and the namespaces, the bridge and the Ray folders removed, also
when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import NETWORK, ROOT, namespaces_unavailable

pytestmark = [pytest.mark.slow, NETWORK]

PREFIX = "pfr"  # namespaces pfr-*, bridge pfrbr0, veths pfrv*: apart from the deployment tests' names
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.232.0"
HEAD, WORKER = "head", "worker"
RAY_PORT = 6379
BIN = Path(sys.executable).parent
JOB = ("dataset.domains=[plain,inverted] dataset.clients_per_domain=2 dataset.image_size=16 "
       "strategy=fedavg num_rounds=2")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Hosts:
    """Network namespaces ``pfr-<name>`` on a bridge (the root namespace is .254)."""

    def __init__(self, names: list[str]):
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, name in enumerate(names, 1):
            ns = f"{PREFIX}-{name}"
            sh("ip", "netns", "add", ns)
            self.names.append(name)  # from here on close() removes it
            sh("ip", "link", "add", f"{PREFIX}v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"{PREFIX}v{i}", "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def ip(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def start(self, name: str, command: list[str], log: Path, env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{name}", *command], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, name: str, command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *command], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def close(self) -> None:
        """Kill what was started (and everything else living in the namespaces: Ray's daemons
        and workers, the SuperLink `flwr run` started), then remove namespaces and bridge."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for name in self.names:
            for pid in sh("ip", "netns", "pids", f"{PREFIX}-{name}", check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in self.names:
            sh("ip", "netns", "del", f"{PREFIX}-{name}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"{log.name}: no {text!r} within {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def ray_start(hosts: Hosts, name: str, options: list[str], temp: Path, env: dict) -> None:
    """``ray start --block`` on host ``name`` (1 CPU), returning once the node is up."""
    log = temp / f"{name}.log"
    command = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", f"--node-ip-address={hosts.ip(name)}",
               f"--temp-dir={temp / name}", "--object-store-memory=80000000", "--disable-usage-stats",
               *options]
    proc = hosts.start(name, command, log, env)
    wait_for_line(log, "Ray runtime started", proc, 120)


UNAVAILABLE = namespaces_unavailable()


@pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
def test_clientapps_run_on_both_nodes_of_a_ray_cluster(tmp_path):
    # Ray's socket paths must stay under ~107 characters: a short folder, not pytest's tmp_path.
    temp = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr_home"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    hosts = Hosts([HEAD, WORKER])
    try:
        address = f"{hosts.ip(HEAD)}:{RAY_PORT}"
        ray_start(hosts, HEAD, ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"], temp, env)
        ray_start(hosts, WORKER, [f"--address={address}"], temp, env)
        out = tmp_path / "run"
        proc = hosts.run(HEAD, [str(BIN / "pflower-sim"), "--ray-address", address,
                                f"{JOB} output_dir={out}"], env, timeout=400)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["rejected_replies"] == 0 for r in rows)
        hosts_seen = {ip for r in rows for ip in r.get("hosts", {})}
        assert hosts_seen == {hosts.ip(HEAD), hosts.ip(WORKER)}, rows
        # 4 training and 4 evaluation replies a round, each naming its node.
        assert all(sum(r["hosts"].values()) == 8 for r in rows)
        # The local SuperLink keeps the RAY_ADDRESS it started with: another cluster is refused.
        other = hosts.run(HEAD, [str(BIN / "pflower-sim"), "--ray-address", f"{hosts.ip(WORKER)}:{RAY_PORT}",
                                 f"{JOB} output_dir={tmp_path / 'other'}"], env, timeout=120)
        assert other.returncode == 2 and f"RAY_ADDRESS={address}" in other.stderr, other.stderr[-2000:]
    finally:
        hosts.close()
        shutil.rmtree(temp, ignore_errors=True)
