"""The local backend: a whole run in this process, without Flower's transport.

The real ServerApp (``server_app.main``: the door, the run folder, the round loop, the
outputs) drives ``LocalGrid``, which hands every message straight to client_app's handlers on
node contexts of its own: one node per client, as pflower-sim's simulation has, every message
and reply through Flower's protobuf encoding as the SuperLink would pass it. No SuperLink, no
Ray, no process per ClientApp: a run starts in seconds instead of ~28 s, with the same outputs
folder and the same numbers as ``flwr run`` for the same seed
(tests/e2e/test_local_backend.py compares them round by round).

A stop (Ctrl-C, SIGTERM, or the folder's stop file) acts before the next client's message:
the folder keeps the last finished round's checkpoint and says ``stopped`` (resumable with
``resume=<dir>``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import client_app
import server_app
from task.run.progress import PROGRESS_LINE
from task.run.runfolder import RunFolder, read_status

HANDLERS = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate,
            f"{MessageType.TRAIN}.personalize": client_app.personalize,
            f"{MessageType.EVALUATE}.new_client": client_app.new_client,
            MessageType.QUERY: client_app.query}
FIRST_NODE = 100

OnMessage = Callable[[str, int, int], None]


class LocalGrid(Grid):
    """Nodes ``FIRST_NODE + p`` serving partition p of ``num_nodes``; a message's reply is
    computed when it is pushed.

    ``wire``: every message and reply is encoded to Flower's protobuf and decoded again, as a
    transport would (a handler then never shares a tensor with the server). ``on_message(kind,
    done, total)`` is called after each message of a push (and with 0 before its first);
    ``stop()`` before each, and a reason it returns stops the run (``server_app.StopRequestError``).
    """

    def __init__(self, overrides: str, num_nodes: int, wire: bool = True, on_message: OnMessage | None = None,
                 stop: Callable[[], str | None] | None = None):
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0
        self.contexts = {
            FIRST_NODE + p: Context(run_id=1, node_id=FIRST_NODE + p, state=RecordDict(),
                                    node_config={"partition-id": p, "num-partitions": num_nodes},
                                    run_config={"overrides": overrides})
            for p in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.wire = wire
        self.on_message = on_message
        self.stop = stop

    def set_run(self, run):  # pragma: no cover - the ServerApp never asks
        pass

    @property
    def run(self):  # pragma: no cover - the ServerApp never asks
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = []
        for done, msg in enumerate(messages, 1):
            reason = self.stop() if self.stop is not None else None
            if reason is not None:
                raise server_app.StopRequestError(reason)
            if done == 1 and self.on_message is not None:  # a new phase begins
                self.on_message(str(msg.metadata.message_type), 0, len(messages))
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            reply = self.handle(through_wire(msg) if self.wire else msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            if self.on_message is not None:
                self.on_message(str(msg.metadata.message_type), done, len(messages))
        return ids

    def handle(self, msg: Message) -> Message | None:
        """The ClientApp handler's reply to ``msg`` (an error reply where the handler raised)."""
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            reply = HANDLERS[msg.metadata.message_type](msg, context)
        except Exception as err:  # noqa: BLE001 - a failing ClientApp becomes an error reply
            reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return through_wire(reply) if self.wire else reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def through_wire(msg: Message) -> Message:
    """``msg`` encoded to Flower's protobuf Message and decoded again (what a transport does)."""
    return message_from_proto(message_to_proto(msg))


def server_context(overrides: str) -> Context:
    """The ServerApp's context, as the SuperLink gives it (the run config's ``overrides``)."""
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config={"overrides": overrides})


@dataclass
class LocalOutcome:
    """How a local run ended: the folder's status, the signal that stopped it, the error."""

    status: str
    directory: Path
    signal: int | None = None
    error: str | None = None


class LogLines(logging.Handler):
    """Flower's log records as lines to ``show`` (the progress display), its round lines left out."""

    def __init__(self, show: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if PROGRESS_LINE.match(text):
            return
        self.show(text if record.levelno < logging.WARNING else f"{record.levelname}: {text}")


@contextlib.contextmanager
def log_to(show: Callable[[str], None] | None) -> Iterator[None]:
    """Flower's console log goes to ``show`` instead of stderr for the run (None: unchanged)."""
    if show is None:
        yield
        return
    flwr_logger = logging.getLogger("flwr")
    console = [h for h in flwr_logger.handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    handler = LogLines(show)
    for h in console:
        flwr_logger.removeHandler(h)
    flwr_logger.addHandler(handler)
    try:
        yield
    finally:
        flwr_logger.removeHandler(handler)
        for h in console:
            flwr_logger.addHandler(h)


@contextlib.contextmanager
def process_settings_kept() -> Iterator[None]:
    """Torch's thread count and determinism flags as they were before the run: the ClientApp
    handlers set them for the whole process (``client_threads``, ``deterministic``), and the
    process is the caller's (a notebook, a script)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        # torch's own setter without its import of torch._inductor (task/core/device.py says why)
        torch._C._set_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT / SIGTERM ask the run to stop before its next message instead of killing it; a
    second one raises KeyboardInterrupt at once. Yields the list the signal number goes into.
    Outside the main thread (where no handler can be set) signals keep their default."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def ask_stop(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    previous = {s: signal.signal(s, ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_local(overrides: str, num_nodes: int, directory: Path, on_message: OnMessage | None = None,
              show_log: Callable[[str], None] | None = None) -> LocalOutcome:
    """The ServerApp over a ``LocalGrid`` of ``num_nodes`` nodes, writing into ``directory``
    (the run's ``output_dir``, named in ``overrides``); how it ended, from the folder's status."""
    directory = Path(directory)
    folder = RunFolder(directory)
    error = None
    with process_settings_kept(), log_to(show_log), stop_on_signals() as caught:

        def stop() -> str | None:
            return f"stopped by {signal.Signals(caught[0]).name}" if caught else folder.stop_requested()

        grid = LocalGrid(overrides, num_nodes, on_message=on_message, stop=stop)
        try:
            server_app.main(grid, server_context(overrides))
        except Exception as err:  # noqa: BLE001 - the folder's status.json records it too
            error = server_app.short_error(err)
    status = read_status(directory) or {}
    return LocalOutcome(str(status.get("status", "failed")), directory, caught[0] if caught else None,
                        status.get("error") or error)


def exit_status(outcome: LocalOutcome) -> int:
    """pflower-sim's exit status for a local run (0 completed, 1 failed, 128 + signal stopped),
    with what happened printed last."""
    directory = outcome.directory
    if outcome.status == "completed":
        late = " (the stop came after its last round)" if outcome.signal is not None else ""
        print(f"pflower-sim: run completed{late}; results in {directory / 'results.json'}")
        return 0
    if outcome.status == "stopped":
        print(f"pflower-sim: run stopped; resume it with the same overrides plus resume={directory}",
              file=sys.stderr)
        return 128 + outcome.signal if outcome.signal is not None else 1
    error = outcome.error or "see the log above"
    print(f"pflower-sim: run failed ({outcome.status}): {error}", file=sys.stderr)
    return 1


def local_command(overrides: str, clients: int, directory: Path, dry_run: bool = False) -> int:
    """``pflower-sim backend=local``: the checked run in this process, one node per client,
    shown by the progress display; its exit status."""
    from task.run.config import compose_config
    from task.run.progress import RunDisplay

    print(f"pflower-sim: backend=local: {clients} clients in this process; outputs in {directory}",
          flush=True)
    if dry_run:
        return 0
    num_rounds = int(compose_config(overrides).num_rounds)
    try:
        with RunDisplay(num_rounds, directory) as display:
            outcome = run_local(overrides, clients, directory, display.on_message, display.log_line)
    except KeyboardInterrupt:  # the second Ctrl-C: the run is gone, its folder says failed
        print(f"pflower-sim: interrupted; the last finished round's checkpoint is in {directory}",
              file=sys.stderr)
        return 130
    return exit_status(outcome)
