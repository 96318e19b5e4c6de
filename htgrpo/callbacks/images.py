"""Log a grid of validation samples to TensorBoard (and as a PNG in the run dir)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class ValidationImageGrid(L.Callback):
    """After each validation, log the first validation prompts' images as one grid.

    Args:
        nrow: images per grid row (use the benchmark's images_per_prompt to get one prompt per row).
        save_png: also write ``<run dir>/samples/val_step{N}.png``.
    """

    def __init__(self, nrow: int = 4, save_png: bool = True):
        self.nrow, self.save_png = int(nrow), bool(save_png)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images = getattr(pl_module, "last_val_images", None)
        if images is None or trainer.sanity_checking:
            return
        from torchvision.utils import make_grid

        grid = make_grid(images.float() / 255.0, nrow=self.nrow, padding=2, pad_value=1.0)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, global_step=trainer.global_step)
                prompts = getattr(pl_module, "last_val_prompts", [])[:: self.nrow]
                logger.experiment.add_text("val/sample_prompts", "\n\n".join(f"{i}. {p}" for i, p in enumerate(prompts)),
                                           global_step=trainer.global_step)
        if self.save_png and trainer.default_root_dir:
            from htgrpo.evaluation.benchmark import save_grid

            save_grid(images, Path(trainer.default_root_dir) / "samples" / f"val_step{trainer.global_step:06d}.png", self.nrow)
