"""The CUDA path: clients train on the GPU, and GPU memory does not grow across rounds.

Skipped where torch sees no CUDA device (CI and the development machines have none).
"""

from __future__ import annotations

import pytest
import torch

from task.core.device import resolve_device
from task.engine.rounds import Engine

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_is_cpu_without_cuda_and_cuda_is_refused_without_it():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["lgmix", "ditto"])
def test_rounds_on_cuda_keep_gpu_memory_flat(name):
    overrides = f"{TINY} strategy={name} device=cuda"
    st = server(tiny_cfg(f"strategy={name} device=cuda"))
    run = Engine(st)
    grid = FakeGrid(4, overrides)
    run.discover(grid, 10)
    allocated = []
    for server_round in range(1, 5):
        row = run.run_round(grid, server_round, timeout=60, evaluate=True)
        assert row["rejected_replies"] == 0
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[-1] <= allocated[1] * 1.05 + 1e6, allocated
