"""State-dict arithmetic used by every aggregator."""

from __future__ import annotations

import torch

from task.params import from_record, subtract, to_record, weighted_mean


def test_weighted_mean_is_the_p_weighted_average():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    out = weighted_mean([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.0, 5.0]))
    assert int(out["n"]) == 5 and out["w"].dtype == torch.float32


def test_record_round_trip_keeps_values_and_dtypes():
    state = {"a": torch.randn(3, 2), "b": torch.tensor(7, dtype=torch.int64)}
    back = from_record(to_record(state))
    assert set(back) == {"a", "b"} and torch.equal(back["a"], state["a"]) and back["b"].dtype == torch.int64


def test_subtract():
    d = subtract({"w": torch.ones(2)}, {"w": torch.full((2,), 0.25)})
    assert torch.allclose(d["w"], torch.full((2,), 0.75))
