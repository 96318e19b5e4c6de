"""The HT-GRPO LightningModule: the algorithm box on a tiny policy, bad input, exact resume and 2-process DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
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
from htgrpo.policies.t2i_layout import MASKED
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy
from htgrpo.rewards.shapes import ShapesPromptReward
from conftest import REPO_ROOT
from test_cli import run_cli

WORLD = ShapesWorldConfig.roomy()
TINY_POLICY = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2"]
TINY_RL = [*TINY_POLICY, "data.batch_size=2", "algorithm.num_generations=4", "sampler.num_steps=4",
           "benchmark.prompts.per_task=1", "benchmark.images_per_prompt=1", "callbacks.progress_bar=null",
           "algorithm.stages.n_global=1", "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1",
           "validate_at_start=false", "validate_at_end=false", "logger=csv",
           # a tiny random policy scores 0 on ShapesWorld (its detector reads smears as clutter): every group would
           # have zero variance and no update would happen; JPEG size differs between any two images
           "reward=jpeg_compressibility"]


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


@pytest.mark.parametrize("estimator", ["prompt_conditioned", "coupled"])
def test_first_update_ratio_is_exactly_one_under_lora_dropout_with_trained_adapters(tmp_path, estimator):
    # Issue 17 item 5. Old, reference and new log-probs run in one deterministic mode (dropout off), so at the first
    # inner iteration of every rollout step the current policy IS the old one and r = 1 whatever policy.lora.dropout
    # says. Checked at rollout step 2, after the first step's updates made the adapters nonzero (at step 1 peft's
    # lora_B = 0 hides any dropout on the adapter input). Both a one-pass and a two-pass estimator.
    policy = build_masked_diffusion_policy(WORLD, d_model=32, n_layers=1, n_heads=2,
                                           lora={"r": 4, "alpha": 8, "dropout": 0.1})
    module = HTGRPO(policy, brightness_reward, num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 2, "n_struct": 0, "n_refine": 0}, lr=1e-2, estimator={"name": estimator})
    fit_steps(module, 2, tmp_path)
    assert module.rollout_step == 2
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 1e-3 for p in lora_b)  # the adapters really moved
    first = module.last_update_stats[0]
    assert first.scored_tokens > 0
    assert float((first.ratios - 1).abs().max()) <= 1e-6
    assert first.clip_low == 0 and first.clip_high == 0
    # the second iteration of the same step sees the first one's update (so this run is not trivially r = 1)
    assert float((module.last_update_stats[1].ratios - 1).abs().max()) > 1e-4


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
    # non-integer stage counts fail (never truncated: 1.5 would otherwise run as 1)
    ("algorithm.stages.n_struct=1.5", "algorithm.stages.n_struct"),
    ("algorithm.stages.n_global=2.0", "algorithm.stages.n_global"),
    ("algorithm.stages.mode=sideways", "algorithm.stages.mode"),
    # one range check for the credit keys (htgrpo.algorithms.credit.validate_credit)
    ("algorithm.credit.alpha=-0.5", "algorithm.credit.alpha"),
    ("algorithm.credit.gamma=0", "algorithm.credit.gamma"),
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
    run_dir, probe = tmp_path / "ddp", tmp_path / "probe"
    args = ["experiment=shapes_ht", *TINY_RL, f"hydra.run.dir={run_dir}", "trainer=ddp_cpu",
            "trainer.limit_train_batches=2", "validate_at_end=true",
            # Lightning's CSVLogger cannot append to its own file from a second spawn (fit, then
            # validate); TensorBoard event files can.
            "logger=tensorboard",
            # every rank records its rollouts and final parameters (tests/ddp_probe.py)
            "+callbacks.rank_probe._target_=ddp_probe.RankProbe", f"+callbacks.rank_probe.out_dir={probe}"]
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)]))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # a fresh rendezvous: Lightning picks a free port, as in a user's shell
    proc = subprocess.run([sys.executable, "-m", "htgrpo.fit", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["val_end"]["geneval/overall"] <= 1.0
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # gradients are all-reduced: both ranks end with identical parameters ...
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # ... that moved away from where they started
    assert any(not torch.equal(v, ranks[0]["start"][n]) for n, v in ranks[0]["params"].items())
    # ... while each rank sampled its own prompts and rollouts (groups never straddle ranks)
    assert len(ranks[0]["codes"]) == len(ranks[1]["codes"]) == 2
    for a, b in zip(ranks[0]["codes"], ranks[1]["codes"]):
        assert a.shape == b.shape and not torch.equal(a, b)
    assert ranks[0]["prompts"] != ranks[1]["prompts"]


# ----------------------------------------------------------------------------------------------------------------
# options checked by value (each one against a number computed from the module's own tensors)
# ----------------------------------------------------------------------------------------------------------------
def record_iterations(module: HTGRPO) -> list:
    """Wrap ``inner_update`` so the test sees every planned inner iteration (stage, plan, old/ref log-probs)."""
    seen = []
    original = module.inner_update

    def spy(scored, it):
        seen.append(it)
        return original(scored, it)

    module.inner_update = spy
    return seen


def test_micro_batches_give_the_same_update_as_the_whole_batch(tmp_path):
    runs = {}
    for micro in (None, 3):  # 8 images: micro-batches of 3, 3 and 2
        torch.manual_seed(0)
        module = make_module(micro_batch_size=micro)
        fit_steps(module, 1, tmp_path / str(micro))
        runs[micro] = module
    whole, micro = runs[None], runs[3]
    for a, b in zip(whole.last_update_stats, micro.last_update_stats):
        assert a.scored_tokens == b.scored_tokens
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=1e-7)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    for p, q in zip(whole.policy.parameters(), micro.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean"])
def test_loss_type_aggregates_the_first_update_as_defined(tmp_path, loss_type):
    # UniGRPO with a random mask ratio per image: images score different numbers of tokens, so the two
    # aggregations differ. At the first update r = 1 and KL = 0, so the per-token loss is exactly -Â.
    module = make_module(loss_type=loss_type, estimator={"name": "unigrpo", "structured": False},
                         stages={"n_global": 1, "n_struct": 0, "n_refine": 0})
    seen = record_iterations(module)
    fit_steps(module, 1, tmp_path)
    mask = seen[0].plan.scored.cpu()
    adv = module.last_scored.token_advantages.cpu()
    counts = mask.sum(1)
    assert counts.unique().numel() > 1  # unequal token counts per image
    token_mean = -float((adv * mask).sum() / mask.sum())
    seq_mean = -float(((adv * mask).sum(1)[counts > 0] / counts[counts > 0]).mean())
    assert abs(token_mean - seq_mean) > 1e-4
    expected = token_mean if loss_type == "token_mean" else seq_mean
    assert module.last_update_stats[0].loss == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_outer_mode_switches_the_stage_per_rollout_step(tmp_path):
    class StageLog(L.Callback):
        def __init__(self):
            self.stages, self.tokens, self.structure = [], [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stages.append([u.stage for u in pl_module.last_update_stats])
            self.tokens.append([u.scored_tokens for u in pl_module.last_update_stats])
            self.structure.append(int(pl_module.last_scored.structure.sum()))

    module = make_module(stages={"n_global": 1, "n_struct": 1, "n_refine": 1, "mode": "outer"})
    log = StageLog()
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
              default_root_dir=str(tmp_path), accelerator="cpu").fit(module, datamodule=data)
    G, S, R = Stage.GLOBAL, Stage.STRUCTURE, Stage.REFINE
    # K = 3 updates per rollout step, all in the stage of that step; the curriculum cycles G, S, R, G
    assert log.stages == [[G, G, G], [S, S, S], [R, R, R], [G, G, G]]
    n_tokens = 8 * WORLD.num_cells
    assert log.tokens[0] == [n_tokens] * 3 and log.tokens[3] == [n_tokens] * 3
    assert log.tokens[1] == [log.structure[1]] * 3
    assert log.tokens[2] == [n_tokens - log.structure[2]] * 3


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_entropy_partition_takes_the_most_certain_tokens(tmp_path, order):
    module = make_module(partition={"key": "entropy", "fraction": 0.25, "entropy_order": order})
    fit_steps(module, 1, tmp_path)
    scored = module.last_scored
    entropy = scored.rollout.sampled.entropy.float().cpu()
    structure = scored.structure.cpu()
    n = structure.shape[1]
    assert (structure.sum(1) == round(0.25 * n)).all()
    for e, s in zip(entropy, structure):
        if order == "ascending":  # S = the lowest commit-time entropies
            assert e[s].max() <= e[~s].min()
        else:
            assert e[s].min() >= e[~s].max()
    assert torch.equal(scored.credit[structure] > 1.0, torch.ones_like(scored.credit[structure], dtype=torch.bool))


def test_epsilon_high_sets_the_upper_clip(tmp_path):
    # a large learning rate moves the ratios after the first update; the upper clip must use epsilon_high
    module = make_module(epsilon=0.2, epsilon_high=0.05, lr=5e-2, beta=0.0,
                         stages={"n_global": 3, "n_struct": 0, "n_refine": 0})
    fit_steps(module, 1, tmp_path)
    later = module.last_update_stats[1:]
    for u in later:
        high = float(((u.ratios > 1.05) & (u.token_advantages > 0)).float().mean())
        low = float(((u.ratios < 0.8) & (u.token_advantages < 0)).float().mean())
        assert u.clip_high == pytest.approx(high, abs=1e-6)
        assert u.clip_low == pytest.approx(low, abs=1e-6)
    assert any(u.clip_high > 0 for u in later)
    # with the symmetric clip (epsilon 0.2) fewer ratios count as clipped above
    assert any(float(((u.ratios > 1.2) & (u.token_advantages > 0)).float().mean()) < u.clip_high for u in later)


def test_trace_estimator_scores_each_block_in_its_own_rollout_context(tmp_path):
    # 8 sampler steps in blocks of 2: four passes, each hiding the tokens committed from its block on
    module = make_module(sampler=SamplerSettings(name="maskgit", num_steps=8), estimator={"name": "trace", "shrink": 2},
                         credit={"kind": "uniform"}, stages={"n_global": 2, "n_struct": 0, "n_refine": 0})
    seen = record_iterations(module)
    fit_steps(module, 1, tmp_path)
    sampled = module.last_scored.rollout.sampled
    step = sampled.commit_step.cpu()
    passes = seen[0].plan.passes
    assert len(passes) == 4
    union = torch.zeros_like(step, dtype=torch.bool)
    for b, p in enumerate(passes):
        scored, hidden = p.scored.cpu(), (p.canvas.cpu() == MASKED)
        assert torch.equal(hidden, step >= 2 * b)  # the canvas the rollout had when block b began
        assert torch.equal(scored, (step >= 2 * b) & (step < 2 * b + 2))
        assert not (union & scored).any()
        union |= scored
    assert union.all()  # every token scored exactly once per update
    # the old log-probs come from those canvases, not from one fully masked canvas
    fully_masked = module._all_position_log_probs(module.reference, module.last_scored.rollout, passes[0]).cpu()
    late = step >= 2
    assert not torch.allclose(seen[0].old_logp.cpu()[late], fully_masked[late], atol=1e-4)
    first = module.last_update_stats[0]
    assert torch.allclose(first.ratios, torch.ones_like(first.ratios), atol=1e-5)


def test_exported_folder_and_last_ckpt_score_the_same(tmp_path, compose):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from htgrpo.callbacks.export import ExportPolicy
    from htgrpo.evaluate import load_policy
    from htgrpo.evaluation.benchmark import run_benchmark
    from htgrpo.policies.generators import as_image_generator

    export, ckpts = tmp_path / "exported", tmp_path / "checkpoints"
    module = make_module()
    start_weights = {k: v.clone() for k, v in module.policy.state_dict().items()}
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu",
              callbacks=[ModelCheckpoint(dirpath=str(ckpts), save_last=True), ExportPolicy(str(export), False)],
              ).fit(module, datamodule=data)
    reports = {}
    for name, ckpt in (("folder", export), ("ckpt", ckpts / "last.ckpt")):
        # what `python -m htgrpo.evaluate ckpt_path=...` does: load_policy, then the benchmark with the run seed
        cfg = compose("evaluate", ["benchmark=shapes_geneval", "policy=shapes_llada", "policy.d_model=32",
                                   "policy.n_layers=1", "policy.n_heads=2", "world.grid_size=16", "world.cell_px=8",
                                   "world.min_object_size=5", "world.max_object_size=7", "world.small_size=5",
                                   "world.large_size=7", "world.position_step=1", "world.position_offset=0",
                                   f"ckpt_path={ckpt}", "benchmark.prompts.per_task=2", "benchmark.images_per_prompt=2"])
        policy = load_policy(cfg).eval()
        benchmark = instantiate_node(cfg, "benchmark")
        generator = as_image_generator(policy, SamplerSettings(name="emerge", num_steps=4))
        reports[name] = run_benchmark(benchmark, generator, seed=3, samples_per_group=2)
    a, b = reports["folder"], reports["ckpt"]
    assert a.results_json() == b.results_json() and a.rows == b.rows
    assert a.samples.keys() == b.samples.keys() and len(a.samples) == 6
    for group in a.samples:  # the very same images, pixel for pixel
        assert torch.equal(a.samples[group], b.samples[group]), group
    # and they are the trained policy's images, not the starting policy's
    start_policy = tiny_policy()
    start_policy.load_state_dict(start_weights)
    fresh = as_image_generator(start_policy.eval(), SamplerSettings(name="emerge", num_steps=4))
    start = run_benchmark(instantiate_node(cfg, "benchmark"), fresh, seed=3, samples_per_group=2)
    assert any(not torch.equal(start.samples[g], a.samples[g]) for g in a.samples)
