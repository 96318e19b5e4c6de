"""Scoring overlapped with sampling (algorithm.overlap_scoring): the same rewards, advantages and weights as scoring
after the rollout, for the same seed, on the tiny ShapesWorld policy; the auto rule and bad settings."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
import torch

from htgrpo.algorithms.ht_grpo import HTGRPO
from htgrpo.algorithms.overlap import ChunkScorer, overlap_setting, wants_overlap
from htgrpo.config import ConfigError
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy
from htgrpo.rewards.base import Reward, RewardOutput

pytestmark = pytest.mark.usefixtures("single_torch_thread")

WORLD = ShapesWorldConfig.roomy()


class NoisyBrightness(Reward):
    """Mean brightness per image; on every call it also draws from the GLOBAL torch RNG and sleeps, so a sampler
    that read the global RNG (or a scorer that shifted it) would change the samples, and the threads interleave."""

    io_bound = True

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__()
        self.delay = delay
        self.calls: list[tuple[str, int]] = []

    def score(self, images, records):
        torch.rand(1000)  # the global stream, on the scoring thread
        time.sleep(self.delay)
        self.calls.append((threading.current_thread().name, len(records)))
        return RewardOutput(images.float().mean(dim=(1, 2, 3)) / 255.0)


def make_module(reward, **kwargs) -> HTGRPO:
    torch.manual_seed(0)  # the same initial weights for both runs
    policy = build_masked_diffusion_policy(WORLD, d_model=32, n_layers=1, n_heads=2)
    settings = dict(num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 1, "n_struct": 1, "n_refine": 1}, lr=1e-3, rollout_micro_batch_size=2)
    settings.update(kwargs)
    return HTGRPO(policy, reward, **settings)


def fit_steps(module: HTGRPO, steps: int, tmp_path) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same global stream for both runs
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=data)
    return [p.detach().clone() for p in module.policy.parameters()]


def test_overlapped_scoring_gives_the_same_rewards_advantages_and_weights(tmp_path):
    sequential_reward, overlapped_reward = NoisyBrightness(), NoisyBrightness()
    sequential = make_module(sequential_reward, overlap_scoring=False)
    overlapped = make_module(overlapped_reward, overlap_scoring=True)
    start = [p.detach().clone() for p in sequential.policy.parameters()]
    after_sequential = fit_steps(sequential, 2, tmp_path / "a")
    after_overlapped = fit_steps(overlapped, 2, tmp_path / "b")

    # the two runs really scored differently: once per step on the main thread vs per chunk on the scoring thread
    assert sequential_reward.calls == [("MainThread", 8)] * 2
    assert len(overlapped_reward.calls) == 8 and all(n == 2 for _, n in overlapped_reward.calls)
    assert all(name.startswith("htgrpo-scoring") for name, _ in overlapped_reward.calls)

    a, b = sequential.last_scored, overlapped.last_scored
    assert torch.equal(a.rollout.images, b.rollout.images) and torch.equal(a.rollout.sampled.codes, b.rollout.sampled.codes)
    assert torch.equal(a.rewards, b.rewards) and a.rewards.std() > 0
    assert torch.equal(a.advantages.advantages, b.advantages.advantages)
    assert torch.equal(a.token_advantages, b.token_advantages)
    assert sequential.reward_history == overlapped.reward_history
    assert any(not torch.equal(x, y) for x, y in zip(start, after_sequential))  # training moved the weights ...
    assert all(torch.equal(x, y) for x, y in zip(after_sequential, after_overlapped))  # ... identically
    assert overlapped.last_timings.keys() == sequential.last_timings.keys()


def test_auto_overlaps_io_bound_rewards_only():
    assert overlap_setting("auto") == "auto" and overlap_setting(True) == "true" and overlap_setting("False") == "false"
    with pytest.raises(ConfigError, match="overlap_scoring"):
        overlap_setting("sometimes")

    def plain(images, records):
        return images.float().mean(dim=(1, 2, 3))

    assert wants_overlap("auto", NoisyBrightness()) and not wants_overlap("auto", plain)
    assert wants_overlap("true", plain) and not wants_overlap("false", NoisyBrightness())
    assert make_module(NoisyBrightness()).chunk_scorer() is not None
    assert make_module(plain).chunk_scorer() is None
    assert make_module(NoisyBrightness(), rollout_micro_batch_size=None).chunk_scorer() is None  # one chunk
    with pytest.raises(ConfigError, match="overlap_scoring.*rollout_micro_batch_size"):
        make_module(plain, overlap_scoring=True, rollout_micro_batch_size=None)
    with pytest.raises(ConfigError, match="overlap_scoring"):
        make_module(plain, overlap_scoring="maybe")


def test_chunk_scorer_keeps_order_and_runs_beside_the_caller():
    reward = NoisyBrightness(delay=0.3)
    scorer = ChunkScorer(reward)
    chunks = [torch.full((2, 3, 4, 4), v, dtype=torch.uint8) for v in (10, 200, 60)]
    t0 = time.perf_counter()
    for chunk in chunks:
        scorer.submit(chunk, [None, None])
    submitted = time.perf_counter() - t0
    out = scorer.result()
    assert submitted < 0.25  # submit returns at once: the 3 x 0.3 s of scoring happen on the worker
    assert torch.allclose(out.scores, torch.tensor([10, 10, 200, 200, 60, 60]) / 255.0)
