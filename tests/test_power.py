"""experiments/shapes_geneval/power.py: the variance model of the paired ablation interval, against hand-computed
values."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("study_power", REPO_ROOT / "experiments" / "shapes_geneval" / "power.py")
power = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = power
spec.loader.exec_module(power)


def test_binomial_coefficient_hand_computed():
    # T = 2: task a has two prompts at 0.5 (0.25 each, / P² = 4), task b one prompt at 1.0 (0)
    # B = 2 · (1/4) · (0.5/4 + 0) = 0.0625
    assert power.binomial_coefficient({"a": [0.5, 0.5], "b": [1.0]}) == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        power.binomial_coefficient({})


def test_training_variance_and_calibration_hand_computed():
    # mean sd² = (0.0009 + 0.0016)/2 = 0.00125; image noise of one evaluation B/(2I) = 0.006/12 = 0.0005
    assert power.training_variance([0.03, 0.04], B=0.006, images=6) == pytest.approx(2 * 0.00075)
    assert power.training_variance([0.01], B=0.006, images=6) == 0.0   # floored
    # (h/z)² = 0.02² = 0.0004; A/n = 0.0003/3 = 0.0001; 2B/(nI) = 2·0.0018/18 = 0.0002 -> C = 0.0001
    h = power.Z95 * 0.02
    C = power.calibrate_prompt_term(h, 3, 6, A=0.0003, B=0.0018)
    assert C == pytest.approx(0.0001)
    # the calibrated model reproduces the observed half-width
    assert power.half_width(power.Components(0.0003, 0.0018, C), 3, 6) == pytest.approx(h)


def test_seeds_needed_is_the_smallest_n_reaching_the_target():
    c = power.Components(A=0.0003, B=0.005, C=0.0001)
    for images in (6, 12, 48):
        for fixed in (False, True):
            n = power.seeds_needed(c, images, 0.03, prompts_fixed=fixed)
            assert power.half_width(c, n, images, prompts_fixed=fixed) <= 0.03 + 1e-12
            if n > 1:
                assert power.half_width(c, n - 1, images, prompts_fixed=fixed) > 0.03
    # a prompt term above the target's variance cannot be beaten by seeds
    big = power.Components(A=0.0003, B=0.005, C=(0.03 / power.Z95) ** 2)
    assert power.seeds_needed(big, 6, 0.03) is None
    assert power.seeds_needed(big, 6, 0.03, prompts_fixed=True) is not None
    # hand-computed: budget (0.03/z)² − C, per seed A + 2B/I
    budget = (0.03 / power.Z95) ** 2 - 0.0001
    assert power.seeds_needed(c, 6, 0.03) == math.ceil((0.0003 + 2 * 0.005 / 6) / budget)


def test_rates_from_jsonl(tmp_path):
    rows = [{"tag": "colors", "key": "1", "correct": True}, {"tag": "colors", "key": "1", "correct": False},
            {"tag": "colors", "key": "2", "correct": True}, {"tag": "counting", "key": "3", "correct": False}]
    path = tmp_path / "val_end_images.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert power.rates_from_jsonl(path) == {"colors": [0.5, 1.0], "counting": [0.0]}
