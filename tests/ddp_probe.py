"""A callback the DDP test adds on the command line (``+callbacks.rank_probe._target_=ddp_probe.RankProbe``):
every rank writes what it sampled and, at the end, its parameters, so the test can compare the ranks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.codes: list[torch.Tensor] = []
        self.prompts: list[list[str]] = []

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().cpu().clone() for n, p in pl_module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout = pl_module.last_scored.rollout
        self.codes.append(rollout.sampled.codes.detach().cpu().clone())
        self.prompts.append([p.prompt for p in rollout.prompts])

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().cpu().clone() for n, p in pl_module.policy.named_parameters()}
        torch.save({"codes": self.codes, "prompts": self.prompts, "params": params, "start": self.start},
                   self.out_dir / f"rank{trainer.global_rank}.pt")
