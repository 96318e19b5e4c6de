"""A benchmark = a prompt set + the scorer that applies its official rules + how many images per prompt.

The same object drives validation inside ``fit`` (through a torchmetrics metric, DDP-safe) and the
``evaluate`` entry point (which also writes per-image rows and sample grids).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from htgrpo.config import require
from htgrpo.data.prompt_sets import PromptSet
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.evaluation.diversity import ShapesDiversityMetric, make_diversity_metric
from htgrpo.evaluation.metrics import DPGMetric, GenEvalMetric

log = logging.getLogger("htgrpo.evaluation")


class ImageGenerator(Protocol):
    """Anything that turns prompts into images: a policy with its sampler, the oracle, random tokens."""

    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        """One uint8 image (3, H, W) per prompt, stacked to (B, 3, H, W)."""
        ...


class Benchmark:
    """A prompt set scored by its benchmark's rules.

    Args:
        prompts: the prompt set (its ``kind`` says which rules apply: ``geneval`` or ``dpg``).
        scorer: object with ``score(images, records)``; GenEval scorers return results with ``.correct``,
            DPG scorers results with ``.score`` and ``.category_scores``.
        images_per_prompt: images generated and scored per prompt (GenEval's reference script uses 4;
            DPG-Bench scores 4 crops of a 2×2 grid).
        batch_size: images per generation batch in ``evaluate``.
    """

    def __init__(self, prompts: PromptSet, scorer: Any, images_per_prompt: int = 4, batch_size: int = 64):
        require(int(images_per_prompt) >= 1, "images_per_prompt", f"must be >= 1, got {images_per_prompt}")
        require(int(batch_size) >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        self.prompts = prompts
        self.scorer = scorer
        self.images_per_prompt = int(images_per_prompt)
        self.batch_size = int(batch_size)
        self._prepared = False
        if hasattr(scorer, "use_prompt_set"):  # cheap (no model loading): e.g. GenEval's object_names.txt beside
            scorer.use_prompt_set(prompts)

    @property
    def name(self) -> str:
        return self.prompts.name

    @property
    def kind(self) -> str:
        return self.prompts.kind

    def make_metric(self) -> GenEvalMetric | DPGMetric:
        return GenEvalMetric() if self.kind == "geneval" else DPGMetric()

    def make_diversity_metric(self) -> ShapesDiversityMetric | None:
        """Diversity / fidelity metrics beside the benchmark's score (``htgrpo.evaluation.diversity``): for a
        ShapesWorld GenEval scorer; None for scorers that cannot hand over their detections."""
        return make_diversity_metric(self.scorer, self.kind)

    def prepare(self) -> None:
        """Start-up work before generating: load the scorer's models (scorers load lazily, so building a benchmark
        that never scores needs no weights) and check the prompts against the scorer (e.g. GenEval classes the
        detector lacks -> ``MetadataError`` with ``file:line``)."""
        if hasattr(self.scorer, "load"):
            self.scorer.load()
        if hasattr(self.scorer, "check_prompt_set"):
            self.scorer.check_prompt_set(self.prompts)
        self._prepared = True

    def score(self, prompts: Sequence[BenchmarkPrompt], images: torch.Tensor,
              metric: GenEvalMetric | DPGMetric | None = None,
              diversity: ShapesDiversityMetric | None = None) -> list[dict[str, Any]]:
        """Score ``images`` (prompt-major: ``images_per_prompt`` consecutive images per prompt).

        Updates ``metric`` when given, and ``diversity`` (from the scorer's own detections, so every image is
        detected once) when given, and returns one row per image (GenEval's per-image result format).
        """
        if not getattr(self, "_prepared", False):  # e.g. the first validation of `fit`, which does not call prepare() itself
            self.prepare()
        ipp = self.images_per_prompt
        if images.shape[0] != len(prompts) * ipp:
            raise ValueError(f"expected {len(prompts) * ipp} images for {len(prompts)} prompts, got {images.shape[0]}")
        expanded = [p for p in prompts for _ in range(ipp)]
        rows: list[dict[str, Any]] = []
        if self.kind == "dpg" and hasattr(self.scorer, "score_prompts"):
            # Prompt-level scoring over the prompt's crops (DPG-Bench's category_mode / skip_first_row need it).
            for p, r in zip(prompts, self.scorer.score_prompts(images, [p.record for p in prompts], ipp)):
                for i in range(ipp):
                    rows.append({"item_id": p.key, "image_index": i, "prompt": p.prompt,
                                 "score": float(r.crop_scores[i]) if r.crop_scores else float("nan"),
                                 "prompt_score": float(r.score), "skipped": r.skipped,
                                 "answers": ({str(k): v for k, v in r.crop_answers[i].items()}
                                             if r.crop_answers else {})})
                if r.skipped:  # what compute_dpg_bench.py reports as "Failed filename"; it counts nowhere
                    log.warning("DPG prompt %s skipped: %s", p.key, r.skipped)
                elif metric is not None:
                    metric.update(list(r.crop_scores), [r.category_scores])
            return rows
        if diversity is not None:
            results, detections = self.scorer.score_with_detections(images, [p.record for p in expanded])
            diversity.update(prompts, images, detections, ipp)
        else:
            results = self.scorer.score(images, [p.record for p in expanded])
        if self.kind == "geneval":
            for i, (p, r) in enumerate(zip(expanded, results)):
                row = {"key": p.key, "image_index": i % ipp, "tag": p.group, "prompt": p.prompt,
                       "correct": bool(r.correct), "partial": float(r.partial), "reason": r.reason,
                       "metadata": p.record.to_json()}
                if hasattr(r, "details"):  # detector-based scorers: kept boxes per class (GenEval's `details`)
                    row["details"] = json.dumps(r.details)
                rows.append(row)
            if metric is not None:
                metric.update([p.group for p in expanded], [bool(r.correct) for r in results])
        else:
            for j, p in enumerate(prompts):
                chunk = results[j * ipp:(j + 1) * ipp]
                for i, r in enumerate(chunk):
                    rows.append({"item_id": p.key, "image_index": i, "prompt": p.prompt, "score": float(r.score),
                                 "answers": {str(k): v for k, v in r.gated.items()}})
                if metric is not None:
                    metric.update([r.score for r in chunk], [r.category_scores for r in chunk])
        return rows


@dataclass
class BenchmarkReport:
    """What one evaluation produced."""

    benchmark: str
    kind: str
    scores: dict[str, float]
    num_images: int
    num_prompts: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> uint8 images for a grid
    sample_prompts: dict[str, list[str]] = field(default_factory=dict)  # group -> prompt of each sample image
    sample_correct: dict[str, list[bool | None]] = field(default_factory=dict)  # group -> verdict per sample image
    diversity: dict[str, float] = field(default_factory=dict)  # diversity/fidelity metrics (ShapesWorld GenEval)

    def results_json(self) -> dict[str, Any]:
        """The results file: GenEval ``{benchmark, overall in [0,1], tasks, num_images}``;
        DPG ``{benchmark, overall in [0,100], categories, num_prompts}``."""
        overall = self.scores["overall"]
        parts = {k: v for k, v in self.scores.items() if k != "overall"}
        if self.kind == "geneval":
            return {"benchmark": self.benchmark, "overall": overall, "tasks": parts, "num_images": self.num_images}
        return {"benchmark": self.benchmark, "overall": overall, "categories": parts, "num_prompts": self.num_prompts}

    def table(self) -> str:
        """A markdown table in the papers' format (tasks/categories then Overall)."""
        parts = [(k, v) for k, v in self.scores.items() if k != "overall"]
        header = "| " + " | ".join([k for k, _ in parts] + ["overall"]) + " |"
        sep = "|" + "---|" * (len(parts) + 1)
        fmt = (lambda v: f"{v:.3f}") if self.kind == "geneval" else (lambda v: f"{v:.2f}")
        row = "| " + " | ".join([fmt(v) for _, v in parts] + [fmt(self.scores["overall"])]) + " |"
        lines = [f"{self.benchmark} ({self.num_prompts} prompts, {self.num_images} images)", header, sep, row]
        if self.diversity:
            lines += ["", "| diversity / fidelity | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in self.diversity.items()]
        return "\n".join(lines)


def run_benchmark(benchmark: Benchmark, image_generator: ImageGenerator, seed: int = 0,
                  samples_per_group: int = 8, progress: bool = True,
                  image_dir: str | Path | None = None) -> BenchmarkReport:
    """Generate ``images_per_prompt`` images for every prompt, score them, and summarise.

    Images are generated in batches of ``benchmark.batch_size`` with one ``torch.Generator`` seeded
    by ``seed``, so the same policy and seed reproduce the same report. With ``image_dir`` every image is
    saved in the official layout (``htgrpo.evaluation.official``) and its path goes in the row's ``filename``.
    """
    prompts = benchmark.prompts.prompts
    ipp = benchmark.images_per_prompt
    metric = benchmark.make_metric()
    diversity = benchmark.make_diversity_metric()
    generator = torch.Generator().manual_seed(int(seed))
    prompts_per_batch = max(1, benchmark.batch_size // ipp)
    num_batches = math.ceil(len(prompts) / prompts_per_batch)
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[torch.Tensor]] = {}
    sample_prompts: dict[str, list[str]] = {}
    sample_correct: dict[str, list[bool | None]] = {}
    batches = range(num_batches)
    if progress:
        from rich.progress import track

        batches = track(batches, description=f"evaluating {benchmark.name}", total=num_batches)
    for b in batches:
        chunk = prompts[b * prompts_per_batch:(b + 1) * prompts_per_batch]
        expanded = [p for p in chunk for _ in range(ipp)]
        with torch.no_grad():
            images = image_generator.generate(expanded, generator).cpu()
        batch_rows = benchmark.score(chunk, images, metric, diversity)
        if image_dir is not None:
            from htgrpo.evaluation.official import save_dpg_grids, save_geneval_images

            save = save_geneval_images if benchmark.kind == "geneval" else save_dpg_grids
            for row, path in zip(batch_rows, save(Path(image_dir), chunk, images)):
                row["filename"] = path
        rows.extend(batch_rows)
        for j, p in enumerate(chunk):
            bucket = samples.setdefault(p.group, [])
            if len(bucket) < samples_per_group * ipp:
                bucket.extend(images[j * ipp:(j + 1) * ipp])
                sample_prompts.setdefault(p.group, []).extend([p.prompt] * ipp)
                sample_correct.setdefault(p.group, []).extend(
                    row["correct"] if "correct" in row else None for row in batch_rows[j * ipp:(j + 1) * ipp])
    scores = metric.compute()
    return BenchmarkReport(benchmark=benchmark.name, kind=benchmark.kind, scores=scores,
                           num_images=len(prompts) * ipp, num_prompts=len(prompts), rows=rows,
                           samples={g: torch.stack(v) for g, v in samples.items()},
                           sample_prompts=sample_prompts, sample_correct=sample_correct,
                           diversity=({f"diversity/{k}": v for k, v in diversity.compute().items()}
                                      if diversity is not None else {}))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, prompts: Sequence[str] | None = None,
              verdicts: Sequence[bool | None] | None = None) -> Path:
    """Save uint8 images (B, 3, H, W) as one PNG grid with ``nrow`` images per row, each row captioned with its
    prompt(s) and each image framed green (correct) / red (wrong) when ``prompts`` / ``verdicts`` (one per image) are
    given (``htgrpo.evaluation.grids.annotated_grid``)."""
    from htgrpo.evaluation.grids import save_annotated_grid

    return save_annotated_grid(images, path, nrow, prompts, verdicts)
