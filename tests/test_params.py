"""State-dict arithmetic used by every aggregator."""

from __future__ import annotations

import numpy as np
import torch

from task.core import params
from task.core.params import all_finite, from_record, message_state, subtract, to_record, weighted_mean


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


def _reference_mean(states, weights):
    """weighted_mean as it was before the sliced pass: float64 sums of whole tensors."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[key].to(torch.float64) * (w / total)
        out[key] = acc.to(first.dtype)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_weighted_mean_has_the_same_bits_as_the_whole_tensor_float64_sum():
    gen = torch.Generator().manual_seed(0)
    sizes = {"big": (3, params._SLICE + 7), "odd": (5, 3), "one": (1,), "empty": (0, 4)}
    for dtype in (torch.float32, torch.float16, torch.float64):
        states = [{k: (torch.randn(shape, generator=gen) * 10).to(dtype) for k, shape in sizes.items()}
                  for _ in range(5)]
        states[0]["odd"][0] = -0.0  # signed zeros: 0.0 + -0.0 is 0.0, as in the reference
        states[1]["odd"][0] = -0.0
        weights = [144, 37, 1, 600, 12]
        got, want = weighted_mean(states, weights), _reference_mean(states, weights)
        for key in sizes:
            assert got[key].dtype == dtype and got[key].shape == want[key].shape
            assert torch.equal(_bits(got[key]), _bits(want[key])), (dtype, key)


def test_weighted_mean_of_views_of_replies_and_of_non_contiguous_tensors():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = from_record(to_record({"w": a.t().contiguous() + 1}))["w"].t()  # a non-contiguous view
    out = weighted_mean([{"w": a}, {"w": b}], [1, 1])
    assert torch.equal(out["w"], _reference_mean([{"w": a}, {"w": b}], [1, 1])["w"])


def test_from_record_reads_the_message_bytes_in_place_on_the_cpu():
    record = to_record({"w": torch.randn(4, 3), "n": torch.tensor(3)})
    got = from_record(record)
    for key, tensor in got.items():
        data = record[key].data
        start = np.frombuffer(data, np.uint8).ctypes.data
        assert start < tensor.data_ptr() < start + len(data)  # inside the message's buffer
        assert torch.equal(tensor, torch.from_numpy(record[key].numpy()))


def test_from_record_moves_a_record_to_a_device_once_for_every_client_of_a_process():
    # "meta" stands in for a GPU here: a device other than the CPU, without one.
    first, second, third = (to_record({"w": torch.randn(3)}) for _ in range(3))
    a, b = from_record(first, "meta"), from_record(first, "meta")
    assert a["w"] is b["w"] and a["w"].device.type == "meta" and a is not b
    assert from_record(second, "meta")["w"] is not a["w"]
    from_record(third, "meta")  # the cache keeps the last two records
    assert from_record(first, "meta")["w"] is not a["w"]


def test_all_finite_reads_a_sum_and_checks_values_only_when_it_is_not_finite():
    assert all_finite(torch.tensor([1.0, -2.0])) and all_finite(torch.tensor([], dtype=torch.float32))
    assert all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows; every value is finite
    assert all_finite(torch.tensor([6e4, 6e4], dtype=torch.float16))
    assert all_finite(torch.tensor([1, 2]))  # integers are always finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))


def test_message_state_is_a_copy_that_goes_into_a_message_without_another():
    model = torch.nn.Linear(4, 3)
    state = message_state(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.weight.add_(1.0)  # the model trains on: the copy keeps its values
    assert not torch.equal(state["weight"], model.weight)
    record = to_record(state)
    for key, tensor in state.items():  # the upload's record holds the copy's own buffers
        data = record[key].data
        start = np.frombuffer(data, np.uint8).ctypes.data
        assert start < tensor.data_ptr() < start + len(data)
    assert torch.equal(from_record(record)["bias"], state["bias"])


def test_only_the_unchanged_tensors_of_a_message_state_skip_the_copy():
    state = message_state({"w": torch.randn(2, 3), "b": torch.randn(3), "c": torch.randn(4)})
    edited = {"w": -state["w"], "b": state["b"], "c": state["c"][1:]}  # new, kept, a slice
    record = to_record(edited)
    assert record["b"].data is to_record(state)["b"].data  # the same buffer, not a copy
    assert record["w"].data is not to_record(state)["w"].data
    for key in edited:  # every value right, whichever way it went
        assert torch.equal(from_record(record)[key], edited[key])
