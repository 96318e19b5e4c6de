"""RL actually learns: a tiny policy trained with GRPO on an easy reward raises that reward clearly.

The reward is the share of an image's cells painted red (palette index 1). A randomly initialised policy paints
about 1/11 of its cells red; a working GRPO update (the right sign of the advantage, the right log-probs, an
optimiser step in the right direction) drives that share up within a few rollout batches. A broken update
direction (e.g. a flipped advantage) drives it down and fails the test, and so does an update that does nothing.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from htgrpo.algorithms.ht_grpo import HTGRPO
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig, color_index
from htgrpo.data.shapes.scene import image_to_cells
from htgrpo.policies.generators import SamplerSettings, build_masked_diffusion_policy

# 8x8 cells (64 image tokens) keep one rollout step well under a second on one CPU thread.
WORLD = ShapesWorldConfig.roomy(grid_size=8, cell_px=1, min_object_size=4, max_object_size=4, small_size=4, large_size=4)
RED = color_index("red")
SAMPLER = SamplerSettings(name="emerge", num_steps=4, guidance_scale=0.0)


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py


def red_share(images: torch.Tensor, records=None) -> torch.Tensor:
    """Reward: the share of cells whose palette colour is red, in [0, 1]."""
    cells = image_to_cells(images, WORLD.grid_size)
    return (cells == RED).float().mean(dim=(1, 2))


@torch.no_grad()
def mean_red_share(policy, prompts: list[str], seed: int) -> float:
    policy.eval()
    tokens = policy.encode_prompts(prompts)
    sampled = SAMPLER.sample(policy, tokens, generator=torch.Generator().manual_seed(seed))
    policy.train()
    return float(red_share(policy.image_tokenizer.decode(sampled.codes)).mean())


def train(reward, steps: int) -> tuple[float, float, HTGRPO]:
    torch.manual_seed(0)
    policy = build_masked_diffusion_policy(WORLD, d_model=32, n_layers=1, n_heads=2)
    module = HTGRPO(policy, reward, sampler=SAMPLER, num_generations=8, beta=0.0, lr=3e-3,
                    credit={"kind": "uniform"}, stages={"n_global": 2, "n_struct": 0, "n_refine": 0}, seed=0)
    stream = ShapesPromptStream(WORLD, seed=7)
    probe = [stream[i].prompt.prompt for i in range(16)]
    before = mean_red_share(policy, probe, seed=123)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(module, datamodule=PromptDataModule(stream, batch_size=2))
    return before, mean_red_share(policy, probe, seed=123), module


def test_grpo_raises_an_easy_reward_within_a_few_rollout_batches():
    before, after, module = train(red_share, steps=12)
    assert module.rollout_step == 12
    # random init paints ~1/11 of the cells red; a working update more than triples that share
    assert before < 0.2, before
    assert after > before + 0.25 and after > 0.4, (before, after)


def test_grpo_on_the_negated_reward_lowers_it():
    # the same run with the reward's sign flipped must move the other way: the update follows the advantage's sign
    before, after, _ = train(lambda images, records: -red_share(images), steps=12)
    assert after < before / 2, (before, after)
