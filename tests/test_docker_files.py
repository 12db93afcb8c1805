"""docker/ must describe the deployment the code expects (no Docker engine here to run it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from task.config import compose_config
from task.data import build_federation

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_one_supernode_per_default_client_against_the_superlink():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink" and link[link.index("--port") + 1] == "9091"
    clients = len(build_federation(compose_config("")).clients)
    seen = []
    for name, service in services.items():
        if not name.startswith("supernode-"):
            continue
        cmd = service["command"]
        assert cmd[0] == "flower-supernode" and cmd[cmd.index("--superlink") + 1] == "superlink:9091"
        node_config = dict(kv.split("=", 1) for kv in shlex.split(cmd[cmd.index("--node-config") + 1]))
        assert int(node_config["num-partitions"]) == clients
        assert node_config["state-dir"] == "/state"
        seen.append(int(node_config["partition-id"]))
    assert sorted(seen) == list(range(clients))


def test_image_holds_every_file_the_flower_app_bundle_needs():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copied = " ".join(re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M))
    for needed in ("pyproject.toml", "server_app.py", "client_app.py", "strategies", "task", "conf"):
        assert needed in copied, needed
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile
