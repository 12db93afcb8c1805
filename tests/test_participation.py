"""Participation as the papers draw it: a fixed count a round, or each client independently."""

from __future__ import annotations

import numpy as np

from .helpers import engine, tiny_cfg


def test_a_fixed_count_a_round():
    st = engine(tiny_cfg("clients_per_round=3"))
    draws = [st.sample(r) for r in range(1, 21)]
    assert all(len(d) == 3 and d == sorted(set(d)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    # Without clients_per_round the count is round(fraction_train x clients), the same sequence.
    by_fraction = engine(tiny_cfg("fraction_train=0.75"))
    assert [by_fraction.sample(r) for r in range(1, 21)] == draws


def test_each_client_independently_with_probability_p():
    st = engine(tiny_cfg("participation=bernoulli fraction_train=0.5"))
    draws = [st.sample(r) for r in range(1, 401)]
    sizes = [len(d) for d in draws]
    assert set(sizes) == {0, 1, 2, 3, 4}  # the count varies, as Binomial(4, 0.5)
    assert abs(np.mean(sizes) - 2.0) < 0.2
    per_client = [sum(c in d for d in draws) / len(draws) for c in range(4)]
    assert all(abs(f - 0.5) < 0.1 for f in per_client)
    again = engine(tiny_cfg("participation=bernoulli fraction_train=0.5"))
    assert [again.sample(r) for r in range(1, 401)] == draws  # seeded
