"""GenEval's scoring rules (djghosh13/geneval, ``evaluation/evaluate_images.py`` + ``summary_scores.py``).

The rules only need detections (class, score, box, colour), so the same functions score ShapesWorld's
rule-based detector and a real Mask2Former + CLIP pipeline. Each rule is a small pure function:

* ``filter_detections``: per class keep ``score > 0.3`` (``> 0.9`` on counting prompts), compared in float32
  like the official numpy code; best first with ties resolved as the official ``argsort(...)[::-1]`` does (the
  LATER detection first); at most 16 per class; then the official same-class NMS (``max_overlap``).
* ``relative_position``: GenEval's position rule with its 0.1 margin, in float32 as the official numpy code.
* ``evaluate_geneval``: include requirements AND-ed (at-least-N count, colour of the top-N, position vs an
  earlier matched group), exclude requirements (fail at ``>= count``); plus a dense partial-credit score.
* ``summarize_geneval``: per-task mean, overall = unweighted mean of the task means.
"""

from __future__ import annotations

import numpy as np
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from htgrpo.data.detection import Detection
from htgrpo.data.records import GENEVAL_COLORS, GENEVAL_RELATIONS, GenEvalRecord, GenEvalRequirement, MetadataError


@dataclass(frozen=True)
class GenEvalThresholds:
    """GenEval's evaluation options (``--options``) with their official defaults.

    Attributes:
        score: keep detections with confidence strictly above this (``threshold``, 0.3).
        counting_score: the same for ``counting`` prompts (``counting_threshold``, 0.9).
        max_objects: keep at most this many detections per class, best first (``max_objects``, 16).
        position_margin: per-axis offset shrink factor of the position rule (``position_threshold``, 0.1).
        max_overlap: same-class NMS: a detection whose IoU with a better kept one is ``>= max_overlap`` is
            dropped (``max_overlap``, 1.0 = no NMS, the official default).
    """

    score: float = 0.3
    counting_score: float = 0.9
    max_objects: int = 16
    position_margin: float = 0.1
    max_overlap: float = 1.0


@dataclass(frozen=True)
class GenEvalImageResult:
    """Verdict for one image.

    Attributes:
        correct: GenEval's binary verdict (every include rule holds and no exclude rule fires).
        partial: dense partial credit in [0, 1] (see ``evaluate_geneval``); 1.0 exactly iff ``correct``.
        reason: newline-joined failure reasons in GenEval's wording ("" when correct).
    """

    correct: bool
    partial: float
    reason: str = ""


@dataclass(frozen=True)
class GenEvalSummary:
    """Benchmark summary: ``overall`` = unweighted mean of ``tasks`` (per-task mean correctness)."""

    overall: float
    tasks: dict[str, float] = field(default_factory=dict)
    num_images: int = 0


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU the way GenEval's ``compute_iou`` computes it (inclusive pixel corners, hence the ``+ 1``).

    ``area(b) = max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)``; ``IoU = area(a ∩ b) / (area(a) + area(b) - area(a ∩ b))``,
    0 when the union is 0. E.g. ``(0,0,9,9)`` vs ``(5,0,14,9)``: 50 / (100 + 100 - 50) = 1/3.
    """

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def filter_detections(
    detections: Iterable[Detection], tag: str, thresholds: GenEvalThresholds = GenEvalThresholds()
) -> dict[str, list[Detection]]:
    """Group detections by class the way GenEval's ``evaluate_image`` does before applying its rules.

    Rule, per class, in the official order of steps:

    1. keep a detection if ``float32(score) > float32(threshold)`` with threshold ``thresholds.score`` (0.3), or
       ``thresholds.counting_score`` (0.9) when ``tag == "counting"``. The official scores are float32 numpy
       values compared to a Python float, which numpy does in float32: a score of exactly ``float32(0.3)`` is
       NOT kept (in float64 it would be, since ``float32(0.3) = 0.30000001...``);
    2. order by score, highest first, as ``np.argsort(scores)[::-1]``: among equal scores the detection that
       comes LATER in the detector's list comes first;
    3. keep the top ``thresholds.max_objects`` (16);
    4. greedy NMS (official ``max_overlap``): take the best remaining, drop every other with
       ``box_iou >= max_overlap``; repeat. ``max_overlap == 1`` (the default) keeps everything.
    """
    thr32 = np.float32(thresholds.counting_score if tag == "counting" else thresholds.score)
    by_class: dict[str, list[tuple[np.float32, int, Detection]]] = {}
    for index, det in enumerate(detections):
        score32 = np.float32(det.score)
        if score32 > thr32:
            by_class.setdefault(det.label, []).append((score32, index, det))
    out: dict[str, list[Detection]] = {}
    for cls, entries in by_class.items():
        # Descending by float32 score, ties: later index first (= a stable ascending sort, reversed).
        entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
        ordering = [det for _, _, det in entries[: thresholds.max_objects]]
        kept: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            kept.append(best)
            if thresholds.max_overlap != 1:
                ordering = [d for d in ordering if box_iou(best.box, d.box) < thresholds.max_overlap]
        out[cls] = kept
    return out


def relative_position(a: Detection, b: Detection, margin: float = 0.1) -> set[str]:
    """GenEval's relations of ``a`` relative to ``b`` (image y grows downward), in float32 like the official code.

    Rule: ``offset = centre(a) - centre(b)``; per axis shrink ``|offset|`` by ``margin * (size_a + size_b)``
    on that axis (widths for x, heights for y), clamp at 0 and keep the sign. If both revised components are
    ~0 (< 1e-3) no relation holds. Otherwise divide the revised offset by the *raw* centre distance
    ``(dx, dy)``: ``left of`` if ``dx < -0.5``, ``right of`` if ``dx > 0.5``, ``above`` if ``dy < -0.5``,
    ``below`` if ``dy > 0.5``. Several can hold at once (diagonals).

    Arithmetic: the official numpy code works on the detector's float32 boxes, so every step here is float32 too:
    centre = (x1 + x2) / 2, size = |x2 - x1|, the margin and the 1e-3 cut rounded to float32, the distance as
    ``np.linalg.norm``. Boxes with non-integer corners that sit exactly on a margin get the official verdict
    (float64 arithmetic flips some of them).
    """
    f32 = np.float32
    corners = np.asarray([a.box, b.box], dtype=f32).reshape(2, 2, 2)  # box, (top-left | bottom-right), (x | y)
    centre = (corners[:, 0] + corners[:, 1]) / f32(2)                 # (2 boxes, x|y)
    size = np.abs(corners[:, 1] - corners[:, 0])
    offset = centre[0] - centre[1]
    shrink = f32(margin) * (size[0] + size[1])
    revised = np.maximum(np.abs(offset) - shrink, f32(0)) * np.sign(offset)
    if bool(np.all(np.abs(revised) < f32(1e-3))):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels: set[str] = set()
    if dx < f32(-0.5):
        rels.add("left of")
    if dx > f32(0.5):
        rels.add("right of")
    if dy < f32(-0.5):
        rels.add("above")
    if dy > f32(0.5):
        rels.add("below")
    return rels


def _check_requirement(req: GenEvalRequirement, index: int) -> None:
    if req.count < 1:
        raise MetadataError(f"include[{index}] ({req.cls}): count must be >= 1, got {req.count}")
    if req.position is not None:
        rel, target = req.position
        if rel not in GENEVAL_RELATIONS:
            raise MetadataError(f"include[{index}] ({req.cls}): unknown relation {rel!r}; expected one of {GENEVAL_RELATIONS}")
        if not (0 <= target < index):
            raise MetadataError(
                f"include[{index}] ({req.cls}): position target {target} must index an earlier include entry"
            )


def evaluate_geneval(
    detections: Iterable[Detection] | Mapping[str, Sequence[Detection]],
    record: GenEvalRecord,
    thresholds: GenEvalThresholds = GenEvalThresholds(),
) -> GenEvalImageResult:
    """GenEval's verdict for one image, plus a dense partial credit.

    ``detections`` is the detector's raw list (filtered here with ``filter_detections``) or an already
    filtered ``{class: [detections]}`` mapping.

    Official rules (AND-ed over ``record.include``, in order):

    1. take the top-``count`` detections of the class; fail if fewer than ``count`` (at least N);
    2. colour (if given): fail unless at least ``count`` of those have the colour, i.e. all of the top-N
       (a lower-scoring, wrongly coloured extra object is ignored);
    3. position ``[rel, t]`` (if given, and only if 1-2 passed): fail if include ``t`` did not match;
       else every kept object must be ``rel`` of every object kept for ``t`` (``relative_position``);
    4. the requirement's group is recorded as matched (its kept objects) or None.

    Then every ``exclude`` requirement fails the image if ``count`` or more of its class are detected
    (this gives counting its exact-N semantics together with at-least-N from include).

    Partial credit (not part of GenEval; a dense RL reward): the mean over include requirements of
    ``min(found, count) / count``, times the fraction of kept objects with the right colour (if a colour is
    required), times the fraction of (kept object, target object) pairs in the right relation (if a position
    is required; the target's kept objects are used even if the target failed, 0 when it has none); the
    mean is halved if any exclude rule fires. It equals 1.0 exactly when the image is correct.
    """
    objects = (
        {k: list(v) for k, v in detections.items()}
        if isinstance(detections, Mapping)
        else filter_detections(detections, record.tag, thresholds)
    )
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    kept_groups: list[list[Detection]] = []
    scores: list[float] = []
    for i, req in enumerate(record.include):
        _check_requirement(req, i)
        found = objects.get(req.cls, [])[: req.count]
        kept_groups.append(found)
        matched = True
        score = min(len(found), req.count) / req.count
        if len(found) < req.count:
            correct = matched = False
            reasons.append(f"expected {req.cls}>={req.count}, found {len(found)}")
        elif req.color is not None:
            n_right = sum(1 for d in found if d.color == req.color)
            if n_right < req.count:
                correct = matched = False
                colors = [d.color for d in found]
                reasons.append(  # the official wording, including the colour histogram
                    f"expected {req.color} {req.cls}>={req.count}, found {n_right} {req.color}; and "
                    + ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                )
        if req.color is not None:
            score *= (sum(1 for d in found if d.color == req.color) / len(found)) if found else 0.0
        if req.position is not None:
            rel, target = req.position
            if matched:
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {req.cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in matched_groups[target]:
                            true_rels = relative_position(obj, tgt, thresholds.position_margin)
                            if rel not in true_rels:
                                correct = matched = False
                                # Official wording; the relations sorted (the official set order varies by run).
                                reasons.append(
                                    f"expected {req.cls} {rel} target, found {' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
            targets = kept_groups[target]
            pairs = [(o, t) for o in found for t in targets]
            frac = (
                sum(1 for o, t in pairs if rel in relative_position(o, t, thresholds.position_margin)) / len(pairs)
                if pairs
                else 0.0
            )
            score *= frac
        scores.append(score)
        matched_groups.append(found if matched else None)
    exclude_failed = False
    for req in record.exclude:
        n = len(objects.get(req.cls, []))
        if n >= req.count:
            correct = False
            exclude_failed = True
            reasons.append(f"expected {req.cls}<{req.count}, found {n}")
    partial = sum(scores) / len(scores) if scores else 1.0
    if exclude_failed:
        partial *= 0.5
    return GenEvalImageResult(correct=correct, partial=float(partial), reason="\n".join(reasons))


def summarize_geneval(tags: Sequence[str], correct: Sequence[bool]) -> GenEvalSummary:
    """GenEval's summary: per-task score = mean of ``correct`` over that task's images; ``overall`` = the
    unweighted mean of the task scores present (not the mean over images)."""
    if len(tags) != len(correct):
        raise ValueError(f"got {len(tags)} tags but {len(correct)} verdicts")
    sums: dict[str, list[float]] = {}
    for tag, ok in zip(tags, correct):
        sums.setdefault(tag, []).append(1.0 if ok else 0.0)
    tasks = {t: sum(v) / len(v) for t, v in sums.items()}
    overall = sum(tasks.values()) / len(tasks) if tasks else 0.0
    return GenEvalSummary(overall=overall, tasks=tasks, num_images=len(tags))
