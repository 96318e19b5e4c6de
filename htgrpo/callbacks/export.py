"""Export the trained policy in its ``save_pretrained`` format where later experiments look for it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class ExportPolicy(L.Callback):
    """Save ``pl_module.policy.save_pretrained(dirpath)`` when training ends (rank zero only).

    Args:
        dirpath: destination folder; the warm start uses ``${paths.artifacts_dir}/shapes_llada_warmstart``,
            which ``policy=shapes_llada_warm`` loads.
        also_to_run_dir: also write a copy into ``<run dir>/policy`` so each run keeps its own result.
    """

    def __init__(self, dirpath: str, also_to_run_dir: bool = True):
        self.dirpath = Path(dirpath)
        self.also_to_run_dir = also_to_run_dir
        self.exported: list[Path] = []

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = [self.dirpath]
        if self.also_to_run_dir and trainer.default_root_dir:
            targets.append(Path(trainer.default_root_dir) / "policy")
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            pl_module.policy.save_pretrained(target)
            self.exported.append(target)
            log.info("policy exported to %s", target)
