"""What an object detector hands to the benchmark rules.

GenEval's rules (include/exclude, counts, colours, positions) only need, per detected object, its class,
confidence, bounding box and colour. Any detector (ShapesWorld's rule-based one, or Mask2Former + CLIP on
real images) produces these, so one implementation of the rules serves both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        label: class name, e.g. ``circle`` or ``dog``.
        score: detector confidence in [0, 1]; GenEval keeps detections with ``score > 0.3`` (``> 0.9`` for
            counting prompts).
        box: ``(x1, y1, x2, y2)`` in image pixels, y growing downward; ``x2``/``y2`` exclusive.
        color: predicted colour name (one of GenEval's ten), or None when not classified.
        area: number of pixels of the object's mask (0 when unknown).
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None
    area: int = 0

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)

    @property
    def size(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x2 - x1, y2 - y1)
