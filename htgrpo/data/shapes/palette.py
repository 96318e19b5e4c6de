"""ShapesWorld's colour palette and world settings.

Palette index 0 is the neutral grey background; indices 1..10 are GenEval's ten colours in GenEval's
order. The palette image tokenizer uses these indices directly as image codes (one code per cell), which
is why it is lossless on ShapesWorld scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from htgrpo.data.records import GENEVAL_COLORS

BACKGROUND_NAME = "background"
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)
"""Neutral grey: not one of GenEval's colours, so it never reads as an object colour."""

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 150, 200),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}

PALETTE_NAMES: tuple[str, ...] = (BACKGROUND_NAME, *GENEVAL_COLORS)
"""Name of each palette index: 0 = background, then GenEval's colours."""

PALETTE_RGB: tuple[tuple[int, int, int], ...] = (BACKGROUND_RGB, *(COLOR_RGB[c] for c in GENEVAL_COLORS))
"""RGB of each palette index."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Every shape class ShapesWorld can render and name (the role of GenEval's 80 COCO classes)."""

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shapes a default world uses (SPEC's minimum set). ``diamond`` is opt-in: on a 16x16 grid a toy generator's
slightly ragged circles and diamonds are hard to tell apart, which mostly measures detector confusion."""


def color_index(name: str) -> int:
    """Palette index of a colour name (``background`` is 0)."""
    try:
        return PALETTE_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown colour {name!r}; expected one of {PALETTE_NAMES}") from None


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Geometry of ShapesWorld scenes.

    The defaults are ``conf/world/shapes.yaml``'s world, which every command (``python -m htgrpo.fit`` /
    ``evaluate`` / ``generate``) and the shipped warm start use: ``ShapesWorldConfig()`` is grid 11 (121 image
    tokens), 10 px cells (110 px images), objects of side 5 on a 2 x 2 lattice of places (``position_step`` 6),
    circle / square / triangle.

    :meth:`roomy` is the original, roomier 16-cell geometry (objects of side 5-7 anywhere), on which the unit tests
    and the benchmark scripts were measured; they build it explicitly, so their expected numbers stay valid.

    Attributes:
        grid_size: cells per side; one image token per cell (default 11 -> 121 tokens; :meth:`roomy`: 16 -> 256).
        cell_px: pixels per cell side when a scene is rendered to RGB (default 10 -> 110x110 images; roomy: 8).
        shapes: shape classes that prompts may name.
        min_object_size: smallest object side, in cells: >= 4 (below 4 a circle is a full square), >= 5 when
            ``diamond`` is a shape (below 5 circle and diamond coincide).
        max_object_size: largest object side, in cells.
        small_size: sides <= this count as "small" in dense (DPG-style) prompts.
        large_size: sides >= this count as "large" in dense prompts.
        detector_cell_noise: the detector's cell-flip probability ``p`` (``detector.shape_posterior``): its
            confidence that a blob is a shape. Larger = more tolerant of stray cells, in (0, 0.5).
        position_step: objects sit on a lattice: the top-left row and column of every object is
            ``position_offset + k * position_step`` (k = 0, 1, ...). 1 = anywhere. A coarser lattice leaves a
            generator fewer places to choose from (only where objects are, not how they are scored).
        position_offset: first lattice row/column, in ``[0, position_step)``.
    """

    grid_size: int = 11
    cell_px: int = 10
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    min_object_size: int = 5
    max_object_size: int = 5
    small_size: int = 5
    large_size: int = 5
    detector_cell_noise: float = 0.1
    position_step: int = 6
    position_offset: int = 0

    @classmethod
    def roomy(cls, **overrides: Any) -> "ShapesWorldConfig":
        """The original 16-cell geometry, with ``overrides`` on top: 16 x 16 cells (256 image tokens), 8 px cells
        (128 px images), objects of side 5-7 (``small_size`` 5, ``large_size`` 7) anywhere (``position_step`` 1).

        The unit tests and the benchmark scripts were measured on it (it was the dataclass default before the
        defaults became ``conf/world/shapes.yaml``'s); the toy policies' default world.
        """
        roomy = dict(grid_size=16, cell_px=8, min_object_size=5, max_object_size=7, small_size=5, large_size=7,
                     position_step=1, position_offset=0)
        return cls(**{**roomy, **overrides})

    def __post_init__(self) -> None:
        # Hydra hands lists over as ListConfig; keep the dataclass hashable and immutable.
        object.__setattr__(self, "shapes", tuple(str(s) for s in self.shapes))
        if self.grid_size < 8:
            raise ValueError(f"grid_size must be >= 8, got {self.grid_size}")
        if self.cell_px < 1:
            raise ValueError(f"cell_px must be >= 1, got {self.cell_px}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {self.shapes}")
        smallest = 5 if "diamond" in self.shapes else 4
        if not (smallest <= self.min_object_size <= self.max_object_size <= self.grid_size // 2):
            raise ValueError(
                f"need {smallest} <= min_object_size <= max_object_size <= grid_size // 2 (5 with diamond: below it "
                f"circle and diamond coincide), got {self.min_object_size}, {self.max_object_size} "
                f"(grid_size={self.grid_size})"
            )
        if int(self.position_step) != self.position_step or self.position_step < 1:
            raise ValueError(f"position_step must be an integer >= 1, got {self.position_step}")
        if int(self.position_offset) != self.position_offset or not 0 <= self.position_offset < self.position_step:
            raise ValueError(f"position_offset must be an integer in [0, position_step), got {self.position_offset}")
        if self.position_offset + self.max_object_size > self.grid_size:
            raise ValueError(f"position_offset {self.position_offset} leaves no room for a {self.max_object_size}-cell object")
        if not 0.0 < float(self.detector_cell_noise) < 0.5:
            raise ValueError(f"detector_cell_noise must be in (0, 0.5), got {self.detector_cell_noise}")

    def positions(self, size: int) -> tuple[int, ...]:
        """Lattice rows (= columns) where an object of side ``size`` may have its top-left cell."""
        return tuple(range(self.position_offset, self.grid_size - size + 1, self.position_step))

    @property
    def num_cells(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def image_px(self) -> int:
        return self.grid_size * self.cell_px
