"""Harmon (Wu et al., 2025): a MAR whose encoder output is read by a Qwen2.5 LLM that holds the text prompt.

Written from the released model's description (github wusize/Harmon ``src/models/harmon.py``; reference/mar_grpo.md
§1.2). The policy's modules are the released ones, under the released names, so ``model.safetensors`` of
``wusize/Harmon-1_5B`` loads with no renaming::

    vae       MAR's KL-16 VAE (:class:`~htgrpo.policies.mar.vae.KLAutoencoder`), frozen, scale 0.2325
    llm       transformers ``Qwen2ForCausalLM`` (Qwen2.5-1.5B-Instruct), frozen
    mar       :class:`~htgrpo.policies.mar.backbone.MAR` (mar_huge; its ``class_emb`` is kept but unused)
    proj_in   Linear(E → H), SiLU, Linear(H → H)        E = MAR width (1280), H = LLM width (1536)
    proj_out  Linear(H → H), SiLU, Linear(H → E)

One AR step (what :meth:`HarmonPolicy.ar_latents` computes; CFG runs the same on the negative prompt's cache)::

    prompt  = chat_template("Generate an image: {text}") ─► llm.model ─► key/value cache (once per rollout)
    x_enc   = mar.forward_mae_encoder(tokens, mask, buffer = fake_latent)           (B, buffer + visible, E)
    h       = proj_in(x_enc), buffer rows moved to the END ─► llm.model over [prompt cache ‖ h]
              (2-d mask = prompt mask ‖ ones, position ids continue after each prompt's real length)
    x_enc   = x_enc + proj_out(last hidden states, buffer rows moved back to the front)        (residual)
    z       = mar.forward_mae_decoder(x_enc, mask)  ─► diffusion head per token

Images are generated at ``image_size`` px (Harmon: 512 → a 32×32 token grid) while the MAR's learned position
embeddings stay at the checkpoint's 16×16 and are interpolated on the fly (bilinear, as released; see
:meth:`MAR.set_generation_grid`), so trained weights save back in the released shapes.

Folder format (``save_pretrained`` / ``from_pretrained``; the Hugging Face layout of ``wusize/Harmon-1_5B``)::

    config.json             {"model_type": "harmon", "architectures": ["HarmonModel"], "llm": {Qwen2 config},
                             "mar": {"type": "mar_huge", "img_size": 256, "vae_stride": 16, "patch_size": 1, ...}}
    model.safetensors       vae.* / llm.* / mar.* / proj_in.* / proj_out.* (or sharded: model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json, ...   the Qwen2.5 tokenizer (AutoTokenizer)
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.policies.folder_compat import save_tokenizer, v4_config_keys
from htgrpo.policies.mar.backbone import MAR, POS_EMBED_INTERPOLATIONS, TextCondition, patchify, unpatchify
from htgrpo.policies.mar.checkpoints import build_mar_from_state_dict, config_hints_from_lth14_args
from htgrpo.policies.mar.diffusion import GaussianDiffusion, create_diffusion
from htgrpo.policies.mar.wrapper import WrapsMAR
from htgrpo.policies.mar.vae import (
    KLAutoencoder,
    KLVAEConfig,
    images_to_unit_range,
    load_vae_state_dict,
    unit_range_to_images,
)

HARMON_REPO_ID = "wusize/Harmon-1_5B"
CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
"""Harmon's prompt template (Qwen chat, ``INSTRUCTION`` of ``configs/models/qwen2_5_1_5b_kl16_mar_h.py``)."""
PROMPT_FORMAT = "Generate an image: {prompt}"
"""How Harmon's text-to-image scripts (and MAR-GRPO) wrap a caption before the template."""
CFG_PROMPT = "Generate an image."
"""Harmon's negative prompt for the unconditional CFG branch."""
MODULE_PREFIXES = ("vae.", "llm.", "mar.", "proj_in.", "proj_out.")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def download_hint(key: str = "policy.pretrained") -> str:
    key = key if key.startswith("policy.") else f"policy.{key}"
    return (f"Download Harmon on a machine with network access: `huggingface-cli download {HARMON_REPO_ID} "
            f"--local-dir <dir>` (config.json, model.safetensors with vae./llm./mar./proj_* weights of 2.56 B "
            f"parameters, the Qwen2.5 tokenizer) and set {key}=<dir>; or pass the hub id: it is read from the local "
            f"Hugging Face cache, and downloaded there unless HF_HUB_OFFLINE=1.")


# ----------------------------------------------------------------------------------------------------------------
# The prompt cache: Harmon's condition
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PromptCache:
    """The LLM's keys and values over a batch of prompts: Harmon's condition (what a buffer tensor is to MAR).

    Attributes:
        keys, values: one tensor per LLM layer, (B, kv_heads, T, head_dim).
        attention_mask: (B, T) bool, True on real prompt tokens (prompts are right-padded, as released).
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    attention_mask: Tensor

    def __len__(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def padded(self, length: int) -> "PromptCache":
        """Right-pad to ``length`` positions (zero keys/values, mask False: never attended)."""
        extra = int(length) - self.length
        if extra < 0:
            raise ValueError(f"cannot pad a prompt cache of length {self.length} to {length}")
        if extra == 0:
            return self

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)

        mask = torch.cat([self.attention_mask, self.attention_mask.new_zeros(len(self), extra)], dim=1)
        return PromptCache(tuple(pad(k) for k in self.keys), tuple(pad(v) for v in self.values), mask)

    def cat(self, other: "PromptCache") -> "PromptCache":
        """Stack two batches (``[self; other]``), padding the shorter prompt length."""
        n = max(self.length, other.length)
        a, b = self.padded(n), other.padded(n)
        return PromptCache(tuple(torch.cat([x, y]) for x, y in zip(a.keys, b.keys)),
                           tuple(torch.cat([x, y]) for x, y in zip(a.values, b.values)),
                           torch.cat([a.attention_mask, b.attention_mask]))

    def expand(self, batch_size: int) -> "PromptCache":
        """A one-row cache repeated ``batch_size`` times (views, no copy)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a one-row cache, got {len(self)} rows")
        B = int(batch_size)
        return PromptCache(tuple(k.expand(B, -1, -1, -1) for k in self.keys),
                           tuple(v.expand(B, -1, -1, -1) for v in self.values), self.attention_mask.expand(B, -1))


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Harmon's projector: Linear(in → hidden), SiLU, Linear(hidden → out) (keys ``.0.*`` and ``.2.*``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))


class HarmonPolicy(WrapsMAR, nn.Module):
    """Harmon as a MAR-GRPO policy: it is its own ``ar_model`` (condition = :class:`PromptCache`).

    Args:
        llm: a transformers ``Qwen2ForCausalLM``.
        mar: the MAR (its ``token_embed_dim`` must equal the VAE's latent channels × patch²).
        vae: the KL VAE.
        tokenizer: the LLM's tokenizer (transformers ``PreTrainedTokenizer[Fast]``).
        image_size: generated image side in pixels (Harmon: 512); must be a multiple of the VAE stride.
        pos_embed_interpolation: ``bilinear`` (released) or ``bicubic``: how the MAR position embeddings reach the
            generation grid.
        prompt_format, chat_template, cfg_prompt: the caption wrapper, Qwen chat template and negative prompt.
        source: where the weights came from (error messages).
    """

    def __init__(self, llm: nn.Module, mar: MAR, vae: KLAutoencoder, tokenizer: Any, image_size: int = 512,
                 pos_embed_interpolation: str = "bilinear", prompt_format: str = PROMPT_FORMAT,
                 chat_template: str = CHAT_TEMPLATE, cfg_prompt: str = CFG_PROMPT, source: str = "Harmon"):
        super().__init__()
        require_choice(pos_embed_interpolation, POS_EMBED_INTERPOLATIONS, "pos_embed_interpolation")
        if vae.embed_dim != mar.token_embed_dim:
            raise ConfigError("pretrained", f"{source}: the VAE's latent has {vae.embed_dim} channels "
                                            f"(vae.post_quant_conv) but the MAR's tokens are {mar.token_embed_dim} wide "
                                            f"(mar.z_proj): the MAR cannot read this VAE's latents (patch_size 1)")
        f = vae.downsample_factor
        require(int(image_size) >= f and int(image_size) % f == 0, "image_size",
                f"must be a positive multiple of the VAE stride {f}, got {image_size}")
        self.vae = vae.requires_grad_(False)
        self.llm = llm
        self.mar = mar
        hidden = int(llm.config.hidden_size)
        width = mar.encoder_embed_dim
        self.proj_in = build_mlp(width, hidden, hidden)
        self.proj_out = build_mlp(hidden, hidden, width)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.prompt_format, self.chat_template, self.cfg_prompt = prompt_format, chat_template, cfg_prompt
        self.pos_embed_interpolation = pos_embed_interpolation
        self.gradient_checkpointing = False   # recompute the LLM pass in backward (load_harmon's key)
        grid = self.image_size // f
        mar.set_generation_grid(grid, grid, pos_embed_interpolation)
        self._diffusions: dict[str, GaussianDiffusion] = {}
        self._sampling_steps = str(mar.config.num_sampling_steps)

    # -- what the MAR sampler and MAR-GRPO talk to --------------------------------------------------------------
    @property
    def ar_model(self) -> "HarmonPolicy":
        """The object owning condition → AR latents (here the policy itself: MAR encoder → LLM → MAR decoder)."""
        return self

    @property
    def diffloss(self):
        return self.mar.diffloss

    @property
    def fake_latent(self) -> Tensor:
        return self.mar.fake_latent

    @property
    def seq_len(self) -> int:
        return self.mar.seq_len

    @property
    def token_embed_dim(self) -> int:
        return self.mar.token_embed_dim

    @property
    def decoder_embed_dim(self) -> int:
        return self.mar.decoder_embed_dim

    def random_orders(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        return self.mar.random_orders(batch_size, generator, device)

    # -- text -----------------------------------------------------------------------------------------------
    def format_prompt(self, caption: str) -> str:
        """caption → the chat-templated instruction the LLM reads."""
        return self.chat_template.format(input=self.prompt_format.format(prompt=caption))

    def _tokenize(self, texts: Sequence[str]) -> TextCondition:
        """Right-padded ids (pad = eos, as released) and the real-token mask."""
        rows = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("prompt: every prompt must tokenize to at least one token")
        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
        return TextCondition(ids.to(self.device), mask.to(self.device))

    def encode_prompts(self, texts: str | Sequence[str]) -> TextCondition:
        """Captions → templated, tokenized, right-padded prompts (:class:`TextCondition`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._tokenize([self.format_prompt(t) for t in texts])

    def prompt_cache(self, condition: TextCondition) -> PromptCache:
        """Run ``llm.model`` over the prompts once and keep every layer's keys and values.

        As released: no attention mask in this pass (prompts are right-padded, so a real token never sees padding
        under the causal mask); padding is excluded later by the image tokens' 2-d mask. Gradients are kept only
        when some LLM weight is trainable.
        """
        from transformers.cache_utils import DynamicCache

        ids = condition.input_ids.to(self.device)
        mask = (condition.attention_mask if condition.attention_mask is not None else torch.ones_like(ids)).bool()
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters())
        with torch.set_grad_enabled(track):
            cache = DynamicCache(config=self.llm.config)
            self.llm.model(input_ids=ids, cache=cache, use_cache=True, return_dict=True)
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        return PromptCache(keys, values, mask.to(self.device))

    def condition_embedding(self, condition: TextCondition | PromptCache, batch_size: int | None = None,
                            drop: Tensor | None = None) -> PromptCache:
        """The conditional prompt cache (MAR's ``condition_embedding`` for Harmon)."""
        if drop is not None:
            raise ValueError("drop: Harmon has no condition dropout (its unconditional branch is the negative prompt)")
        cache = condition if isinstance(condition, PromptCache) else self.prompt_cache(condition)
        if batch_size is not None and len(cache) != batch_size:
            raise ValueError(f"condition: batch {len(cache)} != batch_size {batch_size}")
        return cache

    def unconditional_embedding(self, batch_size: int, like: Any = None) -> PromptCache:
        """The negative prompt's cache (``cfg_prompt``, templated), repeated ``batch_size`` times: the CFG branch."""
        negative = self._tokenize([self.chat_template.format(input=self.cfg_prompt)])
        return self.prompt_cache(negative).expand(batch_size)

    # -- encoder → LLM → decoder --------------------------------------------------------------------------------
    def ar_latents(self, tokens: Tensor, mask: Tensor, condition: PromptCache) -> Tensor:
        """z (B, L, Dz) for every position: the MAR encoder on the visible tokens (buffer = fake_latent), the LLM over
        [prompt cache ‖ proj_in(encoder output)], ``proj_out`` added back, the MAR decoder (module docstring)."""
        from transformers.cache_utils import DynamicCache

        if not isinstance(condition, PromptCache):
            raise TypeError(f"condition: Harmon needs a PromptCache (condition_embedding), got {type(condition)}")
        mar, buf = self.mar, self.mar.buffer_size
        B = tokens.shape[0]
        if len(condition) != B:
            raise ValueError(f"condition: {len(condition)} prompt rows for {B} token rows")
        x_enc = mar.forward_mae_encoder(tokens, mask, mar.unconditional_embedding(B))
        h = self.proj_in(x_enc)
        h = torch.cat([h[:, buf:], h[:, :buf]], dim=1)                 # buffer rows to the end (as released)
        n = h.shape[1]
        attention = torch.cat([condition.attention_mask.bool(), condition.attention_mask.new_ones(B, n).bool()], 1)
        positions = (attention.long().cumsum(dim=1) - 1).clamp(min=0)[:, -n:]
        layers = len(condition.keys)

        def llm_over_prompt(h: Tensor, *kv: Tensor) -> Tensor:
            # A fresh cache object per call: the LLM appends the image positions to it, the stored prompt stays intact.
            cache = DynamicCache(ddp_cache_data=list(zip(kv[:layers], kv[layers:])), config=self.llm.config)
            out = self.llm.model(inputs_embeds=h.to(self.llm.dtype), attention_mask=attention, position_ids=positions,
                                 cache=cache, use_cache=True, return_dict=True)
            return out.last_hidden_state[:, -n:]

        kv = (*condition.keys, *condition.values)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # One recomputed segment over the whole LLM (transformers' per-layer checkpointing drops the prompt cache).
            h = checkpoint(llm_over_prompt, h, *kv, use_reentrant=False)
        else:
            h = llm_over_prompt(h, *kv)
        h = h.to(x_enc.dtype)
        h = torch.cat([h[:, -buf:], h[:, :-buf]], dim=1) if buf else h   # buffer rows back to the front
        return mar.forward_mae_decoder(x_enc + self.proj_out(h), mask)

    def guided_ar_latents(self, tokens: Tensor, mask: Tensor, condition: PromptCache,
                          unconditional: PromptCache) -> tuple[Tensor, Tensor]:
        """(z_cond, z_uncond) from one pass over the stacked batch [prompt; negative prompt] (as Harmon samples)."""
        z = self.ar_latents(torch.cat([tokens, tokens]), torch.cat([mask, mask]), condition.cat(unconditional))
        z_cond, z_uncond = z.chunk(2, dim=0)
        return z_cond, z_uncond

    # -- images ---------------------------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.mar.seq_h, self.mar.seq_w

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) → MAR tokens (B, L, D) = patchify(0.2325 · posterior mode) (Harmon's ``encode``)."""
        x = images_to_unit_range(images.to(self.device)).to(self.vae.quant_conv.weight.dtype)
        return patchify(self.vae.encode_tokens(x))

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, L, D) tokens → uint8 images (B, 3, image_size, image_size), CPU (Harmon: clamp(127.5·x + 128))."""
        h, w = self.grid
        latents = unpatchify(tokens.detach().to(self.vae.quant_conv.weight.dtype), h, w)
        return unit_range_to_images(self.vae.decode_tokens(latents)).cpu()

    # -- persistence ----------------------------------------------------------------------------------------------
    def harmon_config(self) -> dict[str, Any]:
        """config.json content in the released Hugging Face layout."""
        c = self.mar.config
        f = self.vae.downsample_factor
        mar = {"type": _preset_name(c), "img_size": c.seq_h * f, "vae_stride": f, "patch_size": 1,
               "vae_embed_dim": c.token_embed_dim, "mask_ratio_min": c.mask_ratio_min,
               "label_drop_prob": c.label_drop_prob, "class_num": c.num_classes, "attn_dropout": c.attn_dropout,
               "proj_dropout": c.proj_dropout, "buffer_size": c.buffer_size, "diffloss_d": c.diffloss_d,
               "diffloss_w": c.diffloss_w, "num_sampling_steps": str(c.num_sampling_steps),
               "diffusion_batch_mul": c.diffusion_batch_mul, "grad_checkpointing": c.grad_checkpointing}
        if mar["type"] == "custom":   # not an LTH14 size: the widths a loader cannot infer
            mar.update(encoder_embed_dim=c.encoder_embed_dim, encoder_depth=c.encoder_depth,
                       encoder_num_heads=c.encoder_num_heads, decoder_embed_dim=c.decoder_embed_dim,
                       decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio)
        # The Qwen2 config also carries the transformers 4.x keys (rope_theta, ...): the released Harmon and MAR-GRPO
        # code runs on 4.45.2, which ignores rope_parameters and would compute RoPE with base 10000.
        return {"model_type": "harmon", "architectures": ["HarmonModel"],
                "llm": v4_config_keys(self.llm.config.to_dict()), "mar": mar}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json, model.safetensors (released key names) and the tokenizer files, in a form that
        transformers 4.45 (the released code's pin) and 5 read identically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if getattr(self.llm.config, "tie_word_embeddings", False):
            state.pop("llm.lm_head.weight", None)     # tied to llm.model.embed_tokens.weight, as transformers saves
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.harmon_config(), indent=2) + "\n")
        save_tokenizer(self.tokenizer, directory)


def _preset_name(config) -> str:
    from htgrpo.policies.mar.backbone import MAR_PRESETS

    for name, preset in MAR_PRESETS.items():
        if all(getattr(config, k) == v for k, v in preset.items()):
            return name
    return "custom"


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def resolve_harmon_dir(pretrained: str, key: str = "policy.pretrained") -> Path:
    """A local folder, or a hub id: from the local Hugging Face cache, else downloaded (not with HF_HUB_OFFLINE=1)."""
    require(pretrained not in (None, ""), key, f"must name a Harmon folder or hub id. {download_hint(key)}")
    path = Path(str(pretrained)).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(pretrained).startswith((".", "/", "~")) or str(pretrained).count("/") != 1:
        raise ConfigError(key, f"{pretrained} is not a folder. {download_hint(key)}")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(pretrained), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any hub/cache failure is the same user problem
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(key, f"{pretrained} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                                   f"({type(err).__name__}). {download_hint(key)}") from None
    try:
        return Path(snapshot_download(str(pretrained)))
    except Exception as err:  # noqa: BLE001
        raise ConfigError(key, f"{pretrained} could not be downloaded ({type(err).__name__}: {err}). "
                               f"{download_hint(key)}") from None


def read_state_dict(directory: Path, key: str = "policy.pretrained") -> dict[str, Tensor]:
    """Every tensor of the folder's weight file(s): model.safetensors, a sharded index, or a .bin / .pth."""
    weights = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        singles = sorted(p for ext in ("*.safetensors", "*.pth", "*.bin") for p in directory.glob(ext))
        if len(singles) != 1:
            raise ConfigError(key, f"{directory} has no model.safetensors (or one .pth/.bin). {download_hint(key)}")
        weights = singles[0]
    files = [weights]
    if weights.name.endswith(".index.json"):
        files = sorted({directory / f for f in json.loads(weights.read_text())["weight_map"].values()})
    state: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
            state.update(obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj)
    return state


def _prefix_summary(keys: Iterable[str]) -> str:
    counts = Counter(k.split(".", 1)[0] + "." for k in keys)
    return ", ".join(f"{p}* ({n})" for p, n in sorted(counts.items())) or "no tensors"


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_vae_config(vae_state: Mapping[str, Tensor], source: str, key: str) -> KLVAEConfig:
    """The KL-VAE architecture its weights fix (the released config.json does not describe the VAE)."""
    try:
        ch = int(vae_state["encoder.conv_in.weight"].shape[0])
        embed_dim = int(vae_state["post_quant_conv.weight"].shape[0])
        levels = _count(vae_state, r"^encoder\.down\.(\d+)\.")
        blocks = _count(vae_state, r"^encoder\.down\.0\.block\.(\d+)\.")
        mult = tuple(int(vae_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels))
    except KeyError as err:
        raise ConfigError(key, f"{source}: the vae.* weights are not a KL VAE (missing {err}); found "
                               f"{_prefix_summary(vae_state)}") from None
    attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in vae_state]
    resolution = 256
    return KLVAEConfig(embed_dim=embed_dim, ch=ch, ch_mult=mult, num_res_blocks=blocks, resolution=resolution,
                       attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels))


def _mar_hints(mar_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """MARConfig fields from config.json's ``mar`` dict (LTH14 ``mar_*`` constructor arguments)."""
    args = dict(mar_cfg)
    args["model"] = args.pop("type", None)
    hints = config_hints_from_lth14_args(args)
    for name in ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth",
                 "decoder_num_heads", "mlp_ratio"):
        if name in mar_cfg:
            hints[name] = mar_cfg[name]
    return hints


def load_harmon(pretrained: str, image_size: int = 512, pos_embed_interpolation: str = "bilinear",
                dtype: str = "float32", num_sampling_steps: str | None = None, freeze_llm: bool = True,
                gradient_checkpointing: bool = False, key: str = "policy.pretrained") -> HarmonPolicy:
    """A :class:`HarmonPolicy` from a folder (or cached hub id) in the released layout (module docstring).

    The whole state dict is loaded into the policy under its own names (strict: a missing or unexpected key is an
    error; only ``llm.lm_head.weight`` may be absent when the LLM ties it to the input embedding). Fails at
    start-up, naming ``key``, for a folder without ``mar.*`` weights (listing the prefixes found), a VAE whose latent
    channels differ from the MAR token width, and missing files (with the download command).
    """
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    directory = resolve_harmon_dir(pretrained, key)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(key, f"{directory} has no config.json. {download_hint(key)}")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "harmon" or "llm" not in cfg or "mar" not in cfg:
        raise ConfigError(key, f"{config_file}: not a Harmon config (model_type={cfg.get('model_type')!r}, keys "
                               f"{sorted(cfg)}); expected model_type 'harmon' with 'llm' and 'mar'")
    state = read_state_dict(directory, key)
    source = f"Harmon checkpoint {directory}"
    missing_parts = [p for p in MODULE_PREFIXES if not any(k.startswith(p) for k in state)]
    if missing_parts:
        raise ConfigError(key, f"{source}: no {', '.join(p + '*' for p in missing_parts)} weights; found "
                               f"{_prefix_summary(state)}. {download_hint(key)}")
    unknown = sorted({k.split('.', 1)[0] + "." for k in state} - set(MODULE_PREFIXES))
    if unknown:
        raise ConfigError(key, f"{source}: unexpected weight prefixes {unknown} (a Harmon checkpoint holds "
                               f"{list(MODULE_PREFIXES)})")

    vae = KLAutoencoder(infer_vae_config(_strip(state, "vae."), source, key))
    mar_state = _strip(state, "mar.")
    try:
        mar = build_mar_from_state_dict(mar_state, _mar_hints(cfg["mar"]), source=source)
    except (ValueError, ConfigError) as err:
        raise ConfigError(key, f"{source}: the mar.* weights do not form a MAR: "
                               f"{err.message if isinstance(err, ConfigError) else err}") from None
    if gradient_checkpointing:
        mar.config.grad_checkpointing = True
    llm = Qwen2ForCausalLM(Qwen2Config.from_dict(cfg["llm"]))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # AutoTokenizer reads config.json too and warns that `harmon` is no known type
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # noqa: BLE001
        raise ConfigError(key, f"{directory}: the tokenizer files do not load with AutoTokenizer ({err}). "
                               f"{download_hint(key)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    policy = HarmonPolicy(llm, mar, vae, tokenizer, image_size=image_size,
                          pos_embed_interpolation=pos_embed_interpolation, source=source)
    load_vae_state_dict(policy.vae, _strip(state, "vae."), source, key)
    result = policy.load_state_dict(state, strict=False)
    tied = getattr(llm.config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "llm.lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ConfigError(key, f"{source}: weights do not fit the model built from config.json: missing "
                               f"{missing[:5]} ({len(missing)}), unexpected {result.unexpected_keys[:5]} "
                               f"({len(result.unexpected_keys)})")
    if tied:
        llm.tie_weights()
    policy.to(_dtype(dtype, key="dtype"))
    if freeze_llm:   # the release trains only `mar` (the LLM and the projectors stay as loaded)
        for module in (policy.llm, policy.proj_in, policy.proj_out):
            module.requires_grad_(False)
    policy.gradient_checkpointing = bool(gradient_checkpointing)   # the LLM pass; MAR blocks: grad_checkpointing
    policy.use_sampling_steps(num_sampling_steps)
    return policy


def _dtype(name: str, key: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    require_choice(name, tuple(table), key)
    return table[name]


def build_harmon_policy(pretrained: str = HARMON_REPO_ID, image_size: int = 512,
                        pos_embed_interpolation: str = "bilinear", dtype: str = "float32",
                        num_sampling_steps: str | None = None, freeze_llm: bool = True,
                        gradient_checkpointing: bool = False) -> HarmonPolicy:
    """Hydra target of ``conf/policy/harmon.yaml`` (keys documented there; errors name ``policy.<key>``)."""
    require_choice(pos_embed_interpolation, POS_EMBED_INTERPOLATIONS, "pos_embed_interpolation")
    if num_sampling_steps is not None:
        try:
            create_diffusion(str(num_sampling_steps))
        except (ValueError, ConfigError) as err:
            raise ConfigError("num_sampling_steps", err.message if isinstance(err, ConfigError) else str(err)) from None
    return load_harmon(str(pretrained), image_size=int(image_size), pos_embed_interpolation=pos_embed_interpolation,
                       dtype=dtype, num_sampling_steps=None if num_sampling_steps is None else str(num_sampling_steps),
                       freeze_llm=bool(freeze_llm), gradient_checkpointing=bool(gradient_checkpointing),
                       key="pretrained")


__all__ = [
    "CFG_PROMPT",
    "CHAT_TEMPLATE",
    "HARMON_REPO_ID",
    "HarmonPolicy",
    "PROMPT_FORMAT",
    "PromptCache",
    "build_harmon_policy",
    "build_mlp",
    "infer_vae_config",
    "load_harmon",
    "read_state_dict",
    "resolve_harmon_dir",
]
