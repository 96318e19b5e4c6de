"""Training prompts must not be validation prompts: the start-up check and the prompt comparison it uses.

A policy trained on the prompts it is scored on reports a test-set score, not a held-out one. ``fit`` therefore
stops at start-up when a finite training prompt set (``data.train``: GenEval or DPG-Bench files) shares a prompt
with the benchmark's validation set, unless ``data.allow_train_val_overlap=true`` says it is meant.

ShapesWorld's training stream (:class:`~htgrpo.data.prompt_sets.ShapesPromptStream`) is unbounded, so it is not
compared here: :class:`~htgrpo.data.datamodules.PromptDataModule` makes it hold every validation prompt out instead
(same switch). With three shapes the validation set holds every single_object, two_object and counting prompt there
is, so those tasks are then not trained on and their scores measure transfer from the other three (measured on
``experiment=shapes_ht``: before this, 169 of its first 240 training prompts were validation prompts; now none).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from htgrpo.config import ConfigError
from htgrpo.data.records import BenchmarkPrompt, prompt_key

log = logging.getLogger(__name__)

__all__ = ["prompt_key", "PromptOverlap", "find_prompt_overlap", "check_train_val_overlap"]


@dataclass(frozen=True)
class PromptOverlap:
    """Training prompts that are also validation prompts.

    Attributes:
        shared: training prompts (entries of the training set) whose text is a validation prompt's.
        train_total: entries of the training set.
        val_shared: distinct validation prompts that occur in training.
        val_total: entries of the validation set.
        example: the first shared training prompt (its ``key`` is its place in the training set), or None.
    """

    shared: int
    train_total: int
    val_shared: int
    val_total: int
    example: BenchmarkPrompt | None = None

    def __bool__(self) -> bool:
        return self.shared > 0


def find_prompt_overlap(train: Sequence[BenchmarkPrompt], val: Sequence[BenchmarkPrompt]) -> PromptOverlap:
    """Compare two prompt lists by :func:`prompt_key`."""
    val_keys = {prompt_key(p.prompt) for p in val}
    shared = [p for p in train if prompt_key(p.prompt) in val_keys]
    return PromptOverlap(shared=len(shared), train_total=len(train),
                         val_shared=len({prompt_key(p.prompt) for p in shared}), val_total=len(val),
                         example=shared[0] if shared else None)


def _where(source: Any, prompt: BenchmarkPrompt) -> str:
    """``file:line`` of a GenEval prompt (its key is the 0-based line index), ``folder item <id>`` otherwise."""
    path = getattr(source, "path", None) or getattr(source, "prompts_path", None)
    if str(prompt.key).isdigit():
        line = int(prompt.key) + 1
        return f"{path}:{line}" if path is not None else f"line {line}"
    return f"{path} item {prompt.key}" if path is not None else f"item {prompt.key}"


def check_train_val_overlap(train_source: Any, val_prompts: Any, allow: bool) -> PromptOverlap | None:
    """Raise :class:`ConfigError` (key ``train``, so ``data.train`` under ``fit``) when a finite training prompt set
    shares prompts with the validation set, naming the count and the first shared prompt; with ``allow`` log a
    warning instead.

    Returns the overlap found, or None when nothing was compared (no validation set, or a training stream such as
    ShapesWorld's, which is not a finite prompt set; see the module docstring).
    """
    from htgrpo.data.prompt_sets import PromptSet

    if val_prompts is None or not isinstance(train_source, PromptSet):
        return None
    val = val_prompts.prompts if isinstance(val_prompts, PromptSet) else list(val_prompts)
    overlap = find_prompt_overlap(train_source.prompts, val)
    if not overlap:
        return overlap
    example = overlap.example
    assert example is not None
    what = (f"{overlap.shared} of the {overlap.train_total} training prompts are validation prompts "
            f"({overlap.val_shared} of the {overlap.val_total} validation prompts occur in training), "
            f"e.g. {example.prompt!r} ({_where(train_source, example)})")
    if allow:
        log.warning("data.allow_train_val_overlap=true: %s; the validation score is not a held-out score", what)
        return overlap
    if getattr(train_source, "kind", None) == "geneval":
        fix = ("train on held-out prompts: `python -m htgrpo.prompts geneval_train out=FILE n=N seed=S "
               "exclude=<the validation evaluation_metadata.jsonl>`, then data.train.path=FILE (README \"Training "
               "MMaDA / Lumina-DiMOO\")")
    else:
        fix = "train on prompts held out from the validation set"
    raise ConfigError(
        "train",
        f"{what}: the validation score would be measured on prompts the policy was trained on. To fix it, {fix}; "
        "or set data.allow_train_val_overlap=true to train on them on purpose")
