"""Masked-diffusion policy and samplers: schedule, CFG, reproducibility, restricted logits, SFT loss, save/load."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
from htgrpo.policies.shapes_llada import toy_masked_diffusion_policy
from htgrpo.policies.sampling import emerge_sample, maskgit_commit_counts, maskgit_sample

PROMPTS = ["a photo of a red circle", "two blue squares", "a green triangle left of a yellow diamond"]


@pytest.fixture(scope="module")
def policy() -> MaskedDiffusionPolicy:
    world = ShapesWorldConfig.roomy(grid_size=10, cell_px=2, max_object_size=5)  # 100 image tokens
    return toy_masked_diffusion_policy(world, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_text_len=12).eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_commit_counts_follow_cosine_schedule():
    # N=16, T=4: keep floor(16·cos(π/8))=14, floor(16·cos(π/4))=11, floor(16·cos(3π/8))=6, then 0
    assert maskgit_commit_counts(16, 4) == [2, 3, 5, 6]
    assert maskgit_commit_counts(16, 4, "linear") == [4, 4, 4, 4]
    for n, t in [(100, 8), (256, 64), (10, 30)]:
        counts = maskgit_commit_counts(n, t)
        assert sum(counts) == n and all(c >= 0 for c in counts)
        # one or more per step until a single token is left; that one waits for the last step (keep_n >= 1)
        assert all(c >= 1 for c in counts[: min(n, t) - 1]) and counts[-1] >= 1


def test_maskgit_commits_each_token_once_on_schedule(policy):
    prompt = policy.encode_prompts(PROMPTS)
    out = maskgit_sample(policy, prompt, num_steps=6, guidance_scale=2.0, generator=gen(0))
    B, N = 3, policy.num_image_tokens
    assert out.codes.shape == out.commit_step.shape == out.confidence.shape == out.entropy.shape == (B, N)
    assert out.num_steps == 6
    assert ((out.codes >= 0) & (out.codes < policy.codebook_size)).all()
    assert ((out.commit_step >= 0) & (out.commit_step < 6)).all()
    expected = torch.tensor(maskgit_commit_counts(N, 6))
    for row in out.commit_step:
        assert torch.equal(torch.bincount(row, minlength=6), expected)
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
    assert ((out.entropy >= 0) & (out.entropy <= math.log(policy.codebook_size) + 1e-4)).all()


def test_guidance_zero_is_the_conditional_pass_and_cfg_combines(policy):
    prompt = policy.encode_prompts(PROMPTS)
    codes = torch.randint(-1, policy.codebook_size, (3, policy.num_image_tokens), generator=gen(1))
    with torch.no_grad():
        cond = policy.image_logits(codes, prompt)
        unc = policy.image_logits(codes, prompt, uncond=True)
        assert torch.equal(policy.guided_image_logits(codes, prompt, 0.0), cond)
        guided = policy.guided_image_logits(codes, prompt, 2.5)
    assert cond.shape == (3, policy.num_image_tokens, policy.codebook_size)
    assert not torch.allclose(cond, unc)
    assert torch.allclose(guided, 3.5 * cond - 2.5 * unc, atol=1e-4)
    # with s = 0 the sampler's logits are exactly the conditional ones: same samples as a direct logits_fn
    direct = maskgit_sample(
        lambda c, s: policy.image_logits(c, prompt), torch.full((3, policy.num_image_tokens), -1),
        num_steps=4, guidance_scale=0.0, generator=gen(2),
    )
    via_policy = maskgit_sample(policy, prompt, num_steps=4, guidance_scale=0.0, generator=gen(2))
    assert torch.equal(direct.codes, via_policy.codes) and torch.equal(direct.commit_step, via_policy.commit_step)


def test_prompt_padding_does_not_change_image_logits(policy):
    longer = MaskedDiffusionPolicy(
        policy.backbone, replace(policy.layout, max_text_len=20), policy.text_tokenizer, policy.image_tokenizer
    )
    codes = torch.randint(-1, policy.codebook_size, (3, policy.num_image_tokens), generator=gen(3))
    with torch.no_grad():
        a = policy.image_logits(codes, policy.encode_prompts(PROMPTS))
        b = longer.image_logits(codes, longer.encode_prompts(PROMPTS))
    assert torch.allclose(a, b, atol=1e-4)


def test_seeds_reproduce_and_differ(policy):
    for sampler in (maskgit_sample, emerge_sample):
        a = sampler(policy, PROMPTS, num_steps=4, generator=gen(7))
        b = sampler(policy, PROMPTS, num_steps=4, generator=gen(7))
        c = sampler(policy, PROMPTS, num_steps=4, generator=gen(8))
        assert torch.equal(a.codes, b.codes) and torch.equal(a.commit_step, b.commit_step)
        assert torch.equal(a.confidence, b.confidence)
        assert not torch.equal(a.codes, c.codes)


def test_emerge_commits_everything(policy):
    out = emerge_sample(policy, PROMPTS, num_steps=5, guidance_scale=3.0, generator=gen(4))
    assert ((out.codes >= 0) & (out.codes < policy.codebook_size)).all()
    assert ((out.commit_step >= 0) & (out.commit_step < 5)).all()
    # ancestral: about N·(κ_t − κ_s) per step; the first step commits cos-schedule's small share
    first = (out.commit_step == 0).float().mean().item()
    assert first < 0.3


def test_maskgit_commits_most_confident_first():
    N, C = 12, 5
    peak = torch.linspace(0.0, 6.0, N)  # position i gets more confident with i

    def logits_fn(codes, s):
        logits = torch.zeros(codes.shape[0], N, C)
        logits[..., 0] = peak
        return logits

    out = maskgit_sample(logits_fn, torch.full((2, N), -1), num_steps=4, temperature=0.0)
    assert (out.codes == 0).all()
    steps = out.commit_step[0]
    assert (steps[1:] <= steps[:-1]).all() and steps[-1] == 0 and steps[0] == 3
    p = torch.softmax(torch.stack([peak] + [torch.zeros(N)] * (C - 1), -1), -1)
    assert torch.allclose(out.confidence[0], p[:, 0])
    assert torch.allclose(out.entropy[0], -(p * p.log()).sum(-1))


def test_restricted_and_full_vocabulary_logits_give_identical_samples(policy):
    a = maskgit_sample(policy, PROMPTS, num_steps=4, guidance_scale=3.0, generator=gen(5))
    b = maskgit_sample(policy, PROMPTS, num_steps=4, guidance_scale=3.0, generator=gen(5), full_vocab=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.commit_step, b.commit_step)
    assert torch.allclose(a.confidence, b.confidence, atol=1e-5)


def test_training_loss_is_finite_and_overfits_one_batch():
    world = ShapesWorldConfig.roomy(grid_size=10, cell_px=2, max_object_size=5)
    policy = toy_masked_diffusion_policy(world, d_model=32, n_layers=2, max_text_len=12, seed=1)
    prompt = policy.encode_prompts(PROMPTS)
    codes = torch.zeros(3, 10, 10, dtype=torch.long)  # one coloured square per image on the background
    codes[0, 2:6, 2:6], codes[1, 4:9, 1:6], codes[2, 0:5, 5:10] = 1, 5, 4
    codes = codes.flatten(1)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = policy.training_loss(codes, prompt, generator=gen(0), cond_dropout=0.0)
        assert torch.isfinite(out.loss) and 0 < out.mask_ratio <= 1
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_policy_save_load_gives_identical_samples(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = MaskedDiffusionPolicy.from_pretrained(tmp_path).eval()
    assert loaded.layout == policy.layout and loaded.text_tokenizer.tokens == policy.text_tokenizer.tokens
    a = maskgit_sample(policy, PROMPTS, num_steps=4, generator=gen(6))
    b = maskgit_sample(loaded, PROMPTS, num_steps=4, generator=gen(6))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.confidence, b.confidence)
    images = loaded.image_tokenizer.decode(b.codes)
    assert images.shape == (3, 3, 20, 20) and torch.equal(loaded.image_tokenizer.encode(images), b.codes)
