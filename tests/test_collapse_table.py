"""experiments/shapes_geneval/collapse.py: run folders -> JSON rows -> the β trade-off table (issue 19, item 3), on
hand-made run folders whose gains, ratios and verdicts are known by construction."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from conftest import REPO_ROOT, load_script

STUDY = REPO_ROOT / "experiments" / "shapes_geneval"
sys.path.insert(0, str(STUDY))  # collapse imports gain from its own folder
collapse = load_script("study_collapse", STUDY / "collapse.py")

PROMPTS = {"colors": ["00000", "00001"], "counting": ["00002", "00003"]}


def _fake_run(root, name, seed, beta, correct_before, correct_after, divergence, per_prompt, lr=1e-4):
    """A fit run folder: 2 tasks × 2 prompts × 2 images, every image correct iff ``correct_*``."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "algorithm": {"beta": beta, "lr": lr}, "trainer": {"max_steps": 40}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for stage, ok in (("start", correct_before), ("end", correct_after)):
        with open(run / f"val_{stage}_images.jsonl", "w") as fh:
            for task, keys in PROMPTS.items():
                for key in keys:
                    for index in range(2):
                        fh.write(json.dumps({"key": key, "image_index": index, "tag": task, "correct": ok}) + "\n")
    summary = {"val_start": {"geneval/overall": float(correct_before), "diversity/color_divergence": divergence[0],
                             "diversity/per_prompt": per_prompt[0]},
               "val_end": {"geneval/overall": float(correct_after), "diversity/color_divergence": divergence[1],
                           "diversity/per_prompt": per_prompt[1]},
               "steps": 40, "seconds": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _rows(tmp_path, runs):
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    for run in runs:
        row = collapse.collect_run(run, None)
        (rows_dir / f"{row['setting']}_s{row['seed']}.json").write_text(json.dumps(row))
    return [collapse.load_row(p) for p in sorted(rows_dir.glob("*.json"))]


def test_meets_target_boundaries():
    assert collapse.meets_target(0.10, 0.01, 1.10, 0.90)
    assert not collapse.meets_target(0.099, 0.01, 1.0, 1.0)  # gain below +0.10
    assert not collapse.meets_target(0.2, 0.0, 1.0, 1.0)  # interval touches 0
    assert not collapse.meets_target(0.2, 0.1, 1.11, 1.0)  # colour divergence 11% above the warm start's
    assert not collapse.meets_target(0.2, 0.1, 1.0, 0.89)  # per-prompt diversity 11% below


def test_table_gain_interval_ratios_and_verdicts(tmp_path):
    runs = [
        # β = 0.3: every image wrong -> right (gain 1 in every resample), diversity within the band
        _fake_run(tmp_path, "b3_s0", 0, 0.3, False, True, (0.020, 0.021), (0.80, 0.76)),
        _fake_run(tmp_path, "b3_s1", 1, 0.3, False, True, (0.020, 0.021), (0.80, 0.76)),
        # the default β: the same gain, but collapsed colours (only the diversity band fails it)
        _fake_run(tmp_path, "d_s0", 0, 0.01, False, True, (0.020, 0.200), (0.80, 0.60)),
        _fake_run(tmp_path, "d_s1", 1, 0.01, False, True, (0.020, 0.200), (0.80, 0.60)),
    ]
    text = collapse.table(_rows(tmp_path, runs), resamples=200)
    beta3 = next(line for line in text.splitlines() if line.startswith("| beta0.3 (0.3) | 0, 1 |"))
    default = next(line for line in text.splitlines() if line.startswith("| plain (0.01, reference) | 0, 1 |"))
    assert "+1.000 [+1.000, +1.000]" in beta3
    assert "+0.000 [+0.000, +0.000] (seeds 0, 1)" in beta3  # gain minus the default's, paired by seed
    assert "0.0200 → 0.0210 (1.05;" in beta3 and "0.8000 → 0.7600 (0.95;" in beta3
    assert beta3.endswith("| – | – | yes (2 seeds) |")  # the fake runs log neither colors nor stray_share
    assert "| +1.000 [+1.000, +1.000] | – |" in default and "(10.00;" in default and "(0.75;" in default
    assert default.endswith("| no (2 seeds) |")
    assert "| beta0.3 (0.3) | 1 | 0.000 → 1.000 (+1.000) |" in text
    assert text.splitlines()[2].startswith("| setting (β) |") and text.splitlines()[4].startswith("| plain (")


def test_setting_names_from_the_config():
    name = collapse.setting_name
    assert name({"algorithm": {"beta": 0.01}}) == "plain"  # a run made before the bonus and schedule keys existed
    assert name({"algorithm": {"beta": 0.3, "lr_schedule": "constant"}}) == "beta0.3"
    main = {"beta": 0.01, "lr_schedule": "cosine", "diversity_bonus": {"weight": 1.0, "scope": "group"}}
    assert name({"algorithm": main}) == "bonus1+cosine"  # the main command
    both = {"beta": 0.1, "diversity_bonus": {"weight": 0.5, "scope": "batch"}, "lr_schedule": "linear"}
    assert name({"algorithm": both}) == "beta0.1_bonus0.5_batch+linear"
    assert name({"algorithm": {"beta": 0.01, "diversity_bonus": {"weight": 0.0}}}) == "plain"


def test_reference_is_named_not_guessed_from_beta(tmp_path):
    # two settings at the same β (a method table): the reference is the one named, and listed first
    runs = [_fake_run(tmp_path, "a_s0", 0, 0.01, False, True, (0.02, 0.02), (0.8, 0.8)),
            _fake_run(tmp_path, "b_s0", 0, 0.01, False, False, (0.02, 0.02), (0.8, 0.8))]
    rows = []
    for run, name in zip(runs, ("MaskGRPO", "HT-GRPO")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(collapse.collect_run(run, name)))
        rows.append(collapse.load_row(path))
    rows[0].val_end["geneval/colors"] = 0.5  # one of the two settings logged colors and stray_share
    rows[0].val_end["diversity/stray_share"] = 0.125
    text = collapse.table(rows, resamples=50, reference="HT-GRPO", title="by method")
    lines = text.splitlines()
    assert lines[0].startswith("by method;") and "gain − HT-GRPO's" in lines[2]
    assert lines[4].startswith("| HT-GRPO (0.01, reference) | 0 | +0.000") and "| – |" in lines[4]
    assert lines[5].startswith("| MaskGRPO (0.01) | 0 | +1.000") and "+1.000 [+1.000, +1.000] (seeds 0)" in lines[5]
    assert lines[5].endswith("| 0.500 | 0.125 | yes (1 seed) |") and lines[4].endswith("| – | – | no (1 seed) |")


def test_runs_of_one_setting_must_differ_only_in_seed(tmp_path):
    runs = [_fake_run(tmp_path, "a", 0, 0.3, False, True, (0.02, 0.02), (0.8, 0.8)),
            _fake_run(tmp_path, "b", 1, 0.3, False, True, (0.02, 0.02), (0.8, 0.8), lr=3e-4)]
    with pytest.raises(SystemExit, match="algorithm.lr"):
        collapse.table(_rows(tmp_path, runs), resamples=10)


def test_collapse_curves_read_tensorboard_and_average_seeds(tmp_path):
    """Two fake runs' TensorBoard events (logged per optimiser step, with train/rollout_step beside them): the
    curves are read by rollout step, averaged over the runs, and tabulated at the asked steps."""
    from torch.utils.tensorboard import SummaryWriter

    import collapse_curves

    runs = []
    for k, offset in enumerate((0.0, 0.2)):
        run = tmp_path / f"run{k}"
        writer = SummaryWriter(str(run / "tensorboard"))
        for t in range(4):  # rollout step t logged at optimiser step 6t (K = 6 updates per rollout batch)
            writer.add_scalar("train/rollout_step", float(t), 6 * t)
            writer.add_scalar("train/diversity/group_color_distance", 0.1 * t + offset, 6 * t)
            writer.add_scalar("train/diversity/batch_color_distance", 0.5 + offset, 6 * t)
            writer.add_scalar("time/rollout_s", 10.0 + k, 6 * t)
            if k == 0:
                writer.add_scalar("train/diversity/top_color_pixel_share", 0.05 * t, 6 * t)
        writer.close()
        runs.append(collapse_curves.read_curves(run))
    assert runs[0]["train/diversity/group_color_distance"].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    mean = collapse_curves.mean_curves(runs)
    assert mean["train/diversity/group_color_distance"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert collapse_curves.TOP_SHARE not in mean  # only one of the two runs logged it
    text = collapse_curves.table({"X": mean}, {"X": 2}, [0, 3, 9])
    assert "| X | 2 | within prompt | 0.100 | 0.400 | – |" in text
    assert "| X | 2 | across batch | 0.600 | 0.600 | – |" in text
    assert "| X | 40 / 44 |" in collapse_curves.rollout_seconds({"X": runs})  # 4 steps x 10 s, 4 x 11 s
    with pytest.raises(SystemExit, match="no TensorBoard events"):
        collapse_curves.read_curves(tmp_path / "empty")


def test_seed_interval_is_a_t_interval():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    assert collapse.seed_interval([1.0, 2.0, 3.0], 3) == "2.000 [-0.484, 4.484]"
    assert collapse.seed_interval([0.5], 2) == "0.50" and collapse.seed_interval([], 2) == "–"


def test_keys_without_effect_do_not_split_a_setting():
    constant = {"algorithm.lr_schedule": "constant", "algorithm.diversity_bonus.weight": 0.0}
    assert collapse.inert("algorithm.lr_min_ratio", constant)  # no decay: its floor does nothing
    assert collapse.inert("algorithm.diversity_bonus.scope", constant)  # bonus off: its scope does nothing
    cosine = {"algorithm.lr_schedule": "cosine", "algorithm.diversity_bonus.weight": 1.0}
    assert not collapse.inert("algorithm.lr_min_ratio", cosine)
    assert not collapse.inert("algorithm.diversity_bonus.scope", cosine)
    assert not collapse.inert("algorithm.lr", constant)
