"""ShapesWorld's LLaDA-family generators: the toy masked-diffusion policy, the oracle and random tokens.

Everything ShapesWorld-specific about the masked-diffusion policy lives here, so the generic policy code
(:mod:`~htgrpo.policies.masked_diffusion`, :mod:`~htgrpo.policies.generators`, the samplers and layouts) never imports
ShapesWorld. The toy policy is the generic :class:`MaskedDiffusionPolicy` with the word-level text tokenizer and the
palette image tokenizer (one implementation of the tokenizer interface among three: toy, MMaDA, DiMOO).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.data.records import BenchmarkPrompt
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
from htgrpo.policies.t2i_layout import T2ISequenceLayout
from htgrpo.policies.tokenizers import PaletteImageTokenizer, WordTextTokenizer, shapes_vocabulary


def toy_masked_diffusion_policy(
    world: ShapesWorldConfig | None = None,
    vocabulary: Sequence[str] | None = None,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    mlp_hidden_size: int | None = None,
    max_text_len: int = 32,
    rope_theta: float = 10000.0,
    embedding_size: int | None = None,
    seed: int = 0,
    grid_position_embedding: bool = False,
) -> MaskedDiffusionPolicy:
    """Tiny randomly initialised ShapesWorld policy (~0.9M parameters at the defaults; trains on CPU).

    ``world``: default :meth:`ShapesWorldConfig.roomy` (16 x 16 cells); ``fit`` passes ``conf/world``'s.

    ``vocabulary``: the prompt generator's words (default :func:`shapes_vocabulary`); ``mlp_hidden_size`` defaults
    to 3·d_model (LLaDA-8B's ratio, 12288/4096); ``embedding_size`` pads wte/LM head to that many rows (e.g.
    134656 to mimic MMaDA's head width in benchmarks); ``seed`` makes the initialisation reproducible;
    ``grid_position_embedding`` adds learned row/column embeddings at the image tokens (``LLaDAConfig.image_grid``).
    """
    world = world or ShapesWorldConfig.roomy()  # the 16-cell world its parameter count above is stated for
    text_tok = WordTextTokenizer(shapes_vocabulary() if vocabulary is None else vocabulary)
    image_tok = PaletteImageTokenizer(world.grid_size, world.cell_px)
    layout = T2ISequenceLayout.toy(text_tok, image_tok.codebook_size, image_tok.num_tokens, max_text_len)
    config = LLaDAConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=n_layers,
        mlp_hidden_size=mlp_hidden_size or 3 * d_model,
        vocab_size=layout.vocab_size,
        embedding_size=max(embedding_size or 0, layout.vocab_size),
        max_sequence_length=layout.seq_len,
        rope_theta=rope_theta,
        mask_token_id=layout.mask,
        pad_token_id=layout.pad,
        eos_token_id=layout.eos,
        image_grid=[layout.image_positions.start, world.grid_size, world.grid_size] if grid_position_embedding
        else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = LLaDAModelLM(config)
    return MaskedDiffusionPolicy(backbone, layout, text_tok, image_tok)


def build_masked_diffusion_policy(world: ShapesWorldConfig, init: str = "scratch", pretrained_path: str | None = None,
                                  d_model: int = 64, n_layers: int = 4, n_heads: int = 4, mlp_ratio: float = 3.0,
                                  max_text_len: int = 40, rope_theta: float = 10000.0,
                                  grid_position_embedding: bool = True, lora: Any = None,
                                  gradient_checkpointing: bool = False) -> MaskedDiffusionPolicy:
    """Build the ShapesWorld masked-diffusion (LLaDA-architecture) policy.

    Args:
        world: ShapesWorld geometry (sets the image grid and tokenizer).
        init: ``scratch`` (random init of a tiny config) or ``pretrained`` (load ``pretrained_path``).
        pretrained_path: a folder written by ``MaskedDiffusionPolicy.save_pretrained`` (the warm start
            writes ``${paths.artifacts_dir}/shapes_llada_warmstart``).
        d_model, n_layers, n_heads, mlp_ratio, max_text_len, rope_theta: size of a scratch policy.
        grid_position_embedding: learned row/column embeddings on the image tokens of a scratch policy (a toy-model
            extension of LLaDA; see ``LLaDAConfig.image_grid``).
        lora: ``{r, alpha, dropout, target_modules}``: LoRA adapters through peft (r = 0: full fine-tuning); see
            :mod:`htgrpo.policies.lora`.
        gradient_checkpointing: recompute each LLaDA block's activations in the backward pass.
    """
    from htgrpo.data.shapes.prompts import VOCABULARY
    from htgrpo.policies.lora import apply_lora

    require_choice(init, ("scratch", "pretrained"), "init")
    if init == "pretrained":
        require(pretrained_path not in (None, ""), "pretrained_path", "must be set when init=pretrained")
        path = Path(str(pretrained_path)).expanduser()
        if not (path / "config.json").exists() and not path.is_dir():
            raise ConfigError(
                "pretrained_path",
                f"{path} does not exist. Run the warm start first (`python -m htgrpo.fit experiment=shapes_pretrain`) "
                "or point policy.pretrained_path at a folder written by MaskedDiffusionPolicy.save_pretrained.")
        return apply_lora(MaskedDiffusionPolicy.from_pretrained(path), lora, gradient_checkpointing)
    for key, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("max_text_len", max_text_len)):
        require(int(value) >= 1, key, f"must be >= 1, got {value}")
    require(int(d_model) % int(n_heads) == 0, "d_model", f"must be divisible by n_heads ({n_heads}), got {d_model}")
    policy = toy_masked_diffusion_policy(world, list(VOCABULARY), d_model=int(d_model), n_layers=int(n_layers),
                                       n_heads=int(n_heads), mlp_hidden_size=int(round(float(mlp_ratio) * int(d_model))),
                                       max_text_len=int(max_text_len), rope_theta=float(rope_theta),
                                       grid_position_embedding=bool(grid_position_embedding))
    return apply_lora(policy, lora, gradient_checkpointing)


class OraclePolicy:
    """Renders, for each prompt, a random ShapesWorld scene that satisfies its metadata.

    Scoring its images must give ~1.0 (GenEval) / ~100 (DPG): an end-to-end check of the scorers.
    """

    def __init__(self, world: ShapesWorldConfig):
        self.world = world

    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        from htgrpo.data.prompt_sets import render_record

        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        return torch.stack([render_record(p.record, np.random.default_rng(s), self.world) for p, s in zip(prompts, seeds)])


class RandomTokenPolicy:
    """Uniformly random image tokens through the palette tokenizer: the floor every policy must beat."""

    def __init__(self, world: ShapesWorldConfig):
        self.world = world
        self.tokenizer = PaletteImageTokenizer(grid_size=world.grid_size, cell_px=world.cell_px)

    def generate(self, prompts: Sequence[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        codes = torch.randint(0, self.tokenizer.codebook_size, (len(prompts), self.world.num_cells), generator=generator)
        return self.tokenizer.decode(codes)
