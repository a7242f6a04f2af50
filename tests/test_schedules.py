"""Learning-rate schedules: PyTorch StepLR semantics, linear warmup from zero, cosine to zero."""

import math

import pytest

from tfl.training.schedules import WarmupSchedule


def test_step_schedule_matches_torch_steplr():
    steps_per_epoch = 10
    schedule = WarmupSchedule(0.1, total_steps=300, kind="step", step_size=7 * steps_per_epoch, gamma=0.1)
    for epoch, expected in [(0, 0.1), (6, 0.1), (7, 0.01), (13, 0.01), (14, 0.001), (29, 1e-5)]:
        assert schedule.value(epoch * steps_per_epoch) == pytest.approx(expected, rel=1e-5)


def test_warmup_rises_linearly_from_zero_then_follows_the_schedule():
    schedule = WarmupSchedule(1.0, total_steps=100, warmup_steps=10, kind="constant")
    assert schedule.value(0) == pytest.approx(0.1)
    assert schedule.value(4) == pytest.approx(0.5)
    assert schedule.value(9) == pytest.approx(1.0)
    assert schedule.value(50) == pytest.approx(1.0)


def test_cosine_decays_to_zero_after_warmup():
    schedule = WarmupSchedule(2.0, total_steps=110, warmup_steps=10, kind="cosine")
    assert schedule.value(10) == pytest.approx(2.0)
    assert schedule.value(60) == pytest.approx(1.0, rel=1e-5)
    assert schedule.value(110) == pytest.approx(0.0, abs=1e-6)
    assert schedule.value(35) == pytest.approx(1.0 + math.cos(math.pi * 0.25), rel=1e-5)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose one of cosine, step, constant"):
        WarmupSchedule(0.1, 10, kind="linear")


def test_values_of_a_range_are_the_per_step_values():
    schedule = WarmupSchedule(0.1, 40, warmup_steps=5, kind="cosine")
    assert schedule.values(3, 10) == pytest.approx([schedule.value(s) for s in range(3, 13)], rel=1e-6)
