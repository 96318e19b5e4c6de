"""ShapesWorld's tokenizers: a lossless palette image tokenizer and a small word-level text tokenizer.

They play the roles of MAGVIT-v2 / the aMUSEd VQ (image) and the LLaDA tokenizer (text) for the toy policies, with
the same calling conventions the real adapters follow:

- image: ``encode(uint8 (B,3,H,W)) -> LongTensor (B, N)`` row-major codes, ``decode(codes) -> uint8 (B,3,H,W)``;
- text: ``encode(texts, max_length) -> (ids, attention_mask)`` **left-padded** like MMaDA's prompting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from htgrpo.data.shapes.palette import PALETTE_NAMES, PALETTE_RGB, SHAPES
from htgrpo.policies.text_tokenizers import report_cut_prompt

IMAGE_TOKENIZER_FILE = "image_tokenizer.json"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Image: one palette index per grid cell
# ----------------------------------------------------------------------------------------------------------------


class PaletteImageTokenizer:
    """Image <-> one code per cell: the nearest palette colour to the cell's mean colour (codebook = palette)."""

    def __init__(self, grid_size: int = 16, cell_px: int = 8, palette: Sequence[Sequence[int]] = PALETTE_RGB) -> None:
        if grid_size < 1 or cell_px < 1:
            raise ValueError(f"grid_size and cell_px must be >= 1, got {grid_size}, {cell_px}")
        self.grid_size = int(grid_size)
        self.cell_px = int(cell_px)
        self.palette = torch.tensor([list(map(int, c)) for c in palette], dtype=torch.uint8)  # (K, 3)
        if self.palette.dim() != 2 or self.palette.shape[1] != 3:
            raise ValueError("palette must be a list of RGB triples")

    @property
    def codebook_size(self) -> int:
        return int(self.palette.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def image_px(self) -> int:
        return self.grid_size * self.cell_px

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) with H = W = grid_size*cell_px (float images are read as [0, 1]) -> (B, N) long."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_px, self.image_px):
            raise ValueError(f"expected {self.image_px}x{self.image_px} images, got {tuple(images.shape[-2:])}")
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        cells = F.avg_pool2d(x, self.cell_px)  # (B, 3, G, G) mean colour per cell
        cells = cells.flatten(2).transpose(1, 2)  # (B, N, 3), row-major
        pal = self.palette.to(device=cells.device, dtype=torch.float32)
        dist = ((cells[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # (B, N, K)
        return dist.argmin(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes in [0, codebook_size) -> uint8 (B, 3, H, W), each cell filled with its colour."""
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected codes (B, {self.num_tokens}), got {tuple(codes.shape)}")
        if bool((codes < 0).any()) or bool((codes >= self.codebook_size).any()):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); masked (-1) tokens cannot be decoded")
        g = self.grid_size
        rgb = self.palette.to(codes.device)[codes]  # (B, N, 3)
        img = rgb.view(-1, g, g, 3).permute(0, 3, 1, 2)  # (B, 3, G, G)
        return img.repeat_interleave(self.cell_px, dim=2).repeat_interleave(self.cell_px, dim=3).contiguous()

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "type": "palette",
            "grid_size": self.grid_size,
            "cell_px": self.cell_px,
            "palette": self.palette.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PaletteImageTokenizer:
        if d.get("type", "palette") != "palette":
            raise ValueError(f"not a palette image tokenizer: type={d.get('type')!r}")
        return cls(grid_size=d["grid_size"], cell_px=d["cell_px"], palette=d.get("palette", PALETTE_RGB))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, IMAGE_TOKENIZER_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PaletteImageTokenizer:
        with open(os.path.join(directory, IMAGE_TOKENIZER_FILE)) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        g, c, k = self.grid_size, self.cell_px, self.codebook_size
        return f"PaletteImageTokenizer(grid_size={g}, cell_px={c}, codebook_size={k})"


# ----------------------------------------------------------------------------------------------------------------
# Text: word level
# ----------------------------------------------------------------------------------------------------------------

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_WORD_RE = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case and split into words and single punctuation marks: "A red, big circle." -> a red , big circle ."""
    return _WORD_RE.findall(text.lower())


class WordTextTokenizer:
    """Word-level tokenizer: ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3, then the vocabulary."""

    def __init__(self, vocabulary: Iterable[str]) -> None:
        tokens = list(SPECIAL_TOKENS)
        seen = set(tokens)
        for word in vocabulary:
            for w in split_words(word) if word not in SPECIAL_TOKENS else [word]:
                if w not in seen:
                    seen.add(w)
                    tokens.append(w)
        self.tokens: list[str] = tokens
        self.index: dict[str, int] = {w: i for i, w in enumerate(tokens)}
        self.reported_cuts: set[str] = set()  # prompts already logged as cut (each is named once)

    pad_token_id = 0
    unk_token_id = 1
    bos_token_id = 2
    eos_token_id = 3

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in split_words(text)]

    def encode(
        self, texts: str | Sequence[str], max_length: int, add_special_tokens: bool = False,
        keys: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids (B, max_length) long, attention_mask (B, max_length) long), LEFT-padded with <pad>.

        Texts longer than ``max_length`` keep their start; each cut text is logged once, named by its entry in
        ``keys`` (the prompts' ids) when given. ``add_special_tokens`` wraps each text in <bos> … <eos> (inside
        max_length, <eos> kept on truncation). The T2I layout adds its own specials, so the default is off.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < (2 if add_special_tokens else 0):
            raise ValueError(f"max_length too small: {max_length}")
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            toks = self.tokenize(text)
            if len(toks) > max_length - (2 if add_special_tokens else 0):
                report_cut_prompt(self.reported_cuts, None if keys is None else str(keys[row]), text, len(toks),
                                  max_length)
            if add_special_tokens:
                toks = [self.bos_token_id, *toks[: max_length - 2], self.eos_token_id]
            else:
                toks = toks[:max_length]
            if toks:
                ids[row, max_length - len(toks) :] = torch.tensor(toks, dtype=torch.long)
                mask[row, max_length - len(toks) :] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = True) -> str | list[str]:
        """(L,) -> str, (B, L) -> list[str]. Punctuation is attached to the previous word."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [self.decode(row, skip_special_tokens) for row in ids]
        words = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            w = self.tokens[i] if 0 <= i < len(self.tokens) else UNK
            if skip_special_tokens and w in (PAD, BOS, EOS):
                continue
            words.append(w)
        text = " ".join(words)
        return re.sub(r" ([^\sa-z0-9<])", r"\1", text)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "word", "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> WordTextTokenizer:
        if d.get("type", "word") != "word":
            raise ValueError(f"not a word tokenizer: type={d.get('type')!r}")
        tokens = d["tokens"]
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        tok = cls(tokens[len(SPECIAL_TOKENS) :])
        if tok.tokens != tokens:
            raise ValueError("saved vocabulary is not in canonical form (duplicates or unsplit entries)")
        return tok

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TEXT_TOKENIZER_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> WordTextTokenizer:
        with open(os.path.join(directory, TEXT_TOKENIZER_FILE)) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        return f"WordTextTokenizer(vocab_size={self.vocab_size})"


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def shapes_vocabulary(extra: Iterable[str] = ()) -> list[str]:
    """A default word list covering GenEval-style ShapesWorld prompts (colours, shapes and plurals, counts, positions,
    sizes). Prompt generators should pass their own complete vocabulary; words outside it become <unk>."""
    words = [
        "a", "an", "the", "photo", "of", "and", "is", "are", "on", "to", "in", "with", "there", "image", "picture",
        "left", "right", "above", "below", "top", "bottom", "next", "near", "small", "large", "big", "medium",
        "background", "grey", "gray", "object", "objects", "shape", "shapes", ".", ",",
    ]
    words += [c for c in PALETTE_NAMES if c != "background"]
    for s in SHAPES:
        words += [s, s + ("es" if s.endswith(("s", "x", "sh", "ch")) else "s")]
    words += list(NUMBER_WORDS)
    words += list(extra)
    return words
