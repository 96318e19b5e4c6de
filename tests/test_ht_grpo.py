"""The HT-GRPO LightningModule: the algorithm box on a tiny policy, bad input, exact resume and 2-process DDP."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from htgrpo.algorithms.credit import Stage
from htgrpo.algorithms.ht_grpo import HTGRPO
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy
from htgrpo.rewards.shapes import ShapesPromptReward
from test_cli import run_cli

WORLD = ShapesWorldConfig()
TINY_POLICY = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2"]
TINY_RL = [*TINY_POLICY, "data.batch_size=2", "algorithm.num_generations=4", "sampler.num_steps=4",
           "benchmark.prompts.per_task=1", "benchmark.images_per_prompt=1", "callbacks.progress_bar=null",
           "algorithm.stages.n_global=1", "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1",
           "validate_at_start=false", "validate_at_end=false", "logger=csv"]


def tiny_policy():
    return build_masked_diffusion_policy(WORLD, d_model=32, n_layers=1, n_heads=2)


def brightness_reward(images, records):
    """A dense reward with within-group variance even for a random policy (the benchmark reward is ~0 there)."""
    return images.float().mean(dim=(1, 2, 3)) / 255.0


def make_module(reward=None, **kwargs) -> HTGRPO:
    defaults = dict(num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 1, "n_struct": 1, "n_refine": 1}, lr=1e-3)
    defaults.update(kwargs)
    return HTGRPO(tiny_policy(), reward or brightness_reward, **defaults)


def fit_steps(module: HTGRPO, steps: int, tmp_path: Path) -> L.Trainer:
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=data)
    return trainer


def test_training_step_runs_the_stages_in_order_and_changes_the_policy(tmp_path):
    module = make_module()
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = fit_steps(module, 1, tmp_path)
    assert [u.stage for u in module.last_update_stats] == [Stage.GLOBAL, Stage.STRUCTURE, Stage.REFINE]
    assert module.rollout_step == 1 and trainer.global_step == 3  # one rollout batch, K = 3 updates
    assert all(math.isfinite(u.loss) for u in module.last_update_stats)
    changed = any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    ref_same = all(torch.equal(a, b) for a, b in zip(before, module.reference.parameters()))
    assert changed and ref_same  # the policy moved, the reference stayed frozen
    scored = module.last_scored
    # structure stage scores only S, refine only R; S holds a quarter of each image's tokens
    n = scored.structure.shape[1]
    assert (scored.structure.sum(1) == round(0.25 * n)).all()
    s_stats, r_stats = module.last_update_stats[1], module.last_update_stats[2]
    assert s_stats.scored_tokens == int(scored.structure.sum())
    assert r_stats.scored_tokens == int((~scored.structure).sum())
    # credit weights average to 1 per image and are larger on S (binary, alpha 1)
    assert torch.allclose(scored.credit.mean(1), torch.ones(scored.credit.shape[0]), atol=1e-5)
    assert (scored.credit[scored.structure] > scored.credit[~scored.structure].max()).all()


def test_first_update_ratio_is_one_and_clip_fraction_zero(tmp_path):
    module = make_module(stages={"n_global": 1, "n_struct": 0, "n_refine": 0})
    fit_steps(module, 1, tmp_path)
    (u,) = module.last_update_stats
    # before any update the current policy IS the old policy: r = 1 exactly, nothing clipped, KL 0
    assert torch.allclose(u.ratios, torch.ones_like(u.ratios), atol=1e-5)
    assert u.clip_low == 0 and u.clip_high == 0 and abs(u.kl) < 1e-8


def test_nan_reward_gets_zero_advantage_and_the_run_goes_on(tmp_path):
    def flaky(images, records):
        r = brightness_reward(images, records)
        r[0] = float("nan")
        r[5] = float("inf")
        return r

    module = make_module(reward=flaky)
    fit_steps(module, 2, tmp_path)
    adv = module.last_scored.advantages
    assert adv.nonfinite_rewards == 2
    assert adv.advantages[0] == 0 and adv.advantages[5] == 0
    assert torch.isfinite(module.last_scored.token_advantages).all()
    assert all(math.isfinite(u.loss) for u in module.last_update_stats)


@pytest.mark.parametrize("estimator", ["unigrpo", "maskgrpo", "d1", "coupled", "trace"])
def test_every_baseline_estimator_trains(tmp_path, estimator):
    module = make_module(estimator={"name": estimator}, credit={"kind": "uniform"},
                         stages={"n_global": 2, "n_struct": 0, "n_refine": 0})
    fit_steps(module, 1, tmp_path)
    assert len(module.last_update_stats) == 2
    assert all(u.scored_tokens > 0 and math.isfinite(u.loss) for u in module.last_update_stats)


@pytest.mark.parametrize("override, key", [
    ("algorithm.stages.n_global=-1", "stages.n_global"),
    ("algorithm.stages.scored_fraction=1.5", "stages.scored_fraction"),
    ("algorithm.partition.fraction=0", "partition.fraction"),
    ("algorithm.estimator.name=nope", "algorithm.estimator"),
    ("algorithm.credit.kind=nope", "algorithm.credit.kind"),
    ("algorithm.loss_type=nope", "algorithm.loss_type"),
    ("algorithm.scale_rewards=nope", "algorithm.scale_rewards"),
])
def test_bad_algorithm_values_fail_at_startup_naming_the_key(compose, override, key):
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, override])
    policy = instantiate_node(cfg, "policy")
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=SamplerSettings())
    assert key in str(err.value)


def test_stage_counts_must_add_up_to_at_least_one_iteration(compose):
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, "algorithm.stages.n_global=0",
                          "algorithm.stages.n_struct=0", "algorithm.stages.n_refine=0"])
    with pytest.raises(ConfigError, match="stages"):
        instantiate_node(cfg, "algorithm", policy=instantiate_node(cfg, "policy"), benchmark=None,
                         sampler=SamplerSettings())


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """rollout step -> logged train scalars, from the CSV logger."""
    rows: dict[int, dict[str, float]] = {}
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/rollout_step"):
                    step = int(float(row["train/rollout_step"]))
                    rows[step] = {k: float(v) for k, v in row.items()
                                  if v and k in ("train/loss", "train/reward/mean", "train/kl", "train/grad_norm")}
    return rows


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    # K = 3 updates per rollout step and a checkpoint after every rollout step; a crash after rollout step 2 leaves
    # step000006.ckpt (6 updates), and resuming from it must replay rollout steps 2 and 3 exactly.
    full = tmp_path / "full"
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, f"hydra.run.dir={full}",
                           "trainer.limit_train_batches=4", "callbacks.model_checkpoint.every_n_train_steps=3"],
            tmp_path)
    ckpt = full / "checkpoints" / "step000006.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (full / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, f"hydra.run.dir={resumed}",
                           "trainer.limit_train_batches=4", f"ckpt_path={ckpt}"], tmp_path)
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]
    for step in (2, 3):
        assert set(b[step]) == set(a[step]) and len(a[step]) == 4
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4


def test_ddp_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, f"hydra.run.dir={run_dir}", "trainer=ddp_cpu",
                           "trainer.limit_train_batches=2", "validate_at_end=true",
                           # Lightning's CSVLogger cannot append to its own file from a second spawn (fit, then
                           # validate); TensorBoard event files can.
                           "logger=tensorboard"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["val_end"]["geneval/overall"] <= 1.0
