"""One long-lived ClientApp process per SuperNode (Flower 1.41, ``--isolation process``).

By default a Flower 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for every
message (``--isolation subprocess``; ``flower-superexec`` does the same with ``--isolation
process``): Python, Flower's runtime, torch and the app are loaded again each time, 5-8 s
of CPU per message before any training. This worker runs every message in one process
instead. In a loop it acquires the SuperNode's next ClientApp task from its Runtime API
(signed with the SuperExec secret, ``--superexec-auth-secret-file``), pulls the task's
input, runs the ClientApp and pushes the reply and the task's output, with Flower 1.41's own
functions (``flwr.supernode.runtime.run_clientapp``: ``pull_task_input``, ``push_message``,
``push_task_output``; the task heartbeat; the FAB install and ``get_load_client_app_fn``).

- A task of another run (hence possibly another FAB: a new FAB always comes with a new run)
  makes the worker re-exec itself first, the task's token handed on: the app's modules stay
  in ``sys.modules``, so without a fresh process a second run with changed code would run
  the old code, and process-wide settings one run's config made would leak into the next.
- Flower's task heartbeat raises SIGINT in the process when the SuperNode refuses it (the
  task was given up): the task is abandoned and the worker re-execs (the app was
  interrupted at an arbitrary point; a fresh process holds none of its half-made state).
  A refusal once the reply is pushed is stale and ignored: the SuperNode ends the task's
  token when the reply arrives, and the heartbeat thread may be mid-call just then.
- A crash (any exit) is restarted by the supervisor, ``node``: it starts the SuperNode and
  the worker side by side, restarts the worker with a backoff, and exits with the
  SuperNode's code when the SuperNode exits (compose's ``restart:`` then restarts both).

    python deploy/worker.py node -- flower-supernode --isolation process ... # supervisor
    python deploy/worker.py serve --runtime-api-address 127.0.0.1:9094 --secret-file s

``node`` makes a random secret (a 0600 file) for each start and gives it to both the
SuperNode and the worker; the Runtime API listens on the SuperNode's loopback (its own
network namespace or container), so nothing outside the node can reach it.

This file imports nothing of pflower (task/, strategies/): the app comes from the FAB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path

RUNTIME_ADDRESS = "127.0.0.1:9094"  # flower-supernode's default Runtime API (--host, --port)
POLL_S = float(os.environ.get("PFLOWER_WORKER_POLL_S", "0.2"))  # local HTTP call, ~1 ms
# The SuperNode creates a task before the message's objects have arrived from the SuperLink.
# flwr-clientapp pulls them backing off 1, 2, 4, 8 s (harmless after its seconds-long start);
# a worker that is already waiting would sleep through most of a round: it polls its own
# loopback every 50 ms, backing off to 0.5 s at most.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5
TOKEN_ENV = "PFLOWER_WORKER_TOKEN"  # a claimed task handed on across a re-exec
RUN_ENV = "PFLOWER_WORKER_RUN"


class TaskAbandoned(BaseException):  # noqa: N818 -- not an Exception: the app must not catch it
    """The SuperNode refused the task's heartbeat: the task is no longer ours."""


@dataclass(frozen=True)
class Endpoint:
    """Where the SuperNode's Runtime API is and how to reach it."""

    address: str = RUNTIME_ADDRESS
    root_certificates: str | None = None  # TLS (a Runtime API on another host), else plain

    @property
    def insecure(self) -> bool:
        return self.root_certificates is None

    def certificates(self) -> bytes | None:
        return Path(self.root_certificates).read_bytes() if self.root_certificates else None


# --- talking to the Runtime API ------------------------------------------------------------------
def acquirer(endpoint: Endpoint, secret: bytes | None):
    """A Runtime API client for ``AcquireTask``, signed with the SuperExec secret."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    return RuntimeHttpClient.from_server_address(
        server_address=endpoint.address, insecure=endpoint.insecure,
        root_certificates=endpoint.certificates(), interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())


def acquire(client) -> tuple[str, int, str] | None:
    """Claim the oldest pending ClientApp task: (token, run id, FAB hash), or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    if not (res.HasField("task") and res.token):
        return None
    return res.token, int(res.task.run_id), res.task.fab_hash


def task_client(endpoint: Endpoint, token: str):
    """A Runtime API client for one task (its token on every call), as flwr-clientapp makes."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=endpoint.address, insecure=endpoint.insecure,
        root_certificates=endpoint.certificates(), retry_invoker=retry,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)])
    return client, retry


def pull_task_input(client):
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with the worker's short pull
    backoff (the same calls, in the same order): (message, context, run, fab)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not in the tree
    return message, context, run, fab


# --- one task ------------------------------------------------------------------------------------
def run_task(endpoint: Endpoint, token: str) -> dict[str, float]:
    """Pull the task's input, run the ClientApp on it, push the reply and the task's output:
    ``flwr.supernode.runtime.run_clientapp.run_clientapp`` without its process exit.
    Returns the wall seconds of its stages (pull, app, push). An exception of the app becomes
    an error reply (as in Flower); ``TaskAbandoned`` and ``SystemExit`` pass through, once the
    task's output is pushed."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client, retry = task_client(endpoint, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context = message = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks = {"start": time.perf_counter()}
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks["pull"] = time.perf_counter()
        log(INFO, "pflower worker: running %s message of run %d", message.metadata.message_type, run.run_id)
        install_from_fab(fab.content, skip_prompt=True)  # a no-op once this FAB is installed
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        reply = load(run.fab_id, run.fab_version, fab.hash_str)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        marks["app"] = time.perf_counter()
    except Exception as ex:  # noqa: BLE001 -- the app's error is the reply, as in flwr-clientapp
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(ex)}:<'{ex}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                _task["replied"] = True
        finally:
            retry.max_tries = 1  # the task's output once: a refused task must not block the worker
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as ex:  # noqa: BLE001 -- e.g. the token of an abandoned task
                log(WARNING, "pflower worker: task output not pushed: %s", ex)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    marks["push"] = time.perf_counter()
    names = [k for k in ("start", "pull", "app", "push") if k in marks]
    return {b: marks[b] - marks[a] for a, b in zip(names, names[1:], strict=False)}


# --- the loop ------------------------------------------------------------------------------------
_task = {"running": False, "replied": False}  # read by the SIGINT handler


def _on_sigint(_signum: int, _frame) -> None:
    """Flower's heartbeat raises SIGINT when the SuperNode refuses the task: abandon it,
    unless its reply is pushed already (a stale refusal: the task is done). When idle,
    SIGINT (Ctrl-C) stops the worker."""
    if _task["running"]:
        if _task["replied"]:
            return
        raise TaskAbandoned
    raise SystemExit(0)


def _on_sigterm(_signum: int, _frame) -> None:
    raise SystemExit(0)


def reexec(token: str | None, run_id: int | None) -> None:
    """Replace this process by a fresh worker, which first runs the claimed task ``token``."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, RUN_ENV)}
    if token:
        env[TOKEN_ENV], env[RUN_ENV] = token, str(run_id)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def serve(endpoint: Endpoint, secret: bytes | None) -> None:
    """Run ClientApp tasks until stopped; re-exec for another run or an abandoned task."""
    from flwr.supercore import log
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)  # as the SuperNode's lines (deploy/supernode.py)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    client = acquirer(endpoint, secret)
    loaded_run = int(os.environ[RUN_ENV]) if RUN_ENV in os.environ else None
    claimed = os.environ.pop(TOKEN_ENV, None)
    os.environ.pop(RUN_ENV, None)
    log(INFO, "pflower worker %d: serving ClientApp tasks of %s", os.getpid(), endpoint.address)
    while True:
        try:
            if claimed is None:
                task = acquire(client)
                if task is None:
                    time.sleep(POLL_S)
                    continue
                token, run_id, fab_hash = task
                if loaded_run is not None and run_id != loaded_run:
                    log(INFO, "pflower worker: run %d (FAB %s...) after run %d: restarting",
                        run_id, fab_hash[:12], loaded_run)
                    client.close()
                    reexec(token, run_id)
                loaded_run = run_id
            else:
                token, claimed = claimed, None
            begun, cpu = time.perf_counter(), time.process_time()
            _task.update(running=True, replied=False)
            try:
                stages = run_task(endpoint, token)
            finally:
                _task["running"] = False
            log(INFO, "pflower worker: done in %.2f s (%.2f s CPU): %s",
                time.perf_counter() - begun, time.process_time() - cpu,
                ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
        except TaskAbandoned:
            log(WARNING, "pflower worker: task abandoned (heartbeat refused or SIGINT): restarting")
            client.close()
            reexec(None, None)


# --- the supervisor ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In a child: SIGKILL when the supervisor dies (Linux prctl PR_SET_PDEATHSIG, kept
    across the worker's re-execs), so that a killed supervisor leaves no orphan behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _secret_file() -> Path:
    """A fresh random SuperExec secret, readable by this user only, for one SuperNode start."""
    fd, name = tempfile.mkstemp(prefix="pflower-superexec-", suffix=".secret")
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return Path(name)


def worker_command(endpoint: Endpoint, secret: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--runtime-api-address",
           endpoint.address, "--secret-file", str(secret)]
    return cmd + (["--root-certificates", endpoint.root_certificates] if endpoint.root_certificates else [])


def supernode_process(supernode: list[str], flower_pull: bool) -> list[str]:
    """``flower-supernode ...`` as deploy/supernode.py runs it (a short backoff when it pulls a
    message's objects from the SuperLink), unless ``flower_pull`` keeps Flower's own."""
    if flower_pull or not supernode or Path(supernode[0]).name != "flower-supernode":
        return supernode
    return [sys.executable, str(Path(__file__).resolve().with_name("supernode.py")), *supernode[1:]]


def supervise(supernode: list[str], endpoint: Endpoint, backoff_max: float = 10,
              flower_pull: bool = False) -> int:
    """Run ``supernode`` (given the secret) and a worker beside it; restart the worker whenever
    it exits; return the SuperNode's exit code once it exits (the worker is then stopped)."""
    supernode = supernode_process(supernode, flower_pull)
    secret = _secret_file()
    node = subprocess.Popen([*supernode, "--superexec-auth-secret-file", str(secret)],
                            preexec_fn=_die_with_parent)
    stopping = False

    def stop(_signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        node.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker, started, restarts = None, 0.0, 0
    try:
        while node.poll() is None:
            if not stopping and (worker is None or worker.poll() is not None):
                if worker is not None:
                    restarts = 0 if time.monotonic() - started > 60 else restarts + 1
                    print(f"pflower supervisor: worker exited with {worker.returncode}; restarting "
                          f"(restart {restarts})", file=sys.stderr, flush=True)
                    time.sleep(min(2.0 ** restarts - 1, backoff_max))
                worker = subprocess.Popen(worker_command(endpoint, secret), preexec_fn=_die_with_parent)
                started = time.monotonic()
            time.sleep(0.2)
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=10)
            worker.kill()
        secret.unlink(missing_ok=True)
    return node.returncode


# --- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run ClientApp tasks of one SuperNode in this process"),
                       ("node", "supervise a SuperNode (the command after --) and its worker")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--runtime-api-address", default=RUNTIME_ADDRESS)
        p.add_argument("--root-certificates", help="CA of a TLS Runtime API (default: plain HTTP)")
    serve_p = sub.choices["serve"]
    serve_p.add_argument("--secret-file", type=Path, help="the SuperNode's SuperExec secret")
    node_p = sub.choices["node"]
    node_p.add_argument("--flower-pull", action="store_true",
                        help="keep Flower's 1-10 s backoff when the SuperNode pulls a message's "
                             "objects (default: deploy/supernode.py's 0.1-1 s)")
    node_p.add_argument("supernode", nargs=argparse.REMAINDER,
                        help="-- flower-supernode ... --isolation process")
    args = parser.parse_args(argv)
    endpoint = Endpoint(args.runtime_api_address, args.root_certificates)
    if args.command == "serve":
        secret = args.secret_file.read_bytes() if args.secret_file else None
        serve(endpoint, secret)
    else:
        command = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
        if "--isolation" not in command:
            command += ["--isolation", "process"]
        sys.exit(supervise(command, endpoint, flower_pull=args.flower_pull))


if __name__ == "__main__":
    main()
