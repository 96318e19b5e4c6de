"""MAR-GRPO (arXiv 2604.06966) for masked-autoregressive image generators with a per-token diffusion head.

Algorithm (one training step = one rollout batch; SPEC §5, reference/mar_grpo.md §1.3–§1.6)::

    1. rollout     — eval mode, no grad: G images per prompt with MAR sampling; draw the trained AR steps first and
                     log, at each of them (and at the step before, for the consistency test), the head's full
                     reverse chain for all L positions (x_t, x_{t−1}, mean, σ²), plus each token's AR latent z from
                     the step that generated it (``ar_latents``);
    2. reward      — the scorer reads each image against its prompt's metadata;
    3. advantage   — A = (r − mean_group) / (std + 1e-4) (``scale_rewards``); NaN rewards and flat groups give 0;
    4. MTE         — S = ``mte.num_trajectories`` extra head chains from fresh noise on the per-token latents, as ONE
                     batched head call over S·B·L tokens; uncertainty u = std over the S final samples (channel
                     mean); the top ``mte.top_k_percent`` % most uncertain tokens of each image are "critic" tokens;
    5. plan        — per trained AR step i: k = ``num_train_diffusion_steps`` random chain steps; token masks
                     (completion = tokens unknown before step i; consistency: keep a still-unknown token only if
                     cos(proposal_i, final) − cos(proposal_{i−1}, final) > τ; step-i tokens always kept); the frozen
                     reference's means (KL) and, in ``ppo`` mode, the old log-probs — all before any update;
    6. update × K  — per trained AR step: recompute z with grad on the step's input canvas, score the stored
                     transitions (critic tokens: mean over the S chains of their log-probs, also scored with the
                     step-i latent), loss = −A·exp(logp − sg) (``released``) or the clipped PPO surrogate (``ppo``)
                     + β·KL on the Gaussian means; backward per AR step (gradients sum over AR steps); one AdamW
                     step (K = 1 in ``released`` mode).

The head is frozen by default (``freeze_head``): gradients reach the AR part through μ_θ(x_t, t, z).

Code quirks of the released code (reference §1.9) are switches under ``quirks`` (all off by default: each is an
apparent bug or an inconsistency): ``harmon_mask_offset``, ``cond_only_logprob``, ``unguided_mte``,
``reseed_global_rng``, ``dropout_in_loss``. Smaller differences an independent check found between this code and the
release are switches whose default IS the release's behaviour: ``mte.score_std`` (extra chains scored with the
rollout std), ``mte.min_tokens`` (at least one critic token), ``consistency.from_step`` / ``requires_mte`` (test from
step 2, only with MTE) and ``logprob.clamp`` (the release's variance clamp); see conf/algorithm/mar_grpo.yaml.

Randomness: every random draw of step t (AR steps, rollout noise, MTE noise, diffusion steps) comes from generators
seeded with (seed, rank, t), so a resumed run repeats an uninterrupted one exactly.

Lightning's ``global_step`` counts optimiser updates (K per rollout batch); ``rollout_step`` counts rollout batches.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from htgrpo.algorithms.grpo_base import GroupedRollout, GRPOModule, as_dict
from htgrpo.algorithms.grpo_math import GroupAdvantages, group_advantages
from htgrpo.algorithms.mar_math import (
    CHANNEL_REDUCTIONS,
    KL_TYPES,
    MTE_MODES,
    RATIO_MODES,
    TOP_K_ROUNDINGS,
    STD_CLAMPS,
    SelectionMasks,
    chain_log_prob,
    consistency_mask,
    gaussian_mean_kl,
    mar_grpo_loss,
    multi_trajectory_log_prob,
    selection_masks,
    token_uncertainty,
    top_k_percent_mask,
)
from htgrpo.config import ConfigError, require, require_choice, require_range
from htgrpo.data.datamodules import PromptBatch
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.evaluation.benchmark import Benchmark
from htgrpo.policies.mar.backbone import TextCondition
from htgrpo.policies.mar.head import HeadChain
from htgrpo.policies.mar.sampling import MARRollout, MARSamplerSettings, MARStepLog, require_mar_sampler

AR_STEP_REDUCTIONS = ("sum", "mean")
# Release-difference switches (issue 12 item 4) default to the released code's behaviour: mte.score_std,
# mte.min_tokens, consistency.from_step, consistency.requires_mte, logprob.clamp (see conf/algorithm/mar_grpo.yaml).
MTE_DEFAULTS = {"enabled": True, "num_trajectories": 5, "top_k_percent": 30.0, "mode": "mean_log_prob",
                "rounding": "floor", "score_std": "rollout", "min_tokens": 1}
CONSISTENCY_DEFAULTS = {"enabled": True, "threshold": 0.0, "from_step": 2, "requires_mte": True}
LOGPROB_DEFAULTS = {"channel_reduce": "sum", "min_std": 1.0e-6, "clamp": "released"}
MTE_SCORE_STDS = ("rollout", "own")
QUIRK_DEFAULTS = {"harmon_mask_offset": False, "cond_only_logprob": False, "unguided_mte": False,
                  "reseed_global_rng": False, "dropout_in_loss": False}


# ======================================================================================================================
# What flows between the stages
# ======================================================================================================================


@dataclass
class MARGroupRollout(GroupedRollout):
    """G sampled images per prompt with MAR's per-step logs (group-contiguous: sample g·G + j).

    Attributes:
        prompts: B·G prompts (each repeated G times).
        condition: their tokenised captions.
        rollout: the :class:`MARRollout` (final tokens, orders, per-token AR latents, logged step chains).
        images: decoded uint8 images (B·G, 3, H, W), CPU.
        train_steps: the AR steps trained on (sorted).
        num_generations: G.
    """

    prompts: list[BenchmarkPrompt]
    condition: TextCondition
    rollout: MARRollout
    images: Tensor
    train_steps: list[int]
    num_generations: int


@dataclass
class MTEChains:
    """S head chains from fresh noise on every token's AR latent (multi-trajectory expectation).

    Attributes:
        chain: one :class:`HeadChain` over S·B·L tokens, token ``s·(B·L) + b·L + l``.
        num_trajectories: S.
        uncertainty: (B, L) std over the S final samples, channel mean.
        critic: (B, L) bool, the top-k % most uncertain tokens of each image (they use the chain-averaged term).
    """

    chain: HeadChain
    num_trajectories: int
    uncertainty: Tensor
    critic: Tensor

    def select(self, flat_tokens: Tensor) -> HeadChain:
        """The S chains of the given flat token indices (b·L + l), s-major: (T, S·n, D)."""
        n_all = self.chain.x_t.shape[1] // self.num_trajectories
        idx = (torch.arange(self.num_trajectories, device=flat_tokens.device)[:, None] * n_all
               + flat_tokens[None, :]).reshape(-1)
        return self.chain.select(idx)


@dataclass
class ARStepPlan:
    """Everything fixed before the first update for one trained AR step.

    Attributes:
        step: the AR step index i.
        diffusion_steps: (k,) rows of the step's chain that are scored.
        masks: policy / KL token masks (B, L).
        consistency: (B, L) bool consistency test (None at step 0 or when disabled).
        delta_cos: (B, L) cos_i − cos_{i−1} (None when there is no test).
        scored: (n,) flat indices (b·L + l) of the tokens any term needs (the KL mask ⊇ the policy mask).
        critic: (n,) bool, which of ``scored`` use the chain-averaged MTE term (all False without MTE).
        ref_mean: (k, n, D) the frozen reference's means at the scored transitions (None without KL).
        old_logp: (B, L) the rollout-time policy's log-probs (``ppo`` mode only).
    """

    step: int
    diffusion_steps: Tensor
    masks: SelectionMasks
    consistency: Tensor | None
    delta_cos: Tensor | None
    scored: Tensor
    critic: Tensor
    ref_mean: Tensor | None = None
    old_logp: Tensor | None = None


@dataclass
class StepTerms:
    """Per-token quantities of one AR step under some model: ``logp`` (B, L) (0 off ``scored``) and the recomputed
    means (k, n, D) of the rollout chain at the scored tokens."""

    logp: Tensor
    mean: Tensor


@dataclass
class MARUpdateStats:
    """Scalars of one AR step of one update (detached floats) and per-token tensors for the histogram callback."""

    update: int
    step: int
    loss: float
    policy_loss: float
    kl: float
    ratio_mean: float
    clip_low: float
    clip_high: float
    policy_tokens: int
    kl_tokens: int
    critic_tokens: int
    consistency_kept: float
    ratios: Tensor = field(repr=False)
    grad_norm: float = 0.0


@dataclass
class MARSelectionRecord:
    """What the selection callbacks read after a step (CPU tensors).

    Attributes:
        uncertainty: (B, L) MTE token uncertainty (None without MTE).
        critic: (B, L) bool MTE critic tokens (None without MTE).
        step_of_token: (B, L) AR step that generated each token.
        consistency_delta: per trained AR step, Δcos of its still-unknown tokens (1-d).
        consistency_kept_steps: AR step (of generation) of the tokens the consistency test kept.
        policy_fraction: per trained AR step, fraction of still-unknown tokens in the policy term.
    """

    uncertainty: Tensor | None
    critic: Tensor | None
    step_of_token: Tensor
    consistency_delta: Tensor
    consistency_kept_steps: Tensor
    policy_fraction: dict[int, float]


# ======================================================================================================================
# The module
# ======================================================================================================================


class MARGRPO(GRPOModule):
    """MAR-GRPO: GRPO for MAR policies with MTE and consistency-aware token selection.

    Args:
        policy: a :class:`~htgrpo.policies.mar.shapes.ShapesMARPolicy` or
            :class:`~htgrpo.policies.mar.harmon.HarmonPolicy` (any policy with ``mar``, ``encode_prompts``,
            ``decode_tokens``, ``use_sampling_steps``).
        reward: callable ``(images uint8 (B,3,H,W), records) -> float tensor (B,)``.
        benchmark: validation benchmark.
        sampler: validation sampler settings (``sampler=mar``).
        rollout_sampler: sampler of the rollouts (defaults to ``sampler``); its temperature must be > 0.
        num_generations: G, images per prompt (MAR-GRPO: 4).
        scale_rewards: ``group`` | ``batch`` | ``none``.
        beta: KL weight against the frozen starting policy (0.01); 0 skips the reference.
        epsilon, epsilon_high: PPO clip (``ratio_mode=ppo`` only; the released ratio is identically 1).
        loss_type: ``token_mean`` (the release's normalisation) or ``seq_mean``.
        ratio_mode: ``released`` (exp(logp − sg logp): REINFORCE, one update per rollout) or ``ppo``
            (exp(logp − logp_old), ``num_inner_updates`` updates on each rollout).
        num_inner_updates: K optimiser updates per rollout (1 in ``released`` mode).
        num_train_ar_steps: AR steps trained per rollout, drawn at random (release: 12 of 64); null = all.
        num_train_diffusion_steps: chain transitions scored per AR step, drawn at random (release: 10); null = all.
        share_diffusion_steps: draw the scored transitions once per rollout for all AR steps (Harmon) or per AR
            step (NOVA).
        ar_step_reduction: ``sum`` (release: one backward per AR step) or ``mean`` of the per-step losses.
        kl_type: ``released`` (exp(Δμ) − Δμ − 1 on the means) or ``gaussian`` (Δμ²/2σ²).
        logprob: ``{channel_reduce: sum|mean|none→sum, min_std}`` per-transition log-density options.
        mte: ``{enabled, num_trajectories: S, top_k_percent, mode: mean_log_prob|log_mean_prob, rounding}``.
        consistency: ``{enabled, threshold: τ}``.
        freeze_head: keep the diffusion head fixed (release: ``fix_head=True``).
        freeze_conditioner: keep the caption encoder fixed (Harmon's frozen LLM).
        quirks: the released code's inconsistencies, each off by default (module docstring).
        lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW (release: 1e-6, 0, (0.9, 0.999), 0, 1.0).
        lr_schedule, lr_min_ratio, lr_decay_batches: decay of the rate over rollout batches
            (:mod:`htgrpo.algorithms.lr_schedule`; constant by default).
        seed: seed of every random draw (combined with rank and rollout step).
        val_seed: validation sampling noise.
    """

    checkpoint_state_key = "mar_grpo"  # this module's state in a Lightning checkpoint

    def __init__(
        self,
        policy: torch.nn.Module,
        reward: Any,
        benchmark: Benchmark | None = None,
        sampler: Any = None,
        rollout_sampler: Any = None,
        num_generations: int = 4,
        scale_rewards: str = "group",
        beta: float = 0.01,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "token_mean",
        ratio_mode: str = "released",
        num_inner_updates: int = 1,
        num_train_ar_steps: int | None = 4,
        num_train_diffusion_steps: int | None = 10,
        share_diffusion_steps: bool = True,
        ar_step_reduction: str = "sum",
        kl_type: str = "released",
        logprob: Mapping[str, Any] | None = None,
        mte: Mapping[str, Any] | None = None,
        consistency: Mapping[str, Any] | None = None,
        freeze_head: bool = True,
        freeze_conditioner: bool = False,
        quirks: Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        val_seed: int = 1234,
        lr_schedule: str = "constant",
        lr_min_ratio: float = 0.0,
        lr_decay_batches: int | None = None,
        diversity_bonus: Mapping[str, Any] | None = None,
    ):
        require_mar_sampler(sampler, "sampler")
        require_mar_sampler(rollout_sampler, "rollout_sampler")
        if policy is not None and not hasattr(policy, "mar"):
            raise ConfigError("policy", f"MAR-GRPO trains a MAR policy (policy=shapes_mar_warm), got "
                                        f"{type(policy).__name__}")
        # Common keys, reference policy, rollout counter (grpo_base.GRPOModule): validated there with their names.
        super().__init__(policy, reward, benchmark, sampler or MARSamplerSettings(), rollout_sampler,
                         num_generations=num_generations, scale_rewards=scale_rewards, beta=beta, epsilon=epsilon,
                         epsilon_high=epsilon_high, loss_type=loss_type, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, seed=seed, val_seed=val_seed,
                         lr_schedule=lr_schedule, lr_min_ratio=lr_min_ratio, lr_decay_batches=lr_decay_batches,
                         diversity_bonus=diversity_bonus)

        # --- validate every MAR-GRPO key up front: a bad value fails at start-up with its name --------------------
        require_choice(ratio_mode, RATIO_MODES, "ratio_mode")
        require(int(num_inner_updates) >= 1, "num_inner_updates", f"must be >= 1, got {num_inner_updates}")
        require(ratio_mode == "ppo" or int(num_inner_updates) == 1, "num_inner_updates",
                f"must be 1 with ratio_mode=released (its ratio is exp(logp - sg(logp)) = 1: a second update would "
                f"not be importance-weighted; use ratio_mode=ppo), got {num_inner_updates}")
        require(num_train_ar_steps is None or int(num_train_ar_steps) >= 1, "num_train_ar_steps",
                f"must be >= 1 or null (all steps), got {num_train_ar_steps}")
        require(num_train_diffusion_steps is None or int(num_train_diffusion_steps) >= 1,
                "num_train_diffusion_steps", f"must be >= 1 or null (all steps), got {num_train_diffusion_steps}")
        require_choice(ar_step_reduction, AR_STEP_REDUCTIONS, "ar_step_reduction")
        require_choice(kl_type, KL_TYPES, "kl_type")
        require(float(self.rollout_sampler.temperature) > 0, "rollout_sampler.temperature",
                f"must be > 0 for MAR-GRPO rollouts (the logged transitions need a density), got "
                f"{self.rollout_sampler.temperature}")

        self.ratio_mode = str(ratio_mode)
        self.num_inner_updates = int(num_inner_updates)
        self.num_train_ar_steps = None if num_train_ar_steps is None else int(num_train_ar_steps)
        self.num_train_diffusion_steps = None if num_train_diffusion_steps is None else int(num_train_diffusion_steps)
        self.share_diffusion_steps = bool(share_diffusion_steps)
        self.ar_step_reduction, self.kl_type = str(ar_step_reduction), str(kl_type)

        self.logprob = _section("logprob", logprob, LOGPROB_DEFAULTS)
        require_choice(self.logprob["channel_reduce"], ("sum", "mean"), "logprob.channel_reduce")
        require(float(self.logprob["min_std"]) > 0, "logprob.min_std", f"must be > 0, got {self.logprob['min_std']}")
        require_choice(self.logprob["clamp"], STD_CLAMPS, "logprob.clamp")

        self.mte = _section("mte", mte, MTE_DEFAULTS)
        self.mte["enabled"] = _flag(self.mte["enabled"], "mte.enabled")
        require(_is_int(self.mte["num_trajectories"]) and int(self.mte["num_trajectories"]) >= 1,
                "mte.num_trajectories", f"must be an integer >= 1, got {self.mte['num_trajectories']!r}")
        self.mte["num_trajectories"] = int(self.mte["num_trajectories"])
        try:
            self.mte["top_k_percent"] = float(self.mte["top_k_percent"])
        except (TypeError, ValueError):
            raise ConfigError("mte.top_k_percent", f"must be a number in [0, 100], got "
                                                   f"{self.mte['top_k_percent']!r}") from None
        require_range(self.mte["top_k_percent"], "mte.top_k_percent", 0.0, 100.0)
        require_choice(self.mte["mode"], MTE_MODES, "mte.mode")
        require_choice(self.mte["rounding"], TOP_K_ROUNDINGS, "mte.rounding")
        require_choice(self.mte["score_std"], MTE_SCORE_STDS, "mte.score_std")
        require(_is_int(self.mte["min_tokens"]) and int(self.mte["min_tokens"]) >= 0, "mte.min_tokens",
                f"must be an integer >= 0, got {self.mte['min_tokens']!r}")
        self.mte["min_tokens"] = int(self.mte["min_tokens"])

        self.consistency = _section("consistency", consistency, CONSISTENCY_DEFAULTS)
        self.consistency["enabled"] = _flag(self.consistency["enabled"], "consistency.enabled")
        try:
            self.consistency["threshold"] = float(self.consistency["threshold"])
        except (TypeError, ValueError):
            raise ConfigError("consistency.threshold", f"must be a number in [-2, 2], got "
                                                       f"{self.consistency['threshold']!r}") from None
        require_range(self.consistency["threshold"], "consistency.threshold", -2.0, 2.0)
        require(_is_int(self.consistency["from_step"]) and int(self.consistency["from_step"]) >= 1,
                "consistency.from_step", f"must be an integer >= 1 (step 0 has no previous step), got "
                                         f"{self.consistency['from_step']!r}")
        self.consistency["from_step"] = int(self.consistency["from_step"])
        self.consistency["requires_mte"] = _flag(self.consistency["requires_mte"], "consistency.requires_mte")

        self.quirks = _section("quirks", quirks, QUIRK_DEFAULTS)
        for key in QUIRK_DEFAULTS:
            self.quirks[key] = _flag(self.quirks[key], f"quirks.{key}")
        self.freeze_head = _flag(freeze_head, "freeze_head")
        self.freeze_conditioner = _flag(freeze_conditioner, "freeze_conditioner")

        if self.freeze_head and policy is not None:
            self.policy.mar.diffloss.requires_grad_(False)
        if self.freeze_conditioner and policy is not None and self.policy.mar.conditioner is not None:
            self.policy.mar.conditioner.requires_grad_(False)
        self.last_update_stats: list[MARUpdateStats] = []
        self.last_rollout: MARGroupRollout | None = None
        self.last_advantages: GroupAdvantages | None = None
        self.last_selection: MARSelectionRecord | None = None
        self.save_hyperparameters(ignore=["policy", "reward", "benchmark", "sampler", "rollout_sampler"])

    # ===================================================================================================
    # The algorithm box
    # ===================================================================================================
    @property
    def one_backward_per_update(self) -> bool:
        # The update accumulates one backward per trained AR step.
        return False

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rollout = self.rollout(batch)                                        # 1. G images per prompt, step logs
        timings["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards = self.reward(rollout)                                       # 2. scorer
        timings["reward"] = time.perf_counter() - t0
        if self.skip_unscored_batch(rollout, rewards, timings):     # no finite reward: never train on it
            return
        adv = group_advantages(rewards, self.num_generations, self.scale_rewards)   # 3. group advantages

        t0 = time.perf_counter()
        mte = self.multi_trajectory(rollout) if self.mte["enabled"] else None       # 4. S fresh chains
        timings["mte"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plans = self.plan_updates(rollout, mte)                              # 5. masks, reference, old log-probs
        advantages = adv.advantages.to(self.policy.device)
        self.last_update_stats = []
        for k in range(self.num_inner_updates):                              # 6. K updates
            self.last_update_stats += self.update(rollout, mte, plans, advantages, k)
        timings["update"] = time.perf_counter() - t0

        self.last_rollout, self.last_advantages = rollout, adv
        self.last_selection = self._selection_record(rollout, mte, plans)
        self.last_timings = timings
        self._log_step(rollout, rewards, adv, mte, plans, self.last_update_stats, timings)
        self.rollout_step += 1

    # -- 1. rollout ----------------------------------------------------------------------------------------
    def choose_train_steps(self, num_ar_steps: int, generator: torch.Generator) -> list[int]:
        """The AR steps trained on this rollout: ``num_train_ar_steps`` of ``range(num_ar_steps)`` at random."""
        n = num_ar_steps if self.num_train_ar_steps is None else min(self.num_train_ar_steps, num_ar_steps)
        perm = torch.randperm(num_ar_steps, generator=generator, device=generator.device)
        return sorted(int(i) for i in perm[:n].tolist())

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> MARGroupRollout:
        """Sample ``num_generations`` images per prompt (eval mode, no grad), logging the trained steps' chains."""
        G = self.num_generations
        prompts = [p for p in batch.prompts for _ in range(G)]
        generator = self.step_generator(0)
        train_steps = self.choose_train_steps(int(self.rollout_sampler.num_ar_steps), generator)
        log_steps = set(train_steps)
        log_steps |= {i - 1 for i in train_steps if self.consistency_applies(i)}
        was_training = self.policy.training
        self.policy.eval()
        try:
            condition = self.policy.encode_prompts([p.prompt for p in prompts])
            sampled = self.rollout_sampler.sample(self.policy, condition, generator=generator,
                                                  log_ar_steps=sorted(log_steps))
            images = self.policy.decode_tokens(sampled.tokens)
        finally:
            self.policy.train(was_training)
        return MARGroupRollout(prompts, condition, sampled.rollout, images, train_steps, G)

    # -- 2. reward: GRPOModule.reward (safe_score: a scorer exception for an image becomes NaN, advantage 0) ----

    # -- 4. multi-trajectory expectation -------------------------------------------------------------------
    @torch.no_grad()
    def multi_trajectory(self, rollout: MARGroupRollout, generator: torch.Generator | None = None,
                         batched: bool = True) -> MTEChains:
        """S full head chains from fresh noise on every token's generation-step latent, in ONE batched head call.

        Guided like the rollout (each token with the CFG scale of the step that generated it) unless
        ``quirks.unguided_mte`` (NOVA's release: effectively cfg = 1). ``batched=False`` runs S separate calls
        with the same noise (benchmarks/tests: the result is the same).
        """
        r = rollout.rollout
        head = self.policy.mar.diffloss
        self.policy.use_sampling_steps(self.rollout_sampler.num_diffusion_steps)
        S = int(self.mte["num_trajectories"])
        B, L, D = r.tokens.shape
        N = B * L
        z = r.ar_latents.reshape(N, -1)
        cfg_tok = torch.tensor(r.cfg_per_step, dtype=z.dtype, device=z.device)[r.step_of_token.reshape(-1)]
        guided = r.ar_latents_uncond is not None and bool((cfg_tok != 1.0).any()) and not self.quirks["unguided_mte"]
        z_u = r.ar_latents_uncond.reshape(N, -1) if guided else None
        if self.quirks["reseed_global_rng"]:  # the release re-seeds the global RNG with a random seed here
            torch.manual_seed(random.randint(0, 10000))
            generator = None
        elif generator is None:
            generator = self.step_generator(2)
        T = head.gen_diffusion.num_timesteps
        noise = torch.randn((S, T + 1, N, D), generator=generator, device=z.device, dtype=z.dtype)
        chain = sample_mte_chains(head, z, z_u, cfg_tok if guided else 1.0, S, r.temperature, noise, batched)
        finals = chain.final.view(S, B, L, D)
        uncertainty = token_uncertainty(finals)
        critic = top_k_percent_mask(uncertainty, float(self.mte["top_k_percent"]), rounding=self.mte["rounding"],
                                    min_count=self.mte["min_tokens"])
        return MTEChains(chain=chain, num_trajectories=S, uncertainty=uncertainty, critic=critic)

    # -- 5. plan -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_updates(self, rollout: MARGroupRollout, mte: MTEChains | None) -> list[ARStepPlan]:
        """Per trained AR step: scored transitions, token masks, reference means and (ppo) old log-probs."""
        r = rollout.rollout
        generator = self.step_generator(1)
        self.policy.use_sampling_steps(self.rollout_sampler.num_diffusion_steps)
        if self.reference is not None:
            self.reference.use_sampling_steps(self.rollout_sampler.num_diffusion_steps)
        T = self.policy.mar.diffloss.gen_diffusion.num_timesteps
        k = T if self.num_train_diffusion_steps is None else min(self.num_train_diffusion_steps, T)
        shared = torch.randperm(T, generator=generator, device=generator.device)[:k].sort().values
        plans = []
        for i in rollout.train_steps:
            log = r.steps[i]
            if self.share_diffusion_steps:
                dsteps = shared
            else:
                dsteps = torch.randperm(T, generator=generator, device=generator.device)[:k].sort().values
            consistency, delta = None, None
            if self.consistency_applies(i):
                prev = r.steps[i - 1].proposals
                cur, final = log.proposals, r.tokens
                delta = (torch.nn.functional.cosine_similarity(cur, final, dim=-1)
                         - torch.nn.functional.cosine_similarity(prev, final, dim=-1))
                consistency = consistency_mask(prev, cur, final, self.consistency["threshold"])
            masks = selection_masks(~log.known, log.decoded, consistency, self.quirks["harmon_mask_offset"])
            scored = masks.kl.reshape(-1).nonzero().squeeze(1)
            critic = (mte.critic & masks.policy).reshape(-1)[scored] if mte is not None else \
                torch.zeros_like(scored, dtype=torch.bool)
            plan = ARStepPlan(step=i, diffusion_steps=dsteps.to(self.policy.device), masks=masks,
                              consistency=consistency, delta_cos=delta, scored=scored, critic=critic)
            if self.reference is not None and self.beta > 0:
                plan.ref_mean = self.step_terms(self.reference, rollout, plan, mte=None, train_mode=False).mean
            if self.ratio_mode == "ppo":
                plan.old_logp = self.step_terms(self.policy, rollout, plan, mte=mte, train_mode=False).logp
            plans.append(plan)
        return plans

    # -- per-token terms of one AR step --------------------------------------------------------------------
    def step_terms(self, model: torch.nn.Module, rollout: MARGroupRollout, plan: ARStepPlan,
                   mte: MTEChains | None, train_mode: bool | None = None) -> StepTerms:
        """Log-probs (B, L) of AR step ``plan.step`` under ``model`` (differentiable when grad is enabled).

        z = MAR encoder/decoder on the step's input canvas (its known tokens), recomputed now; the stored step-i
        transitions of the scored tokens at ``plan.diffusion_steps`` are re-scored under N(μ_θ(x_t, t, z), σ²_rollout)
        (guided with the step's CFG scale unless ``quirks.cond_only_logprob``), channel-reduced, averaged over the
        scored transitions. Critic tokens use the mean over the S MTE chains, scored with the same step-i latent.
        """
        r = rollout.rollout
        log: MARStepLog = r.steps[plan.step]
        # What computes z from the condition: the MAR itself, or Harmon's MAR encoder -> LLM -> decoder.
        mar = model.ar_model if hasattr(model, "ar_model") else model.mar
        B, L, D = r.tokens.shape
        train_mode = self.quirks["dropout_in_loss"] if train_mode is None else train_mode
        was_training = model.training
        model.train(train_mode)
        try:
            mask = ~log.known
            if self.quirks["harmon_mask_offset"]:  # the release passes the mask *after* step i as the encoder mask
                mask = mask & ~log.decoded
            guided = log.cfg != 1.0 and not self.quirks["cond_only_logprob"]
            cond = mar.condition_embedding(rollout.condition, batch_size=B)
            if guided:
                uncond = mar.unconditional_embedding(B, like=cond)
                z, z_u = mar.guided_ar_latents(log.input_tokens, mask, cond, uncond)
            else:
                z, z_u = mar.ar_latents(log.input_tokens, mask, cond), None
            z = z.reshape(B * L, -1)
            z_u = None if z_u is None else z_u.reshape(B * L, -1)
            cfg = float(log.cfg) if guided else 1.0
            head = mar.diffloss
            reduce, min_std = self.logprob["channel_reduce"], float(self.logprob["min_std"])
            clamp = self.logprob["clamp"]
            idx = plan.scored
            score = head.score_chain(z[idx], log.chain.select(idx), steps=plan.diffusion_steps,
                                     z_uncond=None if z_u is None else z_u[idx], cfg=cfg, reduce=reduce,
                                     min_std=min_std, clamp=clamp)
            single = chain_log_prob(score.log_prob)                                  # (n,)
            logp = single
            if mte is not None and bool(plan.critic.any()):
                cidx = idx[plan.critic]
                S = mte.num_trajectories
                chains = mte.select(cidx)
                if self.mte["score_std"] == "rollout":
                    # The release scores every extra chain with the ROLLOUT chain's std at this AR step (s-major).
                    chains = dataclasses.replace(chains, log_variance=log.chain.log_variance[:, cidx].repeat(1, S, 1))
                mscore = head.score_chain(z[cidx].repeat(S, 1), chains, steps=plan.diffusion_steps,
                                          z_uncond=None if z_u is None else z_u[cidx].repeat(S, 1), cfg=cfg,
                                          reduce=reduce, min_std=min_std, clamp=clamp)
                mte_c = chain_log_prob(mscore.log_prob).view(S, -1)                 # (S, n_c)
                mte_terms = single.detach().unsqueeze(0).repeat(S, 1)
                mte_terms = mte_terms.index_copy(1, plan.critic.nonzero().squeeze(1), mte_c)
                logp = multi_trajectory_log_prob(single, mte_terms, plan.critic, mode=self.mte["mode"])
            full = torch.zeros(B * L, dtype=logp.dtype, device=logp.device).index_copy(0, idx, logp)
            return StepTerms(logp=full.view(B, L), mean=score.mean)
        finally:
            model.train(was_training)

    def consistency_applies(self, step: int) -> bool:
        """Whether AR step ``step`` gets the consistency test: ``consistency.enabled``, ``step >= from_step`` (the
        release: i > 1, i.e. from_step 2) and, with ``requires_mte`` (the release: only under use_critic_token), MTE on.
        """
        c = self.consistency
        return bool(c["enabled"] and step >= c["from_step"] and (self.mte["enabled"] or not c["requires_mte"]))

    # -- 6. one update -------------------------------------------------------------------------------------
    def update(self, rollout: MARGroupRollout, mte: MTEChains | None, plans: list[ARStepPlan], advantages: Tensor,
               index: int = 0) -> list[MARUpdateStats]:
        """One optimiser update: per AR step loss, backward per AR step (gradients add up), clip, AdamW step."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.policy.use_sampling_steps(self.rollout_sampler.num_diffusion_steps)
        r = rollout.rollout
        stats = []
        scale = 1.0 / len(plans) if self.ar_step_reduction == "mean" and plans else 1.0
        for plan in plans:
            terms = self.step_terms(self.policy, rollout, plan, mte)
            kl = None
            if plan.ref_mean is not None:
                lv = r.steps[plan.step].chain.log_variance[plan.diffusion_steps][:, plan.scored]
                per = gaussian_mean_kl(terms.mean, plan.ref_mean, lv, reduce=self.logprob["channel_reduce"],
                                       kl_type=self.kl_type, min_std=float(self.logprob["min_std"]))
                kl = torch.zeros_like(terms.logp).view(-1).index_copy(0, plan.scored, chain_log_prob(per))
                kl = kl.view_as(terms.logp)
            out = mar_grpo_loss(terms.logp, advantages, plan.masks.policy, logp_old=plan.old_logp, kl=kl,
                                kl_mask=plan.masks.kl, beta=self.beta, ratio_mode=self.ratio_mode,
                                epsilon=self.epsilon, epsilon_high=self.epsilon_high, loss_type=self.loss_type)
            self.manual_backward(out.loss * scale)
            with torch.no_grad():
                old = terms.logp.detach() if plan.old_logp is None else plan.old_logp
                ratio = torch.exp(terms.logp.detach() - old)
                m = plan.masks.policy
                adv = advantages[:, None].expand_as(ratio)
                eps_hi = self.epsilon if self.epsilon_high is None else self.epsilon_high
                n = max(int(m.sum()), 1)
                low = float((((ratio < 1 - self.epsilon) & (adv < 0)) & m).sum()) / n
                high = float((((ratio > 1 + eps_hi) & (adv > 0)) & m).sum()) / n
                still = plan.masks.kl
                kept = float(plan.consistency[still].float().mean()) if plan.consistency is not None and \
                    bool(still.any()) else 1.0
            stats.append(MARUpdateStats(
                update=index, step=plan.step, loss=float(out.loss.detach()), policy_loss=float(out.policy_loss.detach()),
                kl=float(out.kl.detach()), ratio_mean=out.ratio_mean, clip_low=low, clip_high=high,
                policy_tokens=out.kept_tokens, kl_tokens=int(plan.masks.kl.sum()),
                critic_tokens=int(plan.critic.sum()), consistency_kept=kept, ratios=ratio[m].cpu()))
        grad_norm = self.clip_and_step(optimizer)
        for s in stats:
            s.grad_norm = grad_norm
        return stats

    # ===================================================================================================
    # Logging (optimiser, clip-and-step and checkpoint state: GRPOModule)
    # ===================================================================================================
    def _selection_record(self, rollout: MARGroupRollout, mte: MTEChains | None,
                          plans: list[ARStepPlan]) -> MARSelectionRecord:
        r = rollout.rollout
        deltas, kept_steps, fractions = [], [], {}
        for p in plans:
            still = p.masks.kl
            fractions[p.step] = float(p.masks.policy.sum()) / max(int(still.sum()), 1)
            if p.delta_cos is not None:
                deltas.append(p.delta_cos[still].cpu())
                kept_steps.append(r.step_of_token[still & p.consistency].float().cpu())
        empty = torch.zeros(0)
        return MARSelectionRecord(
            uncertainty=None if mte is None else mte.uncertainty.cpu(),
            critic=None if mte is None else mte.critic.cpu(),
            step_of_token=r.step_of_token.cpu(),
            consistency_delta=torch.cat(deltas) if deltas else empty,
            consistency_kept_steps=torch.cat(kept_steps) if kept_steps else empty,
            policy_fraction=fractions)

    def _log_step(self, rollout: MARGroupRollout, rewards: Tensor, adv: GroupAdvantages, mte: MTEChains | None,
                  plans: list[ARStepPlan], updates: list[MARUpdateStats], timings: dict[str, float]) -> None:
        r = rollout.rollout
        log = self.reward_step_log(rollout.prompts, rewards, adv, entropy=_gaussian_entropy(r))
        tokens = [u.policy_tokens for u in updates]
        log.update(self.update_step_log(updates, tokens))
        if updates:
            log["train/policy_loss"] = sum(u.policy_loss for u in updates) / len(updates)
            log["train/kl"] = sum(u.kl for u in updates) / len(updates)
            log["train/policy_tokens"] = sum(tokens) / len(updates)
            log["train/consistency/kept_fraction"] = sum(u.consistency_kept for u in updates) / len(updates)
        if mte is not None:
            log["train/mte/uncertainty_mean"] = float(mte.uncertainty.mean())
            log["train/mte/uncertainty_critic_mean"] = float(mte.uncertainty[mte.critic].mean()) \
                if bool(mte.critic.any()) else 0.0
            log["train/mte/critic_tokens"] = sum(u.critic_tokens for u in updates) / max(len(updates), 1)
        log.update(self.perf_step_log(timings, len(rollout), r.tokens.shape[0] * r.tokens.shape[1]))
        self.emit_step_log(log, rollout.num_groups)


# ======================================================================================================================
# Helpers
# ======================================================================================================================


def sample_mte_chains(head: Any, z: Tensor, z_uncond: Tensor | None, cfg: float | Tensor, num_trajectories: int,
                      temperature: float, noise: Tensor, batched: bool = True) -> HeadChain:
    """S full reverse chains of the head on the N latents ``z`` (N, Dz), as one :class:`HeadChain` over S·N tokens
    (token s·N + n).

    ``noise`` (S, T+1, N, D) fixes every draw (index 0: x_T, then one per reverse step). ``batched=True`` makes ONE
    head call per reverse step over all S·N tokens; ``batched=False`` loops over the S chains (same noise, same
    result up to float rounding; kept for the cost benchmark and the equivalence test). ``cfg`` is a scalar or a
    per-token tensor (N,).
    """
    S = int(num_trajectories)
    N, D = z.shape[0], noise.shape[-1]
    T = noise.shape[1] - 1
    if noise.shape != (S, T + 1, N, D):
        raise ValueError(f"noise: expected ({S}, T+1, {N}, D), got {tuple(noise.shape)}")
    if batched:
        zz = z.repeat(S, 1)
        zu = None if z_uncond is None else z_uncond.repeat(S, 1)
        cc = cfg.repeat(S) if torch.is_tensor(cfg) else cfg
        out = head.sample_chain(zz, temperature, cc, log_steps=True, z_uncond=zu,
                                noise=noise[:, 0].reshape(S * N, D),
                                step_noise=noise[:, 1:].transpose(0, 1).reshape(T, S * N, D))
        return out.chain
    chains = [head.sample_chain(z, temperature, cfg, log_steps=True, z_uncond=z_uncond, noise=noise[s, 0],
                                step_noise=noise[s, 1:]).chain for s in range(S)]
    return HeadChain(x_t=torch.cat([c.x_t for c in chains], 1), x_prev=torch.cat([c.x_prev for c in chains], 1),
                     mean=torch.cat([c.mean for c in chains], 1),
                     log_variance=torch.cat([c.log_variance for c in chains], 1), timesteps=chains[0].timesteps,
                     temperature=chains[0].temperature)


def _gaussian_entropy(r: MARRollout) -> float:
    """Mean differential entropy (nats, channel sum) of the logged reverse transitions: ½Σ_c (log 2πe + log σ²_c)."""
    values = []
    for log in r.steps.values():
        lv = log.chain.log_variance
        values.append(float((0.5 * (math.log(2 * math.pi * math.e) + lv)).sum(-1).mean()))
    return sum(values) / len(values) if values else 0.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _section(name: str, value: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``value``; unknown keys are a ConfigError naming ``name.<key>``."""
    given = as_dict(value)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"unknown key; {name} takes {sorted(defaults)}")
    return {**defaults, **given}


__all__ = [
    "ARStepPlan",
    "MARGRPO",
    "MARGroupRollout",
    "MARSelectionRecord",
    "MARUpdateStats",
    "MTEChains",
    "StepTerms",
    "sample_mte_chains",
]
