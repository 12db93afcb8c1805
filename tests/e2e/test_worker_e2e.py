"""The long-lived ClientApp worker (deploy/worker.py) in the namespace deployment.

- Ditto over 2 rounds, 8 clients on the 4 SuperNodes (personal state carried from round to
  round on each node) gives exactly what the same job gives in-process (tests/fake_grid.py:
  every client's messages in one process, a fresh context each): the same metrics every round
  and the same personal models on disk, bit for bit; every message of a node ran in its one
  worker process, and a node's two clients travelled in one bundled message a phase
  (task/core/bundles.py) over the real transport. (The reference was a second deployment in
  Flower's default isolation, a fresh ``flwr-clientapp`` per message: ~2.5 min of the suite
  for what the in-process run shows in 20 s.)
- A second run whose code changed runs the new code (the worker re-execs for a new run: the
  old modules would stay in ``sys.modules`` otherwise).
- A worker killed while it runs a message is restarted by its supervisor; the SuperNode
  answers the lost message with an error once the task's heartbeat lapses (a rejected reply:
  the round goes on without that client), and the run completes, with every client in its
  last round.

Skipped where network namespaces cannot be made (as tests/e2e/test_deployment.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..fake_grid import InProcessRunner
from .conftest import NETWORK, ROOT
from .test_deployment import NETNS, NODES, TINY, UNAVAILABLE, UP, _saved_states, netns

pytestmark = [pytest.mark.slow, NETWORK, pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))]
BASE = f"{TINY} strategy=ditto local_epochs=1"
CLIENTS = 2 * NODES  # two a node (TINY's 2 domains x 4): a phase's messages to a node go as one bundle
DITTO = f"{BASE} dataset.clients_per_domain=4 num_rounds=2 eval_every=2"
VARYING = {"seconds"}  # a row's keys that may differ between two runs of the same job
MARKER = "pflower test: the changed ClientApp"


def flwr_run(lab: Path, app: Path, out: Path, overrides: str, wait: bool = True):
    """`flwr run` of ``app`` on the lab; ``wait``: until it ends (the run's rows), else the process."""
    env = {**os.environ, "FLWR_HOME": str(lab / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with (lab / f"flwr-run-{out.name}.log").open("w") as log:
        proc = subprocess.Popen(["flwr", "run", str(app), "pflower-netns", "--stream", "--run-config",
                                 f'overrides="{overrides} output_dir={out}"'], env=env, cwd=app,
                                stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    proc.wait(timeout=600)
    return rows_of(out, lab / f"flwr-run-{out.name}.log")


def rows_of(out: Path, log: Path, timeout: float = 600) -> list[dict]:
    """The run's rows once it has ended: `flwr run --stream` may return while the run goes on,
    and the ServerApp writes results.json last."""
    deadline = time.monotonic() + timeout
    while not (out / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert (out / "results.json").exists(), log.read_text()[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def states(state_dirs: dict[int, Path]) -> dict[int, dict[str, tuple[int, str]]]:
    """Per client, its state files' (round, digest), keyed by file name."""
    saved = {c: _saved_states(folder) for c, folder in state_dirs.items()}
    return {c: {Path(k).name: v for k, v in files.items()} for c, files in saved.items()}


def node_states(lab: Path) -> dict[int, dict[str, tuple[int, str]]]:
    """``states`` of every client, in the state directory of the node that hosts it."""
    return states({int(d.name.removeprefix("client-")): d for d in lab.glob("node-*/state/client-*")})


def down(root: Path) -> None:
    subprocess.run([*NETNS, "--dir", str(root), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Ditto in-process (tests/fake_grid.py: the real ServerApp and ClientApp handlers, Flower's
    encoding, a fresh ClientApp context a message), personal state in files as on the nodes:
    its rows and the personal states it left."""
    root = tmp_path_factory.mktemp("in-process")
    runner = InProcessRunner(root)
    out = runner.run("run", f"{DITTO} client_state_dir={root / 'state'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, states({c: root / "state" / f"client-{c}" for c in range(CLIENTS)})


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker").resolve() / "deployment"
    try:
        netns(root, *UP)
        yield root
    finally:
        down(root)


def node_log(lab: Path, node: int) -> str:
    return (lab / f"node-{node}" / "supernode.log").read_text()


def test_worker_gives_what_the_in_process_run_gives(reference, lab):
    rows = flwr_run(lab, ROOT, lab / "run", DITTO)
    ref_rows, ref_states = reference
    assert [{k: v for k, v in r.items() if k not in VARYING} for r in rows] == \
           [{k: v for k, v in r.items() if k not in VARYING} for r in ref_rows]
    assert node_states(lab) == ref_states and all(ref_states.values()) and len(ref_states) == CLIENTS
    assert sorted(int(c) for c in rows[-1]["per_client_accuracy"]) == list(range(CLIENTS))
    for node in range(NODES):  # one worker process ran every message of the node
        text = node_log(lab, node)
        assert text.count("serving ClientApp tasks") == 1, text[-3000:]
        assert text.count("pflower worker: done in") == text.count("Receiving:") >= 3
        # Two rounds: two train messages at every node, not four (one per client and round).
        assert text.count("Receiving: train message") == 2, text[-3000:]


TOP_LEVEL_SKIPPED = {".venv", ".git", "outputs", "data", "docker", "tests", "bench", "sweeps", "multirun"}


def _not_the_app(folder: str, names: list[str]) -> set[str]:
    """What copytree leaves out: the checkout's own top-level folders (not task/data), caches."""
    top = Path(folder).resolve() == ROOT.resolve()
    return {n for n in names if (top and n in TOP_LEVEL_SKIPPED) or n == "__pycache__" or n.endswith(".pyc")}


def changed_copy(dest: Path) -> Path:
    """The app with a ClientApp that announces itself when imported (a new FAB hash)."""
    shutil.copytree(ROOT, dest, ignore=_not_the_app)
    client = dest / "client_app.py"
    client.write_text(client.read_text() + f"\nprint({MARKER!r}, file=sys.stderr, flush=True)\n")
    return dest


def test_second_run_with_changed_code_runs_the_new_code(lab, tmp_path):
    before = {n: node_log(lab, n) for n in range(NODES)}
    rows = flwr_run(lab, changed_copy(tmp_path / "app"), lab / "changed", f"{TINY} num_rounds=1")
    assert [r["round"] for r in rows] == [1]
    for node in range(NODES):
        new = node_log(lab, node)[len(before[node]):]
        assert MARKER not in before[node] and MARKER in new, new[-3000:]
        if "pflower worker: done" in before[node]:  # it had run the old code (the first test)
            assert "restarting" in new.split(MARKER)[0]  # and re-exec'd before importing the new


def worker_pid(node: int) -> int:
    pids = subprocess.run(["ip", "netns", "pids", f"pfd-node{node}"], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        with Path(f"/proc/{pid}/cmdline").open("rb") as f:
            argv = f.read().split(b"\0")
        if b"serve" in argv and any(a.endswith(b"worker.py") for a in argv):
            return int(pid)
    raise AssertionError(f"no worker on node {node}: {pids}")


def test_killed_worker_is_restarted_and_the_run_completes(lab):
    victim, out = NODES - 1, lab / "killed"
    overrides = f"{BASE} num_rounds=3 eval_every=3 min_replies=2 round_timeout=90"
    began = "pflower worker: running train message"
    seen = node_log(lab, victim).count(began)
    run = flwr_run(lab, ROOT, out, overrides, wait=False)
    try:
        deadline = time.monotonic() + 300
        while node_log(lab, victim).count(began) < seen + 2:
            assert run.poll() is None and time.monotonic() < deadline, "no round-2 message at the victim"
            time.sleep(0.2)
        killed = worker_pid(victim)
        os.kill(killed, signal.SIGKILL)  # a crash while it runs its round-2 training message
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    rows = rows_of(out, lab / f"flwr-run-{out.name}.log")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # The SuperNode answered the lost message with an error (its task's heartbeat lapsed): a
    # rejected reply, the round aggregated the others.
    assert [r.get("rejected_replies", 0) for r in rows] == [0, 1, 0], rows
    assert f"rejected reply from client {victim}" in (lab / f"flwr-run-{out.name}.log").read_text()
    assert sorted(int(c) for c in rows[2]["per_client_accuracy"]) == list(range(NODES))
    log = node_log(lab, victim)
    assert "pflower supervisor: worker exited with -9; restarting" in log
    assert worker_pid(victim) != killed
