"""Diversity / fidelity metrics beside GenEval (htgrpo/evaluation/diversity.py) and the readable sample grids
(htgrpo/evaluation/grids.py): hand-computed values, constructed collapsed scenes, and the wiring into validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from htgrpo.data.prompt_sets import ShapesGenEvalPrompts
from htgrpo.data.records import BenchmarkPrompt, GenEvalRecord, GenEvalRequirement
from htgrpo.data.shapes.palette import ShapesWorldConfig, color_index
from htgrpo.data.shapes.scene import Scene, ShapeObject, cells_to_image, image_to_cells, render_cells
from htgrpo.evaluation.benchmark import Benchmark, run_benchmark
from htgrpo.evaluation.diversity import (
    DIVERSITY_KEYS,
    colour_distance,
    expected_color_mass,
    foreground_distance,
    js_divergence,
    mean_pairwise,
)
from htgrpo.evaluation.grids import CORRECT_RGB, WRONG_RGB, annotated_grid, row_caption, wrap_text
from htgrpo.fit import format_summary_table
from htgrpo.policies.shapes_llada import OraclePolicy
from htgrpo.rewards.shapes import ShapesGenEvalScorer

# conf/world/shapes.yaml's world: 11x11 cells, 5-cell objects on a 2x2 lattice of places
WORLD = ShapesWorldConfig(grid_size=11, cell_px=10, min_object_size=5, max_object_size=5, small_size=5,
                          large_size=5, position_step=6)


def _record(prompt: str, *reqs: GenEvalRequirement, tag: str = "single_object") -> GenEvalRecord:
    return GenEvalRecord(tag, prompt, tuple(reqs))


# ------------------------------------------------------------------------------------------ pure functions


def test_expected_color_mass_named_and_uniform():
    rec = _record("a photo of a red circle and a square", GenEvalRequirement("circle", 1, color="red"),
                  GenEvalRequirement("square", 1), tag="color_attr")
    mass = expected_color_mass(rec)
    assert mass[0] == pytest.approx(1.1)  # red: named once + 1/10 of the unnamed square
    assert np.allclose(mass[1:], 0.1)
    assert mass.sum() == pytest.approx(2.0)
    counting = _record("a photo of three squares", GenEvalRequirement("square", 3), tag="counting")
    assert np.allclose(expected_color_mass(counting), 0.3)


def test_js_divergence_hand_values():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(
        0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25 * math.log2(2))
    assert js_divergence([2, 6], [1, 3]) == pytest.approx(0.0)  # normalised first
    # one colour only against uniform over ten: M = (0.55, 0.05 x 9)
    one_colour = 0.5 * math.log2(1 / 0.55) + 0.5 * (0.1 * math.log2(0.1 / 0.55) + 0.9 * math.log2(2))
    assert js_divergence([1] + [0] * 9, [1] * 10) == pytest.approx(one_colour)
    assert math.isnan(js_divergence([0, 0], [1, 1]))
    with pytest.raises(ValueError):
        js_divergence([1, 0], [1, 0, 0])


def test_foreground_distance_hand_values():
    a = np.zeros((4, 4), dtype=int)
    a[0:2, 0:2] = 1
    shifted = np.zeros_like(a)
    shifted[0:2, 1:3] = 1
    recoloured = np.where(a > 0, 2, 0)
    assert foreground_distance(a, a) == 0.0
    assert foreground_distance(a, shifted) == pytest.approx(1 - 2 / 6)
    assert foreground_distance(a, recoloured) == 1.0
    assert foreground_distance(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_colour_distance_and_mean_pairwise_hand_values():
    assert colour_distance([1, 0], [1, 1]) == pytest.approx(0.5)
    assert colour_distance([0, 0], [0, 0]) == 0.0
    assert colour_distance([0, 0], [0, 3]) == 1.0
    assert mean_pairwise([0, 1, 3], lambda x, y: abs(x - y)) == pytest.approx((1 + 3 + 2) / 3)
    assert math.isnan(mean_pairwise([1], lambda x, y: 0.0))


# ------------------------------------------------------------------------------------- the metric on scenes


def _image(*objects: ShapeObject) -> torch.Tensor:
    return torch.as_tensor(cells_to_image(render_cells(Scene(WORLD.grid_size, tuple(objects))), WORLD.cell_px))


def _prompt(key: str, record: GenEvalRecord) -> BenchmarkPrompt:
    return BenchmarkPrompt("shapes_geneval", key, record.prompt, record.tag, record)


def test_metric_hand_computed_on_two_red_circles():
    """One prompt, two images: a red circle top-left and one top-right; every value computed by hand."""
    bench = Benchmark(ShapesGenEvalPrompts(world=WORLD, per_task=1, seed=43), ShapesGenEvalScorer(WORLD), 2)
    metric = bench.make_diversity_metric()
    rec = _record("a photo of a circle", GenEvalRequirement("circle", 1))
    images = torch.stack([_image(ShapeObject("circle", "red", 0, 0, 5)), _image(ShapeObject("circle", "red", 0, 6, 5))])
    rows = bench.score([_prompt("0", rec)], images, None, metric)
    assert [r["correct"] for r in rows] == [True, True]
    out = metric.compute()
    assert set(out) == set(DIVERSITY_KEYS)
    m = 0.55  # red share of the mixture of "all red" and "uniform over ten"
    expected_js = 0.5 * math.log2(1 / m) + 0.5 * (0.1 * math.log2(0.1 / m) + 0.9 * math.log2(0.1 / 0.05))
    assert out["color_divergence"] == pytest.approx(expected_js)  # 0.758
    assert out["top_color_share"] == 1.0
    assert out["per_prompt"] == 1.0         # the two circles share no cell
    assert out["per_prompt_color"] == 0.0   # both red
    assert out["coverage"] == pytest.approx(21 / 121)  # a 5-cell circle template has 21 cells
    assert out["coverage_ratio"] == pytest.approx(1.0)  # the oracle draws one 5-cell circle too
    assert out["object_size"] == pytest.approx(5.0) and out["object_size_ratio"] == pytest.approx(1.0)
    assert out["objects_per_image"] == 1.0 and out["objects_ratio"] == 1.0
    assert out["stray_share"] == 0.0        # every painted cell is in a detected circle


def test_stray_share_counts_painted_cells_outside_every_object():
    """A 5-cell red circle (21 cells) plus 3 isolated speckle cells of other colours: 3 of 24 painted cells stray."""
    bench = Benchmark(ShapesGenEvalPrompts(world=WORLD, per_task=1, seed=43), ShapesGenEvalScorer(WORLD), 1)
    rec = _record("a photo of a circle", GenEvalRequirement("circle", 1))
    cells = image_to_cells(_image(ShapeObject("circle", "red", 0, 0, 5))[None].numpy(), WORLD.grid_size)
    for (y, x), colour in zip([(9, 9), (9, 1), (1, 9)], ("green", "blue", "white")):
        assert cells[0, y, x] == 0
        cells[0, y, x] = color_index(colour)
    out = _diversity(bench, [_prompt("0", rec)], torch.as_tensor(cells_to_image(cells, WORLD.cell_px)))
    assert out["stray_share"] == pytest.approx(3 / 24)


@pytest.fixture(scope="module")
def oracle_and_collapsed():
    """Oracle images of the benchmark, and the same images with every object painted brown where the prompt names
    no colour (a constructed one-colour collapse that GenEval does not penalise)."""
    bench = Benchmark(ShapesGenEvalPrompts(world=WORLD, per_task=8, seed=43), ShapesGenEvalScorer(WORLD), 4)
    gen = torch.Generator().manual_seed(0)
    prompts = bench.prompts.prompts
    expanded = [p for p in prompts for _ in range(4)]
    oracle = OraclePolicy(WORLD).generate(expanded, gen)
    cells = image_to_cells(oracle.numpy(), WORLD.grid_size)
    brown = color_index("brown")
    for i, p in enumerate(expanded):
        if all(r.color is None for r in p.record.include):
            cells[i][cells[i] > 0] = brown
    collapsed = torch.as_tensor(cells_to_image(cells, WORLD.cell_px))
    return bench, prompts, oracle, collapsed


def _diversity(bench, prompts, images):
    metric = bench.make_diversity_metric()
    bench.score(prompts, images, None, metric)
    return metric.compute()


def test_oracle_is_faithful_and_a_one_colour_collapse_is_seen(oracle_and_collapsed):
    bench, prompts, oracle, collapsed = oracle_and_collapsed
    ref = _diversity(bench, prompts, oracle)
    bad = _diversity(bench, prompts, collapsed)
    assert ref["color_divergence"] < 0.05          # the oracle's colours follow the prompts (finite-sample noise)
    assert ref["coverage_ratio"] == pytest.approx(1.0) and ref["object_size_ratio"] == pytest.approx(1.0)
    assert bad["color_divergence"] > 0.3 and bad["color_divergence"] > 10 * ref["color_divergence"]
    assert bad["top_color_share"] > 0.6 > ref["top_color_share"]
    assert bad["per_prompt_color"] < 0.5 * ref["per_prompt_color"]
    assert bad["per_prompt"] < ref["per_prompt"]
    assert ref["stray_share"] < 0.02 and bad["stray_share"] < 0.02  # clean shapes, whatever their colour


def test_grown_objects_raise_coverage_ratio():
    bench = Benchmark(ShapesGenEvalPrompts(world=WORLD, per_task=1, seed=43), ShapesGenEvalScorer(WORLD), 1)
    rec = _record("a photo of a square", GenEvalRequirement("square", 1))
    big = _image(ShapeObject("square", "brown", 0, 0, 7))  # 49 cells; the oracle's square has 25
    out = _diversity(bench, [_prompt("0", rec)], big[None])
    assert out["coverage_ratio"] == pytest.approx(49 / 25)
    assert out["object_size_ratio"] == pytest.approx(7 / 5)
    two = _image(ShapeObject("square", "brown", 0, 0, 5), ShapeObject("circle", "red", 6, 6, 5))
    assert _diversity(bench, [_prompt("0", rec)], two[None])["objects_ratio"] == 2.0  # an extra, unasked-for object
    assert math.isnan(out["per_prompt"])  # one image per prompt: no pairs


def test_diversity_reuses_the_scorers_detections(monkeypatch):
    bench = Benchmark(ShapesGenEvalPrompts(world=WORLD, per_task=2, seed=43), ShapesGenEvalScorer(WORLD), 2)
    calls = []
    detect = bench.scorer.detector.detect_batch
    monkeypatch.setattr(bench.scorer.detector, "detect_batch", lambda images: calls.append(len(images)) or detect(images))
    report = run_benchmark(bench, OraclePolicy(WORLD), seed=0, progress=False)
    assert sum(calls) == report.num_images  # every image detected once, for GenEval and diversity together
    assert set(report.diversity) == {f"diversity/{k}" for k in DIVERSITY_KEYS}
    assert "diversity/color_divergence" in report.table()


# ----------------------------------------------------------------------------------------------------- grids


def test_row_caption_and_wrap():
    assert row_caption(["a photo of a circle"] * 3, [True, False, True]) == "a photo of a circle  [2/3 correct]"
    assert row_caption(["a", "a", "b"], [None, None, None]) == "a | b"
    assert wrap_text("aa bb cc", 5, len) == ["aa bb", "cc"]
    assert wrap_text("toolongword x", 5, len) == ["toolongword", "x"]


def test_annotated_grid_frames_and_captions():
    images = torch.full((4, 3, 20, 20), 128, dtype=torch.uint8)
    grid = annotated_grid(images, 2, ["p0", "p0", "p1", "p1"], [True, False, None, True], frame=3, gap=4)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[1] == 4 + 2 * (20 + 6 + 4)
    # find the two image rows by the grey pixel column of the first image
    col = grid[:, 4 + 3 + 10]
    grey_rows = np.where((col == 128).all(-1))[0]
    first_top = grey_rows[0]
    assert first_top > 4 + 3  # a caption line sits above the first row
    frame_y = first_top - 1   # the frame's inner line, just above the image
    assert tuple(grid[frame_y, 4 + 10]) == CORRECT_RGB
    assert tuple(grid[frame_y, 4 + 30 + 10]) == WRONG_RGB
    second_top = grey_rows[grey_rows > first_top + 20][0]
    assert tuple(grid[second_top - 1, 4 + 10]) == (255, 255, 255)  # no verdict: no frame
    caption_band = grid[first_top + 23:second_top - 3]
    assert (caption_band.sum(-1) < 300).any()  # dark caption text between the rows
    with pytest.raises(ValueError, match="prompts"):
        annotated_grid(images, 2, ["p0"])


def test_summary_table_lists_benchmark_then_diversity():
    table = format_summary_table({"geneval/overall": 0.3, "diversity/per_prompt": 0.8, "train/x": 1.0},
                                 {"geneval/overall": 0.5, "diversity/per_prompt": 0.6})
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == ["geneval/overall", "diversity/per_prompt", "train/x"]


def test_palette_layout_features_fid_sees_a_collapse(oracle_and_collapsed):
    """FID on the no-download ShapesWorld features: two oracle draws are close, a one-colour collapse is far."""
    from htgrpo.evaluation.diversity import PaletteLayoutFeatures
    from htgrpo.evaluation.fid import fid_from_feats

    bench, prompts, oracle, collapsed = oracle_and_collapsed
    extractor = PaletteLayoutFeatures(grid_size=WORLD.grid_size)

    def feats(images):  # clean-fid's size (bilinear here; clean-fid resizes bicubic)
        return extractor(torch.nn.functional.interpolate(images.float(), size=299, mode="bilinear")).numpy()

    f = feats(oracle)
    assert f.shape == (oracle.shape[0], 4 * 4 * 11)
    assert np.allclose(f.reshape(-1, 11, 16).sum(1), 1.0)  # colour-major: the shares of each block sum to 1
    # features read the cells back exactly: the background share equals the grid's
    cells = image_to_cells(oracle.numpy(), WORLD.grid_size)
    assert f[:, :16].mean() == pytest.approx((cells == 0).mean(), abs=0.02)
    expanded = [p for p in prompts for _ in range(4)]
    again = OraclePolicy(WORLD).generate(expanded, torch.Generator().manual_seed(1))
    fid_oracle = fid_from_feats(feats(again), f)
    fid_collapsed = fid_from_feats(feats(collapsed), f)
    assert fid_collapsed > 3 * fid_oracle
