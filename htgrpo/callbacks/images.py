"""Log a captioned, verdict-framed grid of validation samples to TensorBoard (and as a PNG in the run dir)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class ValidationImageGrid(L.Callback):
    """After each validation, log the first validation prompts' images as one readable grid: each row captioned
    with its prompt and ``[k/n correct]``, each image framed green (correct) / red (wrong) by the benchmark's verdict
    (``htgrpo.evaluation.grids``). TensorBoard tag ``val/samples`` (plus the prompts as text, ``val/sample_prompts``).

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
        from htgrpo.evaluation.grids import annotated_grid

        prompts = list(getattr(pl_module, "last_val_prompts", []))
        verdicts = list(getattr(pl_module, "last_val_correct", []))
        prompts = prompts if len(prompts) == images.shape[0] else None
        verdicts = verdicts if len(verdicts) == images.shape[0] else None
        grid = annotated_grid(images, self.nrow, prompts, verdicts)  # (H, W, 3) uint8
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, global_step=trainer.global_step, dataformats="HWC")
                row_prompts = (prompts or [])[:: self.nrow]
                logger.experiment.add_text("val/sample_prompts", "\n\n".join(f"{i}. {p}" for i, p in enumerate(row_prompts)),
                                           global_step=trainer.global_step)
        if self.save_png and trainer.default_root_dir:
            from PIL import Image

            path = Path(trainer.default_root_dir) / "samples" / f"val_step{trainer.global_step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(path)
