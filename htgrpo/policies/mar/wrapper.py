"""What every MAR-family policy (the toy ShapesWorld MAR, Harmon) exposes from its ``mar`` backbone.

The MAR sampler and MAR-GRPO read these through the policy; both policies hold the backbone as ``self.mar``.
"""

from __future__ import annotations

import torch

from htgrpo.policies.mar.backbone import MAR, MARConfig
from htgrpo.policies.mar.diffusion import GaussianDiffusion, create_diffusion


class WrapsMAR:
    """Mixin for an ``nn.Module`` policy with a :class:`MAR` backbone in ``self.mar``."""

    mar: MAR
    _diffusions: dict[str, GaussianDiffusion]   # respaced head chains, built once per key (set in __init__)
    _sampling_steps: str

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

    # -- the head's sampling chain --------------------------------------------------------------------------------
    def use_sampling_steps(self, num_steps: int | str | None) -> None:
        """Respace the head's sampling chain (None: the checkpoint's ``num_sampling_steps``).

        Rollouts and the re-scoring of their chains must use the same respacing: call this with the rollout
        sampler's value before both (the stored chain timesteps index this diffusion).
        """
        key = str(self.mar.config.num_sampling_steps if num_steps is None else num_steps)
        if key not in self._diffusions:
            self._diffusions[key] = create_diffusion(key)
        self.mar.diffloss.gen_diffusion = self._diffusions[key]
        self._sampling_steps = key

    @property
    def sampling_steps(self) -> str:
        return self._sampling_steps
