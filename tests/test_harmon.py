"""Harmon (issue 12): the tiny released-layout checkpoint through `fit`, the conditioning path and CFG, the KL VAE,
the release-difference switches (each both ways), and bad input at start-up. CPU only, no downloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from htgrpo.algorithms.mar_math import gaussian_log_prob, top_k_count, top_k_percent_mask
from htgrpo.config import ConfigError
from htgrpo.policies.mar.backbone import interpolate_pos_embed
from htgrpo.policies.mar.diffusion import gaussian_step_log_prob
from htgrpo.policies.mar.harmon import MODULE_PREFIXES, HarmonPolicy, build_harmon_policy, load_harmon
from htgrpo.policies.mar.harmon_tiny import TINY_IMAGE_SIZE, build_tiny_harmon, write_tiny_harmon
from htgrpo.policies.mar.sampling import sample_mar
from htgrpo.policies.mar.vae import KLAutoencoder, KLVAEConfig, load_kl16


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_harmon")
    write_tiny_harmon(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> HarmonPolicy:
    policy = load_harmon(str(tiny_dir), image_size=TINY_IMAGE_SIZE)
    policy.use_sampling_steps("3")
    return policy.eval()


# ---- the user's path: tiny checkpoint -> fit ------------------------------------------------------------------------
def test_fit_harmon_mar_grpo_on_the_tiny_checkpoint(compose, tmp_path):
    """`python -m htgrpo.tiny_checkpoint harmon DIR`, then `python -m htgrpo.fit experiment=harmon_mar_grpo <its
    overrides> reward=jpeg_compressibility trainer.max_steps=2 validate_at_start=false validate_at_end=false`, both
    in-process through the entry points' own functions (tiny sampler sizes keep it fast)."""
    from omegaconf import open_dict

    from htgrpo.fit import run
    from htgrpo.tiny_checkpoint import main as tiny_checkpoint

    from htgrpo.prompts import main as prompts

    ckpt = tmp_path / "tiny"
    overrides = tiny_checkpoint(["harmon", str(ckpt)]).split()
    assert overrides[0] == "policy=harmon" and f"policy.pretrained={ckpt}" in overrides
    # the experiment trains on GenEval-style prompts held out from its validation file (here a small generated one)
    val = prompts(["geneval_train", f"out={tmp_path / 'val.jsonl'}", "n=6", "seed=1", "exclude=none"])
    train = prompts(["geneval_train", f"out={tmp_path / 'train.jsonl'}", "n=12", "seed=0", f"exclude={val}"])
    overrides += [f"data.train.path={train}", f"benchmark.prompts.path={val}"]
    run_dir = tmp_path / "run"
    cfg = compose("fit", ["experiment=harmon_mar_grpo", *overrides, "reward=jpeg_compressibility",
                          "trainer.max_steps=2", "validate_at_start=false", "validate_at_end=false",
                          f"paths.output_dir={run_dir}", f"paths.artifacts_dir={tmp_path / 'artifacts'}",
                          "callbacks.progress_bar=null",
                          "sampler.num_ar_steps=8", "sampler.num_diffusion_steps=ddim4",
                          "algorithm.num_train_ar_steps=3",
                          "algorithm.num_train_diffusion_steps=2", "algorithm.mte.num_trajectories=2"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    run(cfg)   # (ddim4 respacing: an untrained head's t=999 step of a "4" respacing overflows, 1/sqrt(alpha) ~ 1e4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    # the trained MAR differs from the checkpoint's, the frozen LLM / VAE / projectors do not
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        start = {k: f.get_tensor(k) for k in f.keys()}
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not torch.equal(state["policy.mar.decoder_embed.weight"], start["mar.decoder_embed.weight"])
    for key in ("mar.diffloss.net.input_proj.weight", "llm.model.layers.0.mlp.up_proj.weight", "proj_out.2.weight",
                "vae.decoder.conv_out.weight"):
        assert torch.equal(state["policy." + key], start[key]), key
    # the trained policy is exported in the released layout and loads back through the same loader
    exported = load_harmon(str(tmp_path / "artifacts" / "harmon_mar_grpo"), image_size=TINY_IMAGE_SIZE)
    assert torch.equal(exported.mar.decoder_embed.weight, state["policy.mar.decoder_embed.weight"])
    assert (run_dir / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize("experiment", ["harmon_mar_grpo", "harmon_grpo_plain"])
def test_harmon_experiments_compose_and_instantiate(experiment, compose, tiny_dir, tmp_path):
    from omegaconf import OmegaConf, open_dict

    from htgrpo.config import instantiate_node

    cfg = compose("fit", [f"experiment={experiment}", f"policy.pretrained={tiny_dir}",
                          f"policy.image_size={TINY_IMAGE_SIZE}", f"paths.output_dir={tmp_path}",
                          "reward=jpeg_compressibility"])      # the default (HPS v2.1) needs its download
    assert compose("fit", [f"experiment={experiment}"]).reward._target_.endswith("HPSv2Reward")
    with open_dict(cfg):
        cfg.pop("hydra", None)
    OmegaConf.resolve(cfg)
    # the release's values (reference/mar_grpo.md §1.7)
    a, smp = cfg.algorithm, cfg.sampler
    assert (a.num_generations, a.lr, a.beta, a.num_train_ar_steps, a.num_train_diffusion_steps) == (4, 1e-6, 0.01, 12, 10)
    assert (smp.num_ar_steps, smp.cfg, smp.cfg_schedule, str(smp.num_diffusion_steps)) == (64, 3.0, "constant", "25")
    assert a.freeze_head and a.mte.num_trajectories == 5 and a.mte.top_k_percent == 30 and a.consistency.threshold == 0.0
    assert a.mte.enabled == a.consistency.enabled == (experiment == "harmon_mar_grpo")
    policy = instantiate_node(cfg, "policy")
    module = instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=instantiate_node(cfg, "sampler"))
    trained = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("mar.") and not n.startswith("mar.diffloss.") for n in trained)


# ---- checkpoint layout ----------------------------------------------------------------------------------------------
def test_tiny_checkpoint_has_the_released_layout_and_loads_with_no_renaming(tiny_dir, tiny):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "harmon" and cfg["llm"]["model_type"] == "qwen2"
    assert {"img_size", "vae_stride", "patch_size", "buffer_size", "diffloss_d", "diffloss_w"} <= set(cfg["mar"])
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] + "." for k in keys} == set(MODULE_PREFIXES)
    for key in ("mar.z_proj.weight", "mar.class_emb.weight", "mar.diffloss.net.res_blocks.0.adaLN_modulation.1.weight",
                "llm.model.embed_tokens.weight", "proj_in.0.weight", "proj_out.2.bias", "vae.quant_conv.weight",
                "vae.encoder.down.3.attn.0.q.weight"):
        assert key in keys, key
    own = tiny.state_dict()
    assert keys <= set(own) and set(own) - keys == {"llm.lm_head.weight"}   # tied to the input embedding
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        assert all(torch.equal(own[k], f.get_tensor(k)) for k in keys)
    # MAR weights stay at the checkpoint's 2x2 grid; images are generated on 4x4
    assert tuple(own["mar.diffusion_pos_embed_learned"].shape[:2]) == (1, 4) and tiny.grid == (4, 4)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    text = tiny.format_prompt("a red apple")
    assert text == "<|im_start|>user\nGenerate an image: a red apple<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(text)) == text


# ---- conditioning path and CFG --------------------------------------------------------------------------------------
def test_cached_prompt_path_equals_one_llm_pass_over_prompt_and_image(tiny):
    """ar_latents with the prompt KV cache == the released definition written out: LLM over [prompt ‖ image]."""
    B, L, D = 2, tiny.seq_len, tiny.token_embed_dim
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, L, D, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :10] = True
    cond = tiny.encode_prompts(["a red apple", "two dogs to the left of a bench"])
    with torch.no_grad():
        z = tiny.ar_latents(tokens, mask, tiny.condition_embedding(cond))
        mar, buf = tiny.mar, tiny.mar.buffer_size
        x_enc = mar.forward_mae_encoder(tokens, mask, mar.unconditional_embedding(B))
        h = tiny.proj_in(x_enc)
        h = torch.cat([h[:, buf:], h[:, :buf]], 1)
        expected = []
        for b in range(B):   # each prompt alone, unpadded, in one pass with its image sequence
            ids = cond.input_ids[b][cond.attention_mask[b]]
            emb = torch.cat([tiny.llm.get_input_embeddings()(ids)[None], h[b:b + 1]], 1)
            out = tiny.llm.model(inputs_embeds=emb).last_hidden_state[:, -h.shape[1]:]
            out = torch.cat([out[:, -buf:], out[:, :-buf]], 1)
            expected.append(mar.forward_mae_decoder(x_enc[b:b + 1] + tiny.proj_out(out), mask[b:b + 1]))
    torch.testing.assert_close(z, torch.cat(expected), atol=1e-5, rtol=1e-4)


def test_cfg_head_inputs_differ_when_prompts_differ(tiny):
    B, L, D = 2, tiny.seq_len, tiny.token_embed_dim
    tokens, mask = torch.zeros(B, L, D), torch.ones(B, L, dtype=torch.bool)
    with torch.no_grad():
        cond = tiny.condition_embedding(tiny.encode_prompts(["a red apple", "a blue cup"]))
        uncond = tiny.unconditional_embedding(B)
        z, z_u = tiny.guided_ar_latents(tokens, mask, cond, uncond)
        assert (z - z_u).abs().max() > 1e-4                          # the negative prompt is a different condition
        assert (z[0] - z[1]).abs().max() > 1e-4                      # so is another caption
        # the same prompt in both branches gives the same head input: the branch differs only by its prompt
        same = tiny._tokenize([tiny.chat_template.format(input=tiny.cfg_prompt)] * B)
        z_same, z_u_same = tiny.guided_ar_latents(tokens, mask, tiny.condition_embedding(same), uncond)
        torch.testing.assert_close(z_same, z_u_same, atol=1e-6, rtol=1e-5)
    # a guided rollout runs the unconditional branch on the negative prompt and records its latents
    r = sample_mar(tiny, tiny.encode_prompts(["a red apple"]), num_ar_steps=3, cfg=3.0, cfg_schedule="constant",
                   generator=torch.Generator().manual_seed(1))
    assert r.ar_latents_uncond is not None and (r.ar_latents - r.ar_latents_uncond).abs().max() > 1e-4
    assert tiny.decode_tokens(r.tokens).shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


# ---- KL VAE ---------------------------------------------------------------------------------------------------------
def test_kl16_has_the_released_parameter_names():
    with torch.device("meta"):
        vae = KLAutoencoder()          # MAR's KL-16 at full size, no memory
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1) and shapes["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert shapes["encoder.conv_out.weight"][0] == 32 and shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    for key in ("encoder.down.4.attn.1.proj_out.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "encoder.down.4.block.0.nin_shortcut.weight", "encoder.down.3.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.up.3.block.0.nin_shortcut.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.4.upsample.conv.weight",
                "decoder.up.0.block.2.conv2.weight", "decoder.mid.block_2.norm2.bias"):
        assert key in shapes, key
    for absent in ("encoder.down.3.attn.0.q.weight", "encoder.down.4.downsample.conv.weight",
                   "decoder.up.0.upsample.conv.weight", "decoder.up.4.attn.0.q.weight", "encoder.temb.dense.0.weight"):
        assert absent not in shapes, absent
    assert vae.downsample_factor == 16 and vae.scale == 0.2325


def test_vae_round_trip_through_the_kl16_file_format(tmp_path):
    config = KLVAEConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,))
    torch.manual_seed(0)
    vae = KLAutoencoder(config).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    # kl16.ckpt is torch.save({"model": state_dict}) with LDM training extras next to the weights
    torch.save({"model": {**vae.state_dict(), "loss.logvar": torch.zeros(())}}, tmp_path / "kl16.ckpt")
    loaded = load_kl16(tmp_path, config).eval()
    with torch.no_grad():
        tokens = vae.encode_tokens(images)
        assert tokens.shape == (2, 4, 8, 8)
        torch.testing.assert_close(tokens, vae.encode(images).mean * 0.2325)
        torch.testing.assert_close(loaded.encode_tokens(images), tokens)
        decoded = loaded.decode_tokens(tokens)
        torch.testing.assert_close(decoded, vae.decode(vae.encode(images).mode()))   # the scale cancels
        assert decoded.shape == images.shape
    with pytest.raises(ConfigError, match="vae_path"):
        load_kl16(tmp_path / "missing.ckpt", config)


def _diffusers_kl_vae(vae: KLAutoencoder):
    """The same weights in diffusers' ``AutoencoderKL`` (independent code): LDM keys renamed to diffusers' (the
    last encoder level is an ``AttnDownEncoderBlock2D``, single-head as LDM's AttnBlock; decoder attention only in the
    middle block; decoder levels in reverse order). Only for KLAutoencoders with attention at the last level alone."""
    import re

    from diffusers import AutoencoderKL

    c = vae.config
    n = len(c.ch_mult)
    ref = AutoencoderKL(
        in_channels=c.in_channels, out_channels=c.out_ch, latent_channels=c.embed_dim,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult), layers_per_block=c.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * n, act_fn="silu", norm_num_groups=32, scaling_factor=c.scale).eval()
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

    def rename(key: str) -> str:
        key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
        key = re.sub(r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", key)
        key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.", key)
        key = key.replace(".block.", ".resnets.").replace(".upsample.", ".upsamplers.0.")
        key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
        key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.").replace("nin_shortcut", "conv_shortcut")
        key = key.replace("norm_out", "conv_norm_out")
        m = re.match(r"^(.*\.attentions\.\d+\.)(norm|q|k|v|proj_out)\.(weight|bias)$", key)
        return f"{m[1]}{attention[m[2]]}.{m[3]}" if m else key

    target = ref.state_dict()
    state = {}
    for key, value in vae.state_dict().items():
        new = rename(key)
        state[new] = value.reshape(target[new].shape)  # 1x1 conv -> linear for the attention projections
    ref.load_state_dict(state, strict=True)  # every diffusers key filled, none left over
    return ref


def test_policy_image_round_trip_matches_diffusers_autoencoder_kl(tiny):
    """encode_images / decode_tokens against the same weights in diffusers' AutoencoderKL and Harmon's recipe:
    x = u8 / 127.5 - 1; tokens = row-major (h·w, C) of 0.2325 · posterior mean; image = clamp(127.5·x + 128)."""
    ref = _diffusers_kl_vae(tiny.vae)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=torch.uint8, generator=g)
    tokens = tiny.encode_images(images)
    with torch.no_grad():
        latents = ref.encode(images.float() / 127.5 - 1).latent_dist.mode() * 0.2325  # (B, C, h, w)
        want_tokens = latents.flatten(2).transpose(1, 2)
        assert want_tokens.shape == (2, tiny.seq_len, tiny.token_embed_dim)
        torch.testing.assert_close(tokens, want_tokens, rtol=1e-4, atol=1e-5)
        decoded = ref.decode(latents / 0.2325).sample
    want_images = torch.clamp(127.5 * decoded + 128, 0, 255).to(torch.uint8)
    back = tiny.decode_tokens(tokens)
    assert back.dtype == torch.uint8 and back.shape == images.shape
    # uint8 truncation: float rounding between the two codes may move a value across an integer by one level
    assert (back.int() - want_images.int()).abs().max() <= 1
    assert (back == want_images).float().mean() > 0.99


# ---- release-difference switches, each both ways ---------------------------------------------------------------
def test_logprob_clamp_released_bounds_the_variance_in_the_division():
    x, mu = torch.tensor([[1e-3]]), torch.zeros(1, 1)
    lv = torch.full((1, 1), 2 * math.log(1e-4))          # sigma = 1e-4 (sigma^2 = 1e-8)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    # released: -(1e-3)^2 / (2 * max(1e-8, 1e-6)) - log max(1e-4, 1e-6) - 0.5 log 2pi = -0.5 + 9.2103 - 0.9189
    released = -(1e-6) / (2 * 1e-6) - math.log(1e-4) - half_log_2pi
    # std: sigma = max(1e-4, 1e-6) in both terms: -(1e-6) / (2e-8) + 9.2103 - 0.9189 = -50 + ...
    std = -(1e-6) / (2 * 1e-8) - math.log(1e-4) - half_log_2pi
    for fn in (lambda c: gaussian_step_log_prob(x, mu, lv, "sum", 1e-6, clamp=c),
               lambda c: gaussian_log_prob(x, mu, lv, "sum", min_std=1e-6, clamp=c)):
        assert fn("released").item() == pytest.approx(released, rel=1e-5)
        assert fn("std").item() == pytest.approx(std, rel=1e-5)
    # above the bound the two agree
    big = torch.zeros(1, 1)
    assert gaussian_step_log_prob(x, mu, big, "sum", 1e-6, "released").item() == pytest.approx(
        gaussian_step_log_prob(x, mu, big, "sum", 1e-6, "std").item())


def test_top_k_min_tokens_picks_one_on_tiny_images():
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    assert top_k_count(3, 30.0) == 0 and top_k_count(3, 30.0, min_count=1) == 1
    assert top_k_percent_mask(scores, 30.0, min_count=1).tolist() == [[False, True, False]]
    assert not top_k_percent_mask(scores, 30.0, min_count=0).any()
    assert top_k_count(100, 30.0, min_count=1) == 30          # no effect once int(k N) >= 1


def test_pos_embed_interpolation_switch(tiny_dir):
    lin = load_harmon(str(tiny_dir), image_size=TINY_IMAGE_SIZE)
    cub = load_harmon(str(tiny_dir), image_size=TINY_IMAGE_SIZE, pos_embed_interpolation="bicubic")
    param = lin.mar.encoder_pos_embed_learned
    buf = lin.mar.buffer_size
    torch.testing.assert_close(lin.mar.grid_pos_embed("encoder_pos_embed_learned"),
                               interpolate_pos_embed(param, buf, (2, 2), (4, 4), "bilinear"))
    torch.testing.assert_close(cub.mar.grid_pos_embed("encoder_pos_embed_learned"),
                               interpolate_pos_embed(param, buf, (2, 2), (4, 4), "bicubic"))
    assert not torch.allclose(lin.mar.grid_pos_embed("decoder_pos_embed_learned"),
                              cub.mar.grid_pos_embed("decoder_pos_embed_learned"))
    # the interpolation is part of the graph: gradients reach the stored 2x2 embedding
    lin.mar.grid_pos_embed("diffusion_pos_embed_learned").sum().backward()
    assert lin.mar.diffusion_pos_embed_learned.grad is not None
    from htgrpo.policies.mar.checkpoints import load_harmon_mar
    import inspect
    assert inspect.signature(load_harmon_mar).parameters["interpolation"].default == "bilinear"


def test_decode_order_switch_for_an_explicit_order(tiny):
    L = tiny.seq_len
    order = torch.arange(L)[None]
    cond = tiny.encode_prompts(["a cat"])
    runs = {}
    for mode in ("from_end", "from_start"):
        r = sample_mar(tiny, cond, num_ar_steps=4, orders=order, decode_order=mode,
                       generator=torch.Generator().manual_seed(0))
        runs[mode] = r
        first = r.decoded[0, 0].nonzero().squeeze(1).tolist()
        n0 = len(first)
        expected = list(range(L - n0, L)) if mode == "from_end" else list(range(n0))
        assert sorted(first) == expected, mode
        assert r.order[0, :n0].sort().values.tolist() == expected   # rollout.order is the effective decode order
    assert not torch.equal(runs["from_end"].step_of_token, runs["from_start"].step_of_token)


@pytest.fixture(scope="module")
def mar_module_factory():
    from test_mar_grpo import make_module, rollout_and_plans

    return make_module, rollout_and_plans


def test_mte_score_std_rollout_versus_own(mar_module_factory):
    make_module, rollout_and_plans = mar_module_factory
    from htgrpo.algorithms.mar_math import chain_log_prob

    results = {}
    for mode in ("rollout", "own"):
        # cond-only scoring keeps the hand computation short (no CFG branch); the std choice is what is tested
        module = make_module(mte={"num_trajectories": 2, "score_std": mode}, num_train_ar_steps=2,
                             quirks={"cond_only_logprob": True})
        rollout, mte, plans = rollout_and_plans(module)
        plan = next(p for p in plans if bool(p.critic.any()))
        with torch.no_grad():
            terms = module.step_terms(module.policy, rollout, plan, mte, train_mode=False)
            log = rollout.rollout.steps[plan.step]
            head, B, L = module.policy.mar.diffloss, *rollout.rollout.tokens.shape[:2]
            z = module.policy.mar.ar_latents(log.input_tokens, ~log.known,
                                             module.policy.mar.condition_embedding(rollout.condition, B))
            cidx = plan.scored[plan.critic]
            chains = mte.select(cidx)
            if mode == "rollout":   # hand-built: every extra chain gets the rollout chain's std
                chains.log_variance = log.chain.log_variance[:, cidx].repeat(1, 2, 1)
            lp = head.score_chain(z.reshape(B * L, -1)[cidx].repeat(2, 1), chains, steps=plan.diffusion_steps,
                                  reduce="sum", min_std=1e-6, clamp="released").log_prob
            expected = chain_log_prob(lp).view(2, -1).mean(0)
        torch.testing.assert_close(terms.logp.view(-1)[cidx], expected, atol=1e-4, rtol=1e-4)
        results[mode] = expected
    assert not torch.allclose(results["rollout"], results["own"])


def test_consistency_from_step_and_requires_mte(mar_module_factory):
    make_module, rollout_and_plans = mar_module_factory

    def tested_steps(mte_on: bool, **consistency) -> dict[int, bool]:
        module = make_module(mte={"enabled": mte_on, "num_trajectories": 2}, num_train_ar_steps=None,
                             consistency=consistency)
        rollout, _, plans = rollout_and_plans(module, mte=mte_on)
        return {p.step: p.consistency is not None for p in plans}

    release = tested_steps(True)                                  # defaults: from step 2, only with MTE
    assert release[0] is False and release[1] is False and all(release[i] for i in release if i >= 2)
    ours = tested_steps(True, from_step=1)
    assert ours[0] is False and all(ours[i] for i in ours if i >= 1)
    assert not any(tested_steps(False).values())                  # requires_mte: no test in a plain run
    plain = tested_steps(False, requires_mte=False)
    assert all(plain[i] for i in plain if i >= 2)


def test_switch_values_are_checked_at_start_up(mar_module_factory):
    make_module, _ = mar_module_factory
    for kwargs, key in (({"mte": {"score_std": "mine"}}, "mte.score_std"),
                        ({"mte": {"min_tokens": -1}}, "mte.min_tokens"),
                        ({"consistency": {"from_step": 0}}, "consistency.from_step"),
                        ({"logprob": {"clamp": "both"}}, "logprob.clamp")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_module(**kwargs)


# ---- bad input -----------------------------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, keep) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            (dst / p.name).write_bytes(p.read_bytes())
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if keep(k)}, str(dst / "model.safetensors"))
    return dst


def test_checkpoint_without_mar_keys_fails_naming_what_was_found(tiny_dir, tmp_path):
    bad = _rewrite(tiny_dir, tmp_path / "no_mar", lambda k: not k.startswith("mar."))
    with pytest.raises(ConfigError) as err:
        build_harmon_policy(pretrained=str(bad), image_size=TINY_IMAGE_SIZE)
    msg = str(err.value)
    assert err.value.key == "pretrained" and "mar.*" in msg and "llm.* (" in msg and "vae.* (" in msg


def test_vae_channels_must_match_the_mar_token_width(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    bad = _rewrite(tiny_dir, tmp_path / "wide_vae", lambda k: not k.startswith("vae."))
    other = KLAutoencoder(KLVAEConfig(embed_dim=4, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                      attn_resolutions=(32,)))
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.update({"vae." + k: v for k, v in other.state_dict().items()})
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"4 channels.*8 wide"):
        build_harmon_policy(pretrained=str(bad), image_size=TINY_IMAGE_SIZE)


def test_missing_weights_say_what_to_download(tmp_path):
    for pretrained in ("wusize/Harmon-1_5B", str(tmp_path / "not_there")):
        with pytest.raises(ConfigError) as err:
            build_harmon_policy(pretrained=pretrained)
        msg = str(err.value)
        assert err.value.key == "pretrained"
        assert "policy.pretrained" in msg and "wusize/Harmon-1_5B" in msg and "huggingface-cli download" in msg
    parts = build_tiny_harmon()
    with pytest.raises(ConfigError, match="image_size"):     # not a multiple of the VAE stride (8)
        HarmonPolicy(parts.llm, parts.mar, parts.vae, parts.tokenizer, image_size=30)


def test_gradient_checkpointing_gives_the_same_latents_and_gradients(tiny_dir):
    results = []
    for checkpointing in (False, True):
        policy = load_harmon(str(tiny_dir), image_size=TINY_IMAGE_SIZE, gradient_checkpointing=checkpointing).train()
        for module in policy.modules():        # dropout off so the two passes are comparable
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(2, policy.seq_len, policy.token_embed_dim, generator=g)
        mask = torch.zeros(2, policy.seq_len, dtype=torch.bool)
        mask[:, :6] = True
        z = policy.ar_latents(tokens, mask, policy.condition_embedding(policy.encode_prompts(["a cat", "two dogs"])))
        z.square().sum().backward()
        results.append((z.detach(), policy.mar.z_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
