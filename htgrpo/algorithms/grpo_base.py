"""What every GRPO training module shares (HT-GRPO and its baselines, MAR-GRPO): one base LightningModule.

A GRPO module trains under manual optimisation; one Lightning training step is one rollout batch::

    rollout (subclass) → reward (here) → advantages / plan (subclass) → K × [backward (subclass), clip + step (here)]

This base holds everything that is not the algorithm itself:

* the common keys (``num_generations``, ``scale_rewards``, ``beta``, ``epsilon``/``epsilon_high``, ``loss_type``,
  AdamW, warm-up, ``max_grad_norm``, ``seed``), validated at start-up with their names;
* the frozen reference policy (with LoRA the policy with adapters disabled, else a copy of the starting policy;
  none when ``beta = 0``); adapter-only checkpoints and fp32 adapters under bf16-true (:mod:`htgrpo.policies.lora`);
* the rollout counter (a buffer, so it travels with the weights) and the per-step random generators seeded with
  (seed, rank, rollout step, stream), saved in checkpoints so a resumed run repeats an uninterrupted one exactly;
* the reward call through :func:`htgrpo.rewards.base.safe_score` (a failing scorer gives NaN, counted in
  ``train/nonfinite_rewards``; the reward's components are logged as ``train/reward/<name>``);
* the AdamW optimiser with its linear warm-up and learning-rate schedule (:mod:`htgrpo.algorithms.lr_schedule`;
  the rate is logged as ``lr``), and clip-and-step through the strategy's own mechanism
  (:func:`htgrpo.strategies.clip_and_step`);
* the step-log entries every GRPO module writes (reward statistics, update statistics, timings, throughput).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from htgrpo.algorithms.base import PolicyModule
from htgrpo.algorithms.diversity_bonus import DiversityBonus, RolloutColorSpread, group_diversity_bonus
from htgrpo.algorithms.lr_schedule import lr_decay_factor, validate_lr_schedule, warmup_factor
from htgrpo.algorithms.grpo_math import LOSS_TYPES, SCALE_REWARDS, GroupAdvantages, group_advantages
from htgrpo.config import ConfigError, require, require_choice, require_range
from htgrpo.evaluation.benchmark import Benchmark
from htgrpo.policies.lora import (
    keep_trainable_fp32,
    make_reference,
    restore_frozen_weights,
    snapshot_trainable,
    strip_frozen_weights,
)
from htgrpo.rewards.base import RewardOutput, reward_log, safe_score


#: component name of the reward before ``diversity_bonus`` shaping (``train/reward/unshaped``)
UNSHAPED = "unshaped"


def as_dict(value: Any) -> dict[str, Any]:
    """A config section (``None``, a mapping, or an OmegaConf node) as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]


def step_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A 63-bit seed for (run seed, rank, rollout step, stream): independent streams, reproducible on resume.

    seed' = first draw of ``randint(0, 2^62)`` from a generator seeded with ((seed·1000003 + rank·10007 + step)·31
    + stream).
    """
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(
        (seed * 1_000_003 + rank * 10_007 + step) * 31 + stream)).item())


def token_weighted(values: Sequence[float], tokens: Sequence[int]) -> float:
    """Σ_u v_u · n_u / Σ_u n_u over updates u (n_u: scored tokens of u); the denominator is at least 1."""
    total = max(sum(tokens), 1)
    return sum(v * (n / total) for v, n in zip(values, tokens))


class GroupedRollout:
    """Mixin of the rollout dataclasses: ``prompts`` (B·G, group-contiguous: sample g·G + j is generation j of prompt
    g) and ``num_generations`` (G) give the number of images and of groups (what ``GRPOModule.reward`` and the step
    log read)."""

    prompts: list[Any]
    num_generations: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_groups(self) -> int:
        return len(self.prompts) // self.num_generations


class GRPOModule(PolicyModule):
    """Base of the GRPO modules: common keys, reference, counters, reward call, optimiser, clip-and-step, logging.

    Subclasses implement ``training_step`` (the algorithm box) and call, in order: ``self.reward(rollout)``,
    their update(s) ending in ``self.clip_and_step(optimizer)``, the step-log helpers, ``self.rollout_step += 1``.

    Args:
        policy: the policy being trained.
        reward: a :class:`~htgrpo.rewards.base.Reward` or any callable ``(images uint8 (B,3,H,W), records) ->
            (B,)``.
        benchmark: validation benchmark.
        sampler: validation sampler settings.
        rollout_sampler: sampler settings of the rollouts (defaults to ``sampler``).
        num_generations: G, images per prompt in a group (TRL name).
        scale_rewards: ``group`` | ``batch`` | ``none`` (TRL name).
        beta: KL coefficient against the frozen reference (TRL name); 0 skips the reference entirely.
        epsilon, epsilon_high: lower / upper clip of the ratio (None = epsilon).
        loss_type: ``token_mean`` or ``seq_mean``.
        lr, weight_decay, betas, warmup_steps: AdamW and its linear warm-up (in optimiser updates).
        max_grad_norm: gradient-norm clip per update (0 disables clipping; the norm is still logged).
        seed: seed of every random draw of a step (combined with rank and rollout step).
        val_seed: validation sampling noise.
        lr_schedule, lr_min_ratio, lr_decay_batches: decay of the rate over rollout batches
            (:mod:`htgrpo.algorithms.lr_schedule`): ``constant`` | ``linear`` | ``cosine`` down to
            ``lr_min_ratio · lr`` over ``lr_decay_batches`` batches (None: the run's training batches).
        diversity_bonus: group-diversity reward shaping ``{weight, feature, levels, scope}``
            (:mod:`htgrpo.algorithms.diversity_bonus`); weight 0 (the default) leaves the reward as it is.
    """

    #: key of this module's state in a Lightning checkpoint (kept per module so older checkpoints still load).
    checkpoint_state_key = "grpo"
    #: submodules that sharding strategies (FSDP, DeepSpeed) leave out of the sharded tree: the frozen reference
    #: stays a plain replica on each rank (htgrpo.strategies.keep_out_of_strategy).
    unsharded_modules: tuple[str, ...] = ("reference",)

    @property
    def one_backward_per_update(self) -> bool:
        """Whether every optimiser update is one backward pass (DeepSpeed ZeRO-3 takes nothing else; checked at
        start-up by :func:`htgrpo.strategies.check_strategy_supports`). Subclasses that accumulate say False."""
        return True

    def __init__(
        self,
        policy: torch.nn.Module,
        reward: Any,
        benchmark: Benchmark | None,
        sampler: Any,
        rollout_sampler: Any,
        *,
        num_generations: int,
        scale_rewards: str,
        beta: float,
        epsilon: float,
        epsilon_high: float | None,
        loss_type: str,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_steps: int,
        max_grad_norm: float,
        seed: int,
        val_seed: int,
        lr_schedule: str = "constant",
        lr_min_ratio: float = 0.0,
        lr_decay_batches: int | None = None,
        diversity_bonus: Mapping[str, Any] | None = None,
    ):
        super().__init__(policy, benchmark, sampler, val_seed)
        self.automatic_optimization = False
        self.reward_fn = reward
        self.rollout_sampler = rollout_sampler or self.sampler

        # --- validate the common keys up front: a bad value fails at start-up with its name ---------------------
        require(int(num_generations) >= 2, "num_generations",
                f"must be >= 2 (a group needs a baseline), got {num_generations}")
        require_choice(scale_rewards, SCALE_REWARDS, "scale_rewards")
        require(float(beta) >= 0, "beta", f"must be >= 0, got {beta}")
        require_range(float(epsilon), "epsilon", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        require(epsilon_high is None or float(epsilon_high) > 0, "epsilon_high",
                f"must be > 0 or null, got {epsilon_high}")
        require_choice(loss_type, LOSS_TYPES, "loss_type")
        require(float(lr) > 0, "lr", f"must be > 0, got {lr}")
        require(float(weight_decay) >= 0, "weight_decay", f"must be >= 0, got {weight_decay}")
        require(int(warmup_steps) >= 0, "warmup_steps", f"must be >= 0, got {warmup_steps}")
        require(float(max_grad_norm) >= 0, "max_grad_norm", f"must be >= 0, got {max_grad_norm}")
        self.num_generations = int(num_generations)
        self.scale_rewards, self.loss_type = str(scale_rewards), str(loss_type)
        self.beta, self.epsilon = float(beta), float(epsilon)
        self.epsilon_high = None if epsilon_high is None else float(epsilon_high)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.betas = tuple(float(b) for b in betas)
        self.warmup_steps, self.max_grad_norm = int(warmup_steps), float(max_grad_norm)
        self.seed = int(seed)
        self.lr_schedule, self.lr_min_ratio, self.lr_decay_batches = validate_lr_schedule(
            lr_schedule, lr_min_ratio, lr_decay_batches)
        self._lr_total_known = False  # set by on_train_start once the run's length in rollout batches is checked
        self.diversity_bonus = DiversityBonus.from_config(as_dict(diversity_bonus))

        # The frozen reference: a copy of the starting policy (skipped when beta = 0). Frozen parameters are never
        # given to the optimiser, and sharding strategies leave it unwrapped (htgrpo.strategies).
        self.reference = self.build_reference()
        # A buffer, so the counter travels with the weights (ddp_spawn copies them back to the main process).
        self.register_buffer("rollout_counter", torch.zeros((), dtype=torch.long))
        self.last_reward_output: RewardOutput | None = None
        self.last_unshaped_rewards: Tensor | None = None  # the last reward before diversity_bonus shaping
        self.last_color_spread: RolloutColorSpread | None = None  # colour spread of the last rollout (logged)
        self.last_timings: dict[str, float] = {}  # seconds of the last step's phases (rollout, reward, update ...)
        self.consecutive_unscored_batches = 0  # rollout batches in a row with no finite reward (skip_unscored_batch)
        self.reward_failure: str | None = None  # set when they reach the reward's max_failed_batches: the run stops

    def build_reference(self) -> Any:
        """The frozen reference policy for the KL term (:func:`htgrpo.policies.lora.make_reference`): None if
        ``beta = 0``; with LoRA the policy itself seen with its adapters disabled (no copy, not an ``nn.Module``);
        otherwise a frozen deep copy of the starting policy.

        (Left in train mode like the policy: log-prob passes switch modes themselves.)
        """
        if self.beta <= 0 or self.policy is None:
            return None
        return make_reference(self.policy, self.beta)

    # ===================================================================================================
    # Per-step randomness and counters
    # ===================================================================================================
    def step_generator(self, stream: int) -> torch.Generator:
        """The generator of random stream ``stream`` of the current rollout step on this rank."""
        return torch.Generator(device=self.policy.device).manual_seed(
            step_seed(self.seed, self.global_rank, self.rollout_step, stream))

    @property
    def rollout_step(self) -> int:
        """Rollout batches done so far (Lightning's ``global_step`` counts the K updates of each)."""
        return int(self.rollout_counter)

    @rollout_step.setter
    def rollout_step(self, value: int) -> None:
        self.rollout_counter.fill_(int(value))

    @property
    def training_steps_done(self) -> int:
        """Rollout batches trained on (what ``summary.json`` reports as ``steps``)."""
        return self.rollout_step

    # ===================================================================================================
    # Reward
    # ===================================================================================================
    def reward(self, rollout: Any, scorer: Any = None) -> Tensor:
        """(B·G,) float32 scores of ``rollout.images`` against ``rollout.prompts``' records.

        Through :func:`~htgrpo.rewards.base.safe_score`: an image whose scoring raises gets NaN (advantage 0,
        counted in ``train/nonfinite_rewards``), so a failing scorer never stops training. The full output
        (components included) is kept in ``last_reward_output`` for the step log. With a ``scorer``
        (:class:`~htgrpo.algorithms.overlap.ChunkScorer`) the rollout's chunks were already queued for scoring while
        the next ones sampled: this waits for them and concatenates their outputs.
        """
        if scorer is not None:
            output = scorer.result()
        else:
            output = safe_score(self.reward_fn, rollout.images, [p.record for p in rollout.prompts])
        if len(output) != len(rollout):
            raise RuntimeError(f"reward returned {len(output)} values for {len(rollout)} images")
        self.last_unshaped_rewards = output.scores  # the reward itself, before any shaping (reward curve, logs)
        features = self.rollout_color_features(rollout)
        self.last_color_spread = None
        if features is not None:  # one group-bonus computation serves the log and the shaping
            group_bonus = group_diversity_bonus(features, self.num_generations)
            self.last_color_spread = RolloutColorSpread.of(features, group_bonus)
        if self.diversity_bonus.enabled:
            if features is None:
                raise RuntimeError("algorithm.diversity_bonus needs the rollout's images as uint8 (N, 3, H, W) in "
                                   f"groups of num_generations={self.num_generations}")
            output = self.shape_with_diversity(output, self.diversity_bonus.bonus_of(features, group_bonus))
        self.last_reward_output = output
        return output.scores

    def rollout_color_features(self, rollout: Any) -> Tensor | None:
        """Colour histograms of the rollout's images (``diversity_bonus.features``), or None when the rollout has no
        uint8 ``(N, 3, H, W)`` images in whole groups."""
        images = getattr(rollout, "images", None)
        if (not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4
                or images.shape[1] != 3 or images.shape[0] % self.num_generations):
            return None
        return self.diversity_bonus.features(images)

    def shape_with_diversity(self, output: RewardOutput, bonus: Tensor) -> RewardOutput:
        """``reward + weight · bonus`` (:mod:`htgrpo.algorithms.diversity_bonus`); the unshaped reward and the bonus
        are kept as components ``unshaped`` and ``diversity_bonus`` (logged as ``train/reward/<name>``; the reward's
        own components keep their names)."""
        components = dict(output.components)
        components[UNSHAPED] = output.scores
        components["diversity_bonus"] = bonus
        return RewardOutput(output.scores + self.diversity_bonus.weight * bonus, components, output.num_failed)

    def skip_unscored_batch(self, rollout: Any, rewards: Tensor, timings: dict[str, float]) -> bool:
        """Whether this rollout batch must not be trained on because none of its rewards is finite.

        Called by every GRPO ``training_step`` right after the reward, before any update. A batch with no finite
        reward (reward server down, every image failing) carries no learning signal: its advantages are all 0, and
        an update would still move the weights through the KL term, weight decay and AdamW's momentum. So the step
        is logged (``train/update_skipped`` = 1, ``train/nonfinite_rewards`` = B·G), the rollout counter advances
        (the next batch draws fresh seeds, as in an uninterrupted run) and the caller returns without updating.

        Consecutive such batches are counted; when the count reaches the reward's ``max_failed_batches`` (> 0) the
        run is asked to stop (``trainer.should_stop``) with the reason in ``reward_failure``; ``htgrpo.fit`` then
        saves a checkpoint and exits with :class:`~htgrpo.rewards.base.RewardUnavailableError`.

        Under DDP / FSDP / DeepSpeed the decisions are reduced over ranks: the update is skipped only when no rank
        has a finite reward (an update is a collective, every rank must take part), and any rank reaching the
        limit stops all of them.
        """
        unscored = not bool(torch.isfinite(rewards).any())
        self.consecutive_unscored_batches = self.consecutive_unscored_batches + 1 if unscored else 0
        limit = int(getattr(self.reward_fn, "max_failed_batches", 0) or 0)
        give_up = bool(limit) and self.consecutive_unscored_batches >= limit
        trainer = self._trainer
        if trainer is not None:
            unscored = trainer.strategy.reduce_boolean_decision(unscored, all=True)
            give_up = trainer.strategy.reduce_boolean_decision(give_up, all=False)
        if give_up and self.reward_failure is None:
            detail = getattr(self.reward_fn, "last_failure", None)
            self.reward_failure = (
                f"no finite reward in {self.consecutive_unscored_batches} consecutive rollout batches "
                f"(reward.max_failed_batches={limit}) from reward {getattr(self.reward_fn, 'name', self.reward_fn)!r}"
                + (f"; last failure: {detail}" if detail else "") + "; none of these batches was trained on")
            if trainer is not None:
                trainer.should_stop = True
        if not unscored:
            return False
        self.last_update_stats = []
        if hasattr(self, "last_selection"):
            self.last_selection = None  # MAR callbacks read it: nothing was selected for an update this step
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards)
        log = self.reward_step_log(rollout.prompts, rewards, advantages, entropy=math.nan)
        log["train/update_skipped"] = 1.0
        log.update({f"time/{phase}_s": seconds for phase, seconds in timings.items()})
        self.last_timings = timings
        self.emit_step_log(log, max(len(rollout.prompts) // self.num_generations, 1))
        self.rollout_step += 1
        return True

    # ===================================================================================================
    # Optimiser and clip-and-step
    # ===================================================================================================
    def setup(self, stage: str) -> None:
        # Before Lightning's precision plugin casts the module (bf16-true): remember the fp32 adapter weights.
        snapshot_trainable(self)

    def configure_optimizers(self) -> Any:
        # bf16-true: frozen weights stay bf16, the trainable (LoRA) weights go back to fp32 for AdamW.
        keep_trainable_fp32(self, getattr(self._trainer, "precision", None))
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        warmup = self.warmup_steps
        # lr(u) = lr · warmup(u) · decay(rollout batch); decay is exactly 1.0 under `constant` (the old rate, bit
        # for bit)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda u: warmup_factor(u, warmup) * self.lr_decay())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_decay_total_batches(self) -> int:
        """``T`` of the decay: ``lr_decay_batches``, else the run's training batches (``trainer.num_training_batches``
        x ``trainer.max_epochs``, i.e. ``trainer.limit_train_batches`` rollout batches in the shapes experiments)."""
        if self.lr_decay_batches is not None:
            return self.lr_decay_batches
        trainer = self._trainer
        per_epoch = float(trainer.num_training_batches) if trainer is not None else math.inf
        epochs = float(trainer.max_epochs) if trainer is not None and (trainer.max_epochs or -1) > 0 else math.inf
        total = per_epoch * epochs
        if not math.isfinite(total) or total < 1:
            raise ConfigError("lr_decay_batches", f"lr_schedule={self.lr_schedule} needs the run's length in rollout "
                                                  "batches: set algorithm.lr_decay_batches (the trainer gives none)")
        return int(total)

    def lr_decay(self) -> float:
        """``decay(t)`` of the current rollout batch ``t`` (1.0 for ``constant``)."""
        if self.lr_schedule == "constant":
            return 1.0
        # LambdaLR evaluates the schedule in configure_optimizers, before the trainer knows the number of batches
        # (on a resumed run the rollout counter is already > 0 then): a provisional 1.0 until on_train_start has
        # checked T; on_train_batch_start sets every batch's rate from the schedule, so no update uses it.
        if self.rollout_step == 0 or not self._lr_total_known:
            return 1.0
        return lr_decay_factor(self.rollout_step, self.lr_decay_total_batches(), self.lr_schedule, self.lr_min_ratio)

    def on_train_start(self) -> None:
        if self.lr_schedule != "constant":
            self.lr_decay_total_batches()  # fails here, before the first rollout, when the run's length is unknown
            self._lr_total_known = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The scheduler steps after each update, while the rollout counter moves at the end of a batch: set the rate
        # of this batch's first update from the batch it is in (a no-op under `constant`), then log it.
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if self.lr_schedule != "constant":
            rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, rate in zip(scheduler.optimizer.param_groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates  # what get_last_lr() reports
        self.log("lr", float(scheduler.optimizer.param_groups[0]["lr"]), prog_bar=False, batch_size=1)

    def clip_and_step(self, optimizer: Any) -> float:
        """Clip the accumulated gradients to ``max_grad_norm`` (0: no clipping), step the optimiser and the
        warm-up scheduler; returns the global gradient norm before clipping."""
        from htgrpo.strategies import clip_and_step

        norm = clip_and_step(self, optimizer, self.max_grad_norm)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return norm

    # ===================================================================================================
    # Checkpoint state
    # ===================================================================================================
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything random in a step derives from (seed, rank, rollout_step): saving the counter makes resume exact.
        checkpoint[self.checkpoint_state_key] = {"rollout_step": self.rollout_step, "torch_rng": torch.get_rng_state()}
        strip_frozen_weights(self, checkpoint)  # LoRA: only the adapters (and buffers) are saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen_weights(self, checkpoint)  # LoRA: frozen base weights from this module, so loading stays strict
        state = checkpoint.get(self.checkpoint_state_key, {})
        self.rollout_step = int(state.get("rollout_step", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

    # ===================================================================================================
    # Step logging
    # ===================================================================================================
    def reward_step_log(self, prompts: Sequence[Any], rewards: Tensor, advantages: GroupAdvantages,
                        entropy: float) -> dict[str, float]:
        """Reward statistics of a step: mean / std over the finite rewards, flat-group and non-finite counts, the
        policy's entropy, the rollout counter, the mean reward per prompt group and per reward component."""
        finite = torch.isfinite(rewards)
        r = rewards[finite]
        log = {
            "train/reward/mean": float(r.mean()) if r.numel() else math.nan,
            "train/reward/std": float(r.std()) if r.numel() > 1 else 0.0,
            "train/zero_variance_fraction": advantages.zero_variance_fraction,
            "train/nonfinite_rewards": float(advantages.nonfinite_rewards),
            "train/entropy": entropy,
            "train/rollout_step": float(self.rollout_step),
            "train/update_skipped": 0.0,  # 1 on a batch with no finite reward (skip_unscored_batch)
        }
        groups: dict[str, list[float]] = {}
        for p, value, ok in zip(prompts, rewards.tolist(), finite.tolist()):
            if ok:
                groups.setdefault(p.group, []).append(value)
        for group, values in groups.items():
            log[f"train/reward/{group}"] = sum(values) / len(values)
        if self.last_reward_output is not None:
            log.update(reward_log(self.last_reward_output))
        if self.last_color_spread is not None:
            log.update(self.last_color_spread.log())
        return log

    @staticmethod
    def update_step_log(updates: Sequence[Any], tokens: Sequence[int]) -> dict[str, float]:
        """Statistics of a step's updates (objects with ``loss``, ``ratio_mean``, ``clip_low``, ``clip_high``,
        ``grad_norm``): mean loss and grad norm; ratio and clip fractions weighted by each update's ``tokens``."""
        if not updates:
            return {}
        n = len(updates)
        return {
            "train/loss": sum(u.loss for u in updates) / n,
            "train/ratio_mean": token_weighted([u.ratio_mean for u in updates], tokens),
            "train/clip_fraction/low": token_weighted([u.clip_low for u in updates], tokens),
            "train/clip_fraction/high": token_weighted([u.clip_high for u in updates], tokens),
            "train/grad_norm": sum(u.grad_norm for u in updates) / n,
        }

    @staticmethod
    def perf_step_log(timings: Mapping[str, float], num_images: int, num_tokens: int) -> dict[str, float]:
        """Seconds per phase (``time/<phase>_s``), rollout throughput (images and tokens per second of the rollout
        phase) and the step's total seconds."""
        log = {f"time/{phase}_s": seconds for phase, seconds in timings.items()}
        rollout_s = max(timings.get("rollout", 0.0), 1e-9)
        log["perf/images_per_s"] = num_images / rollout_s
        log["perf/tokens_per_s"] = num_tokens / rollout_s
        log["perf/step_s"] = sum(timings.values())
        return log

    def emit_step_log(self, log: dict[str, float], num_groups: int) -> None:
        """Log a step's entries (and the mean reward on the progress bar)."""
        self.log_dict(log, batch_size=num_groups)
        self.log("reward", log["train/reward/mean"], prog_bar=True, logger=False, batch_size=num_groups)


__all__ = ["GRPOModule", "GroupedRollout", "as_dict", "step_seed", "token_weighted"]
