"""The study's statistics: the paired bootstrap difference between two methods' gains (hand-computed cases) and the
gain / significance table make_table.py writes from the runs' per-image validation files; the stratified task
schedule of the ShapesWorld prompt stream that steadies the rollout reward."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import REPO_ROOT, load_script

STUDY = REPO_ROOT / "experiments" / "shapes_geneval"
sys.path.insert(0, str(STUDY))  # make_table imports gain from its own folder


gain = load_script("study_gain", STUDY / "gain.py")
make_table = load_script("study_make_table_stats", STUDY / "make_table.py")

KEYS = {"colors": ["00000", "00001"], "counting": ["00002", "00003"]}


def _shares(colors, counting):
    return {"colors": np.array(colors, dtype=float), "counting": np.array(counting, dtype=float)}


def test_paired_difference_by_hand():
    zero = _shares([0, 0], [0, 0])
    # a: every prompt goes 0 -> 1 (gain 1); b: nothing changes (gain 0). Every resample gives d = 1.
    a = ([zero], [_shares([1, 1], [1, 1])])
    b = ([zero], [zero])
    point, lo, hi, p = gain.paired_difference(a, b, KEYS, resamples=200)
    assert (point, lo, hi, p) == (1.0, 1.0, 1.0, 0.0)
    # a method against itself: d = 0 in every resample, p = 1
    point, lo, hi, p = gain.paired_difference(a, a, KEYS, resamples=200)
    assert (point, lo, hi, p) == (0.0, 0.0, 0.0, 1.0)
    # one prompt of one task flips: overall gain = mean over tasks of the task means = (1/2) / 2 = 0.25
    c = ([zero], [_shares([1, 0], [0, 0])])
    point, lo, hi, p = gain.paired_difference(c, b, KEYS, resamples=2000)
    assert point == pytest.approx(0.25)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(0.5)  # colours resampled: 0, 1 or 2 copies of the flip
    assert 0.4 < p <= 1.0  # P(d <= 0) = P(no copy of the flipped prompt) = 1/4: p ~ 0.5
    with pytest.raises(ValueError, match="same seeds"):
        gain.paired_difference(a, ([zero, zero], [zero, zero]), KEYS, resamples=10)


def _write_run(study, method, seed, correct_before, correct_after):
    run = study / method / f"seed{seed}"
    run.mkdir(parents=True)
    for name, correct in (("val_start_images.jsonl", correct_before), ("val_end_images.jsonl", correct_after)):
        with open(run / name, "w") as fh:
            for (task, keys) in KEYS.items():
                for key in keys:
                    for image in range(2):
                        fh.write(json.dumps({"key": key, "image_index": image, "tag": task,
                                             "correct": bool(correct(key, image))}) + "\n")
    (run / "summary.json").write_text(json.dumps({"val_start": {"geneval/overall": 0.0},
                                                  "val_end": {"geneval/overall": 0.5}, "steps": 1, "seconds": 1}))


def test_gain_table_tests_every_method_against_ht_grpo(tmp_path):
    study = tmp_path / "study"
    for seed in (0, 1):
        _write_run(study, "HT-GRPO", seed, lambda k, i: False, lambda k, i: True)  # 0 -> 1
        _write_run(study, "GRPO", seed, lambda k, i: False, lambda k, i: False)  # 0 -> 0
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_table.GAIN_START}\nold\n{make_table.GAIN_END}\nrest\n")
    text = make_table.write_gains(study, readme, resamples=300)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| GRPO | 0,1 | +0.000 | [+0.000, +0.000] | -1.000 | [-1.000, -1.000] | 0.000 | yes, lower |" in text
    assert rows["HT-GRPO"].startswith("| HT-GRPO | 0,1 | +1.000 | [+1.000, +1.000] | – |")
    assert "8 validation images per evaluation, 4 prompts" in text
    doc = readme.read_text()
    assert doc.startswith("intro\n") and doc.endswith("rest\n") and "old" not in doc and "yes, lower" in doc


def test_stratified_schedule_gives_every_block_each_task_once():
    from htgrpo.config import ConfigError
    from htgrpo.data.prompt_sets import ShapesPromptStream
    from htgrpo.data.shapes.palette import ShapesWorldConfig

    world = ShapesWorldConfig.roomy(grid_size=11, min_object_size=5, max_object_size=5, small_size=5, large_size=5,
                              position_step=6)
    stream = ShapesPromptStream(world, seed=3, task_schedule="stratified")
    assert stream.block_size == 6
    blocks = [[stream[b * 6 + i].prompt.group for i in range(6)] for b in range(4)]
    assert all(Counter(block) == Counter(stream.tasks) for block in blocks)
    assert len({tuple(block) for block in blocks}) > 1  # the order within a block is shuffled per block
    assert [stream[i].prompt.group for i in range(6)] == blocks[0]  # index-addressable: same example every time
    weighted = ShapesPromptStream(world, seed=3, task_weights={"counting": 2, "colors": 1}, task_schedule="stratified")
    assert Counter(weighted[i].prompt.group for i in range(9)) == {"counting": 6, "colors": 3}
    with pytest.raises(ConfigError, match="whole-number"):
        ShapesPromptStream(world, task_weights={"counting": 1.5, "colors": 1}, task_schedule="stratified")
    with pytest.raises(ConfigError, match="task_schedule"):
        ShapesPromptStream(world, task_schedule="roundrobin")
    # random (the default) keeps its draws: the same prompts as before the schedule existed
    assert ShapesPromptStream(world, seed=3)[5].prompt.prompt == ShapesPromptStream(world, seed=3, task_schedule="random")[5].prompt.prompt
