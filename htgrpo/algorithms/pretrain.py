"""Supervised warm start of a masked-diffusion policy (MaskGIT / MMaDA text-to-image SFT).

Algorithm (one training step):
    1. batch of prompts with ground-truth images (ShapesWorld renders a scene satisfying each prompt);
    2. image tokenizer: images → codes;
    3. mask each image's codes at ratio cos(π/2·t), t ~ U(0, 1) (at least one token);
       replace the prompt by the unconditional prompt with probability ``cond_dropout`` (for CFG);
    4. cross-entropy on the masked image tokens, over the image-code columns only;
    5. AdamW step with linear warm-up then cosine decay (over steps, or over the time budget if that runs out first).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from htgrpo.algorithms.base import PolicyModule
from htgrpo.config import ConfigError, require, require_range
from htgrpo.data.datamodules import PromptBatch
from htgrpo.evaluation.benchmark import Benchmark
from htgrpo.policies.generators import SamplerSettings


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                  time_fraction: float = 0.0) -> float:
    """Learning-rate multiplier: ``step/warmup`` during warm-up, then
    ``min_ratio + (1 − min_ratio)·½(1 + cos(π·progress))`` down to ``min_ratio`` at ``total_steps``, with
    ``progress = max((step − warmup)/(total − warmup), time_fraction)``: on a slower machine the decay follows the
    elapsed share of the time budget instead, so a run cut by ``trainer.max_time`` still ends annealed."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), float(time_fraction)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_duration(value: Any) -> float | None:
    """Seconds of a Lightning ``max_time`` value (``"DD:HH:MM:SS"``, a number of seconds, or ``None``)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected DD:HH:MM:SS, got {value!r}")
    d, h, m, sec = (int(p) for p in parts)
    return float(((d * 24 + h) * 60 + m) * 60 + sec)


class MaskedDiffusionPretraining(PolicyModule):
    """Warm-start a masked-diffusion policy on (prompt, image) pairs.

    Args:
        policy: a ``MaskedDiffusionPolicy``.
        benchmark: validation benchmark.
        sampler: validation sampler settings.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        total_steps: length of the cosine decay (usually ``trainer.max_steps``).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        cond_dropout: probability of training a sample with the unconditional prompt (enables CFG).
        time_budget: training time (``DD:HH:MM:SS`` or seconds, usually ``trainer.max_time``) over which the cosine
            decay completes at the latest; ``None`` decays over ``total_steps`` only. Counted from the first step of
            this process (a resumed run restarts the clock).
    """

    def __init__(self, policy: torch.nn.Module, benchmark: Benchmark | None = None, sampler: SamplerSettings | None = None,
                 lr: float = 2e-3, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.98),
                 warmup_steps: int = 100, total_steps: int = 2000, min_lr_ratio: float = 0.05,
                 cond_dropout: float = 0.1, val_seed: int = 1234, time_budget: Any = None):
        super().__init__(policy, benchmark, sampler, val_seed)
        require(float(lr) > 0, "lr", f"must be > 0, got {lr}")
        require(float(weight_decay) >= 0, "weight_decay", f"must be >= 0, got {weight_decay}")
        require(int(warmup_steps) >= 0, "warmup_steps", f"must be >= 0, got {warmup_steps}")
        require(int(total_steps) >= 1, "total_steps", f"must be >= 1, got {total_steps}")
        require_range(float(min_lr_ratio), "min_lr_ratio", 0.0, 1.0)
        require_range(float(cond_dropout), "cond_dropout", 0.0, 1.0, high_inclusive=False)
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(float(b) for b in betas)
        self.warmup_steps, self.total_steps, self.min_lr_ratio = int(warmup_steps), int(total_steps), float(min_lr_ratio)
        self.cond_dropout = float(cond_dropout)
        try:
            self.time_budget_s = parse_duration(time_budget)
        except ValueError as err:
            raise ConfigError("time_budget", str(err)) from None
        require(self.time_budget_s is None or self.time_budget_s > 0, "time_budget", f"must be > 0, got {time_budget}")
        self._train_started: float | None = None
        self.save_hyperparameters(ignore=["policy", "benchmark", "sampler"])

    def on_train_start(self) -> None:
        self._train_started = time.monotonic()

    def time_fraction(self) -> float:
        """Elapsed share of ``time_budget`` (0 without one)."""
        if self.time_budget_s is None or self._train_started is None:
            return 0.0
        return (time.monotonic() - self._train_started) / self.time_budget_s

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        if batch.images is None:
            raise RuntimeError("the warm start needs target images: use a ShapesWorld stream with with_images=true")
        codes = self.policy.image_tokenizer.encode(batch.images.cpu()).to(self.device)
        prompt = self.policy.encode_prompts(batch.texts).to(self.device)
        out = self.policy.training_loss(codes, prompt, cond_dropout=self.cond_dropout)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/masked_token_accuracy", out.accuracy)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self._trainer is not None else self.lr)
        return out.loss

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, param in self.policy.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, self.warmup_steps, self.total_steps, self.min_lr_ratio,
                                               self.time_fraction()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
