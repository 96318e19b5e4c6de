"""The credit-assignment sweep runs as a Hydra multirun and its summariser tabulates and plots the jobs."""

from __future__ import annotations

import csv
import json

from conftest import REPO_ROOT, load_script
from test_cli import run_cli
from test_ht_grpo import TINY_RL

summarize_module = load_script("sweep_summarize", REPO_ROOT / "sweeps" / "summarize.py")


def test_tiny_credit_sweep_runs_and_summarises(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli("htgrpo.fit", ["-m", "--config-dir", str(REPO_ROOT / "sweeps"), "+sweep=credit_assignment",
                           "algorithm.credit.alpha=0.0,2.0", "algorithm.partition.fraction=0.25",
                           "algorithm.partition.key=decode_step", "+stages=g2s4",
                           *(o for o in TINY_RL if not o.startswith("algorithm.stages.")),
                           "validate_at_end=true", "trainer.limit_train_batches=1", f"hydra.sweep.dir={sweep_dir}"],
            tmp_path)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_alpha0.0_frac0.25_decode_step_g2s4", "1_alpha2.0_frac0.25_decode_step_g2s4"]
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 1 and "geneval/overall" in summary["val_end"]
        config = (job / ".hydra" / "config.yaml").read_text()
        assert "n_struct: 4" in config  # the +stages layout reached the algorithm

    paths = summarize_module.summarize(sweep_dir)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["algorithm.credit.alpha"] for r in rows] == ["0.0", "2.0"]  # the swept key; fixed ones are not columns
    assert "algorithm.partition.key" not in rows[0]
    for row, job in zip(rows, jobs):
        end = json.loads((job / "summary.json").read_text())["val_end"]["geneval/overall"]
        assert float(row["end geneval/overall"]) == round(end, 4) and row["status"] == "ok"
    md = paths["md"].read_text()
    assert "Mean final `geneval/overall` by `algorithm.credit.alpha`" in md
    assert paths["png"].stat().st_size > 1000


def test_summary_marks_a_crashed_job(tmp_path):
    for num, alpha, finished in [(0, "0.5", True), (1, "1.0", False)]:
        job = tmp_path / f"{num}_job"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- algorithm.credit.alpha={alpha}\n- seed=3\n")
        if finished:
            (job / "summary.json").write_text(json.dumps(
                {"val_start": {"geneval/overall": 0.2}, "val_end": {"geneval/overall": 0.35}, "steps": 4,
                 "seconds": 1.0}))
    paths = summarize_module.summarize(tmp_path, out_dir=tmp_path / "out")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["change"] == "0.1500" and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "missing summary.json" and rows[1]["end geneval/overall"] == ""
    assert "`seed=3`" in paths["md"].read_text()  # same on every job: listed as fixed


def test_optuna_sweep_searches_the_credit_space(tmp_path):
    """`+sweep=credit_assignment_optuna` runs Optuna trials through htgrpo.fit (each returns its final overall) and
    Optuna records the best of them; the trial folders summarise like the grid's."""
    import pytest
    import yaml

    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[sweep]'")
    sweep_dir = tmp_path / "optuna"
    run_cli("htgrpo.fit", ["-m", "--config-dir", str(REPO_ROOT / "sweeps"), "+sweep=credit_assignment_optuna",
                           "hydra.sweeper.n_trials=2", *(o for o in TINY_RL if not o.startswith("algorithm.stages.")),
                           "validate_at_end=true", "trainer.limit_train_batches=1", f"hydra.sweep.dir={sweep_dir}"],
            tmp_path)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"algorithm.credit.alpha", "algorithm.partition.fraction",
                                        "algorithm.partition.key", "+stages"}
    finals = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        assert 0.0 <= float(overrides["algorithm.credit.alpha"]) <= 2.0
        assert 0.1 <= float(overrides["algorithm.partition.fraction"]) <= 0.5
        finals.append(json.loads((job / "summary.json").read_text())["val_end"]["geneval/overall"])
    assert len(finals) == 2 and best["best_value"] == pytest.approx(max(finals))
    rows = list(csv.DictReader(open(summarize_module.summarize(sweep_dir)["csv"])))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)


def test_pivot_table_means_the_change_per_cell(tmp_path):
    # 2 fractions x 2 alphas x 2 seeds; change = end - start, start 0.3 everywhere
    changes = {("0.1", "0.0"): [0.10, 0.20], ("0.1", "1.0"): [0.0, 0.0], ("0.5", "0.0"): [-0.1, 0.1],
               ("0.5", "1.0"): [0.3, 0.1]}
    num = 0
    for (frac, alpha), cell in changes.items():
        for seed, change in enumerate(cell):
            job = tmp_path / f"{num}_job"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(
                f"- algorithm.partition.fraction={frac}\n- algorithm.credit.alpha={alpha}\n- seed={seed}\n")
            (job / "summary.json").write_text(json.dumps(
                {"val_start": {"geneval/overall": 0.3}, "val_end": {"geneval/overall": 0.3 + change}, "steps": 4,
                 "seconds": 1.0}))
            num += 1
    paths = summarize_module.summarize(tmp_path, pivot=("algorithm.partition.fraction", "algorithm.credit.alpha"))
    md = paths["md"].read_text()
    assert "| 0.1 | +0.150 ± 0.071 (n=2) | +0.000 ± 0.000 (n=2) | +0.075 |" in md
    assert "| 0.5 | +0.000 ± 0.141 (n=2) | +0.200 ± 0.141 (n=2) | +0.100 |" in md
    assert "| column mean | +0.075 | +0.100 | |" in md
    assert paths["pivot_png"].stat().st_size > 1000
