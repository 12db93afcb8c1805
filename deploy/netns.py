"""pflower on one Linux machine as a real multi-host deployment (network namespaces).

    sudo .venv/bin/python deploy/netns.py up --nodes 4        # TLS + SuperNode auth on
    FLWR_HOME=/tmp/pflower-netns/flwr flwr run . pflower-netns --stream \\
        --run-config 'overrides="strategy=ditto dataset.domains=[plain,inverted]"'
    sudo .venv/bin/python deploy/netns.py status
    sudo .venv/bin/python deploy/netns.py down

``up`` makes a bridge ``pfdbr0`` (10.231.7.254/24, the operator's side), the SuperLink's host
``pfd-link`` (10.231.7.1) and one host ``pfd-node<i>`` per SuperNode (10.231.7.<i+2>), each a
network namespace joined to the bridge by a veth pair. It makes a CA, the SuperLink's
certificate (its address as SAN) and one key pair per SuperNode (deploy/pki.py), starts the
SuperLink with TLS and ``--enable-supernode-auth``, registers every SuperNode's public key
through the Control API (``flwr supernode register``, as Flower 1.41 requires), writes the
``flwr`` connection ``pflower-netns`` (``<dir>/flwr/config.toml``, TLS with the CA), and starts
the SuperNodes, each with its own key and its own state directory (``<dir>/node-<i>/state``).
``down`` kills what ``up`` started, deletes the namespaces and links and removes ``<dir>``.

Each SuperNode runs with ``--isolation process`` beside one long-lived pflower ClientApp
worker (deploy/worker.py, started and restarted by its supervisor ``worker.py node``), which
runs every message of the node in one process; ``up --isolation subprocess`` gives Flower's
default instead, a fresh ``flwr-clientapp`` process per message.

The commands are built by ``superlink_command``, ``supernode_command`` and ``node_command``,
which also write docker/compose.yaml (deploy/compose.py): compose runs the same commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    from deploy import pki
except ImportError:  # run as a script: deploy/ itself is on sys.path
    import pki

PREFIX = "pfd"
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.231.7"
GATEWAY = f"{SUBNET}.254"
PORT = 9091
CONNECTION = "pflower-netns"
DEFAULT_DIR = Path("/tmp/pflower-netns")
ISOLATIONS = ("process", "subprocess")  # pflower's worker (the default) / Flower's default
WORKER = Path(__file__).resolve().with_name("worker.py")
IN_MEMORY_DB = ":flwr-in-memory:"  # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


# --- the commands (one source for this script and docker/compose.yaml) ------------------------
@dataclass(frozen=True)
class Security:
    """Where a role finds its TLS and authentication files; ``tls=False`` is ``--insecure``."""

    pki: str
    tls: bool = True
    auth: bool = True


def superlink_command(sec: Security, database: str, host: str = "0.0.0.0") -> list[str]:
    """The SuperLink: Fleet, Control and Runtime APIs on one port, TLS, SuperNode auth."""
    cmd = ["flower-superlink", "--host", host, "--port", str(PORT), "--database", database,
           "--disable-runtime-dependency-installation"]
    if sec.tls:
        cmd += ["--ssl-ca-certfile", f"{sec.pki}/ca.crt", "--ssl-certfile", f"{sec.pki}/server.pem",
                "--ssl-keyfile", f"{sec.pki}/server.key"]
    else:
        cmd += ["--insecure"]
    if sec.auth:
        cmd += ["--enable-supernode-auth"]
    return cmd


def supernode_command(sec: Security, node: int, nodes: int, superlink: str, state_dir: str,
                      key: str | None = None, isolation: str = "process") -> list[str]:
    """SuperNode ``node`` of ``nodes`` (it serves clients c with c % nodes == node).

    ``isolation="process"``: the SuperNode runs no ClientApp itself; the worker beside it
    does (``node_command``). Its Runtime API stays on 127.0.0.1:9094 (Flower's default), the
    node's own loopback: its own namespace or container.
    """
    cmd = ["flower-supernode", "--superlink", superlink]
    cmd += ["--root-certificates", f"{sec.pki}/ca.crt"] if sec.tls else ["--insecure"]
    if sec.auth:
        cmd += ["--auth-supernode-private-key", key or f"{sec.pki}/node-{node}.key"]
    cmd += ["--node-config", f'partition-id={node} num-partitions={nodes} state-dir="{state_dir}"']
    if isolation == "process":
        cmd += ["--isolation", "process"]
    return cmd


def node_command(supernode: list[str], worker: str = str(WORKER), python: str = sys.executable
                 ) -> list[str]:
    """What runs on a SuperNode's host: the SuperNode itself (``--isolation subprocess``), or
    the supervisor that runs it beside its long-lived ClientApp worker (and gives both the
    Runtime API's secret, ``--superexec-auth-secret-file``)."""
    if "--isolation" not in supernode:
        return supernode
    return [python, worker, "node", "--", *supernode]


def connection_toml(address: str, ca: str | None) -> str:
    """The ``flwr`` CLI's connection ``pflower-netns`` (TLS with ``ca``, or insecure)."""
    security = f'root-certificates = "{ca}"' if ca else "insecure = true"
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n')


# --- the deployment on disk -------------------------------------------------------------------
@dataclass
class Deployment:
    """What ``up`` made (``<dir>/deployment.json``), so that ``down`` removes exactly that."""

    dir: str
    nodes: int
    tls: bool
    auth: bool
    isolation: str = "process"
    superlink_db: str = "file"  # "memory": Flower's in-memory state (faster, gone when it stops)
    pids: dict[str, int] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.dir)

    @property
    def security(self) -> Security:
        return Security(str(self.root / "pki"), self.tls, self.auth)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": str(self.root / "flwr"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def save(self) -> None:
        pki.write_file(self.root / "deployment.json", json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, root: Path) -> Deployment:
        return cls(**json.loads((root / "deployment.json").read_text()))


def host_ip(host: str) -> str:
    """``link`` is .1, ``node<i>`` is .<i+2>, ``guest`` (a host outside the deployment) .200."""
    fixed = {"link": 1, "guest": 200}
    last = fixed[host] if host in fixed else int(host.removeprefix("node")) + 2
    return f"{SUBNET}.{last}"


def link_address() -> str:
    return f"{host_ip('link')}:{PORT}"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


# --- network ----------------------------------------------------------------------------------
def add_bridge() -> None:
    if sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")


def add_host(host: str) -> None:
    """Namespace ``pfd-<host>`` with ``eth0`` at its address, its veth peer on the bridge."""
    ns, veth = f"{PREFIX}-{host}", f"{PREFIX}v-{host}"[:15]
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", veth, "master", BRIDGE, "up")
    sh("ip", "-n", ns, "addr", "add", f"{host_ip(host)}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def our_links() -> list[str]:
    """The host ends of our veth pairs (``pfdv-*``)."""
    listed = sh("ip", "-o", "link", "show", check=False).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in listed if ":" in line]
    return [n for n in names if n.startswith(f"{PREFIX}v-")]


def our_namespaces() -> list[str]:
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(f"{PREFIX}-")]


def start(dep: Deployment, host: str, name: str, command: list[str], log: Path) -> int:
    """Start ``command`` on ``host`` in a session of its own; its output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{host}", *command], env=dep.env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    dep.pids[name] = proc.pid
    dep.save()
    return proc.pid


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


# --- roles ------------------------------------------------------------------------------------
def start_superlink(dep: Deployment) -> None:
    db = dep.root / "superlink" / "superlink.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    database = IN_MEMORY_DB if dep.superlink_db == "memory" else str(db)
    start(dep, "link", "superlink", superlink_command(dep.security, database),
          dep.root / "superlink" / "superlink.log")
    wait_for(lambda: listening(link_address()), 60, "the SuperLink is not listening")


def register(dep: Deployment, node: int, pki_dir: Path | None = None) -> int:
    """Register SuperNode ``node``'s public key with the SuperLink; return its node id."""
    pub = (pki_dir or dep.root / "pki") / f"node-{node}.pub"
    proc = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), CONNECTION,
                           "--name", f"node-{node}", "--format", "json"],
                          env=dep.env, capture_output=True, text=True)
    start = proc.stdout.find("{")
    reply = json.loads(proc.stdout[start:]) if start >= 0 else {}
    if proc.returncode != 0 or "node-id" not in reply:
        raise RuntimeError(f"registering node-{node} failed: {proc.stdout}{proc.stderr}")
    node_id = int(reply["node-id"])
    dep.node_ids[str(node)] = node_id
    dep.save()
    return node_id


def node_dir(dep: Deployment, node: int) -> Path:
    return dep.root / f"node-{node}"


def node_status(dep: Deployment, node: int) -> str:
    """The SuperLink's status of SuperNode ``node`` (registered, online, offline, ...)."""
    listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                            env=dep.env, capture_output=True, text=True).stdout
    nodes = json.loads(listed[listed.find("{"):] or "{}").get("nodes", [])
    wanted = str(dep.node_ids.get(str(node)))
    return next((n["status"] for n in nodes if n["node-id"] == wanted), "unknown")


def start_supernode(dep: Deployment, node: int, rejoin: bool = False, wait: float = 120) -> int:
    """SuperNode ``node`` on its host, with its own key and state directory.

    ``rejoin``: Flower 1.41 refuses to activate a node id the SuperLink still counts as online,
    and a crashed node stays online until its heartbeat lapses (2 x 30 s): wait for that.
    """
    deadline = time.monotonic() + wait
    while rejoin and dep.auth and node_status(dep, node) == "online":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SuperLink still counts node-{node} online after {wait:.0f} s")
        time.sleep(3)
    state = node_dir(dep, node) / "state"
    state.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(dep.security, node, dep.nodes, link_address(), str(state),
                            isolation=dep.isolation)
    return start(dep, f"node{node}", f"node-{node}", node_command(cmd),
                 node_dir(dep, node) / "supernode.log")


def stop_supernode(dep: Deployment, node: int, sig: int = signal.SIGKILL) -> None:
    """Kill SuperNode ``node`` and the ClientApp it may be running (a crash, by default)."""
    pid = dep.pids.pop(f"node-{node}", None)
    if pid is not None:
        kill_group(pid, sig)
    for leftover in sh("ip", "netns", "pids", f"{PREFIX}-node{node}", check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(leftover), sig)
    dep.save()


def guest(dep: Deployment, key: Path | None, tls: bool, timeout: float = 60) -> dict:
    """Try to join the deployment as a SuperNode from a host outside it (``pfd-guest``), with
    ``key`` (none: no authentication) and with or without TLS: a drill showing that the
    SuperLink refuses a node whose key is not registered, or one that speaks plain HTTP.

    Returns the SuperNode's exit code (None: still connected after ``timeout`` s, then
    killed), how many messages it received, and its log file.
    """
    if f"{PREFIX}-guest" not in our_namespaces():
        add_host("guest")
    root = dep.root / "guest"
    sec = Security(str(dep.root / "pki"), tls=tls, auth=key is not None)
    cmd = supernode_command(sec, 0, dep.nodes, link_address(), str(root / "state"), key=str(key),
                            isolation="subprocess")  # refused before any ClientApp could run
    cmd += ["--max-retries", "2", "--max-wait-time", "10"]
    log = root / f"try-{len(list(root.glob('try-*.log'))) if root.exists() else 0}.log"
    pid = start(dep, "guest", "guest", cmd, log)
    code = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        deadline = time.monotonic() + timeout
        while code is None and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            code = os.waitstatus_to_exitcode(status) if done else None
            time.sleep(0.2)
    if code is None:
        kill_group(pid)
    dep.pids.pop("guest", None)
    dep.save()
    return {"exit_code": code, "received": log.read_text().count("Receiving:"), "log": str(log)}


def up(root: Path, nodes: int, tls: bool = True, auth: bool = True, isolation: str = "process",
       superlink_db: str = "file") -> Deployment:
    """Namespaces, certificates and keys, SuperLink, registrations, SuperNodes."""
    if os.path.lexists(root / "deployment.json") or our_namespaces() or our_links():
        raise SystemExit(f"a deployment is up ({root} or namespaces {PREFIX}-*): run `down` first")
    try:
        pki.private_dir(root)  # keys and the SuperLink's database: not where others could plant files
    except PermissionError as err:
        raise SystemExit(f"deployment directory refused: {err}") from None
    dep = Deployment(str(root.resolve()), nodes, tls, auth, isolation, superlink_db)
    dep.save()
    if tls or auth:
        pki.make_all(root / "pki", [host_ip("link"), "superlink", "localhost", "127.0.0.1"], nodes)
    ca = str(root / "pki" / "ca.crt") if tls else None
    (root / "flwr").mkdir(exist_ok=True)
    pki.write_file(root / "flwr" / "config.toml", connection_toml(link_address(), ca).encode())
    add_bridge()
    for host in ["link", *[f"node{i}" for i in range(nodes)]]:
        add_host(host)
    start_superlink(dep)
    if auth:
        for node in range(nodes):
            register(dep, node)
    for node in range(nodes):
        start_supernode(dep, node)
    return dep


def down(root: Path) -> None:
    """Kill every process ``up`` started, delete its namespaces, links and ``root``."""
    dep = Deployment.load(root) if (root / "deployment.json").exists() else None
    for pid in (dep.pids.values() if dep else []):
        kill_group(pid)
    for ns in our_namespaces():
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)
    # The kernel frees a deleted namespace (and the veth pairs in it) asynchronously: delete
    # the host ends now, so that an `up` right after finds nothing of ours.
    for link in our_links():
        sh("ip", "link", "del", link, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)
    if dep is not None:
        shutil.rmtree(root, ignore_errors=True)


def status(root: Path) -> dict:
    """Which of the deployment's processes are alive, and the SuperLink's view of the nodes."""
    dep = Deployment.load(root)
    alive = {name: Path(f"/proc/{pid}").exists() for name, pid in dep.pids.items()}
    listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                            env=dep.env, capture_output=True, text=True).stdout
    return {"dir": dep.dir, "superlink": link_address(), "tls": dep.tls, "auth": dep.auth,
            "isolation": dep.isolation,
            "processes": alive, "supernodes": json.loads(listed[listed.find("{"):] or "{}")}


# --- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where everything goes")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the SuperLink and SuperNodes on namespace hosts")
    p_up.add_argument("--nodes", type=int, default=4)
    p_up.add_argument("--insecure", action="store_true", help="no TLS (trusted test network only)")
    p_up.add_argument("--no-auth", action="store_true", help="no SuperNode authentication")
    p_up.add_argument("--isolation", choices=ISOLATIONS, default="process",
                      help="process: one long-lived ClientApp worker per SuperNode (default); "
                           "subprocess: Flower's fresh flwr-clientapp process per message")
    p_up.add_argument("--superlink-db", choices=("file", "memory"), default="file",
                      help="file: the SuperLink's state in <dir>/superlink/superlink.db (default); "
                           "memory: Flower's in-memory state, no SQL per request (docs/deployment.md)")
    sub.add_parser("down", help="remove every process, namespace, link and file `up` made")
    sub.add_parser("status", help="processes and the SuperLink's SuperNodes")
    for name in ("stop-node", "start-node"):
        p = sub.add_parser(name, help=f"{name.split('-')[0]} one SuperNode (same key and state)")
        p.add_argument("node", type=int)
    p_guest = sub.add_parser("guest", help="try to join as a SuperNode from outside (should be refused)")
    p_guest.add_argument("--key", type=Path, help="private key (default: no authentication)")
    p_guest.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS")
    p_guest.add_argument("--timeout", type=float, default=60)
    p_certs = sub.add_parser("certs", help="CA, SuperLink certificate and SuperNode keys only")
    p_certs.add_argument("--pki", type=Path, required=True)
    p_certs.add_argument("--nodes", type=int, default=10)
    p_certs.add_argument("--names", nargs="+", default=["superlink", "localhost", "127.0.0.1"])
    p_compose = sub.add_parser("compose", help="print docker/compose.yaml (--gpu: docker/gpu.yaml)")
    p_compose.add_argument("--nodes", type=int, default=10)
    p_compose.add_argument("--gpu", action="store_true")
    p_compose.add_argument("--gpus", type=int, default=1, help="--gpu: GPUs to share out by node")
    p_compose.add_argument("--isolation", choices=ISOLATIONS, default="process")
    p_reg = sub.add_parser("register-all", help="register node-<i>.pub keys (compose's register)")
    p_reg.add_argument("--nodes", type=int, required=True)
    p_reg.add_argument("--pki", type=Path, required=True)
    p_reg.add_argument("--superlink", required=True)
    args = parser.parse_args(argv)
    run_command(args)


def run_command(args: argparse.Namespace) -> None:
    try:
        from deploy import compose
    except ImportError:  # run as a script
        import compose
    if args.command == "certs":
        pki.make_all(args.pki, args.names, args.nodes)
        # The connection for the operator on the Docker host (compose publishes 127.0.0.1:9091).
        (args.pki / "flwr").mkdir(exist_ok=True)
        ca = str((args.pki / "ca.crt").resolve())
        (args.pki / "flwr" / "config.toml").write_text(connection_toml(f"127.0.0.1:{PORT}", ca))
    elif args.command == "compose":
        sys.stdout.write(compose.compose_text(args.nodes, args.gpu, args.gpus,
                                              isolation=args.isolation))
    elif args.command == "register-all":
        compose.register_all(args.nodes, args.pki, args.superlink)
    elif args.command == "up":
        dep = up(args.dir, args.nodes, tls=not args.insecure, auth=not args.no_auth,
                 isolation=args.isolation, superlink_db=args.superlink_db)
        print(f"SuperLink {link_address()}, {dep.nodes} SuperNodes; submit with\n"
              f"  FLWR_HOME={dep.root / 'flwr'} flwr run . {CONNECTION} --stream --run-config "
              f"'overrides=\"...\"'\nlogs in {dep.root}; stop with: {shlex.join(sys.argv[:1])} down")
    elif args.command == "down":
        down(args.dir)
    elif args.command == "status":
        print(json.dumps(status(args.dir), indent=1))
    elif args.command == "stop-node":
        stop_supernode(Deployment.load(args.dir), args.node)
    elif args.command == "guest":
        print(json.dumps(guest(Deployment.load(args.dir), args.key, not args.insecure, args.timeout)))
    elif args.command == "start-node":
        start_supernode(Deployment.load(args.dir), args.node, rejoin=True)


if __name__ == "__main__":
    main()
