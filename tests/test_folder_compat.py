"""Model folders htgrpo writes load the same under the released stacks' transformers 4.x as under our transformers 5.

The released stacks pin transformers 4.46.0 (MMaDA), 4.46.2 (Lumina-DiMOO) and 4.45.2 (Harmon, MAR-GRPO).

- Fast tests (default suite): the keys that 4.x needs are in every kind of folder: the tiny checkpoints, a merged
  and an adapter export of a LoRA MMaDA run, a merged export of a Harmon run, and a ``save_pretrained`` policy folder.
- Slow test: ``tests/transformers4_probe.py`` runs in virtualenvs built from PyPI with the pinned transformers.
  These virtualenvs have no torch and are cached in ``$HTGRPO_COMPAT_CACHE`` (default ``~/.cache/htgrpo-compat``).
  The test checks that what they read equals what htgrpo reads: every field MMaDA's ``ModelConfig`` reads, the RoPE
  base, the vocabulary, the special ids, ``len(tokenizer)`` after the released reserved-token step, and the token
  ids of templated prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from htgrpo.policies.folder_compat import (
    LLADA_MODEL_CONFIG_FIELDS,
    make_tokenizer_folder_v4_compatible,
    rope_scaling_from_parameters,
    v4_config_keys,
    v4_tokenizer_config,
)
from htgrpo.policies.mar.harmon_tiny import QWEN25_ROPE_THETA, TINY_IMAGE_SIZE
from htgrpo.tiny_checkpoint import MMADA_RESERVED_TOKENS

TESTS = Path(__file__).resolve().parent

RELEASED_LLADA_VALUES = {
    "alibi_bias_max": 8.0, "rope_full_precision": True, "flash_attention": False, "attention_dropout": 0.0,
    "residual_dropout": 0.0, "embedding_dropout": 0.0, "layer_norm_with_affine": True,
    "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "init_device": "meta",
    "init_fn": "mitchell", "init_cutoff_factor": None, "precision": "amp_bf16",
}
"""The 13 ModelConfig fields that htgrpo's folders lacked (issue 17), with LLaDA-8B's released values."""

MMADA_CONFIG_KEYS = ("codebook_size", "num_vq_tokens", "llm_vocab_size", "new_vocab_size")
"""Keys MMaDA's ``MMadaConfig`` keeps besides the ModelConfig fields."""


# ----------------------------------------------------------------------------------------------------------------
# Folders: the tiny checkpoints and the exports of a LoRA MMaDA run and a Harmon run
# ----------------------------------------------------------------------------------------------------------------


def _fake_run(root: Path, policy_node: dict, change) -> tuple[Path, torch.nn.Module]:
    """A fit run's files as ``export`` finds them: ``RUN/.hydra/config.yaml`` (its policy node) and
    ``RUN/checkpoints/last.ckpt`` holding the policy's weights after ``change`` (a stand-in for training)."""
    from htgrpo.config import instantiate_node

    cfg = OmegaConf.create({"policy": policy_node})
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, root / ".hydra" / "config.yaml")
    policy = instantiate_node(cfg, "policy")
    with torch.no_grad():
        change(policy)
    (root / "checkpoints").mkdir()
    ckpt = root / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in policy.state_dict().items()}}, ckpt)
    return ckpt, policy


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Every kind of folder htgrpo writes, by name."""
    from htgrpo.export import export
    from htgrpo.tiny_checkpoint import main as tiny_checkpoint

    root = tmp_path_factory.mktemp("compat")
    out = {}
    for model in ("mmada", "dimoo", "harmon"):
        tiny_checkpoint([model, str(root / model)])
        out[model] = root / model

    def nudge_adapters(policy):   # nonzero adapters, so the merge changes the weights
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)

    mmada = {"_target_": "htgrpo.policies.pretrained.build_mmada_policy", "pretrained": str(out["mmada"]),
             "vq_model": str(out["mmada"] / "magvitv2"), "resolution": 64, "max_text_len": 32, "dtype": "float32",
             "vq_device": "cpu", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    ckpt, _ = _fake_run(root / "mmada_run", mmada, nudge_adapters)
    export(ckpt, root / "mmada_merged", merge=True)
    export(ckpt, root / "mmada_adapter", merge=False)
    out["mmada_merged"], out["mmada_adapter"] = root / "mmada_merged", root / "mmada_adapter"

    def train_mar(policy):
        policy.mar.decoder_embed.weight.add_(0.01)

    harmon = {"_target_": "htgrpo.policies.mar.harmon.build_harmon_policy", "pretrained": str(out["harmon"]),
              "image_size": TINY_IMAGE_SIZE}
    ckpt, trained = _fake_run(root / "harmon_run", harmon, train_mar)
    export(ckpt, root / "harmon_merged", merge=True)
    out["harmon_merged"] = root / "harmon_merged"
    trained.save_pretrained(root / "harmon_policy")      # what fit's ExportPolicy callback writes
    out["harmon_policy"] = root / "harmon_policy"
    return out


LLADA_FOLDERS = ("mmada", "dimoo", "mmada_merged")
HARMON_FOLDERS = ("harmon", "harmon_merged", "harmon_policy")


# ----------------------------------------------------------------------------------------------------------------
# Fast: the written keys
# ----------------------------------------------------------------------------------------------------------------


def test_v4_config_keys_mirrors_rope_parameters_and_dtype():
    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "dtype": "bfloat16", "vocab_size": 8}
    v4 = v4_config_keys(v5)
    assert v4["rope_theta"] == 1e6 and v4["rope_scaling"] is None and v4["torch_dtype"] == "bfloat16"
    assert v4["rope_parameters"] == v5["rope_parameters"] and "rope_theta" not in v5   # v5 keys kept, input intact
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    assert rope_scaling_from_parameters(yarn) == {"rope_type": "yarn", "type": "yarn", "factor": 4.0}
    # rope_theta follows rope_parameters (what transformers 5 reads), an existing torch_dtype stays
    stale = v4_config_keys({"rope_parameters": {"rope_theta": 5.0}, "rope_theta": 1e4, "torch_dtype": "float32",
                            "dtype": "bfloat16"})
    assert stale["rope_theta"] == 5.0 and stale["torch_dtype"] == "float32"


def test_v4_tokenizer_config_renames_the_v5_keys(tmp_path):
    v5 = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<|im_start|>", "<a>"],
          "additional_special_tokens": ["<a>"], "backend": "tokenizers"}
    v4 = v4_tokenizer_config(v5)
    assert v4["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in v4
    assert v4["additional_special_tokens"] == ["<a>", "<|im_start|>"] and v4["clean_up_tokenization_spaces"] is False
    kept = v4_tokenizer_config({"tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": True,
                                "extra_special_tokens": {"image_token": "<img>"}})
    assert kept == {"tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": True,
                    "extra_special_tokens": {"image_token": "<img>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(v5))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    make_tokenizer_folder_v4_compatible(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"


@pytest.mark.parametrize("name", LLADA_FOLDERS)
def test_llada_folders_have_every_released_model_config_field(folders, name):
    cfg = json.loads((folders[name] / "config.json").read_text())
    assert [f for f in LLADA_MODEL_CONFIG_FIELDS if f not in cfg] == []
    assert {k: cfg[k] for k in RELEASED_LLADA_VALUES} == RELEASED_LLADA_VALUES
    assert cfg["rope_theta"] == 500000.0 and cfg["use_cache"] is False
    if name.startswith("mmada"):    # an exported MMaDA folder is still an MMaDA checkpoint
        assert all(k in cfg for k in MMADA_CONFIG_KEYS), [k for k in MMADA_CONFIG_KEYS if k not in cfg]
        assert cfg["model_type"] == "mmada" and cfg["architectures"] == ["MMadaModelLM"] and "auto_map" in cfg
    tok = json.loads((folders[name] / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["clean_up_tokenization_spaces"] is False


@pytest.mark.parametrize("name", HARMON_FOLDERS)
def test_harmon_folders_write_rope_theta_next_to_rope_parameters(folders, name):
    llm = json.loads((folders[name] / "config.json").read_text())["llm"]
    assert llm["rope_theta"] == llm["rope_parameters"]["rope_theta"] == QWEN25_ROPE_THETA
    assert llm["rope_scaling"] is None
    tok = json.loads((folders[name] / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tok
    assert tok["additional_special_tokens"] == ["<|im_start|>"]


def test_exports_hold_the_runs_weights_and_the_adapter_folder_no_model_files(folders):
    """The folders above are real exports: the merged ones load through htgrpo's loaders with the run's weights."""
    from htgrpo.policies.llada import load_llada
    from htgrpo.policies.mar.harmon import load_harmon

    assert sorted(p.name for p in folders["mmada_adapter"].iterdir() if p.suffix == ".json") == ["adapter_config.json"]
    base, merged = load_llada(folders["mmada"]), load_llada(folders["mmada_merged"])
    q = "model.transformer.blocks.0.q_proj.weight"
    assert not torch.equal(base.state_dict()[q], merged.state_dict()[q])   # the adapters were folded in
    harmon = load_harmon(str(folders["harmon_merged"]), image_size=TINY_IMAGE_SIZE)
    start = load_harmon(str(folders["harmon"]), image_size=TINY_IMAGE_SIZE)
    assert torch.allclose(harmon.mar.decoder_embed.weight, start.mar.decoder_embed.weight + 0.01)
    assert harmon.llm.config.rope_parameters["rope_theta"] == QWEN25_ROPE_THETA


def test_mmada_tokenizer_holds_the_reserved_tokens_so_the_released_prompting_adds_none(folders):
    """UniversalPrompting(use_reserved_token=True) adds <|start_header_id|>, <|end_header_id|>, <|eot_id|> unless
    <|end_header_id|> has a nonzero id; adding them would shift len(tokenizer), MMaDA's image-code offset."""
    from htgrpo.policies.text_tokenizers import HFTextTokenizer

    for name in ("mmada", "mmada_merged"):
        tok = HFTextTokenizer.from_pretrained(folders[name]).tokenizer
        ids = tok.convert_tokens_to_ids(list(MMADA_RESERVED_TOKENS))
        assert all(isinstance(i, int) and i > 0 for i in ids), ids
        before = len(tok)
        assert tok.add_special_tokens({"additional_special_tokens": list(MMADA_RESERVED_TOKENS)}) == 0
        assert len(tok) == before == json.loads((folders[name] / "config.json").read_text())["llm_vocab_size"]


# ----------------------------------------------------------------------------------------------------------------
# Slow: load under the released transformers versions
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = ["a photo of a red cat", "a photo of two dogs to the left of a green bench.",
           "a  photo of\nan orange clock, a café, 3 birds 🐦", ""]
"""GenEval-style prompts and edge cases (double space, newline, non-ASCII, empty)."""


def _prompt_sets() -> dict[str, list[str]]:
    """The texts each model's code tokenizes: MMaDA the bare prompt, DiMOO its system/user template, Harmon the
    chat template (and its CFG prompt)."""
    from htgrpo.policies.mar.harmon import CFG_PROMPT, CHAT_TEMPLATE, PROMPT_FORMAT
    from htgrpo.policies.pretrained import DIMOO_TEMPLATE

    harmon = [CHAT_TEMPLATE.format(input=PROMPT_FORMAT.format(prompt=p)) for p in PROMPTS]
    return {"mmada": PROMPTS + ["<|t2i|><|soi|> inline specials <|eoi|>"],
            "dimoo": [DIMOO_TEMPLATE.format(prompt=p) for p in PROMPTS] + ["<uncondition>"],
            "harmon": harmon + [CHAT_TEMPLATE.format(input=CFG_PROMPT)]}


def _spec(folders: dict[str, Path], names: list[str]) -> dict:
    prompts = _prompt_sets()
    entries = []
    for name in names:
        family = name.split("_")[0]
        if family == "harmon":
            entries.append({"name": name, "path": str(folders[name]), "kind": "harmon", "prompts": prompts["harmon"],
                            "tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "padding_side": None})
            continue
        mm = family == "mmada"
        entries.append({
            "name": name, "path": str(folders[name]), "kind": "llada", "prompts": prompts[family],
            "fields": list(LLADA_MODEL_CONFIG_FIELDS) + (list(MMADA_CONFIG_KEYS) if mm else []),
            "tokens": ["<|mdm_mask|>", "<|t2i|>", "<|soi|>", "[iPAD]"] if mm else ["<|mdm_mask|>", "<user>",
                                                                                  "<|newline|>", "<Image>"],
            # MMaDA's scripts load the tokenizer with padding_side="left"; DiMOO's with the folder's setting
            "padding_side": "left" if mm else None,
            "reserved": list(MMADA_RESERVED_TOKENS) if mm else None})
    return {"folders": entries}


def _htgrpo_reads(folders: dict[str, Path], spec: dict) -> dict:
    """The probe's dict, from what htgrpo loads under transformers 5 (its own loaders)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from transformers4_probe import describe_llada_config, describe_qwen2_config, describe_tokenizer

    from htgrpo.policies.llada import LLaDAConfig
    from htgrpo.policies.mar.harmon import load_harmon
    from htgrpo.policies.pretrained import build_mmada_policy
    from htgrpo.policies.text_tokenizers import HFTextTokenizer

    out = {}
    for entry in spec["folders"]:
        path = entry["path"]
        if entry["kind"] == "harmon":
            policy = load_harmon(path, image_size=TINY_IMAGE_SIZE)
            config, tok = describe_qwen2_config(policy.llm.config), policy.tokenizer
        else:
            config = describe_llada_config(LLaDAConfig.from_pretrained(path), entry["fields"])
            tok = HFTextTokenizer.from_pretrained(path).tokenizer
        out[entry["name"]] = {"config": config,
                              "tokenizer": describe_tokenizer(tok, entry["prompts"], entry["tokens"],
                                                              entry.get("reserved"))}
        if entry.get("reserved"):   # the image-code offset htgrpo's MMaDA layout uses: len(text tokenizer)
            mm = build_mmada_policy(path, str(folders["mmada"] / "magvitv2"), resolution=64, max_text_len=32,
                                    dtype="float32", vq_device="cpu")
            out[entry["name"]]["image_code_offset"] = len(mm.text_tokenizer)
    return out


def compat_venv(version: str) -> Path:
    """A virtualenv with ``transformers==version`` from PyPI (and tokenizers, no torch), built once and cached."""
    root = Path(os.environ.get("HTGRPO_COMPAT_CACHE", Path.home() / ".cache" / "htgrpo-compat"))
    venv = root / f"transformers-{version}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import transformers; assert transformers.__version__ == {version!r}"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    root.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", f"transformers=={version}"], check]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.skip(f"cannot build the transformers {version} virtualenv in {venv} ({' '.join(step[:4])}): "
                        f"{done.stderr[-800:]}")
    return python


RELEASED_PINS = [
    ("4.46.0", ["mmada", "mmada_merged", "dimoo"]),   # MMaDA requirements.txt (the pin for DiMOO too)
    ("4.46.2", ["dimoo"]),                            # Lumina-DiMOO requirements.txt
    ("4.45.2", ["harmon", "harmon_merged", "harmon_policy"]),   # Harmon / MAR-GRPO
]


@pytest.mark.slow
@pytest.mark.parametrize("version,names", RELEASED_PINS, ids=[v for v, _ in RELEASED_PINS])
def test_folders_load_identically_under_the_released_transformers(folders, version, names, tmp_path):
    python = compat_venv(version)
    spec = _spec(folders, names)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([str(python), str(TESTS / "transformers4_probe.py"), str(tmp_path / "spec.json"),
                          str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    assert theirs["transformers"] == version
    ours = _htgrpo_reads(folders, spec)
    for name in names:
        got, want = theirs["folders"][name], ours[name]
        cfg, tok = got["config"], got["tokenizer"]
        assert "error" not in cfg and "error" not in tok, f"{name} under transformers {version}: {cfg} {tok}"
        if "missing" in cfg:      # LLaDA: every ModelConfig field the released loader reads is there
            assert cfg["missing"] == [], f"{name}: transformers {version} lacks {cfg['missing']}"
            assert cfg == want["config"], f"{name}: ModelConfig fields read by {version} differ from htgrpo's"
            summary = (f"{len(cfg['values'])} config fields read as htgrpo does "
                       f"(rope_theta {cfg['values']['rope_theta']:g})")
        else:                     # Harmon: Qwen2Config(**llm) and Qwen2Config.from_dict(llm) agree
            assert cfg.pop("from_dict_agrees"), name
            assert cfg == want["config"], f"{name}: Qwen2 config read by {version} differs from htgrpo's"
            summary = f"RoPE base {cfg['rope_theta']:g} ({cfg['rope_type']}), vocab {cfg['vocab_size']}"
        assert tok.pop("class") == "PreTrainedTokenizerFast"
        assert tok == want["tokenizer"], f"{name}: tokenizer read by {version} differs from htgrpo's"
        if "image_code_offset" in want:   # MMaDA: the released prompting adds nothing, image columns line up
            assert tok["reserved_added"] == 0 and tok["len_after_reserved"] == want["image_code_offset"]
            summary += (f", len(tokenizer) after UniversalPrompting {tok['len_after_reserved']} = htgrpo's image-code"
                        f" offset {want['image_code_offset']}")
        print(f"transformers {version} | {name}: {summary}; len(tokenizer) {tok['len']}, special ids "
              f"{tok['special_ids']}, {len(tok['encode'])} prompts tokenized and decoded identically")
