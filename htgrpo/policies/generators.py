"""Image generators used by validation and ``evaluate``: a masked-diffusion policy with its sampler, the
oracle (ground-truth scenes) and uniform random image tokens; plus the policy factory used by configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.data.shapes.palette import ShapesWorldConfig

SAMPLERS = ("maskgit", "emerge")


@dataclass(frozen=True)
class SamplerSettings:
    """How a masked-diffusion policy turns a prompt into image tokens.

    Attributes:
        name: ``maskgit`` (confidence-ordered, MMaDA/DiMOO's native sampler) or ``emerge`` (MaskGRPO's
            ancestral sampler).
        num_steps: denoising steps T.
        guidance_scale: CFG scale s in ``(1+s)·cond − s·uncond``; 0 disables the unconditional pass.
        temperature: Gumbel temperature of the sampled codes / confidence noise.
        schedule: mask schedule (``cosine``).
        noise_anneal: MaskGIT only: how the confidence noise decays over steps: ``linear`` (MaskGIT:
            temperature·(1 − k/T)), ``compound`` (MMaDA's in-place quirk) or ``none`` (Lumina-DiMOO).
        choice_temperature: MaskGIT only: scale of the Gumbel noise on the confidences that order the
            commits; None uses ``temperature`` (as MMaDA/DiMOO do). MaskGIT's own default is 4.5.
    """

    name: str = "maskgit"
    num_steps: int = 16
    guidance_scale: float = 2.0
    temperature: float = 1.0
    schedule: str = "cosine"
    noise_anneal: str = "linear"
    choice_temperature: float | None = None

    def __post_init__(self) -> None:
        require_choice(self.name, SAMPLERS, "name")
        require(int(self.num_steps) >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(float(self.guidance_scale) >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        require(float(self.temperature) >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require_choice(self.schedule, ("cosine",), "schedule")
        require_choice(self.noise_anneal, ("linear", "compound", "none"), "noise_anneal")
        require(self.choice_temperature is None or float(self.choice_temperature) >= 0, "choice_temperature",
                f"must be >= 0 or null, got {self.choice_temperature}")

    def sample(self, policy, prompt_tokens, generator: torch.Generator | None = None):
        """Run the configured sampler; returns ``SampledImageTokens``."""
        from htgrpo.policies.sampling import emerge_sample, maskgit_sample

        fn = maskgit_sample if self.name == "maskgit" else emerge_sample
        kwargs = dict(num_steps=int(self.num_steps), guidance_scale=float(self.guidance_scale), generator=generator)
        if self.name == "maskgit":
            kwargs.update(temperature=float(self.temperature), schedule=self.schedule, noise_anneal=self.noise_anneal,
                          choice_temperature=self.choice_temperature)
        else:
            kwargs.update(temperature=float(self.temperature), schedule=self.schedule)
        return fn(policy, prompt_tokens, **kwargs)


class PolicyImageGenerator:
    """A masked-diffusion policy + sampler settings, seen as an :class:`ImageGenerator`."""

    def __init__(self, policy, sampler: SamplerSettings):
        self.policy = policy
        self.sampler = sampler

    @torch.no_grad()
    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()
        device = next(self.policy.parameters()).device
        prompt_tokens = self.policy.encode_prompts([p.prompt for p in prompts]).to(device)
        gen = generator if device.type == "cpu" else torch.Generator(device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator)))
        sampled = self.sampler.sample(self.policy, prompt_tokens, generator=gen)
        images = self.policy.image_tokenizer.decode(sampled.codes.cpu())
        self.policy.train(was_training)
        return images


class OraclePolicy:
    """Renders, for each prompt, a random ShapesWorld scene that satisfies its metadata.

    Scoring its images must give ~1.0 (GenEval) / ~100 (DPG): an end-to-end check of the scorers.
    """

    def __init__(self, world: ShapesWorldConfig):
        self.world = world

    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        from htgrpo.data.prompt_sets import render_record

        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        return torch.stack([render_record(p.record, np.random.default_rng(s), self.world) for p, s in zip(prompts, seeds)])


class RandomTokenPolicy:
    """Uniformly random image tokens through the palette tokenizer: the floor every policy must beat."""

    def __init__(self, world: ShapesWorldConfig):
        from htgrpo.policies.tokenizers import PaletteImageTokenizer

        self.world = world
        self.tokenizer = PaletteImageTokenizer(grid_size=world.grid_size, cell_px=world.cell_px)

    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        codes = torch.randint(0, self.tokenizer.codebook_size, (len(prompts), self.world.num_cells), generator=generator)
        return self.tokenizer.decode(codes)


def build_masked_diffusion_policy(world: ShapesWorldConfig, init: str = "scratch", pretrained_path: str | None = None,
                                  d_model: int = 64, n_layers: int = 4, n_heads: int = 4, mlp_ratio: float = 3.0,
                                  max_text_len: int = 40, rope_theta: float = 10000.0,
                                  grid_position_embedding: bool = True):
    """Build the ShapesWorld masked-diffusion (LLaDA-architecture) policy.

    Args:
        world: ShapesWorld geometry (sets the image grid and tokenizer).
        init: ``scratch`` (random init of a tiny config) or ``pretrained`` (load ``pretrained_path``).
        pretrained_path: a folder written by ``MaskedDiffusionPolicy.save_pretrained`` (the warm start
            writes ``${paths.artifacts_dir}/shapes_llada_warmstart``).
        d_model, n_layers, n_heads, mlp_ratio, max_text_len, rope_theta: size of a scratch policy.
        grid_position_embedding: learned row/column embeddings on the image tokens of a scratch policy (a toy-model
            extension of LLaDA; see ``LLaDAConfig.image_grid``).
    """
    from htgrpo.data.shapes.prompts import VOCABULARY
    from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy

    require_choice(init, ("scratch", "pretrained"), "init")
    if init == "pretrained":
        require(pretrained_path not in (None, ""), "pretrained_path", "must be set when init=pretrained")
        path = Path(str(pretrained_path)).expanduser()
        if not (path / "config.json").exists() and not path.is_dir():
            raise ConfigError(
                "pretrained_path",
                f"{path} does not exist. Run the warm start first (`python -m htgrpo.fit experiment=shapes_pretrain`) "
                "or point policy.pretrained_path at a folder written by MaskedDiffusionPolicy.save_pretrained.")
        return MaskedDiffusionPolicy.from_pretrained(path)
    for key, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("max_text_len", max_text_len)):
        require(int(value) >= 1, key, f"must be >= 1, got {value}")
    require(int(d_model) % int(n_heads) == 0, "d_model", f"must be divisible by n_heads ({n_heads}), got {d_model}")
    return MaskedDiffusionPolicy.toy(world, list(VOCABULARY), d_model=int(d_model), n_layers=int(n_layers),
                                     n_heads=int(n_heads), mlp_hidden_size=int(round(float(mlp_ratio) * int(d_model))),
                                     max_text_len=int(max_text_len),
                                     rope_theta=float(rope_theta),
                                     grid_position_embedding=bool(grid_position_embedding))


def as_image_generator(policy, sampler):
    """Wrap a trainable policy with its sampler (masked diffusion: ``SamplerSettings``; MAR:
    ``MARSamplerSettings``); pass oracle/random generators through."""
    if hasattr(policy, "generate") and not isinstance(policy, torch.nn.Module):
        return policy
    from htgrpo.policies.mar.shapes import ShapesMARPolicy, require_mar_sampler

    if isinstance(policy, ShapesMARPolicy):
        require_mar_sampler(sampler, "sampler")
    return PolicyImageGenerator(policy, sampler)
