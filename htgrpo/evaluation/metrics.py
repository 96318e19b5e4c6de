"""Benchmark scores as torchmetrics metrics, so they are summed correctly across DDP ranks.

* :class:`GenEvalMetric` — per-task accuracy over images; overall = unweighted mean of the task scores
  (GenEval's ``summary_scores.py``).
* :class:`DPGMetric` — prompt score = mean over that prompt's images of the mean gated question score;
  benchmark = mean prompt score × 100; L1 category scores = mean gated question score × 100.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from htgrpo.data.records import DPG_L1_CATEGORIES, GENEVAL_TASKS


class GenEvalMetric(Metric):
    """Accumulates GenEval correctness per task. ``compute()`` returns ``{"overall": x, "<task>": x, ...}``."""

    full_state_update = False

    def __init__(self, tasks: Sequence[str] = GENEVAL_TASKS):
        super().__init__()
        self.tasks = tuple(tasks)
        self.add_state("correct", default=torch.zeros(len(self.tasks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.tasks), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tags: Sequence[str], correct: Sequence[bool]) -> None:  # type: ignore[override]
        if len(tags) != len(correct):
            raise ValueError(f"got {len(tags)} tags but {len(correct)} results")
        for tag, ok in zip(tags, correct):
            i = self.tasks.index(tag)
            self.correct[i] += float(bool(ok))
            self.total[i] += 1.0

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        out: dict[str, float] = {}
        seen = self.total > 0
        for i, task in enumerate(self.tasks):
            if seen[i]:
                out[task] = float(self.correct[i] / self.total[i])
        out["overall"] = float((self.correct[seen] / self.total[seen]).mean()) if bool(seen.any()) else float("nan")
        return out

    @property
    def num_images(self) -> int:
        return int(self.total.sum().item())


class DPGMetric(Metric):
    """Accumulates DPG-Bench scores. ``compute()`` returns ``{"overall": x, "<L1 category>": x, ...}`` (×100)."""

    full_state_update = False

    def __init__(self, categories: Sequence[str] = DPG_L1_CATEGORIES):
        super().__init__()
        self.categories = tuple(categories)
        self.add_state("prompt_score_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_prompts", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("category_sum", default=torch.zeros(len(self.categories), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("category_count", default=torch.zeros(len(self.categories), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, image_scores: Sequence[float], category_scores: Sequence[dict[str, list[float]]]) -> None:  # type: ignore[override]
        """Add ONE prompt: the score of each of its images and, per image, the gated question scores by L1 category."""
        if not image_scores:
            raise ValueError("a DPG prompt needs at least one image score")
        self.prompt_score_sum += float(sum(image_scores)) / len(image_scores)
        self.num_prompts += 1.0
        for per_image in category_scores:
            for cat, values in per_image.items():
                i = self.categories.index(cat)
                self.category_sum[i] += float(sum(values))
                self.category_count[i] += float(len(values))

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        out: dict[str, float] = {}
        for i, cat in enumerate(self.categories):
            if self.category_count[i] > 0:
                out[cat] = float(100.0 * self.category_sum[i] / self.category_count[i])
        out["overall"] = float(100.0 * self.prompt_score_sum / self.num_prompts) if self.num_prompts > 0 else float("nan")
        return out

    @property
    def prompts_seen(self) -> int:
        return int(self.num_prompts.item())
