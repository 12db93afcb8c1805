"""A real deployment on network-namespace hosts, brought up by deploy/netns.py as a user would.

One SuperLink and four SuperNodes, each on a host of its own with its own address, TLS and
SuperNode authentication on (the script's defaults), and beside each SuperNode its
long-lived ClientApp worker (deploy/worker.py, ``--isolation process``: the default);
`flwr run` submits from the root namespace over TLS. Two things differ from the defaults, to
halve each round's cost, neither of them what is tested: the SuperLink keeps its state in
memory (``--superlink-db memory``: its SQLite file costs ~2x a round, docs/deployment.md;
tests/e2e/test_compose.py runs the file) and the job's model is a small MLP (~100 KB a
client, not the digits CNN's 1.4 MB: Flower's object transport moves ~1 MB/s here).
The tests check what a lab relies on:

- a SuperNode whose key is not registered, and one that speaks plain HTTP, are refused and
  never receive a message;
- a SuperNode killed mid-round (SIGKILL, as a crash) leaves the run going: that round
  aggregates the clients that answered within ``round_timeout`` and metrics.jsonl names the
  missing client; restarted with the same key and state directory (once the SuperLink has
  marked it offline: Flower 1.41 does not re-activate a node id it counts online), the node
  reads back exactly the personal model it had saved (the digest it logs equals the file's)
  and trains on from it.

Flower 1.41 hard-codes a SuperNode's heartbeat interval (30 s, ``HEARTBEAT_DEFAULT_INTERVAL``
in flwr/common/constant.py; no flag or environment variable sets it) and counts a node online
for 2 intervals after its last heartbeat: a killed node is marked offline after up to 60 s.
The SuperNodes here run with 10 s, the least the SuperLink accepts (``HEARTBEAT_MIN_INTERVAL``),
set by a ``sitecustomize`` on their PYTHONPATH (``HEARTBEAT_10S``): the fault test then waits
~20 s, not ~60 s, for the offline mark. Only the node's heartbeat changes; the SuperLink, the
ServerApp and the ClientApp processes keep Flower's defaults.

Skipped only where network namespaces cannot be made (not root, no `ip netns`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploy import pki
from task.core.state import META, state_digest

from ..helpers import TINY as DATA
from .conftest import NETWORK, ROOT, namespaces_unavailable

NETNS = [sys.executable, str(ROOT / "deploy" / "netns.py")]
NODES = 4
TINY = f"{DATA} model=mlp model.hidden=32"
UP = ("up", "--nodes", str(NODES), "--superlink-db", "memory")
# A healthy round of this job (four nodes on 2 cores) takes ~4-12 s. The
# round with the killed node ends sooner than this: once the node misses its heartbeats (~20 s,
# HEARTBEAT_10S) the SuperLink answers for it. An upper bound only; a slower machine can raise it.
ROUND_TIMEOUT = float(os.environ.get("PFLOWER_E2E_ROUND_TIMEOUT", "60"))
VICTIM = 3
# Loaded by every Python process started with the lab's environment; acts in SuperNodes and
# their ClientApps (deploy/worker.py, or flwr-clientapp in the default isolation) only. A
# SuperNode also expires a task whose ClientApp sent no heartbeat for 2 intervals (its
# in_memory_corestate's copy of the constant): a killed worker's message is answered with an
# error after ~20 s, not ~60 s; the ClientApps' senders keep within it.
HEARTBEAT_10S = """\
import sys
_argv0 = sys.argv[0] if sys.argv else ""
_supernode = _argv0.endswith(("flower-supernode", "deploy/supernode.py"))
if _supernode or _argv0.endswith(("worker.py", "flwr-clientapp")):
    import flwr.supercore.heartbeat as _sender
    _sender.HEARTBEAT_DEFAULT_INTERVAL = 10
if _supernode:
    import flwr.supercore.corestate.in_memory_corestate as _tasks
    import flwr.supernode.fleet_http_connection as _fleet
    _fleet.HEARTBEAT_DEFAULT_INTERVAL = _tasks.HEARTBEAT_DEFAULT_INTERVAL = 10
    print("pflower test: SuperNode heartbeat interval 10 s", file=sys.stderr, flush=True)
"""


UNAVAILABLE = namespaces_unavailable()
pytestmark = [pytest.mark.slow, NETWORK, pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))]


def netns(root: Path, *args: str, timeout: float = 180) -> str:
    """deploy/netns.py on ``root``; what it starts gets the 10 s SuperNode heartbeat."""
    site = root.parent / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(HEARTBEAT_10S)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([*NETNS, "--dir", str(root), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab").resolve() / "deployment"
    try:
        netns(root, *UP)
        yield root
    finally:
        subprocess.run([*NETNS, "--dir", str(root), "down"], capture_output=True, timeout=120)


def test_unregistered_key_and_plain_http_are_refused(lab, tmp_path):
    rogue_key, _ = pki.make_node_key(tmp_path, "rogue")  # a valid key the SuperLink never saw
    rogue = json.loads(netns(lab, "guest", "--key", str(rogue_key)))
    plain = json.loads(netns(lab, "guest", "--insecure"))
    for attempt in (rogue, plain):
        assert attempt["exit_code"] not in (None, 0) and attempt["received"] == 0, attempt
    assert "No SuperNode found with the given public key" in (lab / "superlink" / "superlink.log").read_text()
    assert "Failed to initialize the connection to the SuperLink" in Path(plain["log"]).read_text()
    # The SuperLink knows the four registered nodes only.
    listed = json.loads(netns(lab, "status"))["supernodes"]["nodes"]
    registered = json.loads((lab / "deployment.json").read_text())["node_ids"]
    assert sorted(int(n["node-id"]) for n in listed) == sorted(registered.values())


def _saved_states(state_dir: Path) -> dict[str, tuple[int, str]]:
    """{file: (round, digest)} of a client's state files, as task/core/state.py logs them."""
    out = {}
    for path in sorted(state_dir.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != META}
            out[str(path)] = (int(data[META]), state_digest(arrays))
    return out


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"flwr run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def test_killed_supernode_is_left_out_then_resumes_from_its_saved_state(lab):
    out, rounds = lab / "run", 8
    overrides = (f"{TINY} strategy=ditto num_rounds={rounds} eval_every={rounds} local_epochs=1 "
                 f"min_replies=2 round_timeout={ROUND_TIMEOUT} node_wait_timeout=120 output_dir={out}")
    env = {**os.environ, "FLWR_HOME": str(lab / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    node_log = lab / f"node-{VICTIM}" / "supernode.log"
    with (lab / "flwr-run.log").open("w") as log:
        run = subprocess.Popen(["flwr", "run", str(ROOT), "pflower-netns", "--stream", "--run-config",
                                f'overrides="{overrides}"'], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        # Kill the victim while it holds its round-2 training message: a crash mid-round.
        _wait_for(lambda: node_log.read_text().count("Receiving: train message") >= 2, 300,
                  "round-2 training message at the victim", run)
        netns(lab, "stop-node", str(VICTIM))
        saved = _saved_states(lab / f"node-{VICTIM}" / "state" / f"client-{VICTIM}")
        netns(lab, "start-node", str(VICTIM))
        run.wait(timeout=600)
        # `flwr run --stream` may return while the run goes on: results.json is written last.
        deadline = time.monotonic() + 600
        while not (out / "results.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        if run.poll() is None:
            run.kill()
    text = (lab / "flwr-run.log").read_text()
    assert run.returncode == 0 and (out / "results.json").exists(), text[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    missing = [r.get("missing_clients", []) for r in rows]
    # Round 2 went on without the victim: the others' updates were aggregated. The rounds that
    # start before the restarted node is back go on without it too (the SuperLink answers for
    # it at once): a few seconds each, while its restart takes ~25 s (the offline mark, then a
    # new SuperNode and worker); once back it misses no round.
    assert missing[1] == [VICTIM] and rows[1]["train_loss"] is not None, rows[1]
    back = next((i for i in range(2, rounds) if not missing[i]), rounds)
    assert missing[0] == [] and missing[1:back] == [[VICTIM]] * (back - 1), missing
    assert missing[back:] == [[]] * (rounds - back) and back < rounds, missing
    # The restarted node read back exactly what it had saved, then trained on from it.
    assert saved, "the victim had saved no state before it was killed"
    for node in range(NODES):  # every SuperNode, the restarted one too, ran with the 10 s heartbeat
        assert "SuperNode heartbeat interval 10 s" in (lab / f"node-{node}" / "supernode.log").read_text()
    assert node_log.read_text().count("SuperNode heartbeat interval 10 s") == 2
    restarted = node_log.read_text().split("Starting Flower SuperNode")[-1]
    for path, (saved_round, digest) in saved.items():
        if not path.endswith(".prev.npz"):
            assert f"of round {saved_round} read from {path} (digest {digest})" in restarted, path
    final = _saved_states(lab / f"node-{VICTIM}" / "state" / f"client-{VICTIM}")
    assert final[str(lab / f"node-{VICTIM}/state/client-{VICTIM}/personal.npz")][0] == rounds
    assert sorted(int(c) for c in rows[-1]["per_client_accuracy"]) == list(range(NODES))
    assert 0.25 < rows[-1]["personalized_accuracy"]["mean"] <= 1.0
