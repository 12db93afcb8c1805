"""The local backend's in-process Grid (task/run/local.py), with what tests add to it.

``FakeGrid`` lets tests drive a strategy's real round loop over ``LocalGrid``, keep every
message pushed (``pushed``), and corrupt replies on their way back (``tamper``) to see how the
server copes. Unlike the local backend it skips Flower's protobuf encoding unless ``wire=True``
(a unit test then runs faster and may look at the very tensors a client received).

``InProcessRunner`` runs the real ServerApp (``server_app.main``) over it, with the interface of
the e2e ``flwr_runner`` fixture, for checks that are about a run's data and outputs rather
than about Flower's transport (each `flwr run` costs ~20-30 s of SuperLink and Ray start-up).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Message

import server_app
from task.run.local import LocalGrid, server_context


class FakeGrid(LocalGrid):
    """Nodes 100+p serving partition p (of ``num_nodes``, default one node per client);
    replies are computed at push time."""

    def __init__(self, num_clients: int, overrides: str,
                 tamper: Callable[[Message, Message], Message | None] | None = None,
                 num_nodes: int | None = None, wire: bool = False):
        super().__init__(overrides, num_nodes or num_clients, wire=wire)
        self.tamper = tamper
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushed += messages
        return super().push_messages(messages)

    def handle(self, msg: Message) -> Message | None:
        reply = super().handle(msg)
        return reply if self.tamper is None else self.tamper(msg, reply)


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
            server_app.main(FakeGrid(num_supernodes, full, wire=True), server_context(full))
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
