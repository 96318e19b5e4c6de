"""MAR-GRPO: the ShapesWorld MAR policy, the MARGRPO module (MTE, selection, frozen head), configs and CLI runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from htgrpo.algorithms.mar_grpo import MARGRPO, MTEChains, sample_mte_chains
from htgrpo.algorithms.mar_math import mar_grpo_loss, top_k_count
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.datamodules import PromptDataModule, collate_prompts
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.generators import PolicyImageGenerator, SamplerSettings, as_image_generator
from htgrpo.policies.mar.shapes import MARSamplerSettings, ShapesMARPolicy, build_mar_policy
from htgrpo.policies.tokenizers import PaletteImageTokenizer
from test_cli import run_cli

WORLD = ShapesWorldConfig.roomy()
TINY_MAR = dict(d_model=32, n_layers=1, n_heads=2, head_width=32, head_depth=1, text_width=32, text_heads=2,
                num_sampling_steps="ddim5")
SAMPLER = MARSamplerSettings(num_ar_steps=4, cfg=2.0, num_diffusion_steps="ddim5")
TINY_POLICY_CLI = ["policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "policy.head_width=32",
                   "policy.head_depth=1", "policy.text_width=32"]
TINY_MAR_RL = [*TINY_POLICY_CLI, "policy.init=scratch", "data.batch_size=2", "algorithm.num_generations=2",
               "sampler.num_ar_steps=4", "sampler.num_diffusion_steps=ddim5", "algorithm.num_train_ar_steps=2",
               "algorithm.num_train_diffusion_steps=3", "algorithm.mte.num_trajectories=2",
               "benchmark.prompts.per_task=1", "benchmark.images_per_prompt=1", "callbacks.progress_bar=null",
               "trainer.limit_train_batches=2"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py


def tiny_policy(seed: int = 0, perturb: float = 0.05) -> ShapesMARPolicy:
    """A tiny MAR; every parameter perturbed (the head's zero-initialised output would make z-gradients vanish)."""
    policy = build_mar_policy(WORLD, seed=seed, **TINY_MAR)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    return policy


def brightness_reward(images, records):
    """A dense reward with within-group variance even for a random policy."""
    return images.float().mean(dim=(1, 2, 3)) / 255.0


def make_module(**kwargs) -> MARGRPO:
    defaults = dict(num_generations=2, sampler=SAMPLER, num_train_ar_steps=2, num_train_diffusion_steps=3,
                    mte={"num_trajectories": 3}, lr=1e-3)
    defaults.update(kwargs)
    policy = defaults.pop("policy", None) or tiny_policy()
    return MARGRPO(policy, brightness_reward, **defaults)


def a_batch(n: int = 2, seed: int = 3):
    stream = ShapesPromptStream(WORLD, seed=seed, with_images=True)
    return collate_prompts([stream[i] for i in range(n)])


def rollout_and_plans(module: MARGRPO, mte: bool = True):
    rollout = module.rollout(a_batch())
    chains = module.multi_trajectory(rollout) if mte else None
    return rollout, chains, module.plan_updates(rollout, chains)


# ----------------------------------------------------------------------------------------------------------------
# the ShapesWorld MAR policy
# ----------------------------------------------------------------------------------------------------------------


def test_palette_tokens_are_lossless_and_decode_like_the_palette_tokenizer():
    policy = tiny_policy()
    images = a_batch(4).images
    tokens = policy.encode_images(images)
    assert tokens.shape == (4, 256, 3) and float(tokens.abs().max()) <= 1.0
    assert torch.equal(policy.decode_tokens(tokens), images)
    # a perturbed token decodes to the nearest palette colour, i.e. the image the palette tokenizer gives its codes
    noisy = tokens + 0.05 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    codes = PaletteImageTokenizer(WORLD.grid_size, WORLD.cell_px).encode(images)
    assert torch.equal(policy.codec.tokens_to_codes(noisy), codes)


def test_onehot_token_code_is_lossless_and_survives_save_load(tmp_path):
    policy = build_mar_policy(WORLD, token_code="onehot", token_scale=0.5, **TINY_MAR)
    num_colours = policy.image_tokenizer.palette.shape[0]
    images = a_batch(2).images
    tokens = policy.encode_images(images)
    # one channel per palette colour: +scale at the cell's colour, -scale elsewhere
    assert tokens.shape == (2, 256, num_colours) and policy.config.token_embed_dim == num_colours
    assert torch.equal((tokens > 0).sum(-1), torch.ones(2, 256, dtype=torch.long))
    assert set(tokens.unique().tolist()) == {-0.5, 0.5}
    assert torch.equal(policy.decode_tokens(tokens), images)
    policy.save_pretrained(tmp_path / "p")
    loaded = build_mar_policy(WORLD, init="pretrained", pretrained_path=str(tmp_path / "p"))
    assert loaded.token_code == "onehot" and loaded.token_scale == 0.5
    assert torch.equal(loaded.encode_images(images), tokens)
    with pytest.raises(ConfigError, match="token_code"):
        build_mar_policy(WORLD, token_code="bits", **TINY_MAR)


def test_condition_to_latent_adds_the_pooled_caption_to_every_z(tmp_path):
    assert not any("condition_latent_proj" in k for k in tiny_policy().state_dict())   # off: LTH14's parameters
    policy = build_mar_policy(WORLD, condition_to_latent=True, **TINY_MAR)
    mar = policy.mar
    batch = a_batch(2)
    tokens = policy.encode_images(batch.images)
    mask = mar.random_masking(tokens, mar.random_orders(2, torch.Generator().manual_seed(0)), mask_rate=0.8)
    emb = mar.condition_embedding(policy.encode_prompts(batch.texts))                    # (B, buffer, E)
    z = mar.ar_latents(tokens, mask, emb)
    backbone_only = mar.forward_mae_decoder(mar.forward_mae_encoder(tokens, mask, emb), mask)
    added = mar.condition_latent_proj(emb.mean(dim=1))                                   # (B, Dz)
    assert torch.allclose(z - backbone_only, added[:, None, :].expand_as(z), atol=1e-5)
    assert not torch.allclose(added[0], added[1])                                        # different captions
    policy.save_pretrained(tmp_path / "p")
    loaded = build_mar_policy(WORLD, init="pretrained", pretrained_path=str(tmp_path / "p"))
    assert loaded.config.condition_to_latent and torch.equal(loaded.mar.ar_latents(tokens, mask, emb), z)


def test_save_load_round_trip_gives_the_same_weights_and_samples(tmp_path):
    policy = tiny_policy().eval()
    policy.save_pretrained(tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} >= {"config.json", "model.safetensors", "policy.json",
                                                           "text_tokenizer.json", "image_tokenizer.json"}
    loaded = build_mar_policy(WORLD, init="pretrained", pretrained_path=str(tmp_path / "p")).eval()
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = [p for p in a_batch(2).prompts]
    img_a = PolicyImageGenerator(policy, SAMPLER).generate(prompts, torch.Generator().manual_seed(0))
    img_b = as_image_generator(loaded, SAMPLER).generate(prompts, torch.Generator().manual_seed(0))
    assert img_a.dtype == torch.uint8 and img_a.shape == (2, 3, 128, 128) and torch.equal(img_a, img_b)
    with pytest.raises(ConfigError, match="pretrained_path"):
        build_mar_policy(WORLD, init="pretrained", pretrained_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="sampler"):  # a MAR policy needs sampler=mar
        as_image_generator(loaded, SamplerSettings())


# ----------------------------------------------------------------------------------------------------------------
# MTE, selection, frozen head
# ----------------------------------------------------------------------------------------------------------------


def test_mte_with_one_trajectory_equal_to_the_rollout_chain_is_the_single_term():
    module = make_module(consistency={"enabled": False})
    rollout, _, _ = rollout_and_plans(module, mte=False)
    step = rollout.train_steps[-1]
    log = rollout.rollout.steps[step]
    B, L, _ = rollout.rollout.tokens.shape
    # S = 1 whose only chain IS the rollout's step chain, every token a critic token
    fake = MTEChains(chain=log.chain, num_trajectories=1, uncertainty=torch.zeros(B, L),
                     critic=torch.ones(B, L, dtype=torch.bool))
    (plan_single,) = [p for p in module.plan_updates(rollout, None) if p.step == step]
    (plan_mte,) = [p for p in module.plan_updates(rollout, fake) if p.step == step]
    assert bool(plan_mte.critic.all()) and not bool(plan_single.critic.any())
    single = module.step_terms(module.policy, rollout, plan_single, None).logp
    mte = module.step_terms(module.policy, rollout, plan_mte, fake).logp
    assert torch.isfinite(single).all() and bool((single[plan_single.masks.kl] != 0).any())
    torch.testing.assert_close(mte, single, rtol=1e-5, atol=1e-5)


def test_batched_mte_equals_the_per_trajectory_loop_given_the_same_noise():
    module = make_module(mte={"num_trajectories": 3})
    rollout, _, _ = rollout_and_plans(module, mte=False)
    a = module.multi_trajectory(rollout, generator=torch.Generator().manual_seed(7), batched=True)
    b = module.multi_trajectory(rollout, generator=torch.Generator().manual_seed(7), batched=False)
    for name in ("x_t", "x_prev", "mean", "log_variance"):
        torch.testing.assert_close(getattr(a.chain, name), getattr(b.chain, name), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.uncertainty, b.uncertainty, rtol=1e-4, atol=1e-4)
    # the helper directly, with a per-token CFG scale
    head = module.policy.mar.diffloss
    z = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, head.gen_diffusion.num_timesteps + 1, 6, 3, generator=torch.Generator().manual_seed(2))
    cfg = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    c1 = sample_mte_chains(head, z, -z, cfg, 2, 1.0, noise, batched=True)
    c2 = sample_mte_chains(head, z, -z, cfg, 2, 1.0, noise, batched=False)
    torch.testing.assert_close(c1.final, c2.final, rtol=1e-4, atol=1e-4)


def test_top_k_percent_uncertain_tokens_per_image():
    module = make_module(mte={"num_trajectories": 3, "top_k_percent": 30})
    rollout, mte, plans = rollout_and_plans(module)
    B, L = mte.uncertainty.shape
    assert mte.chain.x_t.shape[1] == 3 * B * L and (mte.uncertainty >= 0).all()
    assert mte.critic.sum(1).tolist() == [top_k_count(L, 30)] * B == [76] * B
    # the critic tokens are the most uncertain ones of their image
    for b in range(B):
        assert float(mte.uncertainty[b][mte.critic[b]].min()) >= float(mte.uncertainty[b][~mte.critic[b]].max())
    for p in plans:  # only tokens in the policy term use the MTE average
        assert p.critic.sum() == (mte.critic & p.masks.policy).sum()


def test_consistency_selection_keeps_improving_tokens_and_always_the_step_tokens():
    def run(threshold, enabled=True):
        # Our variant of the test (every step with a previous one, also without MTE); the release's defaults
        # (from_step 2, only with MTE) are tested in tests/test_harmon.py.
        module = make_module(mte={"enabled": False}, num_train_ar_steps=None,
                             consistency={"enabled": enabled, "threshold": threshold, "from_step": 1,
                                          "requires_mte": False})
        rollout, _, plans = rollout_and_plans(module, mte=False)
        return rollout, {p.step: p for p in plans}

    rollout, default = run(0.0)
    (_, strict), (_, loose), (_, off) = run(2.0), run(-2.0), run(0.0, enabled=False)
    dropped = 0
    for i, p in default.items():
        still, decoded = p.masks.kl, rollout.rollout.decoded[i]
        assert torch.equal(still, ~rollout.rollout.known_before(i))  # completion: unknown before step i
        assert torch.equal(off[i].masks.policy, still)                # no selection: every still-unknown token
        if i == 0:
            assert p.consistency is None and torch.equal(p.masks.policy, still)
            continue
        # keep a still-unknown token iff its proposal moved towards the final token; step-i tokens always
        assert torch.equal(p.masks.policy, (still & (p.delta_cos > 0.0)) | decoded)
        assert torch.equal(strict[i].masks.policy, decoded)          # tau = 2: nothing passes the test
        assert bool((loose[i].masks.policy >= p.masks.policy).all())  # a lower tau keeps more (tau = -2: ~all)
        assert int(loose[i].masks.policy.sum()) >= 0.99 * int(still.sum())
        dropped += int(still.sum()) - int(p.masks.policy.sum())
    assert dropped > 0


def test_frozen_head_gets_no_gradient_while_the_ar_part_does():
    for freeze in (True, False):
        module = make_module(freeze_head=freeze)
        rollout, mte, plans = rollout_and_plans(module)
        module.policy.zero_grad(set_to_none=True)
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        for plan in plans:
            terms = module.step_terms(module.policy, rollout, plan, mte)
            mar_grpo_loss(terms.logp, advantages, plan.masks.policy).loss.backward()
        head = [p.grad for p in module.policy.mar.diffloss.parameters()]
        ar = {n: p.grad for n, p in module.policy.mar.named_parameters() if not n.startswith("diffloss.")}
        assert all(g is not None and float(g.abs().sum()) > 0 for n, g in ar.items()
                   if n.startswith(("encoder_blocks", "decoder_blocks", "z_proj", "decoder_embed")))
        if freeze:
            assert all(g is None for g in head)
            assert all(not p.requires_grad for p in module.policy.mar.diffloss.parameters())
        else:
            assert any(g is not None and float(g.abs().sum()) > 0 for g in head)


# ----------------------------------------------------------------------------------------------------------------
# the module under Lightning
# ----------------------------------------------------------------------------------------------------------------


def fit_steps(module: MARGRPO, steps: int, tmp_path: Path) -> L.Trainer:
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=data)
    return trainer


def test_tiny_fit_released_and_ppo(tmp_path):
    module = make_module()
    head_before = [p.detach().clone() for p in module.policy.mar.diffloss.parameters()]
    ar_before = [p.detach().clone() for n, p in module.policy.mar.named_parameters() if "blocks" in n]
    trainer = fit_steps(module, 2, tmp_path)
    assert module.rollout_step == 2 and trainer.global_step == 2 and module.training_steps_done == 2
    stats = module.last_update_stats
    assert len(stats) == 2 and all(math.isfinite(s.loss) and math.isfinite(s.grad_norm) for s in stats)
    assert all(abs(s.ratio_mean - 1.0) < 1e-6 and s.clip_low == 0 == s.clip_high for s in stats)  # released ratio
    assert set(module.last_timings) == {"rollout", "reward", "mte", "update"}
    assert all(torch.equal(a, b) for a, b in zip(head_before, module.policy.mar.diffloss.parameters()))
    after = [p for n, p in module.policy.mar.named_parameters() if "blocks" in n]
    assert any(not torch.equal(a, b) for a, b in zip(ar_before, after))
    assert all(torch.equal(a, b) for a, b in zip(ar_before, [p for n, p in module.reference.mar.named_parameters()
                                                              if "blocks" in n]))
    sel = module.last_selection
    assert sel.uncertainty.shape == (4, 256) and sel.critic.sum() == 4 * 76

    ppo = make_module(ratio_mode="ppo", num_inner_updates=2, epsilon=0.2)
    trainer = fit_steps(ppo, 1, tmp_path / "ppo")
    assert ppo.rollout_step == 1 and trainer.global_step == 2
    first = [s for s in ppo.last_update_stats if s.update == 0]
    assert all(abs(s.ratio_mean - 1.0) < 1e-4 for s in first)  # the first update starts at the old policy


def test_checkpoint_state_restores_the_step_counter_and_the_draws():
    a = make_module()
    a.rollout_step = 3
    ckpt = {"state_dict": a.state_dict()}
    a.on_save_checkpoint(ckpt)
    b = make_module()
    b.load_state_dict(ckpt["state_dict"])
    b.on_load_checkpoint(ckpt)
    assert b.rollout_step == 3 and b.training_steps_done == 3
    ra, rb = a.rollout(a_batch()), b.rollout(a_batch())
    assert ra.train_steps == rb.train_steps and torch.equal(ra.rollout.tokens, rb.rollout.tokens)
    b.rollout_step = 4  # another step draws other AR steps / noise
    assert not torch.equal(b.rollout(a_batch()).rollout.tokens, ra.rollout.tokens)


@pytest.mark.parametrize("override, key", [
    ("algorithm.mte.num_trajectories=0", "algorithm.mte.num_trajectories"),
    ("algorithm.mte.top_k_percent=150", "algorithm.mte.top_k_percent"),
    ("algorithm.mte.mode=nope", "algorithm.mte.mode"),
    ("algorithm.consistency.threshold=3", "algorithm.consistency.threshold"),
    ("algorithm.consistency.enabled=maybe", "algorithm.consistency.enabled"),
    ("algorithm.ratio_mode=nope", "algorithm.ratio_mode"),
    ("algorithm.num_inner_updates=2", "algorithm.num_inner_updates"),
    ("algorithm.num_train_ar_steps=0", "algorithm.num_train_ar_steps"),
    ("algorithm.kl_type=nope", "algorithm.kl_type"),
    ("algorithm.quirks.harmon_mask_offset=1", "algorithm.quirks.harmon_mask_offset"),
    ("algorithm.num_generations=1", "algorithm.num_generations"),
    ("sampler.temperature=0", "algorithm.rollout_sampler.temperature"),
])
def test_bad_algorithm_values_fail_at_startup_naming_the_key(compose, override, key):
    cfg = compose("fit", ["experiment=shapes_mar_grpo", *TINY_POLICY_CLI, "policy.init=scratch", override])
    policy = instantiate_node(cfg, "policy")
    sampler = instantiate_node(cfg, "sampler")
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=sampler)
    assert err.value.key == key, str(err.value)


def test_bad_policy_sampler_and_unknown_keys_fail_naming_the_key(compose):
    for override, section, key in [("sampler.cfg_schedule=nope", "sampler", "sampler.cfg_schedule"),
                                   ("sampler.num_diffusion_steps=abc", "sampler", "sampler.num_diffusion_steps"),
                                   ("policy.text_max_len=40", "policy", "policy.text_max_len"),
                                   ("policy.d_model=30", "policy", "policy.d_model")]:
        cfg = compose("fit", ["experiment=shapes_mar_grpo", *TINY_POLICY_CLI, "policy.init=scratch", override])
        with pytest.raises(ConfigError) as err:
            instantiate_node(cfg, section)
        assert err.value.key == key, str(err.value)
    with pytest.raises(ConfigError) as err:
        make_module(mte={"num_trajectorie": 3})
    assert err.value.key == "mte.num_trajectorie"
    with pytest.raises(ConfigError) as err:  # the masked-diffusion sampler cannot drive a MAR policy
        make_module(sampler=SamplerSettings())
    assert err.value.key == "sampler"


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def _tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"histograms": 0, "scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags().get("histograms", [])) | set(acc.Tags().get("scalars", []))
    return tags


def test_cli_mar_pretrain_then_evaluate_then_rl(tmp_path):
    run_dir = tmp_path / "pretrain"
    run_cli("htgrpo.fit", ["experiment=shapes_mar_pretrain", f"hydra.run.dir={run_dir}", "trainer.max_steps=2",
                           "data.batch_size=2", *TINY_POLICY_CLI, "benchmark.prompts.per_task=1",
                           "benchmark.images_per_prompt=1", "sampler.num_ar_steps=4", "sampler.num_diffusion_steps=ddim5",
                           "callbacks.progress_bar=null"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["val_end"]["geneval/overall"] <= 1.0
    export = tmp_path / "artifacts" / "shapes_mar_warmstart"
    assert json.loads((export / "policy.json").read_text())["type"] == "shapes_mar"
    out = tmp_path / "eval"
    run_cli("htgrpo.evaluate", ["benchmark=shapes_geneval", "sampler=mar", f"ckpt_path={export}",
                                f"hydra.run.dir={out}", "benchmark.prompts.per_task=1", "benchmark.images_per_prompt=1",
                                "sampler.num_ar_steps=4", "sampler.num_diffusion_steps=ddim5"], tmp_path)
    assert 0.0 <= json.loads((out / "geneval_results.json").read_text())["overall"] <= 1.0

    # MAR-GRPO from the exported warm start (policy=shapes_mar_warm reads it from artifacts/), with histograms
    rl = tmp_path / "rl"
    run_cli("htgrpo.fit", ["experiment=shapes_mar_grpo", *[a for a in TINY_MAR_RL if a != "policy.init=scratch"],
                           f"hydra.run.dir={rl}", "callbacks.mar_selection.every_n_steps=1",
                           "validate_at_start=false"], tmp_path)
    summary = json.loads((rl / "summary.json").read_text())
    assert summary["steps"] == 2 and "geneval/overall" in summary["val_end"]
    tags = _tags(rl)
    assert {"mar/uncertainty/all", "mar/uncertainty/mte_kept", "mar/consistency/delta_cos"} <= tags
    assert {"train/reward/mean", "train/kl", "train/clip_fraction/low", "train/ratio_mean", "train/entropy",
            "train/grad_norm", "time/rollout_s", "perf/images_per_s", "train/zero_variance_fraction"} <= tags
    assert (rl / "checkpoints" / "last.ckpt").exists()


def test_cli_plain_mar_grpo_from_scratch(tmp_path):
    rl = tmp_path / "plain"
    run_cli("htgrpo.fit", ["experiment=shapes_mar_grpo_plain", *TINY_MAR_RL, f"hydra.run.dir={rl}",
                           "logger=csv", "validate_at_start=false"], tmp_path)
    summary = json.loads((rl / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["seconds"] > 0


def test_ppo_first_update_ratio_is_exactly_one_under_mar_dropout_after_updates(tmp_path):
    # Issue 17 item 5 for MAR-GRPO: old, reference and new terms all run in eval mode by default (the released
    # train-mode loss forward is quirks.dropout_in_loss), so with MAR attention/projection dropout 0.1 the ratio at
    # the first update of rollout step 2 (weights moved by step 1) is exactly 1.
    policy = build_mar_policy(WORLD, seed=0, dropout=0.1, **TINY_MAR)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    module = make_module(policy=policy, ratio_mode="ppo", num_inner_updates=2, lr=1e-2)
    fit_steps(module, 2, tmp_path)
    assert module.rollout_step == 2
    first = [s for s in module.last_update_stats if s.update == 0]
    assert first and all(s.policy_tokens > 0 for s in first)
    assert max(float((s.ratios - 1).abs().max()) for s in first) <= 1e-6


def test_ppo_ratio_leaves_one_after_the_first_update_and_clipping_engages(tmp_path):
    # three updates on one rollout batch with a large step and a narrow clip band
    module = make_module(ratio_mode="ppo", num_inner_updates=3, epsilon=0.05, lr=5e-2)
    fit_steps(module, 1, tmp_path)
    stats = module.last_update_stats
    first = [s for s in stats if s.update == 0]
    later = [s for s in stats if s.update > 0]
    assert first and later and {s.update for s in later} == {1, 2}
    # update 0 starts at the old policy: every ratio is 1, nothing clipped
    for s in first:
        assert torch.allclose(s.ratios, torch.ones_like(s.ratios), atol=1e-4)
        assert s.clip_low == 0 and s.clip_high == 0
    # afterwards the policy has moved: ratios leave 1 and beyond the band [0.95, 1.05] the clip engages
    assert max(float((s.ratios - 1).abs().max()) for s in later) > 0.05
    assert any(s.clip_low + s.clip_high > 0 for s in later)
    for s in later:  # only tokens outside the band can count as clipped
        outside = float(((s.ratios < 0.95) | (s.ratios > 1.05)).float().mean())
        assert s.clip_low + s.clip_high <= outside + 1e-6
