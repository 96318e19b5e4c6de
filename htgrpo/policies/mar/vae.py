"""MAR's KL-16 VAE (``kl16.ckpt``; the ``vae.*`` part of Harmon), with the released parameter names.

Written from the architecture description (reference/mar_grpo.md §2.2): the LDM ``AutoencoderKL`` with
``embed_dim=16``, ``ch=128``, ``ch_mult=(1, 1, 2, 2, 4)``, ``num_res_blocks=2``, encoder attention at the 16-px level,
decoder attention only in the middle block, ``double_z``. Stride 2^(levels−1) = 16, so a 256-px image becomes a 16×16×16
latent (512 px → 32×32). MAR works on ``scale · latent`` with scale 0.2325 (:data:`KL16_SCALE`)::

    image (B, 3, H, W) in [−1, 1] ─► encoder ─► quant_conv ─► (mean, logvar) ─► mode() or sample() ─► · scale ─► z
    z / scale ─► post_quant_conv ─► decoder ─► image in ≈[−1, 1]

Why our own module and not diffusers' ``AutoencoderKL``: diffusers' down blocks (``DownEncoderBlock2D``) have no
attention, but KL-16's encoder has two attention blocks at its last level (``encoder.down.4.attn.{0,1}``), so its
weights have no place there; diffusers' LDM key conversion covers the SD layout only. Here every parameter keeps the
released name (``encoder.down.{i}.block.{j}.norm1``, ``…attn.{j}.q``, ``quant_conv``, ``post_quant_conv``,
``decoder.up.{i}.upsample.conv`` …), so ``kl16.ckpt``'s ``model`` dict and Harmon's ``vae.*`` keys load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from htgrpo.config import ConfigError, require
from htgrpo.policies.conv_blocks import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample, group_norm

KL16_SCALE = 0.2325
"""MAR's latent scale factor: tokens = 0.2325 · VAE latent."""

KL16_HINT = ("MAR's KL-16 VAE is `kl16.ckpt` in the Hugging Face repo wusize/harmon (`huggingface-cli download "
             "wusize/harmon kl16.ckpt --local-dir <dir>`) or from https://github.com/LTH14/mar (`python util/download.py`); "
             "Harmon-1_5B's own model.safetensors already holds it under `vae.`.")


def swish(x: Tensor) -> Tensor:
    """x · sigmoid(x) (the LDM ``nonlinearity``)."""
    return x * torch.sigmoid(x)


def swish_resnet_block(in_channels: int, out_channels: int, dropout: float = 0.0) -> ResnetBlock:
    """LDM's ResnetBlock with this model's swish (x·sigmoid(x)): norm1 → swish → conv1 → norm2 → swish → dropout →
    conv2, plus the input (through a 1×1 ``nin_shortcut`` when the channel count changes)."""
    return ResnetBlock(in_channels, out_channels, dropout, activation=swish)


@dataclass
class KLVAEConfig:
    """Architecture of an LDM KL autoencoder (defaults: MAR's KL-16).

    ``attn_resolutions`` are pixel resolutions (relative to ``resolution``) whose encoder levels get attention
    blocks, as in LDM: 256 px → levels at 256, 128, 64, 32, 16 px, attention at 16 = the last level.
    """

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    scale: float = KL16_SCALE

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(c) for c in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        require(int(self.embed_dim) >= 1, "vae.embed_dim", f"must be >= 1, got {self.embed_dim}")
        require(int(self.ch) >= 32 and int(self.ch) % 32 == 0, "vae.ch",
                f"must be a multiple of 32 (GroupNorm uses 32 groups), got {self.ch}")
        require(len(self.ch_mult) >= 1, "vae.ch_mult", "must list at least one level")
        require(float(self.scale) > 0, "vae.scale", f"must be > 0, got {self.scale}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell: 2^(levels − 1) (16 for KL-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "KLVAEConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


class Encoder(nn.Module):
    """conv_in → per level: num_res_blocks × (ResnetBlock [+ AttnBlock]) [+ Downsample] → mid (block, attn, block) →
    norm_out → swish → conv_out (2·embed_dim channels: mean and log-variance)."""

    def __init__(self, c: KLVAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        in_mult = (1,) + c.ch_mult
        res = c.resolution
        self.down = nn.ModuleList()
        block_in = c.ch
        for level, mult in enumerate(c.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = c.ch * in_mult[level], c.ch * mult
            for _ in range(c.num_res_blocks):
                stage.block.append(swish_resnet_block(block_in, block_out, c.dropout))
                block_in = block_out
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = MidBlock(block_in, c.dropout, activation=swish)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * c.embed_dim, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in → mid (block, attn, block) → per level, coarsest first: (num_res_blocks + 1) × ResnetBlock
    [+ Upsample] → norm_out → swish → conv_out. No attention outside the middle block (KL-16's decoder)."""

    def __init__(self, c: KLVAEConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.embed_dim, block_in, 3, 1, 1)
        self.mid = MidBlock(block_in, c.dropout, activation=swish)
        stages: list[nn.Module] = []
        for level in reversed(range(len(c.ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()   # attn stays empty: the released names
            block_out = c.ch * c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(swish_resnet_block(block_in, block_out, c.dropout))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)       # up[0] is the finest level, as released
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class GaussianPosterior:
    """The encoder's diagonal Gaussian over latents: ``mean`` and ``logvar`` (clamped to [−30, 20]), (B, C, h, w)."""

    mean: Tensor
    logvar: Tensor

    def mode(self) -> Tensor:
        """The mean (Harmon encodes with ``mode()``)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + exp(logvar/2) · ε (MAR's training uses ``sample()``)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


class KLAutoencoder(nn.Module):
    """MAR's ``AutoencoderKL``: ``encoder``, ``quant_conv`` (2C → 2C), ``post_quant_conv`` (C → C), ``decoder``.

    :meth:`encode` gives the posterior of raw latents; :meth:`encode_tokens` / :meth:`decode_tokens` work on the
    scaled latents MAR sees (``scale`` = 0.2325 for KL-16).
    """

    def __init__(self, config: KLVAEConfig | None = None):
        super().__init__()
        self.config = config or KLVAEConfig()
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.embed_dim, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.embed_dim, 1)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def scale(self) -> float:
        return float(self.config.scale)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, images: Tensor) -> GaussianPosterior:
        """images (B, 3, H, W) in [−1, 1] (H, W multiples of the downsample factor) → posterior over raw latents."""
        f = self.downsample_factor
        if images.dim() != 4 or images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"images: expected (B, {self.config.in_channels}, H, W) with H, W multiples of {f}, got "
                             f"{tuple(images.shape)}")
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = moments.chunk(2, dim=1)
        return GaussianPosterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) → images (B, 3, h·f, w·f), ≈[−1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def encode_tokens(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """images → scale · latent (B, C, h, w): the posterior mean (Harmon) or a sample (MAR training)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale

    def decode_tokens(self, scaled_latents: Tensor) -> Tensor:
        """scale · latent (B, C, h, w) → images ≈[−1, 1]."""
        return self.decode(scaled_latents / self.scale)


def images_to_unit_range(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) → float in [−1, 1]."""
    return images.float() / 127.5 - 1.0


def unit_range_to_images(x: Tensor) -> Tensor:
    """Float ≈[−1, 1] → uint8, as Harmon's scripts write images: clamp(127.5·x + 128, 0, 255)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)


def load_kl16(path: str | Path, config: KLVAEConfig | None = None, key: str = "policy.vae_path") -> KLAutoencoder:
    """A :class:`KLAutoencoder` from MAR's ``kl16.ckpt`` (``torch.save({"model": state_dict})``; the LDM training
    extras such as ``loss.*`` are ignored) or a safetensors file of the same keys. Errors name ``key``."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / n for n in ("kl16.ckpt", "vae.safetensors", "diffusion_pytorch_model.safetensors")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise ConfigError(key, f"{path} holds no kl16.ckpt / vae.safetensors. {KL16_HINT}")
        path = found[0]
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist. {KL16_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, Mapping) else obj
    vae = KLAutoencoder(config)
    load_vae_state_dict(vae, state, source=str(path), key=key)
    return vae


def load_vae_state_dict(vae: KLAutoencoder, state: Mapping[str, Tensor], source: str,
                        key: str = "policy.pretrained") -> None:
    """Load the VAE's own keys from ``state`` (LDM training extras like ``loss.*`` are skipped); a missing or
    mis-shaped key is a ConfigError naming ``key`` and a few of the offending names."""
    own = vae.state_dict()
    missing = sorted(k for k in own if k not in state)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or shapes:
        raise ConfigError(key, f"{source}: VAE weights do not fit KL-VAE({vae.config.to_dict()}): "
                               f"{len(missing)} missing (e.g. {missing[:4]}), {len(shapes)} mis-shaped "
                               f"(e.g. {shapes[:2]}). {KL16_HINT}")
    vae.load_state_dict({k: state[k] for k in own}, strict=True)


__all__ = [
    "KL16_SCALE",
    "GaussianPosterior",
    "KLAutoencoder",
    "KLVAEConfig",
    "images_to_unit_range",
    "load_kl16",
    "load_vae_state_dict",
    "unit_range_to_images",
]
