"""The ShapesWorld MAR policy: a tiny text-conditioned MAR whose continuous tokens are cell colours.

Tokens: one vector per cell of the grid, by ``token_code``: the palette RGB scaled to [−1, 1] (``rgb``, 3-d) or a
±1 one-hot of the palette index (``onehot``, one channel per colour), times ``token_scale``. A
ground-truth image is encoded through the palette image tokenizer (codes → palette vectors); generated tokens are
decoded to the **nearest palette colour** and then through the same tokenizer, so a MAR image is exactly the uint8
image the LLaDA toy policy would produce from those codes (and is scored by the same detector).

Text: the word-level tokenizer of the LLaDA toy (:class:`~htgrpo.policies.tokenizers.WordTextTokenizer`, left-padded)
feeds MAR's :class:`~htgrpo.policies.mar.backbone.TextConditioner`, which fills the buffer tokens.

Sampling goes through :class:`~htgrpo.policies.mar.sampling.MARSamplerSettings` (``conf/sampler/mar.yaml``); its ``sample`` returns a
:class:`MARSampled` whose ``codes`` are palette indices, so :class:`~htgrpo.policies.generators.PolicyImageGenerator`
(validation, ``htgrpo.evaluate``) works with a MAR policy unchanged.

Folder format (``save_pretrained`` / ``from_pretrained``)::

    policy.json            {"type": "shapes_mar", ...}
    config.json            {"mar": MARConfig fields, "token_scale": s, "token_code": "rgb" | "onehot"}
    model.safetensors      MAR state_dict (LTH14 names: z_proj, encoder_blocks.*, diffloss.net.*, text_encoder.*)
    text_tokenizer.json    word vocabulary
    image_tokenizer.json   palette tokenizer (grid, cell size, palette)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from htgrpo.config import ConfigError, require, require_choice, require_range
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.mar.backbone import MAR, MARConfig, TextCondition
from htgrpo.policies.mar.diffusion import GaussianDiffusion, create_diffusion
# The sampler settings live with the generic sampling loop; re-exported here for existing imports.
from htgrpo.policies.mar.sampling import MARSampled, MARSamplerSettings, require_mar_sampler
from htgrpo.policies.mar.wrapper import WrapsMAR
from htgrpo.policies.tokenizers import PaletteImageTokenizer, WordTextTokenizer

POLICY_FILE = "policy.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
POLICY_TYPE = "shapes_mar"
POS_EMBED_INITS = ("sincos", "random")


def sincos_2d_embedding(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """(grid_h·grid_w, dim) MAE-style 2-d sin-cos position embedding, row-major: half the channels encode the row,
    half the column, each as [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-d sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    parts = []
    for pos in (rows, cols):
        angle = pos[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


# ----------------------------------------------------------------------------------------------------------------
# Tokens <-> palette
# ----------------------------------------------------------------------------------------------------------------


TOKEN_CODES = ("rgb", "onehot")


def palette_code_vectors(palette_rgb: Tensor, code: str, scale: float) -> Tensor:
    """(K, D) continuous token of every palette colour.

    ``rgb``    (D = 3):  v_k = (RGB_k / 127.5 − 1)·scale. Neighbouring colours (orange/yellow, red/brown) sit ~0.5·scale
               apart, and the background grey is the centre of the cube, i.e. the mean of a spread of colours.
    ``onehot`` (D = K):  v_k = (2·e_k − 1)·scale, every colour a corner of the ±scale cube; all pairs are 2√2·scale
               apart and no blend of colours is itself a colour (tokens stay continuous; decoding is still nearest).
    """
    require_choice(code, TOKEN_CODES, "token_code")
    if code == "rgb":
        return (palette_rgb.float() / 127.5 - 1.0) * float(scale)
    num_colours = int(palette_rgb.shape[0])
    return (2.0 * torch.eye(num_colours) - 1.0) * float(scale)


class PaletteTokenCodec:
    """Continuous cell tokens <-> palette codes (``code``: see :func:`palette_code_vectors`), times ``scale``."""

    def __init__(self, image_tokenizer: PaletteImageTokenizer, scale: float = 1.0, code: str = "rgb"):
        require(float(scale) > 0, "token_scale", f"must be > 0, got {scale}")
        self.image_tokenizer = image_tokenizer
        self.scale = float(scale)
        self.code = str(code)
        self.vectors = palette_code_vectors(image_tokenizer.palette, self.code, self.scale)  # (K, D)

    @property
    def token_dim(self) -> int:
        return int(self.vectors.shape[1])

    def codes_to_tokens(self, codes: Tensor) -> Tensor:
        """(B, N) palette codes → (B, N, D) float tokens."""
        return self.vectors.to(codes.device)[codes.long()]

    def tokens_to_codes(self, tokens: Tensor) -> Tensor:
        """(B, N, D) tokens → (B, N) nearest palette code (Euclidean)."""
        vec = self.vectors.to(device=tokens.device, dtype=tokens.dtype)
        dist = ((tokens.unsqueeze(-2) - vec) ** 2).sum(-1)  # (B, N, K)
        return dist.argmin(-1)

    def encode(self, images: Tensor) -> Tensor:
        """uint8 images (B, 3, H, W) → (B, N, D) tokens (lossless on ShapesWorld scenes)."""
        return self.codes_to_tokens(self.image_tokenizer.encode(images))

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, N, D) tokens → uint8 images (B, 3, H, W) via the nearest palette colour of every cell."""
        return self.image_tokenizer.decode(self.tokens_to_codes(tokens).cpu())


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MARTrainingLoss:
    loss: Tensor
    """MAR diffusion loss (MSE(ε) + VB) on the masked tokens."""
    mask_ratio: float
    """Fraction of tokens masked in this batch."""


class ShapesMARPolicy(WrapsMAR, nn.Module):
    """A text-conditioned :class:`MAR` + the palette token codec + the word tokenizer. ``mar`` holds every parameter.

    Args:
        mar: the MAR model (``conditioning="text"``; ``token_embed_dim`` = the code's width: 3 for ``rgb``, the
            palette size for ``onehot``).
        text_tokenizer: the word tokenizer (its vocabulary size must fit ``mar.config.text_vocab_size``).
        image_tokenizer: the palette image tokenizer (its grid must match ``seq_h × seq_w``).
        token_scale: tokens are the code vectors times this.
        token_code: ``rgb`` or ``onehot`` (:func:`palette_code_vectors`).
    """

    def __init__(self, mar: MAR, text_tokenizer: WordTextTokenizer, image_tokenizer: PaletteImageTokenizer,
                 token_scale: float = 1.0, token_code: str = "rgb"):
        super().__init__()
        c = mar.config
        if c.conditioning != "text":
            raise ValueError(f"ShapesMARPolicy needs a text-conditioned MAR, got conditioning={c.conditioning!r}")
        if (c.seq_h, c.seq_w) != (image_tokenizer.grid_size, image_tokenizer.grid_size):
            raise ValueError(f"MAR grid {c.seq_h}x{c.seq_w} != image tokenizer grid {image_tokenizer.grid_size}")
        codec = PaletteTokenCodec(image_tokenizer, token_scale, token_code)
        if c.token_embed_dim != codec.token_dim:
            raise ValueError(f"token_embed_dim must be {codec.token_dim} (token_code={token_code!r}), got "
                             f"{c.token_embed_dim}")
        if text_tokenizer.vocab_size > c.text_vocab_size:
            raise ValueError(f"text tokenizer has {text_tokenizer.vocab_size} words, MAR text_vocab_size is "
                             f"{c.text_vocab_size}")
        self.mar = mar
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.codec = codec
        self._diffusions: dict[str, GaussianDiffusion] = {}
        self._sampling_steps = str(c.num_sampling_steps)

    # -- properties (device, config, head, num_image_tokens: WrapsMAR) ------------------------------------------
    @property
    def token_scale(self) -> float:
        return self.codec.scale

    @property
    def token_code(self) -> str:
        return self.codec.code

    # -- inputs -------------------------------------------------------------------------------------------------
    def encode_prompts(self, texts: str | Sequence[str]) -> TextCondition:
        """Texts → :class:`TextCondition` (left-padded word ids + mask), on the policy's device."""
        ids, mask = self.text_tokenizer.encode(texts, max_length=self.config.text_max_len)
        return TextCondition(ids.to(self.device), mask.to(self.device))

    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 images → (B, L, D) tokens on the policy's device."""
        return self.codec.encode(images.cpu()).to(self.device)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, L, D) tokens → uint8 images (CPU)."""
        return self.codec.decode(tokens.detach())

    # -- the head's sampling chain: use_sampling_steps / sampling_steps (WrapsMAR) ------------------------------

    # -- supervised warm start ----------------------------------------------------------------------------------
    def training_loss(self, tokens: Tensor, condition: TextCondition, cond_dropout: float = 0.1,
                      generator: torch.Generator | None = None, mask_rate: float | None = None) -> MARTrainingLoss:
        """MAR's training objective with an explicit caption-drop probability (CFG)::

            random order per image, mask rate r ~ N(1, 0.25²) truncated to [mask_ratio_min, 1] (ceil(L·r) masked),
            caption replaced by fake_latent with probability cond_dropout, encoder/decoder → z,
            DiffLoss (MSE(ε) + VB) on the masked tokens, each repeated diffusion_batch_mul times.

        ``mask_rate`` (in (0, 1]) replaces MAR's truncated-normal draw of r for this batch (the warm start's
        ``mask_schedule``).
        """
        mar = self.mar
        B = tokens.shape[0]
        dev = tokens.device
        orders = mar.random_orders(B, generator, device=dev)
        mask = mar.random_masking(tokens, orders, generator, mask_rate=mask_rate)
        drop = None
        if cond_dropout > 0:
            drop = torch.rand(B, generator=generator, device=dev) < cond_dropout
        emb = mar.condition_embedding(condition, batch_size=B, drop=drop)
        z = mar.ar_latents(tokens, mask, emb)
        loss = mar.forward_loss(z, tokens.detach(), mask, generator)
        return MARTrainingLoss(loss=loss, mask_ratio=float(mask.float().mean()))

    # -- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the folder described in the module docstring."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.mar.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump({"mar": self.config.to_dict(), "token_scale": self.token_scale,
                       "token_code": self.token_code}, f, indent=2)
        self.text_tokenizer.save_pretrained(directory)
        self.image_tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump({"type": POLICY_TYPE, "text_tokenizer": type(self.text_tokenizer).__name__,
                       "image_tokenizer": type(self.image_tokenizer).__name__, "model": "MAR"}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config_key: str = "policy.pretrained_path"
                        ) -> "ShapesMARPolicy":
        """Load a folder written by :meth:`save_pretrained` (errors name ``config_key``)."""
        from safetensors.torch import load_file

        path = Path(directory).expanduser()
        for name in (CONFIG_FILE, WEIGHTS_FILE, "text_tokenizer.json", "image_tokenizer.json"):
            if not (path / name).exists():
                raise ConfigError(config_key, f"{path} has no {name}: not a folder written by "
                                              "ShapesMARPolicy.save_pretrained")
        meta = json.loads((path / POLICY_FILE).read_text()) if (path / POLICY_FILE).exists() else {}
        if meta.get("type", POLICY_TYPE) != POLICY_TYPE:
            raise ConfigError(config_key, f"{path} holds a {meta.get('type')!r} policy, not a {POLICY_TYPE!r} one")
        cfg = json.loads((path / CONFIG_FILE).read_text())
        mar = MAR(MARConfig.from_dict(cfg["mar"]))
        state = load_file(str(path / WEIGHTS_FILE))
        missing, unexpected = mar.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(config_key, f"{path}: weights do not fit the saved config (missing {missing[:5]}, "
                                          f"unexpected {unexpected[:5]})")
        return cls(mar, WordTextTokenizer.from_pretrained(path), PaletteImageTokenizer.from_pretrained(path),
                   token_scale=float(cfg.get("token_scale", 1.0)), token_code=str(cfg.get("token_code", "rgb")))

    @classmethod
    def toy(cls, world: ShapesWorldConfig | None = None, vocabulary: Sequence[str] | None = None, *,
            d_model: int = 64, n_layers: int = 2, n_heads: int = 4, mlp_ratio: float = 4.0, buffer_size: int = 16,
            text_max_len: int = 16, text_width: int = 64, text_depth: int = 1, text_heads: int = 2,
            text_pooling: str = "tokens", head_width: int = 64, head_depth: int = 2,
            num_sampling_steps: int | str = "ddim25",
            diffusion_batch_mul: int = 4, mask_ratio_min: float = 0.7, dropout: float = 0.0,
            token_scale: float = 1.0, token_code: str = "rgb", pos_embed_init: str = "sincos",
            condition_to_latent: bool = False, seed: int = 0) -> "ShapesMARPolicy":
        """A randomly initialised ShapesWorld MAR (same encoder/decoder width ``d_model`` and depth ``n_layers``).

        ``world``: default :meth:`ShapesWorldConfig.roomy` (16 x 16 cells); ``build_mar_policy`` passes
        ``conf/world``'s.

        ``pos_embed_init="sincos"`` starts the grid rows of the three learned position embeddings from 2-d sin-cos
        embeddings (MAE's fixed ones; still learned): a tiny model then knows which cells are neighbours from step 0
        instead of having to discover the grid (``"random"``: LTH14's N(0, 0.02)).
        """
        from htgrpo.data.shapes.prompts import VOCABULARY

        world = world or ShapesWorldConfig.roomy()  # the 16-cell world the toy models were sized on
        text_tok = WordTextTokenizer(list(VOCABULARY) if vocabulary is None else vocabulary)
        image_tok = PaletteImageTokenizer(world.grid_size, world.cell_px)
        token_dim = PaletteTokenCodec(image_tok, token_scale, token_code).token_dim
        config = MARConfig(
            seq_h=world.grid_size, seq_w=world.grid_size, token_embed_dim=token_dim,
            encoder_embed_dim=d_model, encoder_depth=n_layers, encoder_num_heads=n_heads,
            decoder_embed_dim=d_model, decoder_depth=n_layers, decoder_num_heads=n_heads, mlp_ratio=mlp_ratio,
            buffer_size=buffer_size, conditioning="text", label_drop_prob=0.0, mask_ratio_min=mask_ratio_min,
            attn_dropout=dropout, proj_dropout=dropout, diffloss_d=head_depth, diffloss_w=head_width,
            num_sampling_steps=str(num_sampling_steps), diffusion_batch_mul=diffusion_batch_mul,
            text_vocab_size=text_tok.vocab_size, text_max_len=text_max_len, text_width=text_width,
            text_depth=text_depth, text_num_heads=text_heads, text_pooling=text_pooling,
            text_pad_id=text_tok.pad_token_id, condition_to_latent=bool(condition_to_latent))
        require_choice(pos_embed_init, POS_EMBED_INITS, "pos_embed_init")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mar = MAR(config)
        if pos_embed_init == "sincos":
            with torch.no_grad():
                for name, prefix in (("encoder_pos_embed_learned", buffer_size),
                                     ("decoder_pos_embed_learned", buffer_size), ("diffusion_pos_embed_learned", 0)):
                    param = getattr(mar, name)
                    param[0, prefix:] = sincos_2d_embedding(param.shape[-1], world.grid_size, world.grid_size)
        return cls(mar, text_tok, image_tok, token_scale=token_scale, token_code=token_code)


def is_mar_policy_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :meth:`ShapesMARPolicy.save_pretrained`."""
    meta = Path(path) / POLICY_FILE
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("type") == POLICY_TYPE
    except (OSError, ValueError):
        return False


def build_mar_policy(world: ShapesWorldConfig, init: str = "scratch", pretrained_path: str | None = None,
                     d_model: int = 64, n_layers: int = 2, n_heads: int = 4, mlp_ratio: float = 4.0,
                     buffer_size: int = 16, text_max_len: int = 16, text_width: int = 64, text_depth: int = 1,
                     text_heads: int = 2, text_pooling: str = "tokens", head_width: int = 64, head_depth: int = 2,
                     num_sampling_steps: int | str = "ddim25", diffusion_batch_mul: int = 4, mask_ratio_min: float = 0.7,
                     dropout: float = 0.0, token_scale: float = 1.0, token_code: str = "rgb",
                     pos_embed_init: str = "sincos", condition_to_latent: bool = False,
                     seed: int = 0) -> ShapesMARPolicy:
    """Build the ShapesWorld MAR policy (Hydra target of ``conf/policy/shapes_mar.yaml``).

    Args:
        world: ShapesWorld geometry (sets the token grid and the tokenizer).
        init: ``scratch`` (random init) or ``pretrained`` (load ``pretrained_path``).
        pretrained_path: a folder written by ``ShapesMARPolicy.save_pretrained`` (the MAR warm start writes
            ``${paths.artifacts_dir}/shapes_mar_warmstart``).
        d_model, n_layers, n_heads, mlp_ratio: MAR encoder and decoder (same width and depth for both).
        buffer_size: MAR buffer tokens (the text fills them); text_max_len: prompt words kept.
        text_width, text_depth, text_heads, text_pooling: the TextConditioner (``tokens``: one buffer slot per word).
        head_width, head_depth: the diffusion head MLP (LTH14 diffloss_w, diffloss_d).
        num_sampling_steps: default respacing of the head's sampling chain (the sampler may override it).
        diffusion_batch_mul: training repeats of every masked token (independent t and noise).
        mask_ratio_min: training mask ratio ~ truncated N(1, 0.25²) on [mask_ratio_min, 1].
        dropout: attention and projection dropout of the MAR blocks.
        token_scale: tokens are the code vectors times this.
        token_code: ``rgb`` (palette RGB/127.5 − 1, 3 channels) or ``onehot`` (2·e_k − 1, one channel per colour).
        pos_embed_init: ``sincos`` (2-d sin-cos start for the learned grid position embeddings) or ``random``.
        condition_to_latent: add a projection of the pooled caption embedding to every z (MARConfig field).
        seed: initialisation seed of a scratch policy.
    """
    require_choice(init, ("scratch", "pretrained"), "init")
    if init == "pretrained":
        require(pretrained_path not in (None, ""), "pretrained_path", "must be set when init=pretrained")
        path = Path(str(pretrained_path)).expanduser()
        if not path.is_dir():
            raise ConfigError(
                "pretrained_path",
                f"{path} does not exist. Run the MAR warm start first (`python -m htgrpo.fit "
                "experiment=shapes_mar_pretrain`) or point policy.pretrained_path at a folder written by "
                "ShapesMARPolicy.save_pretrained.")
        return ShapesMARPolicy.from_pretrained(path, config_key="pretrained_path")
    for key, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                       ("buffer_size", buffer_size), ("text_max_len", text_max_len), ("text_width", text_width),
                       ("text_depth", text_depth), ("text_heads", text_heads), ("head_width", head_width),
                       ("head_depth", head_depth), ("diffusion_batch_mul", diffusion_batch_mul)):
        require(int(value) >= 1, key, f"must be >= 1, got {value}")
    require(int(d_model) % int(n_heads) == 0, "d_model", f"must be divisible by n_heads ({n_heads}), got {d_model}")
    require(int(text_width) % int(text_heads) == 0, "text_width",
            f"must be divisible by text_heads ({text_heads}), got {text_width}")
    require_choice(text_pooling, ("mean", "tokens"), "text_pooling")
    if text_pooling == "tokens":
        require(int(text_max_len) <= int(buffer_size), "text_max_len",
                f"must be <= buffer_size ({buffer_size}) with text_pooling=tokens, got {text_max_len}")
    require_range(float(mask_ratio_min), "mask_ratio_min", 0.0, 1.0)
    require_range(float(dropout), "dropout", 0.0, 1.0, high_inclusive=False)
    require(float(token_scale) > 0, "token_scale", f"must be > 0, got {token_scale}")
    require_choice(token_code, TOKEN_CODES, "token_code")
    require_choice(pos_embed_init, POS_EMBED_INITS, "pos_embed_init")
    require(pos_embed_init != "sincos" or int(d_model) % 4 == 0, "d_model",
            f"must be divisible by 4 with pos_embed_init=sincos, got {d_model}")
    try:
        create_diffusion(str(num_sampling_steps))
    except (ValueError, ConfigError) as err:
        raise ConfigError("num_sampling_steps", err.message if isinstance(err, ConfigError) else str(err)) from None
    return ShapesMARPolicy.toy(world, d_model=int(d_model), n_layers=int(n_layers), n_heads=int(n_heads),
                               mlp_ratio=float(mlp_ratio), buffer_size=int(buffer_size),
                               text_max_len=int(text_max_len), text_width=int(text_width),
                               text_depth=int(text_depth), text_heads=int(text_heads), text_pooling=text_pooling,
                               head_width=int(head_width), head_depth=int(head_depth),
                               num_sampling_steps=num_sampling_steps, diffusion_batch_mul=int(diffusion_batch_mul),
                               mask_ratio_min=float(mask_ratio_min), dropout=float(dropout),
                               token_scale=float(token_scale), token_code=str(token_code),
                               pos_embed_init=pos_embed_init, condition_to_latent=bool(condition_to_latent),
                               seed=int(seed))


__all__ = [
    "MARSampled",
    "MARSamplerSettings",
    "MARTrainingLoss",
    "PaletteTokenCodec",
    "TOKEN_CODES",
    "ShapesMARPolicy",
    "build_mar_policy",
    "is_mar_policy_folder",
    "palette_code_vectors",
    "require_mar_sampler",
]
