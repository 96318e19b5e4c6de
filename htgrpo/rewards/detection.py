"""Moved: :class:`Detection` lives in :mod:`htgrpo.data.detection` (the data floor, so the ShapesWorld detector
below the rewards floor can build it without importing upwards). This name is kept for importers that still use it;
new code imports ``htgrpo.data.detection``."""

from htgrpo.data.detection import Detection

__all__ = ["Detection"]
