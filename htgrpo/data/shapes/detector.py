"""Rule-based ShapesWorld detector: the stand-in for GenEval's Mask2Former + CLIP colour classifier.

Steps for one image:

1. image -> palette cells (``image_to_cells``: mean colour of each cell, nearest palette colour);
2. connected components of equal non-background palette index (8-connectivity);
3. blobs whose bounding box has a side shorter than ``min_side`` cells are dropped (noise);
4. class = the shape whose template (drawn to the blob's bounding box) has the highest IoU with the blob,
   score = that IoU (1.0 for a cleanly rendered object);
5. colour = the blob's palette colour; box = the blob's bounding box in pixels of the given image.

Detections come sorted by score, highest first (stable, so ties keep reading order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from htgrpo.data.shapes.palette import PALETTE_NAMES, ShapesWorldConfig
from htgrpo.data.shapes.scene import image_to_cells, shape_template
from htgrpo.rewards.detection import Detection

_EIGHT = np.ones((3, 3), dtype=bool)


def to_chw_numpy(image: Any) -> np.ndarray:
    """One image as a numpy ``(3, H, W)`` array; accepts torch/numpy ``(3, H, W)`` or numpy ``(H, W, 3)``."""
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().to("cpu").numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected one image (3,H,W) or (H,W,3), got shape {arr.shape}")
    if arr.shape[0] != 3 and arr.shape[-1] == 3:
        arr = np.moveaxis(arr, -1, 0)
    if arr.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3,H,W) or (H,W,3), got shape {arr.shape}")
    return arr


class ShapesDetector:
    """Connected-components detector over palette cells (see module docstring).

    Args:
        world: ShapesWorld geometry (grid size, shape classes).
        min_side: blobs whose bounding box is shorter than this many cells on either side are ignored.
    """

    def __init__(self, world: ShapesWorldConfig, min_side: int = 4) -> None:
        self.world = world
        self.min_side = int(min_side)

    def detect_cells(self, cells: np.ndarray, cell_px_y: float = 1.0, cell_px_x: float | None = None) -> list[Detection]:
        """Detections from a ``(G, G)`` palette-index grid; boxes scaled by the given pixels per cell."""
        if cell_px_x is None:
            cell_px_x = cell_px_y
        cells = np.asarray(cells)
        dets: list[Detection] = []
        for color_idx in np.unique(cells):
            if color_idx == 0:
                continue
            labels, n = ndimage.label(cells == color_idx, structure=_EIGHT)
            if n == 0:
                continue
            for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
                if sl is None:
                    continue
                h = sl[0].stop - sl[0].start
                w = sl[1].stop - sl[1].start
                if min(h, w) < self.min_side:
                    continue
                blob = labels[sl] == lab
                best_shape, best_iou = None, -1.0
                for shape in self.world.shapes:
                    tmpl = shape_template(shape, h, w)
                    inter = np.logical_and(blob, tmpl).sum()
                    union = np.logical_or(blob, tmpl).sum()
                    iou = float(inter) / float(union) if union else 0.0
                    if iou > best_iou:
                        best_shape, best_iou = shape, iou
                y1, x1 = sl[0].start, sl[1].start
                dets.append(
                    Detection(
                        label=best_shape,
                        score=best_iou,
                        box=(x1 * cell_px_x, y1 * cell_px_y, (x1 + w) * cell_px_x, (y1 + h) * cell_px_y),
                        color=PALETTE_NAMES[int(color_idx)],
                        area=int(round(blob.sum() * cell_px_x * cell_px_y)),
                    )
                )
        dets.sort(key=lambda d: -d.score)
        return dets

    def detect(self, image: Any) -> list[Detection]:
        """Detections for one ``uint8`` image: torch/numpy ``(3, H, W)`` or numpy ``(H, W, 3)``."""
        arr = to_chw_numpy(image)
        g = self.world.grid_size
        cells = image_to_cells(arr, g)
        return self.detect_cells(cells, arr.shape[-2] / g, arr.shape[-1] / g)

    def detect_batch(self, images: Any) -> list[list[Detection]]:
        """``detect`` for each image of a ``(B, 3, H, W)`` batch (or a sequence of images)."""
        if isinstance(images, (list, tuple)):
            return [self.detect(im) for im in images]
        try:
            import torch

            if isinstance(images, torch.Tensor):
                images = images.detach().to("cpu").numpy()
        except ImportError:  # pragma: no cover
            pass
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ValueError(f"expected a batch (B,3,H,W), got shape {arr.shape}")
        g = self.world.grid_size
        cells = image_to_cells(arr, g)  # one vectorised pass for the whole batch
        return [self.detect_cells(c, arr.shape[-2] / g, arr.shape[-1] / g) for c in cells]
