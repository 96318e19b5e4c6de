"""End-to-end smoke runs of the two entry points, as a user types them (tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SMALL_GENEVAL = ["benchmark.prompts.per_task=6", "benchmark.images_per_prompt=2"]
SMALL_DPG = ["benchmark.prompts.num_prompts=12", "benchmark.images_per_prompt=2"]


def run_cli(module: str, args: list[str], tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_evaluate_oracle_geneval_scores_one(tmp_path):
    out = tmp_path / "oracle"
    proc = run_cli("htgrpo.evaluate", ["benchmark=shapes_geneval", "policy=oracle", f"hydra.run.dir={out}", *SMALL_GENEVAL], tmp_path)
    results = json.loads((out / "geneval_results.json").read_text())
    assert set(results) == {"benchmark", "overall", "tasks", "num_images", "diversity"}
    assert results["overall"] >= 0.99
    # diversity / fidelity beside GenEval: the oracle draws what the prompts ask for, at the oracle's own size
    assert results["diversity"]["diversity/color_divergence"] < 0.2
    assert results["diversity"]["diversity/coverage_ratio"] == pytest.approx(1.0)
    assert "diversity/per_prompt" in proc.stdout
    assert set(results["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert results["num_images"] == sum(1 for _ in open(out / "geneval_images.jsonl"))
    assert (out / "samples" / "grid_position.png").exists()
    assert "overall" in proc.stdout


def test_evaluate_random_geneval_scores_low(tmp_path):
    out = tmp_path / "random"
    run_cli("htgrpo.evaluate", ["benchmark=shapes_geneval", "policy=random", f"hydra.run.dir={out}", *SMALL_GENEVAL], tmp_path)
    results = json.loads((out / "geneval_results.json").read_text())
    assert 0.0 <= results["overall"] <= 0.1


def test_evaluate_dpg_oracle_and_random(tmp_path):
    out = tmp_path / "dpg_oracle"
    run_cli("htgrpo.evaluate", ["benchmark=shapes_dpg", "policy=oracle", f"hydra.run.dir={out}", *SMALL_DPG], tmp_path)
    results = json.loads((out / "dpg_results.json").read_text())
    assert set(results) == {"benchmark", "overall", "categories", "num_prompts"}
    assert results["overall"] >= 99.0 and results["num_prompts"] == 12
    assert set(results["categories"]) <= {"entity", "attribute", "relation", "global", "other"}
    out = tmp_path / "dpg_random"
    run_cli("htgrpo.evaluate", ["benchmark=shapes_dpg", "policy=random", f"hydra.run.dir={out}", *SMALL_DPG], tmp_path)
    assert json.loads((out / "dpg_results.json").read_text())["overall"] <= 10.0


def test_unknown_experiment_error_lists_choices(tmp_path):
    proc = run_cli("htgrpo.fit", ["experiment=nope"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "shapes_pretrain" in proc.stderr + proc.stdout


def test_bad_value_fails_at_startup_naming_the_key(tmp_path):
    proc = run_cli("htgrpo.fit", ["experiment=shapes_pretrain", "sampler.num_steps=0"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "sampler.num_steps" in proc.stderr + proc.stdout
    assert not list(tmp_path.glob("logs/**/summary.json"))


def test_fit_pretrain_tiny_then_evaluate_the_checkpoint(tmp_path):
    run_dir = tmp_path / "pretrain"
    run_cli("htgrpo.fit", ["experiment=shapes_pretrain", f"hydra.run.dir={run_dir}", "trainer.max_steps=4",
                           "data.batch_size=4", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
                           "benchmark.prompts.per_task=2", "benchmark.images_per_prompt=1", "sampler.num_steps=4",
                           "callbacks.progress_bar=null"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["seconds"] > 0
    assert 0.0 <= summary["val_end"]["geneval/overall"] <= 1.0
    # diversity / fidelity beside GenEval (shapes_pretrain skips val_start: a random init scores ~0)
    assert {"diversity/color_divergence", "diversity/per_prompt", "diversity/coverage_ratio"} <= set(summary["val_end"])
    assert list((run_dir / "samples").glob("val_step*.png"))  # the captioned, verdict-framed grid
    export = tmp_path / "artifacts" / "shapes_llada_warmstart"
    assert (export / "config.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    # the exported folder and the Lightning checkpoint both evaluate
    for ckpt in (export, run_dir / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"eval_{ckpt.name}"
        run_cli("htgrpo.evaluate", ["benchmark=shapes_geneval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}",
                                    "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
                                    "benchmark.prompts.per_task=2", "benchmark.images_per_prompt=1",
                                    "sampler.num_steps=4"], tmp_path)
        assert 0.0 <= json.loads((out / "geneval_results.json").read_text())["overall"] <= 1.0
