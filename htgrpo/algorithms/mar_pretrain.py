"""Supervised warm start of the ShapesWorld MAR policy (MAR's diffusion loss, text-to-image).

Algorithm (one training step):
    1. batch of prompts with ground-truth images (ShapesWorld renders a scene satisfying each prompt);
    2. images → continuous cell tokens (palette colour vectors), prompts → word ids;
    3. per image a random order; one mask rate r per batch, drawn by ``mask_schedule``: ``mar`` (LTH14:
       r ~ N(1, 0.25²) truncated to [policy.mask_ratio_min, 1]) or ``cosine`` (MaskGIT: r = cos(π/2·u), u ~ U(0, 1),
       which also trains the nearly-complete canvases of the last AR steps); the caption is replaced by
       ``fake_latent`` with probability ``cond_dropout`` (CFG);
    4. MAR encoder (visible tokens + caption buffer) → decoder → z per position;
       DiffLoss (MSE(ε) + VB, 1000-step cosine DDPM) on the masked tokens, each repeated ``diffusion_batch_mul`` times;
    5. AdamW step, linear warm-up then cosine decay (steps or time budget), shared with the masked-diffusion warm start.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from htgrpo.algorithms.pretrain import MaskedDiffusionPretraining
from htgrpo.config import ConfigError, require_choice
from htgrpo.data.datamodules import PromptBatch
from htgrpo.evaluation.benchmark import Benchmark


MASK_SCHEDULES = ("mar", "cosine")


def cosine_mask_rate(u: float, num_tokens: int) -> float:
    """MaskGIT's training mask rate r = cos(π/2·u) for u ∈ [0, 1), floored at one masked token: max(r, 1/L).

    E.g. u = 0 → 1 (all masked), u = 2/3 → 0.5, u → 1 → 1/L. Under the cosine AR schedule most tokens are decoded
    late, from canvases that are mostly known; this rate trains those canvases (LTH14's r ≥ mask_ratio_min does not).
    """
    return max(math.cos(math.pi / 2.0 * float(u)), 1.0 / int(num_tokens))


class MARPretraining(MaskedDiffusionPretraining):
    """Warm-start a :class:`~htgrpo.policies.mar.shapes.ShapesMARPolicy` on (prompt, image) pairs.

    Same arguments as :class:`~htgrpo.algorithms.pretrain.MaskedDiffusionPretraining` (AdamW, warm-up + cosine,
    ``time_budget``); ``cond_dropout`` is MAR's label-drop probability; ``sampler`` must be the MAR sampler
    (``sampler=mar``). No weight decay on biases, norms and 1-d parameters (position embeddings, fake_latent and
    mask_token are 3-d/2-d and do get it, as in LTH14's ``add_weight_decay``).
    """

    def __init__(self, policy: torch.nn.Module, benchmark: Benchmark | None = None, sampler: Any = None,
                 mask_schedule: str = "mar", **kwargs: Any):
        from htgrpo.policies.mar.shapes import ShapesMARPolicy, require_mar_sampler

        if policy is not None and not isinstance(policy, ShapesMARPolicy):
            raise ConfigError("policy", f"the MAR warm start trains a MAR policy (policy=shapes_mar), got "
                                        f"{type(policy).__name__}")
        require_mar_sampler(sampler)
        require_choice(mask_schedule, MASK_SCHEDULES, "mask_schedule")
        super().__init__(policy, benchmark, sampler, **kwargs)
        self.mask_schedule = mask_schedule
        self.hparams["mask_schedule"] = mask_schedule  # the parent's save_hyperparameters sees only its own args

    def draw_mask_rate(self) -> float | None:
        """This batch's mask rate under ``mask_schedule`` (None: the policy's own LTH14 draw)."""
        if self.mask_schedule == "cosine":
            return cosine_mask_rate(float(torch.rand(())), self.policy.num_image_tokens)
        return None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        if batch.images is None:
            raise RuntimeError("the warm start needs target images: use a ShapesWorld stream with with_images=true")
        tokens = self.policy.encode_images(batch.images)
        condition = self.policy.encode_prompts(batch.texts)
        out = self.policy.training_loss(tokens, condition, cond_dropout=self.cond_dropout,
                                        mask_rate=self.draw_mask_rate())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch))
        self.log("train/mask_ratio", out.mask_ratio, batch_size=len(batch))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"] if self._trainer is not None else self.lr,
                 batch_size=len(batch))
        return out.loss
