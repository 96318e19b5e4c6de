"""Group-diversity reward shaping (issue 19: a counter to colour collapse): the histogram and the bonus against
hand-computed values, start-up checks naming the key, and the shaped reward feeding the advantages in a tiny fit
while the unshaped reward is what the step log and the reward curve keep."""

from __future__ import annotations

import math

import pytest
import torch

from htgrpo.algorithms.diversity_bonus import DiversityBonus, color_histogram, group_diversity_bonus
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.policies.generators import SamplerSettings
from test_ht_grpo import TINY_POLICY, fit_steps, make_module


def test_color_histogram_hand_computed():
    # one 2x2 image: two grey (128,128,128) pixels -> cell (2,2,2) = 2*16+2*4+2 = 42; one brown (120,70,30) -> cell
    # (1,1,0) = 20; one white (250,250,250) -> cell (3,3,3) = 63
    img = torch.tensor([[[128, 128], [120, 250]], [[128, 128], [70, 250]], [[128, 128], [30, 250]]],
                       dtype=torch.uint8)[None]
    h = color_histogram(img, levels=4)
    assert h.shape == (1, 64)
    expected = torch.zeros(64)
    expected[42], expected[20], expected[63] = 0.5, 0.25, 0.25
    assert torch.equal(h[0], expected)
    assert torch.equal(color_histogram(img, levels=1), torch.ones(1, 1))


def test_batch_scope_compares_with_every_other_image():
    from htgrpo.algorithms.diversity_bonus import batch_diversity_bonus

    # rows a, a, b with d(a, b) = 1: bonus = [1/2, 1/2, 1] (one group of 3: the group bonus too); a
    # batch of two groups [a, a | b, b]: group bonus 0 everywhere, batch bonus 2/3 everywhere
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert batch_diversity_bonus(f).tolist() == [0.5, 0.5, 1.0]
    two = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert group_diversity_bonus(two, 2).tolist() == [0.0] * 4
    assert batch_diversity_bonus(two).tolist() == pytest.approx([2 / 3] * 4)
    assert DiversityBonus(1.0, scope="batch").bonus_of(two, group_diversity_bonus(two, 2)).tolist() == pytest.approx(
        [2 / 3] * 4)


def test_top_color_pixel_share_skips_the_background():
    from htgrpo.algorithms.diversity_bonus import top_color_pixel_share

    # two images: 60% / 80% background (cell 0), 40% / 10% brown (cell 1), 0% / 10% green (cell 2)
    h = torch.tensor([[0.6, 0.4, 0.0], [0.8, 0.1, 0.1]])
    assert top_color_pixel_share(h) == pytest.approx(0.25)


def test_group_bonus_hand_computed():
    # group 1 (G = 3): two identical images and one unlike them -> distances d12 = 0, d13 = d23 = 1
    # bonus = mean distance to the 2 siblings: [0.5, 0.5, 1.0]; group 2: three identical -> 0
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    assert group_diversity_bonus(f, 3).tolist() == [0.5, 0.5, 1.0, 0.0, 0.0, 0.0]
    # half-overlapping histograms: TV distance 0.5
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert group_diversity_bonus(g, 2).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="divisible"):
        group_diversity_bonus(f, 4)


@pytest.mark.parametrize("node,key", [
    ({"weight": -0.1}, "diversity_bonus.weight"), ({"weight": "lots"}, "diversity_bonus.weight"),
    ({"weight": math.inf}, "diversity_bonus.weight"), ({"feature": "clip"}, "diversity_bonus.feature"),
    ({"levels": 0}, "diversity_bonus.levels"), ({"levels": 2.5}, "diversity_bonus.levels"),
    ({"scope": "prompt"}, "diversity_bonus.scope"), ({"wieght": 1.0}, "diversity_bonus")])
def test_bad_values_name_the_key(node, key):
    with pytest.raises(ConfigError, match=key):
        DiversityBonus.from_config(node)


def test_bad_weight_in_the_config_fails_at_start_up(compose):
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, "algorithm.diversity_bonus.weight=-1"])
    policy = instantiate_node(cfg, "policy")
    with pytest.raises(ConfigError, match="diversity_bonus.weight"):
        instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=SamplerSettings())


def test_off_by_default_on_in_the_main_command(compose):
    from omegaconf import OmegaConf

    from htgrpo._hydra import config_dir

    for group in ("ht_grpo", "mar_grpo"):  # the algorithms' own default: the plain reward
        node = OmegaConf.load(f"{config_dir()}/algorithm/{group}.yaml").diversity_bonus
        assert DiversityBonus.from_config(dict(node)) == DiversityBonus()
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY])
    module = instantiate_node(cfg, "algorithm", policy=instantiate_node(cfg, "policy"), benchmark=None,
                              sampler=SamplerSettings())
    assert module.diversity_bonus == DiversityBonus(weight=1.0)  # the main command: bonus on (README, issue 19)
    assert (module.lr_schedule, module.lr_min_ratio) == ("cosine", 0.1)


def test_shaped_reward_feeds_the_advantages_in_a_fit(tmp_path):
    weight = 0.7
    module = make_module(diversity_bonus={"weight": weight})
    fit_steps(module, 1, tmp_path)
    out = module.last_reward_output
    task, bonus = out.components["unshaped"], out.components["diversity_bonus"]
    images = module.last_scored.rollout.images
    assert torch.allclose(bonus, group_diversity_bonus(color_histogram(images), module.num_generations))
    assert torch.allclose(out.scores, task + weight * bonus)
    assert torch.equal(module.last_scored.rewards, out.scores)  # the advantages were computed from the shaped reward
    assert bool((bonus >= 0).all() and (bonus <= 1).all()) and float(bonus.max()) > 0  # the tiny policy's images differ
    assert module.reward_history == [pytest.approx(float(task.mean()))]  # the reward curve keeps the task reward


def test_colour_spread_is_logged_every_step_with_the_bonus_off(tmp_path):
    module = make_module()
    fit_steps(module, 1, tmp_path)
    images = module.last_scored.rollout.images
    feats = color_histogram(images)
    spread = module.last_color_spread
    assert spread.within_group == pytest.approx(float(group_diversity_bonus(feats, module.num_generations).mean()))
    n = feats.shape[0]  # across the batch: mean TV distance over the n(n-1) ordered pairs, by a plain double loop
    pairs = [0.5 * float((feats[i] - feats[j]).abs().sum()) for i in range(n) for j in range(n) if i != j]
    assert spread.across_batch == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    log = module.reward_step_log(module.last_scored.rollout.prompts, module.last_scored.rewards,
                                 module.last_scored.advantages, entropy=0.0)
    assert log["train/diversity/group_color_distance"] == spread.within_group
    # second most common cell over the batch's pixels (the first is the tiny policy's commonest colour)
    assert spread.top_color_pixel_share == pytest.approx(float(feats.double().mean(0).sort(descending=True).values[1]))
    assert "diversity_bonus" not in module.last_reward_output.components  # off: the reward is left alone


@pytest.mark.parametrize("value", [-0.1, math.nan, "much"])
def test_bad_entropy_coef_names_the_key(value):
    with pytest.raises(ConfigError, match="entropy_coef"):
        make_module(entropy_coef=value)


def test_entropy_term_lowers_the_first_update_loss_by_c_times_the_entropy(tmp_path):
    """Same seed, same first update inputs: loss(c) = loss(0) − c · mean entropy of the scored tokens (token_mean)."""
    plain = make_module(seed=3)
    fit_steps(plain, 1, tmp_path / "plain")
    with_term = make_module(seed=3, entropy_coef=0.5)
    fit_steps(with_term, 1, tmp_path / "entropy")
    first_plain, first = plain.last_update_stats[0], with_term.last_update_stats[0]
    assert math.isnan(first_plain.entropy) and 0 < first.entropy <= math.log(with_term.policy.codebook_size) + 1e-4
    assert first.loss == pytest.approx(first_plain.loss - 0.5 * first.entropy, abs=1e-5)


def test_shaping_keeps_the_rewards_own_components(tmp_path):
    """A reward with a component named like the shaping's ("task", e.g. a mix part) keeps it; the reward curve uses
    the unshaped total, not that component."""
    from htgrpo.rewards.base import Reward, RewardOutput

    class TwoPart(Reward):
        name = "two_part"

        def score(self, images, records):
            b = images.float().mean(dim=(1, 2, 3)) / 255.0
            return RewardOutput(2 * b, {"task": b})

    module = make_module(reward=TwoPart(), diversity_bonus={"weight": 0.5})
    fit_steps(module, 1, tmp_path)
    out = module.last_reward_output
    assert torch.allclose(out.components["unshaped"], 2 * out.components["task"])  # "task" is the reward's own part
    assert torch.allclose(out.scores, out.components["unshaped"] + 0.5 * out.components["diversity_bonus"])
    assert module.reward_history == [pytest.approx(float(out.components["unshaped"].mean()))]
