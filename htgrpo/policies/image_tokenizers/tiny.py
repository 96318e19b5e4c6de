"""Tiny random image tokenizers in the released on-disk formats, for tests and smoke runs (no downloads).

Both keep the real interface numbers: 8192 codes and 16 px per code, so layouts and samplers see real shapes.
What is shrunk (and why it is still legal):

- MAGVIT-v2: width ``ch = 32`` everywhere (the release hard-codes ``GroupNorm(32)``, so 32 is the smallest width),
  one ResnetBlock per level, 5 levels (4 downsamplings -> x16), ``codebook_dim`` 13 (2^13 = 8192 codes; the
  quantiser has no weights, only the {-1, +1} bit table). Saved as ``config.json`` + ``pytorch_model.bin``.
- DiMOO VQModel: ``block_out_channels = [8] * 5`` (5 levels -> x16), ``norm_num_groups = 4``, one layer per block,
  ``latent_channels = 4``, ``num_vq_embeddings = 8192``, ``lookup_from_codebook = True`` and
  ``mid_block_add_attention = False`` as in the aMUSEd config. Saved with diffusers ``save_pretrained`` under
  ``directory/vqvae/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

Both write functions take a smaller codebook on request (``codebook_dim`` / ``num_vq_embeddings``) for tiny language
models whose image-logit heads should stay small; the defaults keep the released 8192.
Each is < 2 MB and encodes/decodes a 64 px image in well under a second on one CPU thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from htgrpo.policies.image_tokenizers.diffusers_vq import DEFAULT_SUBFOLDER, DiffusersVQImageTokenizer
from htgrpo.policies.image_tokenizers.magvit2 import MAGVITv2, MagvitImageTokenizer, VQGANConfig

TINY_MAGVIT_LEVELS = 5  # 2^(5-1) = 16 px per code, as released


def tiny_magvit_model(seed: int = 0, codebook_dim: int = 13) -> MAGVITv2:
    """A randomly initialised MAGVIT-v2 with the released module tree and minimal widths (see module docstring).

    ``codebook_dim`` bits -> 2^codebook_dim codes (13 -> 8192 as released); smaller values shrink tiny LM heads.
    """
    ones = [1] * TINY_MAGVIT_LEVELS
    enc = VQGANConfig(ch=32, ch_mult=list(ones), num_res_blocks=list(ones), z_channels=codebook_dim)
    dec = VQGANConfig(ch=32, ch_mult=list(ones), num_res_blocks=list(ones), z_channels=codebook_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MAGVITv2(enc, dec, codebook_dim=codebook_dim)


def write_tiny_magvit(directory: str | os.PathLike, seed: int = 0, *, codebook_dim: int = 13) -> Path:
    """Write a tiny MAGVIT-v2 (``config.json`` + ``pytorch_model.bin``) to ``directory``; returns the folder.

    Load it with ``MagvitImageTokenizer.from_pretrained(directory)`` / ``policy.vq_model=directory``.
    """
    return MagvitImageTokenizer(tiny_magvit_model(seed, codebook_dim)).save_pretrained(directory)


def tiny_dimoo_vq_model(seed: int = 0, num_vq_embeddings: int = 8192):
    """A randomly initialised diffusers ``VQModel`` shaped like DiMOO's aMUSEd VQ, but tiny (see module docstring).

    ``num_vq_embeddings`` codes (8192 as released); smaller values shrink tiny LM heads.
    """
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 5,
            up_block_types=("UpDecoderBlock2D",) * 5,
            block_out_channels=(8,) * 5,
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            sample_size=32,
            num_vq_embeddings=int(num_vq_embeddings),
            norm_num_groups=4,
            vq_embed_dim=None,
            norm_type="group",
            mid_block_add_attention=False,
            lookup_from_codebook=True,
            force_upcast=False,
        )


def write_tiny_dimoo_vq(directory: str | os.PathLike, seed: int = 0, *, num_vq_embeddings: int = 8192) -> Path:
    """Write a tiny DiMOO VQModel to ``directory/vqvae/``; returns ``directory`` (the checkpoint root).

    Load it with ``DiffusersVQImageTokenizer.from_pretrained(directory)`` (subfolder ``vqvae`` by default).
    """
    root = Path(directory)
    DiffusersVQImageTokenizer(tiny_dimoo_vq_model(seed, num_vq_embeddings)).save_pretrained(root / DEFAULT_SUBFOLDER)
    return root
