"""Lumina-DiMOO prompts as released: never truncated by default; a cap is an explicit option that logs each cut prompt.

The released ``inference_t2i.py`` tokenises the templated prompt whole (``tokenizer(input_prompt)["input_ids"]``),
builds ``prompt tokens + <answer> <Image> + image part + </Image> </answer>`` and sets ``code_start =
len(prompt tokens) + 2``. With ``policy.max_text_len: null`` (default) one prompt gives exactly that sequence, and a
batch is left-padded to its longest prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from htgrpo.config import ConfigError
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.policies.generators import PolicyImageGenerator, SamplerSettings
from htgrpo.policies.pretrained import DIMOO_TEMPLATE, build_dimoo_policy
from htgrpo.policies.t2i_layout import MASKED

LONG = "a photo of " + " and ".join(["a purple giraffe next to an orange umbrella under a green tree"] * 12)
SHORT = "a red cat"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from htgrpo.tiny_checkpoint import main

    out = tmp_path_factory.mktemp("tiny") / "dimoo"
    main(["dimoo", str(out)])
    return out


@pytest.fixture(scope="module")
def uncapped(folder):
    return build_dimoo_policy(str(folder), resolution=[32, 64], dtype="float32").eval()


@pytest.fixture(scope="module")
def capped(folder):
    return build_dimoo_policy(str(folder), resolution=[32, 64], max_text_len=48, dtype="float32").eval()


def released_sequence(policy, prompt: str, codes: torch.Tensor) -> tuple[list[int], int]:
    """The released t2i sequence of one prompt (inference_t2i.py + generate_image), and its code_start."""
    tok = policy.text_tokenizer.tokenizer
    con_prompt_token = tok(DIMOO_TEMPLATE.format(prompt=prompt))["input_ids"]
    lay = policy.layout
    image_part = []
    for r in range(lay.rows):
        image_part += [int(c) + lay.image_token_offset for c in codes[r * lay.cols:(r + 1) * lay.cols]] + [lay.newline]
    ids = con_prompt_token + [lay.answer_start, lay.boi] + image_part + [lay.eoi, lay.answer_end]
    return ids, len(con_prompt_token) + 2


def test_long_prompt_is_not_cut_by_default(uncapped, caplog):
    full = uncapped.text_tokenizer.token_ids(LONG)
    assert len(full) > 128  # longer than the old fixed cap
    codes = torch.arange(uncapped.num_image_tokens)
    with caplog.at_level(logging.WARNING):
        prompt = uncapped.encode_prompts([LONG], keys=["dpg:long"])
    assert not [r for r in caplog.records if "cut" in r.getMessage()]
    assert prompt.ids[0].tolist() == full and int(prompt.mask.sum()) == len(full)  # whole, no padding
    ids, attn = uncapped.sequences(codes[None], prompt)
    expected, code_start = released_sequence(uncapped, LONG, codes)
    assert ids[0].tolist() == expected and bool(attn.bool().all())
    positions = uncapped.layout.image_positions_in(ids.shape[1])
    assert int(positions[0]) == code_start
    assert ids[0, positions].tolist() == (codes + uncapped.layout.image_token_offset).tolist()


def test_batch_is_padded_to_its_longest_prompt(uncapped):
    """Two prompts: width = the longer one's tokens; the short one is left-padded and, with the padding mask, its
    logits (and CFG's, whose unconditional rows share the width) equal its logits alone."""
    batch = uncapped.encode_prompts([SHORT, LONG])
    n_short, n_long = (len(uncapped.text_tokenizer.token_ids(t)) for t in (SHORT, LONG))
    assert batch.ids.shape == (2, n_long) and batch.mask.sum(1).tolist() == [n_short, n_long]
    canvas = torch.full((2, uncapped.num_image_tokens), MASKED)
    canvas[:, :3] = torch.tensor([5, 6, 7])
    with torch.no_grad():
        both = uncapped.guided_image_logits(canvas, batch, 4.0)
        alone = [uncapped.guided_image_logits(canvas[i:i + 1], uncapped.encode_prompts([t]), 4.0)
                 for i, t in enumerate((SHORT, LONG))]
    torch.testing.assert_close(both[:1], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1:], alone[1], rtol=1e-4, atol=1e-4)


def test_explicit_cap_cuts_and_logs_each_prompt_once(capped, uncapped, caplog):
    with caplog.at_level(logging.WARNING):
        prompt = capped.encode_prompts([LONG, LONG, SHORT], keys=["dpg:long", "dpg:long", "dpg:short"])
        capped.encode_prompts([LONG], keys=["dpg:long"])  # already named: not again
        capped.encode_prompts([LONG + " at dawn"], keys=["dpg:other"])
    cuts = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cut" in r.getMessage()]
    assert len(cuts) == 2 and "dpg:long" in cuts[0] and "dpg:other" in cuts[1]
    assert "48" in cuts[0] and str(len(capped.text_tokenizer.token_ids(LONG))) in cuts[0]
    tokens = capped.text_tokenizer.convert_ids_to_tokens(prompt.ids[0].tolist())
    assert prompt.ids.shape[1] == 48 and int(prompt.mask[0].sum()) == 48 and tokens[-1] == "</user>"
    assert capped.layout.seq_len == 48 + capped.layout.suffix_len
    # the cut prompt conditions on another text than the whole one
    canvas = torch.full((1, capped.num_image_tokens), MASKED)
    with torch.no_grad():
        cut = capped.image_logits(canvas, capped.encode_prompts([LONG]))
        whole = uncapped.image_logits(canvas, uncapped.encode_prompts([LONG]))
    assert not torch.allclose(cut, whole, atol=1e-4)


def test_validation_names_the_cut_prompt_by_its_id(capped, caplog):
    prompt = BenchmarkPrompt(benchmark="dpg", key="item_42", prompt=LONG + " in the rain", group="dpg", record=None)
    generator = PolicyImageGenerator(capped, SamplerSettings(num_steps=2, guidance_scale=1.0))
    with caplog.at_level(logging.WARNING):
        images = generator.generate([prompt], torch.Generator().manual_seed(0))
    assert images.shape[0] == 1
    assert any("dpg:item_42" in r.getMessage() and "cut" in r.getMessage() for r in caplog.records)


def test_config_default_is_no_cap_and_a_bad_cap_names_the_key(compose, folder):
    cfg = compose("generate", ["policy=dimoo"])
    assert cfg.policy.max_text_len is None
    with pytest.raises(ConfigError) as err:
        build_dimoo_policy(str(folder), resolution=[32, 64], max_text_len=4, dtype="float32")
    assert err.value.key == "max_text_len"
