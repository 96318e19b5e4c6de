"""Prompt sources: the fixed prompt sets benchmarks score, and the seeded stream RL and warm-start train on.

A *prompt set* is a finite, ordered list of :class:`BenchmarkPrompt` (validation / evaluation). A *prompt
stream* maps an integer index to a prompt deterministically (``seed``, ``index``), so a run can resume at
any data position and every rank sees different prompts without coordination.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from htgrpo.config import ConfigError, require, require_choice, require_range
from htgrpo.data.records import GENEVAL_TASKS, BenchmarkPrompt, DPGItem, GenEvalRecord, prompt_key
from htgrpo.data.shapes.palette import ShapesWorldConfig


class PromptSet(abc.ABC):
    """A finite, ordered list of benchmark prompts (subclasses fill ``prompts``)."""

    name: str = "prompts"
    kind: str = "geneval"  # "geneval" or "dpg": which scoring rules apply

    def __init__(self) -> None:
        self._prompts: list[BenchmarkPrompt] | None = None

    @abc.abstractmethod
    def load(self) -> list[BenchmarkPrompt]:
        """Read or generate the prompts (called once, lazily)."""

    @property
    def prompts(self) -> list[BenchmarkPrompt]:
        if self._prompts is None:
            self._prompts = self.load()
        return self._prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> BenchmarkPrompt:
        return self.prompts[index]


def _geneval_prompt(benchmark: str, index: int, record: GenEvalRecord) -> BenchmarkPrompt:
    return BenchmarkPrompt(benchmark=benchmark, key=f"{index:05d}", prompt=record.prompt, group=record.tag, record=record)


def _dpg_prompt(benchmark: str, item: DPGItem) -> BenchmarkPrompt:
    return BenchmarkPrompt(benchmark=benchmark, key=item.item_id, prompt=item.prompt, group="dpg", record=item)


class ShapesGenEvalPrompts(PromptSet):
    """ShapesWorld prompts for GenEval's six tasks, generated like GenEval's ``create_prompts.py``.

    Args:
        world: ShapesWorld geometry.
        per_task: prompts sampled per task before exact duplicates are removed (GenEval uses 100).
        seed: generation seed; the same seed always gives the same set.
        tasks: which GenEval tags to include.
    """

    kind = "geneval"

    def __init__(self, world: ShapesWorldConfig, per_task: int = 32, seed: int = 43,
                 tasks: Sequence[str] = GENEVAL_TASKS, name: str = "shapes_geneval"):
        super().__init__()
        require(int(per_task) >= 1, "per_task", f"must be >= 1, got {per_task}")
        unknown = [t for t in tasks if t not in GENEVAL_TASKS]
        require(not unknown and len(tasks) > 0, "tasks", f"must be a non-empty subset of {list(GENEVAL_TASKS)}, got {list(tasks)}")
        self.world, self.per_task, self.seed, self.tasks, self.name = world, int(per_task), int(seed), tuple(tasks), name

    def load(self) -> list[BenchmarkPrompt]:
        from htgrpo.data.shapes.prompts import geneval_prompt_set

        records = geneval_prompt_set(self.world, per_task=self.per_task, seed=self.seed, tasks=self.tasks)
        return [_geneval_prompt(self.name, i, r) for i, r in enumerate(records)]


class ShapesDPGPrompts(PromptSet):
    """ShapesWorld dense (DPG-Bench-style) prompts with their proposition tables."""

    kind = "dpg"

    def __init__(self, world: ShapesWorldConfig, num_prompts: int = 64, seed: int = 44, name: str = "shapes_dpg"):
        super().__init__()
        require(int(num_prompts) >= 1, "num_prompts", f"must be >= 1, got {num_prompts}")
        self.world, self.num_prompts, self.seed, self.name = world, int(num_prompts), int(seed), name

    def load(self) -> list[BenchmarkPrompt]:
        from htgrpo.data.shapes.prompts import dpg_prompt_set

        return [_dpg_prompt(self.name, item) for item in dpg_prompt_set(self.world, self.num_prompts, self.seed)]


def _existing_path(value: str | None, key: str, what: str) -> Path:
    require(value not in (None, "", "???"), key, f"is not set: point it at {what}")
    path = Path(str(value)).expanduser()
    require(path.exists(), key, f"{path} does not exist: point it at {what}")
    return path


class GenEvalPrompts(PromptSet):
    """GenEval prompts read from a GenEval metadata file: the official ``evaluation_metadata.jsonl`` (a file or its
    folder), or a training file of the same schema (``python -m htgrpo.prompts geneval_train``).

    Args:
        path: the jsonl file or a folder holding ``evaluation_metadata.jsonl`` (GenEval repo, ``prompts/``).
        limit: keep only the first ``limit`` prompts (None = all 553).
    """

    kind = "geneval"

    def __init__(self, path: str, limit: int | None = None, name: str = "geneval"):
        super().__init__()
        self.path = _existing_path(path, "path", "GenEval's prompts/evaluation_metadata.jsonl (or its folder)")
        require(limit is None or int(limit) >= 1, "limit", f"must be >= 1 or null, got {limit}")
        self.limit, self.name = limit, name

    def load(self) -> list[BenchmarkPrompt]:
        from htgrpo.data.loaders import load_geneval_metadata

        records = load_geneval_metadata(self.path)
        if self.limit is not None:
            records = records[: int(self.limit)]
        return [_geneval_prompt(self.name, i, r) for i, r in enumerate(records)]


class DPGPrompts(PromptSet):
    """The official DPG-Bench prompts (``prompts/`` folder or ``prompts.jsonl``) and, when given, its CSV.

    Without ``csv_path`` the set can be generated but not scored (the CSV holds the questions).
    """

    kind = "dpg"

    def __init__(self, prompts_path: str, csv_path: str | None = None, limit: int | None = None, name: str = "dpg"):
        super().__init__()
        self.prompts_path = _existing_path(prompts_path, "prompts_path", "DPG-Bench's prompts/ folder or prompts.jsonl")
        self.csv_path = None if csv_path in (None, "") else _existing_path(csv_path, "csv_path", "DPG-Bench's dpg_bench.csv")
        require(limit is None or int(limit) >= 1, "limit", f"must be >= 1 or null, got {limit}")
        self.limit, self.name = limit, name

    def load(self) -> list[BenchmarkPrompt]:
        from htgrpo.data.loaders import load_dpg

        items = load_dpg(self.prompts_path, self.csv_path)
        if self.limit is not None:
            items = items[: int(self.limit)]
        return [_dpg_prompt(self.name, item) for item in items]


@dataclass(frozen=True)
class StreamItem:
    """One training example: a prompt and, for ShapesWorld, the ground-truth image of a scene that satisfies it."""

    index: int
    prompt: BenchmarkPrompt
    image: torch.Tensor | None  # uint8 (3, H, W)


TASK_SCHEDULES = ("random", "stratified")
"""How a ShapesPromptStream picks each GenEval prompt's task (see its docstring)."""


class ShapesPromptStream:
    """Seeded, index-addressable stream of ShapesWorld training prompts (and target images).

    Example ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: a dense DPG-style prompt with
    probability ``dpg_fraction``, otherwise a GenEval-style prompt of a task chosen by ``task_schedule``:

    * ``random``: the task is drawn with probabilities ``task_weights``;
    * ``stratified``: the stream is cut into blocks of ``B = sum(task_weights)`` examples (integer weights) and
      each block holds every task exactly ``weight`` times, in an order shuffled per block with
      ``default_rng([seed, block, 1])``. A batch of a multiple of ``B`` prompts then always has the same task mix,
      so the batch-mean reward moves with training rather than with which tasks the batch happened to draw.

    Args:
        world: ShapesWorld geometry.
        seed: stream seed (keep it different from the validation set's seed).
        task_weights: relative frequency of each GenEval task (missing tasks get 0); integers with ``stratified``.
        dpg_fraction: probability of a dense DPG-style prompt, in [0, 1].
        with_images: also render a scene that satisfies the prompt (supervised warm start).
        task_schedule: ``random`` | ``stratified`` (see above).
        held_out: prompts the stream never yields (compared by
            :func:`~htgrpo.data.records.prompt_key`): a drawn prompt that is held out is drawn again from
            the same generator, and a task whose every prompt is held out (with three shapes, a validation set holds
            all single_object, two_object and counting prompts there are) is left out of the stream, its weight
            with it. :class:`~htgrpo.data.datamodules.PromptDataModule` passes the validation prompts
            (:meth:`holding_out`). Empty (the default), example ``i`` is what it was before held-out prompts existed.
    """

    #: draws of one example before a stream whose held-out set covers (nearly) all of a task gives up
    MAX_REDRAWS = 10_000

    def __init__(self, world: ShapesWorldConfig, seed: int = 0, task_weights: dict[str, float] | None = None,
                 dpg_fraction: float = 0.0, with_images: bool = False, task_schedule: str = "random",
                 held_out: Sequence[str] = ()):
        from htgrpo.data.shapes.prompts import geneval_task_prompts

        weights = dict(task_weights) if task_weights is not None else {t: 1.0 for t in GENEVAL_TASKS}
        unknown = [t for t in weights if t not in GENEVAL_TASKS]
        require(not unknown, "task_weights", f"unknown task(s) {unknown}; tasks are {list(GENEVAL_TASKS)}")
        require(all(float(w) >= 0 for w in weights.values()), "task_weights", "weights must be >= 0")
        require_range(float(dpg_fraction), "dpg_fraction", 0.0, 1.0)
        total = sum(float(w) for w in weights.values())
        require(total > 0 or float(dpg_fraction) == 1.0, "task_weights", "at least one task needs a positive weight")
        self.world, self.seed, self.dpg_fraction, self.with_images = world, int(seed), float(dpg_fraction), bool(with_images)
        self.task_weights = dict(weights)
        self.held_out = frozenset(prompt_key(p) for p in held_out)
        self.exhausted_tasks = tuple(
            t for t in GENEVAL_TASKS if float(weights.get(t, 0.0)) > 0 and self.held_out
            and all(prompt_key(p) in self.held_out for p in geneval_task_prompts(world, t)))
        """Tasks with a positive weight whose every prompt is held out: the stream has none of them to train on."""
        for t in self.exhausted_tasks:
            weights[t] = 0.0
        require(any(float(w) > 0 for w in weights.values()) or float(dpg_fraction) > 0, "task_weights",
                f"every prompt of every weighted task is held out (tasks {list(self.exhausted_tasks)}): nothing is "
                "left to train on")
        self.tasks = tuple(t for t in GENEVAL_TASKS if float(weights.get(t, 0.0)) > 0)
        self.task_probs = np.array([float(weights[t]) for t in self.tasks], dtype=np.float64)
        if self.task_probs.size:
            self.task_probs /= self.task_probs.sum()
        require_choice(task_schedule, TASK_SCHEDULES, "task_schedule")
        self.task_schedule = str(task_schedule)
        self.block: tuple[str, ...] = ()
        if self.task_schedule == "stratified":
            counts = {t: float(weights[t]) for t in self.tasks}
            require(all(c == int(c) for c in counts.values()), "task_weights",
                    f"task_schedule=stratified needs whole-number weights (each is how often the task appears in a "
                    f"block), got {counts}")
            self.block = tuple(t for t in self.tasks for _ in range(int(counts[t])))

    @property
    def block_size(self) -> int:
        """Examples per stratified block (each task ``weight`` times); 0 with ``task_schedule=random``."""
        return len(self.block)

    def _task_of(self, index: int, rng: np.random.Generator) -> str:
        if self.task_schedule == "random":
            return self.tasks[int(rng.choice(len(self.tasks), p=self.task_probs))]
        block, slot = divmod(int(index), len(self.block))
        order = np.random.default_rng([self.seed, block, 1]).permutation(len(self.block))
        return self.block[int(order[slot])]

    def holding_out(self, prompts: Sequence[str]) -> ShapesPromptStream:
        """The same stream with ``prompts`` added to its held-out set (see the class docstring)."""
        return ShapesPromptStream(self.world, self.seed, self.task_weights, self.dpg_fraction, self.with_images,
                                  self.task_schedule, held_out=[*self.held_out, *prompts])

    def __getitem__(self, index: int) -> StreamItem:
        from htgrpo.data.shapes.prompts import random_dpg_item, random_geneval_record

        rng = np.random.default_rng([self.seed, int(index)])
        dense = self.dpg_fraction > 0 and (not self.tasks or rng.random() < self.dpg_fraction)
        tag = None if dense else self._task_of(index, rng)
        for _ in range(self.MAX_REDRAWS):
            if dense:
                record: GenEvalRecord | DPGItem = random_dpg_item(rng, self.world, item_id=f"train{index}")
            else:
                record = random_geneval_record(rng, self.world, tag)
            if prompt_key(record.prompt) not in self.held_out:
                break
        else:
            raise ConfigError("held_out", f"example {index}: {self.MAX_REDRAWS} draws of task {tag or 'dpg'} were all "
                                          "held-out prompts; hold out fewer prompts or drop the task's weight")
        prompt = _dpg_prompt("shapes_dpg", record) if dense else _geneval_prompt("shapes_geneval", int(index), record)
        image = render_record(record, rng, self.world) if self.with_images else None
        return StreamItem(index=int(index), prompt=prompt, image=image)


def render_record(record: GenEvalRecord | DPGItem, rng: np.random.Generator, world: ShapesWorldConfig) -> torch.Tensor:
    """Ground-truth image (uint8, 3×H×W) of a random scene that satisfies ``record``."""
    from htgrpo.data.shapes.scene import cells_to_image, render_cells
    from htgrpo.data.shapes.sampler import scene_for_record

    scene = scene_for_record(record, rng, world)
    image = cells_to_image(torch.as_tensor(render_cells(scene)), world.cell_px)
    return image


__all__ = [
    "ConfigError",
    "DPGPrompts",
    "GenEvalPrompts",
    "PromptSet",
    "ShapesDPGPrompts",
    "ShapesGenEvalPrompts",
    "ShapesPromptStream",
    "StreamItem",
    "render_record",
]
