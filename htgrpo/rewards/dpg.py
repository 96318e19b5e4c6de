"""DPG-Bench's scoring rules (TencentQQGYLab/ELLA ``dpg_bench/compute_dpg_bench.py``).

Per crop (one generated image) every question of the prompt is answered yes/no and scores 1.0/0.0; then
the dependency rule zeroes every question with a non-zero parent that scored 0 (parents precede children,
so the zeroing propagates down chains). The crop score is the mean over the prompt's questions, the prompt
score the mean over crops, the benchmark score the mean over prompts x 100.

Two deliberate deviations from the official script, both fixes of known bugs:

* category (L1/L2) scores use the *gated* question scores of *all* crops; the official script uses the last
  crop's scores before the dependency zeroing (ELLA issue #60);
* nothing is skipped: the official reader's ``if i == 0: continue`` drops the first CSV data row, the first
  question of ``partiprompts97`` (ELLA issue #61).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from htgrpo.data.records import DPGItem, MetadataError

Answers = Mapping[int, bool]


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
    """

    item_id: str
    raw: dict[int, float]
    gated: dict[int, float]
    score: float
    category_scores: dict[str, list[float]] = field(default_factory=dict)
    detailed_scores: dict[str, list[float]] = field(default_factory=dict)


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


def gate_answers(item: DPGItem, answers: Answers) -> tuple[dict[int, float], dict[int, float]]:
    """One crop: ``(raw, gated)`` question scores under the dependency rule.

    Rule: raw = 1.0 for "yes", 0.0 for "no"; walking the propositions in order, a question any of whose
    non-zero parents currently scores 0 is set to 0 (parents precede children, so zeros propagate down).

    Raises:
        MetadataError: an answer is missing, or a dependency names an unknown proposition.
    """
    raw: dict[int, float] = {}
    for p in item.propositions:
        if p.proposition_id not in answers:
            raise MetadataError(f"item {item.item_id}: no answer for proposition {p.proposition_id} ({p.tuple})")
        raw[p.proposition_id] = 1.0 if bool(answers[p.proposition_id]) else 0.0
    # Same in-place walk as the official script: a parent earlier in the table has its gated score, a
    # (malformed) later parent its raw one.
    gated: dict[int, float] = dict(raw)
    for p in item.propositions:
        for parent in p.parents:
            if parent not in gated:
                raise MetadataError(
                    f"item {item.item_id}: proposition {p.proposition_id} depends on unknown proposition {parent}"
                )
            if gated[parent] == 0.0:
                gated[p.proposition_id] = 0.0
                break
    return raw, gated


def score_dpg_answers(item: DPGItem, answers: Union[Answers, Sequence[Answers]]) -> DPGItemResult:
    """Score one prompt from the VQA answers of one crop (a mapping) or of several crops (a sequence).

    ``score`` is the mean of the gated question scores, averaged over crops. Category lists collect the
    gated scores of every question of every crop (see the module docstring for the fixed quirks).
    """
    crops: list[Answers] = [answers] if isinstance(answers, Mapping) else list(answers)
    if not crops:
        raise ValueError(f"item {item.item_id}: no crops to score")
    if not item.propositions:
        raise MetadataError(f"item {item.item_id}: no propositions (is the DPG-Bench CSV loaded?)")
    raw_sum: dict[int, float] = {p.proposition_id: 0.0 for p in item.propositions}
    gated_sum: dict[int, float] = dict(raw_sum)
    cats: dict[str, list[float]] = {}
    details: dict[str, list[float]] = {}
    crop_scores = []
    for crop in crops:
        raw, gated = gate_answers(item, crop)
        for p in item.propositions:
            pid = p.proposition_id
            raw_sum[pid] += raw[pid]
            gated_sum[pid] += gated[pid]
            cats.setdefault(p.category_broad, []).append(gated[pid])
            details.setdefault(_l2_name(p.category_broad, p.category_detailed), []).append(gated[pid])
        crop_scores.append(sum(gated.values()) / len(gated))
    n = len(crops)
    return DPGItemResult(
        item_id=item.item_id,
        raw={k: v / n for k, v in raw_sum.items()},
        gated={k: v / n for k, v in gated_sum.items()},
        score=sum(crop_scores) / n,
        category_scores=cats,
        detailed_scores=details,
    )


def summarize_dpg(results: Sequence[DPGItemResult]) -> DPGSummary:
    """DPG-Bench summary: overall = mean prompt score x 100; per L1 (and L2) category the mean of all gated
    question scores in that category x 100."""
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
