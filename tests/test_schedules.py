import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseopt.topology import UpdateSchedule


def test_update_steps_include_start_and_end():
    s = UpdateSchedule(update_every=10, drop_fraction=0.3, start_step=5, end_step=45)
    assert [t for t in range(60) if s.is_update_step(t)] == [5, 15, 25, 35, 45]


def test_cosine_values():
    s = UpdateSchedule(update_every=1, drop_fraction=0.3, start_step=0, end_step=100)
    assert s.fraction(0) == pytest.approx(0.3)
    assert s.fraction(50) == pytest.approx(0.15)
    assert s.fraction(100) == pytest.approx(0.0, abs=1e-12)
    assert s.fraction(25) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert s.fraction(101) == 0.0


def test_constant_without_end_never_stops():
    s = UpdateSchedule(update_every=7, drop_fraction=0.2, annealing="constant")
    assert s.is_update_step(7 * 10**6) and s.fraction(10**6) == 0.2


@given(start=st.integers(0, 100), length=st.integers(1, 1000), every=st.integers(1, 50), t=st.integers(0, 2000),
       alpha=st.floats(0, 1))
def test_fraction_is_bounded_and_non_increasing(start, length, every, t, alpha):
    s = UpdateSchedule(every, alpha, start, start + length)
    assert 0.0 <= s.fraction(t) <= alpha + 1e-12
    if start <= t < start + length:
        assert s.fraction(t + 1) <= s.fraction(t) + 1e-12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"update_every": 0, "end_step": 10}, "update_every must be a positive integer"),
        ({"update_every": -5, "end_step": 10}, "update_every must be a positive integer"),
        ({"end_step": 10, "start_step": 20}, r"end_step \(10\) must be after start_step \(20\)"),
        ({"end_step": None}, "cosine annealing needs end_step"),
        ({"end_step": 10, "drop_fraction": 1.5}, r"drop_fraction must be in \[0, 1\]"),
        ({"end_step": 10, "annealing": "linear"}, "unknown annealing 'linear'"),
    ],
)
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateSchedule(**kwargs)
