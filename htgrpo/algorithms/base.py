"""What every training module shares: a policy, and validation by the benchmark's official rules.

Validation draws ``benchmark.images_per_prompt`` images per validation prompt with the configured
sampler (eval mode, no grad), scores them with the benchmark scorer, and accumulates a torchmetrics metric,
so the logged ``val/<kind>/overall`` is correct under DDP. Beside it, for ShapesWorld GenEval, the diversity /
fidelity metrics of ``htgrpo.evaluation.diversity`` are logged as ``val/diversity/<name>`` (from the same
detections). The first validation batch's images, prompts and verdicts are kept for the image-grid callback.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from htgrpo.data.datamodules import PromptBatch
from htgrpo.evaluation.benchmark import Benchmark
from htgrpo.policies.generators import PolicyImageGenerator, SamplerSettings


class PolicyModule(L.LightningModule):
    """Base LightningModule: holds ``policy`` and validates it on ``benchmark``.

    Args:
        policy: the image generator being trained (an ``nn.Module``).
        benchmark: the validation benchmark (prompt set + scorer).
        sampler: sampler settings used for validation images.
        val_seed: seed of the validation sampling noise (the same every validation, so curves compare).
    """

    def __init__(self, policy: torch.nn.Module, benchmark: Benchmark | None = None,
                 sampler: SamplerSettings | None = None, val_seed: int = 1234):
        super().__init__()
        self.policy = policy
        self.benchmark = benchmark
        self.sampler = sampler or SamplerSettings()
        self.val_seed = int(val_seed)
        self.val_metric = benchmark.make_metric() if benchmark is not None else None
        self.val_diversity = benchmark.make_diversity_metric() if benchmark is not None else None
        self.last_val_images: torch.Tensor | None = None
        self.last_val_prompts: list[str] = []
        self.last_val_correct: list[bool | None] = []  # verdict of each kept image (None: the benchmark gives none)
        self.val_rows: list[dict[str, Any]] = []  # per-image results of the latest validation (this rank)
        self._val_generator: torch.Generator | None = None
        self.last_validated_step: int | None = None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, PromptBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # Same noise every validation (offset by rank so ranks draw different images).
        self._val_generator = torch.Generator().manual_seed(self.val_seed + 1000 * self.global_rank)
        self.last_val_images = None
        self.val_rows = []
        if self.val_metric is not None:
            # Fresh states created under the current grad mode: a trainer.validate() before fit runs in
            # inference mode, and its tensors could not be updated in place by fit's (no-grad) validation loop.
            self.val_metric.reset()
        if self.val_diversity is not None:
            self.val_diversity.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if self.benchmark is None or self.val_metric is None:
            return
        ipp = self.benchmark.images_per_prompt
        expanded = [p for p in batch.prompts for _ in range(ipp)]
        generator = PolicyImageGenerator(self.policy, self.sampler)
        images = generator.generate(expanded, self._val_generator)
        rows = self.benchmark.score(batch.prompts, images, self.val_metric, self.val_diversity)
        self.val_rows.extend(rows)
        if self.last_val_images is None:
            self.last_val_images = images[: 8 * ipp].cpu()
            self.last_val_prompts = [p.prompt for p in expanded[: 8 * ipp]]
            self.last_val_correct = [row.get("correct") for row in rows[: 8 * ipp]]

    def on_validation_epoch_end(self) -> None:
        if self.val_metric is None:
            return
        scores = self.val_metric.compute()
        kind = self.benchmark.kind
        for name, value in scores.items():
            self.log(f"val/{kind}/{name}", value, sync_dist=False, prog_bar=(name == "overall"))
        self.val_metric.reset()
        if self.val_diversity is not None:
            for name, value in self.val_diversity.compute().items():
                self.log(f"val/diversity/{name}", value, sync_dist=False)
            self.val_diversity.reset()
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.trainer.global_step
