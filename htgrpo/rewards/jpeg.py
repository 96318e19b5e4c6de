"""DDPO's download-free aesthetic proxies: JPEG (in)compressibility (Black et al., "Training Diffusion Models with
Reinforcement Learning", 2023; ``ddpo_pytorch/rewards.py``).

Rule, per image: encode it as a JPEG with PIL at ``quality`` 95 and measure the file size in kilobytes
(``bytes / 1000``)::

    jpeg_incompressibility(x) = size_kB(JPEG_95(x))
    jpeg_compressibility(x)   = -size_kB(JPEG_95(x))

Smooth, flat images compress well (high compressibility reward); noisy, detailed ones do not.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from htgrpo.config import require_range
from htgrpo.rewards.base import Reward, RewardOutput, check_images


def jpeg_size_kb(image_hwc: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1 kB = 1000 bytes) of ``image_hwc`` (uint8 ``(H, W, 3)``) saved by PIL as JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="JPEG", quality=int(quality))
    return buffer.tell() / 1000.0


class JPEGReward(Reward):
    """DDPO's JPEG reward: ``sign * size_kB(JPEG_quality(x))`` with sign -1 (compressibility) or +1 (incompressibility).

    Args:
        compressibility: True -> ``jpeg_compressibility`` (negated size), False -> ``jpeg_incompressibility``.
        quality: JPEG quality, 1..95 (DDPO: 95).

    Components: ``jpeg/size_kb`` (the unsigned size).
    """

    def __init__(self, compressibility: bool = True, quality: int = 95) -> None:
        super().__init__()
        require_range(int(quality), "quality", 1, 95)
        self.compressibility = bool(compressibility)
        self.quality = int(quality)
        self.name = "jpeg_compressibility" if self.compressibility else "jpeg_incompressibility"

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images).permute(0, 2, 3, 1).contiguous().numpy()
        sizes = torch.tensor([jpeg_size_kb(im, self.quality) for im in batch], dtype=torch.float32)
        sign = -1.0 if self.compressibility else 1.0
        return RewardOutput(sign * sizes, {"jpeg/size_kb": sizes})
