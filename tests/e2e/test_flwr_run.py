"""The default federation through `flwr run`: Flower's 2 SuperNodes, each hosting half the clients.

What a baseline writes and reports is checked in-process (tests/test_baseline_runs.py); this
`flwr run` asserts the same outputs, plus what only a real run shows: the determinism key
applied in every ClientApp process. The other e2e files run ditto, lgmix, clustered and fedavg
through `flwr run` on 4 or 8 SuperNodes, and through deployments.
"""

from __future__ import annotations

import pytest

from ..test_baseline_runs import check_outputs
from .conftest import TINY

pytestmark = pytest.mark.slow


def test_plain_flwr_run_with_the_default_two_supernodes(flwr_runner):
    """`flwr run .` alone (Flower's default: 2 SuperNodes): each node hosts half the clients."""
    out = flwr_runner.run("plain", f"{TINY} strategy=ditto num_rounds=2", num_supernodes=None)
    # deterministic (default true) applied in the ServerApp and in every ClientApp process
    # that answered a node's identity query (server_app.run logs what the nodes reported).
    assert ("deterministic algorithms on in the ServerApp, on in 2 of 2 ClientApp nodes"
            in flwr_runner.last_log)
    check_outputs(out, flwr_runner.results(out), "ditto")
