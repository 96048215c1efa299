"""The LR schedule: linear warmup to the peak, cosine decay to the floor, then flat."""

import math

import pytest

from raygpt.train.schedule import WarmupCosine


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


def test_every_schedule_warms_up_the_same_then_decays_to_its_floor():
    from raygpt.train.schedule import SCHEDULES, build_schedule

    assert set(SCHEDULES) == {"cosine", "linear", "constant", "wsd"}
    for name in SCHEDULES:
        s = build_schedule(name, lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
        assert [s.lr_at(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
        rates = [s.lr_at(i) for i in range(10, 111)]
        assert all(a >= b - 1e-12 for a, b in zip(rates, rates[1:])), name
        assert type(s).from_state_dict(s.state_dict()) == s
    linear = build_schedule("linear", 1.0, 10, 110, 0.1)
    assert linear.lr_at(60) == pytest.approx(0.55) and linear.lr_at(110) == pytest.approx(0.1)
    assert build_schedule("constant", 1.0, 10, 110, 0.1).lr_at(109) == pytest.approx(1.0)
    wsd = build_schedule("wsd", 1.0, 10, 110, 0.1)
    assert wsd.lr_at(89) == pytest.approx(1.0)  # stable until the last 20% of the 100 decay steps
    assert wsd.lr_at(100) == pytest.approx(0.1 + 0.5 * 0.9) and wsd.lr_at(110) == pytest.approx(0.1)


def test_a_checkpoint_names_its_schedule_and_an_old_one_reads_as_cosine():
    from raygpt.train.schedule import Schedule, WarmupLinear

    s = WarmupLinear(lr=1.0, warmup_steps=1, max_steps=5)
    assert s.state_dict()["name"] == "linear"
    assert Schedule.from_state_dict(s.state_dict()) == s
    old = {"lr": 1.0, "warmup_steps": 1, "max_steps": 5, "min_lr_ratio": 0.1, "next_lr": 0.5}  # raygpt 0.1.0
    assert WarmupCosine.from_state_dict(old) == WarmupCosine(1.0, 1, 5, 0.1)


def test_unknown_schedule_or_parallel_strategy_is_one_error_naming_the_key():
    from raygpt.config import load_spec
    from raygpt.errors import RaygptError

    for key, value, known in (("schedule", "cosin", "'cosine', 'linear', 'constant', 'wsd'"),
                              ("parallel", "fsdp", "'ddp'")):
        with pytest.raises(RaygptError, match=f"train.{key}: expected one of {known}, got '{value}'"):
            load_spec(None, [f"train.{key}={value}"])
