"""Palette image tokenizer, word text tokenizer and the MMaDA text-to-image layout."""

from __future__ import annotations

import torch

from htgrpo.data.shapes.palette import PALETTE_RGB
from htgrpo.policies.t2i_layout import T2ISequenceLayout
from htgrpo.policies.tokenizers import PaletteImageTokenizer, WordTextTokenizer, shapes_vocabulary


def test_palette_tokenizer_is_lossless(tmp_path):
    tok = PaletteImageTokenizer(grid_size=16, cell_px=8)
    assert tok.codebook_size == 11 and tok.num_tokens == 256
    codes = torch.randint(0, 11, (3, 256), generator=torch.Generator().manual_seed(0))
    images = tok.decode(codes)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 128, 128)
    assert torch.equal(tok.encode(images), codes)
    # cell (row 1, col 2) is filled with its palette colour, row-major
    assert images[0, :, 8:16, 16:24].flatten(1).unique(dim=1).T.tolist() == [list(PALETTE_RGB[codes[0, 16 + 2]])]
    noisy = (images.int() + torch.randint(-20, 21, images.shape)).clamp(0, 255).to(torch.uint8)
    assert torch.equal(tok.encode(noisy), codes)  # mean colour per cell -> nearest palette colour
    tok.save_pretrained(tmp_path)
    again = PaletteImageTokenizer.from_pretrained(tmp_path)
    assert torch.equal(again.decode(codes), images)


def test_word_tokenizer_left_pads_truncates_and_round_trips(tmp_path):
    tok = WordTextTokenizer(["a", "photo", "of", "red", "circle", "blue", "square", "and", ".", ","])
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids, mask = tok.encode(["A photo of a red circle.", "a blue square, and a purple circle."], max_length=8)
    assert ids.shape == mask.shape == (2, 8)
    # row 0: 7 tokens, left-padded by one
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1] and ids[0, 0] == tok.pad_token_id
    assert tok.decode(ids[0]) == "a photo of a red circle."
    # row 1: 9 tokens truncated to the first 8 ("purple" is unknown)
    assert mask[1].all() and tok.decode(ids[1]) == "a blue square, and a <unk> circle"
    assert ids[1, 6] == tok.unk_token_id
    with_specials, _ = tok.encode("red circle", max_length=5, add_special_tokens=True)
    assert with_specials[0].tolist() == [0, 2, tok.index["red"], tok.index["circle"], 3]
    tok.save_pretrained(tmp_path)
    again = WordTextTokenizer.from_pretrained(tmp_path)
    assert again.tokens == tok.tokens and again.vocab_size == tok.vocab_size


def test_toy_layout_builds_mmada_sequence():
    text_tok = WordTextTokenizer(shapes_vocabulary())
    layout = T2ISequenceLayout.toy(text_tok, codebook_size=11, num_image_tokens=6, max_text_len=5)
    v = text_tok.vocab_size
    ids_ = (layout.t2i, layout.soi, layout.eoi, layout.mask, layout.image_token_offset)
    assert ids_ == (v, v + 1, v + 2, v + 3, v + 4)
    assert layout.vocab_size == v + 4 + 11
    ids, tmask = text_tok.encode(["red circle", "a b c d e f g"], max_length=5)
    codes = torch.tensor([[0, 1, -1, 10, -1, 3], [-1] * 6])
    seq, attn = layout.build(ids, tmask, codes)
    assert seq.shape == attn.shape == (2, layout.seq_len) == (2, 5 + 3 + 6 + 2)
    red, circle = text_tok.index["red"], text_tok.index["circle"]
    assert seq[0, :8].tolist() == [0, 0, 0, layout.t2i, layout.bos, red, circle, layout.eos]
    assert attn[0].tolist() == [0, 0, 0] + [1] * 13
    assert seq[0, 8] == layout.soi and seq[0, -1] == layout.eoi
    img = seq[0, layout.image_positions].tolist()
    off, m = layout.image_token_offset, layout.mask
    assert img == [off, off + 1, m, off + 10, m, off + 3]
    # too long text keeps its start (5 tokens) and the <eos>
    assert seq[1, 0] == layout.t2i and seq[1, 7] == layout.eos and attn[1].all()
    # unconditional prompt: <t2i> <bos> <eos>, left-padded to the same length
    useq, uattn = layout.build(*layout.uncond_text(2), codes)
    assert useq[0, :8].tolist() == [0] * 5 + [layout.t2i, layout.bos, layout.eos]
    assert uattn[0, :8].tolist() == [0] * 5 + [1] * 3 and useq.shape == seq.shape
    assert T2ISequenceLayout.from_dict(layout.to_dict()) == layout


def test_mmada_layout_ids():
    layout = T2ISequenceLayout.mmada()
    assert (layout.mask, layout.image_token_offset, layout.codebook_size) == (126336, 126349, 8192)
    assert (layout.soi, layout.eoi, layout.t2i, layout.pad, layout.bos, layout.eos) == (
        126084, 126085, 126088, 126093, 126080, 126081,
    )
    assert layout.seq_len == 1283  # MaskGRPO: L = 256 text, 1024 image tokens
    assert layout.image_columns == slice(126349, 126349 + 8192)
    assert layout.image_positions == slice(1283 - 1025, 1283 - 1)  # MMaDA reads [-(N+1):-1]
