"""Text tokenizer adapter over transformers ``AutoTokenizer`` (the LLaDA tokenizer of MMaDA-8B and Lumina-DiMOO).

It follows the calling convention of the toy :class:`~htgrpo.policies.tokenizers.WordTextTokenizer`, so the
sequence layouts and the policy do not care which one they hold:

    encode(texts, max_length) -> (ids (B, max_length), attention_mask (B, max_length)), LEFT-padded

- ``template``: a format string the prompt is put into before tokenising (Lumina-DiMOO's system/user template);
  ``None`` tokenises the bare prompt (MMaDA, whose layout adds ``<|t2i|> <bos> … <eos>`` itself).
- ``add_special_tokens``: whether the checkpoint's tokenizer adds its own specials (``tokenizer(text)`` as the
  released code calls it). MMaDA's layout writes <bos>/<eos> itself, so it tokenises without them.
- ``keep_tail``: token ids kept at the end when a text is truncated (DiMOO keeps ``</user>`` so the template stays
  closed).
- ``max_length=None`` pads to the batch's longest text and cuts nothing (Lumina-DiMOO as released); a text cut to an
  int ``max_length`` is logged once (warning) with its id (:func:`report_cut_prompt`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def report_cut_prompt(reported: set[str], key: str | None, text: str, num_tokens: int, max_length: int) -> None:
    """Warn, once per prompt (``key``, else the text itself), that a prompt of ``num_tokens`` was cut to
    ``max_length`` tokens; ``reported`` holds the prompts already named."""
    name = key if key is not None else repr(text if len(text) <= 80 else text[:77] + "...")
    if name in reported:
        return
    reported.add(name)
    log.warning("prompt %s has %d tokens, more than the cap of %d (policy.max_text_len): it is cut to %d tokens "
                "(logged once per prompt)", name, num_tokens, max_length, max_length)


class TokenizerNotFoundError(FileNotFoundError):
    """The text tokenizer is neither in a local folder nor downloadable."""


def load_auto_tokenizer(path_or_id: str | os.PathLike, padding_side: str = "left",
                        config_key: str = "policy.pretrained", repo_hint: str = "Gen-Verse/MMaDA-8B-Base") -> Any:
    """``AutoTokenizer.from_pretrained`` with an actionable error (names ``config_key`` and the repo id)."""
    from transformers import AutoTokenizer

    name = str(path_or_id)
    try:
        # trust_remote_code=False: the released config.json files carry an ``auto_map`` to custom modeling code, which
        # would make transformers ask on stdin; the tokenizer itself is a plain fast tokenizer and needs none.
        return AutoTokenizer.from_pretrained(name, padding_side=padding_side, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        folder = "/path/to/" + repo_hint.split("/")[-1]
        raise TokenizerNotFoundError(
            f"cannot load the text tokenizer from {name!r} ({type(err).__name__}: {err}). The checkpoint folder must "
            f"hold tokenizer.json / tokenizer_config.json. Download the checkpoint with `hf download {repo_hint} "
            f"--local-dir {folder}` and set `{config_key}={folder}`.") from err


class HFTextTokenizer:
    """A transformers tokenizer seen through the project's text-tokenizer interface."""

    def __init__(self, tokenizer: Any, template: str | None = None, add_special_tokens: bool = False,
                 keep_tail: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.add_special_tokens = bool(add_special_tokens)
        self.keep_tail = [int(i) for i in keep_tail]
        self.reported_cuts: set[str] = set()  # prompts already logged as cut (each is named once)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, padding_side: str = "left",
                        config_key: str = "policy.pretrained", repo_hint: str = "Gen-Verse/MMaDA-8B-Base",
                        **kwargs: Any) -> HFTextTokenizer:
        return cls(load_auto_tokenizer(path_or_id, padding_side, config_key, repo_hint), **kwargs)

    # -- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: base vocabulary plus added tokens (MMaDA's image-code offset)."""
        return len(self.tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def token_id(self, token: str) -> int | None:
        """Id of ``token`` if the vocabulary has it as a whole token (not the unknown id), else None."""
        vocab = self.tokenizer.get_vocab()
        return int(vocab[token]) if token in vocab else None

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    # -- encoding -----------------------------------------------------------------------------------------------
    def apply_template(self, text: str) -> str:
        return text if self.template is None else self.template.format(prompt=text)

    def token_ids(self, text: str) -> list[int]:
        """Ids of one text after the template, as the checkpoint's tokenizer gives them (no padding)."""
        return list(self.tokenizer(self.apply_template(text), add_special_tokens=self.add_special_tokens)["input_ids"])

    def encode(self, texts: str | Sequence[str], max_length: int | None,
               keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, attention_mask), both (B, L) long, LEFT-padded with the pad id (mask 0 there).

        L = ``max_length``; longer texts keep their start, plus ``keep_tail`` at the end (the template's closing
        tokens), and each cut text is logged once, named by its entry in ``keys`` (the prompts' ids) when given.
        ``max_length=None``: L = the longest text of the batch, nothing is cut.
        """
        if isinstance(texts, str):
            texts = [texts]
        if keys is not None and len(keys) != len(texts):
            raise ValueError(f"got {len(keys)} prompt keys for {len(texts)} texts")
        rows = [self.token_ids(text) for text in texts]
        if max_length is None:
            max_length = max((len(toks) for toks in rows), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.full((len(texts), max_length), int(pad), dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, (text, toks) in enumerate(zip(texts, rows)):
            if len(toks) > max_length:
                report_cut_prompt(self.reported_cuts, None if keys is None else str(keys[row]), text, len(toks),
                                  max_length)
                tail = self.keep_tail if toks[-len(self.keep_tail):] == self.keep_tail and self.keep_tail else []
                toks = toks[: max_length - len(tail)] + tail
            if toks:
                ids[row, max_length - len(toks):] = torch.tensor(toks, dtype=torch.long)
                mask[row, max_length - len(toks):] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = True) -> str | list[str]:
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [self.decode(row, skip_special_tokens) for row in ids]
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(seq, skip_special_tokens=skip_special_tokens)

    def settings(self) -> dict[str, Any]:
        """Constructor settings besides the tokenizer itself (saved in ``policy.json`` to load the policy back)."""
        return {"template": self.template, "add_special_tokens": self.add_special_tokens, "keep_tail": self.keep_tail}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tokenizer's files, readable by transformers 4.45/4.46 too (see ``folder_compat``)."""
        from htgrpo.policies.folder_compat import save_tokenizer

        save_tokenizer(self.tokenizer, directory)

    def __repr__(self) -> str:
        name = type(self.tokenizer).__name__
        return f"HFTextTokenizer({name}, vocab_size={self.vocab_size}, template={self.template!r})"
