"""Procedural ShapesWorld prompts in the two benchmarks' own formats.

GenEval-style records mirror GenEval's ``prompts/create_prompts.py``: the same six tasks, the same phrasing
("a photo of a/an ...", plural = name + "s", or "es" after an "s"), the same metadata schema (``include``
with class/count/color/position, ``exclude`` on counting rows) and the same sampling recipe (a fixed seed,
``n`` draws per task, exact duplicate prompts dropped). Shape names play the role of COCO classes.

DPG-style items are one-paragraph dense prompts over 2-3 entity groups, each a distinct shape class (so
every reference is unambiguous) with a colour, optionally a size and a count, plus spatial relations between
groups. Their proposition table follows DPG-Bench's CSV schema and DSG's style: entity tuples first depend
on nothing, attributes/counts depend on their entity, relations depend on both entities.

``VOCABULARY`` lists every token a generated prompt can contain (lower-cased; ``.`` and ``,`` are tokens
of their own, see ``prompt_words``), for building a word-level text tokenizer.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from htgrpo.data.records import (
    DPG_CSV_COLUMNS,
    GENEVAL_COLORS,
    GENEVAL_RELATIONS,
    GENEVAL_TASKS,
    DPGItem,
    DPGProposition,
    GenEvalRecord,
    GenEvalRequirement,
    MetadataError,
    format_tuple,
)
from htgrpo.data.shapes.palette import SHAPES, ShapesWorldConfig
from htgrpo.data.shapes.sampler import ObjectSpec, PlacementError, RelationSpec, allowed_sizes, place_objects

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
"""Number words used in prompts (GenEval's counting task uses 2..4)."""

GENEVAL_MAX_COUNT = 4
"""GenEval's ``max_count``: counting prompts ask for 2..4 objects."""

DPG_MAX_OBJECTS = 9
"""Upper bound on the objects of a dense prompt (3 groups x 3); a world allows fewer, see
``dpg_max_objects``."""

DPG_SIZES: tuple[str, ...] = ("small", "large")

# Relation wording inside dense prompts: GenEval relation -> phrase.
_DPG_REL_PHRASE: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

_GENEVAL_WORDS = ("a", "an", "photo", "of", "and", "left", "right", "above", "below")
_DPG_WORDS = (
    "a", "an", "the", "neutral", "plain", "grey", "canvas", "background", "shows", "on", "there", "is", "are",
    "sit", "sits", "to", "left", "right", "of", "above", "below", "nothing", "else", ".", ",", *DPG_SIZES,
)


def plural(name: str) -> str:
    """GenEval's plural rule: append ``es`` if the name ends in ``s``, otherwise ``s``."""
    return name + ("es" if name.endswith("s") else "s")


def with_article(phrase: str) -> str:
    """``a``/``an`` + phrase; ``an`` when the phrase starts with a vowel (GenEval's rule)."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(_GENEVAL_WORDS)
        | set(_DPG_WORDS)
        | set(GENEVAL_COLORS)
        | set(SHAPES)
        | {plural(s) for s in SHAPES}
        | set(NUMBER_WORDS.values())
    )
)
"""Every token a ShapesWorld prompt (GenEval- or DPG-style) can contain, sorted."""

_TOKEN_RE = re.compile(r"[^\s.,]+|[.,]")


def prompt_words(text: str) -> list[str]:
    """Split a prompt into lower-cased tokens; ``.`` and ``,`` are tokens of their own."""
    return _TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------------------------- GenEval


def _distinct(rng: np.random.Generator, pool: Sequence[str], k: int) -> list[str]:
    if len(pool) < k:
        raise MetadataError(f"need {k} distinct values but the pool has only {len(pool)}: {tuple(pool)}")
    idx = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in idx]


def geneval_record(tag: str, a: str, b: str | None = None, *, n: int = 1, c1: str | None = None,
                   c2: str | None = None, rel: str | None = None) -> GenEvalRecord:
    """The GenEval-style record of task ``tag`` for given choices (shapes ``a``/``b``, count ``n``, colours
    ``c1``/``c2``, relation ``rel``): the one place the six tasks' phrasing and metadata are written.

    * single_object: ``a photo of a {a}``; include ``[{a, 1}]``.
    * two_object: ``a photo of a {a} and a {b}``; include ``[{a, 1}, {b, 1}]``.
    * counting: ``a photo of {two|three|four} {a}s``; include ``[{a, n}]``, exclude ``[{a, n+1}]``.
    * colors: ``a photo of a {c1} {a}``; include ``[{a, 1, c1}]``.
    * position: ``a photo of a {a} {rel} a {b}``; include ``[{b, 1}, {a, 1, position: [rel, 0]}]``.
    * color_attr: ``a photo of a {c1} {a} and a {c2} {b}``; include ``[{a, 1, c1}, {b, 1, c2}]``.
    """
    R = GenEvalRequirement
    if tag == "single_object":
        return GenEvalRecord(tag, f"a photo of {with_article(a)}", (R(a, 1),))
    if tag == "two_object":
        return GenEvalRecord(tag, f"a photo of {with_article(a)} and {with_article(b)}", (R(a, 1), R(b, 1)))
    if tag == "counting":
        return GenEvalRecord(tag, f"a photo of {NUMBER_WORDS[n]} {plural(a)}", (R(a, n),), (R(a, n + 1),))
    if tag == "colors":
        return GenEvalRecord(tag, f"a photo of {with_article(f'{c1} {a}')}", (R(a, 1, color=c1),))
    if tag == "position":
        return GenEvalRecord(tag, f"a photo of {with_article(a)} {rel} {with_article(b)}",
                             (R(b, 1), R(a, 1, position=(rel, 0))))
    if tag == "color_attr":
        return GenEvalRecord(tag, f"a photo of {with_article(f'{c1} {a}')} and {with_article(f'{c2} {b}')}",
                             (R(a, 1, color=c1), R(b, 1, color=c2)))
    raise MetadataError(f"unknown GenEval task tag {tag!r}; expected one of {GENEVAL_TASKS}")


def random_geneval_record(rng: np.random.Generator, world: ShapesWorldConfig, tag: str) -> GenEvalRecord:
    """One random GenEval-style record of task ``tag`` over ``world.shapes`` (:func:`geneval_record`): shapes
    ``a != b``, colours ``c1 != c2``, counts 2..4, one of the four relations."""
    shapes = list(world.shapes)
    colors = list(GENEVAL_COLORS)
    if tag == "single_object":
        (a,) = _distinct(rng, shapes, 1)
        return geneval_record(tag, a)
    if tag == "two_object":
        a, b = _distinct(rng, shapes, 2)
        return geneval_record(tag, a, b)
    if tag == "counting":
        (a,) = _distinct(rng, shapes, 1)
        return geneval_record(tag, a, n=int(rng.integers(2, GENEVAL_MAX_COUNT + 1)))
    if tag == "colors":
        (a,) = _distinct(rng, shapes, 1)
        (c,) = _distinct(rng, colors, 1)
        return geneval_record(tag, a, c1=c)
    if tag == "position":
        a, b = _distinct(rng, shapes, 2)
        (rel,) = _distinct(rng, list(GENEVAL_RELATIONS), 1)
        return geneval_record(tag, a, b, rel=rel)
    if tag == "color_attr":
        a, b = _distinct(rng, shapes, 2)
        c1, c2 = _distinct(rng, colors, 2)
        return geneval_record(tag, a, b, c1=c1, c2=c2)
    raise MetadataError(f"unknown GenEval task tag {tag!r}; expected one of {GENEVAL_TASKS}")


def geneval_task_prompts(world: ShapesWorldConfig, tag: str) -> list[str]:
    """Every prompt :func:`random_geneval_record` can draw for task ``tag`` over ``world.shapes``, in a fixed order.

    Sizes with S shapes, the 10 GenEval colours and 4 relations: single_object S, two_object S(S−1), counting 3S,
    colors 10S, position 4S(S−1), color_attr 90·S(S−1). Used to tell which tasks a held-out set exhausts.
    """
    shapes = list(world.shapes)
    pairs = [(a, b) for a in shapes for b in shapes if a != b]
    choices: dict[str, list[tuple[tuple, dict]]] = {
        "single_object": [((a,), {}) for a in shapes],
        "two_object": [((a, b), {}) for a, b in pairs],
        "counting": [((a,), {"n": n}) for a in shapes for n in range(2, GENEVAL_MAX_COUNT + 1)],
        "colors": [((a,), {"c1": c}) for a in shapes for c in GENEVAL_COLORS],
        "position": [((a, b), {"rel": r}) for a, b in pairs for r in GENEVAL_RELATIONS],
        "color_attr": [((a, b), {"c1": c1, "c2": c2}) for a, b in pairs for c1 in GENEVAL_COLORS
                       for c2 in GENEVAL_COLORS if c1 != c2],
    }
    if tag not in choices:
        raise MetadataError(f"unknown GenEval task tag {tag!r}; expected one of {GENEVAL_TASKS}")
    return [geneval_record(tag, *args, **kwargs).prompt for args, kwargs in choices[tag]]


def geneval_prompt_set(
    world: ShapesWorldConfig,
    per_task: int,
    seed: int,
    tasks: Iterable[str] = GENEVAL_TASKS,
) -> list[GenEvalRecord]:
    """A deterministic GenEval-style prompt set, GenEval's recipe on ShapesWorld classes.

    Tasks come in ``GENEVAL_TASKS`` order. ``single_object`` lists every shape once (as GenEval lists every
    class once), truncated to ``per_task``; every other task draws ``per_task`` random records from a
    generator seeded with ``(seed, task index)`` and drops exact duplicate prompts (keeping the first), so
    a task may end up with fewer than ``per_task`` records, like GenEval's official file.
    """
    if per_task < 0:
        raise ValueError(f"per_task must be >= 0, got {per_task}")
    wanted = list(tasks)
    unknown = [t for t in wanted if t not in GENEVAL_TASKS]
    if unknown:
        raise MetadataError(f"unknown GenEval task tags {unknown}; expected a subset of {GENEVAL_TASKS}")
    out: list[GenEvalRecord] = []
    for ti, tag in enumerate(GENEVAL_TASKS):
        if tag not in wanted:
            continue
        if tag == "single_object":
            recs = [geneval_record(tag, s) for s in world.shapes][:per_task]
        else:
            rng = np.random.default_rng([int(seed), ti])
            recs = [random_geneval_record(rng, world, tag) for _ in range(per_task)]
        seen: set[str] = set()
        for rec in recs:
            if rec.prompt not in seen:
                seen.add(rec.prompt)
                out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------- DPG


def _noun(shape: str, count: int) -> str:
    return plural(shape) if count > 1 else shape


def _np(group: dict) -> str:
    """Indefinite noun phrase: ``a large red circle`` / ``two small green triangles``."""
    words = [w for w in (group["size"], group["color"], _noun(group["shape"], group["count"])) if w]
    phrase = " ".join(words)
    return with_article(phrase) if group["count"] == 1 else f"{NUMBER_WORDS[group['count']]} {phrase}"


def _ref(group: dict) -> str:
    """Definite reference: ``the red circle`` / ``the green triangles``."""
    return f"the {group['color']} {_noun(group['shape'], group['count'])}"


def _be(group: dict) -> str:
    return "are" if group["count"] > 1 else "is"


def objects_per_side(world: ShapesWorldConfig) -> int:
    """How many smallest objects fit side by side along one axis, one empty cell apart, on the world's position
    lattice (greedy from the first lattice position; 2 on a 12x12 grid with 4-cell objects)."""
    size = world.min_object_size
    count, free_from = 0, 0
    for pos in world.positions(size):
        if pos >= free_from:
            count += 1
            free_from = pos + size + 1
    return count


def dpg_max_objects(world: ShapesWorldConfig) -> int:
    """Objects a dense prompt may hold in ``world``: as many smallest objects as fit on a regular grid with
    one-cell gaps (4 on a 12x12 grid), capped at ``DPG_MAX_OBJECTS``."""
    per_side = objects_per_side(world)
    return max(2, min(DPG_MAX_OBJECTS, per_side * per_side))


def dpg_max_group_count(world: ShapesWorldConfig) -> int:
    """Largest count of one entity group (at most 3): a group must fit on one side of another group, i.e.
    in all but one row (or column) of a regular grid of smallest objects -> 2 on a 12x12 grid."""
    per_side = objects_per_side(world)
    return max(1, min(3, per_side * (per_side - 1)))


def _sample_dpg_groups(rng: np.random.Generator, world: ShapesWorldConfig) -> list[dict]:
    if len(world.shapes) < 2:
        raise MetadataError(f"dense prompts need at least 2 shape classes, world has {world.shapes}")
    n_groups = int(rng.integers(2, 4)) if len(world.shapes) >= 3 else 2
    shapes = _distinct(rng, list(world.shapes), n_groups)
    max_objects = dpg_max_objects(world)
    max_count = dpg_max_group_count(world)
    while True:
        counts = [int(rng.integers(1, max_count + 1)) for _ in range(n_groups)]
        if sum(counts) <= max_objects:
            break
    groups = []
    for shape, count in zip(shapes, counts):
        size_draw = rng.random()
        # a world with one object size has no "small"/"large" to tell apart: no size words then
        one_size = world.min_object_size == world.max_object_size
        size = None if size_draw < 0.5 or one_size else ("small" if size_draw < 0.75 else "large")
        groups.append({"shape": shape, "color": str(rng.choice(GENEVAL_COLORS)), "size": size, "count": count})
    return groups


def _sample_dpg_relations(
    rng: np.random.Generator, world: ShapesWorldConfig, groups: list[dict], tries: int = 6
) -> list[tuple[int, str, int]] | None:
    """Random relations ``(subject group, relation, target group)`` that some layout satisfies.

    Each group after the first relates to one earlier group; with three groups one extra relation between
    the last two groups is added half of the time. Relations are drawn uniformly and kept only if the
    sampler finds a layout meeting all of them for every object pair (with its safety margin); None when
    ``tries`` draws all fail (e.g. too many or too large objects for the grid).
    """
    pairs = [(i, int(rng.integers(0, i))) for i in range(1, len(groups))]
    if len(groups) == 3 and rng.random() < 0.5:
        pairs.append((2, 1) if pairs[1][1] == 0 else (2, 0))
    specs = [
        ObjectSpec(g["shape"], g["color"], allowed_sizes(world, g["size"]), gi)
        for gi, g in enumerate(groups)
        for _ in range(g["count"])
    ]
    for _ in range(tries):
        chosen = [(sub, GENEVAL_RELATIONS[int(rng.integers(len(GENEVAL_RELATIONS)))], tgt) for sub, tgt in pairs]
        try:
            place_objects(specs, [RelationSpec(a, r, b) for a, r, b in chosen], rng, world, max_restarts=2)
        except PlacementError:
            continue
        return chosen
    return None


def random_dpg_item(rng: np.random.Generator, world: ShapesWorldConfig, item_id: str) -> DPGItem:
    """One dense ShapesWorld prompt with its DPG-Bench-style proposition table.

    2-3 groups of distinct shapes, each with a colour, a size word half of the time and a count of
    1..``dpg_max_group_count(world)`` (1-2 on the default grid, up to 3 on larger ones), at most
    ``dpg_max_objects(world)`` objects in all; relations drawn at random and kept only if a layout exists.

    Propositions, 1-based, parents first: per group ``entity - whole (shape)`` (no parent), then
    ``attribute - color (shape, color)``, optional ``attribute - size (shape, small|large)`` and, for
    counts above one, ``other - count (shape, ==N)``, each depending on the entity; then
    ``relation - spatial (A, B, rel)`` (A is ``rel`` B) depending on both entities; last
    ``global - (background, grey)``.
    """
    for _ in range(100):
        groups = _sample_dpg_groups(rng, world)
        relations = _sample_dpg_relations(rng, world, groups)
        if relations is not None:
            break
    else:  # pragma: no cover - only for worlds far too small for their objects
        raise MetadataError(f"could not sample a satisfiable dense prompt for {world}")

    # ---- text
    sentences: list[str] = []
    first = groups[0]
    if rng.random() < 0.5:
        sentences.append(f"A neutral grey canvas shows {_np(first)}.")
    else:
        sentences.append(f"On a plain grey background there {_be(first)} {_np(first)}.")
    main = {sub: (rel, tgt) for sub, rel, tgt in relations[: len(groups) - 1]}
    for gi in range(1, len(groups)):
        rel, tgt = main[gi]
        g = groups[gi]
        phrase = _DPG_REL_PHRASE[rel]
        verb = "sit" if g["count"] > 1 else "sits"
        sentences.append(f"{phrase[0].upper()}{phrase[1:]} {_ref(groups[tgt])} {verb} {_np(g)}.")
    for sub, rel, tgt in relations[len(groups) - 1 :]:
        ref = _ref(groups[sub])
        sentences.append(f"{ref[0].upper()}{ref[1:]} {_be(groups[sub])} {_DPG_REL_PHRASE[rel]} {_ref(groups[tgt])}.")
    if rng.random() < 0.5:
        sentences.append("Nothing else is on the canvas.")
    prompt = " ".join(sentences)

    # ---- propositions
    props: list[DPGProposition] = []

    def add(dep: tuple[int, ...], broad: str, detailed: str, args: Sequence[str], question: str) -> int:
        pid = len(props) + 1
        props.append(DPGProposition(pid, dep, broad, detailed, format_tuple(broad, detailed, args), question))
        return pid

    entity_id: dict[int, int] = {}
    for gi, g in enumerate(groups):
        shape, many = g["shape"], g["count"] > 1
        noun = _noun(shape, g["count"])
        be = "Are" if many else "Is"
        ent = add((0,), "entity", "whole", (shape,), f"Are there {noun}?" if many else f"Is there {with_article(shape)}?")
        entity_id[gi] = ent
        add((ent,), "attribute", "color", (shape, g["color"]), f"{be} the {noun} {g['color']}?")
        if g["size"]:
            add((ent,), "attribute", "size", (shape, g["size"]), f"{be} the {noun} {g['size']}?")
        if many:
            add((ent,), "other", "count", (shape, f"=={g['count']}"), f"Are there {NUMBER_WORDS[g['count']]} {noun}?")
    for sub, rel, tgt in relations:
        a, b = groups[sub], groups[tgt]
        be = "Are" if a["count"] > 1 else "Is"
        add(
            (entity_id[sub], entity_id[tgt]),
            "relation",
            "spatial",
            (a["shape"], b["shape"], rel),
            f"{be} the {_noun(a['shape'], a['count'])} {_DPG_REL_PHRASE[rel]} the {_noun(b['shape'], b['count'])}?",
        )
    add((0,), "global", "", ("background", "grey"), "Is the background grey?")
    keywords = ", ".join(g["shape"] for g in groups)
    return DPGItem(item_id=item_id, prompt=prompt, propositions=tuple(props), keywords=keywords)


def dpg_prompt_set(world: ShapesWorldConfig, n: int, seed: int) -> list[DPGItem]:
    """``n`` dense prompts, deterministic for ``seed``; item ids ``shapes_00000``, ``shapes_00001``, ..."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), 1000])
    return [random_dpg_item(rng, world, f"shapes_{i:05d}") for i in range(n)]


def dpg_csv_rows(items: Iterable[DPGItem]) -> list[dict[str, str]]:
    """Rows in DPG-Bench's CSV schema (keys exactly ``DPG_CSV_COLUMNS``, values as strings).

    ``text`` is the prompt, ``dependency`` the comma-separated parent ids (``"0"`` for none),
    ``tuple``/``question_natural_language`` the DSG tuple and the question.
    """
    rows = []
    for item in items:
        for p in item.propositions:
            dep = ",".join(str(d) for d in p.dependency) if p.dependency else "0"
            values = (
                item.item_id,
                item.prompt,
                item.keywords,
                str(p.proposition_id),
                dep,
                p.category_broad,
                p.category_detailed,
                p.tuple,
                p.question,
            )
            rows.append(dict(zip(DPG_CSV_COLUMNS, values)))
    return rows
