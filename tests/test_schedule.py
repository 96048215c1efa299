"""The LR schedule: linear warmup to the peak, cosine decay to the floor, then flat."""

import math

import pytest

from raygpt.schedule import WarmupCosine


def test_warmup_rises_linearly_and_never_starts_at_zero():
    s = WarmupCosine(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_decays_from_peak_to_floor_and_stays_there():
    s = WarmupCosine(lr=6e-4, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert s.lr_at(10) == pytest.approx(6e-4)
    assert s.lr_at(60) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half-way: the mean of peak and floor
    assert s.lr_at(35) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * (6e-4 - 6e-5))
    assert s.lr_at(110) == s.lr_at(10_000) == pytest.approx(6e-5)
    rates = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_degenerate_schedules():
    assert WarmupCosine(lr=1.0, warmup_steps=0, max_steps=10).lr_at(0) == pytest.approx(1.0)
    short = WarmupCosine(lr=1.0, warmup_steps=20, max_steps=10, min_lr_ratio=0.5)
    assert short.lr_at(19) == pytest.approx(1.0) and short.lr_at(20) == pytest.approx(0.5)


def test_state_dict_round_trip():
    s = WarmupCosine(lr=3e-4, warmup_steps=5, max_steps=50, min_lr_ratio=0.2)
    assert WarmupCosine.from_state_dict(s.state_dict()) == s
