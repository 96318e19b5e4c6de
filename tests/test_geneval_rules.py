"""GenEval's official rules on hand-built detection lists (htgrpo.rewards.geneval)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from htgrpo.data.records import GENEVAL_COLORS, GenEvalRecord, GenEvalRequirement, MetadataError
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.data.shapes.prompts import random_geneval_record
from htgrpo.rewards.detection import Detection
from htgrpo.rewards.geneval import (
    GenEvalThresholds,
    evaluate_geneval,
    filter_detections,
    relative_position,
    summarize_geneval,
)

R = GenEvalRequirement


def det(label: str, score: float = 0.99, cx: float = 50.0, cy: float = 50.0, w: float = 10.0, h: float = 10.0, color=None):
    return Detection(label, score, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), color)


def counting(cls: str, n: int) -> GenEvalRecord:
    return GenEvalRecord("counting", f"a photo of {n} {cls}s", (R(cls, n),), (R(cls, n + 1),))


def position(a: str, rel: str, b: str) -> GenEvalRecord:
    return GenEvalRecord("position", f"a photo of a {a} {rel} a {b}", (R(b, 1), R(a, 1, position=(rel, 0))))


# ------------------------------------------------------------------------------------------- filtering


def test_threshold_is_strict_and_counting_uses_0_9():
    dets = [det("circle", 0.3), det("circle", 0.31), det("circle", 0.9), det("circle", 0.91)]
    assert [d.score for d in filter_detections(dets, "single_object")["circle"]] == [0.91, 0.9, 0.31]
    assert [d.score for d in filter_detections(dets, "counting")["circle"]] == [0.91]
    assert filter_detections([det("circle", 0.2)], "colors") == {}


def test_max_16_per_class_best_first():
    scores = [0.4 + 0.02 * i for i in range(20)]
    dets = [det("square", s) for s in scores] + [det("circle", 0.5)]
    kept = filter_detections(dets, "two_object")
    assert len(kept["square"]) == 16
    assert [d.score for d in kept["square"]] == sorted(scores, reverse=True)[:16]
    assert len(kept["circle"]) == 1
    assert len(filter_detections(dets, "two_object", GenEvalThresholds(max_objects=3))["square"]) == 3


# -------------------------------------------------------------------------------------------- counting


def test_counting_is_at_least_n_plus_exclude():
    rec = counting("circle", 3)
    assert not evaluate_geneval([det("circle")] * 2, rec).correct
    assert evaluate_geneval([det("circle")] * 3, rec).correct
    res = evaluate_geneval([det("circle")] * 4, rec)
    assert not res.correct and "circle<4" in res.reason
    # Other classes never matter.
    assert evaluate_geneval([det("circle")] * 3 + [det("square")] * 5, rec).correct


def test_counting_ignores_objects_below_0_9():
    rec = counting("circle", 2)
    # The third circle (0.8) is below the counting threshold, so it neither helps nor triggers exclude.
    assert evaluate_geneval([det("circle", 0.95), det("circle", 0.92), det("circle", 0.8)], rec).correct
    # Two circles but one only at 0.85: fails (it would pass with the 0.3 threshold of other tasks).
    assert not evaluate_geneval([det("circle", 0.95), det("circle", 0.85)], rec).correct
    assert evaluate_geneval(
        [det("circle", 0.95), det("circle", 0.85)], rec, GenEvalThresholds(counting_score=0.3)
    ).correct


def test_at_least_n_without_exclude_accepts_more():
    rec = GenEvalRecord("two_object", "a photo of a circle and a square", (R("circle", 1), R("square", 1)))
    assert evaluate_geneval([det("circle"), det("circle"), det("square")], rec).correct
    res = evaluate_geneval([det("circle"), det("circle")], rec)
    assert not res.correct and "square>=1" in res.reason


# ---------------------------------------------------------------------------------------------- colour


def test_colour_uses_top_n_only():
    rec = GenEvalRecord("colors", "a photo of a red circle", (R("circle", 1, color="red"),))
    # A wrongly coloured but lower-scoring object is ignored ...
    assert evaluate_geneval([det("circle", 0.9, color="red"), det("circle", 0.5, color="blue")], rec).correct
    # ... a wrongly coloured top object fails, even with a red one below it.
    res = evaluate_geneval([det("circle", 0.9, color="blue"), det("circle", 0.5, color="red")], rec)
    assert not res.correct and "red" in res.reason


def test_colour_needs_all_of_the_top_count():
    rec = GenEvalRecord("colors", "two red squares", (R("square", 2, color="red"),))
    two_red = [det("square", 0.9, color="red"), det("square", 0.8, color="red"), det("square", 0.7, color="blue")]
    assert evaluate_geneval(two_red, rec).correct
    one_red = [det("square", 0.9, color="red"), det("square", 0.8, color="blue"), det("square", 0.7, color="red")]
    res = evaluate_geneval(one_red, rec)
    assert not res.correct
    assert res.partial == pytest.approx(0.5)  # count 2/2 x colour 1/2


def test_color_attr_two_requirements_anded():
    rec = GenEvalRecord(
        "color_attr", "a photo of a red circle and a blue square", (R("circle", 1, color="red"), R("square", 1, color="blue"))
    )
    assert evaluate_geneval([det("circle", color="red"), det("square", color="blue")], rec).correct
    res = evaluate_geneval([det("circle", color="red"), det("square", color="red")], rec)
    assert not res.correct and res.partial == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------- position


def test_relative_position_axis_aligned_margin():
    b = det("square", cx=50, cy=50)  # 10 x 10, so the margin is 0.1 * (10 + 10) = 2 px per axis
    # dy = 0: component = (dx - 2) / dx, > 0.5 iff dx > 4.
    assert relative_position(det("circle", cx=54.1, cy=50), b) == {"right of"}
    assert relative_position(det("circle", cx=53.9, cy=50), b) == set()
    assert relative_position(det("circle", cx=45.9, cy=50), b) == {"left of"}
    assert relative_position(det("circle", cx=46.1, cy=50), b) == set()
    # Inside the margin on both axes: no relation at all.
    assert relative_position(det("circle", cx=51.9, cy=51.9), b) == set()
    # Vertical, y grows downward.
    assert relative_position(det("circle", cx=50, cy=60), b) == {"below"}
    assert relative_position(det("circle", cx=50, cy=40), b) == {"above"}
    # The margin scales with the summed sizes: 20 px wide boxes -> 4 px; threshold dx > 8.
    wide_b = det("square", cx=50, cy=50, w=20)
    assert relative_position(det("circle", cx=58.1, cy=50, w=20), wide_b) == {"right of"}
    assert relative_position(det("circle", cx=57.9, cy=50, w=20), wide_b) == set()


def test_relative_position_diagonal_near_threshold():
    b = det("square", cx=50, cy=50)
    # dx = dy = d: component (d - 2) / (d * sqrt 2) > 0.5 iff d > 2 / (1 - 1/sqrt 2) = 6.828...
    d_star = 2 / (1 - 1 / math.sqrt(2))
    assert relative_position(det("circle", cx=50 + d_star + 0.05, cy=50 + d_star + 0.05), b) == {"right of", "below"}
    assert relative_position(det("circle", cx=50 + d_star - 0.05, cy=50 + d_star - 0.05), b) == set()
    assert relative_position(det("circle", cx=50 - 8, cy=50 - 8), b) == {"left of", "above"}
    # Mostly horizontal: dx = 10, dy = 6 -> revised (8, 4) / 11.66 = (0.686, 0.343).
    assert relative_position(det("circle", cx=60, cy=56), b) == {"right of"}


def test_position_rule():
    rec = position("circle", "left of", "square")
    assert rec.include[0].cls == "square" and rec.include[1].position == ("left of", 0)
    assert evaluate_geneval([det("circle", cx=20), det("square", cx=80)], rec).correct
    res = evaluate_geneval([det("circle", cx=80), det("square", cx=20)], rec)
    assert not res.correct and res.partial == pytest.approx(0.5)
    # Just outside / inside the margin (10 px boxes: needs |dx| > 4).
    assert evaluate_geneval([det("circle", cx=45.9), det("square", cx=50)], rec).correct
    assert not evaluate_geneval([det("circle", cx=46.1), det("square", cx=50)], rec).correct


def test_position_with_unmatched_target_fails():
    rec = position("circle", "left of", "square")
    res = evaluate_geneval([det("circle", cx=20)], rec)
    assert not res.correct and "no target" in res.reason
    assert res.partial == 0.0
    # A target that fails its colour check is unmatched too.
    rec2 = GenEvalRecord(
        "position", "x", (R("square", 1, color="red"), R("circle", 1, position=("left of", 0)))
    )
    res2 = evaluate_geneval([det("circle", cx=20), det("square", cx=80, color="blue")], rec2)
    assert not res2.correct and "no target" in res2.reason


def test_position_every_pair_must_hold():
    rec = GenEvalRecord("position", "x", (R("square", 2), R("circle", 1, position=("left of", 0))))
    good = [det("circle", cx=10), det("square", 0.9, cx=50), det("square", 0.8, cx=90)]
    assert evaluate_geneval(good, rec).correct
    bad = [det("circle", cx=70), det("square", 0.9, cx=50), det("square", 0.8, cx=90)]
    res = evaluate_geneval(bad, rec)
    assert not res.correct
    assert res.partial == pytest.approx((1.0 + 0.5) / 2)  # one of two pairs holds
    # A third, lower-ranked square beyond the top-2 is not a target.
    extra = [det("circle", cx=70), det("square", 0.9, cx=80), det("square", 0.8, cx=90), det("square", 0.7, cx=10)]
    assert evaluate_geneval(extra, rec).correct


def test_bad_metadata_raises():
    rec = GenEvalRecord("position", "x", (R("circle", 1, position=("left of", 0)),))
    with pytest.raises(MetadataError):
        evaluate_geneval([det("circle")], rec)
    rec2 = GenEvalRecord("position", "x", (R("square", 1), R("circle", 1, position=("next to", 0))))
    with pytest.raises(MetadataError, match="next to"):
        evaluate_geneval([det("circle"), det("square")], rec2)


# ----------------------------------------------------------------------------------- partial / summary


def test_partial_credit_values():
    rec = counting("circle", 4)
    assert evaluate_geneval([det("circle")] * 3, rec).partial == pytest.approx(0.75)
    assert evaluate_geneval([det("circle")] * 5, rec).partial == pytest.approx(0.5)  # exclude halves it
    assert evaluate_geneval([], rec).partial == 0.0
    assert evaluate_geneval([det("circle")] * 4, rec).partial == 1.0


def _random_detections(rng: np.random.Generator, shapes) -> list[Detection]:
    out = []
    for _ in range(int(rng.integers(0, 7))):
        cx, cy = rng.uniform(0, 128, size=2)
        w, h = rng.uniform(20, 60, size=2)
        out.append(
            Detection(
                str(rng.choice(shapes)),
                float(rng.choice([0.2, 0.5, 0.95, 1.0])),
                (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                str(rng.choice(GENEVAL_COLORS[:3])),
            )
        )
    return out


def test_partial_is_one_iff_correct_on_random_cases():
    world = ShapesWorldConfig(shapes=("circle", "square", "triangle"))
    rng = np.random.default_rng(0)
    n_correct = 0
    for i in range(3000):
        tag = ("single_object", "two_object", "counting", "colors", "position", "color_attr")[i % 6]
        rec = random_geneval_record(rng, world, tag)
        if tag in ("colors", "color_attr"):  # bias the colours so that some images are correct
            rec = GenEvalRecord(
                rec.tag, rec.prompt, tuple(R(r.cls, r.count, str(rng.choice(GENEVAL_COLORS[:3])), r.position) for r in rec.include)
            )
        res = evaluate_geneval(_random_detections(rng, world.shapes), rec)
        assert 0.0 <= res.partial <= 1.0
        assert (res.partial == 1.0) == res.correct, (rec, res)
        assert (res.reason == "") == res.correct
        n_correct += res.correct
    assert 100 < n_correct < 2900


def test_summary_is_mean_of_task_means():
    tags = ["single_object", "single_object", "counting", "counting", "counting", "counting"]
    correct = [True, True, True, False, False, False]
    s = summarize_geneval(tags, correct)
    assert s.tasks == {"single_object": 1.0, "counting": 0.25}
    assert s.overall == pytest.approx(0.625)  # not the image mean 0.5
    assert s.num_images == 6
    with pytest.raises(ValueError):
        summarize_geneval(["colors"], [])
