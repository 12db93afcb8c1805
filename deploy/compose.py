"""docker/compose.yaml and docker/gpu.yaml, generated from deploy/netns.py's command builders.

    python deploy/netns.py compose --nodes 10 > docker/compose.yaml
    python deploy/netns.py compose --nodes 10 --gpu --gpus 1 > docker/gpu.yaml

Compose runs what the namespace deployment runs: the SuperLink (``superlink_command``), a
one-shot ``register`` service (``register_all``) and per SuperNode its supervisor, the
SuperNode with ``--isolation process`` and its long-lived ClientApp worker in one container
(``node_command``; the Runtime API on the container's loopback). ``isolation="subprocess"``
gives Flower's default, a fresh ``flwr-clientapp`` process per message, instead.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

try:
    from deploy.netns import (
        PORT,
        Deployment,
        Security,
        connection_toml,
        listening,
        node_command,
        register,
        superlink_command,
        supernode_command,
        wait_for,
    )
except ImportError:  # run as a script: deploy/ itself is on sys.path
    from netns import (  # type: ignore[no-redef]
        PORT,
        Deployment,
        Security,
        connection_toml,
        listening,
        node_command,
        register,
        superlink_command,
        supernode_command,
        wait_for,
    )

IMAGE = "pflower:latest"


def compose(nodes: int, context: str = "..", isolation: str = "process") -> dict:
    """docker/compose.yaml as a dict: the SuperLink, a one-shot ``register`` service and one
    SuperNode per client. ``context``: the build context (the repository) from the file's folder."""
    sec = Security("/pki")
    image = {"build": {"context": context, "dockerfile": "docker/Dockerfile",
                       # a local base where no registry is reachable (docs/deployment.md)
                       "args": {"BASE": "${PFLOWER_BASE:-python:3.11-slim}"}},
             "image": "${PFLOWER_IMAGE:-" + IMAGE + "}",
             # Files written into ./outputs and the volumes belong to the host user who started compose.
             "user": "${PFLOWER_UID:-1000}:${PFLOWER_GID:-1000}",
             "environment": {"FLWR_HOME": "/state/.flwr"}}
    services: dict = {"superlink": {
        **image, "command": superlink_command(sec, "/state/superlink.db"),
        # The Control API shares this port: published on loopback unless PFLOWER_BIND says so.
        "ports": [f"${{PFLOWER_BIND:-127.0.0.1}}:{PORT}:{PORT}"],
        "volumes": ["superlink-state:/state", "./outputs:/app/outputs",
                    *[f"./pki/{f}:/pki/{f}:ro" for f in ("ca.crt", "server.pem", "server.key")]]}}
    services["register"] = {
        **image, "depends_on": ["superlink"], "restart": "no",
        "command": ["python", "/app/deploy/netns.py", "register-all", "--nodes", str(nodes),
                    "--pki", "/pki", "--superlink", f"superlink:{PORT}"],
        "volumes": [f"./pki/{f}:/pki/{f}:ro" for f in ["ca.crt", *[f"node-{i}.pub" for i in range(nodes)]]]}
    for i in range(nodes):
        node = supernode_command(sec, i, nodes, f"superlink:{PORT}", "/state", isolation=isolation)
        services[f"supernode-{i}"] = {
            **image, "depends_on": {"register": {"condition": "service_completed_successfully"}},
            "restart": "unless-stopped",
            "command": node_command(node, worker="/app/deploy/worker.py", python="python"),
            "volumes": [f"supernode-{i}-state:/state", "./pki/ca.crt:/pki/ca.crt:ro",
                        f"./pki/node-{i}.key:/pki/node-{i}.key:ro"]}
    volumes = {"superlink-state": None, **{f"supernode-{i}-state": None for i in range(nodes)}}
    return {"services": services, "volumes": volumes}


def gpu_overlay(nodes: int, gpus: int = 1) -> dict:
    """docker/gpu.yaml: SuperNode ``i`` gets one GPU, ``PFLOWER_GPU_<i>`` (default ``i % gpus``),
    not every GPU of the host: nodes sharing a GPU is a choice, written in the environment."""
    def device(i: int) -> dict:
        return {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": [f"${{PFLOWER_GPU_{i}:-{i % gpus}}}"],
             "capabilities": ["gpu"]}]}}}
    return {"services": {f"supernode-{i}": {"deploy": device(i)} for i in range(nodes)}}


def compose_text(nodes: int, gpu: bool = False, gpus: int = 1, context: str = "..",
                 isolation: str = "process") -> str:
    """The text of docker/compose.yaml (``gpu``: docker/gpu.yaml): a header, then the YAML."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # every service spelled out, no &anchors
            return True

    header = (GPU_HEADER if gpu else COMPOSE_HEADER).format(nodes=nodes, gpus=gpus)
    body = yaml.dump(gpu_overlay(nodes, gpus) if gpu else compose(nodes, context, isolation), Dumper=Dumper,
                     sort_keys=False, width=200, default_flow_style=None)
    return header + body


GENERATED = """\
# GENERATED by `python deploy/netns.py compose --nodes {nodes}{gpu} > docker/{name}`: edit
# deploy/compose.py and deploy/netns.py (superlink_command, supernode_command, node_command),
# not this file; tests/test_docker_files.py checks that both run the same commands.
"""
COMPOSE_HEADER = GENERATED.replace("{gpu}", "").replace("{name}", "compose.yaml") + """\
#
# A secure pflower deployment on one Docker host: TLS, SuperNode authentication, a SuperLink
# and one SuperNode per client of the default federation, each with its own state volume and
# one long-lived ClientApp worker beside it (deploy/worker.py; --isolation process).
#   python deploy/netns.py certs --pki docker/pki --nodes {nodes}   # CA, server cert, node keys
#   mkdir -p docker/outputs
#   PFLOWER_UID=$(id -u) PFLOWER_GID=$(id -g) docker compose -f docker/compose.yaml up --build -d
#   FLWR_HOME=docker/pki/flwr flwr run . pflower-netns --stream \\
#     --run-config 'overrides="strategy=lgmix"'
# `register` registers every SuperNode's public key with the SuperLink (a SuperNode whose key
# is not registered is refused). The SuperLink's one port also serves the Control API, which
# runs submitted code: it is published on 127.0.0.1 unless PFLOWER_BIND says otherwise.
# No registry? PFLOWER_BASE=<a local image with python3 and python3-venv> (docs/deployment.md).
# GPUs: add `-f docker/gpu.yaml`. See docs/deployment.md.
"""
GPU_HEADER = GENERATED.replace("{gpu}", " --gpu --gpus {gpus}").replace("{name}", "gpu.yaml") + """\
#
# GPU overlay: PFLOWER_TORCH=gpu docker compose -f docker/compose.yaml -f docker/gpu.yaml up -d
# (needs the NVIDIA Container Toolkit on the host). SuperNode i gets GPU PFLOWER_GPU_<i>
# (default i % {gpus}), e.g. PFLOWER_GPU_3=1 puts node 3 on the second GPU.
"""


def register_all(nodes: int, pki_dir: Path, superlink: str) -> None:
    """Register ``node-<i>.pub`` for every node with the SuperLink at ``superlink``
    (the compose deployment's one-shot ``register`` service); already registered keys are
    skipped, so the service may run again after a restart."""
    dep = Deployment(tempfile.mkdtemp(prefix="pflower-register-"), nodes, True, True)
    (dep.root / "flwr").mkdir()
    (dep.root / "flwr" / "config.toml").write_text(connection_toml(superlink, str(pki_dir / "ca.crt")))
    try:
        wait_for(lambda: listening(superlink), 120, "the SuperLink is not listening")
        for node in range(nodes):
            try:
                register(dep, node, pki_dir)
            except RuntimeError as err:
                if "already in use" not in str(err).lower():
                    raise
    finally:
        shutil.rmtree(dep.root, ignore_errors=True)
