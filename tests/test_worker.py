"""deploy/worker.py without a deployment: the Flower 1.41 internals it is built from, its
supervisor, and that it needs nothing of pflower (the app comes from the FAB).

The worker re-implements two of Flower's functions (``run_clientapp`` without its process
exit, ``pull_task_input`` with a short pull backoff) and calls Flower internals that are no
public API. A Flower release that changes them must fail here, loudly, before a deployment
runs old assumptions: compare the new source with deploy/worker.py, then update the digests.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy import worker

ROOT = Path(__file__).resolve().parent.parent
# sha256[:16] of the source of the Flower 1.41.0 functions deploy/worker.py mirrors.
MIRRORED = {"run_clientapp": "6ce09559f3a2f5dc", "pull_task_input": "5607a23e1673ee87",
            "push_message": "07cb512c93e065a9", "push_task_output": "9206407456e79e17"}


def test_the_flower_functions_the_worker_mirrors_are_unchanged():
    from flwr.supernode.runtime import run_clientapp as module

    for name, digest in MIRRORED.items():
        source = inspect.getsource(getattr(module, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
            f"flwr's {name} changed: compare it with deploy/worker.py, then update MIRRORED")


def test_the_flower_internals_the_worker_calls_have_the_shapes_it_expects():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    assert TaskType.CLIENT_APP == "flwr-clientapp"
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert {"task", "token"} <= set(AcquireTaskResponse.DESCRIPTOR.fields_by_name)
    assert {"run_id", "fab_hash"} <= set(Task.DESCRIPTOR.fields_by_name)
    pull = inspect.signature(pull_and_inflate_object_from_tree).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(pull)
    auth = inspect.signature(SuperExecAuthHttpInterceptor).parameters
    assert list(auth) == ["master_secret", "protected_methods"]
    assert list(inspect.signature(HeartbeatSender).parameters) == ["heartbeat_fn"]
    assert list(inspect.signature(make_task_heartbeat_fn_http).parameters) == ["client"]
    # The heartbeat's refusal reaches the worker as SIGINT (its handler abandons the task).
    assert "signal.raise_signal(signal.SIGINT)" in inspect.getsource(make_task_heartbeat_fn_http)
    for rpc in ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "PushMessages",
                "PushTaskOutput", "SendTaskHeartbeat", "ConfirmMessageReceived"):
        assert callable(getattr(RuntimeHttpClient, rpc)), rpc
    from flwr.supercore.auth import superexec_secret
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert '"--superexec-auth-secret-file"' in inspect.getsource(superexec_secret)
    options = _parse_args_run_supernode()._option_string_actions
    assert options["--isolation"].choices == ["subprocess", "process"]
    assert options["--port"].default == int(worker.RUNTIME_ADDRESS.rsplit(":", 1)[1])


def test_the_worker_imports_nothing_of_pflower():
    tree = ast.parse((ROOT / "deploy" / "worker.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] in ("task", "strategies", "client_app", "server_app")}


def test_supervisor_restarts_a_crashing_worker_and_ends_with_the_supernode(monkeypatch, capfd):
    # A "SuperNode" that lives 3 s and exits 7; a "worker" that crashes at once, every time.
    monkeypatch.setattr(worker, "worker_command",
                        lambda endpoint, secret: [sys.executable, "-c", "import sys; sys.exit(3)"])
    node = [sys.executable, "-c", "import sys, time, pathlib; secret = pathlib.Path(sys.argv[2]); "
            "assert secret.stat().st_size == 32 and secret.stat().st_mode & 0o077 == 0; "
            "print('secret', secret, file=sys.stderr); time.sleep(3); sys.exit(7)"]
    monkeypatch.setattr(worker.signal, "signal", lambda *a: None)  # keep pytest's handlers
    assert worker.supervise(node, worker.Endpoint(), backoff_max=0.5) == 7
    err = capfd.readouterr().err
    assert err.count("worker exited with 3; restarting") >= 2, err
    secret = Path(err.split("secret ", 1)[1].split()[0])
    assert not secret.exists()  # a fresh secret per start, removed at the end


@pytest.mark.parametrize(("argv", "expected"), [
    (["--", "flower-supernode", "--insecure"], ["flower-supernode", "--insecure", "--isolation", "process"]),
    (["flower-supernode", "--isolation", "process"], ["flower-supernode", "--isolation", "process"]),
])
def test_node_runs_the_supernode_with_process_isolation(monkeypatch, argv, expected):
    seen = {}
    monkeypatch.setattr(worker, "supervise", lambda cmd, endpoint, flower_pull: seen.setdefault("cmd", cmd))
    with pytest.raises(SystemExit):
        worker.main(["node", *argv])
    assert seen["cmd"] == expected


def test_supernode_pulls_objects_with_a_short_backoff():
    import functools

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    from deploy import supernode

    # The SuperNode pulls a message's objects with the pull_objects it imported by name.
    assert start_client_internal.pull_objects is inflatable_utils.pull_objects
    assert "obj_contents = pull_objects(" in inspect.getsource(start_client_internal._pull_and_store_message)
    assert inspect.signature(inflatable_utils.pull_objects).parameters["initial_backoff"].default == 1
    # Its loop's waits: 3 s between polls when no message came, 0.5 s for the reply.
    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert "time.sleep(3)" in loop and "run_id = _pull_and_store_message(" in loop
    assert "time.sleep(0.5)" in inspect.getsource(start_client_internal._push_messages)
    assert start_client_internal.time is time
    original = start_client_internal.pull_objects, start_client_internal._pull_and_store_message
    try:
        supernode.patch()
        patched = start_client_internal.pull_objects
        assert isinstance(patched, functools.partial) and patched.func is original[0]
        assert patched.keywords == {"initial_backoff": 0.1, "backoff_cap": 1.0}
    finally:
        start_client_internal.pull_objects, start_client_internal._pull_and_store_message = original
        start_client_internal.time = time
    node = ["flower-supernode", "--insecure"]
    assert worker.supernode_process(node, flower_pull=True) == node
    assert worker.supernode_process(node, flower_pull=False)[1:] == [str(ROOT / "deploy" / "supernode.py"),
                                                                     "--insecure"]


class _Heartbeat:
    def __init__(self, fn) -> None:
        self.is_running = False

    def start(self) -> None:
        self.is_running = True

    def stop(self) -> None:
        self.is_running = False


def _refused_when(stage: str, monkeypatch) -> list[str]:
    """Fake Flower calls around ``worker.run_task``: the heartbeat's refusal (SIGINT, as Flower's
    heartbeat thread raises it) comes while the ``stage`` call runs. Returns the calls made."""
    import flwr.cli.install
    import flwr.clientapp.utils
    import flwr.supercore.heartbeat
    import flwr.supernode.runtime.run_clientapp as run_clientapp

    calls: list[str] = []

    def call(name: str, result=None):
        def fn(*_args, **_kwargs):
            calls.append(name)
            if name == stage:
                signal.raise_signal(signal.SIGINT)
            return result
        return fn

    message = SimpleNamespace(metadata=SimpleNamespace(message_type="train"))
    run = SimpleNamespace(run_id=1, fab_id="f", fab_version="v")
    monkeypatch.setattr(worker, "task_client", lambda endpoint, token: (
        SimpleNamespace(close=lambda: None), SimpleNamespace(max_tries=None)))
    monkeypatch.setattr(worker, "pull_task_input", lambda client: (
        message, SimpleNamespace(), run, SimpleNamespace(content=b"", hash_str="h")))
    monkeypatch.setattr(flwr.supercore.heartbeat, "HeartbeatSender", _Heartbeat)
    monkeypatch.setattr(flwr.cli.install, "install_from_fab", lambda *a, **k: None)
    monkeypatch.setattr(flwr.clientapp.utils, "get_load_client_app_fn",
                        lambda **k: lambda *ids: call("app", SimpleNamespace()))
    monkeypatch.setattr(run_clientapp, "push_message", call("push_message"))
    monkeypatch.setattr(run_clientapp, "push_task_output", call("push_task_output"))
    monkeypatch.setattr(worker, "_task", {"running": True, "replied": False})  # as serve() sets it
    previous = signal.signal(signal.SIGINT, worker._on_sigint)
    try:
        worker.run_task(worker.Endpoint(), "token")
    finally:
        signal.signal(signal.SIGINT, previous)
    return calls


def test_a_heartbeat_refused_after_the_reply_is_pushed_leaves_the_worker_serving(monkeypatch):
    # CI once saw this race: the SuperNode ends a task's token when its reply arrives, and a
    # heartbeat sent just then is refused; the task is done, the worker must not restart.
    assert _refused_when("push_task_output", monkeypatch) == ["app", "push_message", "push_task_output"]


def test_a_heartbeat_refused_while_the_app_runs_abandons_the_task(monkeypatch):
    with pytest.raises(worker.TaskAbandoned):
        _refused_when("app", monkeypatch)
