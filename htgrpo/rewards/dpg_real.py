"""DPG-Bench on real images: a VQA backend answers the official CSV's yes/no questions, DPG-Bench's rules score them.

DPG-Bench (ELLA ``dpg_bench/compute_dpg_bench.py``) scores one 2x2 grid per prompt: the 4 crops (top-left,
top-right, bottom-left, bottom-right) are 4 samples, every question is asked about every crop, a question passes
iff the answer is exactly ``"yes"``, then the dependency rule and the averages of :mod:`htgrpo.rewards.dpg`.
Here the policy's ``images_per_prompt`` images of a prompt are the crops (``make_grid_2x2`` / ``grid_crops``
convert between a grid file and its crops, in the official crop order).

* :class:`DPGVQAScorer` — the benchmark scorer (``benchmark=dpg``): per-image results (one crop each) and
  per-prompt results over its crops (``score_prompts``) with ``category_mode`` / ``skip_first_row``.
* :class:`DPGReward` — ``reward=dpg``: the prompt score of one image (hard: mean gated yes/no; soft: the same
  with ``p(yes)`` and the soft dependency rule).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch

from htgrpo.config import call_checked, require
from htgrpo.data.records import DPGItem, MetadataError
from htgrpo.rewards.base import Reward, RewardOutput, check_images
from htgrpo.rewards.dpg import (
    CATEGORY_MODES,
    DPGItemResult,
    apply_dependencies_soft,
    question_order,
    score_dpg_answers,
)
from htgrpo.rewards.vqa import VQABackend

GRID_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right")


def grid_crops(grid: torch.Tensor, resolution: int, pic_num: int = 4) -> list[torch.Tensor]:
    """The official crops of a 2x2 grid ``(3, 2R, 2R)``: boxes ``(0,0,R,R)``, ``(R,0,2R,R)``, ``(0,R,R,2R)``,
    ``(R,R,2R,2R)`` (x1, y1, x2, y2), the first ``pic_num`` of them."""
    require(1 <= int(pic_num) <= 4, "pic_num", f"must be in 1..4, got {pic_num}")
    r = int(resolution)
    boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)][: int(pic_num)]
    return [grid[:, y1:y2, x1:x2] for x1, y1, x2, y2 in boxes]


def make_grid_2x2(images: torch.Tensor) -> torch.Tensor:
    """Four images ``(4, 3, R, R)`` -> the grid ``(3, 2R, 2R)`` that ``grid_crops`` splits back (TL, TR, BL, BR)."""
    if images.shape[0] != 4:
        raise ValueError(f"a DPG-Bench grid holds 4 images, got {images.shape[0]}")
    top = torch.cat([images[0], images[1]], dim=-1)
    bottom = torch.cat([images[2], images[3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _check_items(items: Sequence[Any]) -> None:
    for it in items:
        if not isinstance(it, DPGItem):
            raise TypeError(f"the DPG scorer got a {type(it).__name__} record; it scores DPG items only")
        if not it.propositions:
            raise MetadataError(f"item {it.item_id}: no questions; set the DPG-Bench CSV (prompts.csv_path=dpg_bench.csv)")


class DPGVQAScorer:
    """DPG-Bench scorer: a :class:`VQABackend` + the official aggregation.

    Args:
        vqa: the VQA backend (``vqa=``: ``BlipVQA``, ``YesNoLogitVQA``, ``MPLUGVQA``).
        category_mode: ``official`` (last crop, before the dependency rule, as the script computes them; default,
            so numbers compare with published tables) or ``fixed`` (gated scores of all crops).
        skip_first_row: drop CSV data row 0 as the official script does (``if i == 0: continue``).
    """

    def __init__(self, vqa: VQABackend, category_mode: str = "official", skip_first_row: bool = False) -> None:
        require(category_mode in CATEGORY_MODES, "category_mode", f"must be one of {CATEGORY_MODES}, got {category_mode!r}")
        require(isinstance(vqa, VQABackend), "vqa", f"must be a VQA backend (htgrpo.rewards.vqa), got {type(vqa).__name__}")
        self.vqa = vqa
        self.category_mode = category_mode
        self.skip_first_row = bool(skip_first_row)

    def load(self) -> "DPGVQAScorer":
        """Load the VQA model now (a ``ConfigError`` names ``vqa.<key>``)."""
        call_checked(self.vqa.load, "vqa")
        return self

    def _pairs(self, images: torch.Tensor, items: Sequence[DPGItem]) -> tuple[list[Any], list[str], list[tuple[int, int]]]:
        ims, qs, where = [], [], []
        for i, (im, item) in enumerate(zip(images, items)):
            for p in question_order(item, self.skip_first_row):
                ims.append(im)
                qs.append(p.question)
                where.append((i, p.proposition_id))
        return ims, qs, where

    def _per_image(self, images: torch.Tensor, items: Sequence[DPGItem],
                   ask: Callable[[list[Any], list[str]], Sequence[Any]]) -> list[dict[int, Any]]:
        """Per image, ``{proposition_id: value}`` with the values ``ask(images, questions)`` returns for all
        (image, question) pairs of the batch in one call."""
        images = check_images(images)
        if images.shape[0] != len(items):
            raise ValueError(f"got {images.shape[0]} images but {len(items)} items")
        _check_items(items)
        ims, qs, where = self._pairs(images, items)
        out: list[dict[int, Any]] = [{} for _ in items]
        for (i, pid), value in zip(where, ask(ims, qs)):
            out[i][pid] = value
        return out

    def answers(self, images: torch.Tensor, items: Sequence[DPGItem]) -> list[dict[int, bool]]:
        """Per image, ``{proposition_id: answer == "yes"}`` over its item's questions."""
        return self._per_image(images, items, lambda ims, qs: [text == "yes" for text in self.vqa.answer(ims, qs)])

    def yes_probabilities(self, images: torch.Tensor, items: Sequence[DPGItem]) -> list[dict[int, float]]:
        """Per image, ``{proposition_id: p(yes)}``."""
        return self._per_image(images, items,
                               lambda ims, qs: [float(p) for p in self.vqa.yes_probability(ims, qs).tolist()])

    def score(self, images: torch.Tensor, items: Sequence[DPGItem]) -> list[DPGItemResult]:
        """One result per image (each image = one crop of its item)."""
        return [score_dpg_answers(item, a, self.category_mode, self.skip_first_row)
                for item, a in zip(items, self.answers(images, items))]

    def score_prompts(self, images: torch.Tensor, items: Sequence[DPGItem], images_per_prompt: int) -> list[DPGItemResult]:
        """One result per prompt over its ``images_per_prompt`` consecutive images (its crops, grid order)."""
        ipp = int(images_per_prompt)
        if images.shape[0] != len(items) * ipp:
            raise ValueError(f"expected {len(items) * ipp} images for {len(items)} prompts, got {images.shape[0]}")
        expanded = [it for it in items for _ in range(ipp)]
        answers = self.answers(images, expanded)
        return [score_dpg_answers(item, answers[j * ipp:(j + 1) * ipp], self.category_mode, self.skip_first_row)
                for j, item in enumerate(items)]

    def to(self, device: torch.device) -> None:
        self.vqa.to(device)


def soft_prompt_score(item: DPGItem, probs: dict[int, float], skip_first_row: bool = False) -> float:
    """Soft DPG score of one crop: the mean over questions of ``apply_dependencies_soft`` (equals the hard score
    when every ``p(yes)`` is 0 or 1)."""
    order = question_order(item, skip_first_row)
    gated = apply_dependencies_soft(item.item_id, order, {p.proposition_id: probs[p.proposition_id] for p in order})
    return sum(gated.values()) / len(gated)


class DPGReward(Reward):
    """``reward=dpg``: the DPG-Bench prompt score of each image in [0, 1].

    Args:
        vqa: the VQA backend.
        mode: ``hard`` (answers must be exactly "yes"; the benchmark's own rule) or ``soft`` (``p(yes)`` with the
            soft dependency rule: a dense signal).
    Components: ``dpg/score`` (hard) or ``dpg/soft`` (soft).
    """

    name = "dpg"

    def __init__(self, vqa: VQABackend, mode: Literal["hard", "soft"] = "hard", device: str = "auto",
                 dtype: str = "float32") -> None:
        super().__init__(device=device, dtype=dtype)
        require(mode in ("hard", "soft"), "mode", f"must be 'hard' or 'soft', got {mode!r}")
        self.mode = mode
        self.scorer = DPGVQAScorer(vqa, category_mode="fixed", skip_first_row=False)
        self.scorer.load()  # at start-up: missing weights name `reward.vqa.model` instead of becoming NaN rewards

    def _move(self, device: torch.device) -> None:
        self.scorer.to(device)

    def score(self, images: torch.Tensor, records: Sequence[DPGItem]) -> RewardOutput:
        if self.mode == "hard":
            scores = torch.tensor([r.score for r in self.scorer.score(images, records)], dtype=torch.float32)
            return RewardOutput(scores, {"dpg/score": scores})
        probs = self.scorer.yes_probabilities(images, records)
        scores = torch.tensor([soft_prompt_score(it, p) for it, p in zip(records, probs)], dtype=torch.float32)
        return RewardOutput(scores, {"dpg/soft": scores})
