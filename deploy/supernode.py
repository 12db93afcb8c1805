"""``flower-supernode`` whose waits for messages, their objects and replies are short.

    python deploy/supernode.py --superlink ... --isolation process   # flower-supernode's flags

A Flower 1.41 SuperNode stores a message's task as soon as it has pulled the message, then
pulls the message's objects (its arrays) from the SuperLink; when the ServerApp has not
pushed them all yet, it retries backing off 1, 2, 4, 8, 10 s (``pull_objects``'s defaults,
``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` of flwr.supercore.constant). Measured in the
namespace deployment with the long-lived worker, that wait was most of a message's time
(pull 7-25 s against 0.3-2 s of work). This starts the same SuperNode with that retry backing
off from 0.1 s to 1 s: a few more small requests to the SuperLink, the objects taken within
a second of their arrival. The worker's supervisor (deploy/worker.py ``node``) starts
SuperNodes this way unless told ``--flower-pull`` (all of Flower's own waits).

Two more waits of the same SuperNode loop are shortened the same way, both measured in a
round's profile (bench/deployment.py): when no message is waiting it sleeps 3 s before it asks
again (a new phase's message waits 1.5 s on average, per node and phase); here it asks again
after 0.05 s, backing off to 3 s while nothing comes. And once it has handed a message to the
ClientApp it checks for the reply every 0.5 s; here every 0.02 s (a lookup in its own memory).
Its log lines carry timestamps (Flower's ``update_console_handler(timestamps=True)``), so
where a message's time goes can be read off the log.

Flower internals (``flwr.supernode.start_client_internal``: ``pull_objects``, imported there by
name, the module's ``time.sleep(3)`` and ``time.sleep(0.5)``, ``_pull_and_store_message``):
tests/test_worker.py fails if they change.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

INITIAL_BACKOFF_S, BACKOFF_CAP_S = 0.1, 1.0
IDLE_POLL_S, IDLE_POLL_CAP_S = 0.05, 3.0  # Flower: 3 s
REPLY_POLL_S = 0.02  # Flower: 0.5 s
FLOWER_IDLE_S = 3  # the loop's own ``time.sleep(3)`` when no message came


class Clock:
    """``time`` as the SuperNode loop's module sees it: its idle sleep of 3 s backs off from
    ``IDLE_POLL_S`` instead (reset by ``message_came``), its shorter waits last
    ``REPLY_POLL_S``; everything else is the ``time`` module's."""

    def __init__(self) -> None:
        self.idle = IDLE_POLL_S

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_S:
            wait, self.idle = self.idle, min(self.idle * 2, IDLE_POLL_CAP_S)
        else:
            wait = min(seconds, REPLY_POLL_S)
        time.sleep(wait)

    def message_came(self) -> None:
        self.idle = IDLE_POLL_S


def patch() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode import start_client_internal

    start_client_internal.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S)
    clock, pull_and_store = Clock(), start_client_internal._pull_and_store_message

    @functools.wraps(pull_and_store)
    def pull_and_store_message(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            clock.message_came()
        return run_id

    start_client_internal.time = clock
    start_client_internal._pull_and_store_message = pull_and_store_message
    update_console_handler(timestamps=True)


def main() -> None:
    patch()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # its messages and help name the real command
    flower_supernode()


if __name__ == "__main__":
    main()
