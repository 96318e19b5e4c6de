"""Masked autoregressive (MAR) image model with a per-token diffusion head, built for MAR-GRPO.

- :mod:`~htgrpo.policies.mar.backbone`: :class:`MARConfig`, :class:`MAR` (LTH14 parameter names) and the buffer
  conditioners (:class:`ClassConditioner`, :class:`TextConditioner`).
- :mod:`~htgrpo.policies.mar.diffusion`: cosine-schedule DDPM with respacing and learned-range variance; per-step
  Gaussian log-probs.
- :mod:`~htgrpo.policies.mar.head`: the adaLN MLP denoiser and :class:`DiffusionHead` (sampling chains, re-scoring).
- :mod:`~htgrpo.policies.mar.sampling`: the MAR sampling loop with rollout logging (:func:`sample_mar`).
- :mod:`~htgrpo.policies.mar.checkpoints`: LTH14 and Harmon checkpoint loading.
- :mod:`~htgrpo.policies.mar.vae`: MAR's KL-16 VAE (released parameter names, scale 0.2325).
- :mod:`~htgrpo.policies.mar.harmon`: the Harmon policy (MAR + Qwen2 LLM over the prompt's KV cache + KL-16 VAE);
  :mod:`~htgrpo.policies.mar.harmon_tiny` writes a tiny random Harmon checkpoint in the released layout.
"""

from htgrpo.policies.mar.backbone import (
    MAR,
    MAR_PRESETS,
    BufferConditioner,
    ClassConditioner,
    MARConfig,
    TextCondition,
    TextConditioner,
    build_conditioner,
    interpolate_pos_embed,
    patchify,
    unpatchify,
)
from htgrpo.policies.mar.checkpoints import (
    infer_mar_config,
    load_harmon_mar,
    load_lth14_checkpoint,
    save_harmon_checkpoint,
    save_lth14_checkpoint,
)
from htgrpo.policies.mar.diffusion import (
    GaussianDiffusion,
    HeadStep,
    MeanVariance,
    betas_for_alpha_bar,
    cfg_combine,
    create_diffusion,
    gaussian_step_log_prob,
    space_timesteps,
)
from htgrpo.policies.mar.head import ChainScore, DiffusionHead, HeadChain, HeadSample, SimpleMLPAdaLN
from htgrpo.policies.mar.sampling import MARRollout, MARStepLog, MaskSchedule, cosine_mask_schedule, sample_mar

__all__ = [
    "MAR",
    "MAR_PRESETS",
    "BufferConditioner",
    "ChainScore",
    "ClassConditioner",
    "DiffusionHead",
    "GaussianDiffusion",
    "HeadChain",
    "HeadSample",
    "HeadStep",
    "MARConfig",
    "MARRollout",
    "MARStepLog",
    "MaskSchedule",
    "MeanVariance",
    "SimpleMLPAdaLN",
    "TextCondition",
    "TextConditioner",
    "betas_for_alpha_bar",
    "build_conditioner",
    "cfg_combine",
    "cosine_mask_schedule",
    "create_diffusion",
    "gaussian_step_log_prob",
    "infer_mar_config",
    "interpolate_pos_embed",
    "load_harmon_mar",
    "load_lth14_checkpoint",
    "patchify",
    "sample_mar",
    "save_harmon_checkpoint",
    "save_lth14_checkpoint",
    "space_timesteps",
    "unpatchify",
]
