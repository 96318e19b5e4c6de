"""Image generators used by validation, ``evaluate`` and ``generate``: a trainable policy with its sampler settings.

ShapesWorld's own generators (oracle, random tokens) and the toy policy factory live in
:mod:`htgrpo.policies.shapes_llada`; MMaDA / Lumina-DiMOO builders in :mod:`htgrpo.policies.pretrained`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from htgrpo.config import require, require_choice
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
from htgrpo.policies.ml_cache import CACHES, KeyValueRefreshLogits, MaxLogitCacheLogits, MLCacheSettings
from htgrpo.policies.sampling import COUNT_RULES
from htgrpo.policies.t2i_layout import MASKED

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
        count_rule: MaskGIT only: how the cosine schedule becomes per-step commit counts
            (:func:`~htgrpo.policies.sampling.maskgit_commit_counts`): ``float64`` (math in float64; ``maskgit``),
            ``mmada`` (MMaDA's float32 CPU arithmetic; a lone masked token waits for the last step) or ``dimoo``
            (DiMOO's float32 arithmetic on the model's device; a lone masked token is committed at once).
        cache: ``none`` (exact), ``ml_cache``: Lumina-DiMOO's max-logit cache (:mod:`htgrpo.policies.ml_cache`),
            or ``ml_cache_fresh``: the same, also recomputing positions whose token changed; LLaDA-architecture
            policies only; its knobs ``cache_ratio`` (share of positions reused on a cached
            step), ``warmup_ratio`` (share of the first steps computed in full) and ``refresh_interval`` (a full
            step every that many after the warm-up) have DiMOO's released defaults 0.9, 0.3, 5; or ``kv_refresh``
            (:class:`~htgrpo.policies.ml_cache.KeyValueRefreshLogits`): cached steps recompute only the positions the
            sampler reads and the just-committed ones, and a full pass runs once ``kv_refresh_share`` of the image
            changed since the last one.
        kv_refresh_share: ``kv_refresh`` only: share of the image that must change before a full pass, in (0, 1].
    """

    name: str = "maskgit"
    num_steps: int = 16
    guidance_scale: float = 2.0
    temperature: float = 1.0
    schedule: str = "cosine"
    noise_anneal: str = "linear"
    choice_temperature: float | None = None
    count_rule: str = "float64"
    cache: str = "none"
    cache_ratio: float = 0.9
    warmup_ratio: float = 0.3
    refresh_interval: int = 5
    kv_refresh_share: float = 0.25

    def __post_init__(self) -> None:
        require_choice(self.name, SAMPLERS, "name")
        require(int(self.num_steps) >= 1, "num_steps", f"must be >= 1, got {self.num_steps}")
        require(float(self.guidance_scale) >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        require(float(self.temperature) >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require_choice(self.schedule, ("cosine",), "schedule")
        require_choice(self.noise_anneal, ("linear", "compound", "none"), "noise_anneal")
        require_choice(self.count_rule, COUNT_RULES, "count_rule")
        require(self.choice_temperature is None or float(self.choice_temperature) >= 0, "choice_temperature",
                f"must be >= 0 or null, got {self.choice_temperature}")
        require_choice(self.cache, CACHES, "cache")
        self.ml_cache_settings()  # validates cache_ratio, warmup_ratio, refresh_interval (errors name the key)
        require(0 < float(self.kv_refresh_share) <= 1, "kv_refresh_share",
                f"must be in (0, 1], got {self.kv_refresh_share}")

    def ml_cache_settings(self) -> MLCacheSettings:
        return MLCacheSettings(float(self.cache_ratio), float(self.warmup_ratio), self.refresh_interval)

    def sample(self, policy, prompt_tokens, generator: torch.Generator | None = None):
        """Run the configured sampler; returns ``SampledImageTokens``."""
        from htgrpo.policies.sampling import emerge_sample, maskgit_sample

        fn = maskgit_sample if self.name == "maskgit" else emerge_sample
        kwargs = dict(num_steps=int(self.num_steps), guidance_scale=float(self.guidance_scale), generator=generator)
        if self.cache != "none":
            # the cached logits stand in for the policy: the sampler gets a logits_fn and the fully masked canvas
            require(hasattr(policy, "guided_image_logits") and hasattr(policy, "layout"), "cache",
                    f"ml_cache needs a LLaDA-architecture masked-diffusion policy, got {type(policy).__name__}")
            if self.cache == "kv_refresh":
                logits_fn = KeyValueRefreshLogits(policy, prompt_tokens, float(self.kv_refresh_share))
            else:
                logits_fn = MaxLogitCacheLogits(policy, prompt_tokens, int(self.num_steps), self.ml_cache_settings(),
                                                recompute_changed=self.cache == "ml_cache_fresh")
            canvas = torch.full((prompt_tokens.batch_size, policy.num_image_tokens), MASKED, dtype=torch.long,
                                device=policy.device)
            policy, prompt_tokens = logits_fn, canvas
        if self.name == "maskgit":
            kwargs.update(temperature=float(self.temperature), schedule=self.schedule, noise_anneal=self.noise_anneal,
                          choice_temperature=self.choice_temperature, count_rule=self.count_rule)
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
        texts = [p.prompt for p in prompts]
        if isinstance(self.policy, MaskedDiffusionPolicy):  # names a prompt its length cap cuts (logged once)
            prompt_tokens = self.policy.encode_prompts(texts, keys=[f"{p.benchmark}:{p.key}" for p in prompts])
        else:
            prompt_tokens = self.policy.encode_prompts(texts)
        prompt_tokens = prompt_tokens.to(device)
        gen = generator if device.type == "cpu" else torch.Generator(device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator)))
        sampled = self.sampler.sample(self.policy, prompt_tokens, generator=gen)
        if getattr(sampled, "codes", None) is not None:   # palette / VQ codes
            images = self.policy.image_tokenizer.decode(sampled.codes.cpu())
        else:                                            # continuous tokens (MAR with a VAE: Harmon)
            images = self.policy.decode_tokens(sampled.tokens)
        self.policy.train(was_training)
        return images


def as_image_generator(policy, sampler):
    """Wrap a trainable policy with its sampler (masked diffusion: ``SamplerSettings``; MAR:
    ``MARSamplerSettings``); pass oracle/random generators through."""
    if hasattr(policy, "generate") and not isinstance(policy, torch.nn.Module):
        return policy
    if hasattr(policy, "ar_model") or hasattr(policy, "mar"):  # a MAR-family policy needs the MAR sampler
        from htgrpo.policies.mar.sampling import require_mar_sampler

        require_mar_sampler(sampler, "sampler")
    return PolicyImageGenerator(policy, sampler)


_MOVED_TO_SHAPES = ("OraclePolicy", "RandomTokenPolicy", "build_masked_diffusion_policy")


def __getattr__(name: str):
    """Names that moved to :mod:`htgrpo.policies.shapes_llada` still resolve (imported only when asked for), so
    this generic module itself never imports ShapesWorld."""
    if name in _MOVED_TO_SHAPES:
        from htgrpo.policies import shapes_llada

        return getattr(shapes_llada, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
