"""``python -m htgrpo.tiny_checkpoint {mmada|dimoo|harmon} DIR`` — a tiny random checkpoint in a released format.

Smoke-test a cluster set-up (or run the tests) before downloading 16 GB: the folder has the files the real
checkpoint has, loaded by the same code path (``policy=mmada policy.pretrained=DIR``), only tiny and random:

- ``mmada``: ``DIR/config.json`` (``model_type: mmada``, ``architectures: [MMadaModelLM]``, ``auto_map`` to the LLaDA
  classes, MMaDA's extra keys), sharded safetensors + ``model.safetensors.index.json``, a byte-level BPE text
  tokenizer built with ``tokenizers`` (``tokenizer.json`` + ``tokenizer_config.json``) holding MMaDA's special
  tokens by name and LLaDA's reserved chat tokens (``MMADA_RESERVED_TOKENS``), and a tiny MAGVIT-v2 in
  ``DIR/magvitv2/`` (8192 codes, 16 px per code).
- ``dimoo``: the same for Lumina-DiMOO (``model_type: llada``, ``architectures: [LLaDAForMultiModalGeneration]``),
  its template tokens (``<system>``, ``<user>``, ``<answer>``, ``<Image>``, ``<uncondition>`` …) in the tokenizer,
  and a tiny diffusers ``VQModel`` in ``DIR/vqvae/``.
- ``harmon``: written by ``htgrpo.policies.mar.harmon_tiny.write_tiny_harmon``.

The folders also load in the released code under its transformers pins: 4.46.0 (MMaDA), 4.46.2 (DiMOO) and 4.45.2
(Harmon). ``config.json`` has every field of the released LLaDA ``ModelConfig``, and the Harmon Qwen2 config has
``rope_theta``. ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (see ``htgrpo.policies.folder_compat``;
checked by ``tests/test_folder_compat.py``).

The special tokens get small ids (the tiny vocabulary has a few hundred text tokens, then the 8192 image codes);
the policies read them from ``config.json`` and the tokenizer, exactly as they read the real ones.
The last line printed is the override string to pass to ``fit``, ``evaluate`` or ``generate``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from htgrpo.policies.folder_compat import save_tokenizer

MODELS = ("mmada", "dimoo", "harmon")

# Words for the tiny BPE: GenEval's vocabulary (colours, counts, positions, the 80 COCO classes) and template words.
_COLOURS = "red orange yellow green blue purple pink brown black white"
_WORDS = ("a photo of an the and two three four one zero left right above below next to on in with image "
          "generate according text prompt")
_CLASSES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket bottle wine glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair couch potted plant "
    "bed dining table toilet tv laptop computer mouse remote keyboard cell phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy hair drier toothbrush")

MMADA_RESERVED_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""LLaDA's chat tokens. MMaDA's ``UniversalPrompting(use_reserved_token=True)`` adds them to the tokenizer when it
lacks them. ``len(tokenizer)`` would then grow by 3, and the released ``t2i_generate`` would read the image columns
3 places from where htgrpo reads them. So the tiny tokenizer holds them, as LLaDA's does."""
MMADA_TOKENS = ("<|startoftext|>", "<|endoftext|>", "[iPAD]", "<|t2i|>", "<|soi|>", "<|eoi|>", "<|mdm_mask|>",
                *MMADA_RESERVED_TOKENS)
DIMOO_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mdm_mask|>", "<|newline|>", "<system>", "</system>",
                "<user>", "</user>", "<uncondition>", "<answer>", "</answer>", "<Image>", "</Image>")

TINY_SIZE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=64, mlp_ratio=2)
"""Backbone size of the tiny checkpoints (LLaDA-8B: d_model 4096, 32 layers, 32 heads, mlp_hidden_size 12288)."""


def build_text_tokenizer(special_tokens: Sequence[str], vocab_size: int = 1000, *, bos: str, eos: str, pad: str):
    """A byte-level BPE tokenizer (like LLaDA's) trained on a small built-in word list, with ``special_tokens``
    first (ids 0..k-1, never split); wrapped as transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"{w} " for w in (_COLOURS + " " + _WORDS + " " + _CLASSES).split()]
    corpus += [f"a photo of a {c} {o}" for c in _COLOURS.split() for o in _CLASSES.split()[:20]]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   padding_side="left")


def _write_backbone(directory: Path, text_vocab: int, codebook: int, extra: dict, seed: int) -> None:
    """Random LLaDA backbone with LM head = text vocabulary + image codes, saved sharded (``max_shard_size``)
    with ``model.safetensors.index.json``, then ``config.json`` rewritten with the released identity keys."""
    from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM

    rows = text_vocab + codebook
    config = LLaDAConfig(vocab_size=rows, embedding_size=rows, max_sequence_length=4096, rope_theta=500000.0,
                         **{k: v for k, v in TINY_SIZE.items()},
                         **{k: v for k, v in extra.items() if k in ("mask_token_id", "eos_token_id", "pad_token_id")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    model.save_pretrained(directory, max_shard_size="300KB")  # several shards + model.safetensors.index.json
    cfg = json.loads((directory / "config.json").read_text())
    for k in ("transformers_version", "dtype", "torch_dtype", "image_grid"):  # image_grid: toy-only key
        cfg.pop(k, None)
    cfg.update(extra)
    cfg["torch_dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


LLADA_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
"""``auto_map`` of both released config.json files: the checkpoint's own LLaDA modelling code."""

LLADA_BLOCK_CONFIG = {"activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms", "rope": True,
                      "alibi": False, "include_bias": False, "weight_tying": False, "tie_word_embeddings": False}
"""The LLaDA block settings MMaDA-8B and Lumina-DiMOO share (SwiGLU llama blocks, RMSNorm, RoPE, untied head)."""


def write_tiny_mmada(directory: str | Path, seed: int = 0) -> str:
    """Tiny MMaDA-8B-format checkpoint in ``directory`` (MAGVIT-v2 in ``directory/magvitv2``); returns overrides."""
    from htgrpo.policies.image_tokenizers import write_tiny_magvit

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vq_dir = write_tiny_magvit(out / "magvitv2", seed=seed)
    from htgrpo.policies.image_tokenizers import MagvitImageTokenizer

    codebook = MagvitImageTokenizer.from_pretrained(vq_dir).codebook_size
    tok = build_text_tokenizer(MMADA_TOKENS, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    save_tokenizer(tok, out)
    vocab = tok.get_vocab()
    extra = {
        "model_type": "mmada",
        "architectures": ["MMadaModelLM"],
        "auto_map": dict(LLADA_AUTO_MAP),
        "mask_token_id": vocab["<|mdm_mask|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "bos_token_id": vocab["<|startoftext|>"],
        "codebook_size": codebook,
        "num_vq_tokens": 16,
        "llm_vocab_size": len(tok),
        "new_vocab_size": len(tok) + codebook,
        **LLADA_BLOCK_CONFIG,
    }
    _write_backbone(out, len(tok), codebook, extra, seed)
    return (f"policy=mmada policy.pretrained={out} policy.vq_model={vq_dir} policy.resolution=64 "
            f"policy.max_text_len=32 policy.dtype=float32")


def write_tiny_dimoo(directory: str | Path, seed: int = 0) -> str:
    """Tiny Lumina-DiMOO-format checkpoint in ``directory`` (VQModel in ``directory/vqvae``); returns overrides."""
    from htgrpo.policies.image_tokenizers import DiffusersVQImageTokenizer, write_tiny_dimoo_vq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_dimoo_vq(out, seed=seed)
    codebook = DiffusersVQImageTokenizer.from_pretrained(out).codebook_size
    tok = build_text_tokenizer(DIMOO_TOKENS, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|pad|>")
    save_tokenizer(tok, out)
    vocab = tok.get_vocab()
    extra = {
        "model_type": "llada",
        "architectures": ["LLaDAForMultiModalGeneration"],
        "auto_map": dict(LLADA_AUTO_MAP),
        "mask_token_id": vocab["<|mdm_mask|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|pad|>"],
        # DiMOO's newline id (126084) has no token name we can rely on; the config carries the tiny one.
        "newline_token_id": vocab["<|newline|>"],
        **LLADA_BLOCK_CONFIG,
    }
    _write_backbone(out, len(tok), codebook, extra, seed)
    return (f"policy=dimoo policy.pretrained={out} policy.resolution=64 policy.max_text_len=48 "
            f"policy.dtype=float32")


def write_tiny_harmon(directory: str | Path, seed: int = 0) -> str:
    """Dispatch to engineer 12's ``htgrpo.policies.mar.harmon_tiny.write_tiny_harmon`` (imported only now)."""
    try:
        module = importlib.import_module("htgrpo.policies.mar.harmon_tiny")
        fn = module.write_tiny_harmon
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"tiny Harmon checkpoints are not available in this install "
                         f"(htgrpo.policies.mar.harmon_tiny.write_tiny_harmon: {err})") from None
    return str(fn(Path(directory)))


WRITERS = {"mmada": write_tiny_mmada, "dimoo": write_tiny_dimoo, "harmon": write_tiny_harmon}


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m htgrpo.tiny_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed")
    args = ap.parse_args(argv)
    overrides = WRITERS[args.model](args.directory, seed=args.seed) if args.model != "harmon" \
        else write_tiny_harmon(args.directory)
    files = sorted(p for p in args.directory.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote a tiny random {args.model} checkpoint: {len(files)} files, {size / 1e6:.1f} MB in {args.directory}")
    print(overrides)
    return overrides


if __name__ == "__main__":
    main(sys.argv[1:])
