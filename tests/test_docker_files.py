"""docker/ must describe the deployment the code expects (no Docker engine here to run it), and
run the same commands as deploy/netns.py (the namespace deployment the e2e tests bring up)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from deploy import compose, netns
from task.data.load import build_federation
from task.run.config import compose_config

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = len(build_federation(compose_config("")).clients)


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "docker" / name).read_text())


def flags(command: list[str]) -> list[str]:
    """The options a command passes (values that are paths or addresses differ by setting)."""
    return [a for a in command if a.startswith("--")]


def test_compose_files_are_generated_from_the_namespace_script():
    # Regenerate with: python deploy/netns.py compose --nodes 10 [--gpu] > docker/...
    assert (ROOT / "docker" / "compose.yaml").read_text() == compose.compose_text(CLIENTS)
    assert (ROOT / "docker" / "gpu.yaml").read_text() == compose.compose_text(CLIENTS, gpu=True)


def test_every_service_runs_what_the_namespace_deployment_runs():
    services = load("compose.yaml")["services"]
    lab = netns.Security("/tmp/lab/pki")  # the namespace deployment's defaults: TLS and auth on
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink" and link[link.index("--port") + 1] == str(netns.PORT)
    assert flags(link) == flags(netns.superlink_command(lab, "/tmp/lab/superlink.db"))
    assert {"--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(link)
    seen, volumes = [], set()
    for name, service in services.items():
        if not name.startswith("supernode-"):
            continue
        # The supervisor runs the SuperNode beside its long-lived ClientApp worker.
        assert service["command"][:4] == ["python", "/app/deploy/worker.py", "node", "--"]
        cmd = service["command"][4:]
        node_config = dict(kv.split("=", 1) for kv in shlex.split(cmd[cmd.index("--node-config") + 1]))
        cid = int(node_config["partition-id"])
        expected = netns.supernode_command(lab, cid, CLIENTS, netns.link_address(), "/tmp/lab/state")
        assert flags(cmd) == flags(expected) and "--insecure" not in cmd
        assert cmd[cmd.index("--isolation") + 1] == "process"
        assert cmd[cmd.index("--superlink") + 1] == f"superlink:{netns.PORT}"
        assert int(node_config["num-partitions"]) == CLIENTS and node_config["state-dir"] == "/state"
        # Its own key and its own state volume: no SuperNode reads another client's state.
        assert f"./pki/node-{cid}.key:/pki/node-{cid}.key:ro" in service["volumes"]
        state = [v for v in service["volumes"] if v.endswith(":/state")]
        assert len(state) == 1 and state[0] not in volumes
        volumes.add(state[0])
        seen.append(cid)
    assert sorted(seen) == list(range(CLIENTS))
    registered = services["register"]["command"]
    assert registered[registered.index("--nodes") + 1] == str(CLIENTS)


def test_control_api_is_published_on_loopback_and_outputs_belong_to_the_host_user():
    services = load("compose.yaml")["services"]
    assert services["superlink"]["ports"] == [f"${{PFLOWER_BIND:-127.0.0.1}}:{netns.PORT}:{netns.PORT}"]
    assert all("ports" not in s for n, s in services.items() if n != "superlink")
    assert all(s["user"].startswith("${PFLOWER_UID") for s in services.values())


def test_gpu_overlay_gives_each_supernode_its_own_gpu():
    services = load("gpu.yaml")["services"]
    assert sorted(services) == sorted(f"supernode-{i}" for i in range(CLIENTS))
    for name, service in services.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        i = int(name.split("-")[1])
        gpu = {"driver": "nvidia", "device_ids": [f"${{PFLOWER_GPU_{i}:-0}}"], "capabilities": ["gpu"]}
        assert devices == [gpu]  # one GPU of its own (PFLOWER_GPU_<i>), not count: all
    spread = compose.gpu_overlay(4, gpus=2)["services"]
    ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in spread.values()]
    assert ids == [[f"${{PFLOWER_GPU_{i}:-{i % 2}}}"] for i in range(4)]


def test_image_holds_every_file_the_flower_app_bundle_and_the_register_service_need():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = " ".join(re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M))
    needs = ("pyproject.toml", "server_app.py", "client_app.py", "strategies", "task", "conf", "deploy")
    for needed in needs:
        assert needed in copied, needed
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile
    assert re.search(r"^ARG BASE=python:3.11-slim$", dockerfile, flags=re.M)
    assert re.search(r"^USER 1000:1000$", dockerfile, flags=re.M)  # not root
    assert "--no-index --find-links /tmp/wheels -c /tmp/wheels/constraints.txt" in dockerfile


def test_build_context_holds_no_keys_environments_data_or_outputs():
    # Whitelist: everything is ignored but what the image installs (docker builds honour the
    # last matching line, as here).
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "**"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not kept & {"docker/pki", ".venv", "data", "outputs", "docker/outputs", ".git"}
    assert {"pyproject.toml", "task", "strategies", "deploy", "docker/wheels"} <= kept
