"""deploy/image.py without a Docker engine: one daemon at a time on a data root."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploy import image


def test_a_second_daemon_on_one_data_root_waits_for_the_first_to_stop(tmp_path: Path):
    # .ci/run's background ``prepare`` and the compose test's daemon share the cache's data
    # root: the second must not start on it while the first runs (no dockerd is started here).
    first = image.Dockerd(tmp_path / "a", data=tmp_path / "data")
    second = image.Dockerd(tmp_path / "b", data=tmp_path / "data")
    first._lock_data_root(timeout=1)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="another dockerd holds .*data after 1 s"):
        second._lock_data_root(timeout=1)
    assert time.monotonic() - started >= 1 and second.lock is None
    first.stop()  # never started: stop only releases the lock
    second._lock_data_root(timeout=1)
    other = image.Dockerd(tmp_path / "c", data=tmp_path / "other-data")
    other._lock_data_root(timeout=1)  # another data root is not held
    second.stop()
    other.stop()
