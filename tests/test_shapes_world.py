"""ShapesWorld: templates, rendering, detector round trip, prompt generators, oracle scenes."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from htgrpo.data.records import GENEVAL_TASKS, GenEvalRecord, GenEvalRequirement, MetadataError
from htgrpo.data.shapes.detector import ShapesDetector, shape_posterior
from htgrpo.data.shapes.palette import PALETTE_RGB, SHAPES, ShapesWorldConfig, color_index
from htgrpo.data.shapes.prompts import (
    VOCABULARY,
    geneval_prompt_set,
    prompt_words,
    random_geneval_record,
)
from htgrpo.data.shapes.sampler import PlacementError, random_scene, scene_for_record
from htgrpo.data.shapes.scene import (
    Scene,
    ShapeObject,
    cells_to_image,
    image_to_cells,
    render_cells,
    shape_template,
)
from htgrpo.rewards.geneval import relative_position
from htgrpo.rewards.shapes import (
    ShapesGenEvalReward,
    ShapesGenEvalScorer,
    geneval_binary_reward,
    geneval_partial_reward,
)

WORLD = ShapesWorldConfig.roomy()


def _touching(a: ShapeObject, b: ShapeObject) -> bool:
    """True when the boxes overlap or are adjacent (diagonals included)."""
    return not (
        a.row + a.size + 1 <= b.row
        or b.row + b.size + 1 <= a.row
        or a.col + a.size + 1 <= b.col
        or b.col + b.size + 1 <= a.col
    )


# ------------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize("side", [5, 6, 7])
def test_templates_distinct_and_fill_their_box(side):
    masks = {s: shape_template(s, side, side) for s in SHAPES}
    for s, m in masks.items():
        assert m.shape == (side, side) and m.dtype == bool
        # touches all four sides -> the rendered bounding box is the object's box
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
        assert ndimage.label(m, structure=np.ones((3, 3)))[1] == 1
    assert masks["triangle"][-1].all() and masks["square"].all()
    assert masks["triangle"][0].sum() <= 2  # apex at the top
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        # Circle vs square at side 6 is the closest pair (IoU 32/36 = 0.889): a 6x6 grid cannot round more.
        assert iou <= 0.89, (a, b, side, iou)


def test_templates_non_square_boxes():
    assert shape_template("square", 3, 8).all()
    tri = shape_template("triangle", 4, 9)
    assert tri.shape == (4, 9) and tri[-1].all() and np.array_equal(np.flatnonzero(tri[0]), [3, 4, 5])
    assert (tri.sum(1) == [3, 5, 7, 9]).all()
    dia = shape_template("diamond", 5, 9)
    assert dia[2].all() and dia[0].sum() == 1
    with pytest.raises(ValueError):
        shape_template("hexagon", 5, 5)


# ------------------------------------------------------------------------------------------- rendering


def test_cells_image_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    cells = rng.integers(0, len(PALETTE_RGB), size=(3, 16, 16))
    img = cells_to_image(cells, 8)
    assert img.shape == (3, 3, 128, 128) and img.dtype == np.uint8
    assert np.array_equal(image_to_cells(img, 16), cells)
    assert np.array_equal(image_to_cells(img[1], 16), cells[1])
    assert tuple(img[0, :, 9, 17]) == PALETTE_RGB[cells[0, 1, 2]]
    t = cells_to_image(torch.from_numpy(cells[0]), 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (3, 64, 64)
    back = image_to_cells(t, 16)
    assert isinstance(back, torch.Tensor) and torch.equal(back, torch.from_numpy(cells[0]))


def test_render_cells_paints_templates():
    scene = Scene(16, (ShapeObject("diamond", "red", 2, 3, 5), ShapeObject("square", "white", 9, 9, 6)))
    cells = render_cells(scene)
    assert cells.dtype == np.int64 and cells.shape == (16, 16)
    assert np.array_equal(cells[2:7, 3:8] == 1, shape_template("diamond", 5, 5))
    assert (cells[9:15, 9:15] == 10).all()
    assert (cells == 0).sum() == 256 - shape_template("diamond", 5, 5).sum() - 36
    with pytest.raises(ValueError):
        Scene(16, (ShapeObject("circle", "red", 12, 12, 6),))


# -------------------------------------------------------------------------------------------- detector


def test_render_detect_round_trip_300_scenes():
    rng = np.random.default_rng(1)
    det = ShapesDetector(WORLD)
    scenes = [random_scene(rng, WORLD, max_objects=4) for _ in range(300)]
    for s in scenes:
        for a, b in itertools.combinations(s.objects, 2):
            assert not _touching(a, b)
    images = torch.from_numpy(np.stack([cells_to_image(render_cells(s), WORLD.cell_px) for s in scenes]))
    all_dets = det.detect_batch(images)
    for scene, dets in zip(scenes, all_dets):
        want = sorted((o.shape, o.color, o.box_px(WORLD.cell_px)) for o in scene.objects)
        got = sorted((d.label, d.color, d.box) for d in dets)
        assert got == want
        # a clean object is certain: far above GenEval's 0.9 counting threshold
        assert all(d.score > 0.999 for d in dets)
    assert sum(len(s.objects) for s in scenes) > 600


def test_detector_input_layouts_and_scaling():
    scene = Scene(16, (ShapeObject("triangle", "green", 4, 2, 7),))
    cells = render_cells(scene)
    det = ShapesDetector(WORLD)
    chw = cells_to_image(cells, 8)
    ref = det.detect(chw)
    assert len(ref) == 1 and ref[0].label == "triangle" and ref[0].box == (16.0, 32.0, 72.0, 88.0)
    assert ref[0].area == shape_template("triangle", 7, 7).sum() * 64
    assert det.detect(np.moveaxis(chw, 0, -1)) == ref  # (H, W, 3)
    assert det.detect(torch.from_numpy(chw)) == ref
    small = det.detect(cells_to_image(cells, 2))  # 32x32 image: boxes follow the image size
    assert small[0].box == (4.0, 8.0, 18.0, 22.0) and small[0].label == "triangle"


def test_detector_drops_small_blobs_and_scores_imperfect_shapes():
    cells = render_cells(Scene(16, (ShapeObject("square", "blue", 0, 0, 6),)))
    cells[12:15, 12:15] = 4  # 3x3 blob: below min_side=4
    dets = ShapesDetector(WORLD).detect(cells_to_image(cells, 8))
    assert len(dets) == 1
    cells[0, 0] = 0  # one missing corner: still a square, but not a perfect one
    d = ShapesDetector(WORLD).detect(cells_to_image(cells, 8))[0]
    # mismatches: square 1, circle 3 (its 6x6 template lacks the 4 corner cells), triangle many; p = 0.1:
    # P(square) = 1 / (1 + (p / (1 - p))**2 + ...) = 1 / (1 + 1/81) = 81/82
    assert d.label == "square" and d.score == pytest.approx(81 / 82, rel=1e-5)
    both = ShapesDetector(WORLD, min_side=2).detect(cells_to_image(cells, 8))
    assert len(both) == 2 and both[0].label == "square" and both[0].score == d.score
    # at 3x3 the circle template is a full square too: an even split between the two, less the triangle
    # (2 mismatches: 1/81) and clutter ((0.5/0.9)**9)
    assert both[1].score == pytest.approx(1 / (2 + 1 / 81 + (5 / 9) ** 9), rel=1e-6)


def test_shape_posterior_by_hand():
    # d = (0, 4) on a 5x5 box, p = 0.1: L1/L0 = (p/(1-p))**4 = 1/6561; clutter/L0 = (0.5/0.9)**25 = 4.15e-7
    post = shape_posterior([0, 4], 25, 0.1)
    assert post[0] == pytest.approx(6561 / 6562, rel=1e-6)
    assert post[1] == pytest.approx(1 / 6562, rel=1e-4)
    assert post[2] == pytest.approx((0.5 / 0.9) ** 25, rel=1e-3)
    # equally good fits split the belief: below the counting threshold but above the 0.3 detection threshold
    assert shape_posterior([2, 2, 9], 25, 0.1)[0] == pytest.approx(0.5, abs=1e-4)
    # a blob no template explains (a third of its box wrong) reads as clutter
    assert shape_posterior([9, 10, 12], 25, 0.1)[-1] > 0.9
    with pytest.raises(ValueError, match="cell_noise"):
        shape_posterior([0], 25, 0.6)


def test_detector_confidence_separates_ragged_from_clean_shapes():
    world = ShapesWorldConfig.roomy(grid_size=12, cell_px=1, min_object_size=4, max_object_size=5)
    det = ShapesDetector(world)
    cells = render_cells(Scene(12, (ShapeObject("circle", "red", 1, 1, 5),)))
    assert det.detect(cells_to_image(cells, 1))[0].score > 0.999
    cells[1, 1] = cells[1, 5] = color_index("red")  # two of the circle's four empty corners filled: circle or square?
    d = det.detect(cells_to_image(cells, 1))[0]
    assert d.score == pytest.approx(0.5, abs=1e-3)  # counted by no counting prompt (> 0.9), detected (> 0.3)
    noisy = np.zeros((12, 12), dtype=np.int64)
    noisy[2:7, 2:7] = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]])
    assert all(d.score < 0.3 for d in det.detect(cells_to_image(noisy, 1)))  # a checkerboard is clutter


def test_world_object_size_limits():
    assert ShapesWorldConfig.roomy(grid_size=12, min_object_size=4, max_object_size=5).min_object_size == 4
    with pytest.raises(ValueError, match="min_object_size"):
        ShapesWorldConfig.roomy(grid_size=12, min_object_size=4, max_object_size=5, shapes=("circle", "diamond"))
    with pytest.raises(ValueError, match="min_object_size"):
        ShapesWorldConfig.roomy(grid_size=12, min_object_size=3, max_object_size=5)
    with pytest.raises(ValueError, match="detector_cell_noise"):
        ShapesWorldConfig.roomy(detector_cell_noise=0.5)


# ----------------------------------------------------------------------------------------------- prompts


def test_geneval_phrasing_and_metadata():
    rng = np.random.default_rng(2)
    pats = {
        "single_object": r"a photo of an? (\w+)",
        "two_object": r"a photo of an? (\w+) and an? (\w+)",
        "counting": r"a photo of (two|three|four) (\w+)s",
        "colors": r"a photo of an? (\w+) (\w+)",
        "position": r"a photo of an? (\w+) (left of|right of|above|below) an? (\w+)",
        "color_attr": r"a photo of an? (\w+) (\w+) and an? (\w+) (\w+)",
    }
    for tag in GENEVAL_TASKS:
        for _ in range(40):
            rec = random_geneval_record(rng, WORLD, tag)
            m = re.fullmatch(pats[tag], rec.prompt)
            assert m, rec.prompt
            inc = rec.include
            assert bool(rec.exclude) == (tag == "counting")
            for word, nxt in zip(rec.prompt.split(), rec.prompt.split()[1:]):
                if word in ("a", "an"):
                    assert (word == "an") == (nxt[0] in "aeiou"), rec.prompt
            if tag == "two_object":
                assert [r.cls for r in inc] == [m[1], m[2]] and m[1] != m[2]
            if tag == "counting":
                n = {"two": 2, "three": 3, "four": 4}[m[1]]
                assert inc == (GenEvalRequirement(m[2], n),) and rec.exclude == (GenEvalRequirement(m[2], n + 1),)
            if tag == "colors":
                assert inc == (GenEvalRequirement(m[2], 1, color=m[1]),)
            if tag == "position":
                assert inc == (GenEvalRequirement(m[3], 1), GenEvalRequirement(m[1], 1, position=(m[2], 0)))
            if tag == "color_attr":
                assert inc == (GenEvalRequirement(m[2], 1, color=m[1]), GenEvalRequirement(m[4], 1, color=m[3]))
                assert m[2] != m[4] and m[1] != m[3]
    assert any(random_geneval_record(rng, WORLD, "colors").prompt.startswith("a photo of an orange") for _ in range(200))


def test_geneval_prompt_set_deterministic_and_deduplicated():
    a = geneval_prompt_set(WORLD, per_task=30, seed=43)
    assert a == geneval_prompt_set(WORLD, per_task=30, seed=43)
    assert a != geneval_prompt_set(WORLD, per_task=30, seed=44)
    prompts = [r.prompt for r in a]
    assert len(prompts) == len(set(prompts))
    counts = {t: sum(r.tag == t for r in a) for t in GENEVAL_TASKS}
    assert counts["single_object"] == len(WORLD.shapes)
    assert counts["two_object"] <= 12 and counts["counting"] <= 12  # 4 shapes: few distinct prompts
    assert 0 < counts["color_attr"] <= 30
    assert [r.tag for r in a] == sorted((r.tag for r in a), key=GENEVAL_TASKS.index)
    only = geneval_prompt_set(WORLD, per_task=5, seed=43, tasks=("position",))
    assert {r.tag for r in only} == {"position"} and len(only) <= 5
    with pytest.raises(MetadataError):
        geneval_prompt_set(WORLD, 5, 0, tasks=("spatial",))


def test_vocabulary_covers_all_prompts():
    assert len(VOCABULARY) == len(set(VOCABULARY)) and "." in VOCABULARY and "," in VOCABULARY
    assert prompt_words("A red circle, left.") == ["a", "red", "circle", ",", "left", "."]
    for rec in geneval_prompt_set(WORLD, per_task=100, seed=0):
        assert all(w in VOCABULARY for w in prompt_words(rec.prompt)), rec.prompt


# ------------------------------------------------------------------------------------------ oracle scenes


def test_oracle_scenes_pass_geneval_for_every_tag():
    rng = np.random.default_rng(3)
    records = [random_geneval_record(rng, WORLD, tag) for tag in GENEVAL_TASKS for _ in range(40)]
    scenes = [scene_for_record(r, rng, WORLD) for r in records]
    for rec, scene in zip(records, scenes):
        for a, b in itertools.combinations(scene.objects, 2):
            assert not _touching(a, b)
        assert len(scene.objects) == sum(r.count for r in rec.include)
    images = torch.from_numpy(np.stack([cells_to_image(render_cells(s), WORLD.cell_px) for s in scenes]))
    results = ShapesGenEvalScorer(WORLD).score(images, records)
    failed = [(r.prompt, res.reason) for r, res in zip(records, results) if not res.correct]
    assert not failed, failed[:5]
    assert geneval_binary_reward(results) == [1.0] * len(records)
    assert geneval_partial_reward(results) == [1.0] * len(records)
    # Position scenes hold the relation with room to spare (normalised offset > 0.55, not just > 0.5).
    det = ShapesDetector(WORLD)
    for rec, img in zip(records, images):
        if rec.tag == "position":
            ds = {d.label: d for d in det.detect(img)}
            a, b = ds[rec.include[1].cls], ds[rec.include[0].cls]
            assert rec.include[1].position[0] in relative_position(a, b, margin=0.15)


def test_rewards_on_wrong_images():
    rec = GenEvalRecord("colors", "a photo of a red circle", (GenEvalRequirement("circle", 1, color="red"),))
    good = cells_to_image(render_cells(Scene(16, (ShapeObject("circle", "red", 3, 3, 6),))), 8)
    bad = cells_to_image(render_cells(Scene(16, (ShapeObject("circle", "blue", 3, 3, 6),))), 8)
    batch = torch.from_numpy(np.stack([good, bad]))
    assert ShapesGenEvalReward(WORLD, "binary")(batch, [rec, rec]).tolist() == [1.0, 0.0]
    assert ShapesGenEvalReward(WORLD, "partial")(batch, [rec, rec]).tolist() == [1.0, 0.0]
    two = GenEvalRecord("two_object", "x", (GenEvalRequirement("circle", 1), GenEvalRequirement("square", 1)))
    assert ShapesGenEvalReward(WORLD, "partial")(batch[:1], [two]).tolist() == [0.5]


def test_partial_iff_correct_on_random_scenes():
    rng = np.random.default_rng(4)
    scorer = ShapesGenEvalScorer(WORLD)
    records = [random_geneval_record(rng, WORLD, GENEVAL_TASKS[i % 6]) for i in range(300)]
    scenes = [random_scene(rng, WORLD, max_objects=4) for _ in records]
    images = np.stack([cells_to_image(render_cells(s), WORLD.cell_px) for s in scenes])
    results = scorer.score(images, records)
    assert all((r.partial == 1.0) == r.correct and 0.0 <= r.partial <= 1.0 for r in results)
    assert 0 < sum(r.correct for r in results) < len(results)


def test_impossible_records_raise():
    rng = np.random.default_rng(0)
    five = GenEvalRecord("counting", "five circles", (GenEvalRequirement("circle", 5),))
    with pytest.raises(PlacementError, match="no placement"):
        scene_for_record(five, rng, WORLD)
    chain = GenEvalRecord(
        "position",
        "x",
        (
            GenEvalRequirement("circle", 1),
            GenEvalRequirement("square", 1, position=("left of", 0)),
            GenEvalRequirement("triangle", 1, position=("above", 1)),
        ),
    )
    assert len(scene_for_record(chain, rng, WORLD).objects) == 3
    # Three objects in a row need 5 + 1 + 5 + 1 + 5 = 17 columns: impossible on a 16 grid.
    row = GenEvalRecord("position", "x", chain.include[:2] + (GenEvalRequirement("triangle", 1, position=("right of", 0)),))
    with pytest.raises(PlacementError):
        scene_for_record(row, rng, WORLD)
    contradiction = GenEvalRecord(
        "counting", "x", (GenEvalRequirement("circle", 2),), (GenEvalRequirement("circle", 2),)
    )
    with pytest.raises(MetadataError, match="exclude"):
        scene_for_record(contradiction, rng, WORLD)
    with pytest.raises(MetadataError, match="hexagon"):
        scene_for_record(GenEvalRecord("single_object", "x", (GenEvalRequirement("hexagon", 1),)), rng, WORLD)
