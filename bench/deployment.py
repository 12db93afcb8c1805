"""What a round costs in a real deployment, and where one message's time goes.

With Flower's default isolation (``--isolation subprocess``) a SuperNode starts a fresh
``flwr-clientapp`` process for every message, so a deployed round costs (messages per node)
x (one process: Python, imports, config, data, the personal state, training, the reply)
plus the transport. With pflower's worker (deploy/worker.py, ``--isolation process``, the
namespace deployment's default) one process per SuperNode runs every message, and what is
left is the work and the transport: the SuperNode pulls a message's objects from the
SuperLink backing off 1, 2, 4, 8 s, polls the SuperLink every 3 s when idle and handles one
message at a time; the ServerApp polls for the replies.

1. ``message``: one evaluate and one train message of the default job as ``flwr-clientapp``
   runs them, each in a fresh process per repeat, timed stage by stage (wall and CPU):
   interpreter start and exit, Flower's ClientApp runtime imports, torch, pflower's imports,
   the client half (config, data, method, state), the work (evaluate: a forward pass over the
   test split, the issue's "message whose training is empty"; train: the local epochs, whose
   first optimizer step also imports torch._dynamo, torch.optim's own cost), the reply's
   encoding. Beside them a bare ``python -c "import torch"`` (the yardstick: a message's
   fixed cost within 2x of it). With ``--before REV`` the same for pflower at git revision
   REV (a temporary worktree), so before and after are measured side by side.
2. ``round`` (root and ``ip netns`` needed): the default job on 4 namespace hosts brought up
   by deploy/netns.py (TLS and SuperNode authentication on), once per ``--isolations`` (both
   by default: before and after the worker), against the same job in simulation with 4
   SuperNodes: seconds per round (median past round 1), and with the worker its messages'
   wall and CPU seconds after warm-up split into pull (the task's input: waiting for the
   message's objects to reach the SuperNode), app (pflower) and push (the reply).
   ``--before REV`` runs REV's app on the same deployments too. Every run is waited for to
   its end (results.json): ``flwr run --stream`` was seen to return while the run went on.

    sudo .venv/bin/python bench/deployment.py [--rounds 3] [--repeats 3] [--before 3eb8456]
        [--skip-round | --skip-stages] [--isolations subprocess,process] [--overrides "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timeline

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent
STAGES = ("start", "flwr", "torch", "pflower_imports", "client_half", "work", "reply")

# Run in a fresh process, in the app's directory, as flwr-clientapp would: prints stage times.
# ``client_method`` is the client half (config, data, method module, personal state) in both
# the old and the new client_app.py.
MESSAGE = r"""
import json, sys, time
t = {"t0": time.perf_counter()}
c = {"t0": time.process_time()}
import flwr.supernode.runtime.run_clientapp  # what flwr-clientapp imports before the app
t["flwr"] = time.perf_counter(); c["flwr"] = time.process_time()
import torch
t["torch"] = time.perf_counter(); c["torch"] = time.process_time()
import client_app
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from task.core.messages import ARRAYS, CONFIG
from task.core.params import to_record
t["pflower_imports"] = time.perf_counter(); c["pflower_imports"] = time.process_time()
state_dir, overrides, cid, nodes, initial, kind = sys.argv[1:7]
from flwr.supercore.task_identity import TaskIdentity  # what flwr-clientapp sets from its task
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
node = {"partition-id": int(cid), "num-partitions": int(nodes), "state-dir": state_dir}
context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={"overrides": overrides},
                  node_config=node)
arrays = torch.load(initial, weights_only=True)
content = RecordDict({ARRAYS: to_record(arrays),
                      CONFIG: ConfigRecord({"server-round": 1, "client-id": int(cid)})})
kinds = {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}
msg = Message(content, dst_node_id=1, message_type=kinds[kind])
method = client_app.client_method(context, msg)
t["client_half"] = time.perf_counter(); c["client_half"] = time.process_time()
received, config = client_app._received(msg, method.device)
if kind == "train":
    upload = train_as_told(method, received, config).upload
else:  # scores the personal model: a forward pass over the test split, no optimizer
    method.evaluate(received, config)
    upload = {}
t["work"] = time.perf_counter(); c["work"] = time.process_time()
reply = to_record(upload)
t["reply"] = time.perf_counter(); c["reply"] = time.process_time()
print(json.dumps({"t": t, "c": c}))
"""


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of a child process."""
    before, began = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{args[:2]} in {cwd} failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - began, cpu, out


def initial_arrays(overrides: str, path: Path) -> None:
    """The run's initial model for the message (from the current tree: same in both versions)."""
    code = ("import sys, torch; sys.path.insert(0, '.'); from task.run.config import compose_config; "
            "from task.data.load import load_federation; from task.core.models import build_model; "
            f"cfg = compose_config({overrides!r}); fed = load_federation(cfg, torch.device('cpu')); "
            "torch.manual_seed(int(cfg.seed)); "
            "m = build_model(cfg.model, fed.input_shape, fed.num_classes); "
            f"torch.save(m.state_dict(), {str(path)!r})")
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, check=True)


def message_stages(app: Path, overrides: str, repeats: int, work: Path, kind: str
                   ) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each stage of one train message over ``repeats`` fresh
    processes (after one warm-up message that fills the node's disk cache, where the version
    has one). Interpreter start is the process's CPU time less what its stages used."""
    initial = work / "initial.pt"
    if not initial.exists():
        initial_arrays(overrides, initial)
    state = work / f"state-{app.name}-{kind}"
    shutil.rmtree(state, ignore_errors=True)
    runs: dict[str, list[dict]] = {"wall": [], "cpu": []}
    for i in range(repeats + 1):
        args = [PYTHON, "-c", MESSAGE, str(state), overrides, "0", "4", str(initial), kind]
        wall, cpu, out = timed(args, app)
        got = json.loads(out.strip().splitlines()[-1])
        if i == 0:
            continue
        for clock, marks, total in (("wall", got["t"], wall), ("cpu", got["c"], cpu)):
            order = ["t0", *STAGES[1:]]
            stage = {b: marks[b] - marks[a] for a, b in zip(order, order[1:], strict=False)}
            stage["total"] = total
            stage["start"] = total - (marks["reply"] - marks["t0"])  # before the first line, and exit
            runs[clock].append(stage)
    return {clock: {k: median([s[k] for s in stages]) for k in (*STAGES, "total")}
            for clock, stages in runs.items()}


def worktree(rev: str, work: Path) -> Path:
    path = work / f"before-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                   capture_output=True)
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


# --------------------------------------------------------------------------- rounds
def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def flwr(app: Path, env: dict, out: Path, overrides: str, extra: list[str]) -> list[dict]:
    """`flwr run`, then wait for the run's end: ``--stream`` was seen to return while the run
    went on, so the run has ended when the ServerApp has written results.json."""
    cmd = [str(BIN / "flwr"), "run", str(app), *extra, "--stream", "--run-config",
           f'overrides="{overrides} output_dir={out}"']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=app, timeout=3600)
    deadline = time.monotonic() + 3600
    while not (out / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    if not (out / "results.json").exists():
        sys.exit(f"flwr run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return rows_of(out)


def simulation(app: Path, overrides: str, work: Path) -> list[dict]:
    home = work / f"sim-home-{app.name}"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39093", "FLWR_LOCAL_CONTROL_API_PORT": "39094"}
    try:
        return flwr(app, env, work / f"sim-{app.name}", overrides,
                    ["--federation-config", "num-supernodes=4 client-resources-num-cpus=1"])
    finally:
        for pid in subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True,
                                  text=True).stdout.split():
            subprocess.run(["pkill", "-KILL", "-g", pid], capture_output=True)


def deployment(apps: list[Path], overrides: str, work: Path, isolation: str, stack: Path = ROOT,
               db: str = "file") -> dict[str, tuple[list[dict], dict, dict]]:
    """Each app's rows on 4 namespace hosts with ``isolation`` (``process``: pflower's worker)
    brought up by ``stack``'s deploy/netns.py, the worker's profile of its messages
    (deploy/worker.py logs each one's stages) and the round's timeline (bench/timeline.py)."""
    lab = work / f"lab-{isolation}-{stack.name}-{db}"
    netns = [PYTHON, str(stack / "deploy" / "netns.py"), "--dir", str(lab)]
    in_memory = ["--superlink-db", "memory"] if db == "memory" else []  # a flag older stacks lack
    subprocess.run([*netns, "up", "--nodes", "4", "--isolation", isolation, *in_memory], check=True,
                   capture_output=True)
    env = {**os.environ, "FLWR_HOME": str(lab / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        out = {}
        for app in apps:
            logs = [(lab / f"node-{n}" / "supernode.log") for n in range(4)]
            seen = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
            rows = flwr(app, env, work / f"deploy-{isolation}-{db}-{app.name}", overrides, ["pflower-netns"])
            texts = [log.read_text(errors="replace")[len(old):] for log, old in zip(logs, seen, strict=True)]
            out[app.name] = rows, worker_profile(texts), timeline.profile(texts, [r["seconds"] for r in rows])
        return out
    finally:
        subprocess.run([*netns, "down"], capture_output=True)


DONE = re.compile(r"pflower worker: done in ([\d.]+) s \(([\d.]+) s CPU\): (.*)")
RUNNING = re.compile(r"pflower worker: running (\w+) message")


def worker_profile(node_logs: list[str]) -> dict[str, dict[str, float]]:
    """Per message type, the median wall and CPU seconds and stages (pull, app, push) of the
    workers' messages after warm-up (each node's first message of a type left out)."""
    per_type: dict[str, list[dict[str, float]]] = {}
    for text in node_logs:
        kind, firsts = None, set()
        for line in text.splitlines():
            if m := RUNNING.search(line):
                kind = m.group(1)
            elif (m := DONE.search(line)) and kind:
                if kind not in firsts:
                    firsts.add(kind)
                    continue
                stages = dict(part.split(" ")[:2] for part in m.group(3).split(", "))
                per_type.setdefault(kind, []).append(
                    {"wall": float(m.group(1)), "cpu": float(m.group(2)),
                     **{k: float(v) for k, v in stages.items()}})
    return {kind: {k: median([r[k] for r in runs if k in r]) for k in runs[0]} | {"n": len(runs)}
            for kind, runs in per_type.items()}


def per_round(rows: list[dict]) -> float:
    seconds = [r["seconds"] for r in rows]
    return median(seconds[1:] or seconds)


# --------------------------------------------------------------------------- report
def report_stages(name: str, stages: dict[str, dict[str, float]], torch_s: dict[str, float]) -> None:
    for clock, s in stages.items():
        parts = "  ".join(f"{k} {s[k]:.2f}" for k in STAGES)
        print(f"  {name:>6} {clock:>4}: {parts} | total {s['total']:.2f} "
              f"= {s['total'] / torch_s[clock]:.2f}x import torch")


def report_rounds(rounds: int, sim: float, apps: list[Path], deployed: dict) -> None:
    print(f"default job, {rounds} rounds, s/round (median past round 1):")
    print(f"  simulation, 4 SuperNodes: {sim:.1f}")
    for isolation, by_app in deployed.items():
        for app in [a for a in apps if a.name in by_app]:
            name = "before" if app != ROOT else "after"
            rows, profile, times = by_app[app.name]
            dep = per_round(rows)
            print(f"  deployment, 4 namespace hosts, TLS + auth, --isolation {isolation} ({name}): "
                  f"{dep:.1f} = {dep / sim:.1f}x simulation")
            for kind, p in sorted(profile.items()):  # the worker's messages after warm-up
                stages = "  ".join(f"{k} {p[k]:.2f}" for k in ("pull", "app", "push") if k in p)
                print(f"    {kind:>9} x{p['n']}: {p['wall']:.2f} s wall, {p['cpu']:.2f} s CPU | {stages}")
            if isolation.startswith("process"):
                print(timeline.report(name, times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", help="git revision to compare against (e.g. the commit before)")
    parser.add_argument("--before-deploy", action="store_true",
                        help="--before's deployment too: REV's deploy/ scripts (SuperNode, worker), "
                             "not only its app")
    parser.add_argument("--superlink-memory", action="store_true",
                        help="also the current checkout with the SuperLink's state in memory "
                             "(netns.py up --superlink-db memory)")
    parser.add_argument("--overrides", default="", help="Hydra overrides of the job (default job: '')")
    parser.add_argument("--skip-round", action="store_true", help="per-message stages only")
    parser.add_argument("--skip-stages", action="store_true", help="rounds only")
    parser.add_argument("--isolations", default="subprocess,process",
                        help="deployments to time: subprocess (a fresh flwr-clientapp per message, "
                             "Flower's default), process (pflower's long-lived worker)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pflower-bench-deploy-"))
    apps = [ROOT]
    try:
        if args.before:
            apps.insert(0, worktree(args.before, work))
        torch_runs = [timed([PYTHON, "-c", "import torch"], ROOT) for _ in range(args.repeats)]
        bare = {"wall": median([r[0] for r in torch_runs]), "cpu": median([r[1] for r in torch_runs])}
        print(f"python -c 'import torch': {bare['wall']:.2f} s wall, {bare['cpu']:.2f} s CPU (median of "
              f"{args.repeats}); {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
        for kind in () if args.skip_stages else ("evaluate", "train"):
            print(f"one {kind} message of the default job, s per stage (median of fresh processes):")
            for app in apps:
                name = "before" if app != ROOT else "after"
                report_stages(name, message_stages(app, args.overrides, args.repeats, work, kind), bare)
        if args.skip_round:
            return
        overrides = f"{args.overrides} num_rounds={args.rounds}".strip()
        deployed = {}
        for iso in args.isolations.split(","):
            if args.before_deploy and args.before:  # each checkout on its own deploy/ scripts
                deployed[iso] = {**deployment(apps[:1], overrides, work, iso, stack=apps[0]),
                                 **deployment(apps[1:], overrides, work, iso)}
            else:
                deployed[iso] = deployment(apps, overrides, work, iso)
            if args.superlink_memory:
                deployed[f"{iso}, SuperLink in memory"] = deployment(apps[-1:], overrides, work, iso,
                                                                     db="memory")
        sim = per_round(simulation(ROOT, overrides, work))
        report_rounds(args.rounds, sim, apps, deployed)
    finally:
        for app in apps:
            if app != ROOT:
                drop_worktree(app)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
