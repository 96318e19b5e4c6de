"""A tiny random Harmon checkpoint in the released layout, for smoke tests and cluster set-up checks.

``python -m htgrpo.tiny_checkpoint harmon DIR`` calls :func:`write_tiny_harmon`. The folder has exactly the files and
key names of ``wusize/Harmon-1_5B`` (config.json with ``model_type: harmon``, ``llm`` and ``mar``;
model.safetensors with ``vae.*``, ``llm.*``, ``mar.*``, ``proj_in.*``, ``proj_out.*``; tokenizer files), only small:

- LLM: a 2-layer Qwen2 (hidden 32, 4 heads, 2 KV heads, RoPE base 1e6 as Qwen2.5) with a byte-level BPE tokenizer
  trained by ``tokenizers`` on a few sentences (Qwen's special tokens ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``), so ``AutoTokenizer`` loads it and the chat template tokenizes losslessly.
- MAR: width 32, one encoder and one decoder block, buffer 4, head width 32 / depth 1, weights for a 2×2 grid
  (``img_size`` 16 at VAE stride 8), generating at ``image_size`` 32 px = 4×4 tokens, so the on-the-fly position
  embedding interpolation runs as in the real model (16×16 → 32×32).
- VAE: a KL VAE with ch 32, ch_mult (1, 1, 1, 1) (stride 8), 8 latent channels, encoder attention at the last level.

The diffusion head's adaLN and output layers are zero at MAR's initialisation (the head would output ε = 0 for any
z, so no RL gradient could reach the MAR); the tiny checkpoint gives them small random values instead, like a
trained head.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_IMAGE_SIZE = 32
QWEN25_ROPE_THETA = 1_000_000.0
"""RoPE base of Qwen2.5-1.5B-Instruct (Harmon's LLM); the tiny LLM uses it too, not Qwen2Config's default 10000."""
_CORPUS = [
    "Generate an image: a photo of a red apple and a blue cup on a wooden table.",
    "Generate an image. a photo of two dogs to the left of a green bench in the park.",
    "a photo of a yellow banana below a purple umbrella, a cat, a car, a bird, three people.",
    "user assistant system image photo picture of an orange clock next to a white vase.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (transformers ``PreTrainedTokenizerFast``) with Qwen2.5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def build_tiny_harmon(seed: int = 0):
    """The tiny :class:`~htgrpo.policies.mar.harmon.HarmonPolicy` (random weights, deterministic in ``seed``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from htgrpo.policies.mar.backbone import MAR, MARConfig
    from htgrpo.policies.mar.harmon import HarmonPolicy
    from htgrpo.policies.mar.vae import KLAutoencoder, KLVAEConfig

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": QWEN25_ROPE_THETA},
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        vae = KLAutoencoder(KLVAEConfig(embed_dim=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                        attn_resolutions=(32,)))
        mar = MAR(MARConfig(seq_h=2, seq_w=2, token_embed_dim=8, encoder_embed_dim=32, encoder_depth=1,
                            encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                            buffer_size=4, conditioning="class", num_classes=10, diffloss_d=1, diffloss_w=32,
                            num_sampling_steps="100"))
        with torch.no_grad():
            for name, param in mar.diffloss.named_parameters():
                if not param.any():          # the zero-initialised adaLN / output layers: see the module docstring
                    param.normal_(0.0, 0.05)
        policy = HarmonPolicy(llm, mar, vae, tokenizer, image_size=TINY_IMAGE_SIZE)
    return policy


def write_tiny_harmon(directory: Path) -> str:
    """Write the tiny checkpoint to ``directory``; returns the Hydra overrides that select it."""
    directory = Path(directory)
    build_tiny_harmon().save_pretrained(directory)
    return f"policy=harmon policy.pretrained={directory} policy.image_size={TINY_IMAGE_SIZE}"


__all__ = ["QWEN25_ROPE_THETA", "TINY_IMAGE_SIZE", "build_tiny_harmon", "build_tiny_tokenizer", "write_tiny_harmon"]
