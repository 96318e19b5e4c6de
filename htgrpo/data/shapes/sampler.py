"""Scenes that satisfy a prompt's metadata: supervised training data and the ``oracle`` policy.

``scene_for_record`` turns a GenEval record (or a ShapesWorld DPG item) into object groups and spatial
constraints, then places the objects with a randomised depth-first search over all grid positions:

* objects never touch: at least one empty cell between any two boxes, diagonals included;
* a GenEval position requirement ``A rel B`` holds for *every* (A object, B object) pair under GenEval's
  rule (``htgrpo.rewards.geneval.relative_position``, margin 0.1) with a safety margin on top, so the
  scene still passes when the rule is evaluated on pixel boxes;
* counts are exact, unspecified colours and sizes are random.

``PlacementError`` is raised when no placement is found after many restarts (e.g. contradictory
relations or too many objects for the grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np

from htgrpo.data.records import (
    GENEVAL_COLORS,
    GENEVAL_RELATIONS,
    DPGItem,
    GenEvalRecord,
    MetadataError,
    parse_tuple,
)
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.data.shapes.scene import Scene, ShapeObject

POSITION_MARGIN = 0.1
"""GenEval's ``position_threshold``: per-axis offsets are shrunk by this times the summed box sizes."""

BIAS_SCHEDULE = (0.0, 0.0, 2.0, 4.0, 8.0)
"""Per restart, how strongly placements near the border are preferred (0 = uniform)."""

RELATION_SAFETY = 0.05
"""Extra slack demanded by the sampler: the normalised offset must exceed ``0.5 + RELATION_SAFETY``."""


class PlacementError(RuntimeError):
    """No scene satisfying the constraints was found."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object to place: its class, colour, allowed sides (cells) and the group it belongs to."""

    shape: str
    color: str
    sizes: tuple[int, ...]
    group: int


@dataclass(frozen=True)
class RelationSpec:
    """Every object of ``subject`` must be ``relation`` (GenEval wording) of every object of ``target``."""

    subject: int
    relation: str
    target: int


def _relation_ok(sub_c, sub_r, sub_s, tgt_c, tgt_r, tgt_s, relation: str, margin: float, safety: float) -> np.ndarray:
    """Vectorised GenEval relation test (subject relative to target) on square cell boxes.

    Arguments are top-left column/row and side of subject and target, scalars or arrays (broadcast).
    """
    sub_c, sub_r, sub_s = (np.asarray(v, dtype=np.float64) for v in (sub_c, sub_r, sub_s))
    tgt_c, tgt_r, tgt_s = (np.asarray(v, dtype=np.float64) for v in (tgt_c, tgt_r, tgt_s))
    offx = (sub_c + sub_s / 2.0) - (tgt_c + tgt_s / 2.0)
    offy = (sub_r + sub_s / 2.0) - (tgt_r + tgt_s / 2.0)
    dims = sub_s + tgt_s
    revx = np.maximum(np.abs(offx) - margin * dims, 0.0) * np.sign(offx)
    revy = np.maximum(np.abs(offy) - margin * dims, 0.0) * np.sign(offy)
    norm = np.hypot(offx, offy)
    safe = np.where(norm > 0, norm, 1.0)
    dx, dy = revx / safe, revy / safe
    thr = 0.5 + safety
    if relation == "left of":
        ok = dx < -thr
    elif relation == "right of":
        ok = dx > thr
    elif relation == "above":
        ok = dy < -thr
    elif relation == "below":
        ok = dy > thr
    else:
        raise MetadataError(f"unknown relation {relation!r}; expected one of {GENEVAL_RELATIONS}")
    return ok & (norm > 0)


def relations_between(a: ShapeObject, b: ShapeObject, margin: float = POSITION_MARGIN, safety: float = 0.0) -> set[str]:
    """Relations of ``a`` relative to ``b`` (cell boxes) that hold with normalised offset > 0.5 + safety."""
    out = set()
    for rel in GENEVAL_RELATIONS:
        if bool(_relation_ok(a.col, a.row, a.size, b.col, b.row, b.size, rel, margin, safety)):
            out.add(rel)
    return out


@lru_cache(maxsize=64)
def _candidates(grid: int, sizes: tuple[int, ...], step: int = 1, offset: int = 0) -> np.ndarray:
    """All ``(size, row, col)`` placements of the given sides on a ``grid x grid`` board whose top-left row and
    column lie on the lattice ``offset + k * step`` (float, read-only)."""
    rows = []
    for s in sizes:
        if 1 <= s <= grid:
            where = np.arange(offset, grid - s + 1, step)
            rr, cc = np.meshgrid(where, where, indexing="ij")
            rows.append(np.stack([np.full(rr.size, s), rr.ravel(), cc.ravel()], axis=1))
    out = np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 3))
    out.setflags(write=False)
    return out


def place_objects(
    specs: Sequence[ObjectSpec],
    relations: Sequence[RelationSpec],
    rng: np.random.Generator,
    world: ShapesWorldConfig,
    *,
    max_restarts: int = 50,
    branching: int = 8,
    node_budget: int = 200,
    margin: float = POSITION_MARGIN,
    safety: float = RELATION_SAFETY,
) -> Scene:
    """Place ``specs`` on the grid so no two touch and every relation holds.

    Randomised depth-first search with forward checking: every unplaced object keeps a mask of its still
    feasible ``(size, row, col)`` placements (no touching + every relation with the placed objects,
    vectorised over all placements); the object with the fewest left goes next (ties broken at random),
    trying up to ``branching`` random placements; a branch dies as soon as some object has none left.
    A search gives up after ``node_budget`` placements and restarts, ``max_restarts`` times.

    Raises:
        PlacementError: no search succeeded.
    """
    g = world.grid_size
    n = len(specs)
    for rel in relations:
        if rel.relation not in GENEVAL_RELATIONS:
            raise MetadataError(f"unknown relation {rel.relation!r}; expected one of {GENEVAL_RELATIONS}")
    cands: list[np.ndarray] = []
    for spec in specs:
        c = _candidates(g, tuple(spec.sizes), world.position_step, world.position_offset)
        if len(c) == 0:
            raise PlacementError(f"no allowed size for {spec} in a {g}x{g} grid")
        cands.append(c)
    rel_list = [(r.subject, r.relation, r.target) for r in relations]
    # Distance of each placement's centre from the grid centre, normalised to (0, 1]: placements towards
    # the border leave more room for the others (used to bias the later restarts).
    edge_weight = []
    for c in cands:
        centre = c[:, 1:3] + c[:, :1] / 2.0 - g / 2.0
        d = np.abs(centre).max(axis=1)
        edge_weight.append((d + 0.5) / (d.max() + 0.5))
    bias = 0.0

    def compat(i: int, j: int, sj: float, rj: float, cj: float) -> np.ndarray:
        """Placements of object ``i`` compatible with object ``j`` placed at ``(sj, rj, cj)``."""
        c = cands[i]
        s, r, col = c[:, 0], c[:, 1], c[:, 2]
        ok = (r + s + 1 <= rj) | (rj + sj + 1 <= r) | (col + s + 1 <= cj) | (cj + sj + 1 <= col)
        gi, gj = specs[i].group, specs[j].group
        for sub, rel, tgt in rel_list:
            if sub == gi and tgt == gj:
                ok &= _relation_ok(col, r, s, cj, rj, sj, rel, margin, safety)
            elif sub == gj and tgt == gi:
                ok &= _relation_ok(cj, rj, sj, col, r, s, rel, margin, safety)
        return ok

    nodes = [0]

    def search(masks: dict[int, np.ndarray], placed: dict[int, tuple[float, float, float]]):
        if not masks:
            return placed
        order = list(masks)
        rng.shuffle(order)
        i = min(order, key=lambda k: int(masks[k].sum()))  # fewest placements left goes first
        live = np.flatnonzero(masks[i])
        if bias > 0:
            w = edge_weight[i][live] ** bias
            picks = rng.choice(live, size=min(branching, live.size), replace=False, p=w / w.sum())
        else:
            picks = rng.permutation(live)[:branching]
        for k in picks:
            nodes[0] += 1
            if nodes[0] > node_budget:
                return None
            sj, rj, cj = cands[i][k]
            new_masks = {}
            for u, m in masks.items():
                if u == i:
                    continue
                m2 = m & compat(u, i, sj, rj, cj)
                if not m2.any():
                    break
                new_masks[u] = m2
            else:
                res = search(new_masks, {**placed, i: (sj, rj, cj)})
                if res is not None:
                    return res
        return None

    for attempt in range(max_restarts):
        nodes[0] = 0
        bias = BIAS_SCHEDULE[attempt % len(BIAS_SCHEDULE)]
        res = search({i: np.ones(len(cands[i]), dtype=bool) for i in range(n)}, {})
        if res is not None:
            objs = tuple(
                ShapeObject(specs[i].shape, specs[i].color, int(res[i][1]), int(res[i][2]), int(res[i][0]))
                for i in range(n)
            )
            return Scene(g, objs)
    desc = ", ".join(f"{s.color} {s.shape} (group {s.group}, sizes {s.sizes})" for s in specs)
    rels = ", ".join(f"group {r.subject} {r.relation} group {r.target}" for r in relations) or "none"
    raise PlacementError(
        f"no placement found after {max_restarts} restarts for objects [{desc}] with relations [{rels}] "
        f"on a {g}x{g} grid; reduce the object count/sizes or check the relations are consistent"
    )


def allowed_sizes(world: ShapesWorldConfig, size: str | None = None) -> tuple[int, ...]:
    """Object sides (cells) allowed for a size word: any, ``small`` (<= small_size), ``large`` (>= large_size)."""
    full = tuple(range(world.min_object_size, world.max_object_size + 1))
    if size is None:
        return full
    if size == "small":
        out = tuple(s for s in full if s <= world.small_size)
    elif size == "large":
        out = tuple(s for s in full if s >= world.large_size)
    else:
        raise MetadataError(f"unknown size {size!r}; expected 'small' or 'large'")
    if not out:
        raise MetadataError(f"no object side in {full} counts as {size!r} for {world}")
    return out


def _geneval_specs(
    record: GenEvalRecord, rng: np.random.Generator, world: ShapesWorldConfig
) -> tuple[list[ObjectSpec], list[RelationSpec]]:
    specs: list[ObjectSpec] = []
    relations: list[RelationSpec] = []
    sizes = allowed_sizes(world)
    for gi, req in enumerate(record.include):
        if req.cls not in world.shapes:
            raise MetadataError(f"record {record.prompt!r}: class {req.cls!r} is not a ShapesWorld shape {world.shapes}")
        if req.count < 1:
            raise MetadataError(f"record {record.prompt!r}: include count must be >= 1, got {req.count}")
        for _ in range(req.count):
            color = req.color if req.color is not None else str(rng.choice(GENEVAL_COLORS))
            specs.append(ObjectSpec(req.cls, color, sizes, gi))
        if req.position is not None:
            rel, target = req.position
            if not (0 <= target < gi):
                raise MetadataError(
                    f"record {record.prompt!r}: position target index {target} must point at an earlier include entry"
                )
            relations.append(RelationSpec(gi, rel, target))
    for req in record.exclude:
        placed = sum(1 for s in specs if s.shape == req.cls)
        if placed >= req.count:
            raise MetadataError(
                f"record {record.prompt!r}: include needs {placed} x {req.cls} but exclude forbids >= {req.count}"
            )
    return specs, relations


def dpg_groups(item: DPGItem) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Entity groups and spatial relations of a ShapesWorld DPG item, read from its proposition tuples.

    Returns ``(groups, relations)``: groups are dicts ``{shape, color, size, count}`` (``color``/``size``
    None when unspecified, ``count`` 1 by default) in entity order; relations are ``(subject shape,
    target shape, relation)``.
    """
    groups: dict[str, dict] = {}
    relations: list[tuple[str, str, str]] = []
    for prop in item.propositions:
        broad, detailed, args = parse_tuple(prop.tuple)
        key = f"{broad} - {detailed}".strip()
        if key == "entity - whole":
            groups.setdefault(args[0], {"shape": args[0], "color": None, "size": None, "count": 1})
        elif key == "attribute - color":
            groups.setdefault(args[0], {"shape": args[0], "color": None, "size": None, "count": 1})["color"] = args[1]
        elif key == "attribute - size":
            groups.setdefault(args[0], {"shape": args[0], "color": None, "size": None, "count": 1})["size"] = args[1]
        elif key == "other - count":
            if not args[1].startswith("=="):
                raise MetadataError(f"item {item.item_id}: count tuple {prop.tuple!r} must use '==N'")
            groups.setdefault(args[0], {"shape": args[0], "color": None, "size": None, "count": 1})["count"] = int(
                args[1][2:]
            )
        elif key == "relation - spatial":
            relations.append((args[0], args[1], args[2]))
        elif broad == "global":
            continue
        else:
            raise MetadataError(f"item {item.item_id}: unsupported proposition tuple {prop.tuple!r}")
    return list(groups.values()), relations


def _dpg_specs(
    item: DPGItem, rng: np.random.Generator, world: ShapesWorldConfig
) -> tuple[list[ObjectSpec], list[RelationSpec]]:
    groups, rels = dpg_groups(item)
    index = {g["shape"]: i for i, g in enumerate(groups)}
    specs: list[ObjectSpec] = []
    for gi, grp in enumerate(groups):
        if grp["shape"] not in world.shapes:
            raise MetadataError(f"item {item.item_id}: {grp['shape']!r} is not a ShapesWorld shape {world.shapes}")
        sizes = allowed_sizes(world, grp["size"])
        for _ in range(grp["count"]):
            color = grp["color"] if grp["color"] is not None else str(rng.choice(GENEVAL_COLORS))
            specs.append(ObjectSpec(grp["shape"], color, sizes, gi))
    relations = []
    for a, b, rel in rels:
        if a not in index or b not in index:
            raise MetadataError(f"item {item.item_id}: relation ({a}, {b}, {rel}) names an entity with no entity tuple")
        relations.append(RelationSpec(index[a], rel, index[b]))
    return specs, relations


def scene_for_record(
    record: Union[GenEvalRecord, DPGItem], rng: np.random.Generator, world: ShapesWorldConfig
) -> Scene:
    """A random scene that satisfies ``record`` under the official rules (see module docstring).

    GenEval records: exactly ``count`` objects per include entry (so exclude rules hold), required colours,
    position requirements for every object pair. DPG items: every entity group with its colour, size and
    count, every spatial relation for every object pair.

    Raises:
        MetadataError: the record names unknown shapes/relations or is self-contradictory.
        PlacementError: no placement was found after many restarts.
    """
    if isinstance(record, GenEvalRecord):
        specs, relations = _geneval_specs(record, rng, world)
    elif isinstance(record, DPGItem):
        specs, relations = _dpg_specs(record, rng, world)
    else:
        raise TypeError(f"expected GenEvalRecord or DPGItem, got {type(record).__name__}")
    return place_objects(specs, relations, rng, world)


def random_scene(
    rng: np.random.Generator,
    world: ShapesWorldConfig,
    max_objects: int = 4,
    min_objects: int = 1,
) -> Scene:
    """A random non-touching scene of ``min_objects..max_objects`` objects (random class, colour, size)."""
    if not (0 <= min_objects <= max_objects):
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    n = int(rng.integers(min_objects, max_objects + 1))
    sizes = allowed_sizes(world)
    specs = [
        ObjectSpec(str(rng.choice(world.shapes)), str(rng.choice(GENEVAL_COLORS)), sizes, i) for i in range(n)
    ]
    return place_objects(specs, [], rng, world)
