"""GRPO arithmetic against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from htgrpo.algorithms.grpo_math import (
    LOSS_TYPES,
    SCALE_REWARDS,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    masked_mean,
)

NAN, INF = float("nan"), float("inf")


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# ---- group_advantages -------------------------------------------------------------------------------------------
def test_allowed_names() -> None:
    assert SCALE_REWARDS == ("group", "batch", "none")
    assert LOSS_TYPES == ("token_mean", "seq_mean")


def test_group_scaling_by_hand() -> None:
    # group 0 = [1, 0, 1, 1]: mean 3/4 = 0.75, deviations [0.25, -0.75, 0.25, 0.25],
    # sum of squares 3*0.0625 + 0.5625 = 0.75, unbiased var 0.75/3 = 0.25, std 0.5.
    # group 1 = [2, 2, 2, 2]: zero variance -> exactly 0.
    out = group_advantages(torch.tensor([1.0, 0, 1, 1, 2, 2, 2, 2]), num_generations=4)
    d = 0.5 + 1e-4
    close(out.advantages, [0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d, 0, 0, 0, 0])
    assert torch.all(out.advantages[4:] == 0)
    assert out.zero_variance_groups == 1
    assert out.num_groups == 2
    assert out.nonfinite_rewards == 0
    assert out.zero_variance_fraction == 0.5


def test_none_and_batch_scaling_by_hand() -> None:
    rewards = torch.tensor([1.0, 0, 1, 1, 2, 2, 2, 2])
    none = group_advantages(rewards, 4, scale_rewards="none")
    close(none.advantages, [0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0])
    # whole batch: mean 11/8 = 1.375; squared deviations 3*0.375^2 + 1.375^2 + 4*0.625^2
    # = 0.421875 + 1.890625 + 1.5625 = 3.875; unbiased std = sqrt(3.875 / 7) ~= 0.744024
    batch = group_advantages(rewards, 4, scale_rewards="batch")
    d = math.sqrt(3.875 / 7) + 1e-4
    close(batch.advantages, [0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d, 0, 0, 0, 0])
    assert batch.zero_variance_groups == 1


def test_group_mean_is_subtracted_per_group() -> None:
    # [0, 2] -> mean 1, unbiased std sqrt(2); [10, 14] -> mean 12, std sqrt(8) = 2*sqrt(2)
    out = group_advantages(torch.tensor([0.0, 2, 10, 14]), 2, eps=0.0)
    s = 1 / math.sqrt(2)
    close(out.advantages, [-s, s, -s, s])


def test_nonfinite_rewards_are_excluded_and_zeroed() -> None:
    rewards = torch.tensor([
        1.0, NAN, 3.0, 5.0,   # finite {1, 3, 5}: mean 3, devs -2, 0, 2, var 8/2 = 4, std 2
        INF, 2.0, 2.0, 7.0,   # finite {2, 2, 7}: mean 11/3, devs -5/3, -5/3, 10/3, var (150/9)/2 = 25/3
        NAN, NAN, NAN, 4.0,   # one finite reward -> zero variance
        -INF, 5.0, 5.0, 5.0,  # finite rewards equal -> zero variance
    ])
    out = group_advantages(rewards, 4)
    d0 = 2.0 + 1e-4
    d1 = math.sqrt(25 / 3) + 1e-4
    close(out.advantages, [-2 / d0, 0, 0, 2 / d0,
                           0, (-5 / 3) / d1, (-5 / 3) / d1, (10 / 3) / d1,
                           0, 0, 0, 0,
                           0, 0, 0, 0])
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[1] == 0 and out.advantages[4] == 0
    assert out.nonfinite_rewards == 6
    assert out.zero_variance_groups == 2
    assert out.num_groups == 4
    assert out.zero_variance_fraction == 0.5


def test_batch_scaling_ignores_nonfinite() -> None:
    # finite rewards [0, 2, 4]: mean 2, unbiased var (4 + 0 + 4)/2 = 4, std 2.
    # group 0 = [0, 2]: mean 1 -> devs -1, 1; group 1 = [4, nan]: one finite reward -> zero variance
    out = group_advantages(torch.tensor([0.0, 2.0, 4.0, NAN]), 2, scale_rewards="batch", eps=0.0)
    close(out.advantages, [-0.5, 0.5, 0.0, 0.0])
    assert out.zero_variance_groups == 1 and out.nonfinite_rewards == 1


def test_integer_rewards_and_all_zero_variance() -> None:
    out = group_advantages(torch.tensor([3, 3, 3]), 3)
    assert out.advantages.dtype == torch.float32
    assert torch.all(out.advantages == 0)
    assert out.zero_variance_groups == 1 and out.zero_variance_fraction == 1.0


def test_group_advantages_validation() -> None:
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(4), 0)


# ---- clipped surrogate ------------------------------------------------------------------------------------------
def _surrogate_inputs(ratios: list[float], advs: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.log(torch.tensor(ratios)).requires_grad_(True)
    return logp, torch.zeros(len(ratios)), torch.tensor(advs)


def test_clipped_surrogate_by_hand() -> None:
    ratios = [1.5, 0.5, 1.1, 0.7, 1.5, 0.5, 1.25]
    advs = [1.0, -1.0, 2.0, 1.0, -1.0, 1.0, 1.0]
    logp, old, adv = _surrogate_inputs(ratios, advs)
    out = clipped_surrogate(logp, old, adv, epsilon=0.2)
    # -min(r*A, clip(r, 0.8, 1.2)*A) token by token:
    #  r=1.5,A=1: min(1.5, 1.2)=1.2      r=0.5,A=-1: min(-0.5, -0.8)=-0.8    r=1.1,A=2: 2.2
    #  r=0.7,A=1: min(0.7, 0.8)=0.7      r=1.5,A=-1: min(-1.5, -1.2)=-1.5    r=0.5,A=1: min(0.5, 0.8)=0.5
    #  r=1.25,A=1: min(1.25, 1.2)=1.2
    close(out.loss, [-1.2, 0.8, -2.2, -0.7, 1.5, -0.5, -1.2])
    close(out.ratio, ratios)
    assert out.clipped_low.tolist() == [False, True, False, False, False, False, False]
    assert out.clipped_high.tolist() == [True, False, False, False, False, False, True]
    assert out.clipped.tolist() == [True, True, False, False, False, False, True]
    # d loss / d logp = -r*A where the unclipped branch is active, 0 where the clip is active
    out.loss.sum().backward()
    close(logp.grad, [0.0, 0.0, -2.2, -0.7, 1.5, -0.5, 0.0])


def test_clipped_surrogate_asymmetric_epsilon() -> None:
    logp, old, adv = _surrogate_inputs([1.5, 1.25, 0.7], [1.0, 1.0, -1.0])
    out = clipped_surrogate(logp, old, adv, epsilon=0.2, epsilon_high=0.28)
    # clip range [0.8, 1.28]: r=1.5 -> 1.28 (clipped high); r=1.25 unclipped; r=0.7,A=-1: min(-0.7, -0.8) = -0.8
    close(out.loss, [-1.28, -1.25, 0.8])
    assert out.clipped_high.tolist() == [True, False, False]
    assert out.clipped_low.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="epsilon"):
        clipped_surrogate(logp, old, adv, epsilon=-0.1)


def test_k3_kl_by_hand() -> None:
    ln2 = math.log(2.0)
    logp = torch.tensor([0.0, ln2, -1.0])
    ref = torch.tensor([ln2, 0.0, -1.0])
    # d = ref - logp:  d = ln2 -> 2 - ln2 - 1 = 0.306853;  d = -ln2 -> 0.5 + ln2 - 1 = 0.193147;  d = 0 -> 0
    close(k3_kl(logp, ref), [1 - ln2, ln2 - 0.5, 0.0])
    assert k3_kl(logp, ref).min() >= 0


# ---- aggregation ------------------------------------------------------------------------------------------------
def _agg_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    per_token = torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40], [NAN, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    return per_token, mask


def test_token_mean_by_hand() -> None:
    per_token, mask = _agg_inputs()
    # (1 + 2 + 40) / 3 scored tokens; the NaN sits at an unscored position
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(43 / 3)
    assert aggregate_loss(per_token, mask.float(), "token_mean").item() == pytest.approx(43 / 3)


def test_seq_mean_by_hand() -> None:
    per_token, mask = _agg_inputs()
    # sequence means (1 + 2)/2 = 1.5 and 40/1 = 40; the third sequence has no scored token
    assert aggregate_loss(per_token, mask, "seq_mean").item() == pytest.approx((1.5 + 40) / 2)


def test_masked_mean_by_hand() -> None:
    per_token, mask = _agg_inputs()
    assert masked_mean(per_token, mask).item() == pytest.approx(43 / 3)
    close(masked_mean(per_token, mask, dim=1), [1.5, 40.0, 0.0])


def test_empty_mask_gives_zero_with_graph() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for loss_type in LOSS_TYPES:
        loss = aggregate_loss(x, mask, loss_type)
        assert loss.item() == 0.0
        loss.backward()
    assert torch.all(x.grad == 0)


def test_aggregate_loss_validation() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(torch.zeros(2, 2), torch.ones(2, 2), "sum")
