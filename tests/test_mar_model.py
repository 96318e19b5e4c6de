"""MAR model side of MAR-GRPO: diffusion math, head chains, sampler logging, checkpoints (tiny configs, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from htgrpo.config import ConfigError
from htgrpo.policies.mar import (
    MAR,
    DiffusionHead,
    MARConfig,
    TextCondition,
    cfg_combine,
    cosine_mask_schedule,
    create_diffusion,
    gaussian_step_log_prob,
    interpolate_pos_embed,
    load_harmon_mar,
    load_lth14_checkpoint,
    patchify,
    sample_mar,
    save_harmon_checkpoint,
    save_lth14_checkpoint,
    space_timesteps,
    unpatchify,
)
from htgrpo.policies.mar.diffusion import cosine_alpha_bar, get_named_beta_schedule

# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> MARConfig:
    values = dict(seq_h=4, seq_w=4, token_embed_dim=3, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, buffer_size=4, num_classes=5,
                  diffloss_d=1, diffloss_w=32, num_sampling_steps="5", diffusion_batch_mul=2)
    values.update(overrides)
    return MARConfig(**values)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter (the head's zero-initialised output layers would make gradients vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting makes every
    small matmul ~500x slower; run this module single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> MAR:
    torch.manual_seed(0)
    return randomize_(MAR(tiny_config())).eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# diffusion math
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["none", "sum", "mean"])
def test_gaussian_log_prob_matches_torch_normal(reduce):
    g = gen(1)
    x, mean = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    log_var = torch.randn(7, 5, generator=g)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(x)
    ref = {"none": ref, "sum": ref.sum(-1), "mean": ref.mean(-1)}[reduce]
    torch.testing.assert_close(gaussian_step_log_prob(x, mean, log_var, reduce=reduce), ref)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_step_log_prob(x, mean, log_var, reduce="max")


def test_cosine_schedule_endpoints():
    assert cosine_alpha_bar(0.0) == pytest.approx(math.cos(0.008 / 1.008 * math.pi / 2) ** 2)
    assert cosine_alpha_bar(0.0) > 0.9998 and cosine_alpha_bar(1.0) < 1e-30
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.shape == (1000,) and float(betas.max()) == pytest.approx(0.999) and float(betas[-1]) == 0.999
    d = create_diffusion("", "cosine", 1000)
    assert float(d.alphas_cumprod[0]) == pytest.approx(1 - float(betas[0]))
    assert float(d.alphas_cumprod[0]) > 0.9999 and float(d.alphas_cumprod[-1]) < 1e-6
    # ᾱ_t follows the closed form ᾱ((t+1)/T)/ᾱ(0) wherever β is not clipped
    t = 500
    assert float(d.alphas_cumprod[t]) == pytest.approx(cosine_alpha_bar((t + 1) / 1000) / cosine_alpha_bar(0.0))


def test_space_timesteps_sections():
    kept = space_timesteps(1000, "100")
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999 and kept[1] == 10
    assert kept == [round(k * 999 / 99) for k in range(100)]
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]
    with pytest.raises(ValueError, match="num_sampling_steps"):
        space_timesteps(10, "abc")
    with pytest.raises(ValueError, match="num_sampling_steps"):
        space_timesteps(10, "11")


@pytest.mark.parametrize("spacing", ["100", "25", "5"])
def test_respaced_alphas_cumprod_match_originals(spacing):
    base, spaced = create_diffusion(""), create_diffusion(spacing)
    assert spaced.num_timesteps == int(spacing)
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map])
    # the network keeps seeing original timesteps
    idx = torch.arange(spaced.num_timesteps)
    assert torch.equal(spaced.model_timesteps(idx), spaced.timestep_map)


def test_learned_range_variance_closed_forms():
    d = create_diffusion("25")
    t = torch.arange(d.num_timesteps)
    ones = torch.ones(d.num_timesteps, 3, dtype=torch.float64)
    torch.testing.assert_close(d.learned_range_log_variance(ones, t), torch.log(d.betas)[:, None].expand(-1, 3))
    post = d.posterior_log_variance_clipped[:, None].expand(-1, 3)
    torch.testing.assert_close(d.learned_range_log_variance(-ones, t), post)
    torch.testing.assert_close(d.learned_range_log_variance(0 * ones, t),
                               0.5 * (torch.log(d.betas)[:, None] + post))
    # t = 0: the clipped log posterior variance is log β̃_1
    assert float(d.posterior_log_variance_clipped[0]) == pytest.approx(math.log(float(d.posterior_variance[1])))
    # posterior variance closed form
    ac, acp = d.alphas_cumprod, d.alphas_cumprod_prev
    torch.testing.assert_close(d.posterior_variance, d.betas * (1 - acp) / (1 - ac))


def test_p_mean_variance_with_true_eps_gives_posterior_mean():
    d = create_diffusion("100")
    g = gen(2)
    x0, noise = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 50, 98, 99])
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(torch.cat([noise, torch.zeros_like(noise)], -1), xt, t)
    torch.testing.assert_close(out.pred_xstart, x0)
    mean, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(out.mean, mean)


def test_p_sample_records_tempered_variance():
    d = create_diffusion("10")
    g = gen(3)
    x, out = torch.randn(5, 2, generator=g), torch.randn(5, 4, generator=g)
    t = torch.tensor([9, 5, 3, 1, 0])
    step = d.p_sample(out, x, t, temperature=0.5, generator=gen(4))
    mv = d.p_mean_variance(out, x, t)
    torch.testing.assert_close(step.log_variance, mv.log_variance + 2 * math.log(0.5))
    torch.testing.assert_close(step.x_prev[-1], step.mean[-1])  # no noise at t = 0
    noise = torch.randn(5, 2, generator=gen(4))
    torch.testing.assert_close(step.x_prev[:-1], (mv.mean + 0.5 * torch.exp(0.5 * mv.log_variance) * noise)[:-1])


def test_vb_term_does_not_train_eps():
    d = create_diffusion("")
    eps_param = torch.zeros(4, 3, requires_grad=True)
    v_param = torch.zeros(4, 3, requires_grad=True)
    terms = d.training_losses(lambda x, tau: torch.cat([eps_param, v_param], -1), torch.randn(4, 3, generator=gen(5)),
                              torch.tensor([0, 1, 500, 999]))
    (eps_grad,) = torch.autograd.grad(terms["vb"].sum(), eps_param, allow_unused=True, retain_graph=True)
    assert eps_grad is None or float(eps_grad.abs().max()) == 0.0
    (v_grad,) = torch.autograd.grad(terms["vb"].sum(), v_param)
    assert float(v_grad.abs().max()) > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_cfg_identity():
    g = gen(6)
    cond, uncond = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    guided0 = cfg_combine(cond, uncond, 0.0)
    torch.testing.assert_close(guided0[:, :3], uncond[:, :3])
    torch.testing.assert_close(guided0[:, 3:], cond[:, 3:])  # variance from the conditional half
    guided = cfg_combine(cond, uncond, 3.0)
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))


def test_head_cfg_matches_separate_calls():
    torch.manual_seed(0)
    head = randomize_(DiffusionHead(3, 8, depth=2, width=16, num_sampling_steps="5"))
    g = gen(7)
    x, z, zu = torch.randn(4, 3, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    t = torch.tensor([4, 3, 1, 0])
    tau = head.gen_diffusion.model_timesteps(t)
    out_c, out_u = head.net(x, tau, z), head.net(x, tau, zu)
    torch.testing.assert_close(head.model_output(x, t, z, zu, cfg=0.0)[:, :3], out_u[:, :3])
    torch.testing.assert_close(head.model_output(x, t, z, zu, cfg=1.0), out_c)
    torch.testing.assert_close(head.model_output(x, t, z, zu, cfg=2.5), cfg_combine(out_c, out_u, 2.5))


# ----------------------------------------------------------------------------------------------------------------
# head chains
# ----------------------------------------------------------------------------------------------------------------


def test_head_chain_structure_and_log_prob_recomputation():
    torch.manual_seed(0)
    head = randomize_(DiffusionHead(3, 8, depth=1, width=16, num_sampling_steps="6")).double()
    g = gen(8)
    z, zu = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    sample = head.sample_chain(z, temperature=0.9, cfg=2.0, log_steps=True, z_uncond=zu, generator=gen(9))
    chain = sample.chain
    assert chain.x_t.shape == (6, 5, 3) and chain.timesteps.tolist() == [5, 4, 3, 2, 1, 0]
    torch.testing.assert_close(chain.x_prev[:-1], chain.x_t[1:])
    torch.testing.assert_close(chain.final, sample.tokens)
    again = head.sample_chain(z, temperature=0.9, cfg=2.0, log_steps=False, z_uncond=zu, generator=gen(9))
    torch.testing.assert_close(again.tokens, sample.tokens)
    recomputed = head.chain_log_probs(z, chain, z_uncond=zu, cfg=2.0)
    torch.testing.assert_close(recomputed, chain.log_prob(), rtol=1e-9, atol=1e-9)
    # subsets of steps, batched in one call
    sub = head.score_chain(z, chain, steps=torch.tensor([0, 3, 5]), z_uncond=zu, cfg=2.0, reduce="sum")
    torch.testing.assert_close(sub.log_prob, chain.log_prob("sum")[[0, 3, 5]], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sub.mean, chain.mean[[0, 3, 5]], rtol=1e-9, atol=1e-9)
    # MAR-GRPO scores with the conditional branch only: different, but finite
    cond_only = head.chain_log_probs(z, chain)
    assert torch.isfinite(cond_only).all() and not torch.allclose(cond_only, recomputed)
    with pytest.raises(ValueError, match="z_uncond"):
        head.sample_chain(z, cfg=2.0)


def test_gradients_flow_to_z_and_head_unless_frozen():
    torch.manual_seed(0)
    head = randomize_(DiffusionHead(3, 8, depth=1, width=16, num_sampling_steps="5"))
    z = torch.randn(6, 8, generator=gen(10))
    chain = head.sample_chain(z, log_steps=True, generator=gen(11)).chain
    z_new = (z + 0.1).requires_grad_(True)
    head.chain_log_probs(z_new, chain, steps=torch.tensor([1, 4])).sum().backward()
    assert z_new.grad is not None and float(z_new.grad.abs().sum()) > 0
    assert float(head.net.cond_embed.weight.grad.abs().sum()) > 0
    head.zero_grad(set_to_none=True)
    head.requires_grad_(False)
    z_new = (z + 0.1).requires_grad_(True)
    head.chain_log_probs(z_new, chain, variance="model").mean().backward()
    assert float(z_new.grad.abs().sum()) > 0
    assert all(p.grad is None for p in head.parameters())


# ----------------------------------------------------------------------------------------------------------------
# MAR backbone
# ----------------------------------------------------------------------------------------------------------------


def test_lth14_parameter_names_and_preset_shapes():
    with torch.device("meta"):
        m = MAR(MARConfig.preset("mar_base"))
    sd = m.state_dict()
    expected = {
        "class_emb.weight": (1000, 768), "fake_latent": (1, 768), "z_proj.weight": (768, 16),
        "z_proj_ln.weight": (768,), "encoder_pos_embed_learned": (1, 320, 768),
        "encoder_blocks.11.attn.qkv.weight": (2304, 768), "encoder_blocks.0.mlp.fc1.weight": (3072, 768),
        "encoder_norm.weight": (768,), "decoder_embed.weight": (768, 768), "mask_token": (1, 1, 768),
        "decoder_pos_embed_learned": (1, 320, 768), "decoder_blocks.11.norm2.bias": (768,),
        "decoder_norm.bias": (768,), "diffusion_pos_embed_learned": (1, 256, 768),
        "diffloss.net.time_embed.mlp.2.weight": (1024, 1024), "diffloss.net.cond_embed.weight": (1024, 768),
        "diffloss.net.input_proj.weight": (1024, 16), "diffloss.net.res_blocks.5.in_ln.weight": (1024,),
        "diffloss.net.res_blocks.5.adaLN_modulation.1.weight": (3072, 1024),
        "diffloss.net.final_layer.linear.weight": (32, 1024),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder_blocks.12.norm1.weight" not in sd and "diffloss.net.res_blocks.6.in_ln.weight" not in sd
    assert not any("ls1" in k or "ls2" in k for k in sd)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 208) < 1


def test_training_loss_backward_and_masking(model):
    m = MAR(tiny_config()).train()
    tokens = torch.randn(3, 16, 3, generator=gen(12))
    loss = m(tokens, torch.tensor([0, 1, 4]), generator=gen(13))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.z_proj.weight.grad is not None and m.diffloss.net.input_proj.weight.grad is not None
    orders = m.random_orders(3, gen(14))
    assert torch.equal(orders.sort(1).values, torch.arange(16).expand(3, 16))
    for _ in range(20):
        mask = m.random_masking(tokens, orders, gen(_))
        n = mask.sum(1)
        assert (n == n[0]).all() and 0.7 * 16 <= int(n[0]) <= 16
    uneven = torch.zeros(3, 16, dtype=torch.bool)
    uneven[0, :2] = True
    with pytest.raises(ValueError, match="same number"):
        m.forward_mae_encoder(tokens, uneven, m.condition_embedding(torch.tensor([0, 1, 2])))


def test_config_errors_name_the_argument():
    with pytest.raises(ConfigError, match="encoder_num_heads"):
        tiny_config(encoder_num_heads=3)
    with pytest.raises(ConfigError, match="num_classes"):
        tiny_config(num_classes=0)
    with pytest.raises(ConfigError, match="text_max_len"):
        tiny_config(conditioning="text", text_vocab_size=10, text_max_len=8, text_pooling="tokens", text_width=16)
    with pytest.raises(ValueError, match="tokens"):
        MAR(tiny_config()).ar_latents(torch.zeros(1, 15, 3), torch.zeros(1, 15, dtype=torch.bool),
                                      torch.zeros(1, 32))


def test_text_conditioner_padding_and_modes():
    for pooling in ("mean", "tokens"):
        m = MAR(tiny_config(conditioning="text", text_vocab_size=11, text_max_len=4, text_width=16,
                            text_num_heads=2, text_depth=1, text_pooling=pooling)).eval()
        assert "text_encoder.tok_embed.weight" in m.state_dict() and "class_emb.weight" not in m.state_dict()
        ids = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]])
        keep = ids != 0
        emb = m.condition_embedding(TextCondition(ids, keep))
        shape = (2, 32) if pooling == "mean" else (2, 4, 32)
        assert emb.shape == shape
        other = ids.clone()
        other[0, 2:] = torch.tensor([9, 10])  # different ids under the padding mask: same embedding
        torch.testing.assert_close(m.condition_embedding(TextCondition(other, keep)), emb)
        dropped = m.condition_embedding(TextCondition(ids, keep), drop=torch.tensor([True, False]))
        torch.testing.assert_close(dropped[0], m.unconditional_embedding(2, like=emb)[0])
        torch.testing.assert_close(dropped[1], emb[1])
        loss = m.train()(torch.randn(2, 16, 3), ids, generator=gen(15))
        assert torch.isfinite(loss)
        rollout = sample_mar(m, TextCondition(ids, keep), num_ar_steps=3, cfg=2.0, generator=gen(16))
        assert rollout.tokens.shape == (2, 16, 3) and rollout.ar_latents_uncond is not None


def test_pos_embed_interpolation_shapes():
    pe = torch.randn(1, 4 + 16, 8)
    out = interpolate_pos_embed(pe, 4, (4, 4), (6, 5))
    assert out.shape == (1, 4 + 30, 8)
    torch.testing.assert_close(out[:, :4], pe[:, :4])
    assert interpolate_pos_embed(pe, 4, (4, 4), (4, 4)) is pe
    const = torch.cat([torch.zeros(1, 4, 8), torch.full((1, 16, 8), 2.5)], 1)
    torch.testing.assert_close(interpolate_pos_embed(const, 4, (4, 4), (8, 8))[:, 4:], torch.full((1, 64, 8), 2.5))
    m = MAR(tiny_config())
    buffer_rows = m.encoder_pos_embed_learned[:, :4].detach().clone()
    m.resize_grid(6, 6)
    assert m.encoder_pos_embed_learned.shape == (1, 4 + 36, 32)
    assert m.diffusion_pos_embed_learned.shape == (1, 36, 24) and m.seq_len == 36 and m.config.seq_h == 6
    torch.testing.assert_close(m.encoder_pos_embed_learned[:, :4], buffer_rows)


def test_patchify_round_trip_and_order():
    latents = torch.randn(2, 3, 4, 6, generator=gen(17))
    tokens = patchify(latents)
    assert tokens.shape == (2, 24, 3)
    torch.testing.assert_close(tokens[:, 1 * 6 + 2], latents[:, :, 1, 2])  # row-major grid, channels last
    torch.testing.assert_close(unpatchify(tokens, 4, 6), latents)
    p2 = patchify(latents, patch_size=2)
    assert p2.shape == (2, 6, 12)
    torch.testing.assert_close(p2[0, 0].view(3, 2, 2), latents[0, :, :2, :2])  # (c, p, q) order
    torch.testing.assert_close(unpatchify(p2, 2, 3, patch_size=2), latents)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(latents, patch_size=4)


# ----------------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------------


def test_mask_schedule_counts():
    s = cosine_mask_schedule(256, 64)
    assert sum(s.decoded) == 256 and s.decoded[:13] == (1,) * 13 and s.decoded[13] > 1 and s.masked_after[-1] == 0
    assert cosine_mask_schedule(1024, 64).decoded[:6] == (1, 1, 1, 2, 3, 4)
    nova = cosine_mask_schedule(1024, 64, rounding="round")
    assert sum(nova.decoded) == 1024 and nova.decoded.count(0) == 1
    few = cosine_mask_schedule(3, 6)  # more steps than tokens: empty steps, everything still decoded once
    assert sum(few.decoded) == 3 and min(few.decoded) == 0


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (2.0, "linear"), (3.0, "constant")])
def test_sampler_decodes_every_token_once_and_reproduces(model, cfg, schedule):
    labels = torch.tensor([0, 3])
    kw = dict(num_ar_steps=5, cfg=cfg, cfg_schedule=schedule, log_ar_steps=[1, 4])
    a = sample_mar(model, labels, generator=gen(20), **kw)
    b = sample_mar(model, labels, generator=gen(20), **kw)
    c = sample_mar(model, labels, generator=gen(21), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.order, b.order)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.decoded.shape == (5, 2, 16)
    assert torch.equal(a.decoded.sum(0), torch.ones(2, 16, dtype=torch.long))  # once per position
    assert list(a.decoded.sum(2)[:, 0]) == list(a.schedule.decoded)
    # the order is followed: the k-th decoded position of image b is order[b, k]
    steps_along_order = a.step_of_token.gather(1, a.order)
    assert (steps_along_order.diff(dim=1) >= 0).all()
    assert set(a.steps) == {1, 4} and (a.ar_latents_uncond is None) == (cfg == 1.0)
    if schedule == "constant":
        assert a.cfg_per_step == [cfg] * 5
    else:
        assert a.cfg_per_step[0] < a.cfg_per_step[-1] <= cfg
    log = a.steps[4]
    torch.testing.assert_close(log.known, a.known_before(4))
    # decoded tokens at a logged step come from its chain; its z is the one recorded for those tokens
    torch.testing.assert_close(a.tokens[log.decoded], log.proposals[log.decoded])
    torch.testing.assert_close(a.ar_latents[log.decoded], log.z[log.decoded])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rollout_chain_log_probs_match_recorded(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    rollout = sample_mar(m, torch.tensor([1, 2, 4]), num_ar_steps=4, cfg=2.5, cfg_schedule="linear",
                         temperature=0.8, log_ar_steps=[0, 2], generator=gen(22))
    B, L = 3, 16
    # float32: the first (noisiest) transition has μ = (x_t − c·ε)/√α_t with 1/√α_t ≈ 6e3 for a 5-step respacing,
    # so matmul rounding that depends on the batch size shows up there; everything else agrees to float precision
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for step, log in rollout.steps.items():
        assert log.chain.x_t.shape == (5, B * L, 3) and log.chain.x_t.dtype == dtype
        recorded = log.chain.log_prob()
        recomputed = m.diffloss.chain_log_probs(log.z.reshape(B * L, -1), log.chain,
                                                z_uncond=log.z_uncond.reshape(B * L, -1), cfg=log.cfg)
        torch.testing.assert_close(recomputed[1:], recorded[1:], rtol=tol, atol=tol)
        torch.testing.assert_close(recomputed[0], recorded[0], rtol=tol, atol=tol if dtype == torch.float64 else 0.05)
        # re-running the AR part on the logged inputs reproduces z (RL recomputes it with grad)
        emb = m.condition_embedding(torch.tensor([1, 2, 4]))
        z = m.ar_latents(log.input_tokens, ~log.known, emb)
        torch.testing.assert_close(z, log.z, rtol=tol, atol=tol)


def test_gradients_flow_from_rollout_log_probs_to_ar_parameters(model):
    m = MAR(tiny_config())
    m.load_state_dict(model.state_dict())
    rollout = sample_mar(m, torch.tensor([0, 1]), num_ar_steps=3, log_ar_steps=[1], generator=gen(23))
    log = rollout.steps[1]
    m.diffloss.requires_grad_(False)  # MAR-GRPO's fix_head
    z = m.ar_latents(log.input_tokens, ~log.known, m.condition_embedding(torch.tensor([0, 1])))
    logp = m.diffloss.chain_log_probs(z.reshape(2 * 16, -1), log.chain, steps=torch.tensor([0, 2]))
    (logp.view(2, 2, 16) * log.decoded).sum().backward()
    assert float(m.z_proj.weight.grad.abs().sum()) > 0 and float(m.class_emb.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.diffloss.parameters())


def test_sampler_argument_errors(model):
    with pytest.raises(ValueError, match="log_ar_steps"):
        sample_mar(model, torch.tensor([0]), num_ar_steps=3, log_ar_steps=[3])
    with pytest.raises(ValueError, match="cfg_schedule"):
        sample_mar(model, torch.tensor([0]), num_ar_steps=3, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="batch_size"):
        sample_mar(model, None, num_ar_steps=3)
    unconditional = sample_mar(model, None, batch_size=2, num_ar_steps=2, generator=gen(0))
    assert unconditional.tokens.shape == (2, 16, 3)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _same_outputs(a: MAR, b: MAR) -> None:
    labels = torch.tensor([2, 0])
    ra = sample_mar(a, labels, num_ar_steps=3, cfg=2.0, generator=gen(30))
    rb = sample_mar(b, labels, num_ar_steps=3, cfg=2.0, generator=gen(30))
    torch.testing.assert_close(ra.tokens, rb.tokens, rtol=0, atol=0)


def test_lth14_checkpoint_round_trip(tmp_path, model):
    path = save_lth14_checkpoint(model, tmp_path / "checkpoint-last.pth")
    loaded = load_lth14_checkpoint(tmp_path)  # a directory works, EMA weights by default
    assert loaded.config == model.config
    _same_outputs(model, loaded)
    # a file exactly like LTH14's (no mar_config): heads of a non-preset width must come from config
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    bare = save_lth14_checkpoint(model, tmp_path / "bare.pth", ema_state_dict=ema, with_config=False)
    with pytest.raises(ConfigError, match="encoder_num_heads"):
        load_lth14_checkpoint(bare)
    from_ema = load_lth14_checkpoint(bare, config=model.config)
    from_raw = load_lth14_checkpoint(bare, config=model.config, use_ema=False)
    torch.testing.assert_close(from_ema.fake_latent, model.fake_latent + 0.01)
    _same_outputs(model, from_raw)
    assert path.exists()


def test_lth14_checkpoint_into_a_larger_grid(tmp_path, model):
    save_lth14_checkpoint(model, tmp_path / "ck.pth")
    big = load_lth14_checkpoint(tmp_path / "ck.pth", config=model.config.replace(seq_h=6, seq_w=6))
    assert big.encoder_pos_embed_learned.shape == (1, 4 + 36, 32)
    torch.testing.assert_close(big.encoder_pos_embed_learned[:, :4], model.encoder_pos_embed_learned[:, :4])
    torch.testing.assert_close(big.z_proj.weight, model.z_proj.weight)
    assert sample_mar(big, torch.tensor([1]), num_ar_steps=2, generator=gen(0)).tokens.shape == (1, 36, 3)


def test_harmon_checkpoint_round_trip(tmp_path, model):
    extra = {"llm.model.embed_tokens.weight": torch.randn(7, 4), "proj_in.0.weight": torch.randn(3, 3),
             "vae.decoder.conv_in.weight": torch.randn(2, 2)}
    save_harmon_checkpoint(model, tmp_path / "harmon" / "model.safetensors", extra=extra)
    loaded = load_harmon_mar(tmp_path / "harmon", config=model.config)
    _same_outputs(model, loaded)
    inferred = load_harmon_mar(tmp_path / "harmon" / "model.safetensors", hints={"encoder_num_heads": 2,
                                                                                "decoder_num_heads": 2,
                                                                                "num_sampling_steps": "5"})
    _same_outputs(model, inferred)
    # DeepSpeed-style `module.mar.` prefix in a pickled state dict, loaded without the (unused) class embedding
    save_harmon_checkpoint(model, tmp_path / "ds.pth", extra=extra, prefix="module.mar.")
    unconditional = load_harmon_mar(tmp_path / "ds.pth", config=model.config.replace(conditioning="none"))
    assert not hasattr(unconditional, "class_emb")
    torch.testing.assert_close(unconditional.fake_latent, model.fake_latent)


def test_non_square_grid_round_trip(tmp_path):
    torch.manual_seed(1)
    m = randomize_(MAR(tiny_config(seq_h=2, seq_w=8))).eval()
    loaded = load_lth14_checkpoint(save_lth14_checkpoint(m, tmp_path / "ck.pth"))
    assert (loaded.config.seq_h, loaded.config.seq_w) == (2, 8)
    _same_outputs(m, loaded)


def test_checkpoint_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="checkpoint-last.pth.*LTH14/mar"):
        load_lth14_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="wusize/Harmon-1_5B"):
        load_harmon_mar(tmp_path / "nothing_here.safetensors")
    save_lth14_checkpoint(model, tmp_path / "ck.pth")
    with pytest.raises(ValueError, match=r"missing \(e\.g\..*encoder_blocks\.1\."):
        load_lth14_checkpoint(tmp_path / "ck.pth", config=model.config.replace(encoder_depth=2))
    with pytest.raises(ValueError, match="other shapes"):
        load_lth14_checkpoint(tmp_path / "ck.pth", config=model.config.replace(diffloss_w=16))
    with pytest.raises(ValueError, match="buffer_size"):
        load_lth14_checkpoint(tmp_path / "ck.pth", config=model.config.replace(buffer_size=8))
    save_harmon_checkpoint(model, tmp_path / "llm_only.safetensors", prefix="llm.")
    with pytest.raises(ValueError, match="no keys with prefix"):
        load_harmon_mar(tmp_path / "llm_only.safetensors", config=model.config)
