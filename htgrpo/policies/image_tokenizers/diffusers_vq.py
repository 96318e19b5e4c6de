"""Lumina-DiMOO's image tokenizer: diffusers ``VQModel`` (the aMUSEd VQ-GAN) from a checkpoint's ``vqvae`` subfolder.

Facts from the released DiMOO code (``utils/image_utils.py``, ``data/item_processor.py``):

- loading: ``VQModel.from_pretrained(ckpt, subfolder="vqvae")`` with ckpt ``Alpha-VLLM/Lumina-DiMOO``;
- scale factor 2^(len(block_out_channels) - 1) = 16; token grid (H/16) x (W/16), non-square allowed;
- encode: ``VaeImageProcessor(do_normalize=False).preprocess(image)`` (pixels in [0, 1], **not** [-1, 1]),
  ``latents = vq.encode(x).latents``, codes = ``vq.quantize(latents)[2][2]`` reshaped to (B, h, w): row-major;
- decode: ``vq.decode(codes, force_not_quantize=True, shape=(B, h, w, latent_channels)).sample.clip(0, 1)``
  (the codebook lookup happens inside because the config sets ``lookup_from_codebook``), then
  ``VaeImageProcessor.postprocess`` to PIL, i.e. ``round(x * 255)``.

In DiMOO's token sequence a code c becomes token c + 126356; that offset belongs to the sequence layout, not here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from htgrpo.policies.image_tokenizers.base import (
    PretrainedImageTokenizer,
    images_to_unit_float,
    unit_float_to_uint8,
)

DEFAULT_REPO = "Alpha-VLLM/Lumina-DiMOO"
DEFAULT_SUBFOLDER = "vqvae"
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)


class DiffusersVQImageTokenizer(PretrainedImageTokenizer):
    """uint8 images <-> diffusers ``VQModel`` codes, 2^(levels-1) px per code, row-major, any multiple-of-16 size.

    ``from_pretrained(path_or_id="Alpha-VLLM/Lumina-DiMOO", *, subfolder="vqvae", config_key="policy.vq_model",
    device=None, dtype=None)`` loads the ``vqvae`` folder of a DiMOO checkpoint or hub id (or that folder itself).
    """

    DEFAULT_REPO = DEFAULT_REPO
    DEFAULT_SUBFOLDER = DEFAULT_SUBFOLDER
    WHAT = "diffusers VQModel image tokenizer"
    WEIGHT_FILES = WEIGHT_FILES

    def __init__(self, vq_model):
        if not getattr(vq_model.config, "lookup_from_codebook", False):
            # DiMOO decodes indices with force_not_quantize=True, which only looks codes up when this flag is set.
            raise ValueError(
                "this VQModel config has lookup_from_codebook=false, so it cannot decode code indices "
                "(DiMOO's aMUSEd VQ sets it to true)"
            )
        self.vq = vq_model.eval().requires_grad_(False)
        self.module = self.vq

    @property
    def codebook_size(self) -> int:
        return int(self.vq.config.num_vq_embeddings)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) (or float in [0, 1]) -> codes (B, (H/16)*(W/16)) long, row-major; pixels stay in [0, 1].

        Runs on the model's device; the codes come back on the images' device.
        """
        x = images_to_unit_float(images)
        rows, cols = self.grid_for(x.shape[-2], x.shape[-1])
        latents = self.vq.encode(x.to(device=self.device, dtype=self.dtype)).latents
        if tuple(latents.shape[-2:]) != (rows, cols):
            raise ValueError(f"VQModel produced a {tuple(latents.shape[-2:])} latent grid, expected {(rows, cols)}")
        indices = self.vq.quantize(latents)[2][2]  # flat over (B, h, w), row-major
        return indices.reshape(latents.shape[0], rows * cols).long().to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes (B, rows*cols) -> uint8 (B,3,16 rows,16 cols): ``decode(...).sample.clip(0, 1)``, then round(x*255).

        Runs on the model's device; the images come back on the codes' device.
        """
        rows, cols = (int(v) for v in grid)
        if codes.dim() != 2 or codes.shape[1] != rows * cols:
            raise ValueError(f"expected codes (B, {rows * cols}) for a {rows}x{cols} grid, got {tuple(codes.shape)}")
        if bool((codes < 0).any()) or bool((codes >= self.codebook_size).any()):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); masked tokens cannot be decoded")
        b = codes.shape[0]
        shape = (b, rows, cols, int(self.vq.config.latent_channels))
        pixels = self.vq.decode(codes.to(self.device).long(), force_not_quantize=True, shape=shape).sample
        return unit_float_to_uint8(pixels.clip(0, 1), rounding="round").to(codes.device)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the VQModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) into ``directory``.

        Pass the checkpoint root's ``vqvae`` folder to reproduce DiMOO's layout (``write_tiny_dimoo_vq`` does).
        """
        out = Path(directory)
        self.vq.save_pretrained(str(out))
        return out

    @classmethod
    def load_module(cls, folder: Path, *, path_or_id: str | os.PathLike, config_key: str) -> torch.nn.Module:
        """``VQModel.from_pretrained(folder)`` after checking that the config is a VQModel's."""
        from diffusers import VQModel

        config = VQModel.load_config(str(folder))
        if config.get("_class_name") not in (None, "VQModel"):
            raise ValueError(
                f"{config_key}={str(path_or_id)!r}: {str(folder)!r} holds a "
                f"{config.get('_class_name')!r}, not a VQModel"
            )
        return VQModel.from_pretrained(str(folder))
