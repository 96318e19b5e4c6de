"""Masked-diffusion text-to-image policy: LLaDA backbone + a sequence layout + text and image tokenizers.

One class serves the toy ShapesWorld policy (built in :mod:`htgrpo.policies.shapes_llada`), MMaDA-8B
(``T2ISequenceLayout``) and Lumina-DiMOO (``DimooSequenceLayout``), built in :mod:`htgrpo.policies.pretrained`.
Image tokens are handled as (B, N) codebook indices with -1 = masked; the policy turns them into sequences, runs the
backbone and returns logits **only at image positions and only over the image-code columns** (reference §3.6: MMaDA
reads ``[-(N+1):-1]`` x ``[126349, 126349+8192)``; §5.5: DiMOO reads the code positions between the newlines x
``[126356, 126356+8192)``).

Tokenizers follow one interface: text ``encode(texts, max_length) -> (ids, mask)`` left-padded; image
``encode(uint8 images) -> (B, N) codes`` and ``decode(codes) -> uint8 images``; both ``save_pretrained``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from htgrpo.policies.llada import LLaDAModelLM, load_llada, select_positions
from htgrpo.policies.t2i_layout import MASKED, DimooSequenceLayout, T2ISequenceLayout, load_layout

POLICY_FILE = "policy.json"


@dataclass
class PromptTokens:
    """Text tokens of a batch of prompts: ``ids``/``mask`` (B, L), left-padded, mask 1 on words (no specials)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> PromptTokens:
        return PromptTokens(self.ids.to(device), self.mask.to(device))

    def repeat_interleave(self, repeats: int) -> PromptTokens:
        """Each prompt ``repeats`` times in a row (G samples per prompt for group rollouts)."""
        return PromptTokens(self.ids.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0))

    def __getitem__(self, index: Any) -> PromptTokens:
        return PromptTokens(self.ids[index], self.mask[index])

    def dropped(self, drop: torch.Tensor | None = None) -> PromptTokens:
        """Rows where ``drop`` (B,) is True (all rows if None) become the unconditional (empty) prompt."""
        keep = torch.zeros_like(self.mask) if drop is None else self.mask * (~drop.to(self.mask.device)).long()[:, None]
        return PromptTokens(self.ids, keep)


@dataclass
class MaskedDiffusionLoss:
    loss: torch.Tensor
    """Cross-entropy over masked image tokens (token mean over the batch)."""
    accuracy: torch.Tensor
    """Top-1 accuracy on masked tokens (no grad)."""
    mask_ratio: torch.Tensor
    """Mean fraction of image tokens masked (no grad)."""


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0,1) drawn on the generator's device (reproducible), returned on ``device``."""
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


class MaskedDiffusionPolicy(nn.Module):
    """Backbone + layout + tokenizers. ``backbone`` is the only module with parameters."""

    def __init__(
        self, backbone: LLaDAModelLM, layout: T2ISequenceLayout | DimooSequenceLayout, text_tokenizer: Any,
        image_tokenizer: Any
    ) -> None:
        super().__init__()
        head_rows = backbone.lm_head_weight.shape[0]
        if layout.image_columns.stop > head_rows:
            raise ValueError(f"layout needs {layout.image_columns.stop} LM-head columns, backbone has {head_rows}")
        if getattr(image_tokenizer, "codebook_size", layout.codebook_size) != layout.codebook_size:
            raise ValueError("image tokenizer codebook size differs from the layout's")
        self.backbone = backbone
        self.layout = layout
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head_weight.device

    @property
    def num_image_tokens(self) -> int:
        return self.layout.num_image_tokens

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    # -- inputs -------------------------------------------------------------------------------------------------
    def encode_prompts(self, texts: str | Sequence[str], keys: Sequence[str] | None = None) -> PromptTokens:
        """Tokenised prompts, left-padded to the layout's ``max_text_len`` (None, DiMOO as released: to the batch's
        longest prompt, nothing cut). ``keys``: the prompts' ids, named when the tokenizer reports a cut prompt."""
        if keys is None:
            ids, mask = self.text_tokenizer.encode(texts, max_length=self.layout.max_text_len)
        else:
            ids, mask = self.text_tokenizer.encode(texts, max_length=self.layout.max_text_len, keys=keys)
        return PromptTokens(ids.to(self.device), mask.to(self.device))

    def sequences(
        self, codes: torch.Tensor, prompt: PromptTokens, uncond: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full token sequences and attention masks for (B, N) codes (-1 = masked)."""
        p = prompt.dropped() if uncond else prompt
        return self.layout.build(p.ids.to(codes.device), p.mask.to(codes.device), codes)

    # -- logits -------------------------------------------------------------------------------------------------
    def _logits(
        self, codes: torch.Tensor, prompt: PromptTokens, positions: torch.Tensor | None, full_vocab: bool
    ) -> torch.Tensor:
        codes = codes.to(self.device)
        ids, attn = self.sequences(codes, prompt)
        img = self.layout.image_positions_in(ids.shape[1])  # DiMOO's depend on the batch's prompt length
        pos: slice | torch.Tensor
        if isinstance(img, slice):  # contiguous image part (MMaDA, toy)
            pos = img if positions is None else positions.to(self.device) + img.start
        else:  # DiMOO: code positions between the row newlines
            img = img.to(self.device)
            pos = img if positions is None else img[positions.to(self.device)]
        if full_vocab:  # reference path: all positions x all columns, then slice (benchmarks/tests only)
            logits = self.backbone(ids, attention_mask=attn).logits
            logits = select_positions(logits, pos)[..., self.layout.image_columns]
        else:
            hidden = self.backbone.final_hidden(ids, attn, pos)
            logits = self.backbone.project(hidden, self.layout.image_columns)
        return logits.float()

    def image_logits(
        self,
        codes: torch.Tensor,
        prompt: PromptTokens,
        uncond: bool = False,
        positions: torch.Tensor | None = None,
        full_vocab: bool = False,
    ) -> torch.Tensor:
        """Logits over image codes (B, N, codebook) (or (B, K, codebook) at ``positions``: (K,) or (B, K) indices
        into the N image tokens). ``uncond`` uses the empty prompt. float32."""
        return self._logits(codes, prompt.dropped() if uncond else prompt, positions, full_vocab)

    def guided_image_logits(
        self,
        codes: torch.Tensor,
        prompt: PromptTokens,
        guidance_scale: float = 0.0,
        positions: torch.Tensor | None = None,
        full_vocab: bool = False,
    ) -> torch.Tensor:
        """Classifier-free guidance ``(1+s)·cond − s·uncond`` from ONE forward over [cond; uncond] (same canvas).
        With s = 0 only the conditional half is computed."""
        if guidance_scale == 0:
            return self._logits(codes, prompt, positions, full_vocab)
        B = codes.shape[0]
        both = PromptTokens(
            torch.cat([prompt.ids, prompt.ids]), torch.cat([prompt.mask, torch.zeros_like(prompt.mask)])
        )
        pos2 = positions if positions is None or positions.dim() == 1 else torch.cat([positions, positions])
        logits = self._logits(torch.cat([codes, codes]), both, pos2, full_vocab)
        cond, unc = logits[:B], logits[B:]
        return (1.0 + guidance_scale) * cond - guidance_scale * unc

    # -- supervised warm start -----------------------------------------------------------------------------------
    def training_loss(
        self,
        codes: torch.Tensor,
        prompt: PromptTokens,
        generator: torch.Generator | None = None,
        cond_dropout: float = 0.1,
    ) -> MaskedDiffusionLoss:
        """MaskGIT / MMaDA text-to-image SFT loss.

        Per sample: t ~ U(0,1), mask ratio cos(π/2·t), round(ratio·N) tokens (at least 1) masked at random positions;
        the prompt is replaced by the empty prompt with probability ``cond_dropout``; cross-entropy on the masked image
        tokens only, over the image-code columns.
        """
        codes = codes.to(self.device).long()
        B, N = codes.shape
        dev = codes.device
        t = _rand((B,), generator, dev)
        n_mask = (torch.cos(0.5 * math.pi * t) * N).round().clamp(1, N).long()
        ranks = _rand((B, N), generator, dev).argsort(1).argsort(1)
        masked = ranks < n_mask[:, None]
        drop = _rand((B,), generator, dev) < cond_dropout
        logits = self._logits(codes.masked_fill(masked, MASKED), prompt.dropped(drop), None, False)
        target = codes[masked]
        pred = logits[masked]
        loss = F.cross_entropy(pred, target)
        with torch.no_grad():
            acc = (pred.argmax(-1) == target).float().mean()
        return MaskedDiffusionLoss(loss=loss, accuracy=acc, mask_ratio=masked.float().mean())

    # -- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """One folder: config.json + safetensors (backbone), t2i_layout.json, the tokenizers' files, policy.json
        (which tokenizer classes to load back and their settings)."""
        os.makedirs(directory, exist_ok=True)
        self.backbone.save_pretrained(directory)
        self.layout.save_pretrained(directory)
        self.text_tokenizer.save_pretrained(directory)
        self.image_tokenizer.save_pretrained(directory)
        meta = {
            "type": "masked_diffusion",
            "text_tokenizer": _class_path(self.text_tokenizer),
            "text_tokenizer_settings": getattr(self.text_tokenizer, "settings", lambda: {})(),
            "image_tokenizer": _class_path(self.image_tokenizer),
        }
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        text_tokenizer: Any = None,
        image_tokenizer: Any = None,
        layout: T2ISequenceLayout | DimooSequenceLayout | None = None,
        config_key: str = "policy.path",
        **backbone_kwargs: Any,
    ) -> MaskedDiffusionPolicy:
        """Load a folder written by :meth:`save_pretrained`. Tokenizers/layout can be passed instead (real models).
        The tokenizer classes are named in ``policy.json`` (older folders: the toy word/palette tokenizers)."""
        backbone = load_llada(directory, config_key=config_key, **backbone_kwargs)
        layout = layout or load_layout(directory)
        meta_path = os.path.join(directory, POLICY_FILE)
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        if text_tokenizer is None:
            text_cls = _resolve_class(meta.get("text_tokenizer"), "htgrpo.policies.tokenizers.WordTextTokenizer")
            text_tokenizer = text_cls.from_pretrained(directory, **meta.get("text_tokenizer_settings", {}))
        if image_tokenizer is None:
            image_cls = _resolve_class(meta.get("image_tokenizer"), "htgrpo.policies.tokenizers.PaletteImageTokenizer")
            image_tokenizer = image_cls.from_pretrained(directory)
        return cls(backbone, layout, text_tokenizer, image_tokenizer)


_LEGACY_NAMES = {
    "WordTextTokenizer": "htgrpo.policies.tokenizers.WordTextTokenizer",
    "PaletteImageTokenizer": "htgrpo.policies.tokenizers.PaletteImageTokenizer",
}


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _resolve_class(path: str | None, default: str) -> Any:
    """A class from its dotted path (``policy.json`` names the tokenizer classes; bare names are the toy ones)."""
    path = _LEGACY_NAMES.get(path or "", path or default)
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
