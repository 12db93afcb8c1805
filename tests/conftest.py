"""Shared fixtures: small configs composed from conf/ with test overrides."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The config's default (``deterministic: true``) for this whole process before any test can
# start CUDA: tests that bypass the ClientApp and ServerApp (which apply the run's key
# themselves) then run deterministic too, whatever device ``auto`` picks.
from task.core.device import apply_determinism  # noqa: E402

apply_determinism(True)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's worker has named each item's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` the tests of one ``xdist_group`` must run on one worker
    (.ci/run runs tests/e2e on one worker anyway): tests/e2e's network tests make namespaces of
    fixed names and start a dockerd that saves and restores the firewall, so two at once break
    each other. pytest-xdist 3.8 names the group in ``item._nodeid``, which pytest 9.2 no longer
    reads (pyproject.toml keeps pytest < 9.2): a group that did not reach the id fails the run
    here instead of running tests side by side."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): this "
                                f"pytest {pytest.__version__} and pytest-xdist do not work together")
