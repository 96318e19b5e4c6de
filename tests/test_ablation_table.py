"""experiments/shapes_geneval/ablation_table.py: finished ablation runs -> committed JSON rows -> the table of each row
against HT-GRPO (paired by seed, prompts fixed), on hand-made run folders whose gains are known by construction."""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from conftest import REPO_ROOT, load_script

STUDY = REPO_ROOT / "experiments" / "shapes_geneval"
sys.path.insert(0, str(STUDY))
ablation = load_script("study_ablation_table", STUDY / "ablation_table.py")

KEYS = ["00000", "00001", "00002", "00003"]  # one task, 4 prompts x 2 images: gains in steps of 1/8


def _fake_run(study, method, seed, correct_after: int, divergence=(0.02, 0.04), colors=0.5):
    """A finished fit run under ``study/<method>/seed<k>/``: nothing correct before, the first ``correct_after`` of the
    8 validation images correct after."""
    run = study / method.replace(" ", "_") / f"seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "algorithm": {"beta": 0.01},
                                                                      "benchmark": {"images_per_prompt": 2}}))
    for stage, n_ok in (("start", 0), ("end", correct_after)):
        with open(run / f"val_{stage}_images.jsonl", "w") as fh:
            for i, key in enumerate(KEYS):
                for index in range(2):
                    fh.write(json.dumps({"key": key, "image_index": index, "tag": "colors",
                                         "correct": 2 * i + index < n_ok}) + "\n")
    summary = {"val_start": {"diversity/color_divergence": divergence[0], "diversity/per_prompt": 0.8,
                             "geneval/colors": 0.5, "diversity/stray_share": 0.1},
               "val_end": {"diversity/color_divergence": divergence[1], "diversity/per_prompt": 0.6,
                           "geneval/colors": colors, "diversity/stray_share": 0.2},
               "steps": 40, "seconds": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))


def test_seeds_needed_and_t_interval_by_hand():
    # sd 0.03: t(0.975, 5)/sqrt(6) = 2.571/2.449 > 1, t(0.975, 6)/sqrt(7) = 2.447/2.646 < 1 -> 7 seeds
    assert ablation.seeds_needed(0.03) == 7
    assert ablation.seeds_needed(0.0) == 2 and ablation.seeds_needed(float("nan")) is None
    mean, half = ablation.t_interval([0.0, 0.25, 0.0])
    assert mean == pytest.approx(0.25 / 3)
    assert half == pytest.approx(4.302653 * 0.1443376 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ablation.t_interval([0.1])[1])


def test_image_noise_variance_by_hand():
    import numpy as np

    # one task, two prompts at 2 images, shares 0.5 and 1: (0.5 * 0.5 / 1 + 0) / 2**2 = 0.0625
    assert ablation.image_noise_variance({"colors": np.array([0.5, 1.0])}, 2) == pytest.approx(0.0625)
    # two tasks: the mean over tasks divides by T**2 = 4
    two = {"colors": np.array([0.5, 1.0]), "position": np.array([0.5, 0.5])}
    assert ablation.image_noise_variance(two, 2) == pytest.approx((0.0625 + 0.125) / 4)
    assert math.isnan(ablation.image_noise_variance(two, 1))


def test_table_pairs_rows_with_ht_grpo_by_seed(tmp_path):
    study = tmp_path / "logs" / "ablation"
    for seed, (ht, a0, grpo) in enumerate([(4, 5, 4), (4, 5, 6), (6, 7, 6)]):
        _fake_run(study, "HT-GRPO", seed, ht)
        _fake_run(study, "HT-GRPO alpha 0", seed, a0, divergence=(0.02, 0.08), colors=0.25)
        _fake_run(study, "GRPO", seed, grpo)
    _fake_run(study, "GRPO", 7, 8)  # no HT-GRPO seed 7: not paired
    rows = tmp_path / "rows"
    assert len(ablation.collect(study, rows)) == 10
    assert (rows / "HT-GRPO_alpha_0_s2.json").exists()
    text = ablation.table(ablation.load_rows(rows), resamples=200)
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    # alpha 0: every seed exactly +1/8 above HT-GRPO -> half-width 0, 2 seeds suffice; colour divergence 4x the warm's
    a0 = lines["HT-GRPO alpha 0"]
    assert a0[1] == "3" and a0[3].startswith("+0.125 [+0.125, +0.125]") and a0[4].startswith("±0.000 ✓")
    assert a0[6] == "2" and a0[7] == "–"  # no paired variance to share out
    assert a0[8].startswith("0.0800 (4.00×)") and a0[10] == "0.250"
    # GRPO: differences 0, +0.25, 0 over the paired seeds 0-2 (seed 7 has no partner): mean +0.083, t half-width 0.359
    grpo = lines["GRPO"]
    assert grpo[1] == "4" and grpo[3].startswith("+0.083 [-0.275, +0.442]") and grpo[4] == "±0.359"
    assert grpo[7] == "0.00"  # every GRPO / HT-GRPO prompt has 0 or 2 of 2 images correct: no image noise
    assert lines["HT-GRPO"][3] == "–"
    assert "Widest paired half-width (prompts fixed): ±0.359" in text
