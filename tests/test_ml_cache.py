"""ML-Cache (htgrpo/policies/ml_cache.py, ``sampler.cache=ml_cache``): Lumina-DiMOO's released refresh schedule and
recompute rule, exactness when every position is recomputed, what a cached step reuses, and the sampler wiring
(CFG, micro-batched rollouts, config errors)."""

from __future__ import annotations

import pytest
import torch

from htgrpo.config import ConfigError
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.ml_cache import MaxLogitCacheLogits, MLCacheSettings, positions_to_recompute, refresh_steps
from htgrpo.policies.shapes_llada import toy_masked_diffusion_policy
from htgrpo.policies.t2i_layout import MASKED

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a green triangle"]


def released_refresh(T: int, warmup_ratio: float, interval: int) -> list[int]:
    """DiMOO generate_image: step refreshes if step <= int(T*warmup_ratio) or (step - that) % interval == 0."""
    w = int(T * warmup_ratio)
    return [k for k in range(T) if k <= w or (k - w) % interval == 0]


@pytest.mark.parametrize("T", [8, 16, 18, 64])
def test_refresh_schedule_is_released(T):
    got = [k for k, r in enumerate(refresh_steps(T, 0.3, 5)) if r]
    assert got == released_refresh(T, 0.3, 5)
    if T == 64:  # int(19.2) = 19: steps 0..19 in full, then 24, 29, ..., 59
        assert got == list(range(20)) + [24, 29, 34, 39, 44, 49, 54, 59]
    assert MLCacheSettings() == MLCacheSettings(cache_ratio=0.9, warmup_ratio=0.3, refresh_interval=5)


def test_positions_to_recompute_lowest_max_logits():
    conf = torch.tensor([[5.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0, 4.0, 10.0],
                         [0.0, 0.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0, 4.0, 10.0]])
    valid = torch.ones_like(conf, dtype=torch.bool)
    valid[1, :2] = False  # pads: not in the quantile and never recomputed
    got = positions_to_recompute(conf, valid, 0.1)
    # row 0: quantile(1..10, 0.1) = 1.9 -> the position holding 1.0; row 1: quantile of 2..10 (8 values) = 2.7
    assert got[0].nonzero().flatten().tolist() == [1]
    assert got[1].nonzero().flatten().tolist() == [3]
    assert positions_to_recompute(conf, valid, 0.35)[0].sum() == 4  # quantile 4.15 -> 1, 2, 3, 4


def _policy(lora_r: int = 0):
    policy = toy_masked_diffusion_policy(d_model=32, n_layers=2, grid_position_embedding=True, seed=0)
    if lora_r:
        from htgrpo.policies.lora import apply_lora

        apply_lora(policy, {"r": lora_r, "alpha": lora_r, "dropout": 0.0}, False)
        with torch.no_grad():  # non-zero adapters, so they count in the comparison
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return policy.eval()


def assert_same_samples(exact: SamplerSettings, cached: SamplerSettings, policy, prompt) -> None:
    """Same codes and commit steps from both settings, in one batch and in micro-batched rollouts of 2."""
    from htgrpo.algorithms.rollout import sample_in_micro_batches

    a = exact.sample(policy, prompt, torch.Generator().manual_seed(1))
    b = cached.sample(policy, prompt, torch.Generator().manual_seed(1))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.commit_step, b.commit_step)
    c = sample_in_micro_batches(cached, policy, prompt, torch.Generator().manual_seed(1), 2)
    d = sample_in_micro_batches(exact, policy, prompt, torch.Generator().manual_seed(1), 2)
    assert torch.equal(c.codes, d.codes)


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_recompute_all_equals_exact(lora_r, guidance):
    """With every position recomputed the cached path is the exact one, step after step (cache writes, RoPE at each
    row's own positions, the logit cache)."""
    torch.manual_seed(0)
    policy = _policy(lora_r)
    prompt = policy.encode_prompts(PROMPTS)
    fn = MaxLogitCacheLogits(policy, prompt, 6, MLCacheSettings(cache_ratio=1e-9, warmup_ratio=0.0,
                                                                refresh_interval=100))
    codes = torch.full((3, policy.num_image_tokens), MASKED)
    with torch.no_grad():
        for k in range(5):
            got = fn(codes, guidance)
            want = policy.guided_image_logits(codes, prompt, guidance)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), k
            codes[:, 40 * k:40 * (k + 1)] = torch.randint(0, policy.codebook_size, (3, 40))
    assert fn.refresh[:2] == [True, False]


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_cached_step_on_unchanged_tokens_is_exact(guidance):
    """Recomputing a subset of positions whose tokens did not change must reproduce the full pass exactly: each
    recomputed query and key sits at its own position (RoPE), attends to every cached key, and writes back."""
    torch.manual_seed(0)
    policy = _policy(4)
    prompt = policy.encode_prompts(PROMPTS)
    fn = MaxLogitCacheLogits(policy, prompt, 3, MLCacheSettings(cache_ratio=0.7, warmup_ratio=0.0,
                                                                refresh_interval=5))
    codes = torch.full((3, policy.num_image_tokens), MASKED)
    codes[:, :60] = torch.randint(0, policy.codebook_size, (3, 60))
    with torch.no_grad():
        fn(codes, guidance)
        assert fn.cache.recompute.sum() > 0 and not fn.refresh[1]
        got = fn(codes, guidance)
        want = policy.guided_image_logits(codes, prompt, guidance)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cached_step_reuses_all_but_the_chosen_positions():
    """A cached step recomputes only the ~10% lowest-max-logit positions; every other logit is the last step's."""
    torch.manual_seed(0)
    policy = _policy()
    prompt = policy.encode_prompts(PROMPTS[:2])
    fn = MaxLogitCacheLogits(policy, prompt, 4, MLCacheSettings(cache_ratio=0.9, warmup_ratio=0.0,
                                                                refresh_interval=3))
    assert fn.refresh == [True, False, False, True]
    codes = torch.full((2, policy.num_image_tokens), MASKED)
    with torch.no_grad():
        first = fn(codes, 0.0)
        chosen = fn.cache.recompute.clone()
        img = policy.layout.image_positions_in(chosen.shape[1])
        codes[:, :100] = torch.randint(0, policy.codebook_size, (2, 100))
        second = fn(codes, 0.0)
    T = chosen.shape[1]
    valid = chosen.sum(1)
    assert ((valid >= 0.09 * T * 0.9) & (valid <= 0.11 * T)).all()  # ~10% of the (valid) sequence
    computed = chosen[:, img]
    assert torch.equal(second[~computed], first[~computed])
    exact = policy.image_logits(codes, prompt)
    assert not torch.allclose(second, exact, atol=1e-4)  # an approximation: stale positions are not refreshed
    assert fn.positions_computed == 2 * T + int(chosen.sum(1).max()) * 2


def test_sampler_cache_setting_wiring():
    """sampler.cache=ml_cache: with every position recomputed the samples are the exact sampler's (CFG, both
    samplers, micro-batched rollouts); with the defaults it runs and differs; bad knobs fail naming the key."""
    policy = _policy()
    prompt = policy.encode_prompts(PROMPTS)
    for name in ("maskgit", "emerge"):
        exact = SamplerSettings(name=name, num_steps=6, guidance_scale=2.0)
        every = SamplerSettings(name=name, num_steps=6, guidance_scale=2.0, cache="ml_cache", cache_ratio=1e-9,
                                warmup_ratio=0.0, refresh_interval=100)
        assert_same_samples(exact, every, policy, prompt)
    cached = SamplerSettings(num_steps=16, guidance_scale=2.0, cache="ml_cache", warmup_ratio=0.0, refresh_interval=8)
    out = cached.sample(policy, prompt, torch.Generator().manual_seed(1))
    assert (out.codes >= 0).all() and out.codes.shape == (3, policy.num_image_tokens)
    for kwargs, key in [({"cache": "kv"}, "cache"), ({"cache_ratio": 1.0}, "cache_ratio"),
                        ({"warmup_ratio": -0.1}, "warmup_ratio"), ({"refresh_interval": 0}, "refresh_interval")]:
        with pytest.raises(ConfigError, match=key):
            SamplerSettings(**kwargs)


def test_sampler_configs_carry_released_defaults():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from htgrpo._hydra import config_dir
    from htgrpo.config import instantiate_node

    for name in ("dimoo", "mmada", "maskgit", "emerge"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
            cfg = compose("fit", overrides=[f"sampler={name}", "sampler.cache=ml_cache"])
        GlobalHydra.instance().clear()
        s = instantiate_node(cfg, "sampler")
        assert (s.cache, s.cache_ratio, s.warmup_ratio, s.refresh_interval) == ("ml_cache", 0.9, 0.3, 5)
        assert s.kv_refresh_share == 0.25  # kv_refresh's default: GenEval within ±0.02 of exact at 2016 images


def test_fresh_variant_recomputes_changed_tokens():
    """ml_cache_fresh: a cached step also recomputes every position whose token changed since its keys/values."""
    torch.manual_seed(0)
    policy = _policy()
    prompt = policy.encode_prompts(PROMPTS[:2])
    settings = MLCacheSettings(cache_ratio=0.9, warmup_ratio=0.0, refresh_interval=3)
    plain = MaxLogitCacheLogits(policy, prompt, 4, settings)
    fresh = MaxLogitCacheLogits(policy, prompt, 4, settings, recompute_changed=True)
    codes = torch.full((2, policy.num_image_tokens), MASKED)
    with torch.no_grad():
        for fn in (plain, fresh):
            fn(codes, 0.0)
        T = plain.cache.ids.shape[1]
        changed = codes.clone()
        changed[:, :120] = torch.randint(0, policy.codebook_size, (2, 120))
        a, b = plain(changed, 0.0), fresh(changed, 0.0)
        ids, _ = policy.sequences(changed, prompt)
    assert fresh.positions_computed - 2 * T >= 2 * 120 > plain.positions_computed - 2 * T
    assert torch.equal(fresh.cache.ids, ids)  # every changed position's keys/values are now from its token
    assert not torch.equal(plain.cache.ids, ids)
    exact = policy.image_logits(changed, prompt)
    assert (b - exact).abs().mean() < (a - exact).abs().mean()  # closer to the exact logits
    s = SamplerSettings(num_steps=6, cache="ml_cache_fresh", cache_ratio=1e-9, warmup_ratio=0.0, refresh_interval=9)
    e = SamplerSettings(num_steps=6)
    assert torch.equal(s.sample(policy, prompt, torch.Generator().manual_seed(2)).codes,
                       e.sample(policy, prompt, torch.Generator().manual_seed(2)).codes)


@pytest.mark.parametrize("cache", ["ml_cache", "kv_refresh"])
def test_rollout_cache_applies_to_rollouts_only(compose, cache):
    """`algorithm.rollout_cache=ml_cache|kv_refresh`: the rollout sampler caches, validation's sampler stays exact; a
    bad value names the key at start-up."""
    from htgrpo.config import ConfigError, instantiate_node
    from htgrpo.policies.generators import SamplerSettings
    from test_ht_grpo import TINY_POLICY

    cfg = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, f"algorithm.rollout_cache={cache}"])
    sampler = instantiate_node(cfg, "sampler")
    module = instantiate_node(cfg, "algorithm", policy=instantiate_node(cfg, "policy"), benchmark=None,
                              sampler=sampler)
    assert module.rollout_sampler.cache == cache and module.sampler.cache == "none"
    assert module.rollout_sampler.kv_refresh_share == 0.25
    assert module.rollout_sampler.num_steps == sampler.num_steps  # everything else is the configured sampler
    bad = compose("fit", ["experiment=shapes_ht", *TINY_POLICY, "algorithm.rollout_cache=kv"])
    with pytest.raises(ConfigError, match="rollout_cache"):
        instantiate_node(bad, "algorithm", policy=instantiate_node(bad, "policy"), benchmark=None,
                         sampler=SamplerSettings())


# ---- kv_refresh: recompute what the sampler reads ----------------------------------------------------------------


def test_samplers_tell_a_kv_refresh_cache_which_positions_they_read():
    """emerge passes exactly the positions it unmasks this step (drawn before the forward), MaskGIT every masked one."""
    from htgrpo.policies.sampling import emerge_sample, maskgit_sample

    policy = _policy()
    prompt = policy.encode_prompts(PROMPTS[:2])
    for sampler, reads_all_masked in ((emerge_sample, False), (maskgit_sample, True)):
        seen = []

        class Spy:
            takes_needed = True

            def __call__(self, codes, s, needed):
                seen.append((codes.clone(), needed.clone()))
                return policy.guided_image_logits(codes, prompt, s)

        canvas = torch.full((2, policy.num_image_tokens), MASKED)
        out = sampler(Spy(), canvas, num_steps=6, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
        for k, (codes, needed) in enumerate(seen):
            masked = codes == MASKED
            assert not (needed & ~masked).any()  # never a committed position
            if reads_all_masked:
                assert torch.equal(needed, masked)
            else:  # the positions committed at this call, no more
                nxt = seen[k + 1][0] if k + 1 < len(seen) else out.codes
                assert torch.equal(needed, masked & (nxt != MASKED))


@pytest.mark.parametrize("name", ["emerge", "maskgit"])
def test_kv_refresh_with_a_full_pass_at_every_change_is_exact(name):
    """kv_refresh_share tiny: every call after a commit is a full pass, so the samples are the exact sampler's (CFG,
    micro-batched rollouts included)."""
    policy = _policy(4)
    prompt = policy.encode_prompts(PROMPTS)
    exact = SamplerSettings(name=name, num_steps=6, guidance_scale=2.0)
    every = SamplerSettings(name=name, num_steps=6, guidance_scale=2.0, cache="kv_refresh", kv_refresh_share=1e-9)
    assert_same_samples(exact, every, policy, prompt)
    with pytest.raises(ConfigError, match="kv_refresh_share"):
        SamplerSettings(cache="kv_refresh", kv_refresh_share=0.0)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_kv_refresh_cached_step_computes_only_needed_and_changed_positions(guidance):
    """A cached step runs the needed positions and the ones whose token changed since their keys/values were computed,
    no others: the needed logits are exact when nothing else changed, unread positions keep their old logits, and
    a full pass comes once the changed share reaches kv_refresh_share."""
    from htgrpo.policies.ml_cache import KeyValueRefreshLogits

    torch.manual_seed(0)
    policy = _policy()
    prompt = policy.encode_prompts(PROMPTS[:2])
    N = policy.num_image_tokens
    fn = KeyValueRefreshLogits(policy, prompt, refresh_share=0.3)
    rows = 2 * (2 if guidance else 1)
    codes = torch.full((2, N), MASKED)
    needed = torch.zeros(2, N, dtype=torch.bool)
    needed[:, 10:20] = True
    with torch.no_grad():
        first = fn(codes, guidance, needed=needed)
        T = fn.cache.ids.shape[1]
        assert fn.full_passes == 1 and fn.positions_computed == rows * T
        # nothing changed: only the 10 needed positions run, and their logits are the exact ones
        second = fn(codes, guidance, needed=needed)
        assert fn.full_passes == 1 and fn.positions_computed == rows * T + rows * 10
        exact = policy.guided_image_logits(codes, prompt, guidance)
        assert torch.allclose(second[needed], exact[needed], atol=1e-5, rtol=1e-5)
        assert torch.equal(second[~needed], first[~needed])
        # commit those 10 (8% of the image < 30%): the next cached step recomputes them too (keys/values of the token)
        codes[needed] = torch.randint(0, policy.codebook_size, (20,))
        later = torch.zeros_like(needed)
        later[:, 30:35] = True
        fn(codes, guidance, needed=later)
        assert fn.full_passes == 1 and fn.positions_computed == rows * T + rows * 10 + rows * 15
        # commit 30% of the image: a full pass
        codes[:, 40:40 + int(0.3 * N)] = 0
        fn(codes, guidance, needed=later)
        assert fn.full_passes == 2
