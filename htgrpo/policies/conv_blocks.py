"""The convolutional building blocks of LDM / taming-transformers autoencoders, shared by MAGVIT-v2 (MMaDA's image
tokenizer, ``image_tokenizers/magvit2.py``) and MAR's KL-16 VAE (``mar/vae.py``).

Both released checkpoints use the same block layout and parameter names, so one implementation serves both:
``GroupNorm(32 groups, eps 1e-6, affine)``; ``ResnetBlock`` (``norm1, conv1, norm2, conv2`` and a 1x1
``nin_shortcut`` when the width changes); ``AttnBlock`` (``norm, q, k, v, proj_out`` 1x1 convs); ``Downsample``
(zero-pad right/bottom by 1, 3x3 conv stride 2); ``Upsample`` (nearest x2, 3x3 conv).

The one difference is how each model's code computes swish: MAGVIT-v2 here uses ``F.silu``, the KL-16 VAE
``x * sigmoid(x)`` (equal in exact arithmetic, not bit for bit in float), so ``ResnetBlock`` takes the activation as
an argument and each model keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """LDM's ``Normalize``: 32 groups (so every width must be a multiple of 32), eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """h = conv2(dropout(act(norm2(conv1(act(norm1(x))))))); out = shortcut(x) + h.

    The shortcut is a 1x1 ``nin_shortcut`` conv when the width changes, the identity otherwise. ``activation``:
    the swish function of the model's released code (see the module docstring); it holds no parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation = activation
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.activation(self.norm1(x)))
        h = self.conv2(self.dropout(self.activation(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions: x + proj_out(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, c, h * w).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the bottom/right (LDM's asymmetric padding), then a 3x3
    stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The middle of an LDM encoder / decoder at its coarsest level: ``block_1`` (ResnetBlock) → ``attn_1``
    (AttnBlock) → ``block_2`` (ResnetBlock), all ``channels`` wide (keys ``mid.block_1.*``, ``mid.attn_1.*``,
    ``mid.block_2.*`` in both released checkpoints)."""

    def __init__(self, channels: int, dropout: float = 0.0,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, activation)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
