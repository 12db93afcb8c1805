"""A real deployment: a SuperLink and SuperNodes as separate hosts (network namespaces).

The same commands the docker compose file runs (docker/compose.yaml), as plain processes:
the SuperLink on its own host, every SuperNode on a host of its own with its own address,
talking over a bridge; `flwr run` submits the app from the root namespace. Every SuperNode
keeps its personal state in its own state directory. Skipped where network namespaces
cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

BRIDGE = "pflbr0"
SUBNET = "10.231.7"
LINK_IP = f"{SUBNET}.1"
PORT = 9091
NODES = 2
TINY = "dataset.domains=[plain,inverted] dataset.clients_per_domain=1 dataset.image_size=16"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = sh("ip", "netns", "add", "pfl-probe", check=False)
    sh("ip", "netns", "del", "pfl-probe", check=False)
    return probe.returncode == 0


class Hosts:
    """Network namespaces joined by a bridge in the root namespace (gateway .254)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.procs: list[subprocess.Popen] = []
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, name in enumerate(names, 1):
            ns, veth = f"pfl-{name}", f"pflv{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(name)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def ip(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def start(self, name: str, command: list[str], log: Path, env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", f"pfl-{name}", *command], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        for name in self.names:
            sh("ip", "netns", "pids", f"pfl-{name}", check=False)
            for pid in sh("ip", "netns", "pids", f"pfl-{name}", check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", f"pfl-{name}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


def supernode_command(cid: int, state_dir: Path) -> list[str]:
    return ["flower-supernode", "--insecure", "--superlink", f"{LINK_IP}:{PORT}",
            "--node-config", f'partition-id={cid} num-partitions={NODES} state-dir="{state_dir}"']


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.skipif(not can_make_namespaces(), reason="needs root and `ip netns`")
def test_superlink_and_supernodes_on_separate_hosts(tmp_path):
    flwr_home = tmp_path / "flwr_home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "{LINK_IP}:{PORT}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    hosts = Hosts(["link", *[f"node{i}" for i in range(NODES)]])
    try:
        hosts.start("link", ["flower-superlink", "--insecure", "--host", "0.0.0.0", "--port", str(PORT),
                             "--database", str(tmp_path / "link.db")], tmp_path / "link.log", env)
        for cid in range(NODES):
            hosts.start(f"node{cid}", supernode_command(cid, tmp_path / "state"),
                        tmp_path / f"node{cid}.log", env)
        wait_for(lambda: "Starting Flower SuperNode" in (tmp_path / "node0.log").read_text(), 60,
                 "SuperNode start")
        out = tmp_path / "run"
        overrides = f"{TINY} strategy=ditto num_rounds=2 local_epochs=2 output_dir={out}"
        proc = subprocess.run(["flwr", "run", str(ROOT), "lab", "--stream", "--run-config",
                               f'overrides="{overrides}"'], env=env, capture_output=True, text=True,
                              timeout=600, cwd=ROOT)
        log = proc.stdout + proc.stderr
        assert (out / "results.json").exists(), log[-3000:]
        results = json.loads((out / "results.json").read_text())
        final = results["last_evaluated_round"]
        assert final["round"] == 2 and final["rejected_replies"] == 0
        assert 0.25 < final["personalized_accuracy"]["mean"] <= 1.0
        # Each SuperNode wrote its personal state to its own state directory on disk.
        for cid in range(NODES):
            assert (tmp_path / "state" / f"client-{cid}" / "personal.npz").exists()
    finally:
        hosts.close()
