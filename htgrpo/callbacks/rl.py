"""Callbacks of the RL modules: the Sketch-Then-Paint stage log and per-stage credit histograms (TensorBoard and
Weights & Biases histograms, MLflow summary metrics: :mod:`htgrpo.callbacks.loggers`).

Both read what :class:`~htgrpo.algorithms.ht_grpo.HTGRPO` leaves after each training step
(``last_update_stats``: one :class:`~htgrpo.algorithms.rollout.UpdateStats` per inner update), so training itself
never depends on a callback being configured.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from htgrpo.algorithms.credit import Stage
from htgrpo.callbacks.loggers import histogram_backends, log_histograms

log = logging.getLogger(__name__)

STAGE_INDEX = {Stage.GLOBAL: 0, Stage.STRUCTURE: 1, Stage.REFINE: 2}


class SketchThenPaint(L.Callback):
    """Logs the Sketch-Then-Paint schedule: which stage each inner update of the step ran, and stage switches.

    Scalars: ``stage/index`` (0 global, 1 structure, 2 refine; the stage of the step's first update in ``outer``
    mode, the sequence in ``inner`` mode is logged as ``stage/updates_<stage>``); an INFO line whenever the outer
    curriculum switches stage.
    """

    def __init__(self) -> None:
        self._last_stage: Stage | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        updates = getattr(pl_module, "last_update_stats", None)
        if not updates:
            return
        first = updates[0].stage
        metrics = {"stage/index": float(STAGE_INDEX[first])}
        for stage in Stage:
            metrics[f"stage/updates_{stage.value}"] = float(sum(u.stage == stage for u in updates))
        pl_module.log_dict(metrics, batch_size=1)
        schedule = getattr(pl_module, "schedule", None)
        if schedule is not None and schedule.mode == "outer" and first != self._last_stage:
            log.info("Sketch-Then-Paint: rollout step %d enters the %s stage",
                     getattr(pl_module, "rollout_step", -1), first.value)
        self._last_stage = first


class CreditHistograms(L.Callback):
    """Histograms per stage, every ``every_n_steps`` rollout steps, to each logger that takes them (TensorBoard,
    W&B; MLflow gets their summary statistics instead, see :mod:`htgrpo.callbacks.loggers`).

    Tags (``<stage>`` is ``global``, ``structure`` or ``refine``):
    ``credit/<stage>/weights`` (credit weight w of the scored tokens), ``credit/<stage>/token_advantages`` (Â),
    ``credit/<stage>/ratios`` (π_θ/π_old at the update), and ``credit/structure_decode_steps`` (commit step of every
    token in the structure set S).
    """

    def __init__(self, every_n_steps: int = 5, max_values: int = 50_000) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.max_values = int(every_n_steps), int(max_values)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().flatten().cpu()
        x = x[torch.isfinite(x)]
        if x.numel() > self.max_values:  # a fixed stride keeps the histogram's shape and the cost bounded
            x = x[:: max(1, x.numel() // self.max_values)]
        return x

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        updates = getattr(pl_module, "last_update_stats", None)
        step = int(getattr(pl_module, "rollout_step", trainer.global_step))
        if not updates or (step - 1) % self.every_n_steps:
            return
        backends = histogram_backends(trainer)
        if not backends or not trainer.is_global_zero:
            return
        log_histograms(backends, self.histograms(updates), trainer.global_step)

    def histograms(self, updates: list[Any]) -> dict[str, torch.Tensor]:
        """Tag -> values of one step's inner updates (empty ones left out)."""
        out: dict[str, torch.Tensor] = {}
        for stage in Stage:
            mine = [u for u in updates if u.stage == stage]
            if not mine:
                continue
            for name, attr in (("weights", "credit"), ("token_advantages", "token_advantages"), ("ratios", "ratios")):
                out[f"credit/{stage.value}/{name}"] = self._cap(torch.cat([getattr(u, attr).reshape(-1) for u in mine]))
        out["credit/structure_decode_steps"] = self._cap(updates[0].structure_commit_steps)
        return {tag: values for tag, values in out.items() if values.numel()}
