"""GenEval's official rules on hand-built detection lists (htgrpo.rewards.geneval)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from htgrpo.data.detection import Detection
from htgrpo.data.records import GENEVAL_COLORS, GenEvalRecord, GenEvalRequirement, MetadataError
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.data.shapes.prompts import random_geneval_record
from htgrpo.rewards.geneval import (
    GenEvalThresholds,
    box_iou,
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


def test_scores_of_exactly_0_3_and_0_9_are_compared_in_float32():
    # float32(0.3) = 0.30000001192...: above 0.3 in float64, but the official numpy code compares in float32,
    # where it equals the threshold and is dropped (strict >). 0.900000001 rounds to float32(0.9) = 0.89999998:
    # above 0.9 in float64, equal in float32. One float32 step above each threshold is kept.
    f32_03, f32_09 = float(np.float32(0.3)), 0.900000001
    assert f32_03 > 0.3 and f32_09 > 0.9 and np.float32(f32_09) == np.float32(0.9)  # float64 would keep both
    above_03 = float(np.nextafter(np.float32(0.3), np.float32(1)))
    above_09 = float(np.nextafter(np.float32(0.9), np.float32(1)))
    dets = [det("circle", 0.3), det("circle", f32_03), det("circle", above_03)]
    assert [d.score for d in filter_detections(dets, "colors")["circle"]] == [above_03]
    dets = [det("circle", 0.9), det("circle", f32_09), det("circle", above_09)]
    assert [d.score for d in filter_detections(dets, "counting")["circle"]] == [above_09]
    # counting: two circles, one at exactly 0.9 -> only one counts -> "expected circle>=2, found 1"
    res = evaluate_geneval([det("circle", 0.95), det("circle", 0.9)], counting("circle", 2))
    assert not res.correct and res.reason == "expected circle>=2, found 1"


def test_ties_keep_the_later_detection_first_like_argsort_reversed():
    # np.argsort([0.8, 0.8])[::-1] == [1, 0]: among equal scores the LATER detection comes first.
    first_red, second_blue = det("circle", 0.8, color="red"), det("circle", 0.8, color="blue")
    assert filter_detections([first_red, second_blue], "colors")["circle"] == [second_blue, first_red]
    red = GenEvalRecord("colors", "a photo of a red circle", (R("circle", 1, color="red"),))
    res = evaluate_geneval([first_red, second_blue], red)
    assert not res.correct and res.reason == "expected red circle>=1, found 0 red; and 1 blue"
    assert evaluate_geneval([second_blue, first_red], red).correct
    # scores equal in float32 but not in float64 are a tie too
    a, b = det("square", 0.7, color="red"), det("square", 0.7 + 1e-9, color="blue")
    assert filter_detections([b, a], "colors")["square"] == [a, b]
    # max_objects truncates after the tie order: the later one of a tie survives
    kept = filter_detections([det("square", 0.5, cx=1), det("square", 0.5, cx=2)], "colors", GenEvalThresholds(max_objects=1))
    assert [d.center[0] for d in kept["square"]] == [2]


def test_box_iou_is_genevals_inclusive_pixel_formula():
    # (0,0,9,9) and (5,0,14,9): 10x10 boxes (inclusive corners) overlapping in 5x10 = 50 -> 50 / 150
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    assert box_iou((0, 0, -1, -1), (0, 0, -1, -1)) == 0  # empty union


def test_max_overlap_is_greedy_same_class_nms():
    a = Detection("dog", 0.9, (0, 0, 9, 9))
    b = Detection("dog", 0.8, (5, 0, 14, 9))  # IoU(a, b) = 1/3
    c = Detection("dog", 0.7, (1, 0, 10, 9))  # IoU(a, c) = 90/110 = 0.818
    d = Detection("cat", 0.6, (0, 0, 9, 9))  # other class: never suppressed by dogs
    assert len(filter_detections([a, b, c, d], "two_object")["dog"]) == 3  # default 1.0: no NMS
    kept = filter_detections([a, b, c, d], "two_object", GenEvalThresholds(max_overlap=0.5))
    assert kept["dog"] == [a, b] and kept["cat"] == [d]
    kept = filter_detections([a, b, c], "two_object", GenEvalThresholds(max_overlap=1 / 3))
    assert kept["dog"] == [a]  # IoU exactly 1/3 >= 1/3 is suppressed (official: keep only IoU < max_overlap)


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


def official_relative_position_f32(box_a, box_b, margin=0.1) -> set[str]:
    """GenEval's ``relative_position`` (evaluation/evaluate_images.py) re-stated op for op on float32 boxes, as the
    official code runs it on mmdet's float32 box rows (numpy promotes the Python-float margin and 1e-3 to float32)."""
    boxes = np.array([box_a, box_b], dtype=np.float32)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    names = (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
    return {name for name, holds in names if holds}


def float64_relative_position(box_a, box_b, margin=0.1) -> set[str]:
    """The same rule in Python-float (float64) arithmetic: what htgrpo computed before issue 17."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = box_a, box_b
    off = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    dims = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    revised = [math.copysign(max(abs(o) - margin * d, 0.0), o) for o, d in zip(off, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = (r / math.hypot(*off) for r in revised)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def f32_box(*corners: float) -> tuple[float, ...]:
    """A box as a float32 detector reports it (the nearest float32 of each corner, held as a Python float)."""
    return tuple(float(np.float32(c)) for c in corners)


def margin_scenes():
    """Scenes on the "right of" margin: boxes on the same rows, tenth-pixel corners, the centre of A 0.2 · (w_A + w_B)
    right of B's, so in exact arithmetic dx = (o - 0.1 (w_A + w_B)) / o = 0.5 (then rounded to float32 corners)."""
    for wa10, wb10, xb10 in itertools.product(range(5, 60, 6), range(5, 60, 8), range(0, 300, 13)):
        wa, wb, xb = wa10 / 10, wb10 / 10, xb10 / 10
        ca = xb + wb / 2 + 0.2 * (wa + wb)
        yield f32_box(ca - wa / 2, 10.0, ca + wa / 2, 20.0), f32_box(xb, 10.0, xb + wb, 20.0)


def test_relative_position_is_computed_in_float32_like_the_official_code():
    # A fixed margin case (issue 17 item 7): float64 arithmetic says "right of", the official float32 code says no
    # relation. Boxes as a float32 detector gives them.
    a, b = f32_box(1.6, 10.0, 2.1, 20.0), f32_box(1.4, 10.0, 1.9, 20.0)
    assert float64_relative_position(a, b) == {"right of"}
    assert official_relative_position_f32(a, b) == set()
    assert relative_position(Detection("circle", 0.99, a), Detection("square", 0.99, b)) == set()
    # Every margin scene, and random float32 scenes, get the official verdict; the margin scenes include verdicts
    # float64 arithmetic flips (in both directions).
    flips = set()
    for a, b in margin_scenes():
        ours = relative_position(Detection("circle", 0.99, a), Detection("square", 0.99, b))
        assert ours == official_relative_position_f32(a, b), (a, b)
        if ours != float64_relative_position(a, b):
            flips.add("right of" in ours)
    assert flips == {True, False}
    rng = np.random.default_rng(0)
    for _ in range(500):
        corners = rng.uniform(0, 512, (2, 2, 2)).astype(np.float32)
        corners.sort(axis=1)  # x1 <= x2, y1 <= y2
        a, b = (tuple(float(v) for v in c.reshape(-1)) for c in corners)  # (x1, y1, x2, y2)
        for margin in (0.1, 0.15):
            got = relative_position(Detection("circle", 0.99, a), Detection("square", 0.99, b), margin)
            assert got == official_relative_position_f32(a, b, margin), (a, b, margin)


def test_position_rule():
    rec = position("circle", "left of", "square")
    assert rec.include[0].cls == "square" and rec.include[1].position == ("left of", 0)
    assert evaluate_geneval([det("circle", cx=20), det("square", cx=80)], rec).correct
    res = evaluate_geneval([det("circle", cx=80), det("square", cx=20)], rec)
    assert not res.correct and res.partial == pytest.approx(0.5)
    assert res.reason == "expected circle left of target, found right of target"  # the official wording
    inside = evaluate_geneval([det("circle", cx=47), det("square", cx=50)], rec)  # inside the margin: no relation
    assert inside.reason == "expected circle left of target, found  target"
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
    world = ShapesWorldConfig.roomy(shapes=("circle", "square", "triangle"))
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
