"""DPG-Bench rules (htgrpo.rewards.dpg), ShapesWorld dense prompts and the ShapesVQA stand-in."""

from __future__ import annotations

import numpy as np
import pytest

from htgrpo.data.records import (
    DPG_CSV_COLUMNS,
    DPG_L1_CATEGORIES,
    DPGItem,
    DPGProposition,
    MetadataError,
    format_tuple,
    parse_tuple,
)
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.data.shapes.prompts import VOCABULARY, dpg_csv_rows, dpg_prompt_set, prompt_words
from htgrpo.data.shapes.sampler import dpg_groups, scene_for_record
from htgrpo.data.shapes.scene import Scene, ShapeObject, cells_to_image, render_cells
from htgrpo.rewards.dpg import gate_answers, score_dpg_answers, summarize_dpg
from htgrpo.rewards.shapes import ShapesDPGReward, ShapesDPGScorer, ShapesVQA

WORLD = ShapesWorldConfig.roomy()


def prop(pid, dep, broad, detailed, args, q="?"):
    return DPGProposition(pid, dep, broad, detailed, format_tuple(broad, detailed, args), q)


ITEM = DPGItem(
    "toy",
    "A red circle left of a blue square.",
    (
        prop(1, (0,), "entity", "whole", ["circle"]),
        prop(2, (1,), "attribute", "color", ["circle", "red"]),
        prop(3, (0,), "entity", "whole", ["square"]),
        prop(4, (3,), "attribute", "color", ["square", "blue"]),
        prop(5, (1, 3), "relation", "spatial", ["circle", "square", "left of"]),
        prop(6, (5,), "other", "count", ["circle", "==1"]),  # chain: depends on the relation
        prop(7, (0,), "global", "", ["background", "grey"]),
    ),
)


# ------------------------------------------------------------------------------------------------ rules


def test_parent_gating_single_multi_and_chain():
    answers = {1: True, 2: True, 3: False, 4: True, 5: True, 6: True, 7: True}
    raw, gated = gate_answers(ITEM, answers)
    assert raw == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0}
    # 4 (parent 3) zeroed; 5 has parents (1, 3): one failed parent is enough; 6 inherits through 5.
    assert gated == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: 1.0}
    res = score_dpg_answers(ITEM, answers)
    assert res.score == pytest.approx(3 / 7)
    assert res.category_scores["attribute"] == [1.0, 0.0]
    assert res.category_scores["relation"] == [0.0]
    assert res.detailed_scores["global -"] == [1.0]


def test_child_no_does_not_affect_parent_and_all_yes_is_one():
    answers = {i: True for i in range(1, 8)}
    assert score_dpg_answers(ITEM, answers).score == 1.0
    answers[2] = False
    res = score_dpg_answers(ITEM, answers)
    assert res.gated[1] == 1.0 and res.gated[2] == 0.0 and res.score == pytest.approx(6 / 7)


def test_multiple_crops_average():
    yes = {i: True for i in range(1, 8)}
    no_root = {**yes, 1: False}  # zeroes 1, 2, 5, 6
    res = score_dpg_answers(ITEM, [yes, no_root])
    assert res.score == pytest.approx((1.0 + 3 / 7) / 2)
    assert res.gated[5] == 0.5 and res.raw[5] == 1.0
    assert len(res.category_scores["entity"]) == 4  # 2 questions x 2 crops


def test_summary_times_100_and_l1_categories():
    yes = {i: True for i in range(1, 8)}
    r1 = score_dpg_answers(ITEM, yes)
    r2 = score_dpg_answers(ITEM, {**yes, 3: False})
    s = summarize_dpg([r1, r2])
    assert s.num_prompts == 2
    assert s.overall == pytest.approx(100 * (1.0 + 3 / 7) / 2)
    assert set(s.categories) == set(DPG_L1_CATEGORIES)
    assert s.categories["entity"] == pytest.approx(100 * 3 / 4)
    assert s.categories["attribute"] == pytest.approx(100 * 3 / 4)
    assert s.categories["relation"] == pytest.approx(50.0)
    assert s.categories["other"] == pytest.approx(50.0)
    assert s.categories["global"] == pytest.approx(100.0)
    assert s.detailed["attribute - color"] == pytest.approx(75.0)


def test_missing_answer_or_parent_raises():
    with pytest.raises(MetadataError, match="proposition 7"):
        gate_answers(ITEM, {i: True for i in range(1, 7)})
    bad = DPGItem("bad", "x", (prop(1, (9,), "entity", "whole", ["circle"]),))
    with pytest.raises(MetadataError, match="unknown proposition 9"):
        gate_answers(bad, {1: True})


# ------------------------------------------------------------------------------------ tuples and CSV


def test_tuple_round_trip():
    assert format_tuple("relation", "spatial", ["circle", "square", "left of"]) == "relation - spatial (circle, square, left of)"
    assert format_tuple("global", "", ["background", "grey"]) == "global - (background, grey)"
    assert parse_tuple("relation - spatial (circle, square, left of)") == ("relation", "spatial", ["circle", "square", "left of"])
    assert parse_tuple("global - (background, grey)") == ("global", "", ["background", "grey"])
    with pytest.raises(MetadataError):
        parse_tuple("no parentheses here")


def test_dpg_items_schema_and_csv_rows():
    items = dpg_prompt_set(WORLD, 40, seed=3)
    assert items == dpg_prompt_set(WORLD, 40, seed=3)
    assert items != dpg_prompt_set(WORLD, 40, seed=4)
    assert len({it.item_id for it in items}) == 40
    for it in items:
        ids = [p.proposition_id for p in it.propositions]
        assert ids == list(range(1, len(ids) + 1))
        groups, rels = dpg_groups(it)
        assert 2 <= len(groups) <= 3 and len({g["shape"] for g in groups}) == len(groups)
        assert rels and sum(g["count"] for g in groups) <= 4
        for p in it.propositions:
            assert all(d < p.proposition_id for d in p.parents)  # parents precede children
            broad, detailed, args = parse_tuple(p.tuple)
            assert (broad, detailed) == (p.category_broad, p.category_detailed)
            assert broad in DPG_L1_CATEGORIES and p.question.endswith("?")
            if broad == "entity":
                assert p.dependency == (0,)
            if broad in ("attribute", "other"):
                assert len(p.parents) == 1
            if broad == "relation":
                assert len(p.parents) == 2
        assert it.propositions[-1].tuple == "global - (background, grey)"
        assert it.propositions[-1].question == "Is the background grey?"
        assert all(w in VOCABULARY for w in prompt_words(it.prompt)), it.prompt
    rows = dpg_csv_rows(items[:2])
    assert len(rows) == sum(len(it.propositions) for it in items[:2])
    assert all(tuple(r) == DPG_CSV_COLUMNS for r in rows)
    assert rows[0]["text"] == items[0].prompt and rows[0]["proposition_id"] == "1" and rows[0]["dependency"] == "0"
    rel_row = next(r for r in rows if r["category_broad"] == "relation")
    assert "," in rel_row["dependency"] and all(x.isdigit() and x != "0" for x in rel_row["dependency"].split(","))


# ------------------------------------------------------------------------------------------- ShapesVQA


def _image(*objects: ShapeObject):
    return cells_to_image(render_cells(Scene(WORLD.grid_size, tuple(objects))), WORLD.cell_px)


def test_vqa_answers_each_tuple_kind():
    img = _image(
        ShapeObject("circle", "red", 1, 1, 5),
        ShapeObject("square", "blue", 1, 9, 7),
        ShapeObject("square", "blue", 10, 10, 5),
    )
    vqa = ShapesVQA(WORLD)

    def ask(broad, detailed, *args):
        return vqa.answer(img, prop(1, (0,), broad, detailed, list(args)))

    assert ask("entity", "whole", "circle") and not ask("entity", "whole", "triangle")
    assert ask("attribute", "color", "circle", "red") and not ask("attribute", "color", "circle", "blue")
    assert ask("attribute", "color", "square", "blue")
    assert ask("attribute", "size", "circle", "small") and not ask("attribute", "size", "circle", "large")
    assert ask("other", "count", "square", "==2") and not ask("other", "count", "square", "==1")
    assert ask("other", "count", "circle", "==1") and ask("other", "count", "diamond", "==0")
    assert ask("relation", "spatial", "circle", "square", "left of")
    assert not ask("relation", "spatial", "circle", "square", "right of")
    assert not ask("relation", "spatial", "triangle", "square", "left of")
    assert ask("global", "", "background", "grey")
    with pytest.raises(MetadataError, match="entity - part"):
        ask("entity", "part", "circle")


def test_vqa_top_detection_decides_size_and_colour_majority():
    vqa = ShapesVQA(WORLD)
    img = _image(ShapeObject("circle", "red", 0, 0, 7), ShapeObject("circle", "green", 9, 9, 6))
    both = lambda *a: vqa.answer(img, prop(1, (0,), "attribute", *a))  # noqa: E731
    assert not both("color", ["circle", "red"])  # 1 of 2 is not a majority
    one = _image(ShapeObject("circle", "red", 0, 0, 7))
    assert vqa.answer(one, prop(1, (0,), "attribute", "size", ["circle", "large"]))
    assert not vqa.answer(_image(ShapeObject("circle", "red", 0, 0, 6)), prop(1, (0,), "attribute", "size", ["circle", "large"]))


def test_background_question():
    vqa = ShapesVQA(WORLD)
    q = prop(1, (0,), "global", "", ["background", "grey"])
    assert vqa.answer(_image(), q)
    cells = np.full((16, 16), 3, dtype=np.int64)  # all yellow: one huge square blob fills the canvas
    assert not vqa.answer(cells_to_image(cells, WORLD.cell_px), q)
    noise = np.random.default_rng(0).integers(0, 11, size=(16, 16))  # mostly non-grey speckle
    assert not vqa.answer(cells_to_image(noise, WORLD.cell_px), q)


def test_wrong_image_gates_children():
    item = dpg_prompt_set(WORLD, 1, seed=0)[0]
    blank = _image()
    res = ShapesDPGScorer(WORLD).score(blank[None], [item])[0]
    # Only the background question survives on an empty canvas.
    assert res.score == pytest.approx(1 / len(item.propositions))
    assert all(v == 0.0 for pid, v in res.gated.items() if pid != item.propositions[-1].proposition_id)


def test_oracle_scenes_score_one():
    items = dpg_prompt_set(WORLD, 60, seed=11)
    rng = np.random.default_rng(5)
    images = np.stack([cells_to_image(render_cells(scene_for_record(it, rng, WORLD)), WORLD.cell_px) for it in items])
    results = ShapesDPGScorer(WORLD).score(images, items)
    bad = [(it.prompt, r.raw) for it, r in zip(items, results) if r.score != 1.0]
    assert not bad, bad[:3]
    assert summarize_dpg(results).overall == pytest.approx(100.0)
    import torch

    rewards = ShapesDPGReward(WORLD)(torch.from_numpy(images[:4]), items[:4])
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0] * 4
