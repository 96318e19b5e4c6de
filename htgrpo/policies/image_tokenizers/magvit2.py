"""MAGVIT-v2 image tokenizer of Show-o / MMaDA (hub repo ``showlab/magvitv2``), written for htgrpo.

Facts taken from the released code (Show-o ``models/modeling_magvitv2.py`` and ``common_modules.py``, identical in
MMaDA) so that the released ``config.json`` + weights load with **no renaming**:

- ``MAGVITv2`` has three children: ``encoder`` (``VQGANEncoder``), ``decoder`` (``VQGANDecoder``) and ``quantize``
  (``LFQuantizer``). Its constructor takes no arguments, so the released ``config.json`` holds only private keys
  (``_class_name``, ``_version``); the architecture is the constructors' defaults:
  encoder ``ch=128, ch_mult=[1,2,2,4,4], num_res_blocks=[4,3,4,3,4]``, decoder ``ch=128, ch_mult=[1,1,2,2,4],
  num_res_blocks=[4,4,3,4,3]``, both ``attn_resolutions=[5], resolution=256, z_channels=13`` (the attention
  resolution 5 is never reached, so only the middle blocks attend). 4 stride-2 stages: downsampling x16.
- Taming-style blocks (``htgrpo/policies/conv_blocks.py``, shared with MAR's VAE): ``GroupNorm(32 groups, eps 1e-6)``,
  swish, ``ResnetBlock`` (``norm1, conv1, norm2, conv2`` and a 1x1 ``nin_shortcut`` when the width changes),
  ``AttnBlock`` (``norm, q, k, v, proj_out`` 1x1 convs),
  ``Downsample`` (zero-pad right/bottom by 1, 3x3 conv stride 2), ``Upsample`` (nearest x2, 3x3 conv).
  The encoder ends with ``quant_conv`` (1x1), the decoder starts with ``post_quant_conv`` (1x1).
- Lookup-free quantiser, ``codebook_dim = 13`` -> 2^13 = 8192 codes. Persistent buffers ``quantize.embedding``
  (8192, 13) with entries in {-1, +1} and ``quantize.power_vals`` = [2^12, ..., 2^0]. A latent vector z maps to
  index = sum_k 2^(12-k) * [z_k > 0] (channel 0 is the most significant bit); ``decode_code`` looks the index up in
  ``embedding`` (bit b -> 2b - 1) and runs the decoder.
- Pixels: the encoder reads images normalised to [-1, 1] (MMaDA's ``image_transform``: bicubic resize + centre crop
  + ``Normalize(0.5, 0.5)``); ``decode_code`` returns [-1, 1] and MMaDA maps it with ``clamp((x + 1) / 2, 0, 1) * 255``
  and ``astype(uint8)`` (truncation), which ``decode`` reproduces.
- Weights: Show-o's loader reads ``pytorch_model.bin`` (a ``torch.save``d state dict); MMaDA's diffusers-derived
  loader also accepts ``pytorch_model.safetensors``. ``from_pretrained`` reads either (and ``model.safetensors``).

htgrpo extension (for tiny test checkpoints only): ``config.json`` may also carry ``encoder`` / ``decoder`` objects
with the released constructors' argument names (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
``dropout``, ``in_ch``, ``out_ch``, ``resolution``, ``z_channels``, ``double_z``) and ``codebook_dim``. They are
written only when they differ from the released defaults, so saving the full-size model gives the released layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from htgrpo.policies.conv_blocks import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample, group_norm
from htgrpo.policies.image_tokenizers.base import (
    PretrainedImageTokenizer,
    images_to_unit_float,
    unit_float_to_uint8,
)

DEFAULT_REPO = "showlab/magvitv2"
CONFIG_FILE = "config.json"
BIN_WEIGHTS = "pytorch_model.bin"  # Show-o / MMaDA ``WEIGHTS_NAME``: what the released repo ships
SAFETENSORS_WEIGHTS = ("pytorch_model.safetensors", "model.safetensors")  # MMaDA's safe name, then HF's usual name
CLASS_NAME = "MAGVITv2"  # MMaDA's spelling (older Show-o code: "MAGViTv2"); both are accepted when loading
ACCEPTED_CLASS_NAMES = ("MAGVITv2", "MAGViTv2")


# ----------------------------------------------------------------------------------------------------------------
# Lookup-free quantisation: code index <-> sign bits
# ----------------------------------------------------------------------------------------------------------------


def codes_to_bits(codes: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """Code index -> its ``codebook_dim`` bits, most significant first: bit_k = (code >> (d-1-k)) & 1.

    Example (d = 13): 1 -> [0,...,0,1]; 4096 -> [1,0,...,0]; 8191 -> all ones.
    """
    shifts = torch.arange(codebook_dim - 1, -1, -1, device=codes.device, dtype=torch.long)
    return (codes.long().unsqueeze(-1) >> shifts) & 1


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits (..., d), most significant first -> code index = sum_k bits_k * 2^(d-1-k) (inverse of ``codes_to_bits``)."""
    d = bits.shape[-1]
    powers = 2 ** torch.arange(d - 1, -1, -1, device=bits.device, dtype=torch.long)
    return (bits.long() * powers).sum(-1)


class LFQuantizer(nn.Module):
    """Lookup-free quantiser: each latent channel is one bit (z_k > 0), the code is the bits read as a binary number.

    Buffers (named as in the release, saved in the state dict): ``embedding`` (2^d, d) = 2 * bits(code) - 1 and
    ``power_vals`` (d,) = [2^(d-1), ..., 1].
    """

    def __init__(self, codebook_dim: int = 13):
        super().__init__()
        if not 1 <= int(codebook_dim) <= 30:
            raise ValueError(f"codebook_dim must be in [1, 30], got {codebook_dim}")
        self.codebook_dim = int(codebook_dim)
        self.codebook_size = 2**self.codebook_dim
        bits = codes_to_bits(torch.arange(self.codebook_size), self.codebook_dim)
        self.register_buffer("embedding", bits.float() * 2 - 1)
        self.register_buffer("power_vals", 2 ** torch.arange(self.codebook_dim - 1, -1, -1))

    def latents_to_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, d, h, w) -> codes (B, h*w), row-major: code = sum_k power_vals[k] * [z_k > 0]."""
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"expected latents (B, {self.codebook_dim}, h, w), got {tuple(z.shape)}")
        positive = (z > 0).long()  # sign bits; z == 0 counts as -1 like the release
        codes = (positive * self.power_vals.long().view(1, -1, 1, 1)).sum(1)  # (B, h, w)
        return codes.flatten(1)

    def codes_to_latents(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes (B, h*w) row-major -> quantised latents (B, d, h, w) with entries in {-1, +1}."""
        rows, cols = grid
        if codes.dim() != 2 or codes.shape[1] != rows * cols:
            raise ValueError(f"expected codes (B, {rows * cols}) for a {rows}x{cols} grid, got {tuple(codes.shape)}")
        if bool((codes < 0).any()) or bool((codes >= self.codebook_size).any()):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); masked tokens cannot be decoded")
        z_q = self.embedding[codes.long()]  # (B, h*w, d)
        return z_q.view(codes.shape[0], rows, cols, self.codebook_dim).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Taming-style convolutional blocks (names as in the release)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VQGANConfig:
    """Constructor arguments of the released ``VQGANEncoder`` / ``VQGANDecoder`` (same names, same meaning)."""

    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    num_res_blocks: list[int] = field(default_factory=lambda: [4, 3, 4, 3, 4])
    attn_resolutions: list[int] = field(default_factory=lambda: [5])
    dropout: float = 0.0
    in_ch: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 13
    double_z: bool = False

    def check(self, which: str) -> None:
        if len(self.ch_mult) != len(self.num_res_blocks) or not self.ch_mult:
            raise ValueError(f"{which}: ch_mult and num_res_blocks must be non-empty and of equal length")
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise ValueError(
                    f"{which}: every width ch*ch_mult must be a multiple of 32 (GroupNorm(32)), got {self.ch * mult}"
                )


def released_encoder_config() -> VQGANConfig:
    return VQGANConfig()


def released_decoder_config() -> VQGANConfig:
    return VQGANConfig(ch_mult=[1, 1, 2, 2, 4], num_res_blocks=[4, 4, 3, 4, 3])


class VQGANEncoder(nn.Module):
    """conv_in -> per level: ResnetBlocks (+ Downsample but the last) -> mid -> norm/swish/conv_out -> quant_conv."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        config.check("encoder")
        self.config = config
        ch, mults = config.ch, list(config.ch_mult)
        self.num_resolutions = len(mults)
        self.conv_in = nn.Conv2d(config.in_ch, ch, 3, padding=1)
        in_mults = [1] + mults
        res = config.resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mults[level], ch * mults[level]
            for _ in range(config.num_res_blocks[level]):
                blocks.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = MidBlock(block_in, config.dropout)
        self.norm_out = group_norm(block_in)
        z_out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class VQGANDecoder(nn.Module):
    """post_quant_conv -> conv_in -> mid -> per level, coarse to fine: ResnetBlocks (+ Upsample) -> norm/swish/out."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        config.check("decoder")
        self.config = config
        ch, mults = config.ch, list(config.ch_mult)
        self.num_resolutions = len(mults)
        block_in = ch * mults[-1]
        res = config.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config.dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mults[level]
            for _ in range(config.num_res_blocks[level]):
                blocks.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            stage = nn.Module()
            stage.block, stage.attn = blocks, attns
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)  # ``up[i]`` is the stage at level i (finest = 0), as in the release
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MAGVITv2(nn.Module):
    """The MAGVIT-v2 autoencoder with the release's module tree: ``encoder``, ``decoder``, ``quantize``."""

    def __init__(
        self,
        encoder: VQGANConfig | None = None,
        decoder: VQGANConfig | None = None,
        codebook_dim: int = 13,
    ):
        super().__init__()
        enc = encoder or released_encoder_config()
        dec = decoder or released_decoder_config()
        if enc.z_channels != codebook_dim or dec.z_channels != codebook_dim:
            raise ValueError(
                f"z_channels (encoder {enc.z_channels}, decoder {dec.z_channels}) "
                f"must equal codebook_dim {codebook_dim}"
            )
        if len(enc.ch_mult) != len(dec.ch_mult):
            raise ValueError("encoder and decoder must have the same number of levels (len(ch_mult))")
        self.encoder = VQGANEncoder(enc)
        self.decoder = VQGANDecoder(dec)
        self.quantize = LFQuantizer(codebook_dim)

    @property
    def downsample(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    def get_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,H,W) -> codes (B, (H/16)*(W/16)) row-major (release name)."""
        return self.quantize.latents_to_codes(self.encoder(pixel_values))

    def decode_code(self, codebook_indices: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (B, h*w) -> pixels in about [-1, 1] (B,3,16h,16w); release name, square grid if ``shape`` is None."""
        if shape is None:
            side = int(round(codebook_indices.shape[-1] ** 0.5))
            shape = (side, side)
        z_q = self.quantize.codes_to_latents(codebook_indices, shape).to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z_q)

    def config_dict(self) -> dict[str, Any]:
        """``config.json`` content: the release's private keys, plus architecture keys only where they differ."""
        cfg: dict[str, Any] = {"_class_name": CLASS_NAME, "_version": "htgrpo"}
        if asdict(self.encoder.config) != asdict(released_encoder_config()):
            cfg["encoder"] = asdict(self.encoder.config)
        if asdict(self.decoder.config) != asdict(released_decoder_config()):
            cfg["decoder"] = asdict(self.decoder.config)
        if self.quantize.codebook_dim != 13:
            cfg["codebook_dim"] = self.quantize.codebook_dim
        return cfg

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> MAGVITv2:
        """Build from a ``config.json`` dict (private ``_*`` keys are ignored, as the released loader does)."""
        public = {k: v for k, v in cfg.items() if not k.startswith("_")}
        unknown = sorted(set(public) - {"encoder", "decoder", "codebook_dim"})
        if unknown:
            raise ValueError(f"unknown MAGVIT-v2 config keys {unknown}; expected encoder, decoder, codebook_dim")
        class_name = cfg.get("_class_name")
        if class_name is not None and class_name not in ACCEPTED_CLASS_NAMES:
            raise ValueError(f"config.json has _class_name {class_name!r}, not a MAGVIT-v2 checkpoint ({CLASS_NAME})")
        codebook_dim = int(public.get("codebook_dim", 13))

        def sub(key: str, default: VQGANConfig) -> VQGANConfig:
            given = public.get(key) or {}
            fields = set(asdict(default))
            bad = sorted(set(given) - fields)
            if bad:
                raise ValueError(f"unknown MAGVIT-v2 {key} config keys {bad}; allowed: {sorted(fields)}")
            return VQGANConfig(**{**asdict(default), **given})

        enc = sub("encoder", released_encoder_config())
        dec = sub("decoder", released_decoder_config())
        return cls(enc, dec, codebook_dim)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for name in SAFETENSORS_WEIGHTS:
        if (folder / name).is_file():
            from safetensors.torch import load_file

            return load_file(str(folder / name))
    return torch.load(folder / BIN_WEIGHTS, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# The ImageTokenizer
# ----------------------------------------------------------------------------------------------------------------


class MagvitImageTokenizer(PretrainedImageTokenizer):
    """MMaDA's image tokenizer: uint8 images <-> MAGVIT-v2 codes (2^13 = 8192), 16 px per code, row-major.

    ``encode`` expects sizes that are multiples of 16 (512 x 512 -> a 32 x 32 grid); resize arbitrary images with
    ``base.resize_center_crop`` first (MMaDA's preprocessing). ``decode`` reproduces MMaDA's post-processing.
    ``from_pretrained(path_or_id="showlab/magvitv2", *, subfolder=None, config_key="policy.vq_model", device=None,
    dtype=None)`` loads a released-format folder or hub id; strict: every key must match.
    """

    DEFAULT_REPO = DEFAULT_REPO
    DEFAULT_SUBFOLDER = None
    WHAT = "MAGVIT-v2 image tokenizer"
    WEIGHT_FILES = (BIN_WEIGHTS, *SAFETENSORS_WEIGHTS)

    def __init__(self, model: MAGVITv2):
        self.model = model.eval().requires_grad_(False)
        self.module = self.model

    @property
    def codebook_size(self) -> int:
        return self.model.quantize.codebook_size

    @property
    def downsample(self) -> int:
        return self.model.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) (or float in [0, 1]) -> codes (B, (H/16)*(W/16)) long, row-major. Pixels -> 2x - 1.

        Runs on the model's device; the codes come back on the images' device.
        """
        x = images_to_unit_float(images)
        self.grid_for(x.shape[-2], x.shape[-1])
        x = (x * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)
        return self.model.get_code(x).long().to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes (B, rows*cols) -> uint8 (B,3,16 rows,16 cols): clamp((x + 1) / 2, 0, 1) * 255, truncated like MMaDA.

        Runs on the model's device; the images come back on the codes' device.
        """
        rows, cols = (int(v) for v in grid)
        pixels = self.model.decode_code(codes.to(self.device), shape=(rows, cols))
        return unit_float_to_uint8((pixels.float() + 1.0) / 2.0, rounding="floor").to(codes.device)

    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = False) -> Path:
        """Write ``config.json`` + ``pytorch_model.bin`` (the released layout) or ``pytorch_model.safetensors``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(self.model.config_dict(), indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, str(out / SAFETENSORS_WEIGHTS[0]))
        else:
            torch.save(state, out / BIN_WEIGHTS)
        return out

    @classmethod
    def load_module(cls, folder: Path, *, path_or_id: str | os.PathLike, config_key: str) -> torch.nn.Module:
        """Build :class:`MAGVITv2` from ``folder/config.json`` and load its weights strictly."""
        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text())
            model = MAGVITv2.from_config_dict(cfg)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{config_key}={str(path_or_id)!r}: bad MAGVIT-v2 config.json in {str(folder)!r}: {err}"
            ) from None
        state = _read_state_dict(folder)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"{config_key}={str(path_or_id)!r}: the weights in {str(folder)!r} do not match the MAGVIT-v2 "
                f"architecture of its config.json (missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape {wrong_shape[:5]}; {len(missing)}/{len(unexpected)}/{len(wrong_shape)} in total)"
            )
        model.load_state_dict(state, strict=True)
        return model
