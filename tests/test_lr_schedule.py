"""Learning-rate schedule of the GRPO modules (issue 21 item 4): the factors against hand-computed values, start-up
checks naming the key, and the optimiser's rate following the schedule in a tiny HT-GRPO fit."""

from __future__ import annotations

import math

import lightning as L
import pytest

from htgrpo.algorithms.lr_schedule import lr_decay_factor, validate_lr_schedule, warmup_factor
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.policies.generators import SamplerSettings
from test_ht_grpo import TINY_POLICY, WORLD, make_module


def test_decay_factors_hand_computed():
    # linear over T = 4 down to 0: 1, 3/4, 1/2, 1/4, then 0 at and past T
    assert [lr_decay_factor(t, 4, "linear", 0.0) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    # linear down to 0.2: 0.2 + 0.8 (1 - t/4)
    assert lr_decay_factor(1, 4, "linear", 0.2) == pytest.approx(0.8)
    # cosine over T = 4 down to 0.1: 0.1 + 0.9 (1 + cos(pi t / 4)) / 2
    expected = [1.0, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 0.55, 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2, 0.1]
    assert [lr_decay_factor(t, 4, "cosine", 0.1) for t in range(5)] == pytest.approx(expected)
    # constant is exactly 1 (the old rate, bit for bit)
    assert all(lr_decay_factor(t, 4, "constant", 0.5) == 1.0 for t in range(8))
    assert [warmup_factor(u, 4) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


@pytest.mark.parametrize("args,key", [
    (("step", 0.0, None), "lr_schedule"), (("cosine", 1.5, None), "lr_min_ratio"),
    (("cosine", -0.1, None), "lr_min_ratio"), (("linear", 0.0, 0), "lr_decay_batches"),
    (("linear", 0.0, 2.5), "lr_decay_batches")])
def test_bad_schedule_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key):
        validate_lr_schedule(*args)


def test_bad_schedule_in_the_config_fails_at_start_up(compose):
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, "algorithm.lr_schedule=exponential"])
    policy = instantiate_node(cfg, "policy")
    with pytest.raises(ConfigError, match="lr_schedule"):
        instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=SamplerSettings())


def fit_recording_rates(module, steps, tmp_path):
    rates = []
    original = module.clip_and_step

    def recording(optimizer):
        rates.append(optimizer.param_groups[0]["lr"])
        return original(optimizer)

    module.clip_and_step = recording
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=data)
    return rates, trainer


@pytest.mark.parametrize("schedule,min_ratio", [("cosine", 0.1), ("linear", 0.0), ("constant", 0.0)])
def test_optimizer_rate_follows_the_schedule_in_a_fit(tmp_path, schedule, min_ratio):
    # K = 3 updates per rollout batch (1/1/1 stages), 4 batches (T = limit_train_batches), warm-up 2 updates
    module = make_module(lr=1e-3, warmup_steps=2, lr_schedule=schedule, lr_min_ratio=min_ratio)
    rates, trainer = fit_recording_rates(module, 4, tmp_path)
    assert len(rates) == 12
    expected = [1e-3 * min(1.0, (u + 1) / 2) * lr_decay_factor(u // 3, 4, schedule, min_ratio) for u in range(12)]
    assert rates == pytest.approx(expected, rel=1e-12)
    if schedule == "constant":  # the old rule exactly: lr * min(1, (u + 1) / warmup)
        assert rates == [1e-3 * min(1.0, (u + 1) / 2) for u in range(12)]
    assert float(trainer.callback_metrics["lr"]) == pytest.approx(expected[9])  # logged at the last batch's start
