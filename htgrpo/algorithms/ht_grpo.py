"""HT-GRPO ("Sketch Then Paint") for masked-diffusion image generators, and the GRPO baselines it is compared with.

Algorithm (one training step = one rollout batch; SPEC §3–4):

    1. rollout    — eval mode, no grad: G images per prompt with the configured sampler, recording for every image
                    token the step it was committed, its confidence and its entropy;
    2. reward     — the scorer reads each image against its prompt's metadata (GenEval rules / DPG propositions);
    3. advantage  — A = (r − mean_group) / std (``scale_rewards``); NaN rewards and zero-variance groups give 0;
    4. partition  — per image, the structure set S = first ``partition.fraction`` of tokens by ``partition.key``;
                    credit weights w (``credit.kind``), token advantages Â = A·w;
    5. plan       — for each of the K = n_global + n_struct + n_refine inner iterations: its stage's candidate
                    tokens (all / S / R), a random ``stages.scored_fraction`` of them, and the estimator's
                    canvases; old and reference log-probs from exactly those inputs;
    6. update × K — current log-probs, clipped surrogate with Â, + β·k3-KL, ``loss_type`` aggregation,
                    gradient clipping, AdamW step.

The baselines are the same module with another ``estimator`` (unigrpo, maskgrpo, d1, coupled, trace), ``uniform``
credit and a single global stage (``stages: {n_global: K, n_struct: 0, n_refine: 0}``).

Randomness: every random draw of step t (rollout noise, estimator masks, scored subsets) comes from a generator
seeded with (seed, rank, t), so a resumed run repeats an uninterrupted one exactly.

Lightning's ``global_step`` counts optimiser updates (K per rollout batch); ``rollout_step`` counts rollout batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from htgrpo.algorithms.credit import (
    ENTROPY_ORDERS,
    PARTITION_KEYS,
    Stage,
    StageSchedule,
    credit_weights,
    sample_scored,
    stage_candidates,
    structure_mask,
    structure_rank,
    token_advantages,
    validate_credit,
    validate_fraction,
)
from htgrpo.algorithms.estimators import ScoringPass, ScoringPlan, build_estimator, token_log_probs
from htgrpo.algorithms.grpo_base import GRPOModule, as_dict, token_weighted
from htgrpo.algorithms.grpo_math import aggregate_loss, clipped_surrogate, group_advantages, k3_kl
from htgrpo.algorithms.overlap import ChunkScorer, overlap_setting, wants_overlap
from htgrpo.algorithms.rollout import InnerIteration, Rollout, ScoredRollout, UpdateStats, sample_in_micro_batches
from htgrpo.algorithms.scoring_mode import deterministic_scoring
from htgrpo.config import ConfigError, require, require_choice
from htgrpo.data.datamodules import PromptBatch
from htgrpo.evaluation.benchmark import Benchmark
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.ml_cache import CACHES
from htgrpo.policies.t2i_layout import MASKED

logger = logging.getLogger("htgrpo.algorithms.ht_grpo")



class HTGRPO(GRPOModule):
    """GRPO with hierarchical token credit and Sketch-Then-Paint inner stages (and, by config, its baselines).

    Args:
        policy: a ``MaskedDiffusionPolicy`` (trained).
        reward: callable ``(images uint8 (B,3,H,W), records) -> float tensor (B,)``.
        benchmark: validation benchmark.
        sampler: validation sampler settings.
        rollout_sampler: sampler settings of the rollouts (defaults to ``sampler``).
        num_generations: G, images per prompt in a group (TRL name).
        scale_rewards: ``group`` | ``batch`` | ``none`` (TRL name): what the centred reward is divided by.
        beta: k3-KL coefficient against the frozen reference (TRL name); 0 skips the reference entirely.
        epsilon: lower clip ε of the ratio (TRL name). epsilon_high: upper clip (None = epsilon; DAPO's clip-higher).
        loss_type: ``token_mean`` (all scored tokens of the batch) or ``seq_mean`` (per image, then over images).
        estimator: ``{name, ...args}``: how per-token log-probs are estimated (see ``algorithms.estimators``).
        partition: ``{key: decode_step|entropy, fraction: φ, entropy_order: ascending|descending}``.
        credit: ``{kind: binary|soft|uniform, alpha, gamma, normalize}``.
        stages: ``{n_global, n_struct, n_refine, mode: inner|outer, scored_fraction: ρ}``.
        lr, weight_decay, betas, warmup_steps: AdamW and its linear warm-up (in optimiser updates).
        rollout_cache: ``none`` | ``ml_cache`` | ``ml_cache_fresh`` | ``kv_refresh`` for the rollouts only (None = the rollout
            sampler's own ``cache``); validation and the benchmarks keep ``sampler.cache``.
        entropy_coef: c ≥ 0: the loss subtracts c·H(π(·|pass state)) per scored token (entropy over the image codes,
            from the update's own forward); 0 (default) = off.
        diversity_bonus: group-diversity reward shaping (:mod:`htgrpo.algorithms.diversity_bonus`; weight 0 = off).
        lr_schedule, lr_min_ratio, lr_decay_batches: decay of the rate over rollout batches
            (:mod:`htgrpo.algorithms.lr_schedule`; constant by default).
        max_grad_norm: gradient-norm clip per update (0 disables).
        micro_batch_size: images per forward/backward in the updates (None = the whole rollout batch).
        overlap_scoring: ``auto`` | ``true`` | ``false``: score rollout chunk i on a background thread while chunk
            i+1 samples (:mod:`htgrpo.algorithms.overlap`; needs ``rollout_micro_batch_size``). ``auto`` overlaps
            rewards that wait on a server (``remote``, ``vlm_judge``). Same rewards and updates either way.
        rollout_micro_batch_size: images per sampler call in the rollout (None = all B·G at once); bounds the
            rollout's activation memory (with CFG each call runs 2× that many sequences).
        seed: seed of rollout noise and estimator masks (combined with rank and rollout step).
        val_seed: validation sampling noise.
    """

    checkpoint_state_key = "htgrpo"  # this module's state in a Lightning checkpoint

    def __init__(
        self,
        policy: torch.nn.Module,
        reward: Any,
        benchmark: Benchmark | None = None,
        sampler: SamplerSettings | None = None,
        rollout_sampler: SamplerSettings | None = None,
        num_generations: int = 8,
        scale_rewards: str = "group",
        beta: float = 0.01,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "token_mean",
        estimator: Mapping[str, Any] | None = None,
        partition: Mapping[str, Any] | None = None,
        credit: Mapping[str, Any] | None = None,
        stages: Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        micro_batch_size: int | None = None,
        rollout_micro_batch_size: int | None = None,
        overlap_scoring: str | bool = "auto",
        seed: int = 0,
        val_seed: int = 1234,
        lr_schedule: str = "constant",
        lr_min_ratio: float = 0.0,
        lr_decay_batches: int | None = None,
        diversity_bonus: Mapping[str, Any] | None = None,
        entropy_coef: float = 0.0,
        rollout_cache: str | None = None,
    ):
        # Common keys, reference policy, rollout counter (grpo_base.GRPOModule): validated there with their names.
        super().__init__(policy, reward, benchmark, sampler, rollout_sampler, num_generations=num_generations,
                         scale_rewards=scale_rewards, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                         loss_type=loss_type, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, seed=seed, val_seed=val_seed,
                         lr_schedule=lr_schedule, lr_min_ratio=lr_min_ratio, lr_decay_batches=lr_decay_batches,
                         diversity_bonus=diversity_bonus)

        # --- validate every HT-GRPO key up front: a bad value fails at start-up with its name -------------------
        require(micro_batch_size is None or int(micro_batch_size) >= 1, "micro_batch_size",
                f"must be >= 1 or null, got {micro_batch_size}")
        self.micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)
        require(rollout_micro_batch_size is None or int(rollout_micro_batch_size) >= 1, "rollout_micro_batch_size",
                f"must be >= 1 or null, got {rollout_micro_batch_size}")
        self.rollout_micro_batch_size = None if rollout_micro_batch_size is None else int(rollout_micro_batch_size)
        self.overlap_scoring = overlap_setting(overlap_scoring)
        if rollout_cache is not None:  # rollouts only: validation and the benchmarks keep `sampler.cache`
            require_choice(rollout_cache, CACHES, "rollout_cache")
            try:
                self.rollout_sampler = dataclasses.replace(self.rollout_sampler, cache=str(rollout_cache))
            except TypeError:
                raise ConfigError("rollout_cache", "needs a masked-diffusion rollout sampler (SamplerSettings), got "
                                                   f"{type(self.rollout_sampler).__name__}") from None
        try:
            self.entropy_coef = float(entropy_coef)
        except (TypeError, ValueError):
            raise ConfigError("entropy_coef", f"must be a number >= 0, got {entropy_coef!r}") from None
        require(math.isfinite(self.entropy_coef) and self.entropy_coef >= 0, "entropy_coef",
                f"must be a finite number >= 0, got {entropy_coef}")
        require(self.overlap_scoring != "true" or self.rollout_micro_batch_size is not None, "overlap_scoring",
                "true needs rollout chunks to overlap: set algorithm.rollout_micro_batch_size (e.g. num_generations)")
        self._overlap_noted = False

        est = as_dict(estimator) or {"name": "prompt_conditioned"}
        try:
            self.estimator = build_estimator(**est)
        except (TypeError, ValueError) as err:
            raise ConfigError("estimator", str(err)) from None

        part = {"key": "decode_step", "fraction": 0.25, "entropy_order": "ascending", **as_dict(partition)}
        require_choice(part["key"], PARTITION_KEYS, "partition.key")
        require_choice(part["entropy_order"], ENTROPY_ORDERS, "partition.entropy_order")
        _validate_fraction(part["fraction"], "partition.fraction")
        self.partition = part

        cred = {"kind": "binary", "alpha": 1.0, "gamma": 1.0, "normalize": True, **as_dict(credit)}
        cred["kind"], cred["alpha"], cred["gamma"] = validate_credit(cred["kind"], cred["alpha"], cred["gamma"])
        self.credit = cred

        st = {"n_global": 2, "n_struct": 2, "n_refine": 2, "mode": "inner", "scored_fraction": 1.0, **as_dict(stages)}
        _validate_fraction(st["scored_fraction"], "stages.scored_fraction")
        self.scored_fraction = float(st.pop("scored_fraction"))
        try:
            # No int() here: a count of 1.5 must fail with its key (StageSchedule raises ConfigError), not run as 1.
            self.schedule = StageSchedule(**st)
        except TypeError as err:
            raise ConfigError("stages", f"{err} (keys: n_global, n_struct, n_refine, mode, scored_fraction)") from None

        self.last_update_stats: list[UpdateStats] = []
        self.last_scored: ScoredRollout | None = None
        self.reward_history: list[float] = []  # mean rollout reward of each training step of this process
        self.save_hyperparameters(ignore=["policy", "reward", "benchmark", "sampler", "rollout_sampler"])

    # ===================================================================================================
    # The algorithm box
    # ===================================================================================================
    @property
    def one_backward_per_update(self) -> bool:
        # One backward per update unless the update is split into micro-batches (gradients then accumulate).
        return self.micro_batch_size is None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        scorer = self.chunk_scorer()                                 # None: score after the rollout
        rollout = self.rollout(batch, scorer)                        # 1. G images per prompt (chunks scored meanwhile)
        timings["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards = self.reward(rollout, scorer)                       # 2. scorer (overlapped: waits for the last chunks)
        timings["reward"] = time.perf_counter() - t0
        if self.skip_unscored_batch(rollout, rewards, timings):     # no finite reward: never train on it
            return
        task = self.last_unshaped_rewards  # the reward before diversity_bonus shaping (= rewards when it is off)
        finite = task[torch.isfinite(task)]
        self.reward_history.append(float(finite.mean()) if finite.numel() else math.nan)  # fit's reward-curve summary

        scored = self.score(rollout, rewards)                        # 3–4. advantages, partition, credit
        t0 = time.perf_counter()
        iterations = self.plan_inner_iterations(scored)              # 5. stages, estimator plans, old/ref log-probs
        self.last_update_stats = [self.inner_update(scored, it) for it in iterations]  # 6. K updates
        timings["update"] = time.perf_counter() - t0

        self.last_scored = scored
        self.last_timings = timings
        self._log_step(scored, self.last_update_stats, timings)
        self.rollout_step += 1

    # -- 1. rollout ----------------------------------------------------------------------------------------
    def chunk_scorer(self) -> ChunkScorer | None:
        """A :class:`~htgrpo.algorithms.overlap.ChunkScorer` when this step's scoring overlaps sampling
        (``overlap_scoring``), else None."""
        if not wants_overlap(self.overlap_scoring, self.reward_fn):
            return None
        if self.rollout_micro_batch_size is None:  # auto with an io_bound reward but one rollout chunk: nothing to hide
            if not self._overlap_noted:
                self._overlap_noted = True
                logger.info("overlap_scoring=auto: reward %s waits on a server but the rollout is one chunk; set "
                            "algorithm.rollout_micro_batch_size to score chunks while the next ones sample",
                            getattr(self.reward_fn, "name", self.reward_fn))
            return None
        return ChunkScorer(self.reward_fn)

    @torch.no_grad()
    def rollout(self, batch: PromptBatch, scorer: ChunkScorer | None = None) -> Rollout:
        """Sample ``num_generations`` images per prompt (eval mode, no grad), recording the per-token trajectory.

        With a ``scorer``, each rollout chunk is decoded as soon as it is sampled and queued for scoring, so the
        reward of chunk i is computed while chunk i+1 samples (``GRPOModule.reward`` then collects it)."""
        G = self.num_generations
        prompts = [p for p in batch.prompts for _ in range(G)]
        generator = self.step_generator(0)
        was_training = self.policy.training
        self.policy.eval()
        chunk_images: list[torch.Tensor] = []

        def decode_and_score(rows: slice, part: Any) -> None:
            images = self.policy.image_tokenizer.decode(part.codes.cpu())
            chunk_images.append(images)
            scorer.submit(images, [p.record for p in prompts[rows]])

        try:
            prompt_tokens = self.policy.encode_prompts([p.prompt for p in prompts],
                                                       keys=[f"{p.benchmark}:{p.key}" for p in prompts])
            sampled = sample_in_micro_batches(self.rollout_sampler, self.policy, prompt_tokens, generator,
                                              self.rollout_micro_batch_size,
                                              on_chunk=None if scorer is None else decode_and_score)
            if scorer is None:
                images = self.policy.image_tokenizer.decode(sampled.codes.cpu())
            else:
                images = torch.cat(chunk_images)
        except BaseException:
            if scorer is not None:
                scorer.close()
            raise
        finally:
            self.policy.train(was_training)
        return Rollout(prompts, prompt_tokens, sampled, images, G)

    # -- 2. reward: GRPOModule.reward (safe_score: a scorer exception for an image becomes NaN, advantage 0)

    # -- 3–4. advantages, partition, credit -----------------------------------------------------------------
    def score(self, rollout: Rollout, rewards: torch.Tensor) -> ScoredRollout:
        adv = group_advantages(rewards, self.num_generations, self.scale_rewards)
        s = rollout.sampled
        key, fraction = self.partition["key"], float(self.partition["fraction"])
        order = self.partition["entropy_order"]
        structure = structure_mask(s.commit_step, s.entropy, s.confidence, key=key, fraction=fraction,
                                   entropy_order=order)
        rank = structure_rank(s.commit_step, s.entropy, s.confidence, key=key, entropy_order=order)
        weights = credit_weights(rank, structure, kind=self.credit["kind"], alpha=float(self.credit["alpha"]),
                                 gamma=float(self.credit["gamma"]), normalize=bool(self.credit["normalize"]))
        token_adv = token_advantages(adv.advantages.to(weights.device), weights)
        return ScoredRollout(rollout, rewards, adv, structure, rank, weights, token_adv)

    # -- 5. plan the inner iterations ----------------------------------------------------------------------
    @torch.no_grad()
    def plan_inner_iterations(self, scored: ScoredRollout) -> list[InnerIteration]:
        """Stage, scored tokens and estimator canvases of each inner iteration, with old and reference log-probs
        computed from exactly those inputs before any update."""
        rollout = scored.rollout
        K = self.schedule.num_inner_iterations
        generator = self.step_generator(1)
        structure = scored.structure.to(self.policy.device)
        sampled = rollout.sampled.to(self.policy.device)
        old_cache: dict[tuple, torch.Tensor] = {}
        ref_cache: dict[tuple, torch.Tensor] = {}
        iterations = []
        for k in range(K):
            stage = self.schedule.stage_for(k, self.rollout_step)
            candidates = stage_candidates(stage, structure)
            # Each iteration scores a random fraction ρ of its stage's candidates (ρ = 1: all of them).
            candidates = sample_scored(candidates, self.scored_fraction, generator)
            plan = self.estimator.plan(sampled, candidates, k, K, generator, prompt=rollout.prompt_tokens)
            old = self._plan_log_probs(self.policy, rollout, plan, old_cache)
            ref = self._plan_log_probs(self.reference, rollout, plan, ref_cache) if self.reference is not None else None
            iterations.append(InnerIteration(k, stage, plan, old, ref))
        return iterations

    def _plan_log_probs(self, model: torch.nn.Module, rollout: Rollout, plan: ScoringPlan,
                        cache: dict[tuple, torch.Tensor]) -> torch.Tensor:
        """(B·G, N) log-probs of the rollout codes under ``model`` for ``plan`` (no grad), in the same deterministic
        mode as the update's forward (:func:`deterministic_scoring`: dropout off), so r = 1 at the first iteration.

        Passes with identical inputs (e.g. the fully masked canvas every HT-GRPO iteration uses) are computed once.
        """
        with deterministic_scoring(model):
            out = torch.zeros(rollout.sampled.codes.shape, dtype=torch.float32, device=self.policy.device)
            for p in plan.passes:
                key = _pass_key(p)
                if key not in cache:
                    cache[key] = self._all_position_log_probs(model, rollout, p)
                out = torch.where(p.scored.to(out.device), cache[key], out)
            return out

    def _all_position_log_probs(self, model: torch.nn.Module, rollout: Rollout, scoring_pass: Any) -> torch.Tensor:
        """log π(x_i | prompt, canvas) at every image position, in micro-batches."""
        codes = rollout.sampled.codes.to(self.policy.device)
        hidden_everywhere = ScoringPass(scoring_pass.canvas, scoring_pass.canvas == MASKED, scoring_pass.prompt_mask)
        outs = []
        for sl in self._micro_batches(len(rollout)):
            sub = ScoringPlan([_slice_pass(hidden_everywhere, sl)])
            outs.append(token_log_probs(model, rollout.prompt_tokens[sl], codes[sl], sub).logp)
        return torch.cat(outs)

    # -- 6. one inner update -------------------------------------------------------------------------------
    def inner_update(self, scored: ScoredRollout, it: InnerIteration) -> UpdateStats:
        """Clipped surrogate with token advantages + β·KL on the iteration's scored tokens; one AdamW step."""
        rollout = scored.rollout
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        scored_mask = it.plan.scored.to(self.policy.device)
        token_adv = scored.token_advantages.to(self.policy.device)
        codes = rollout.sampled.codes.to(self.policy.device)
        total_tokens = int(scored_mask.sum())
        total_seqs = int(scored_mask.any(1).sum())
        sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "low": 0.0, "high": 0.0, "entropy": 0.0}
        ratios = []
        # Forward AND backward in the old/reference log-probs' mode: dropout off (r = 1 exactly at the first
        # iteration), and checkpointed blocks recompute in backward with the modules their forward saw.
        with deterministic_scoring(self.policy):
            for sl in self._micro_batches(len(rollout)):
                mask = scored_mask[sl]
                if not bool(mask.any()):
                    continue
                plan = ScoringPlan([_slice_pass(p, sl) for p in it.plan.passes], shape=tuple(mask.shape))
                scored_lp = token_log_probs(self.policy, rollout.prompt_tokens[sl], codes[sl], plan,
                                            with_entropy=self.entropy_coef > 0)
                logp = scored_lp.logp
                terms = clipped_surrogate(logp, it.old_logp[sl], token_adv[sl], self.epsilon, self.epsilon_high)
                per_token = terms.loss
                if scored_lp.entropy is not None:  # entropy bonus: keep the per-token distributions from collapsing
                    per_token = per_token - self.entropy_coef * scored_lp.entropy
                    sums["entropy"] += float((scored_lp.entropy.detach() * mask.float()).sum())
                kl = None
                if self.beta > 0 and it.ref_logp is not None:
                    kl = k3_kl(logp, it.ref_logp[sl])
                    per_token = per_token + self.beta * kl
                # Weight each micro-batch's mean by its share so the sum is the whole batch's aggregate.
                if self.loss_type == "token_mean":
                    share = int(mask.sum()) / max(total_tokens, 1)
                else:
                    share = int(mask.any(1).sum()) / max(total_seqs, 1)
                loss = aggregate_loss(per_token, mask, self.loss_type) * share
                self.manual_backward(loss)
                m = mask.float()
                sums["loss"] += float(loss.detach())
                sums["kl"] += float((kl.detach() * m).sum()) if kl is not None else 0.0
                sums["ratio"] += float((terms.ratio.detach() * m).sum())
                sums["low"] += float((terms.clipped_low.float() * m).sum())
                sums["high"] += float((terms.clipped_high.float() * m).sum())
                ratios.append(terms.ratio.detach()[mask].cpu())
        grad_norm = self.clip_and_step(optimizer)
        n = max(total_tokens, 1)
        structure_steps = rollout.sampled.commit_step[scored.structure.cpu()].float()
        return UpdateStats(
            stage=it.stage, loss=sums["loss"], kl=sums["kl"] / n, ratio_mean=sums["ratio"] / n,
            clip_low=sums["low"] / n, clip_high=sums["high"] / n, grad_norm=grad_norm, scored_tokens=total_tokens,
            entropy=sums["entropy"] / n if self.entropy_coef > 0 else math.nan,
            ratios=torch.cat(ratios) if ratios else torch.zeros(0),
            token_advantages=token_adv[scored_mask].detach().cpu(),
            credit=scored.credit.to(scored_mask.device)[scored_mask].detach().cpu(),
            structure_commit_steps=structure_steps,
        )

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # ===================================================================================================
    # Logging (optimiser, clip-and-step and checkpoint state: GRPOModule)
    # ===================================================================================================
    def _log_step(self, scored: ScoredRollout, updates: list[UpdateStats], timings: dict[str, float]) -> None:
        rollout = scored.rollout
        log = self.reward_step_log(rollout.prompts, scored.rewards, scored.advantages,
                                   entropy=float(rollout.sampled.entropy.float().mean()))
        tokens = [u.scored_tokens for u in updates]
        log.update(self.update_step_log(updates, tokens))
        if updates:
            log["train/kl"] = token_weighted([u.kl for u in updates], tokens)
            if self.entropy_coef > 0:
                log["train/update_entropy"] = token_weighted([u.entropy for u in updates], tokens)
            for stage in Stage:
                mine = [u for u in updates if u.stage == stage]
                if mine:
                    log[f"train/{stage.value}/loss"] = sum(u.loss for u in mine) / len(mine)
                    log[f"train/{stage.value}/scored_tokens"] = sum(u.scored_tokens for u in mine) / len(mine)
        log.update(self.perf_step_log(timings, len(rollout), rollout.sampled.codes.numel()))
        self.emit_step_log(log, rollout.num_groups)


def _validate_fraction(value: Any, key: str) -> None:
    try:
        validate_fraction(float(value), key)
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


def _slice_pass(p: ScoringPass, sl: slice) -> ScoringPass:
    return ScoringPass(p.canvas[sl], p.scored[sl], None if p.prompt_mask is None else p.prompt_mask[sl])


def _pass_key(scoring_pass: Any) -> tuple:
    """Cache key of a pass's model inputs (canvas + prompt mask): identical inputs give identical log-probs.

    The key holds the inputs themselves (shape, dtype and raw bytes), so a dict lookup compares them exactly:
    two different canvases can never share cached log-probs (a ``hash()`` alone could collide)."""
    canvas = scoring_pass.canvas
    mask = scoring_pass.prompt_mask
    return (tuple(canvas.shape), str(canvas.dtype), canvas.cpu().numpy().tobytes(),
            None if mask is None else (tuple(mask.shape), str(mask.dtype), mask.cpu().numpy().tobytes()))
