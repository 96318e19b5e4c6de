"""What a transformers 4.x stack reads from a model folder. ``tests/test_folder_compat.py`` runs this file in a
virtualenv with the released pins (4.46.0: MMaDA / Lumina-DiMOO, 4.45.2: Harmon / MAR-GRPO).

    python transformers4_probe.py SPEC.json OUT.json

It uses only transformers and tokenizers, so the virtualenv needs no torch. It imports nothing from htgrpo. The
``describe_*`` functions take already-loaded objects, so the test applies the same functions to what htgrpo loads
under transformers 5 and compares the two dicts.

SPEC: ``{"folders": [{"name", "path", "kind": "llada" | "harmon", "fields": [...], "prompts": [...],
"tokens": [...], "padding_side": "left" | null, "reserved": [...] | null}]}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def describe_llada_config(config: Any, fields: list[str]) -> dict[str, Any]:
    """Every ``fields`` entry read with ``getattr``, as MMaDA's ``create_model_config_from_pretrained_config`` reads
    its ``ModelConfig`` fields. A missing one is listed under ``missing`` (the released loader stops there with
    AttributeError)."""
    values = {name: getattr(config, name) for name in fields if hasattr(config, name)}
    return {"values": values, "missing": [name for name in fields if not hasattr(config, name)]}


def rope_of(config: Any) -> dict[str, Any]:
    """RoPE base and type as the Qwen2 attention of this transformers version computes them: 4.x reads
    ``rope_theta`` / ``rope_scaling``, 5 reads ``rope_parameters``."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        params = config.rope_parameters
        return {"rope_theta": float(params["rope_theta"]), "rope_type": params.get("rope_type", "default")}
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": float(config.rope_theta),
            "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


QWEN2_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
                "use_sliding_window", "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id",
                "pad_token_id")


def describe_qwen2_config(config: Any) -> dict[str, Any]:
    return {**{name: getattr(config, name, None) for name in QWEN2_FIELDS}, **rope_of(config)}


def describe_tokenizer(tok: Any, prompts: list[str], tokens: list[str], reserved: list[str] | None) -> dict[str, Any]:
    """Vocabulary, special ids and the ids of ``prompts`` with and without the tokenizer's own specials, decoded
    back, and as one padded batch (padding side). With ``reserved`` (MMaDA), also ``len(tok)`` after what the
    released ``UniversalPrompting(use_reserved_token=True)`` does: it adds ``reserved`` as additional special tokens
    unless ``<|end_header_id|>`` already has a nonzero id."""
    plain = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: dict[str, Any] = {
        "len": len(tok),
        "vocab_size": tok.vocab_size,
        "special_ids": {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")},
        "token_ids": {t: tok.convert_tokens_to_ids(t) for t in tokens},
        "padding_side": tok.padding_side,
        "encode": plain,
        "encode_with_specials": [tok(p)["input_ids"] for p in prompts],
        "decode": [tok.decode(ids, skip_special_tokens=True) for ids in plain],
        "decode_keep_specials": [tok.decode(ids, skip_special_tokens=False) for ids in plain],
    }
    if tok.pad_token_id is not None:
        batch = tok(prompts, padding=True, add_special_tokens=False)
        out["batch"] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if reserved is not None:
        end = tok.convert_tokens_to_ids(["<|end_header_id|>"])
        added = 0 if (end and end[0]) else tok.add_special_tokens({"additional_special_tokens": list(reserved)})
        out["reserved_added"] = added
        out["len_after_reserved"] = len(tok)
        out["reserved_ids"] = tok.convert_tokens_to_ids(list(reserved))
    return out


def _read_config(folder: dict[str, Any]) -> dict[str, Any]:
    from transformers import PretrainedConfig, Qwen2Config

    path = folder["path"]
    if folder["kind"] == "llada":
        # MMaDA's MMadaConfig is a plain PretrainedConfig subclass that keeps every key of config.json.
        return describe_llada_config(PretrainedConfig.from_pretrained(path), folder["fields"])
    with open(f"{path}/config.json") as f:
        llm = json.load(f)["llm"]
    by_kwargs = describe_qwen2_config(Qwen2Config(**llm))
    return {**by_kwargs, "from_dict_agrees": by_kwargs == describe_qwen2_config(Qwen2Config.from_dict(llm))}


def _read_tokenizer(folder: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    side = folder.get("padding_side")   # None: the folder's own setting, as a plain from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(folder["path"], **({"padding_side": side} if side else {}))
    return {"class": type(tok).__name__,
            **describe_tokenizer(tok, folder["prompts"], folder["tokens"], folder.get("reserved"))}


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """What this interpreter's transformers reads from each folder of ``spec`` (module docstring). A part that
    fails to load is reported as ``{"error": "Type: message"}``."""
    import transformers

    result: dict[str, Any] = {"transformers": transformers.__version__, "folders": {}}
    for folder in spec["folders"]:
        entry = {}
        for part, read in (("config", _read_config), ("tokenizer", _read_tokenizer)):
            try:
                entry[part] = read(folder)
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
                entry[part] = {"error": f"{type(err).__name__}: {err}"}
        result["folders"][folder["name"]] = entry
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec_in = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(probe(spec_in), f, indent=1)
