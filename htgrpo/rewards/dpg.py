"""DPG-Bench's scoring rules (TencentQQGYLab/ELLA ``dpg_bench/compute_dpg_bench.py``).

Per crop (one generated image; DPG-Bench scores the 4 crops of a 2x2 grid) every question of the prompt is
answered yes/no and scores 1.0/0.0; then the dependency rule zeroes every question with a non-zero parent that
scores 0, walking the questions in CSV row order and updating in place (so a zero propagates down a chain whose
parents come first; a parent listed after its child is read before it is gated). The crop score is the mean over
the prompt's questions, the prompt score the mean over crops, the benchmark score the mean over prompts x 100.

Two quirks of the official script are switches (``category_mode`` and ``skip_first_row``):

* ``category_mode="official"``: L1/L2 category scores use the LAST crop's answers BEFORE the dependency
  zeroing, one value per question (what the script does; ELLA issue #60); the L2 name is the tuple's text
  before ``"("`` and the L1 name that text's part before ``"-"``. ``"fixed"``: the gated scores of ALL crops.
* ``skip_first_row=True``: the script's ``if i == 0: continue`` drops CSV data row 0 (the first question of
  ``partiprompts97``, ELLA issue #61). A question depending on the dropped one then raises ``KeyError`` in the
  script, which skips that whole prompt (``Failed filename``); here that prompt's result has ``skipped`` set and
  the summary leaves it out, as the script does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, Union

from htgrpo.data.records import DPGItem, DPGProposition, MetadataError

Answers = Mapping[int, bool]
CategoryMode = Literal["official", "fixed"]
CATEGORY_MODES: tuple[str, ...] = ("official", "fixed")


class MissingParentError(MetadataError):
    """A question depends on a proposition the prompt does not have (e.g. the one ``skip_first_row`` dropped)."""


@dataclass(frozen=True)
class DPGItemResult:
    """Scores of one prompt.

    Attributes:
        item_id: the prompt's id.
        raw: per question, the mean over crops of the yes(1)/no(0) answers.
        gated: per question, the mean over crops of the scores after the dependency rule.
        score: prompt score = mean of ``gated`` (= mean over crops of the crop scores).
        category_scores: L1 category -> gated per-question scores (one entry per question and crop).
        detailed_scores: L2 category (``"<broad> - <detailed>"``, e.g. ``attribute - color`` or ``global -``)
            -> gated per-question scores.
        crop_scores: per crop, the mean gated question score.
        crop_answers: per crop, the raw answers (1.0 = "yes") by proposition id.
        skipped: why the official script would drop this prompt ("" = scored); a skipped prompt counts nowhere.
    """

    item_id: str
    raw: dict[int, float]
    gated: dict[int, float]
    score: float
    category_scores: dict[str, list[float]] = field(default_factory=dict)
    detailed_scores: dict[str, list[float]] = field(default_factory=dict)
    crop_scores: tuple[float, ...] = ()
    crop_answers: tuple[dict[int, float], ...] = ()
    skipped: str = ""


@dataclass(frozen=True)
class DPGSummary:
    """Benchmark summary, in percent: ``overall`` = mean prompt score x 100, ``categories`` = per L1 category
    the mean of gated question scores x 100 (``detailed``: the same per L2 category)."""

    overall: float
    categories: dict[str, float] = field(default_factory=dict)
    num_prompts: int = 0
    detailed: dict[str, float] = field(default_factory=dict)


def _l2_name(broad: str, detailed: str) -> str:
    return f"{broad} - {detailed}" if detailed else f"{broad} -"


def question_order(item: DPGItem, skip_first_row: bool = False) -> list[DPGProposition]:
    """The item's questions in CSV row order (``DPGProposition.row``; the given order when rows are unknown),
    without CSV data row 0 when ``skip_first_row`` (the official script's ``if i == 0: continue``)."""
    props = list(item.propositions)
    if all(p.row is not None for p in props):
        props.sort(key=lambda p: p.row)  # type: ignore[arg-type, return-value]
    if skip_first_row:
        props = [p for p in props if p.row != 0]
    return props


def _parent_score(scores: Mapping[int, float], item_id: str, p: DPGProposition, parent: int) -> float:
    """The score of ``p``'s ``parent``; MissingParentError if the parent is not among the scored questions."""
    if parent not in scores:
        raise MissingParentError(
            f"item {item_id}: proposition {p.proposition_id} depends on unknown proposition {parent} (not among the "
            f"scored questions)"
        )
    return scores[parent]


def apply_dependencies(item_id: str, order: Sequence[DPGProposition], raw: Mapping[int, float]) -> dict[int, float]:
    """The official dependency rule on one crop's scores, walking ``order`` and updating in place.

    For each question ``q`` in order, for each non-zero parent ``a`` in its dependency list, in list order: if
    ``scores[a] == 0`` then ``scores[q] = 0`` (and stop). A parent earlier in ``order`` has its gated score, a later
    one its raw score. E.g. rows ``q3 (dep 2), q2 (dep 1), q1`` with answers ``q1=0, q2=1, q3=1`` give
    ``q1=0, q2=0, q3=1``; rows ``q1, q2, q3`` give ``0, 0, 0``.

    Raises:
        MissingParentError: a parent is not among the scored questions (reached before any zero parent, as the
            script's ``KeyError``).
    """
    scores = dict(raw)
    for p in order:
        for parent in p.parents:
            if _parent_score(scores, item_id, p, parent) == 0.0:
                scores[p.proposition_id] = 0.0
                break
    return scores


def apply_dependencies_soft(item_id: str, order: Sequence[DPGProposition], probs: Mapping[int, float]) -> dict[int, float]:
    """Soft dependency rule for yes-probabilities: walking ``order`` in place, ``g[q] = p[q] * prod_a g[a]`` over the
    non-zero parents ``a``. On 0/1 inputs it equals :func:`apply_dependencies` (a zero parent zeroes the child).
    E.g. ``p1 = 0.5, p2 = 0.8`` with q2 depending on q1: ``g2 = 0.8 * 0.5 = 0.4``."""
    scores = dict(probs)
    for p in order:
        for parent in p.parents:
            scores[p.proposition_id] *= _parent_score(scores, item_id, p, parent)
    return scores


def gate_answers(item: DPGItem, answers: Answers, skip_first_row: bool = False) -> tuple[dict[int, float], dict[int, float]]:
    """One crop: ``(raw, gated)`` question scores under the dependency rule (see :func:`apply_dependencies`).

    raw = 1.0 for "yes", 0.0 for "no", over the questions of :func:`question_order`.

    Raises:
        MetadataError: an answer is missing, or a dependency names an unknown proposition (``MissingParentError``).
    """
    order = question_order(item, skip_first_row)
    raw: dict[int, float] = {}
    for p in order:
        if p.proposition_id not in answers:
            raise MetadataError(f"item {item.item_id}: no answer for proposition {p.proposition_id} ({p.tuple})")
        raw[p.proposition_id] = 1.0 if bool(answers[p.proposition_id]) else 0.0
    return raw, apply_dependencies(item.item_id, order, raw)


def official_category(tup: str) -> tuple[str, str]:
    """``(L1, L2)`` names as compute_dpg_bench.py derives them: L2 = the tuple before ``"("`` (stripped), L1 = L2
    before its first ``"-"`` (stripped). E.g. ``"attribute - color (cat, red)"`` -> ``("attribute", "attribute - color")``."""
    l2 = tup.split("(")[0].strip()
    return l2.split("-")[0].strip(), l2


def score_dpg_answers(item: DPGItem, answers: Union[Answers, Sequence[Answers]],
                      category_mode: CategoryMode = "fixed", skip_first_row: bool = False) -> DPGItemResult:
    """Score one prompt from the VQA answers of one crop (a mapping) or of several crops (a sequence, grid order).

    ``score`` is the mean over crops of the mean gated question score. Categories per ``category_mode`` (see the
    module docstring). With ``skip_first_row``, a prompt the official script would drop comes back with
    ``skipped`` set (and score NaN).
    """
    if category_mode not in CATEGORY_MODES:
        raise ValueError(f"category_mode must be one of {CATEGORY_MODES}, got {category_mode!r}")
    crops: list[Answers] = [answers] if isinstance(answers, Mapping) else list(answers)
    if not crops:
        raise ValueError(f"item {item.item_id}: no crops to score")
    if not item.propositions:
        raise MetadataError(f"item {item.item_id}: no propositions (is the DPG-Bench CSV loaded?)")
    order = question_order(item, skip_first_row)
    if not order:  # its only question was row 0: the script has no entry for it and skips the prompt
        return DPGItemResult(item_id=item.item_id, raw={}, gated={}, score=float("nan"),
                             skipped="no questions left after skip_first_row (the official script skips this prompt)")
    raw_sum: dict[int, float] = {p.proposition_id: 0.0 for p in order}
    gated_sum: dict[int, float] = dict(raw_sum)
    cats: dict[str, list[float]] = {}
    details: dict[str, list[float]] = {}
    crop_scores = []
    crop_answers = []
    raw: dict[int, float] = {}
    for crop in crops:
        try:
            raw, gated = gate_answers(item, crop, skip_first_row)
        except MissingParentError as err:
            if not skip_first_row:
                raise
            nan = float("nan")
            return DPGItemResult(item_id=item.item_id, raw={}, gated={}, score=nan,
                                 skipped=f"{err} (dropped by skip_first_row; the official script skips this prompt)")
        for p in order:
            pid = p.proposition_id
            raw_sum[pid] += raw[pid]
            gated_sum[pid] += gated[pid]
            if category_mode == "fixed":
                cats.setdefault(p.category_broad, []).append(gated[pid])
                details.setdefault(_l2_name(p.category_broad, p.category_detailed), []).append(gated[pid])
        crop_scores.append(sum(gated.values()) / len(gated))
        crop_answers.append(raw)
    if category_mode == "official":  # the last crop's answers before the dependency rule
        for p in order:
            l1, l2 = official_category(p.tuple)
            cats.setdefault(l1, []).append(raw[p.proposition_id])
            details.setdefault(l2, []).append(raw[p.proposition_id])
    n = len(crops)
    return DPGItemResult(
        item_id=item.item_id,
        raw={k: v / n for k, v in raw_sum.items()},
        gated={k: v / n for k, v in gated_sum.items()},
        score=sum(crop_scores) / n,
        category_scores=cats,
        detailed_scores=details,
        crop_scores=tuple(crop_scores),
        crop_answers=tuple(crop_answers),
    )


def summarize_dpg(results: Sequence[DPGItemResult]) -> DPGSummary:
    """DPG-Bench summary: overall = mean prompt score x 100; per L1 (and L2) category the mean of all the
    question scores collected in that category (see ``category_mode``) x 100. Skipped prompts count nowhere."""
    results = [r for r in results if not r.skipped]
    if not results:
        return DPGSummary(overall=0.0, categories={}, num_prompts=0)
    overall = 100.0 * sum(r.score for r in results) / len(results)
    cats: dict[str, list[float]] = {}
    details: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.category_scores.items():
            cats.setdefault(k, []).extend(v)
        for k, v in r.detailed_scores.items():
            details.setdefault(k, []).extend(v)
    return DPGSummary(
        overall=overall,
        categories={k: 100.0 * sum(v) / len(v) for k, v in cats.items() if v},
        num_prompts=len(results),
        detailed={k: 100.0 * sum(v) / len(v) for k, v in details.items() if v},
    )
