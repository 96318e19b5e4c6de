"""What every MAR-family policy (the toy ShapesWorld MAR, Harmon) exposes from its ``mar`` backbone.

The MAR sampler and MAR-GRPO read these through the policy; both policies hold the backbone as ``self.mar``.
"""

from __future__ import annotations

import torch

from htgrpo.policies.mar.backbone import MAR, MARConfig


class WrapsMAR:
    """Mixin for an ``nn.Module`` policy with a :class:`MAR` backbone in ``self.mar``."""

    mar: MAR

    @property
    def device(self) -> torch.device:
        return self.mar.fake_latent.device

    @property
    def config(self) -> MARConfig:
        return self.mar.config

    @property
    def head(self):
        """The diffusion head (``mar.diffloss``)."""
        return self.mar.diffloss

    @property
    def num_image_tokens(self) -> int:
        return self.mar.seq_len
