"""What flows between the stages of one GRPO step on a masked-diffusion policy.

    PromptBatch ──rollout──▶ Rollout ──reward + advantage + partition──▶ ScoredRollout
                                   ──stage + estimator plan + old/ref log-probs──▶ InnerIteration (× K)

Every tensor is laid out group-contiguous: sample ``g·G + j`` is generation ``j`` of prompt ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from htgrpo.algorithms.credit import Stage
from htgrpo.algorithms.estimators import ScoringPlan
from htgrpo.algorithms.grpo_base import GroupedRollout
from htgrpo.algorithms.grpo_math import GroupAdvantages
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.policies.masked_diffusion import PromptTokens
from htgrpo.policies.sampling import SampledImageTokens


def sample_in_micro_batches(sampler: Any, policy: Any, prompt_tokens: PromptTokens, generator: torch.Generator | None,
                            micro_batch_size: int | None,
                            on_chunk: Callable[[slice, SampledImageTokens], None] | None = None) -> SampledImageTokens:
    """Run ``sampler.sample`` on consecutive chunks of ``micro_batch_size`` prompts and concatenate the records.

    A group of 9 sequences of 1283 tokens with CFG is 18 sequences per forward pass; chunks bound the activation
    memory of the rollout. The chunks draw from the same ``generator`` one after another, so a fixed seed and chunk
    size reproduce; ``None`` (or a size >= the batch) samples everything in one call, exactly as before.

    ``on_chunk(rows, part)``, when given, is called after each chunk is sampled (before the next one starts) with the
    chunk's rows of the batch and its record: the hook that hands chunk i to a scorer while chunk i+1 samples
    (:mod:`htgrpo.algorithms.overlap`).
    """
    n = prompt_tokens.batch_size
    size = n if micro_batch_size is None else min(int(micro_batch_size), n)
    if size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if size >= n:
        whole = sampler.sample(policy, prompt_tokens, generator=generator)
        if on_chunk is not None:
            on_chunk(slice(0, n), whole)
        return whole
    parts = []
    for i in range(0, n, size):
        part = sampler.sample(policy, prompt_tokens[i:i + size], generator=generator)
        if on_chunk is not None:
            on_chunk(slice(i, min(i + size, n)), part)
        parts.append(part)
    return SampledImageTokens.concat(parts)


@dataclass
class Rollout(GroupedRollout):
    """G sampled images per prompt, with the sampler's per-token record.

    Attributes:
        prompts: B·G prompts (each prompt repeated G times, group-contiguous).
        prompt_tokens: the tokenised prompts (B·G rows), as the policy saw them.
        sampled: codes, commit step, confidence and entropy of every image token (B·G × N).
        images: decoded images, uint8 (B·G, 3, H, W), on the CPU (the scorers' input).
        num_generations: G.
    """

    prompts: list[BenchmarkPrompt]
    prompt_tokens: PromptTokens
    sampled: SampledImageTokens
    images: torch.Tensor
    num_generations: int


@dataclass
class ScoredRollout:
    """A rollout with its rewards, image advantages and HT-GRPO's token partition and credit.

    Attributes:
        rollout: the sampled batch.
        rewards: (B·G,) float32, NaN where a scorer failed.
        advantages: group-normalised image advantages and their bookkeeping.
        structure: (B·G, N) bool, the structure set S of each image (the rest is the refinement set R).
        structure_rank: (B·G, N) long, each token's rank in the partition order (0 = first).
        credit: (B·G, N) float, credit weights w (mean 1 per image when normalised).
        token_advantages: (B·G, N) float, Â = A_g · w.
    """

    rollout: Rollout
    rewards: torch.Tensor
    advantages: GroupAdvantages
    structure: torch.Tensor
    structure_rank: torch.Tensor
    credit: torch.Tensor
    token_advantages: torch.Tensor


@dataclass
class InnerIteration:
    """One of the K policy updates on a scored rollout: which tokens it scores and the fixed log-probs it compares to.

    ``old_logp`` and ``ref_logp`` were computed from exactly the inputs in ``plan`` (same canvases, same prompt
    masks), before the first update, so the ratio and the KL compare like with like.
    """

    index: int
    stage: Stage
    plan: ScoringPlan
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None


@dataclass
class UpdateStats:
    """Scalars of one inner update (detached floats) and the per-token tensors the histogram callback reads."""

    stage: Stage
    loss: float
    kl: float
    ratio_mean: float
    clip_low: float
    clip_high: float
    grad_norm: float
    scored_tokens: int
    ratios: torch.Tensor = field(repr=False)
    token_advantages: torch.Tensor = field(repr=False)
    credit: torch.Tensor = field(repr=False)
    structure_commit_steps: torch.Tensor = field(repr=False)
    entropy: float = float("nan")
    """mean entropy over the image codes of the scored tokens (computed only with ``entropy_coef > 0``)"""
