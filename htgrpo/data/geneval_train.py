"""GenEval-style training prompts held out from an evaluation file.

The prompts follow GenEval's recipe (``prompts/create_prompts.py`` of github.com/djghosh13/geneval): its six task
templates over its 80 object names, ten colours, counts 2-4 and four relations (:mod:`htgrpo.data.geneval_vocab`):

==============  =========================================================  =============================================
task            prompt                                                     metadata (``include`` / ``exclude``)
==============  =========================================================  =============================================
single_object   ``a photo of {a A}``                                       ``[{A, 1}]``
two_object      ``a photo of {a A} and {a B}``, A != B                     ``[{A, 1}, {B, 1}]``
counting        ``a photo of {two|three|four} {As}``                       ``[{A, n}]``, exclude ``[{A, n + 1}]``
colors          ``a photo of {a c} {A}``, A != person                      ``[{A, 1, c}]``
position        ``a photo of {a A} {rel} {a B}``, A != B                   ``[{B, 1}, {A, 1, position: [rel, 0]}]``
color_attr      ``a photo of {a c} {A} and {a d} {B}``, A != B, c != d,    ``[{A, 1, c}, {B, 1, d}]``
                neither is a person
==============  =========================================================  =============================================

Each task's *pool* is every prompt its template can produce (80, 6320, 240, 790, 25280 and 554580 prompts). A
training set is drawn from the pools after removing every prompt of the evaluation file (compared with
:func:`htgrpo.data.train_val_overlap.prompt_key`), so no training prompt equals an evaluation prompt. Against
GenEval's own ``evaluation_metadata.jsonl`` this leaves no single_object prompt at all: the file holds all 80.

``n`` prompts are shared over the tasks as equally as possible (:func:`split_quota`); a task whose pool holds fewer
prompts than its share gives the rest to the other tasks. Task ``t`` (its index in ``GENEVAL_TASKS``) draws its
prompts without replacement with ``numpy.random.default_rng([seed, t])``, so the same (n, seed, tasks, evaluation
file) always gives the same file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from htgrpo.data.geneval_vocab import (
    GENEVAL_COLORS,
    GENEVAL_COUNT_WORDS,
    GENEVAL_COUNTS,
    GENEVAL_NO_COLOR_CLASSES,
    GENEVAL_OBJECT_NAMES,
    GENEVAL_RELATIONS,
    plural,
    with_article,
)
from htgrpo.data.train_val_overlap import prompt_key
from htgrpo.data.records import GENEVAL_TASKS, GenEvalRecord, GenEvalRequirement

__all__ = ["TaskCount", "GeneratedPrompts", "task_specs", "template_prompt", "template_record", "task_pool",
           "split_quota", "generate_geneval_training_prompts"]

Spec = tuple[Any, ...]
"""The template's free choices for one prompt, e.g. ``("dog", "cake", "left of")`` for a position prompt."""


@dataclass(frozen=True)
class TaskCount:
    """How one task's share of a generated set came about.

    Attributes:
        tag: the GenEval task.
        pool: prompts its template can produce.
        excluded: of those, prompts of the evaluation file (or already taken by an earlier task).
        available: ``pool - excluded``: what could be drawn.
        written: prompts drawn into the set.
    """

    tag: str
    pool: int
    excluded: int
    available: int
    written: int


@dataclass(frozen=True)
class GeneratedPrompts:
    """A generated training set: its records (grouped by task, in ``GENEVAL_TASKS`` order) and per-task counts."""

    records: tuple[GenEvalRecord, ...]
    counts: tuple[TaskCount, ...]


# ---- the six templates ----------------------------------------------------------------------------------------


def task_specs(tag: str, names: Sequence[str] = GENEVAL_OBJECT_NAMES) -> list[Spec]:
    """Every choice of the template's free words for task ``tag``, in a fixed order (names, then colours...)."""
    colourable = [a for a in names if a not in GENEVAL_NO_COLOR_CLASSES]
    if tag == "single_object":
        return [(a,) for a in names]
    if tag == "two_object":
        return [(a, b) for a, b in itertools.permutations(names, 2)]
    if tag == "counting":
        return [(a, n) for a in names for n in GENEVAL_COUNTS]
    if tag == "colors":
        return [(a, c) for a in colourable for c in GENEVAL_COLORS]
    if tag == "position":
        return [(a, b, rel) for a, b in itertools.permutations(names, 2) for rel in GENEVAL_RELATIONS]
    if tag == "color_attr":
        return [(a, b, c, d) for a, b in itertools.permutations(colourable, 2)
                for c, d in itertools.permutations(GENEVAL_COLORS, 2)]
    raise ValueError(f"unknown GenEval task {tag!r}; tasks are {list(GENEVAL_TASKS)}")


def template_prompt(tag: str, spec: Spec) -> str:
    """The prompt text of one template choice (GenEval's wording, article and plural rules)."""
    if tag == "single_object":
        return f"a photo of {with_article(spec[0])}"
    if tag == "two_object":
        return f"a photo of {with_article(spec[0])} and {with_article(spec[1])}"
    if tag == "counting":
        return f"a photo of {GENEVAL_COUNT_WORDS[spec[1]]} {plural(spec[0])}"
    if tag == "colors":
        return f"a photo of {with_article(spec[1])} {spec[0]}"
    if tag == "position":
        return f"a photo of {with_article(spec[0])} {spec[2]} {with_article(spec[1])}"
    a, b, c, d = spec  # color_attr
    return f"a photo of {with_article(c)} {a} and {with_article(d)} {b}"


def template_record(tag: str, spec: Spec) -> GenEvalRecord:
    """The GenEval metadata record of one template choice (the official file's structure for that task)."""
    R = GenEvalRequirement
    if tag == "single_object":
        include: tuple[GenEvalRequirement, ...] = (R(spec[0], 1),)
    elif tag == "two_object":
        include = (R(spec[0], 1), R(spec[1], 1))
    elif tag == "counting":
        a, n = spec
        return GenEvalRecord(tag, template_prompt(tag, spec), (R(a, n),), (R(a, n + 1),))
    elif tag == "colors":
        include = (R(spec[0], 1, color=spec[1]),)
    elif tag == "position":
        a, b, rel = spec  # "A rel B": B is the reference (include[0]), A must stand `rel` of it
        include = (R(b, 1), R(a, 1, position=(rel, 0)))
    else:
        a, b, c, d = spec
        include = (R(a, 1, color=c), R(b, 1, color=d))
    return GenEvalRecord(tag, template_prompt(tag, spec), include)


def task_pool(tag: str, names: Sequence[str] = GENEVAL_OBJECT_NAMES) -> list[GenEvalRecord]:
    """Every record task ``tag``'s template produces over ``names``, in :func:`task_specs` order (for inspection;
    the generator builds records only for the prompts it draws: color_attr's 554580 records take seconds)."""
    return [template_record(tag, s) for s in task_specs(tag, names)]


# ---- drawing a set ---------------------------------------------------------------------------------------------


def split_quota(n: int, available: dict[str, int]) -> dict[str, int]:
    """Share ``n`` prompts over the tasks as equally as possible, no task above its ``available`` count.

    Water-filling: each round gives every task that still has prompts ``r // k`` more (the first ``r mod k`` of
    them, in the dict's order, one more), capped at what it has left, where ``r`` is what is still to give and ``k``
    the number of such tasks. E.g. n = 10 over {a: 1, b: 100, c: 100} -> {a: 1, b: 5, c: 4}.

    Raises:
        ValueError: ``n`` exceeds the total available.
    """
    total = sum(available.values())
    if n > total:
        raise ValueError(f"asked for {n} prompts but the tasks hold only {total} held-out prompts: "
                         + ", ".join(f"{t} {c}" for t, c in available.items()))
    quota = {t: 0 for t in available}
    remaining = n
    open_tasks = [t for t, c in available.items() if c > 0]
    while remaining > 0:
        share, extra = divmod(remaining, len(open_tasks))
        for i, t in enumerate(open_tasks):
            give = min(share + (1 if i < extra else 0), available[t] - quota[t])
            quota[t] += give
            remaining -= give
        open_tasks = [t for t in open_tasks if quota[t] < available[t]]
    return quota


def generate_geneval_training_prompts(n: int, seed: int, exclude_prompts: Iterable[str] = (),
                                      tasks: Sequence[str] = GENEVAL_TASKS,
                                      names: Sequence[str] = GENEVAL_OBJECT_NAMES) -> GeneratedPrompts:
    """Draw ``n`` GenEval-style prompts none of which equals one of ``exclude_prompts`` (see the module docstring).

    Args:
        n: prompts to draw (>= 1), shared over ``tasks`` by :func:`split_quota`.
        seed: the draw's seed; the same arguments always give the same records.
        exclude_prompts: prompt texts no drawn prompt may equal (compared with :func:`prompt_key`), e.g. every
            prompt of GenEval's ``evaluation_metadata.jsonl``.
        tasks: the GenEval tasks to draw from (a non-empty subset of ``GENEVAL_TASKS``).
        names: object names (GenEval's 80 by default).

    Returns:
        The records, grouped by task in ``GENEVAL_TASKS`` order, and per-task counts.

    Raises:
        ValueError: a bad argument, or ``n`` larger than the held-out prompts of ``tasks``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    unknown = [t for t in tasks if t not in GENEVAL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(GENEVAL_TASKS)}, got {list(tasks)}")
    ordered = [t for t in GENEVAL_TASKS if t in tasks]
    excluded_keys = {prompt_key(p) for p in exclude_prompts}
    taken: set[str] = set()  # prompts of earlier tasks: no prompt twice, even across tasks
    candidates: dict[str, list[Spec]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for tag in ordered:
        specs = task_specs(tag, names)
        kept = []
        for spec in specs:
            # Template text is lower case with single spaces, so it is its own prompt_key.
            text = template_prompt(tag, spec)
            if text not in excluded_keys and text not in taken:
                kept.append(spec)
                taken.add(text)
        candidates[tag] = kept
        counts[tag] = (len(specs), len(specs) - len(kept))
    quota = split_quota(int(n), {t: len(candidates[t]) for t in ordered})
    records: list[GenEvalRecord] = []
    for tag in ordered:
        rng = np.random.default_rng([int(seed), GENEVAL_TASKS.index(tag)])
        drawn = rng.choice(len(candidates[tag]), size=quota[tag], replace=False) if quota[tag] else []
        records.extend(template_record(tag, candidates[tag][int(i)]) for i in drawn)
    summary = tuple(TaskCount(t, counts[t][0], counts[t][1], len(candidates[t]), quota[t]) for t in ordered)
    return GeneratedPrompts(records=tuple(records), counts=summary)
