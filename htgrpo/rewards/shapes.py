"""ShapesWorld scorers and rewards: the rule-based detector + the official GenEval / DPG-Bench rules.

* ``ShapesGenEvalScorer``: detector -> ``evaluate_geneval`` (GenEval's rules, unchanged).
* ``ShapesVQA``: the stand-in for DPG-Bench's mPLUG VQA model; answers a proposition by reading its DSG
  tuple against the detections.
* ``ShapesDPGScorer``: ``ShapesVQA`` answers -> ``score_dpg_answers`` (DPG-Bench's rules).
* Rewards: binary GenEval correctness, GenEval partial credit, and the DPG prompt score.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch

from htgrpo.data.detection import Detection
from htgrpo.data.records import DPGItem, DPGProposition, GenEvalRecord, MetadataError, parse_tuple
from htgrpo.data.shapes.detector import ShapesDetector, to_chw_numpy
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.data.shapes.scene import image_to_cells
from htgrpo.rewards.base import Reward, RewardOutput
from htgrpo.rewards.dpg import DPGItemResult, score_dpg_answers
from htgrpo.rewards.geneval import GenEvalImageResult, GenEvalThresholds, evaluate_geneval, relative_position


def _batch(images: Any) -> list[np.ndarray]:
    if isinstance(images, (list, tuple)):
        return [to_chw_numpy(im) for im in images]
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu").numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B,3,H,W), got shape {arr.shape}")
    return list(arr)


class ShapesGenEvalScorer:
    """GenEval on ShapesWorld: ``ShapesDetector`` + ``evaluate_geneval``."""

    def __init__(self, world: ShapesWorldConfig, thresholds: GenEvalThresholds = GenEvalThresholds()) -> None:
        self.world = world
        self.thresholds = thresholds
        self.detector = ShapesDetector(world)

    def score(self, images: Any, records: Sequence[GenEvalRecord]) -> list[GenEvalImageResult]:
        """One verdict per image; ``images`` is ``uint8`` ``(B, 3, H, W)`` and ``records`` has length B."""
        return self.score_with_detections(images, records)[0]

    def score_with_detections(
        self, images: Any, records: Sequence[GenEvalRecord]
    ) -> tuple[list[GenEvalImageResult], list[list[Detection]]]:
        """``score`` plus the detector's raw detections per image, so validation metrics beside GenEval
        (``htgrpo.evaluation.diversity``) reuse them instead of detecting every image twice."""
        dets = self.detector.detect_batch(images)
        if len(dets) != len(records):
            raise ValueError(f"got {len(dets)} images but {len(records)} records")
        return [evaluate_geneval(d, r, self.thresholds) for d, r in zip(dets, records)], dets


def geneval_binary_reward(results: Sequence[GenEvalImageResult]) -> list[float]:
    """GenEval correctness as a reward: 1.0 if correct else 0.0."""
    return [1.0 if r.correct else 0.0 for r in results]


def geneval_partial_reward(results: Sequence[GenEvalImageResult]) -> list[float]:
    """GenEval partial credit as a reward (in [0, 1], 1.0 iff correct; see ``evaluate_geneval``)."""
    return [float(r.partial) for r in results]


class ShapesGenEvalReward(Reward):
    """GenEval credit on ShapesWorld: ``binary`` (correctness) or ``partial`` credit, as ``scores`` (B,).

    Components: ``geneval/correct`` (0/1) and ``geneval/partial`` (partial credit), whatever the mode.
    """

    name = "shapes_geneval"

    def __init__(
        self,
        world: ShapesWorldConfig,
        mode: Literal["binary", "partial"] = "binary",
        thresholds: GenEvalThresholds = GenEvalThresholds(),
    ) -> None:
        super().__init__()
        if mode not in ("binary", "partial"):
            raise ValueError(f"mode must be 'binary' or 'partial', got {mode!r}")
        self.mode = mode
        self.scorer = ShapesGenEvalScorer(world, thresholds)

    def score(self, images: Any, records: Sequence[GenEvalRecord]) -> RewardOutput:
        results = self.scorer.score(images, records)
        correct = torch.tensor(geneval_binary_reward(results), dtype=torch.float32)
        partial = torch.tensor(geneval_partial_reward(results), dtype=torch.float32)
        return RewardOutput(correct if self.mode == "binary" else partial,
                            {"geneval/correct": correct, "geneval/partial": partial})


class ShapesVQA:
    """Yes/no answers to ShapesWorld DPG propositions, read from the proposition's DSG tuple.

    Detections with score > ``score_threshold`` (0.3) count. Supported tuples:

    * ``entity - whole (shape)``: some detection of that shape;
    * ``attribute - color (shape, color)``: more than half of that shape's detections have the colour;
    * ``attribute - size (shape, small|large)``: the top detection's longer side in cells is
      ``<= world.small_size`` (small) / ``>= world.large_size`` (large);
    * ``other - count (shape, ==N)``: exactly N detections of that shape;
    * ``relation - spatial (A, B, rel)``: GenEval's ``relative_position`` (margin 0.1) between the top A and
      top B detections contains ``rel``;
    * ``global - (background, grey)``: at least half of the cells outside the detected objects' boxes are
      background grey. (Not "half of all cells": a valid dense scene can cover most of the canvas.)

    Any other tuple raises ``MetadataError`` naming it.
    """

    def __init__(self, world: ShapesWorldConfig, score_threshold: float = 0.3, margin: float = 0.1) -> None:
        self.world = world
        self.detector = ShapesDetector(world)
        self.score_threshold = score_threshold
        self.margin = margin

    def _observe(self, image: Any) -> tuple[list[Detection], np.ndarray, float]:
        arr = to_chw_numpy(image)
        g = self.world.grid_size
        cells = image_to_cells(arr, g)
        cell_px = arr.shape[-2] / g
        dets = self.detector.detect_cells(cells, cell_px, arr.shape[-1] / g)
        return [d for d in dets if d.score > self.score_threshold], cells, cell_px

    def _answer(self, dets: list[Detection], cells: np.ndarray, cell_px: float, prop: DPGProposition) -> bool:
        broad, detailed, args = parse_tuple(prop.tuple)
        key = (broad, detailed)

        def of(shape: str) -> list[Detection]:
            return [d for d in dets if d.label == shape]  # already sorted by score

        def need(n: int) -> None:
            if len(args) != n:
                raise MetadataError(f"proposition tuple {prop.tuple!r}: expected {n} arguments, got {len(args)}")

        if key == ("entity", "whole"):
            need(1)
            return bool(of(args[0]))
        if key == ("attribute", "color"):
            need(2)
            found = of(args[0])
            return bool(found) and 2 * sum(1 for d in found if d.color == args[1]) > len(found)
        if key == ("attribute", "size"):
            need(2)
            found = of(args[0])
            if not found:
                return False
            side = max(found[0].size) / cell_px
            if args[1] == "small":
                return side <= self.world.small_size + 1e-6
            if args[1] == "large":
                return side >= self.world.large_size - 1e-6
            raise MetadataError(f"proposition tuple {prop.tuple!r}: size must be 'small' or 'large'")
        if key == ("other", "count"):
            need(2)
            text = args[1].strip()
            text = text[2:] if text.startswith("==") else text
            if not text.isdigit():
                raise MetadataError(f"proposition tuple {prop.tuple!r}: count must look like '==N'")
            return len(of(args[0])) == int(text)
        if key == ("relation", "spatial"):
            need(3)
            a, b = of(args[0]), of(args[1])
            return bool(a) and bool(b) and args[2] in relative_position(a[0], b[0], self.margin)
        if key == ("global", "") and len(args) == 2 and args[0] == "background" and args[1] in ("grey", "gray"):
            cells = np.asarray(cells)
            outside = np.ones(cells.shape, dtype=bool)
            for d in dets:
                x1, y1, x2, y2 = (int(round(v / cell_px)) for v in d.box)
                outside[y1:y2, x1:x2] = False
            return bool(outside.any()) and float(np.mean(cells[outside] == 0)) >= 0.5
        raise MetadataError(f"ShapesVQA cannot answer proposition tuple {prop.tuple!r} (question: {prop.question!r})")

    def answer(self, image: Any, proposition: DPGProposition) -> bool:
        """Answer one proposition about one ``uint8`` image ``(3, H, W)``."""
        dets, cells, cell_px = self._observe(image)
        return self._answer(dets, cells, cell_px, proposition)

    def answer_item(self, image: Any, item: DPGItem) -> dict[int, bool]:
        """Answers to all of an item's propositions (the image is analysed once)."""
        dets, cells, cell_px = self._observe(image)
        return {p.proposition_id: self._answer(dets, cells, cell_px, p) for p in item.propositions}


class ShapesDPGScorer:
    """DPG-Bench on ShapesWorld: ``ShapesVQA`` answers + ``score_dpg_answers``."""

    def __init__(self, world: ShapesWorldConfig) -> None:
        self.world = world
        self.vqa = ShapesVQA(world)

    def score(self, images: Any, items: Sequence[DPGItem]) -> list[DPGItemResult]:
        """One result per image (one image = one crop of its item)."""
        ims = _batch(images)
        if len(ims) != len(items):
            raise ValueError(f"got {len(ims)} images but {len(items)} items")
        return [score_dpg_answers(item, self.vqa.answer_item(im, item)) for im, item in zip(ims, items)]


class ShapesDPGReward(Reward):
    """The DPG prompt score in [0, 1] on ShapesWorld as ``scores`` (B,); component ``dpg/score``."""

    name = "shapes_dpg"

    def __init__(self, world: ShapesWorldConfig) -> None:
        super().__init__()
        self.scorer = ShapesDPGScorer(world)

    def score(self, images: Any, items: Sequence[DPGItem]) -> RewardOutput:
        scores = torch.tensor([r.score for r in self.scorer.score(images, items)], dtype=torch.float32)
        return RewardOutput(scores, {"dpg/score": scores})


class ShapesPromptReward(Reward):
    """Reward for a mixed ShapesWorld prompt stream: GenEval records get GenEval credit, DPG items the DPG prompt score.

    ``scores``: float32 (B,) in [0, 1]. ``geneval_mode``: ``binary`` (GenEval correctness, the benchmark's own
    metric) or ``partial`` (partial credit: denser signal for small groups). Components (NaN on images of the other
    benchmark): ``geneval/correct``, ``geneval/partial``, ``dpg/score``.
    """

    name = "shapes"

    def __init__(self, world: ShapesWorldConfig, geneval_mode: Literal["binary", "partial"] = "binary") -> None:
        super().__init__()
        if geneval_mode not in ("binary", "partial"):
            raise ValueError(f"geneval_mode must be 'binary' or 'partial', got {geneval_mode!r}")
        self.geneval_mode = geneval_mode
        self.geneval = ShapesGenEvalReward(world, geneval_mode)
        self.dpg = ShapesDPGReward(world)

    def score(self, images: Any, records: Sequence[GenEvalRecord | DPGItem]) -> RewardOutput:
        n = len(records)
        out = torch.zeros(n, dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        gen = [i for i, r in enumerate(records) if isinstance(r, GenEvalRecord)]
        dpg = [i for i, r in enumerate(records) if isinstance(r, DPGItem)]
        other = set(range(n)) - set(gen) - set(dpg)
        if other:
            raise TypeError(f"unsupported record type {type(records[min(other)]).__name__}")
        for idx, part in ((gen, self.geneval), (dpg, self.dpg)):
            if idx:
                index = torch.tensor(idx)
                res = part.score(images[idx], [records[i] for i in idx])
                out[index] = res.scores
                for name, values in res.components.items():
                    components.setdefault(name, torch.full((n,), math.nan))[index] = values
        return RewardOutput(out, components)
