"""Build pflower's image without a registry, and run a Docker daemon that leaves the host as it was.

    python deploy/image.py base                  # a Debian bookworm base: debootstrap + docker import
    python deploy/image.py wheels --torch cpu    # docker/wheels/: every dependency, CI's pins
    python deploy/image.py build --base pflower-base:bookworm
    python deploy/image.py prepare --tag pflower:compose-test   # all three, on a daemon of its own

``base``: ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates
bookworm`` from the Debian mirror apt's own sources name (~3.5 min, 275 MB), imported as
``pflower-base:bookworm``; where a registry is reachable ``python:3.11-slim`` does instead.
``wheels``: ``pip download`` on the host (its pip configuration, index and CA) of pflower's
dependencies and the build backend into docker/wheels/, with ``constraints.txt``: CI's
.ci/constraints.txt with the variant's torch (``cpu``: the CPU build in pip's own
``find-links`` directory where there is one; ``gpu``: CI's CUDA build). The image installs
them with ``--no-index``: no container ever reaches the index. Both are cached under
``~/.cache/pflower-docker`` (``PFLOWER_DOCKER_CACHE``), so a second build is quick.

``prepare``: base, wheels and build on a ``Dockerd`` started and stopped for it, whose data root
is the cache: what a later ``Dockerd`` (tests/e2e/test_compose.py's) finds built. .ci/run runs
it in the background while the other tests run.

``Dockerd`` starts a daemon of its own (its data root and socket under a directory of its own,
``--iptables=false --ip-forward=false --bridge=none``: it writes no firewall rule and changes
no sysctl; one at a time on a data root: ``start`` waits for the one before to stop) and, when
stopped, restores what it finds changed anyway: the iptables rules, the
forwarding and bridge-netfilter sysctls (a default dockerd sets FORWARD to DROP and turns
bridge netfilter on, which cuts the namespace deployment and a Ray cluster off).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PFLOWER_DOCKER_CACHE", Path.home() / ".cache" / "pflower-docker"))
BASE_IMAGE = "pflower-base:bookworm"
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.bridge.bridge-nf-call-iptables",
           "net.bridge.bridge-nf-call-ip6tables", "net.bridge.bridge-nf-call-arptables")


def run(*args: str, env: dict | None = None, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


# --- the host's network state -------------------------------------------------------------------
def sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        path = Path("/proc/sys") / key.replace(".", "/")
        if path.exists():
            out[key] = path.read_text().strip()
    return out


def firewall() -> dict[str, str]:
    """``iptables-save`` and ``ip6tables-save`` output (empty where the tool is missing)."""
    out = {}
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            text = subprocess.run([tool], capture_output=True, text=True).stdout
            out[tool] = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return out


def links() -> set[str]:
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in listed.splitlines() if ":" in line}


def network_state() -> dict:
    return {"sysctls": sysctls(), "firewall": firewall(), "links": links()}


def restore(saved: dict) -> list[str]:
    """Put back sysctls and firewall rules that differ from ``saved``, delete links made since
    (dockerd's bridges); returns what it had to restore."""
    fixed = []
    for key, value in saved["sysctls"].items():
        if sysctls().get(key) != value:
            (Path("/proc/sys") / key.replace(".", "/")).write_text(value)
            fixed.append(f"{key}={value}")
    now = firewall()
    for tool, rules in saved["firewall"].items():
        if now.get(tool) != rules:
            subprocess.run([tool.replace("-save", "-restore")], input=rules + "\n", text=True,
                           capture_output=True)
            fixed.append(tool.replace("-save", ""))
    for link in links() - saved["links"]:
        if link.startswith(("docker", "br-", "veth")):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
            fixed.append(f"link {link}")
    return fixed


# --- the daemon -----------------------------------------------------------------------------------
class Dockerd:
    """A Docker daemon of our own: socket and run state under ``root`` (a short path: a socket's
    name is limited to 107 bytes), images and layers in ``data`` (default: the cache, so that a
    second run finds its base image and build layers)."""

    def __init__(self, root: Path, data: Path = CACHE / "docker-data"):
        self.root, self.data = root, data
        self.sock = root / "docker.sock"
        self.proc: subprocess.Popen | None = None
        self.saved: dict = {}
        self.restored: list[str] = []
        self.lock: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def start(self, timeout: float = 60, lock_timeout: float = 1800) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_data_root(lock_timeout)
        self.saved = network_state()
        log = (self.root / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--host", f"unix://{self.sock}", "--data-root", str(self.data),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
             "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
             "--bridge=none"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while subprocess.run(["docker", "info"], env=self.env, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)

    def _lock_data_root(self, timeout: float) -> None:
        """Two daemons on one data root corrupt it: wait for the other (``prepare`` in .ci/run)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.lock = os.open(self.data.with_name(self.data.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.lock)
                    self.lock = None
                    raise RuntimeError(f"another dockerd holds {self.data} after {timeout:.0f} s") from None
                time.sleep(1)

    def docker(self, *args: str, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
        return run("docker", *args, env=self.env, timeout=timeout, **kw)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.saved:
            self.restored = restore(self.saved)
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-R", str(self.root / "exec")], capture_output=True)
        if self.lock is not None:  # closing the descriptor releases the lock
            os.close(self.lock)
            self.lock = None


# --- base image, wheels, build -------------------------------------------------------------------
def apt_mirror() -> str:
    """The Debian mirror apt's own sources name (deb822 or one-line format)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    texts = [p.read_text() for p in sources if p.is_file()]
    for text in texts:
        for url in re.findall(r"^(?:URIs:|deb(?:\s+\[[^\]]*\])?)[ \t]+(\S+)", text, flags=re.M):
            if "/debian" in url and "security" not in url:  # not a third-party repository
                return url
    return "http://deb.debian.org/debian"


def make_base(daemon: Dockerd, name: str = BASE_IMAGE) -> str:
    """``name`` in the daemon: a debootstrap rootfs (made once, cached) imported with docker."""
    if daemon.docker("images", "-q", name).stdout.strip():
        return name
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        tmp = CACHE / "rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "bookworm", str(tmp), apt_mirror(), timeout=1800)
        tmp.rename(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run("docker", "import", "-", name, env=daemon.env, stdin=tar.stdout)
    tar.wait()
    return name


def torch_pins(torch: str) -> list[str]:
    """The variant's torch and torchvision pins. ``cpu``: the CPU build in pip's configured
    ``find-links`` directory (with the torchvision made for it), else CI's; ``gpu``: CI's."""
    cpu = sorted(w for d in find_links() for w in Path(d).glob("torch-*+cpu-cp311-*.whl"))
    if torch != "cpu" or not cpu:
        return [line for line in ci_constraints() if line.startswith(("torch==", "torchvision=="))]
    version = cpu[-1].name.split("-")[1]  # e.g. 2.13.0+cpu
    major, minor = (int(v) for v in version.split(".")[:2])
    return [f"torch=={version}", f"torchvision==0.{minor + 15}.*"] if major == 2 else [f"torch=={version}"]


def find_links() -> list[str]:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True).stdout
    dirs = re.findall(r"find-links='([^']+)'", listed)
    return [d for d in dirs if Path(d).is_dir()]


def ci_constraints() -> list[str]:
    lines = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def prepare_wheels(torch: str = "cpu", dest: Path = ROOT / "docker" / "wheels") -> Path:
    """docker/wheels/: pflower's dependencies and its build backend, downloaded once into the
    cache (per variant) and hard-linked (or copied) into the build context."""
    pins = [*[c for c in ci_constraints() if not c.startswith(("torch==", "torchvision=="))],
            *torch_pins(torch)]
    cache = CACHE / f"wheels-{torch}"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "constraints.txt").write_text("\n".join(pins) + "\n")
    if not ((cache / "pins").exists() and (cache / "pins").read_text() == "\n".join(pins)):
        run(sys.executable, "-m", "pip", "download", "-q", "-d", str(cache),
            "-c", str(cache / "constraints.txt"), str(ROOT), "hatchling", timeout=3600)
        # A dependency published as source only (antlr4-python3-runtime, Hydra's) is built into
        # a wheel here: the image installs wheels, with no build backend of its own.
        for sdist in [*cache.glob("*.tar.gz"), *cache.glob("*.zip")]:
            run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(cache), str(sdist))
            sdist.unlink()
        (cache / "pins").write_text("\n".join(pins))  # downloaded with these pins: reused
    for stale in dest.glob("*.whl"):
        stale.unlink()
    for wheel in [*cache.glob("*.whl"), cache / "constraints.txt"]:
        target = dest / wheel.name
        target.unlink(missing_ok=True)
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)
    return dest


def build(daemon: Dockerd, base: str, tag: str = "pflower:latest") -> str:
    """``docker build`` of docker/Dockerfile on the repository (its .dockerignore applies)."""
    args = ("-q", "-f", str(ROOT / "docker" / "Dockerfile"), "--build-arg", f"BASE={base}")
    # The dependencies' stage tagged first: an untagged stage is what ``prune`` removes, and
    # with it the cache that spares the next build the ~1.5 min install and venv copy.
    daemon.docker("build", *args, "--target", "deps", "-t", f"{tag}-deps", str(ROOT), timeout=3600)
    daemon.docker("build", *args, "-t", tag, str(ROOT), timeout=3600)
    daemon.docker("image", "prune", "-f")  # the images an earlier build of ``tag`` left untagged
    return tag


def prepare(tag: str, torch: str = "cpu") -> str:
    """Base, wheels and ``tag`` built on a daemon of our own, stopped again: the cache warmed."""
    root = Path(tempfile.mkdtemp(prefix="pfd-prep-", dir="/tmp"))  # a short socket path
    daemon = Dockerd(root)
    try:  # the socket's folder goes whether or not the daemon started
        daemon.start()
        base = make_base(daemon)
        prepare_wheels(torch)
        return build(daemon, base, tag)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help=f"debootstrap a Debian base and import it as {BASE_IMAGE}")
    p_wheels = sub.add_parser("wheels", help="download every dependency into docker/wheels/")
    p_wheels.add_argument("--torch", choices=("cpu", "gpu"), default="cpu")
    p_build = sub.add_parser("build", help="docker build (with the wheels in docker/wheels/)")
    p_build.add_argument("--base", default="python:3.11-slim")
    p_build.add_argument("--tag", default="pflower:latest")
    p_prep = sub.add_parser("prepare", help="base, wheels and build on a Docker daemon started here")
    p_prep.add_argument("--tag", default="pflower:latest")
    p_prep.add_argument("--torch", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()
    if args.command == "prepare":
        print(prepare(args.tag, args.torch))
        return
    # The user's own daemon (DOCKER_HOST or the default socket), not one started here.
    daemon = Dockerd(Path("/nonexistent"))
    daemon.sock = Path(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://"))
    if args.command == "base":
        print(make_base(daemon))
    elif args.command == "wheels":
        print(prepare_wheels(args.torch))
    else:
        print(build(daemon, args.base, args.tag))


if __name__ == "__main__":
    main()
