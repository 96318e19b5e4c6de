"""Rule-based ShapesWorld detector: the stand-in for GenEval's Mask2Former + CLIP colour classifier.

Steps for one image:

1. image -> palette cells (``image_to_cells``: mean colour of each cell, nearest palette colour);
2. connected components of equal non-background palette index (8-connectivity);
3. blobs whose bounding box has a side shorter than ``min_side`` cells are dropped (noise);
4. class = the shape whose template (drawn to the blob's bounding box) disagrees with the blob on the fewest
   cells; score = the posterior probability of that class under a cell-noise model (``shape_posterior``): how
   sure the detector is that the blob is this shape rather than another shape or clutter. (A calibrated class
   confidence, as Mask2Former's score is, rather than a mask-quality IoU: with IoU as the score, GenEval's 0.9
   counting threshold would demand pixel-perfect objects.)
5. colour = the blob's palette colour; box = the blob's bounding box in pixels of the given image.

Detections come sorted by score, highest first (stable, so ties keep reading order).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from htgrpo.data.detection import Detection
from htgrpo.data.shapes.palette import PALETTE_NAMES, ShapesWorldConfig
from htgrpo.data.shapes.scene import image_to_cells, shape_template

_EIGHT = np.ones((3, 3), dtype=bool)


def shape_posterior(mismatches: Sequence[int], box_cells: int, cell_noise: float) -> np.ndarray:
    """Posterior over the shape classes and "clutter" for one blob, under a cell-flip noise model.

    Model: a blob of class c is its template ``T_c`` drawn to the blob's bounding box (``n = box_cells`` cells)
    with every cell flipped independently with probability ``p = cell_noise``; clutter is any pattern in the box,
    each cell on or off with probability 1/2. With ``d_c`` = cells where blob and ``T_c`` disagree and a uniform
    prior over the ``C`` classes and clutter::

        log L_c = d_c·log p + (n − d_c)·log(1 − p)        log L_clutter = n·log(1/2)
        P(c | blob) = L_c / (Σ_c' L_c' + L_clutter)

    Returns the ``C + 1`` probabilities (classes in the given order, clutter last). Example (hand-checked):
    ``d = (0, 4)``, ``n = 25``, ``p = 0.1`` gives ``P = (0.99985, 0.00015, 4e-12)``.
    """
    if not 0.0 < cell_noise < 0.5:
        raise ValueError(f"cell_noise must be in (0, 0.5), got {cell_noise}")
    d = np.asarray(mismatches, dtype=np.float64)
    n = float(box_cells)
    log_l = np.append(d * math.log(cell_noise) + (n - d) * math.log1p(-cell_noise), n * math.log(0.5))
    log_l -= log_l.max()
    post = np.exp(log_l)
    return post / post.sum()


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
        world: ShapesWorld geometry (grid size, shape classes, ``detector_cell_noise``).
        min_side: blobs whose bounding box is shorter than this many cells on either side are ignored
            (default: ``world.min_object_size - 1``, so an object one cell short still counts).
    """

    def __init__(self, world: ShapesWorldConfig, min_side: int | None = None) -> None:
        self.world = world
        self.min_side = int(min_side) if min_side is not None else max(2, world.min_object_size - 1)
        self.cell_noise = float(world.detector_cell_noise)

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
                mismatches = [int(np.logical_xor(blob, shape_template(shape, h, w)).sum()) for shape in self.world.shapes]
                post = shape_posterior(mismatches, h * w, self.cell_noise)
                best = int(np.argmax(post[:-1]))  # fewest mismatches; ties keep the world's shape order
                y1, x1 = sl[0].start, sl[1].start
                dets.append(
                    Detection(
                        label=self.world.shapes[best],
                        score=float(post[best]),
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
