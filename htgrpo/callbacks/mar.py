"""Histograms of MAR-GRPO's token selection: MTE uncertainty and which tokens MTE and the consistency test keep
(to TensorBoard and W&B; MLflow gets summary metrics instead, see :mod:`htgrpo.callbacks.loggers`).

Reads what :class:`~htgrpo.algorithms.mar_grpo.MARGRPO` leaves after each training step (``last_selection``, a
:class:`~htgrpo.algorithms.mar_grpo.MARSelectionRecord`, and ``last_update_stats``), so training never depends on
this callback being configured. The scalars (reward, KL, clip fractions, ratio, entropy, grad norm, timings,
``train/mte/*``, ``train/consistency/kept_fraction``) are logged by the module itself.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from htgrpo.callbacks.loggers import histogram_backends, log_histograms


class MARSelectionHistograms(L.Callback):
    """Every ``every_n_steps`` rollout steps, write histograms (to each logger that takes them):

    - ``mar/uncertainty/all``: MTE token uncertainty (std over the S chains) of every generated token;
    - ``mar/uncertainty/mte_kept``: … of the top-k % tokens MTE keeps (they use the chain-averaged term);
    - ``mar/mte_kept/decode_step``: AR step that generated each MTE-kept token;
    - ``mar/consistency/delta_cos``: cos(proposal_i, final) − cos(proposal_{i−1}, final) of the still-unknown tokens
      at the trained AR steps (the consistency test keeps those above τ);
    - ``mar/consistency/kept_decode_step``: AR step that generated each token the consistency test kept;
    - ``mar/consistency/policy_fraction``: per trained AR step, the share of still-unknown tokens in the policy term;
    - ``mar/ratios``: importance ratios of the policy tokens.
    """

    def __init__(self, every_n_steps: int = 5, max_values: int = 50_000) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.max_values = int(every_n_steps), int(max_values)

    def _cap(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().flatten().cpu()
        x = x[torch.isfinite(x)]
        if x.numel() > self.max_values:
            x = x[:: max(1, x.numel() // self.max_values)]
        return x

    def histograms(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Tag -> values of the last step (empty ones left out)."""
        sel = getattr(pl_module, "last_selection", None)
        if sel is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        if sel.uncertainty is not None:
            out["mar/uncertainty/all"] = sel.uncertainty
            out["mar/uncertainty/mte_kept"] = sel.uncertainty[sel.critic]
            out["mar/mte_kept/decode_step"] = sel.step_of_token[sel.critic]
        out["mar/consistency/delta_cos"] = sel.consistency_delta
        out["mar/consistency/kept_decode_step"] = sel.consistency_kept_steps
        out["mar/consistency/policy_fraction"] = torch.tensor(list(sel.policy_fraction.values()))
        updates = getattr(pl_module, "last_update_stats", None) or []
        if updates:
            out["mar/ratios"] = torch.cat([u.ratios.reshape(-1) for u in updates])
        return {k: v for k, v in ((k, self._cap(v)) for k, v in out.items()) if v.numel()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(getattr(pl_module, "rollout_step", trainer.global_step))
        if (step - 1) % self.every_n_steps:
            return
        backends = histogram_backends(trainer)
        if not backends or not trainer.is_global_zero:
            return
        log_histograms(backends, self.histograms(pl_module), trainer.global_step)
