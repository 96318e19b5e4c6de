"""The toy-MAR parts of the ShapesWorld study: merged study folders, the stability figures (hand-computed), and the
MAR warm start's cosine mask-rate schedule."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import REPO_ROOT

STUDY = REPO_ROOT / "experiments" / "shapes_geneval"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, STUDY / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_table = _load("study_make_table_mar", "make_table.py")
stability = _load("study_stability", "stability.py")


def _run(study, method, seed, start, end, dpg=None, rewards=None):
    run = study / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"val_start": {"geneval/overall": start},
                                                  "val_end": {"geneval/overall": end}, "steps": 3, "seconds": 9}))
    if dpg is not None:
        (run / "dpg").mkdir()
        (run / "dpg" / "dpg_results.json").write_text(json.dumps({"overall": dpg}))
    if rewards is not None:  # real TensorBoard events, as a fit run writes them
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tensorboard"))
        for step, value in enumerate(rewards):
            writer.add_scalar(stability.REWARD_TAG, value, step)
        writer.close()
    return run


def test_table_merges_the_llada_and_mar_study_folders(tmp_path):
    llada, mar = tmp_path / "study", tmp_path / "study_mar"
    _run(llada, "HT-GRPO", 0, 0.10, 0.30)
    _run(mar, "MAR-GRPO", 0, 0.40, 0.50, dpg=60.0)
    _run(mar, "MAR-GRPO", 1, 0.40, 0.60, dpg=70.0)
    _run(mar, "MAR-GRPO_plain", 0, 0.40, 0.45)
    base = mar / "MAR_base" / "seed0" / "dpg"
    base.mkdir(parents=True)
    (base / "dpg_results.json").write_text(json.dumps({"overall": 55.0}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{make_table.START}\n{make_table.END}\n")
    table = make_table.write_table([llada, mar], readme)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["Base (warm start)", "HT-GRPO", "MAR base (warm start)", "MAR-GRPO plain", "MAR-GRPO"]
    assert "**0.400 ± 0.000**" in rows["MAR base (warm start)"] and "55.0" in rows["MAR base (warm start)"]
    assert "**0.100**" in rows["Base (warm start)"]  # the LLaDA base is not mixed with the MAR base
    assert "**0.550 ± 0.071**" in rows["MAR-GRPO"] and "0.150 ± 0.071" in rows["MAR-GRPO"]  # Δ vs the MAR base
    assert "65.0 ± 7.1" in rows["MAR-GRPO"]


def test_mar_rows_get_their_own_table_and_leave_the_other_one_alone(tmp_path):
    mar = tmp_path / "study_mar"
    _run(mar, "MAR-GRPO", 0, 0.40, 0.50)
    readme = tmp_path / "README.md"
    readme.write_text(f"{make_table.START}\nLLaDA rows\n{make_table.END}\nx\n{make_table.MAR_START}\nold\n"
                      f"{make_table.MAR_END}\n")
    make_table.write_table([mar], readme)
    text = readme.read_text()
    assert "LLaDA rows" in text and "old" not in text  # only the MAR table was rewritten
    mar_part = text.split(make_table.MAR_START)[1]
    assert "| MAR base (warm start) |" in mar_part and "| MAR-GRPO |" in mar_part
    llada = tmp_path / "study"
    _run(llada, "HT-GRPO", 0, 0.10, 0.30)
    make_table.write_table([llada, mar], readme)
    main_part = readme.read_text().split(make_table.START)[1].split(make_table.END)[0]
    assert "| HT-GRPO |" in main_part and "MAR" not in main_part


def test_stability_figures_by_hand():
    assert stability.across_seed_spread([[0.0, 1.0], [2.0, 1.0]]) == pytest.approx(math.sqrt(2) / 2)
    assert stability.step_jitter([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(4 / 3) / math.sqrt(2))
    assert stability.drift([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5)
    assert math.isnan(stability.step_jitter([1.0, 2.0])) and math.isnan(stability.across_seed_spread([[1.0]]))


def _validations(run, before, after):
    """Per-image validation rows as fit writes them: one prompt per entry, one image each, all single_object."""
    for name, oks in (("val_start", before), ("val_end", after)):
        rows = [{"key": f"p{i}", "image_index": 0, "tag": "single_object", "correct": bool(ok)}
                for i, ok in enumerate(oks)]
        (run / f"{name}_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"seed: {int(run.name[4:])}\nalgorithm:\n  beta: 0.01\n")


def test_spread_ratio_and_rms_by_hand():
    ratio, lo, hi = stability.std_ratio_interval(2.0, 1.0, 1, 1)
    assert ratio == pytest.approx(2.0)
    assert lo == pytest.approx(2.0 / math.sqrt(647.79), rel=1e-3) and hi == pytest.approx(2.0 * math.sqrt(647.79), rel=1e-3)
    assert stability.rms_spread([[0.0, 1.0], [2.0, 1.0]]) == pytest.approx(1.0)


def test_stability_rows_from_runs_then_tables(tmp_path):
    study = tmp_path / "study_mar"
    # (method, seed, overall before/after in the summary, rollout rewards, per-image verdicts before/after)
    runs = [("MAR-GRPO", 0, 0.5, 1.0, [0.1, 0.3, 0.2], [1, 0], [1, 1]),
            ("MAR-GRPO", 1, 0.0, 0.5, [0.3, 0.3, 0.4], [0, 0], [1, 0]),
            ("MAR-GRPO_plain", 0, 0.5, 0.5, [0.0, 0.5, 0.0], [1, 0], [1, 0]),
            ("MAR-GRPO_plain", 1, 0.0, 0.0, [0.2, 0.2, 0.3], [0, 0], [0, 0])]
    for method, seed, start, end, rewards, before, after in runs:
        run = _run(study, method, seed, start, end, rewards=rewards)
        summary = json.loads((run / "summary.json").read_text())
        summary["val_end"]["diversity/stray_share"] = 0.1 if method == "MAR-GRPO" else 0.2 + 0.1 * seed
        (run / "summary.json").write_text(json.dumps(summary))
        _validations(run, before, after)
    (study / "MAR_base" / "seed0" / "dpg").mkdir(parents=True)  # the warm start's DPG folder is not a run
    rows = tmp_path / "rows"
    assert len(stability.collect(study, rows)) == 4
    assert sorted(p.name for p in rows.iterdir())[0] == "MAR-GRPO_plain_s0.json"
    by_method = stability.load_runs(rows)
    assert by_method["MAR-GRPO"][0].reward_curve == pytest.approx([0.1, 0.3, 0.2])  # read back from TensorBoard
    s = stability.method_stability(by_method["MAR-GRPO"], resamples=200)
    # gain per seed: 1.0 - 0.5 and 0.5 - 0 -> mean 0.5, sd 0 -> t half-width 0
    assert s["delta"] == pytest.approx((0.5, 0.0)) and s["seeds"] == 2 and s["steps"] == 3
    assert 0.0 <= s["gain_bootstrap"][1] <= 0.5 <= s["gain_bootstrap"][2] <= 1.0
    # per-step std over the 2 seeds: |a - b| / sqrt(2) -> (0.2, 0, 0.2) / sqrt(2), mean 0.0943
    assert s["curve_spread"] == pytest.approx((0.2 + 0.0 + 0.2) / math.sqrt(2) / 3)
    assert s["final_std"] == pytest.approx(0.5 / math.sqrt(2)) and s["final_range"] == pytest.approx(0.5)
    readme = tmp_path / "README.md"
    start, end = stability.markers()
    readme.write_text(f"a\n{start}\nold\n{end}\nb\n")
    text = stability.write_table(by_method, list(stability.METHODS), readme, resamples=200)
    assert readme.read_text().startswith("a\n") and "old" not in readme.read_text()
    tagged_start, tagged_end = stability.markers("lr3e-4")
    readme.write_text(f"{start}\nkept\n{end}\n{tagged_start}\nold\n{tagged_end}\n")
    stability.write_table(by_method, list(stability.METHODS), readme, resamples=50, tag="lr3e-4")
    assert "kept" in readme.read_text() and "old" not in readme.read_text()  # only the tagged table was rewritten
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # gains: MAR-GRPO 0.5, 0.5; plain 0, 0 -> paired differences 0.5, 0.5: resolved
    assert "+0.500 [+0.500, +0.500] | yes" in lines["GenEval Δ overall (prompts fixed)"]
    # mean rewards 0.2, 0.333 against 0.167, 0.233 -> differences 0.033, 0.1 -> mean 0.0667
    assert "| 0.267 | 0.200 | +0.067 [" in lines["mean rollout reward"]
    # stray_share 0.1, 0.1 against 0.2, 0.3 -> differences -0.1, -0.2: mean -0.15, half 12.706 * 0.0707 / 1.414
    assert "-0.150 [-0.785, +0.485] | no" in lines["stray_share after training"]
    # final overall sd: MAR-GRPO 0.354, plain 0.354 -> ratio 1
    assert "| 0.354 | 0.354 | ×1.00 [" in lines["final-overall spread across seeds (sd)"]


def test_cosine_mask_rate_by_hand():
    from htgrpo.algorithms.mar_pretrain import cosine_mask_rate

    assert cosine_mask_rate(0.0, 121) == pytest.approx(1.0)
    assert cosine_mask_rate(2 / 3, 121) == pytest.approx(0.5)
    assert cosine_mask_rate(0.999999, 121) == pytest.approx(1 / 121)  # at least one masked token


def test_mar_warm_start_mask_schedule_key(tmp_path):
    from htgrpo.algorithms.mar_pretrain import MARPretraining
    from htgrpo.config import ConfigError
    from htgrpo.data.shapes.palette import ShapesWorldConfig
    from htgrpo.policies.mar.sampling import MARSamplerSettings
    from htgrpo.policies.mar.shapes import ShapesMARPolicy

    world = ShapesWorldConfig.roomy(grid_size=8, cell_px=2, min_object_size=4, max_object_size=4, small_size=4,
                              large_size=4)
    policy = ShapesMARPolicy.toy(world, d_model=16, n_layers=1, n_heads=2, buffer_size=4, text_max_len=4,
                                 text_width=16, text_heads=2, head_width=16, head_depth=1)
    with pytest.raises(ConfigError, match="mask_schedule"):
        MARPretraining(policy, sampler=MARSamplerSettings(), mask_schedule="linear")
    module = MARPretraining(policy, sampler=MARSamplerSettings(), mask_schedule="cosine")
    rates = [module.draw_mask_rate() for _ in range(200)]
    assert min(rates) >= 1 / 64 and max(rates) <= 1.0 and min(rates) < 0.3  # low rates MAR's draw never gives
    assert MARPretraining(policy, sampler=MARSamplerSettings()).draw_mask_rate() is None  # LTH14's own draw
    tokens = torch.zeros(2, 64, 3)
    out = policy.training_loss(tokens, policy.encode_prompts(["a red circle", "two squares"]), mask_rate=0.25)
    assert out.mask_ratio == pytest.approx(16 / 64)
