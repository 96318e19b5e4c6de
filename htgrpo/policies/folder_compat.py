"""What htgrpo writes into a model folder so that the released stacks read it as htgrpo does.

htgrpo runs on transformers 5. The released code pins transformers 4.x:

- MMaDA: ``transformers==4.46.0``;
- Lumina-DiMOO: ``transformers==4.46.2``;
- Harmon and MAR-GRPO: ``transformers==4.45.2``.

transformers 5 writes some keys under new names that 4.x does not know. Where 4.x misses a key it fails, or it falls
back to a default without any message. So every writer of a model folder passes its files through the functions here:

- ``tokenizer_config.json``: :func:`v4_tokenizer_config` rewrites the keys that changed names (``tokenizer_class``,
  ``extra_special_tokens``) and writes ``clean_up_tokenization_spaces`` explicitly, because its default differs
  between 4.45/4.46 and 5. An inline ``chat_template`` is added when transformers 5 wrote only
  ``chat_template.jinja``;
- model configs (Qwen2 inside Harmon's ``config.json``, LLaDA's ``config.json``): :func:`v4_config_keys` adds
  ``rope_theta`` / ``rope_scaling`` next to transformers 5's ``rope_parameters``, and ``torch_dtype`` next to ``dtype``.
  The LLaDA fields the released ``ModelConfig`` reads are declared on
  :class:`htgrpo.policies.llada.LLaDAConfig`; :data:`LLADA_MODEL_CONFIG_FIELDS` lists them.

``tests/test_folder_compat.py`` checks the written keys. Its slow test loads every kind of folder under the pinned
transformers versions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

V4_FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The generic fast tokenizer (``tokenizer.json``) in every transformers version: 4.x loads it with ``AutoTokenizer``,
and transformers 5 loads it as its ``TokenizersBackend``."""

V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)
"""``tokenizer_class`` values that only transformers 5 knows (4.45/4.46 ``AutoTokenizer`` raises ValueError)."""

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

LLADA_MODEL_CONFIG_FIELDS = (
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "activation_type", "block_type",
    "block_group_size", "alibi", "alibi_bias_max", "rope", "rope_full_precision", "flash_attention",
    "attention_dropout", "multi_query_attention", "attention_layer_norm", "residual_dropout", "embedding_dropout",
    "input_emb_norm", "layer_norm_type", "layer_norm_with_affine", "rms_norm_eps", "attention_layer_norm_with_affine",
    "max_sequence_length", "rope_theta", "include_qkv_bias", "include_bias", "bias_for_layer_norm", "scale_logits",
    "vocab_size", "embedding_size", "weight_tying", "eos_token_id", "pad_token_id", "mask_token_id", "init_device",
    "init_fn", "init_std", "init_cutoff_factor", "precision",
)
"""The fields of the released ``ModelConfig`` dataclass (MMaDA ``models/configuration_llada.py``; Lumina-DiMOO's
``model/configuration_llada.py`` has the same 41 fields). MMaDA's ``MMadaModelLM.from_pretrained`` reads each one with
``getattr(config, name)`` (``create_model_config_from_pretrained_config``), so a ``config.json`` without one of them
fails with AttributeError. DiMOO's ``LLaDAConfig`` fills a missing one with the dataclass default, which differs
from LLaDA-8B's value for several of them (e.g. dropout 0.1, ``rope_theta`` 10000, ``init_fn`` normal)."""


def rope_scaling_from_parameters(rope_parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """transformers 4.x ``rope_scaling`` for transformers 5 ``rope_parameters``.

    ``rope_parameters`` = ``{"rope_type": t, "rope_theta": base, **p}``. In 4.x the base is the separate key
    ``rope_theta``. ``rope_scaling`` is None for the plain rotary embedding (``t == "default"``) and otherwise
    ``{"rope_type": t, "type": t, **p}`` (4.x reads ``type`` in older models and ``rope_type`` in newer ones).
    """
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type == "default":
        return None
    extra = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "rope_type", "type")}
    return {"rope_type": rope_type, "type": rope_type, **extra}


def v4_config_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a transformers 5 ``config.to_dict()``) plus the keys transformers 4.45/4.46 reads instead.

    - ``rope_parameters = {"rope_theta": b, ...}`` → ``rope_theta = b`` and ``rope_scaling`` (see
      :func:`rope_scaling_from_parameters`). Without ``rope_theta``, 4.45's ``Qwen2Config`` uses base 10000.
    - ``dtype`` → ``torch_dtype`` (4.x ``from_pretrained(torch_dtype="auto")`` reads that name).

    A key that is already there is never overwritten. ``rope_theta`` is the only exception: it is set from
    ``rope_parameters`` whenever they differ, because transformers 5 reads ``rope_parameters`` and 4.x reads
    ``rope_theta``, and the two must agree. The input is not modified.
    """
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
        out["rope_theta"] = float(rope["rope_theta"])
        out.setdefault("rope_scaling", rope_scaling_from_parameters(rope))
    if out.get("dtype") is not None and out.get("torch_dtype") is None:
        out["torch_dtype"] = out["dtype"]
    return out


def v4_tokenizer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers 5 ``tokenizer_config.json`` dict rewritten so that 4.45/4.46 ``AutoTokenizer`` loads the same
    tokenizer (transformers 5 reads the result identically):

    - ``tokenizer_class``: a transformers-5-only backend name becomes ``PreTrainedTokenizerFast``;
    - ``extra_special_tokens`` as a list (transformers 5's name for additional special tokens) becomes
      ``additional_special_tokens``, merged with the existing list, order kept. 4.47+ reads a
      list-valued ``extra_special_tokens`` as a dict and fails, so the list is removed;
    - ``clean_up_tokenization_spaces``: written explicitly. When absent, 4.45 decodes with True and 5 with False.
    """
    out = dict(config)
    if out.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
        out["tokenizer_class"] = V4_FAST_TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        merged = list(out.get("additional_special_tokens") or [])
        merged += [t for t in extra if t not in merged]
        out["additional_special_tokens"] = merged
        del out["extra_special_tokens"]
    out.setdefault("clean_up_tokenization_spaces", False)
    return out


def make_tokenizer_folder_v4_compatible(directory: str | os.PathLike) -> None:
    """Rewrite ``directory/tokenizer_config.json`` with :func:`v4_tokenizer_config`. If transformers 5 wrote the chat
    template only to ``chat_template.jinja`` (4.45/4.46 do not read that file), also copy it inline as
    ``chat_template``."""
    folder = Path(directory)
    path = folder / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return
    config = v4_tokenizer_config(json.loads(path.read_text()))
    template = folder / CHAT_TEMPLATE_FILE
    if template.is_file() and not config.get("chat_template"):
        config["chat_template"] = template.read_text()
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(directory)``, then :func:`make_tokenizer_folder_v4_compatible`."""
    tokenizer.save_pretrained(str(directory))
    make_tokenizer_folder_v4_compatible(directory)


__all__ = [
    "LLADA_MODEL_CONFIG_FIELDS",
    "V4_FAST_TOKENIZER_CLASS",
    "make_tokenizer_folder_v4_compatible",
    "rope_scaling_from_parameters",
    "save_tokenizer",
    "v4_config_keys",
    "v4_tokenizer_config",
]
