"""An in-process Grid: routes messages straight to client_app's handlers (no Ray, no network).

It lets tests drive a strategy's real round loop, and lets a test corrupt replies on their
way back (``tamper``) to see how the server copes. ``wire=True`` also passes every message
and reply through Flower's protobuf encoding, as the SuperLink would.

``InProcessRunner`` runs the real ServerApp (``server_app.main``) over it, with the interface of
the e2e ``flwr_runner`` fixture, for checks that are about a run's data and outputs rather
than about Flower's transport (each `flwr run` costs ~20-30 s of SuperLink and Ray start-up).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import client_app
import server_app

HANDLERS = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate,
            f"{MessageType.TRAIN}.personalize": client_app.personalize,
            f"{MessageType.EVALUATE}.new_client": client_app.new_client,
            MessageType.QUERY: client_app.query}


class FakeGrid(Grid):
    """Nodes 100+p serving partition p (of ``num_nodes``, default one node per client);
    replies are computed at push time."""

    def __init__(self, num_clients: int, overrides: str,
                 tamper: Callable[[Message, Message], Message | None] | None = None,
                 num_nodes: int | None = None, wire: bool = False):
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0
        nodes = num_nodes or num_clients
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(),
                             node_config={"partition-id": p, "num-partitions": nodes},
                             run_config={"overrides": overrides})
            for p in range(nodes)
        }
        self.replies: dict[str, Message] = {}
        self.tamper = tamper
        self.wire = wire
        self.pushed: list[Message] = []

    def set_run(self, run):  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pushed.append(msg)
            ids.append(msg.metadata.message_id)
            reply = self._handle(_through_wire(msg) if self.wire else msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
        return ids

    def _handle(self, msg: Message) -> Message | None:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            reply = HANDLERS[msg.metadata.message_type](msg, context)
        except Exception as err:  # noqa: BLE001 - a failing ClientApp becomes an error reply
            from flwr.app import Error

            reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        if self.wire:
            reply = _through_wire(reply)
        if self.tamper is not None:
            reply = self.tamper(msg, reply)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _through_wire(msg: Message) -> Message:
    """``msg`` encoded to Flower's protobuf Message and decoded again (what a transport does)."""
    return message_from_proto(message_to_proto(msg))


class InProcessRunner:
    """``flwr_runner``'s ``run``/``results``/``last_log`` over the in-process grid (wire on)."""

    def __init__(self, root: Path):
        self.root = root
        self.last_log = ""

    def run(self, name: str, overrides: str, num_supernodes: int = 4, check: bool = True) -> Path:
        """server_app.main on ``num_supernodes`` nodes; ``check=False``: its error is logged, not raised."""
        out = self.root / name
        full = f"{overrides} output_dir={out}"
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.addHandler(handler)
        try:
            server_app.main(FakeGrid(num_supernodes, full, wire=True),
                            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={"overrides": full}))
        except Exception as err:  # noqa: BLE001 - as `flwr run` would: the run fails, its log says why
            lines.append(f"{type(err).__name__}: {err}")
            if check:
                raise
        finally:
            flwr_logger.removeHandler(handler)
            self.last_log = "\n".join(lines)
        return out

    @staticmethod
    def results(out: Path) -> dict:
        return json.loads((out / "results.json").read_text())
