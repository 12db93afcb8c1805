"""``flower-supernode`` whose pull of a message's objects from the SuperLink backs off briefly.

    python deploy/supernode.py --superlink ... --isolation process   # flower-supernode's flags

A Flower 1.41 SuperNode stores a message's task as soon as it has pulled the message, then
pulls the message's objects (its arrays) from the SuperLink; when the ServerApp has not
pushed them all yet, it retries backing off 1, 2, 4, 8, 10 s (``pull_objects``'s defaults,
``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` of flwr.supercore.constant). Measured in the
namespace deployment with the long-lived worker, that wait was most of a message's time
(pull 7-25 s against 0.3-2 s of work). This starts the same SuperNode with that retry backing
off from 0.1 s to 1 s: a few more small requests to the SuperLink, the objects taken within
a second of their arrival. Nothing else changes. The worker's supervisor (deploy/worker.py
``node``) starts SuperNodes this way unless told ``--flower-pull``.

Flower internals (``flwr.supernode.start_client_internal.pull_objects``, imported there by
name): tests/test_worker.py fails if they change.
"""

from __future__ import annotations

import functools
import sys

INITIAL_BACKOFF_S, BACKOFF_CAP_S = 0.1, 1.0


def patch() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode import start_client_internal

    start_client_internal.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S)
    update_console_handler(timestamps=True)  # where a message's time goes: bench/timeline.py


def main() -> None:
    patch()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # its messages and help name the real command
    flower_supernode()


if __name__ == "__main__":
    main()
