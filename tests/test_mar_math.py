"""MAR-GRPO arithmetic against hand-computed values (reference/mar_grpo.md §1.5-§1.9, §4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from htgrpo.algorithms.mar_math import (
    CHANNEL_REDUCTIONS,
    KL_TYPES,
    MTE_MODES,
    RATIO_MODES,
    chain_log_prob,
    consistency_mask,
    gaussian_log_prob,
    gaussian_mean_kl,
    importance_ratio,
    mar_grpo_loss,
    multi_trajectory_log_prob,
    selection_masks,
    token_uncertainty,
    top_k_count,
    top_k_percent_mask,
)

NAN = float("nan")


def close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_allowed_names() -> None:
    assert CHANNEL_REDUCTIONS == ("sum", "mean", "none")
    assert MTE_MODES == ("mean_log_prob", "log_mean_prob")
    assert KL_TYPES == ("gaussian", "released")
    assert RATIO_MODES == ("released", "ppo")


# ---- gaussian_log_prob / chain_log_prob ------------------------------------------------------------------------
def test_gaussian_log_prob_hand_value() -> None:
    # x=1, mu=0, s=1: -1/2 - 0.5*log(2*pi) = -1.4189385 per channel; 2 channels.
    lp = gaussian_log_prob(torch.ones(1, 2), torch.zeros(1, 2), 0.0)
    close(lp, [-2 * 1.4189385])
    close(gaussian_log_prob(torch.ones(1, 2), torch.zeros(1, 2), 0.0, reduce="mean"), [-1.4189385])
    # s^2 = 4 (s = 2), x - mu = 2: -4/8 - log 2 - 0.9189385 = -2.1120857
    close(gaussian_log_prob(torch.tensor([[2.0]]), torch.zeros(1, 1), math.log(4.0)), [-2.1120857])


def test_gaussian_log_prob_matches_normal() -> None:
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    lv = torch.randn(3, 5, 4, generator=g)
    ref = Normal(mu, torch.exp(0.5 * lv)).log_prob(x)
    close(gaussian_log_prob(x, mu, lv, reduce="none"), ref)
    close(gaussian_log_prob(x, mu, lv), ref.sum(-1))
    close(gaussian_log_prob(x, mu, lv, reduce="mean"), ref.mean(-1))
    # broadcast log-variance (one per token), as with a stored per-step std
    lv_tok = torch.randn(3, 5, 1, generator=g)
    close(gaussian_log_prob(x, mu, lv_tok), Normal(mu, torch.exp(0.5 * lv_tok)).log_prob(x).sum(-1))


def test_gaussian_log_prob_min_std_and_grad() -> None:
    x, mu = torch.tensor([[0.5]]), torch.tensor([[0.0]], requires_grad=True)
    tiny = gaussian_log_prob(x, mu, 2 * math.log(1e-9), min_std=1e-3)
    close(tiny, gaussian_log_prob(x, mu.detach(), 2 * math.log(1e-3)))
    lp = gaussian_log_prob(x, mu, math.log(0.25))  # s^2 = 0.25: d lp / d mu = (x - mu)/s^2 = 2
    lp.sum().backward()
    close(mu.grad, [[2.0]])
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mu, 0.0, reduce="max")
    with pytest.raises(ValueError, match="min_std"):
        gaussian_log_prob(x, mu, 0.0, min_std=0.0)
    with pytest.raises(ValueError, match="mean shape"):
        gaussian_log_prob(x, torch.zeros(1, 2), 0.0)


def test_chain_log_prob_mean_and_sum() -> None:
    lp = torch.tensor([[1.0, 2.0], [NAN, NAN], [5.0, 6.0]])  # (T=3, N=2); step 1 not scored
    m = torch.tensor([True, False, True])
    close(chain_log_prob(lp, m), [3.0, 4.0])
    close(chain_log_prob(lp, m, reduce="sum"), [6.0, 8.0])
    close(chain_log_prob(lp, m.view(3, 1).expand(3, 2)), [3.0, 4.0])
    close(chain_log_prob(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), [2.0, 3.0])
    close(chain_log_prob(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), reduce="sum"), [4.0, 6.0])
    close(chain_log_prob(lp, torch.zeros(3, dtype=torch.bool)), [0.0, 0.0])  # no scored step
    with pytest.raises(ValueError, match="step_mask"):
        chain_log_prob(lp, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduce"):
        chain_log_prob(lp, m, reduce="max")


# ---- uncertainty and top-k ---------------------------------------------------------------------------------------
def test_token_uncertainty_by_hand() -> None:
    # token 0: channel stds (1/S) -> |2-0|/2 = 1 and |4-0|/2 = 2, mean 1.5; token 1: identical samples -> 0.
    s = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 4.0], [1.0, 1.0]]])  # (S=2, N=2, D=2)
    close(token_uncertainty(s), [1.5, 0.0])
    assert token_uncertainty(s.unsqueeze(1)).shape == (1, 2)  # (S, B, N, D) -> (B, N)
    close(token_uncertainty(torch.randn(1, 3, 4)), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="final_samples"):
        token_uncertainty(torch.zeros(3))


@pytest.mark.parametrize(("count", "k", "floor", "half_up"), [
    (10, 30, 3, 3), (1024, 30, 307, 307), (7, 30, 2, 2), (5, 30, 1, 2), (5, 50, 2, 3), (90, 70, 63, 63),
    (0, 30, 0, 0), (13, 0, 0, 0), (13, 100, 13, 13), (3, 99.9, 2, 3), (4, 12.5, 0, 1)])
def test_top_k_count_rounding(count: int, k: float, floor: int, half_up: int) -> None:
    assert top_k_count(count, k) == floor
    assert top_k_count(count, k, rounding="round") == half_up


@pytest.mark.parametrize("bad", [-1, 100.5, NAN, True, "30"])
def test_top_k_count_rejects_bad_percent(bad) -> None:
    with pytest.raises(ValueError, match="k_percent"):
        top_k_count(10, bad)


def test_top_k_mask_hand_and_ties() -> None:
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert top_k_percent_mask(s, 40).tolist() == [False, True, False, True, False]
    assert top_k_percent_mask(s, 0).tolist() == [False] * 5
    assert top_k_percent_mask(s, 100).tolist() == [True] * 5
    assert top_k_percent_mask(torch.ones(4), 50).tolist() == [True, True, False, False]  # ties: lower index
    assert top_k_percent_mask(torch.tensor([NAN, 0.0, 1.0]), 67).tolist() == [False, True, True]  # NaN last


@pytest.mark.parametrize("n", [1, 5, 16, 100, 1024])
@pytest.mark.parametrize("k", [0, 10, 30, 50, 99.9, 100])
def test_top_k_mask_exact_count(n: int, k: float) -> None:
    s = torch.randn(n, generator=torch.Generator().manual_seed(n))
    m = top_k_percent_mask(s, k)
    assert int(m.sum()) == top_k_count(n, k) == math.floor(k * n / 100 + 1e-9)
    if 0 < int(m.sum()) < n:
        assert s[m].min() > s[~m].max()


def test_top_k_mask_per_row_with_padding() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7],
                           [0.2, 0.8, 0.4, 9.0, 9.0],    # last two are padding with huge scores
                           [1.0, 2.0, 3.0, 4.0, 5.0]])   # all padding
    valid = torch.tensor([[True] * 5, [True, True, True, False, False], [False] * 5])
    m = top_k_percent_mask(scores, 60, valid)
    # row 0: floor(3.0) = 3 -> 0.9, 0.7, 0.5; row 1: floor(1.8) = 1 -> 0.8; row 2: nothing.
    assert m.tolist() == [[True, False, True, False, True], [False, True, False, False, False], [False] * 5]
    m = top_k_percent_mask(scores, 60, valid, rounding="round")
    assert m.sum(1).tolist() == [3, 2, 0] and not bool((m & ~valid).any())
    assert (top_k_percent_mask(scores, 100, valid) == valid).all()
    g = torch.Generator().manual_seed(1)
    big, lens = torch.randn(4, 64, generator=g), [64, 50, 7, 1]
    valid = torch.arange(64)[None] < torch.tensor(lens)[:, None]
    m = top_k_percent_mask(big, 30, valid)
    assert m.sum(1).tolist() == [top_k_count(n, 30) for n in lens] == [19, 15, 2, 0]
    with pytest.raises(ValueError, match="valid shape"):
        top_k_percent_mask(big, 30, valid[:, :3])


# ---- MTE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MTE_MODES)
def test_mte_single_chain_equals_single_term(mode: str) -> None:
    single = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    out = multi_trajectory_log_prob(single, single.unsqueeze(0).clone(), torch.ones(2, 6, dtype=torch.bool), mode)
    assert torch.equal(out, single)


def test_mte_mixes_by_hand() -> None:
    single = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    mte = torch.tensor([[-2.0, -4.0, -6.0], [0.0, 0.0, -2.0]], requires_grad=True)
    unc = torch.tensor([True, False, True])
    out = multi_trajectory_log_prob(single, mte, unc)
    close(out, [-1.0, -2.0, -4.0])
    out.sum().backward()
    close(single.grad, [0.0, 1.0, 0.0])
    close(mte.grad, [[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])
    lme = multi_trajectory_log_prob(single.detach(), mte.detach(), unc, mode="log_mean_prob")
    close(lme, [math.log((math.exp(-2) + 1) / 2), -2.0, math.log((math.exp(-6) + math.exp(-2)) / 2)])
    with pytest.raises(ValueError, match="mte_terms"):
        multi_trajectory_log_prob(single, mte[:, :2], unc)
    with pytest.raises(ValueError, match="mode"):
        multi_trajectory_log_prob(single, mte, unc, mode="max")


# ---- consistency and selection masks ---------------------------------------------------------------------------
def test_consistency_mask_by_hand() -> None:
    final = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    prev = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])  # cos: 0, 1, 0.7071
    cur = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]])   # cos: 0.7071, 0.7071, 0.7071 (token 2 unchanged)
    assert consistency_mask(prev, cur, final).tolist() == [True, False, False]  # strict: delta 0 is dropped
    assert consistency_mask(prev, cur, final, threshold=-0.5).tolist() == [True, True, True]
    assert consistency_mask(prev, cur, final, threshold=0.7).tolist() == [True, False, False]
    assert consistency_mask(prev, cur, final, threshold=0.71).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="final_tokens"):
        consistency_mask(prev, cur, final[:2])


def test_selection_masks_nova_and_harmon_offset() -> None:
    before = torch.tensor([True, True, True, False])   # token 3 known before step i
    now = torch.tensor([True, False, False, False])    # token 0 generated at step i
    hard = torch.tensor([False, True, False, True])
    nova = selection_masks(before, now, hard)
    assert nova.policy.tolist() == [True, True, False, False]  # step-i token always kept
    assert nova.kl.tolist() == [True, True, True, False]
    harmon = selection_masks(before, now, hard, harmon_mask_offset=True)
    assert harmon.policy.tolist() == [False, True, False, False]  # step-i token excluded (quirk)
    assert harmon.kl.tolist() == [False, True, True, False]
    assert selection_masks(before, now).policy.tolist() == before.tolist()
    assert selection_masks(before, now, harmon_mask_offset=True).policy.tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="subset"):
        selection_masks(before, torch.tensor([False, False, False, True]))


# ---- KL ---------------------------------------------------------------------------------------------------------
def test_gaussian_mean_kl_closed_form() -> None:
    mu, ref = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    close(gaussian_mean_kl(mu, ref, math.log(4.0)), [(1 + 4) / 8])  # sum_c d^2 / (2 s^2)
    close(gaussian_mean_kl(mu, ref, math.log(4.0), reduce="mean"), [(1 + 4) / 16])
    s = torch.full((1, 2), 2.0)
    close(gaussian_mean_kl(mu, ref, math.log(4.0)), kl_divergence(Normal(mu, s), Normal(ref, s)).sum(-1))
    # released: d = ref - mu = (-1, -2); exp(d) - d - 1 = (e^-1, e^-2 + 1); no variance
    close(gaussian_mean_kl(mu, ref, kl_type="released"), [math.exp(-1) + math.exp(-2) + 1])
    close(gaussian_mean_kl(mu, ref, math.log(4.0), kl_type="released"), [math.exp(-1) + math.exp(-2) + 1])
    for kt in KL_TYPES:
        close(gaussian_mean_kl(mu, mu.clone(), 0.0, kl_type=kt), [0.0])
    # with s = 1 and a small gap both agree up to the cubic term sum_c d_c^3/6 = (-1 + 8)e-6/6 ~ 1.2e-6 (d = ref - mu)
    d = torch.tensor([[1e-2, -2e-2]])
    close(gaussian_mean_kl(d, torch.zeros(1, 2), 0.0), gaussian_mean_kl(d, torch.zeros(1, 2), kl_type="released"),
          tol=2e-6)
    with pytest.raises(ValueError, match="log_variance"):
        gaussian_mean_kl(mu, ref)
    with pytest.raises(ValueError, match="kl_type"):
        gaussian_mean_kl(mu, ref, 0.0, kl_type="k1")


# ---- ratio -------------------------------------------------------------------------------------------------------
def test_importance_ratio_modes() -> None:
    theta = torch.tensor([3.0, -1.0], requires_grad=True)
    logp = theta ** 2 * 0.1  # d logp / d theta = 0.2 * theta = (0.6, -0.2)
    r = importance_ratio(logp, torch.tensor([5.0, 5.0]), mode="released")  # logp_old ignored
    assert torch.equal(r.detach(), torch.ones(2))
    r.sum().backward()
    close(theta.grad, [0.6, -0.2])

    theta.grad = None
    old = torch.tensor([0.5, 0.0])
    logp = theta ** 2 * 0.1  # (0.9, 0.1)
    r = importance_ratio(logp, old, mode="ppo")
    close(r, [math.exp(0.4), math.exp(0.1)])
    r.sum().backward()
    close(theta.grad, [math.exp(0.4) * 0.6, math.exp(0.1) * -0.2])
    with pytest.raises(ValueError, match="logp_old"):
        importance_ratio(logp, mode="ppo")
    with pytest.raises(ValueError, match="mode"):
        importance_ratio(logp, old, mode="trpo")


# ---- loss --------------------------------------------------------------------------------------------------------
def _loss_inputs():
    logp = torch.tensor([[0.1, 0.0], [-0.5, 0.3]], requires_grad=True)
    return logp, torch.tensor([1.0, -1.0]), torch.tensor([[True, True], [True, False]])


def test_mar_grpo_loss_ppo_by_hand() -> None:
    logp, adv, mask = _loss_inputs()
    kl = torch.tensor([[0.2, 0.4], [0.6, 1.0]])
    out = mar_grpo_loss(logp, adv, mask, logp_old=torch.zeros(2, 2), kl=kl, kl_mask=torch.ones(2, 2),
                        beta=0.1, ratio_mode="ppo", epsilon=0.2)
    # tokens: r=e^.1, A=1 -> -1.10517; r=1, A=1 -> -1; r=e^-.5=.60653, A=-1 -> clip low: -min(-.60653,-.8)=.8
    e = math.exp(0.1)
    policy = (-e - 1 + 0.8) / 3
    close(out.policy_loss, policy)
    close(out.kl, 0.55)  # mean over all 4 tokens of kl_mask
    close(out.loss, policy + 0.1 * 0.55)
    assert out.kept_tokens == 3
    assert out.clip_fraction == pytest.approx(1 / 3)
    assert out.ratio_mean == pytest.approx((e + 1 + math.exp(-0.5)) / 3, abs=1e-6)
    assert out.ratio_min == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert out.ratio_max == pytest.approx(e, abs=1e-6)
    out.loss.backward()
    close(logp.grad, [[-e / 3, -1 / 3], [0.0, 0.0]])  # clipped token and padding get no gradient

    seq = mar_grpo_loss(logp.detach(), adv, mask, logp_old=torch.zeros(2, 2), ratio_mode="ppo",
                        loss_type="seq_mean")
    close(seq.loss, ((-e - 1) / 2 + 0.8) / 2)
    close(seq.kl, 0.0)


def test_mar_grpo_loss_released_by_hand() -> None:
    logp, adv, mask = _loss_inputs()
    kl = torch.tensor([[0.2, 0.4], [0.6, 1.0]])
    out = mar_grpo_loss(logp, adv, mask, kl=kl, beta=0.1)  # released ratio, kl_mask = mask
    close(out.policy_loss, -(1 + 1 - 1) / 3)  # value = -token mean of A
    close(out.loss, -1 / 3 + 0.1 * 0.4)
    assert (out.ratio_mean, out.ratio_min, out.ratio_max, out.clip_fraction) == (1.0, 1.0, 1.0, 0.0)
    out.loss.backward()
    close(logp.grad, [[-1 / 3, -1 / 3], [1 / 3, 0.0]])  # -A * d logp / n_kept; never clipped

    empty = mar_grpo_loss(logp, adv, torch.zeros(2, 2, dtype=torch.bool))
    assert empty.kept_tokens == 0 and float(empty.loss.detach()) == 0.0 and empty.loss.requires_grad
    with pytest.raises(ValueError, match="advantages"):
        mar_grpo_loss(logp, torch.ones(3), mask)
    with pytest.raises(ValueError, match="beta"):
        mar_grpo_loss(logp, adv, mask, beta=-1.0)


def test_composition_reproduces_released_harmon_gradient() -> None:
    """gaussian_log_prob(sum) -> chain mean -> MTE -> released loss == the release's elementwise Harmon loss."""
    g = torch.Generator().manual_seed(7)
    k, S, B, L, D = 3, 2, 2, 5, 4
    mu = torch.randn(k, B, L, D, generator=g, requires_grad=True)
    mu_s = torch.randn(S, k, B, L, D, generator=g, requires_grad=True)
    x, x_s = torch.randn(k, B, L, D, generator=g), torch.randn(S, k, B, L, D, generator=g)
    std = torch.rand(k, B, L, D, generator=g) + 0.5
    mu_ref = mu.detach() + 0.1 * torch.randn(k, B, L, D, generator=g)
    adv = torch.tensor([0.7, -1.3])
    mask = torch.rand(B, L, generator=g) > 0.3
    critic = torch.tensor([[True, False, False, True, False], [False, True, False, False, False]])
    beta = 0.01

    # the release: elementwise terms, [k*B, L, 1] masks against [k*B, L, D] losses
    def elem_lp(xx, mm):
        return -((xx - mm) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)

    lp = elem_lp(x, mu)
    single = torch.exp(lp - lp.detach()) * adv.view(1, B, 1, 1)
    lps = torch.stack([elem_lp(x_s[s], mu_s[s]) for s in range(S)])
    mte = (torch.exp(lps - lps.detach()) * adv.view(1, 1, B, 1, 1)).mean(0)
    c, m = critic.view(1, B, L, 1).float(), mask.view(1, B, L, 1).float()
    policy = (((1 - c) * single + c * mte) * m).sum() / (m.sum() * k)
    d = mu_ref - mu
    kl_el = torch.exp(d) - d - 1
    released = -(policy - beta * (kl_el * m).sum() / (m.sum() * k))
    g_mu, g_mus = torch.autograd.grad(released, [mu, mu_s])

    # the composition
    lv = 2 * torch.log(std)
    single_t = chain_log_prob(gaussian_log_prob(x, mu, lv))
    mte_t = torch.stack([chain_log_prob(gaussian_log_prob(x_s[s], mu_s[s], lv)) for s in range(S)])
    term = multi_trajectory_log_prob(single_t, mte_t, critic)
    kl = chain_log_prob(gaussian_mean_kl(mu, mu_ref, kl_type="released"))
    out = mar_grpo_loss(term, adv, mask, kl=kl, beta=beta, ratio_mode="released")
    c_mu, c_mus = torch.autograd.grad(out.loss, [mu, mu_s])
    close(c_mu, g_mu, tol=1e-6)
    close(c_mus, g_mus, tol=1e-6)
