"""The ServerApp's pull of a reply's objects: polled briefly, and given up at the round's deadline.

In a deployment the ServerApp's grid is Flower 1.41's ``HttpGrid``. Its ``pull_messages`` takes
each reply's header from the SuperLink, then the reply's objects (its arrays) with
``pull_objects``' defaults: while an object is not there yet it retries after 1, 2, 4, 8, 10 s,
for up to two hours, one reply after the other. Seen in the compose test:

- a SuperNode killed while it uploaded its reply left the header without its objects; the
  ServerApp's pull of that one reply blocked ~180 s (until the SuperLink expired the upload
  session), far past ``round_timeout``, while the other nodes' finished replies lay unread and
  were then counted late: three clients missing a round where one node had died;
- a reply whose header is pulled a moment before its objects arrive waits a whole second.

Within ``bounded(deadline)`` (task/engine/exchange.py's ``exchange`` uses it) the pull retries
after 20 ms backing off to 0.25 s, and stops at the exchange's deadline: the reply is then
Flower's own error reply (``MESSAGE_UNAVAILABLE``), which the engine counts as missing. The
in-memory grid of a simulation pulls no objects: nothing changes there.

Flower internals: ``flwr.superlink.grid.http_grid.pull_objects``, imported there by name;
tests/test_reply_pull.py fails if that changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

INITIAL_BACKOFF_S, BACKOFF_CAP_S = 0.02, 0.25

_deadline: float | None = None


def pull_objects(object_ids: list[str], pull_object_fn: Callable[[str], bytes], **kwargs: Any
                 ) -> dict[str, bytes]:
    """Flower's ``pull_objects`` with a short backoff and, inside ``bounded``, at most the time
    left until its deadline (an object still missing then: Flower's ``ObjectPullError``)."""
    from flwr.supercore.inflatable import inflatable_utils

    kwargs.setdefault("initial_backoff", INITIAL_BACKOFF_S)
    kwargs.setdefault("backoff_cap", BACKOFF_CAP_S)
    if _deadline is not None:
        kwargs["max_time"] = max(0.0, _deadline - time.monotonic())
    return inflatable_utils.pull_objects(object_ids, pull_object_fn, **kwargs)


@contextmanager
def bounded(deadline: float) -> Iterator[None]:
    """Within the block, the ServerApp's grid pulls reply objects until ``deadline``
    (``time.monotonic()``) at most."""
    global _deadline
    from flwr.superlink.grid import http_grid

    original, previous = http_grid.pull_objects, _deadline
    http_grid.pull_objects, _deadline = pull_objects, deadline
    try:
        yield
    finally:
        http_grid.pull_objects, _deadline = original, previous
