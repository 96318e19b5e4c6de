"""Log-probability estimators: plan invariants per estimator, reproducibility, and log-probs from a tiny policy."""

from __future__ import annotations

import math

import pytest
import torch

from htgrpo.algorithms.estimators import (
    ESTIMATORS,
    ScoringPass,
    ScoringPlan,
    build_estimator,
    mask_prompt_words,
    token_log_probs,
)
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy, PromptTokens
from htgrpo.policies.shapes_llada import toy_masked_diffusion_policy
from htgrpo.policies.sampling import SampledImageTokens, maskgit_commit_counts, maskgit_sample
from htgrpo.policies.t2i_layout import MASKED

PROMPTS = ["a photo of a red circle", "two blue squares", "a green triangle left of a yellow diamond"]
B, N, C, T = 4, 64, 10, 12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fake_rollout(seed: int = 0, batch: int = B, tokens: int = N, steps: int = T) -> SampledImageTokens:
    """A finished MaskGIT-like rollout: random codes, commit steps following the cosine commit counts."""
    g = gen(seed)
    counts = torch.tensor(maskgit_commit_counts(tokens, steps))
    base = torch.repeat_interleave(torch.arange(steps), counts)
    step = torch.stack([base[torch.randperm(tokens, generator=g)] for _ in range(batch)])
    codes = torch.randint(0, C, (batch, tokens), generator=g)
    return SampledImageTokens(codes, step, torch.rand(batch, tokens, generator=g),
                              torch.rand(batch, tokens, generator=g), steps)


def random_candidates(seed: int, frac: float = 0.4, shape=(B, N)) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed)) < frac


def all_estimators():
    return [build_estimator(name) for name in ESTIMATORS]


@pytest.fixture(scope="module")
def policy() -> MaskedDiffusionPolicy:
    world = ShapesWorldConfig.roomy(grid_size=10, cell_px=2, max_object_size=5)  # 100 image tokens
    return toy_masked_diffusion_policy(world, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_text_len=12)


@pytest.fixture(scope="module")
def prompt(policy):
    return policy.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def rollout(policy, prompt) -> SampledImageTokens:
    return maskgit_sample(policy, prompt, num_steps=T, guidance_scale=0.0, generator=gen(7))


def fake_prompt(batch: int = B):
    """Left-padded word ids with varying lengths (mask 1 on real words)."""
    L = 8
    lengths = torch.tensor([8, 5, 2, 0][:batch])
    mask = (torch.arange(L)[None] >= (L - lengths)[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(5, 20, (batch, L), generator=gen(3)), torch.zeros(batch, L).long())
    return PromptTokens(ids, mask)


def make_plan(est, sampled, cand, k=0, K=6, seed=0, prompt=None):
    return est.plan(sampled, cand, k, K, gen(seed), prompt=fake_prompt(sampled.codes.shape[0]) if prompt is None
                    else prompt)


# ---------------------------------------------------------------------------------------------------------------
# Plan invariants
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("frac", [1.0, 0.4])
def test_every_plan_scores_only_masked_candidates_at_most_once(name, frac):
    est = build_estimator(name)
    sampled = fake_rollout(1)
    cand = random_candidates(2, frac)
    for k in range(6):
        plan = make_plan(est, sampled, cand, k=k, seed=10 + k)
        assert plan.num_forward_passes == len(plan.passes) >= 1
        count = torch.zeros(B, N, dtype=torch.long)
        for p in plan.passes:
            assert p.canvas.shape == (B, N) and p.scored.dtype == torch.bool
            assert not (p.scored & (p.canvas != MASKED)).any()  # scored ⊆ hidden
            assert not (p.scored & ~cand).any()  # scored ⊆ candidates
            visible = p.canvas != MASKED
            assert torch.equal(p.canvas[visible], sampled.codes[visible])  # visible = rollout codes
            count += p.scored.long()
        assert count.max() <= 1
        assert torch.equal(plan.scored, count > 0)
        plan.validate(cand, sampled.codes)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_same_seed_same_plan_and_different_seed_differs(name):
    est = build_estimator(name)
    sampled, cand = fake_rollout(4), random_candidates(5, 0.7)
    a, b = make_plan(est, sampled, cand, k=2, seed=3), make_plan(est, sampled, cand, k=2, seed=3)
    assert a.num_forward_passes == b.num_forward_passes
    for p, q in zip(a.passes, b.passes):
        assert torch.equal(p.canvas, q.canvas) and torch.equal(p.scored, q.scored)
        assert (p.prompt_mask is None) == (q.prompt_mask is None)
        if p.prompt_mask is not None:
            assert torch.equal(p.prompt_mask, q.prompt_mask)
    if name in ("unigrpo", "maskgrpo", "coupled", "d1"):  # random estimators: another seed gives another plan
        c = make_plan(est, sampled, cand, k=2, seed=4)
        if name == "d1":
            assert not torch.equal(a.passes[0].prompt_mask, c.passes[0].prompt_mask)
        else:
            assert not torch.equal(a.passes[0].canvas, c.passes[0].canvas)


def test_prompt_conditioned_contexts():
    sampled, cand = fake_rollout(0), random_candidates(1, 0.3)
    masked = build_estimator("prompt_conditioned").plan(sampled, cand, 0, 6, gen(0))
    assert masked.num_forward_passes == 1
    (p,) = masked.passes
    assert (p.canvas == MASKED).all() and torch.equal(p.scored, cand) and p.prompt_mask is None
    unscored = build_estimator("prompt_conditioned", context="unscored").plan(sampled, cand, 0, 6, gen(0))
    (q,) = unscored.passes
    assert torch.equal(q.canvas == MASKED, cand) and torch.equal(q.scored, cand)
    assert torch.equal(q.canvas[~cand], sampled.codes[~cand])
    # no candidates: nothing to score, no forward pass
    empty = build_estimator("prompt_conditioned").plan(sampled, torch.zeros(B, N, dtype=torch.bool), 0, 6, gen(0))
    assert empty.num_forward_passes == 0 and not empty.scored.any() and empty.scored.shape == (B, N)


def test_unigrpo_structured_ratios_are_uniformly_spaced():
    est = build_estimator("unigrpo")
    sampled, cand = fake_rollout(0), torch.ones(B, N, dtype=torch.bool)
    K = 4
    for k in range(K):
        p_k = 0.1 + 0.8 * (k + 0.5) / K
        assert est.mask_ratio(k, K) == pytest.approx(p_k)
        (p,) = est.plan(sampled, cand, k, K, gen(k)).passes
        n = (p.canvas == MASKED).sum(1)
        assert (n == max(1, round(p_k * N))).all()
        assert torch.equal(p.scored, p.canvas == MASKED)  # all candidates: scored = masked
    # unstructured: per-sample ratios within [lower, upper]
    est = build_estimator("unigrpo", lower=0.2, upper=0.5, structured=False)
    counts = torch.cat([(est.plan(fake_rollout(s), cand, 0, 1, gen(s)).passes[0].canvas == MASKED).sum(1)
                        for s in range(10)])
    assert counts.min() >= round(0.2 * N) and counts.max() <= round(0.5 * N) and len(set(counts.tolist())) > 1


def test_maskgrpo_mask_counts_follow_rising_ratio():
    K = 6
    est = build_estimator("maskgrpo")
    sampled, cand = fake_rollout(0), random_candidates(9, 0.5)
    for k in range(K):
        r_k = min(0.6 + 0.4 * (k + 1) / K, 0.999)
        assert est.mask_ratio(k, K) == pytest.approx(r_k)
        (p,) = est.plan(sampled, cand, k, K, gen(k)).passes
        assert ((p.canvas == MASKED).sum(1) == round(r_k * N)).all()
        assert torch.equal(p.scored, (p.canvas == MASKED) & cand)
    # the last iteration is capped at 0.999 (not fully masked for N large enough)
    big = fake_rollout(0, batch=1, tokens=2000, steps=4)
    (p,) = est.plan(big, torch.ones(1, 2000, dtype=torch.bool), K - 1, K, gen(0)).passes
    assert int((p.canvas == MASKED).sum()) == round(0.999 * 2000)


def test_coupled_scores_every_candidate_exactly_once():
    est = build_estimator("coupled")
    sampled, cand = fake_rollout(2), random_candidates(3, 0.6)
    plan = est.plan(sampled, cand, 0, 6, gen(0))
    assert plan.num_forward_passes == 2
    a, b = plan.passes
    assert torch.equal(a.canvas == MASKED, ~(b.canvas == MASKED))  # complementary masks
    count = a.scored.long() + b.scored.long()
    assert torch.equal(count, cand.long())
    ratio = (a.canvas == MASKED).float().mean(1)
    assert (ratio >= 0.1 - 1 / N).all() and (ratio <= 0.9 + 1 / N).all()


def test_trace_passes_follow_commit_step_blocks():
    est = build_estimator("trace")
    assert est.shrink == 4 and est.blocks(12) == [(0, 4), (4, 8), (8, 12)]
    sampled, cand = fake_rollout(5), random_candidates(6, 0.5)
    plan = est.plan(sampled, cand, 0, 6, gen(0))
    assert plan.num_forward_passes == 3
    step = sampled.commit_step
    for p, (s0, s1) in zip(plan.passes, est.blocks(T)):
        assert torch.equal(p.canvas == MASKED, step >= s0)  # hides exactly the tokens committed at/after s0
        assert torch.equal(p.scored, (step >= s0) & (step < s1) & cand)
    assert torch.equal(plan.scored, cand)  # every candidate is in exactly one block
    # uneven last block and single-step blocks
    assert build_estimator("trace", shrink=5).blocks(12) == [(0, 5), (5, 10), (10, 12)]
    one = build_estimator("trace", shrink=1).plan(sampled, torch.ones(B, N, dtype=torch.bool), 0, 1, gen(0))
    assert one.num_forward_passes == T
    # blocks with no scored token cost no pass
    only_late = step >= 8
    late = est.plan(sampled, only_late, 0, 6, gen(0))
    assert late.num_forward_passes == 1 and torch.equal(late.scored, only_late)


def test_trace_rejects_unrecorded_rollouts():
    sampled = fake_rollout(0)
    sampled.commit_step[0, 0] = -1
    with pytest.raises(ValueError, match="commit_step"):
        build_estimator("trace").plan(sampled, torch.ones(B, N, dtype=torch.bool), 0, 1, gen(0))


def test_d1_masks_only_real_prompt_words():
    est = build_estimator("d1", p_mask_prompt=0.5)
    sampled, cand = fake_rollout(0), random_candidates(1, 0.5)
    prompt = fake_prompt()
    seen = torch.zeros_like(prompt.mask, dtype=torch.bool)
    masks = []
    for k in range(20):
        (p,) = est.plan(sampled, cand, k % 6, 6, gen(100 + k), prompt=prompt).passes
        assert (p.canvas == MASKED).all() and torch.equal(p.scored, cand)
        assert not (p.prompt_mask & ~prompt.mask.bool()).any()  # never a pad
        seen |= p.prompt_mask
        masks.append(p.prompt_mask)
    assert torch.equal(seen, prompt.mask.bool())  # every real word gets masked sometimes
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1  # fresh mask each iteration
    none = build_estimator("d1", p_mask_prompt=0.0).plan(sampled, cand, 0, 6, gen(0), prompt=prompt)
    assert not none.passes[0].prompt_mask.any()
    with pytest.raises(ValueError, match="prompt"):
        est.plan(sampled, cand, 0, 6, gen(0))
    masked = mask_prompt_words(prompt, torch.ones_like(prompt.mask, dtype=torch.bool), 99)
    assert torch.equal(masked.mask, prompt.mask)
    assert (masked.ids[prompt.mask.bool()] == 99).all() and torch.equal(masked.ids[prompt.mask == 0],
                                                                        prompt.ids[prompt.mask == 0])


def test_plan_validate_catches_broken_plans():
    codes = torch.randint(0, C, (2, 8), generator=gen(0))
    hidden = torch.full_like(codes, MASKED)
    scored = torch.zeros(2, 8, dtype=torch.bool)
    scored[0, 0] = True
    with pytest.raises(AssertionError, match="more than one pass"):
        ScoringPlan([ScoringPass(hidden, scored), ScoringPass(hidden, scored)]).validate()
    with pytest.raises(AssertionError, match="shows"):
        ScoringPlan([ScoringPass(codes, scored)]).validate()
    with pytest.raises(AssertionError, match="non-candidates"):
        ScoringPlan([ScoringPass(hidden, scored)]).validate(torch.zeros(2, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------------------------


def test_registry_and_argument_errors():
    assert set(ESTIMATORS) == {"prompt_conditioned", "unigrpo", "maskgrpo", "d1", "coupled", "trace"}
    for est in all_estimators():
        assert ESTIMATORS[est.name] is type(est)
    with pytest.raises(ValueError, match="algorithm.estimator.name") as err:
        build_estimator("grpo_magic")
    assert "maskgrpo" in str(err.value) and "prompt_conditioned" in str(err.value)
    with pytest.raises(ValueError, match="lower"):
        build_estimator("unigrpo", lower=0.8, upper=0.2)
    with pytest.raises(ValueError, match="upper"):
        build_estimator("coupled", upper=1.5)
    with pytest.raises(ValueError, match="min_mask_rate"):
        build_estimator("maskgrpo", min_mask_rate=-0.1)
    with pytest.raises(ValueError, match="p_mask_prompt"):
        build_estimator("d1", p_mask_prompt=2)
    with pytest.raises(ValueError, match="shrink"):
        build_estimator("trace", shrink=0)
    with pytest.raises(ValueError, match="context"):
        build_estimator("prompt_conditioned", context="visible")
    with pytest.raises(ValueError, match="bogus"):
        build_estimator("maskgrpo", bogus=1)
    with pytest.raises(ValueError, match="candidates"):
        build_estimator("maskgrpo").plan(fake_rollout(0), torch.ones(B, N + 1, dtype=torch.bool), 0, 6, gen(0))
    with pytest.raises(ValueError, match="iteration"):
        build_estimator("maskgrpo").plan(fake_rollout(0), torch.ones(B, N, dtype=torch.bool), 6, 6, gen(0))


# ---------------------------------------------------------------------------------------------------------------
# Log-probs from a policy
# ---------------------------------------------------------------------------------------------------------------


def hand_log_probs(policy, prompt, codes, plan):
    out = torch.zeros(codes.shape)
    for p in plan.passes:
        pr = prompt
        if p.prompt_mask is not None:
            pr = type(prompt)(prompt.ids.masked_fill(p.prompt_mask, policy.layout.mask), prompt.mask)
        logits = policy.image_logits(p.canvas, pr)
        lp = torch.log_softmax(logits, -1).gather(-1, codes[..., None])[..., 0]
        out[p.scored] = lp[p.scored]
    return out


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_token_log_probs_match_hand_computed_gather(policy, prompt, rollout, name):
    est = build_estimator(name, **({"p_mask_prompt": 0.5} if name == "d1" else {}))
    n = policy.num_image_tokens
    cand = random_candidates(11, 0.5, shape=(3, n))
    plan = est.plan(rollout, cand, 1, 4, gen(21), prompt=prompt)
    with torch.no_grad():
        got = token_log_probs(policy, prompt, rollout.codes, plan)
        full = token_log_probs(policy, prompt, rollout.codes, plan, gather_positions=False)
        want = hand_log_probs(policy, prompt, rollout.codes, plan)
    assert got.logp.dtype == torch.float32 and got.logp.shape == (3, n)
    assert torch.equal(got.scored, plan.scored)
    assert (got.logp[~got.scored] == 0).all()
    assert (got.logp[got.scored] < 0).all() and (got.logp[got.scored] > -math.log(policy.codebook_size) * 10).all()
    assert torch.allclose(got.logp, want, atol=1e-5)
    assert torch.allclose(full.logp, want, atol=1e-6)


@pytest.mark.parametrize("name", ["prompt_conditioned", "coupled", "trace"])
def test_token_entropy_matches_hand_computed_and_leaves_log_probs_alone(policy, prompt, rollout, name):
    """``with_entropy``: H = −Σ_c p log p over the image codes of each pass's own logits at its scored tokens (0
    elsewhere), from both head paths; the log-probs are bitwise those of the call without it."""
    est = build_estimator(name)
    plan = est.plan(rollout, random_candidates(5, 0.5, shape=(3, policy.num_image_tokens)), 1, 4, gen(3),
                    prompt=prompt)
    want = torch.zeros(rollout.codes.shape)
    with torch.no_grad():
        for p in plan.passes:
            logp_all = torch.log_softmax(policy.image_logits(p.canvas, prompt), -1)
            ent = -(logp_all.exp() * logp_all).sum(-1)
            want[p.scored] = ent[p.scored]
        plain = token_log_probs(policy, prompt, rollout.codes, plan)
        got = token_log_probs(policy, prompt, rollout.codes, plan, with_entropy=True)
        full = token_log_probs(policy, prompt, rollout.codes, plan, gather_positions=False, with_entropy=True)
    assert plain.entropy is None and torch.equal(got.logp, plain.logp)
    assert torch.allclose(got.entropy, want, atol=1e-5) and torch.allclose(full.entropy, want, atol=1e-5)
    assert (got.entropy[~plan.scored] == 0).all()
    assert bool((got.entropy[plan.scored] > 0).all()) and bool((got.entropy <= math.log(policy.codebook_size) + 1e-4).all())


def test_d1_prompt_masking_changes_log_probs(policy, prompt, rollout):
    cand = torch.ones(3, policy.num_image_tokens, dtype=torch.bool)
    plain = build_estimator("d1", p_mask_prompt=0.0).plan(rollout, cand, 0, 1, gen(0), prompt=prompt)
    heavy = build_estimator("d1", p_mask_prompt=1.0).plan(rollout, cand, 0, 1, gen(0), prompt=prompt)
    pc = build_estimator("prompt_conditioned").plan(rollout, cand, 0, 1, gen(0))
    with torch.no_grad():
        a = token_log_probs(policy, prompt, rollout.codes, plain).logp
        b = token_log_probs(policy, prompt, rollout.codes, heavy).logp
        c = token_log_probs(policy, prompt, rollout.codes, pc).logp
    assert torch.equal(a, c)  # no prompt masking = the prompt-conditioned fully masked pass
    assert not torch.allclose(a, b)


def test_gradient_flows_through_token_log_probs(policy, prompt, rollout):
    plan = build_estimator("coupled").plan(rollout, torch.ones(3, policy.num_image_tokens, dtype=torch.bool),
                                           0, 1, gen(0))
    policy.zero_grad(set_to_none=True)
    out = token_log_probs(policy, prompt, rollout.codes, plan)
    assert out.logp.requires_grad
    out.logp[out.scored].mean().backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not token_log_probs(policy, prompt, rollout.codes, plan).logp.requires_grad
