"""Text-to-image token sequences: where the prompt, the special tokens and the image codes sit.

Two layouts share one interface (``build``, ``image_positions``, ``image_positions_in``, ``image_columns``, ``mask``,
``codebook_size``, ``num_image_tokens``, ``max_text_len``, ``seq_len``, ``save_pretrained``):

:class:`T2ISequenceLayout` — MMaDA's (reference/htgrpo_mmada_dimoo.md §3.4, §3.6), also used by the toy policy:

    [pad]*k  <t2i> <bos> text… <eos>  <soi>  N × image  <eoi>
    |------ prefix: max_text_len + 3, left-padded ------|       |

:class:`DimooSequenceLayout` — Lumina-DiMOO's (reference §5.3, §5.4):

    [pad]*k  tok(system/user template with the prompt)  <answer> <Image>  rows × (cols codes, newline)  </Image> </answer>

Image tokens are ``code + image_token_offset``; masked image tokens are ``mask``. The attention mask is 0 on pads.
``T2ISequenceLayout.mmada()`` has MMaDA's documented ids; ``T2ISequenceLayout.toy()`` lays out a small vocabulary:
text tokenizer ids, then ``<t2i> <soi> <eoi> <mask>``, then the image codes. Real checkpoints get their ids from
their config and tokenizer (:mod:`htgrpo.policies.pretrained`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

LAYOUT_FILE = "t2i_layout.json"
MASKED = -1
"""Image-code value meaning "still masked" in (B, N) code tensors."""


def left_pad(rows: list[torch.Tensor], length: int, pad: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows, each right-aligned in a (B, length) tensor filled with ``pad``, and the attention mask (1 on the
    rows' tokens, 0 on the pads); long tensors on ``like``'s device. Every row must hold at most ``length`` tokens."""
    ids = torch.full((len(rows), length), pad, dtype=torch.long, device=like.device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=like.device)
    for b, row in enumerate(rows):
        ids[b, length - row.numel():] = row
        mask[b, length - row.numel():] = 1
    return ids, mask


def codes_to_ids(image_tokens: torch.Tensor, num_image_tokens: int, offset: int, mask_id: int) -> torch.Tensor:
    """(B, N) image codes (-1 = masked) -> vocabulary ids: code + ``offset``, or ``mask_id`` where masked.

    Raises ValueError unless N = ``num_image_tokens``."""
    if image_tokens.shape[-1] != num_image_tokens:
        raise ValueError(f"expected {num_image_tokens} image tokens, got {image_tokens.shape[-1]}")
    return torch.where(image_tokens < 0, torch.full_like(image_tokens, mask_id), image_tokens + offset)


@dataclass(frozen=True)
class T2ISequenceLayout:
    """Token ids and sizes of the text-to-image sequence.

    ``max_text_len`` counts text tokens only (between <bos> and <eos>): the prefix is max_text_len + 3 long.
    MMaDA's ``max_text_len: L`` setting corresponds to L - 2 here (its prefix is L + 1 = <t2i> <bos> text <eos>).
    """

    pad: int
    t2i: int
    bos: int
    eos: int
    soi: int
    eoi: int
    mask: int
    image_token_offset: int
    codebook_size: int
    num_image_tokens: int
    max_text_len: int

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def toy(
        cls, text_tokenizer: Any, codebook_size: int, num_image_tokens: int, max_text_len: int
    ) -> T2ISequenceLayout:
        """Toy vocabulary: [text tokenizer ids] <t2i> <soi> <eoi> <mask> [codebook_size image codes]."""
        v = int(text_tokenizer.vocab_size)
        return cls(
            pad=int(text_tokenizer.pad_token_id),
            t2i=v,
            bos=int(text_tokenizer.bos_token_id),
            eos=int(text_tokenizer.eos_token_id),
            soi=v + 1,
            eoi=v + 2,
            mask=v + 3,
            image_token_offset=v + 4,
            codebook_size=int(codebook_size),
            num_image_tokens=int(num_image_tokens),
            max_text_len=int(max_text_len),
        )

    @classmethod
    def mmada(cls, num_image_tokens: int = 1024, max_text_len: int = 254) -> T2ISequenceLayout:
        """MMaDA-8B's ids. Defaults: 512px (32x32 codes); max_text_len 254 = MMaDA/MaskGRPO's L = 256 (length 1283)."""
        return cls(
            pad=126093,  # [iPAD]
            t2i=126088,
            bos=126080,
            eos=126081,
            soi=126084,
            eoi=126085,
            mask=126336,
            image_token_offset=126349,
            codebook_size=8192,
            num_image_tokens=int(num_image_tokens),
            max_text_len=int(max_text_len),
        )

    # -- geometry -----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary holding every id of this layout (the LM head may be wider)."""
        specials = (self.pad, self.t2i, self.bos, self.eos, self.soi, self.eoi, self.mask)
        return max(self.image_token_offset + self.codebook_size, max(specials) + 1)

    @property
    def prefix_len(self) -> int:
        return self.max_text_len + 3

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_image_tokens + 2

    @property
    def image_positions(self) -> slice:
        """Positions of the N image tokens in the sequence (between <soi> and <eoi>)."""
        start = self.prefix_len + 1
        return slice(start, start + self.num_image_tokens)

    def image_positions_in(self, seq_len: int) -> slice:
        """Image positions of a built sequence of ``seq_len`` tokens: :attr:`image_positions` (fixed width)."""
        return self.image_positions

    @property
    def image_columns(self) -> slice:
        """LM-head columns of the image codes."""
        return slice(self.image_token_offset, self.image_token_offset + self.codebook_size)

    # -- building sequences -------------------------------------------------------------------------------------
    def prefix(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L) (valid where text_mask = 1, any padding side) -> left-padded
        ``[pad]* <t2i> <bos> text <eos>`` (B, prefix_len) and its attention mask. Longer texts keep their start."""
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        keep = text_mask.to(torch.bool)
        rows = []
        for b in range(text_ids.shape[0]):
            words = text_ids[b][keep[b]][: self.max_text_len]
            rows.append(torch.cat([text_ids.new_tensor([self.t2i, self.bos]), words, text_ids.new_tensor([self.eos])]))
        return left_pad(rows, self.prefix_len, self.pad, text_ids)

    def image_ids(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) codes with -1 = masked -> vocabulary ids (code + offset, or the mask id)."""
        return codes_to_ids(image_tokens, self.num_image_tokens, self.image_token_offset, self.mask)

    def build(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor | None, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full sequence (B, seq_len) and attention mask for text tokens and (B, N) image codes (-1 = masked)."""
        pre_ids, pre_mask = self.prefix(text_ids, text_mask)
        return self.build_from_prefix(pre_ids, pre_mask, image_tokens)

    def build_from_prefix(
        self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`build` with an already built prefix (reuse it across sampling steps)."""
        B = image_tokens.shape[0]
        if prefix_ids.shape[0] != B:
            raise ValueError(f"prefix batch {prefix_ids.shape[0]} != image batch {B}")
        dev = image_tokens.device
        soi = torch.full((B, 1), self.soi, dtype=torch.long, device=dev)
        eoi = torch.full((B, 1), self.eoi, dtype=torch.long, device=dev)
        ids = torch.cat([prefix_ids.to(dev), soi, self.image_ids(image_tokens.long()), eoi], dim=1)
        ones = torch.ones((B, self.num_image_tokens + 2), dtype=torch.long, device=dev)
        mask = torch.cat([prefix_mask.to(dev), ones], dim=1)
        return ids, mask

    def uncond_text(self, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty text for ``batch`` rows: (ids, mask) of shape (batch, max_text_len), all padding, so that
        :meth:`build` yields the unconditional prompt ``[pad]* <t2i> <bos> <eos>`` of the same length."""
        ids = torch.full((batch, self.max_text_len), self.pad, dtype=torch.long, device=device)
        return ids, torch.zeros_like(ids)

    def special_ids(self) -> dict[str, int]:
        """Name -> id of every special token of the layout."""
        return {"pad": self.pad, "t2i": self.t2i, "bos": self.bos, "eos": self.eos, "soi": self.soi, "eoi": self.eoi,
                "mask": self.mask}

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> T2ISequenceLayout:
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"layout dict is missing {sorted(missing)}")
        return cls(**{k: int(d[k]) for k in names})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LAYOUT_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> T2ISequenceLayout:
        with open(os.path.join(directory, LAYOUT_FILE)) as f:
            return cls.from_dict(json.load(f))


@dataclass(frozen=True)
class DimooSequenceLayout:
    """Lumina-DiMOO's text-to-image sequence (reference §5.3–§5.5).

    The prompt part is the *templated* prompt (system + user template around the prompt), left-padded, then
    ``<answer> <Image>``, the rows × (cols + 1) image part (each row of codes followed by the newline token) and
    ``</Image> </answer>``. ``max_text_len``: ``None`` (the released behaviour) never truncates: a batch's prompt
    part is as long as its longest prompt, so positions depend on the batch (:meth:`image_positions_in`); an int
    fixes the prompt part at that many tokens (prompts are cut to it by the text tokenizer, keeping ``</user>``).
    ``uncond_ids`` is the tokenised ``<uncondition>`` prompt; a prompt whose text mask is all zero
    (``PromptTokens.dropped``) is replaced by it, so CFG's unconditional sequence is ``tok(uncond) + <answer> <Image>
    + the same canvas`` as in the released ``generate_image``.

    ``padding_mask``: the released code samples one prompt at a time and passes no padding mask; batching here
    left-pads prompts of different lengths. ``True`` (default) masks the pads, which reproduces the released
    one-prompt-at-a-time logits exactly (RoPE only sees relative positions). ``False`` passes no mask, so pads are
    attended — what the released model computes if it is fed a padded batch (and what MaskGRPO's log-prob pass does).
    """

    pad: int
    mask: int
    newline: int
    answer_start: int
    answer_end: int
    boi: int
    eoi: int
    image_token_offset: int
    codebook_size: int
    rows: int
    cols: int
    max_text_len: int | None
    uncond_ids: tuple[int, ...]
    padding_mask: bool = True

    def __post_init__(self) -> None:
        if self.max_text_len is not None and len(self.uncond_ids) > self.max_text_len:
            raise ValueError(f"the unconditional prompt has {len(self.uncond_ids)} tokens, more than max_text_len "
                             f"({self.max_text_len})")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"image grid must be at least 1x1, got {self.rows}x{self.cols}")

    # -- geometry -----------------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def suffix_len(self) -> int:
        """Tokens after the prompt part: ``<answer> <Image>``, rows × (cols + 1), ``</Image> </answer>``."""
        return 2 + self.rows * (self.cols + 1) + 2

    def _fixed_prompt_len(self) -> int:
        if self.max_text_len is None:
            raise ValueError("this DiMOO layout has no fixed prompt length (max_text_len = None: a batch's prompt part "
                             "is as long as its longest prompt); use image_positions_in(seq_len) on a built sequence")
        return self.max_text_len

    @property
    def code_start(self) -> int:
        """Position of the first image code (the released code's ``code_start``) with a fixed ``max_text_len``."""
        return self._fixed_prompt_len() + 2

    @property
    def seq_len(self) -> int:
        """Sequence length with a fixed ``max_text_len``."""
        return self._fixed_prompt_len() + self.suffix_len

    @property
    def vocab_size(self) -> int:
        specials = self.special_ids().values()
        return max(self.image_token_offset + self.codebook_size, max(specials) + 1, max(self.uncond_ids, default=0) + 1)

    @property
    def image_positions(self) -> torch.Tensor:
        """(N,) sequence positions of the image codes with a fixed ``max_text_len`` (see :meth:`image_positions_in`)."""
        return self.image_positions_in(self.seq_len)

    def image_positions_in(self, seq_len: int) -> torch.Tensor:
        """(N,) positions of the image codes, row-major (newlines skipped), in a built sequence of ``seq_len``
        tokens: code_start = seq_len − suffix_len + 2 (the released ``len(prompt tokens) + 2``)."""
        code_start = int(seq_len) - self.suffix_len + 2
        r = torch.arange(self.rows)[:, None]
        c = torch.arange(self.cols)[None, :]
        return (code_start + r * (self.cols + 1) + c).reshape(-1)

    @property
    def image_columns(self) -> slice:
        return slice(self.image_token_offset, self.image_token_offset + self.codebook_size)

    def special_ids(self) -> dict[str, int]:
        return {"pad": self.pad, "mask": self.mask, "newline": self.newline, "answer_start": self.answer_start,
                "answer_end": self.answer_end, "boi": self.boi, "eoi": self.eoi}

    # -- building sequences -------------------------------------------------------------------------------------
    def prefix(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Templated prompt tokens (B, L) (valid where text_mask = 1) -> left-padded (B, P) and mask: P =
        ``max_text_len``, or with ``max_text_len = None`` the longest row (one prompt: no padding, as released).
        Rows with no valid token become the unconditional prompt."""
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        keep = text_mask.to(torch.bool)
        uncond = text_ids.new_tensor(self.uncond_ids)
        rows = []
        for b in range(text_ids.shape[0]):
            row = text_ids[b][keep[b]] if bool(keep[b].any()) else uncond
            if self.max_text_len is not None and row.numel() > self.max_text_len:
                raise ValueError(f"prompt has {row.numel()} tokens, more than max_text_len ({self.max_text_len})")
            rows.append(row)
        width = self.max_text_len if self.max_text_len is not None else max(row.numel() for row in rows)
        return left_pad(rows, width, self.pad, text_ids)

    def image_part(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) codes (-1 = masked) -> (B, rows·(cols+1)) ids: each row of codes followed by the newline."""
        ids = codes_to_ids(image_tokens, self.num_image_tokens, self.image_token_offset, self.mask)
        B = ids.shape[0]
        newline = torch.full((B, self.rows, 1), self.newline, dtype=torch.long, device=ids.device)
        return torch.cat([ids.view(B, self.rows, self.cols), newline], dim=2).reshape(B, -1)

    def build(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None, image_tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        pre_ids, pre_mask = self.prefix(text_ids, text_mask)
        return self.build_from_prefix(pre_ids, pre_mask, image_tokens)

    def build_from_prefix(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, image_tokens: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        B, dev = image_tokens.shape[0], image_tokens.device
        head = torch.tensor([self.answer_start, self.boi], dtype=torch.long, device=dev).expand(B, 2)
        tail = torch.tensor([self.eoi, self.answer_end], dtype=torch.long, device=dev).expand(B, 2)
        ids = torch.cat([prefix_ids.to(dev), head, self.image_part(image_tokens.long()), tail], dim=1)
        mask = torch.cat([prefix_mask.to(dev), torch.ones((B, ids.shape[1] - prefix_mask.shape[1]),
                                                          dtype=torch.long, device=dev)], dim=1)
        if not self.padding_mask:  # released behaviour: no padding mask, pads are attended
            mask = torch.ones_like(mask)
        return ids, mask

    def uncond_text(self, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.max_text_len if self.max_text_len is not None else len(self.uncond_ids)
        ids = torch.full((batch, width), self.pad, dtype=torch.long, device=device)
        return ids, torch.zeros_like(ids)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["uncond_ids"] = list(self.uncond_ids)
        d["kind"] = "dimoo"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DimooSequenceLayout:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["uncond_ids"] = tuple(int(i) for i in kw.get("uncond_ids", ()))
        return cls(**kw)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LAYOUT_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def load_layout(directory: str | os.PathLike) -> T2ISequenceLayout | DimooSequenceLayout:
    """The layout saved in ``directory`` (``t2i_layout.json``; no ``kind`` = MMaDA/toy layout)."""
    with open(os.path.join(directory, LAYOUT_FILE)) as f:
        d = json.load(f)
    if d.pop("kind", "mmada") == "dimoo":
        return DimooSequenceLayout.from_dict(d)
    return T2ISequenceLayout.from_dict(d)
