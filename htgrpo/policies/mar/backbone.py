"""MAR: masked autoregressive image generation with a per-token diffusion head (Li et al., 2024).

Written from the architecture description (reference/mar_grpo.md §2.3, §2.6). Tokens are continuous vectors
``(B, L, D)``, L = seq_h·seq_w (a real MAR: KL-16 VAE latents, D = 16 on 16×16; the ShapesWorld toy: one 3-d colour
per cell). Masks are bool ``(B, L)`` with **True = masked (unknown)**. Readable top to bottom::

    condition ─► conditioner ─► (B, E) or (B, buffer, E) ──┐      (dropped / CFG-unconditional rows: fake_latent)
    tokens (B, L, D) ─► z_proj ─────────────────────────────┴─► [buffer ‖ tokens] + encoder_pos_embed_learned
        ─► z_proj_ln ─► keep buffer + visible tokens ─► encoder_blocks ─► encoder_norm              (MAE encoder)
        ─► decoder_embed ─► scatter back, mask_token at masked positions ─► + decoder_pos_embed_learned
        ─► decoder_blocks ─► decoder_norm ─► drop buffer ─► + diffusion_pos_embed_learned ─► z (B, L, Dz)
    z[masked] ─► diffloss (DiffusionHead) ─► tokens                                              (MAE decoder + head)

Parameter names are LTH14's exactly (``z_proj``, ``z_proj_ln``, ``encoder_pos_embed_learned``, ``encoder_blocks.{i}``
(timm ``Block``), ``encoder_norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed_learned``,
``decoder_blocks.{i}``, ``decoder_norm``, ``diffusion_pos_embed_learned``, ``class_emb``, ``fake_latent``,
``diffloss.net.*``), so LTH14 and Harmon checkpoints load (see :mod:`htgrpo.policies.mar.checkpoints`).

Conditioning goes through a :class:`BufferConditioner` registered under its own ``module_name``: the
:class:`ClassConditioner` *is* LTH14's ``class_emb`` (an embedding table); :class:`TextConditioner` is a small text
encoder. The unconditional embedding (label drop in training, the unconditional CFG branch, and Harmon's buffer
fill) is always MAR's ``fake_latent``, shared by every conditioner.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from htgrpo.config import ConfigError, require, require_choice, require_range
from htgrpo.policies.mar.head import DiffusionHead

CONDITIONINGS = ("class", "text", "none")
POS_EMBED_INTERPOLATIONS = ("bilinear", "bicubic")
TEXT_POOLINGS = ("mean", "tokens")

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MARConfig:
    """Architecture and training knobs of a MAR model (names follow LTH14's ``main_mar.py`` flags where they exist).

    LTH14's ``img_size/vae_stride/patch_size`` become the token grid ``seq_h × seq_w`` (256/16/1 → 16×16) and
    ``vae_embed_dim·patch_size²`` becomes ``token_embed_dim``. Presets: :meth:`preset` (``mar_base|large|huge``).
    """

    seq_h: int = 16
    """Token rows."""
    seq_w: int = 16
    """Token columns."""
    token_embed_dim: int = 16
    """D: channels of one token (VAE latent channels × patch²)."""
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    """Condition tokens prepended to the sequence (never masked)."""
    conditioning: str = "class"
    """``class`` (LTH14 class_emb), ``text`` (:class:`TextConditioner`) or ``none`` (buffer = fake_latent, Harmon)."""
    num_classes: int = 1000
    """Rows of class_emb (``conditioning=class``)."""
    label_drop_prob: float = 0.1
    """Training: probability of replacing a row's condition by fake_latent (for CFG)."""
    mask_ratio_min: float = 0.7
    """Training mask ratio ~ truncated N(1, 0.25²) on [mask_ratio_min, 1]."""
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_d: int = 3
    """Residual blocks of the diffusion head."""
    diffloss_w: int = 1024
    """Width of the diffusion head."""
    num_sampling_steps: str = "100"
    """Respacing of the head's sampling chain ("100", "25", "ddim25")."""
    diffusion_batch_mul: int = 4
    """Training: each masked token is scored this many times with independent t and noise."""
    grad_checkpointing: bool = False
    # -- TextConditioner (conditioning="text") --
    text_vocab_size: int = 0
    text_max_len: int = 32
    text_width: int = 256
    text_depth: int = 2
    text_num_heads: int = 4
    text_pooling: str = "mean"
    """``mean`` (masked mean → one vector broadcast over the buffer) or ``tokens`` (one buffer slot per text token;
    needs text_max_len <= buffer_size)."""
    text_pad_id: int = 0
    condition_to_latent: bool = False
    """Also add Linear(mean over the buffer of the condition embedding) to every z: a direct path from the caption to
    the head (not in LTH14/Harmon; off = their numerics). A tiny toy MAR trained for minutes otherwise learns z almost
    independent of its caption."""

    def __post_init__(self) -> None:
        self.num_sampling_steps = str(self.num_sampling_steps)
        for key in ("seq_h", "seq_w", "token_embed_dim", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "diffloss_d", "diffloss_w",
                    "diffusion_batch_mul"):
            value = getattr(self, key)
            require(int(value) == value and int(value) >= 1, key, f"must be an integer >= 1, got {value!r}")
        require(int(self.buffer_size) >= 0, "buffer_size", f"must be >= 0, got {self.buffer_size}")
        require(self.encoder_embed_dim % self.encoder_num_heads == 0, "encoder_num_heads",
                f"must divide encoder_embed_dim={self.encoder_embed_dim}, got {self.encoder_num_heads}")
        require(self.decoder_embed_dim % self.decoder_num_heads == 0, "decoder_num_heads",
                f"must divide decoder_embed_dim={self.decoder_embed_dim}, got {self.decoder_num_heads}")
        require(float(self.mlp_ratio) > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        require_choice(self.conditioning, CONDITIONINGS, "conditioning")
        if self.conditioning == "class":
            require(int(self.num_classes) >= 1, "num_classes",
                    f"must be >= 1 with conditioning='class', got {self.num_classes}")
        if self.conditioning == "text":
            require(int(self.text_vocab_size) >= 1, "text_vocab_size",
                    f"must be >= 1 with conditioning='text', got {self.text_vocab_size}")
            require(int(self.text_max_len) >= 1, "text_max_len", f"must be >= 1, got {self.text_max_len}")
            require(int(self.text_depth) >= 1, "text_depth", f"must be >= 1, got {self.text_depth}")
            require(self.text_width % self.text_num_heads == 0, "text_num_heads",
                    f"must divide text_width={self.text_width}, got {self.text_num_heads}")
            require_choice(self.text_pooling, TEXT_POOLINGS, "text_pooling")
            if self.text_pooling == "tokens":
                require(self.text_max_len <= self.buffer_size, "text_max_len",
                        f"must be <= buffer_size={self.buffer_size} with text_pooling='tokens', got "
                        f"{self.text_max_len}")
        if self.conditioning != "none":
            require(int(self.buffer_size) >= 1, "buffer_size", "must be >= 1 for a conditional model")
        require_range(float(self.label_drop_prob), "label_drop_prob", 0.0, 1.0)
        require_range(float(self.mask_ratio_min), "mask_ratio_min", 0.0, 1.0)
        require_range(float(self.attn_dropout), "attn_dropout", 0.0, 1.0, high_inclusive=False)
        require_range(float(self.proj_dropout), "proj_dropout", 0.0, 1.0, high_inclusive=False)

    @property
    def seq_len(self) -> int:
        """L = seq_h · seq_w."""
        return self.seq_h * self.seq_w

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MARConfig":
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown MARConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "MARConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MARConfig":
        """LTH14's released models (``mar_base``, ``mar_large``, ``mar_huge``; DiffLoss (d, w) as released)."""
        require_choice(name, tuple(MAR_PRESETS), "model")
        return cls(**{**MAR_PRESETS[name], **overrides})


MAR_PRESETS: dict[str, dict[str, Any]] = {
    "mar_base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
                     decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024),
    "mar_large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16, decoder_embed_dim=1024,
                      decoder_depth=16, decoder_num_heads=16, diffloss_d=8, diffloss_w=1280),
    "mar_huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16, decoder_embed_dim=1280,
                     decoder_depth=20, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536),
}
"""LTH14's model sizes (reference/mar_grpo.md §2.1)."""


# ----------------------------------------------------------------------------------------------------------------
# Conditioners
# ----------------------------------------------------------------------------------------------------------------


class BufferConditioner(nn.Module, ABC):
    """Turns a condition into what fills MAR's buffer tokens.

    ``forward(condition)`` returns either one vector per row, (B, E), which MAR broadcasts into all ``buffer_size``
    buffer tokens (LTH14 writes the class embedding into every buffer slot; the buffer position embeddings then tell
    them apart), or per-slot vectors (B, buffer_size, E). E = MAR's ``encoder_embed_dim``.

    A conditioner is registered inside MAR under ``module_name`` so its parameters keep stable checkpoint names.
    The unconditional embedding is MAR's ``fake_latent``, not the conditioner's.
    """

    module_name: ClassVar[str] = "conditioner"
    embed_dim: int

    @abstractmethod
    def forward(self, condition: Any) -> Tensor:
        """(B, E) or (B, buffer_size, E)."""

    @abstractmethod
    def batch_size(self, condition: Any) -> int:
        """B of a condition."""


class ClassConditioner(BufferConditioner):
    """LTH14's class embedding table: labels (B,) long ↦ class_emb[labels] (B, E). Registered as ``class_emb`` so
    its weight is ``class_emb.weight`` exactly."""

    module_name: ClassVar[str] = "class_emb"

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        require(int(num_classes) >= 1, "num_classes", f"must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.weight = nn.Parameter(torch.zeros(self.num_classes, self.embed_dim))
        nn.init.normal_(self.weight, std=0.02)

    def batch_size(self, condition: Tensor) -> int:
        return int(torch.as_tensor(condition).shape[0])

    def forward(self, condition: Tensor) -> Tensor:
        labels = torch.as_tensor(condition, device=self.weight.device)
        if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"condition: class labels must be an integer tensor (B,), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"condition: class labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return F.embedding(labels.long(), self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_classes}, {self.embed_dim}"


@dataclass
class TextCondition:
    """Token ids (B, T) long and an optional padding mask (B, T) (1/True = real token; default: ids != pad_id)."""

    input_ids: Tensor
    attention_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> "TextCondition":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return TextCondition(self.input_ids.to(device), mask)


class TextConditioner(BufferConditioner):
    """A small text encoder filling the buffer: word embedding + learned positions → ``depth`` timm Blocks (padding
    keys masked out) → LayerNorm → Linear(width → E).

    ``pooling="mean"``: the masked mean over real tokens, (B, E), broadcast over the buffer by MAR.
    ``pooling="tokens"``: per-token vectors in the first T buffer slots, (B, buffer_size, E); padding tokens and the
    slots after the text hold the learned ``pad_embed``.
    The unconditional branch (CFG, dropped captions) uses MAR's ``fake_latent`` like every conditioner.
    """

    module_name: ClassVar[str] = "text_encoder"

    def __init__(self, vocab_size: int, embed_dim: int, buffer_size: int, width: int = 256, depth: int = 2,
                 num_heads: int = 4, max_len: int = 32, pooling: str = "mean", pad_id: int = 0,
                 mlp_ratio: float = 4.0):
        super().__init__()
        require(int(vocab_size) >= 1, "text_vocab_size", f"must be >= 1, got {vocab_size}")
        require_choice(pooling, TEXT_POOLINGS, "text_pooling")
        if pooling == "tokens":
            require(max_len <= buffer_size, "text_max_len",
                    f"must be <= buffer_size={buffer_size} with pooling='tokens', got {max_len}")
        self.embed_dim = int(embed_dim)
        self.buffer_size = int(buffer_size)
        self.max_len = int(max_len)
        self.pooling = pooling
        self.pad_id = int(pad_id)
        self.tok_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.max_len, width))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(width)
        self.proj = nn.Linear(width, self.embed_dim)
        self.pad_embed = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if pooling == "tokens" else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.pad_embed is not None:
            nn.init.normal_(self.pad_embed, std=0.02)

    def _unpack(self, condition: TextCondition | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(condition, TextCondition):
            ids, keep = condition.input_ids, condition.attention_mask
        elif isinstance(condition, Tensor):
            ids, keep = condition, None
        else:
            raise ValueError(f"condition: expected TextCondition or a LongTensor of ids (B, T), got "
                             f"{type(condition).__name__}")
        ids = ids.to(self.tok_embed.weight.device)
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"condition: input_ids must be an integer tensor (B, T), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"condition: text length {ids.shape[1]} exceeds text_max_len={self.max_len}")
        keep = (ids != self.pad_id) if keep is None else keep.to(ids.device).bool()
        if keep.shape != ids.shape:
            raise ValueError(f"condition: attention_mask shape {tuple(keep.shape)} != input_ids {tuple(ids.shape)}")
        return ids.long(), keep

    def batch_size(self, condition: TextCondition | Tensor) -> int:
        ids = condition.input_ids if isinstance(condition, TextCondition) else condition
        return int(ids.shape[0])

    def forward(self, condition: TextCondition | Tensor) -> Tensor:
        ids, keep = self._unpack(condition)
        B, T = ids.shape
        h = self.tok_embed(ids) + self.pos_embed[:, :T]
        # additive key mask (B, 1, 1, T): 0 for real tokens, a large negative number for padding
        bias = torch.zeros(B, 1, 1, T, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(h.dtype).min / 2)
        for block in self.blocks:
            h = block(h, attn_mask=bias)
        h = self.proj(self.norm(h))                                              # (B, T, E)
        if self.pooling == "mean":
            w = keep.to(h.dtype).unsqueeze(-1)
            return (h * w).sum(1) / w.sum(1).clamp(min=1.0)                      # (B, E)
        pad = self.pad_embed.to(h.dtype)
        h = torch.where(keep.unsqueeze(-1), h, pad.expand(B, T, -1))
        return torch.cat([h, pad.expand(B, self.buffer_size - T, -1)], dim=1)   # (B, buffer_size, E)


def build_conditioner(config: MARConfig) -> BufferConditioner | None:
    """The conditioner ``config.conditioning`` names (None for ``none``)."""
    if config.conditioning == "class":
        return ClassConditioner(config.num_classes, config.encoder_embed_dim)
    if config.conditioning == "text":
        return TextConditioner(config.text_vocab_size, config.encoder_embed_dim, config.buffer_size,
                               width=config.text_width, depth=config.text_depth, num_heads=config.text_num_heads,
                               max_len=config.text_max_len, pooling=config.text_pooling, pad_id=config.text_pad_id,
                               mlp_ratio=config.mlp_ratio)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Latent grid <-> token sequence, position-embedding interpolation
# ----------------------------------------------------------------------------------------------------------------


def patchify(latents: Tensor, patch_size: int = 1) -> Tensor:
    """(B, C, H, W) → (B, (H/p)·(W/p), C·p·p), row-major over the token grid, channels ordered (c, p, q) as LTH14.

    With p = 1 (MAR, Harmon, ShapesWorld) this is ``latents.flatten(2).transpose(1, 2)``.
    """
    B, C, H, W = latents.shape
    p = int(patch_size)
    if H % p or W % p:
        raise ValueError(f"patch_size: {p} must divide the latent size {H}x{W}")
    x = latents.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, seq_h: int, seq_w: int, patch_size: int = 1) -> Tensor:
    """Inverse of :func:`patchify`: (B, seq_h·seq_w, C·p·p) → (B, C, seq_h·p, seq_w·p)."""
    B, L, D = tokens.shape
    p = int(patch_size)
    if L != seq_h * seq_w or D % (p * p):
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not fit a {seq_h}x{seq_w} grid of "
                         f"patch_size {p}")
    C = D // (p * p)
    x = tokens.reshape(B, seq_h, seq_w, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, seq_h * p, seq_w * p)


def interpolate_pos_embed(pos_embed: Tensor, num_prefix: int, old_hw: tuple[int, int], new_hw: tuple[int, int],
                          mode: str = "bicubic") -> Tensor:
    """Resize a learned position embedding (1, P + h·w, C) to (1, P + h'·w', C).

    The first ``num_prefix`` rows (MAR's buffer) are kept as they are; the grid part is resampled over the 2-d token
    grid with ``F.interpolate(mode, align_corners=False)`` (bicubic by default; Harmon uses bilinear).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected (1, N, C), got {tuple(pos_embed.shape)}")
    (oh, ow), (nh, nw) = old_hw, new_hw
    if pos_embed.shape[1] != num_prefix + oh * ow:
        raise ValueError(f"pos_embed: {pos_embed.shape[1]} rows != num_prefix {num_prefix} + {oh}x{ow}")
    if (oh, ow) == (nh, nw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    C = pos_embed.shape[-1]
    grid = grid.reshape(1, oh, ow, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(nh, nw), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# MAR
# ----------------------------------------------------------------------------------------------------------------


class MAR(nn.Module):
    """The MAR model: MAE-style encoder/decoder producing one condition vector z per position, and the diffusion head.

    Args:
        config: :class:`MARConfig`.
        conditioner: overrides the one ``config.conditioning`` would build (its ``embed_dim`` must equal
            ``encoder_embed_dim``).
    """

    def __init__(self, config: MARConfig, conditioner: BufferConditioner | None = None):
        super().__init__()
        c = self.config = config
        self.seq_h, self.seq_w, self.seq_len = c.seq_h, c.seq_w, c.seq_len
        self.token_embed_dim = c.token_embed_dim
        self.buffer_size = c.buffer_size
        E, Dd = c.encoder_embed_dim, c.decoder_embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # -- conditioning (class_emb / text_encoder) and the unconditional embedding --
        conditioner = build_conditioner(c) if conditioner is None else conditioner
        self._conditioner_name: str | None = None
        if conditioner is not None:
            if conditioner.embed_dim != E:
                raise ValueError(f"conditioner: embed_dim {conditioner.embed_dim} != encoder_embed_dim {E}")
            self.add_module(conditioner.module_name, conditioner)
            self._conditioner_name = conditioner.module_name
        self.fake_latent = nn.Parameter(torch.zeros(1, E))

        # -- MAE encoder --
        self.z_proj = nn.Linear(c.token_embed_dim, E)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.buffer_size + c.seq_len, E))
        self.encoder_blocks = nn.ModuleList(
            Block(E, c.encoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  proj_drop=c.proj_dropout, attn_drop=c.attn_dropout) for _ in range(c.encoder_depth))
        self.encoder_norm = norm_layer(E)

        # -- MAE decoder --
        self.decoder_embed = nn.Linear(E, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.buffer_size + c.seq_len, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  proj_drop=c.proj_dropout, attn_drop=c.attn_dropout) for _ in range(c.decoder_depth))
        self.decoder_norm = norm_layer(Dd)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, Dd))
        self.condition_latent_proj = nn.Linear(E, Dd) if c.condition_to_latent else None
        self._initialize_core()

        # -- diffusion head --
        self.diffloss = DiffusionHead(target_channels=c.token_embed_dim, z_channels=Dd, depth=c.diffloss_d,
                                      width=c.diffloss_w, num_sampling_steps=c.num_sampling_steps,
                                      grad_checkpointing=c.grad_checkpointing)

    def _initialize_core(self) -> None:
        """N(0, 0.02) for fake_latent, mask_token and position embeddings; xavier-uniform linears with zero bias;
        LayerNorms (1, 0). The conditioner and the head initialise themselves."""
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        skip = set() if self.conditioner is None else {id(m) for m in self.conditioner.modules()}
        for module in self.modules():
            if id(module) in skip:
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- conditioning -------------------------------------------------------------------------------------------

    @property
    def conditioner(self) -> BufferConditioner | None:
        return None if self._conditioner_name is None else getattr(self, self._conditioner_name)

    @property
    def encoder_embed_dim(self) -> int:
        return self.config.encoder_embed_dim

    @property
    def decoder_embed_dim(self) -> int:
        return self.config.decoder_embed_dim

    def unconditional_embedding(self, batch_size: int, like: Tensor | None = None) -> Tensor:
        """``fake_latent`` broadcast to (B, E), or to ``like``'s shape ((B, E) or (B, buffer_size, E))."""
        if like is None:
            return self.fake_latent.expand(batch_size, -1)
        if like.dim() == 2:
            return self.fake_latent.expand(like.shape[0], -1)
        return self.fake_latent.unsqueeze(1).expand(like.shape[0], like.shape[1], -1)

    def condition_embedding(self, condition: Any = None, batch_size: int | None = None,
                            drop: Tensor | None = None) -> Tensor:
        """What fills the buffer: the conditioner's output, with rows where ``drop`` (B,) is True replaced by
        ``fake_latent``. Without a conditioner (or ``condition=None``) every row is ``fake_latent`` and
        ``batch_size`` is required."""
        cond = self.conditioner
        if cond is None or condition is None:
            if batch_size is None:
                raise ValueError("batch_size: required when there is no condition (unconditional model or "
                                 "condition=None)")
            return self.unconditional_embedding(batch_size)
        emb = cond(condition)
        if batch_size is not None and emb.shape[0] != batch_size:
            raise ValueError(f"condition: batch {emb.shape[0]} != batch_size {batch_size}")
        if drop is not None:
            drop = drop.to(emb.device).bool().view(-1, *([1] * (emb.dim() - 1)))
            emb = torch.where(drop, self.unconditional_embedding(emb.shape[0], like=emb).to(emb.dtype), emb)
        return emb

    def _buffer(self, embedding: Tensor, batch_size: int) -> Tensor:
        """(B, E) → broadcast over the buffer; (B, buffer_size, E) as is."""
        E = self.config.encoder_embed_dim
        if embedding.dim() == 2 and embedding.shape == (batch_size, E):
            return embedding.unsqueeze(1).expand(batch_size, self.buffer_size, E)
        if embedding.dim() == 3 and embedding.shape == (batch_size, self.buffer_size, E):
            return embedding
        raise ValueError(f"condition_embedding: expected ({batch_size}, {E}) or ({batch_size}, {self.buffer_size}, "
                         f"{E}), got {tuple(embedding.shape)}")

    # -- orders and masks ---------------------------------------------------------------------------------------

    def random_orders(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """(B, L) long: an independent uniformly random permutation of the L positions per row."""
        device = device if device is not None else self.fake_latent.device
        return torch.rand(batch_size, self.seq_len, generator=generator, device=device).argsort(dim=1)

    def sample_mask_rate(self, generator: torch.Generator | None = None) -> float:
        """r ~ N(1, 0.25²) truncated to [mask_ratio_min, 1] (inverse-CDF sampling, reproducible from ``generator``)."""
        lo = (self.config.mask_ratio_min - 1.0) / 0.25
        cdf_lo = float(torch.special.ndtr(torch.tensor(lo, dtype=torch.float64)))
        u = torch.rand((), generator=generator, dtype=torch.float64, device=getattr(generator, "device", "cpu"))
        u = cdf_lo + (0.5 - cdf_lo) * float(u)
        rate = 1.0 + 0.25 * float(torch.special.ndtri(torch.tensor(u, dtype=torch.float64)))
        return min(max(rate, self.config.mask_ratio_min), 1.0)

    def random_masking(self, tokens: Tensor, orders: Tensor, generator: torch.Generator | None = None,
                       mask_rate: float | None = None) -> Tensor:
        """(B, L) bool training mask: the first ceil(L·r) positions of each row's order are masked (True).

        One rate r per batch (:meth:`sample_mask_rate` unless ``mask_rate`` is given), so every row masks the same
        number of tokens (the encoder drops them and needs equal lengths).
        """
        B, L = tokens.shape[:2]
        if orders.shape != (B, L):
            raise ValueError(f"orders: expected ({B}, {L}), got {tuple(orders.shape)}")
        rate = self.sample_mask_rate(generator) if mask_rate is None else float(mask_rate)
        num_masked = min(max(int(math.ceil(L * rate)), 1), L)
        mask = torch.zeros(B, L, dtype=torch.bool, device=tokens.device)
        return mask.scatter(1, orders[:, :num_masked].to(tokens.device), True)

    # -- encoder / decoder --------------------------------------------------------------------------------------

    def _check_tokens(self, tokens: Tensor, mask: Tensor) -> None:
        expected = (self.seq_len, self.token_embed_dim)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens: expected (B, {expected[0]}, {expected[1]}), got {tuple(tokens.shape)}")
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask: expected {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for block in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_mae_encoder(self, tokens: Tensor, mask: Tensor, condition_embedding: Tensor) -> Tensor:
        """(B, L, D) tokens, (B, L) bool mask, buffer embedding → (B, buffer + #visible, E).

        x = z_proj_ln([buffer ‖ z_proj(tokens)] + encoder_pos_embed_learned), keep the buffer and the visible
        tokens, then encoder_blocks and encoder_norm. Every row must have the same number of masked tokens.
        """
        self._check_tokens(tokens, mask)
        B = tokens.shape[0]
        x = self.z_proj(tokens)
        buffer = self._buffer(condition_embedding, B).to(x.dtype)
        x = torch.cat([buffer, x], dim=1) + self.grid_pos_embed("encoder_pos_embed_learned")
        x = self.z_proj_ln(x)
        keep = self._keep_with_buffer(mask)
        x = x[keep].reshape(B, -1, x.shape[-1])
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)

    def _keep_with_buffer(self, mask: Tensor) -> Tensor:
        B = mask.shape[0]
        keep = torch.cat([torch.ones(B, self.buffer_size, dtype=torch.bool, device=mask.device), ~mask.bool()], 1)
        counts = keep.sum(dim=1)
        if B and bool((counts != counts[0]).any()):
            raise ValueError(f"mask: every row must mask the same number of tokens, got visible counts "
                             f"{(counts - self.buffer_size).tolist()}")
        return keep

    def forward_mae_decoder(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encoder output, (B, L) bool mask → z (B, L, Dz).

        decoder_embed, scatter back into the full sequence with ``mask_token`` at masked positions, +
        decoder_pos_embed_learned, decoder_blocks, decoder_norm, drop the buffer, + diffusion_pos_embed_learned.
        """
        B = mask.shape[0]
        x = self.decoder_embed(x)
        keep = self._keep_with_buffer(mask)
        full = self.mask_token.to(x.dtype).repeat(B, self.buffer_size + self.seq_len, 1)
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.grid_pos_embed("decoder_pos_embed_learned")
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.grid_pos_embed("diffusion_pos_embed_learned")

    def ar_latents(self, tokens: Tensor, mask: Tensor, condition_embedding: Tensor) -> Tensor:
        """z (B, L, Dz) for every position given the known tokens (encoder + decoder, no head); with
        ``condition_to_latent``, z + condition_latent_proj(mean over the buffer of the condition embedding)."""
        z = self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, condition_embedding), mask)
        if self.condition_latent_proj is not None:
            pooled = self._buffer(condition_embedding, tokens.shape[0]).mean(dim=1)            # (B, E)
            z = z + self.condition_latent_proj(pooled.to(z.dtype)).unsqueeze(1)
        return z

    def guided_ar_latents(self, tokens: Tensor, mask: Tensor, condition_embedding: Tensor,
                          unconditional_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """(z_cond, z_uncond), each (B, L, Dz): one encoder/decoder pass over the stacked batch [cond; uncond] (the
        CFG branches share tokens and mask). Policies whose condition is not a buffer tensor (Harmon's prompt KV
        cache) implement the same method."""
        z = self.ar_latents(torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                            torch.cat([condition_embedding, unconditional_embedding]))
        z_cond, z_uncond = z.chunk(2, dim=0)
        return z_cond, z_uncond

    # -- training ------------------------------------------------------------------------------------------------

    def forward_loss(self, z: Tensor, target: Tensor, mask: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """Diffusion loss on the masked positions; every token is repeated ``diffusion_batch_mul`` times (independent
        t and noise). z (B, L, Dz), target (B, L, D), mask (B, L)."""
        B, L, _ = target.shape
        mul = self.config.diffusion_batch_mul
        target = target.reshape(B * L, -1).repeat(mul, 1)
        z = z.reshape(B * L, -1).repeat(mul, 1)
        mask = mask.reshape(B * L).repeat(mul)
        return self.diffloss.loss(target, z, mask, generator=generator)

    def forward(self, tokens: Tensor, condition: Any = None, generator: torch.Generator | None = None) -> Tensor:
        """Training loss (scalar): random order, truncated-normal mask ratio, label drop with ``label_drop_prob``
        (training mode only), encoder/decoder, diffusion loss on masked tokens."""
        B = tokens.shape[0]
        orders = self.random_orders(B, generator, device=tokens.device)
        mask = self.random_masking(tokens, orders, generator)
        drop = None
        if self.training and self.config.label_drop_prob > 0:
            drop = torch.rand(B, generator=generator, device=tokens.device) < self.config.label_drop_prob
        emb = self.condition_embedding(condition, batch_size=B, drop=drop)
        target = tokens.detach()
        z = self.ar_latents(tokens, mask, emb)
        return self.forward_loss(z, target, mask, generator)

    # -- resolution ----------------------------------------------------------------------------------------------

    def set_generation_grid(self, seq_h: int, seq_w: int, mode: str = "bilinear") -> None:
        """Generate on a ``seq_h × seq_w`` token grid while the learned position embeddings stay at the config's grid
        (Harmon: weights for 16×16, images at 512 px = 32×32): every forward interpolates them on the fly with
        ``mode`` (Harmon: bilinear), so gradients reach the stored embeddings and a saved state dict keeps the
        released shapes. :meth:`resize_grid` instead resizes the parameters once."""
        if mode not in POS_EMBED_INTERPOLATIONS:
            raise ConfigError("pos_embed_interpolation", f"must be one of {list(POS_EMBED_INTERPOLATIONS)}, got {mode!r}")
        require(int(seq_h) >= 1 and int(seq_w) >= 1, "image_size", f"token grid must be >= 1x1, got {seq_h}x{seq_w}")
        self.seq_h, self.seq_w, self.seq_len = int(seq_h), int(seq_w), int(seq_h) * int(seq_w)
        self._pos_embed_mode = mode

    def grid_pos_embed(self, name: str) -> Tensor:
        """The learned position embedding ``name`` at the generation grid (the parameter itself when the grids
        agree; otherwise interpolated from the config's grid, buffer rows kept)."""
        param = getattr(self, name)
        source = (self.config.seq_h, self.config.seq_w)
        if source == (self.seq_h, self.seq_w):
            return param
        prefix = 0 if name == "diffusion_pos_embed_learned" else self.buffer_size
        return interpolate_pos_embed(param, prefix, source, (self.seq_h, self.seq_w),
                                     getattr(self, "_pos_embed_mode", "bilinear"))

    def resize_grid(self, seq_h: int, seq_w: int, mode: str = "bicubic") -> None:
        """Change the token grid in place, interpolating the three learned position embeddings (buffer rows kept)."""
        old = (self.seq_h, self.seq_w)
        new = (int(seq_h), int(seq_w))
        if old == new:
            return
        with torch.no_grad():
            for name, prefix in (("encoder_pos_embed_learned", self.buffer_size),
                                 ("decoder_pos_embed_learned", self.buffer_size),
                                 ("diffusion_pos_embed_learned", 0)):
                param = getattr(self, name)
                resized = interpolate_pos_embed(param.data, prefix, old, new, mode)
                setattr(self, name, nn.Parameter(resized, requires_grad=param.requires_grad))
        self.config = self.config.replace(seq_h=new[0], seq_w=new[1])
        self.seq_h, self.seq_w, self.seq_len = new[0], new[1], new[0] * new[1]


__all__ = [
    "MAR",
    "MARConfig",
    "MAR_PRESETS",
    "BufferConditioner",
    "ClassConditioner",
    "TextCondition",
    "TextConditioner",
    "build_conditioner",
    "interpolate_pos_embed",
    "patchify",
    "unpatchify",
]
