"""ShapesWorld scenes: objects on a cell grid, their rendering to palette cells and RGB, and back.

A scene is a list of axis-aligned objects, each a shape drawn inside a ``size x size`` box of cells whose
top-left cell is ``(row, col)``. Rendering paints each object's shape template with its palette index on a
grey (index 0) grid; ``cells_to_image`` upscales cells to RGB pixels and ``image_to_cells`` inverts it
(mean colour of each cell, then the nearest palette colour), exactly on rendered scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from htgrpo.data.shapes.palette import PALETTE_NAMES, PALETTE_RGB, SHAPES, color_index

_PALETTE_RGB_NP = np.asarray(PALETTE_RGB, dtype=np.int64)  # (P, 3)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: shape class (one of ``SHAPES``).
        color: colour name (one of GenEval's ten colours).
        row: top row of the object's box, in cells.
        col: left column of the object's box, in cells.
        size: side of the (square) box, in cells.
    """

    shape: str
    color: str
    row: int
    col: int
    size: int

    @property
    def box_cells(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` in cells, ``x2``/``y2`` exclusive."""
        return (self.col, self.row, self.col + self.size, self.row + self.size)

    def box_px(self, cell_px: int) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` in pixels for a rendering with ``cell_px`` pixels per cell."""
        x1, y1, x2, y2 = self.box_cells
        return (float(x1 * cell_px), float(y1 * cell_px), float(x2 * cell_px), float(y2 * cell_px))


@dataclass(frozen=True)
class Scene:
    """A ``grid_size x grid_size`` canvas with objects (painted in order; later ones on top)."""

    grid_size: int
    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self) -> None:
        for obj in self.objects:
            if obj.shape not in SHAPES:
                raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
            if obj.row < 0 or obj.col < 0 or obj.size < 1 or max(obj.row, obj.col) + obj.size > self.grid_size:
                raise ValueError(f"object {obj} does not fit in a {self.grid_size}x{self.grid_size} grid")
            color_index(obj.color)  # validates the colour name


@lru_cache(maxsize=256)
def _shape_template_cached(shape: str, height: int, width: int) -> np.ndarray:
    ys = (np.arange(height, dtype=np.float64) + 0.5)[:, None]  # cell-centre y, in cells
    xs = (np.arange(width, dtype=np.float64) + 0.5)[None, :]
    hh, hw = height / 2.0, width / 2.0
    dy = (ys - hh) / hh  # in [-1, 1]
    dx = (xs - hw) / hw
    eps = 1e-9
    if shape == "circle":
        mask = dx**2 + dy**2 <= 1.0 + eps
    elif shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "triangle":
        # Apex at the top centre, base on the bottom row. A cell is in when its centre lies within the
        # triangle's half-width measured at the cell's *bottom* edge: so the apex row is never empty (for
        # even widths too) and the bottom row is full, i.e. the template always fills its whole box.
        half = 0.5 * (np.arange(height, dtype=np.float64)[:, None] + 1.0) / height  # fraction of width
        u = xs / width - 0.5
        mask = np.abs(u) <= half + eps
    elif shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= 1.0 + eps
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.setflags(write=False)
    return mask


def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` drawn to fill an ``height x width`` box of cells.

    Inclusion is tested at cell centres (normalised so the box spans [-1, 1] on both axes):

    * circle (an ellipse for non-square boxes): ``dx**2 + dy**2 <= 1``;
    * square (a rectangle): every cell;
    * triangle pointing up: apex at the top centre, base = the bottom row (half-width taken at each cell's
      bottom edge so the apex row is non-empty);
    * diamond: ``|dx| + |dy| <= 1``.

    For every side from 2 up, each template touches all four sides of its box, so the bounding box of a
    rendered object is exactly its box. The result is read-only (cached); copy it before editing.
    """
    if height < 1 or width < 1:
        raise ValueError(f"template size must be positive, got {height}x{width}")
    return _shape_template_cached(str(shape), int(height), int(width))


def render_cells(scene: Scene) -> np.ndarray:
    """Palette indices of a scene: ``int64`` array ``(G, G)``, 0 = background."""
    g = scene.grid_size
    cells = np.zeros((g, g), dtype=np.int64)
    for obj in scene.objects:
        mask = shape_template(obj.shape, obj.size, obj.size)
        view = cells[obj.row : obj.row + obj.size, obj.col : obj.col + obj.size]
        view[mask] = color_index(obj.color)
    return cells


def _is_torch(x: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        return False
    return isinstance(x, torch.Tensor)


def cells_to_image(cells: Any, cell_px: int) -> Any:
    """Upscale palette cells to RGB pixels (nearest neighbour, colours from ``PALETTE_RGB``).

    Args:
        cells: integer palette indices, ``(G, G)`` or ``(B, G, G)``; numpy array or torch tensor.
        cell_px: pixels per cell side.

    Returns:
        ``uint8`` array ``(3, H, W)`` or ``(B, 3, H, W)`` with ``H = W = G * cell_px``: a torch tensor (on
        the input's device) when given a tensor, else a numpy array.
    """
    if cell_px < 1:
        raise ValueError(f"cell_px must be >= 1, got {cell_px}")
    if _is_torch(cells):
        import torch

        idx = cells.long()
        if idx.dim() not in (2, 3):
            raise ValueError(f"cells must be (G,G) or (B,G,G), got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(PALETTE_RGB)):
            raise ValueError(f"palette indices must be in [0, {len(PALETTE_RGB)}), got {int(idx.min())}..{int(idx.max())}")
        pal = torch.tensor(PALETTE_RGB, dtype=torch.uint8, device=idx.device)
        rgb = pal[idx]  # (..., G, G, 3)
        rgb = rgb.movedim(-1, -3)  # (..., 3, G, G)
        rgb = rgb.repeat_interleave(cell_px, dim=-2).repeat_interleave(cell_px, dim=-1)
        return rgb.contiguous()
    idx = np.asarray(cells).astype(np.int64)
    if idx.ndim not in (2, 3):
        raise ValueError(f"cells must be (G,G) or (B,G,G), got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= len(PALETTE_RGB)):
        raise ValueError(f"palette indices must be in [0, {len(PALETTE_RGB)}), got {idx.min()}..{idx.max()}")
    rgb = _PALETTE_RGB_NP.astype(np.uint8)[idx]  # (..., G, G, 3)
    rgb = np.moveaxis(rgb, -1, -3)
    rgb = np.repeat(np.repeat(rgb, cell_px, axis=-2), cell_px, axis=-1)
    return np.ascontiguousarray(rgb)


def image_to_cells(images: Any, grid_size: int) -> Any:
    """Read palette indices back from RGB images: mean colour of each cell, then the nearest palette colour.

    Args:
        images: ``uint8`` (or float in 0..255) images ``(3, H, W)`` or ``(B, 3, H, W)``, numpy or torch;
            ``H`` and ``W`` must be multiples of ``grid_size``.
        grid_size: cells per side.

    Returns:
        ``int64`` palette indices ``(G, G)`` or ``(B, G, G)``; a torch tensor (on the input's device) when
        given a tensor, else a numpy array. Exact inverse of ``cells_to_image``.
    """
    torch_in = _is_torch(images)
    if torch_in:
        device = images.device
        arr = images.detach().to("cpu").numpy()
    else:
        arr = np.asarray(images)
    if arr.ndim not in (3, 4) or arr.shape[-3] != 3:
        raise ValueError(f"images must be (3,H,W) or (B,3,H,W), got shape {arr.shape}")
    h, w = arr.shape[-2:]
    if h % grid_size or w % grid_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of grid_size={grid_size}")
    ph, pw = h // grid_size, w // grid_size
    lead = arr.shape[:-3]
    x = arr.astype(np.float64).reshape(*lead, 3, grid_size, ph, grid_size, pw).mean(axis=(-3, -1))
    x = np.moveaxis(x, -3, -1)  # (..., G, G, 3)
    d = ((x[..., None, :] - _PALETTE_RGB_NP.astype(np.float64)) ** 2).sum(-1)  # (..., G, G, P)
    cells = d.argmin(-1).astype(np.int64)
    if torch_in:
        import torch

        return torch.from_numpy(cells).to(device)
    return cells


def palette_name(index: int) -> str:
    """Colour name of a palette index (``background`` for 0)."""
    return PALETTE_NAMES[index]
