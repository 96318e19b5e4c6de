"""Warm-start learning-rate schedule: warm-up, cosine over steps, and the time-budget cut-off."""

from __future__ import annotations

import math

import pytest

from htgrpo.algorithms.pretrain import parse_duration, warmup_cosine
from htgrpo.config import ConfigError


def test_warmup_then_cosine_by_steps():
    assert warmup_cosine(0, 10, 110, 0.05) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.05) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.05) == pytest.approx(1.0)
    # half-way through the decay: min + (1 - min) * 0.5
    assert warmup_cosine(60, 10, 110, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert warmup_cosine(110, 10, 110, 0.05) == pytest.approx(0.05)
    assert warmup_cosine(500, 10, 110, 0.05) == pytest.approx(0.05)


def test_time_budget_overrides_a_slow_step_count():
    # step 20 of 110 is early by steps, but 75% of the time budget is gone: the decay follows time
    expected = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.75))
    assert warmup_cosine(20, 10, 110, 0.05, time_fraction=0.75) == pytest.approx(expected)
    assert warmup_cosine(20, 10, 110, 0.05, time_fraction=1.3) == pytest.approx(0.05)
    # a fast machine: steps are ahead of time, steps win
    assert warmup_cosine(60, 10, 110, 0.05, time_fraction=0.1) == pytest.approx(0.05 + 0.95 * 0.5)


def test_parse_duration():
    assert parse_duration("00:00:09:00") == 540.0
    assert parse_duration("01:02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    assert parse_duration(90) == 90.0 and parse_duration(None) is None
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        parse_duration("9 minutes")


def test_bad_time_budget_names_the_key():
    from htgrpo.algorithms.pretrain import MaskedDiffusionPretraining
    from htgrpo.data.shapes.palette import ShapesWorldConfig
    from htgrpo.policies.shapes_llada import build_masked_diffusion_policy

    policy = build_masked_diffusion_policy(ShapesWorldConfig.roomy(), d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ConfigError, match="time_budget"):
        MaskedDiffusionPretraining(policy, time_budget="nine minutes")
