"""Real backbones: MMaDA-8B (``policy=mmada``) and Lumina-DiMOO (``policy=dimoo``) as :class:`MaskedDiffusionPolicy`.

Each builder, in this order, so every mistake fails before a byte of the 16 GB weights is read:

1. validates its keys (resolution a positive multiple of 16, text length, dtype);
2. reads the checkpoint's ``config.json`` (local folder, or the hub / HF cache) and checks its ``model_type``;
3. loads the text tokenizer (transformers ``AutoTokenizer``, left padding) and resolves the layout's special-token
   ids: an explicit ``special_tokens`` override, else the id stored in ``config.json`` or named in the tokenizer,
   else the documented default (reference/htgrpo_mmada_dimoo.md §3.4, §5.3). Config and tokenizer disagreeing, ids
   outside the LM head, or specials inside the image-code range fail with the key;
4. loads the image tokenizer (MAGVIT-v2 / the ``vqvae`` VQModel), then the LLaDA backbone (exact, ``llada.py``);
5. applies LoRA / gradient checkpointing (``htgrpo.policies.lora``).

Missing weights (no folder, offline, unknown id) become one :class:`ConfigError` naming the key, the repo id and the
download command: ``fit``/``evaluate``/``generate`` print it without a traceback.

Image-code offsets follow the released code: MMaDA puts code c at ``len(text_tokenizer) + c`` (126349 for the real
tokenizer); DiMOO at ``LM-head width − codebook_size`` (``generate_image`` infers ``text_vocab_size`` that way;
126356).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.policies.llada import CheckpointNotFoundError, load_llada
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy, _class_path, _resolve_class
from htgrpo.policies.t2i_layout import DimooSequenceLayout, T2ISequenceLayout
from htgrpo.policies.text_tokenizers import HFTextTokenizer, TokenizerNotFoundError

MMADA_REPO = "Gen-Verse/MMaDA-8B-Base"
MAGVIT_REPO = "showlab/magvitv2"
DIMOO_REPO = "Alpha-VLLM/Lumina-DiMOO"
MMADA_MODEL_TYPES = ("mmada",)
DIMOO_MODEL_TYPES = ("llada",)
log = logging.getLogger(__name__)
MMADA_IMAGE_OFFSET = 126349  # documented (reference §3.4): len(LLaDA tokenizer)
DIMOO_IMAGE_OFFSET = 126356  # documented (reference §5.3)
FULL_SIZE_HEAD = 130000      # LM heads wider than this are full-size checkpoints (tiny ones are a few thousand rows)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKENIZER_DIR = "image_tokenizer"
IMAGE_TOKENIZER_META = "image_tokenizer.json"

DIMOO_SYSTEM = "Generate an image according to the text prompt."
DIMOO_TEMPLATE = "<system>" + DIMOO_SYSTEM + "</system><user>{prompt}</user>"
"""Lumina-DiMOO's text-to-image prompt (reference §5.4); ``{prompt}`` is the user's text."""
DIMOO_UNCOND_PROMPT = "<uncondition>"

# name -> (documented default id, config.json keys, tokenizer token names) — reference §3.4 (MMaDA), §5.3 (DiMOO).
MMADA_SPECIALS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    "pad": (126093, (), ("[iPAD]",)),
    "t2i": (126088, (), ("<|t2i|>",)),
    # MMaDA's UniversalPrompting takes <bos>/<eos> from the tokenizer (bos_token_id / eos_token_id), nothing else.
    "bos": (126080, (), ()),
    "eos": (126081, (), ()),
    "soi": (126084, (), ("<|soi|>",)),
    "eoi": (126085, (), ("<|eoi|>",)),
    "mask": (126336, ("mask_token_id",), ("<|mdm_mask|>",)),
}
DIMOO_SPECIALS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    "pad": (126339, ("pad_token_id",), ()),
    "mask": (126336, ("mask_token_id",), ("<|mdm_mask|>",)),
    "newline": (126084, ("newline_token_id",), ()),
    "answer_start": (126354, (), ("<answer>",)),
    "answer_end": (126355, (), ("</answer>",)),
    "boi": (126349, (), ("<Image>",)),
    "eoi": (126350, (), ("</Image>",)),
}


# ----------------------------------------------------------------------------------------------------------------
# Image tokenizer bound to the policy's grid
# ----------------------------------------------------------------------------------------------------------------


class GridImageTokenizer:
    """A real image tokenizer (``ImageTokenizer`` protocol) bound to one image size, so the policy and the trainers
    call ``decode(codes)`` / ``encode(images)`` exactly as with the toy palette tokenizer.

    The wrapped model is frozen and kept outside the policy's parameters (never trained, never in a Lightning
    checkpoint). ``device``: where encode/decode run (``auto`` = CUDA when available); results come back on the CPU.
    """

    def __init__(self, tokenizer: Any, height_px: int, width_px: int, device: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.height_px, self.width_px = int(height_px), int(width_px)
        self.grid = tuple(int(v) for v in tokenizer.grid_for(self.height_px, self.width_px))
        self.device = device
        self._moved = False

    @property
    def codebook_size(self) -> int:
        return int(self.tokenizer.codebook_size)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def _ready(self) -> None:
        if not self._moved:
            want = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            model = getattr(self.tokenizer, "model", None) or getattr(self.tokenizer, "vq", None)
            if model is not None:
                model.to(want)
            self._moved = True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) at this tokenizer's size -> (B, N) codes (CPU)."""
        if tuple(images.shape[-2:]) != (self.height_px, self.width_px):
            raise ValueError(f"expected {self.height_px}x{self.width_px} images, got {tuple(images.shape[-2:])}; "
                             "resize with htgrpo.policies.image_tokenizers.resize_center_crop first")
        self._ready()
        return self.tokenizer.encode(images).cpu()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes -> uint8 (B, 3, H, W) (CPU)."""
        self._ready()
        return self.tokenizer.decode(codes.long(), self.grid).cpu()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the wrapped tokenizer to ``directory/image_tokenizer/`` (its own config.json must not overwrite
        the backbone's) and ``image_tokenizer.json`` (class and image size)."""
        self.tokenizer.save_pretrained(os.path.join(directory, IMAGE_TOKENIZER_DIR))
        meta = {"tokenizer": _class_path(self.tokenizer), "height_px": self.height_px, "width_px": self.width_px}
        with open(os.path.join(directory, IMAGE_TOKENIZER_META), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GridImageTokenizer:
        with open(os.path.join(directory, IMAGE_TOKENIZER_META)) as f:
            meta = json.load(f)
        tok_cls = _resolve_class(meta["tokenizer"], meta["tokenizer"])
        tok = tok_cls.from_pretrained(os.path.join(directory, IMAGE_TOKENIZER_DIR), subfolder=None,
                                      config_key="ckpt_path")
        return cls(tok, meta["height_px"], meta["width_px"])

    def __repr__(self) -> str:
        name = type(self.tokenizer).__name__
        return f"GridImageTokenizer({name}, {self.height_px}x{self.width_px} px, grid={self.grid})"


# ----------------------------------------------------------------------------------------------------------------
# Start-up checks (pure, small)
# ----------------------------------------------------------------------------------------------------------------


def parse_resolution(value: Any, key: str = "resolution", multiple: int = 16) -> tuple[int, int]:
    """``512`` or ``[height, width]`` -> (height, width), each a positive multiple of ``multiple`` (16 px per code)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == int(value):
        hw = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            hw = (int(value[0]), int(value[1]))
        except (TypeError, ValueError):
            raise ConfigError(key, f"must be an int or [height, width] of ints, got {value!r}") from None
    else:
        raise ConfigError(key, f"must be an int or [height, width], got {value!r}")
    for side in hw:
        require(side > 0 and side % multiple == 0, key,
                f"must be a positive multiple of {multiple} px (the image tokenizer's patch size), got {value!r}")
    return hw


def _is_hub_id(name: str) -> bool:
    return not (os.path.isabs(name) or name.startswith((".", "~"))) and name.count("/") == 1


def download_hint(repo: str, key: str, include: str | None = None) -> str:
    folder = "/path/to/" + repo.split("/")[-1]
    inc = f' --include "{include}"' if include else ""
    return (f"Download it on a machine with network access: `hf download {repo}{inc} --local-dir {folder}`, copy the "
            f"folder here and pass `{key}={folder}`.")


def read_checkpoint_config(path_or_id: str, key: str, repo: str) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (local folder, or hub id through the HF cache / network)."""
    name = str(path_or_id)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        cfg = Path(expanded) / "config.json"
        if not cfg.is_file():
            raise ConfigError(key, f"{name!r} is a folder without config.json, so it is not a checkpoint. "
                                   + download_hint(repo, "policy." + key))
        return json.loads(cfg.read_text())
    if not _is_hub_id(name):
        raise ConfigError(key, f"checkpoint folder {name!r} does not exist. " + download_hint(repo, "policy." + key))
    try:
        from huggingface_hub import hf_hub_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        path = hf_hub_download(name, "config.json", local_files_only=offline)
    except Exception as err:  # offline cache miss, unknown repo, no network: all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
               else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise ConfigError(key, f"cannot load checkpoint {name!r} ({why}). "
                               + download_hint(repo, "policy." + key)) from None
    return json.loads(Path(path).read_text())


def check_model_type(config: Mapping[str, Any], allowed: Sequence[str], key: str, policy_name: str) -> None:
    """``config.json``'s ``model_type`` must be one this policy reads (a DiMOO folder given to policy=mmada fails)."""
    got = config.get("model_type")
    require(got in allowed, key,
            f"checkpoint has model_type={got!r} (architectures={config.get('architectures')}), but "
            f"policy={policy_name} expects model_type in {list(allowed)}; point it at a {policy_name} checkpoint "
            "or pick the matching policy")


def resolve_special_ids(
    table: Mapping[str, tuple[int, tuple[str, ...], tuple[str, ...]]],
    config: Mapping[str, Any],
    tokenizer: HFTextTokenizer,
    overrides: Mapping[str, Any] | None,
    key: str,
) -> dict[str, int]:
    """Special-token ids of a layout: override > config.json / tokenizer (which must agree) > documented default.

    For each name: the ids stored in ``config.json`` under its keys and the ids of its token names in the tokenizer
    (plus the tokenizer's own bos/eos/pad ids) are collected; if they disagree, the checkpoint is inconsistent and
    this fails naming ``key``. ``overrides`` (``policy.special_tokens``) wins without checks.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(table))
    require(not unknown, "special_tokens", f"unknown names {unknown}; known: {sorted(table)}")
    tok_attr = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    ids: dict[str, int] = {}
    for name, (default, config_keys, token_names) in table.items():
        if name in overrides:
            ids[name] = int(overrides[name])
            continue
        found: list[tuple[str, int]] = []
        for k in config_keys:
            if config.get(k) is not None:
                found.append((f"config.json {k}", int(config[k])))
        for t in token_names:
            tid = tokenizer.token_id(t)
            if tid is not None:
                found.append((f"tokenizer {t!r}", tid))
        if tok_attr.get(name) is not None:
            found.append((f"tokenizer {name}_token_id", int(tok_attr[name])))
        values = {v for _, v in found}
        if len(values) > 1:
            where = ", ".join(f"{src} = {v}" for src, v in found)
            raise ConfigError(key, f"the checkpoint's special tokens do not match: {name} is {where}. Fix the "
                                   f"tokenizer/config, or set policy.special_tokens.{name}=ID explicitly")
        ids[name] = found[0][1] if found else int(default)
    return ids


def check_layout_fits(specials: Mapping[str, int], image_offset: int, codebook: int, head_rows: int,
                      key: str) -> None:
    """Specials must be distinct text ids below the image codes, and the codes must fit in the LM head."""
    require(image_offset + codebook <= head_rows, key,
            f"image codes would occupy ids [{image_offset}, {image_offset + codebook}) but the model's LM head has "
            f"only {head_rows} rows: the tokenizer, the image tokenizer's codebook and the checkpoint do not match")
    for name, tid in specials.items():
        require(0 <= tid < head_rows, key, f"special token {name} = {tid} is outside the model's {head_rows} rows")
        require(not (image_offset <= tid < image_offset + codebook) or name == "pad", key,
                f"special token {name} = {tid} falls inside the image-code ids [{image_offset}, "
                f"{image_offset + codebook}): the tokenizer does not match the layout")
    dupes = {n for n, t in specials.items() if list(specials.values()).count(t) > 1 and n != "pad"}
    require(not dupes, key, f"special tokens {sorted(dupes)} share an id: the tokenizer does not match the layout")


def _dtype(value: str) -> torch.dtype:
    require_choice(str(value), tuple(DTYPES), "dtype")
    return DTYPES[str(value)]


def _load_text_tokenizer(pretrained: str, key: str, repo: str, **kwargs: Any) -> HFTextTokenizer:
    try:
        return HFTextTokenizer.from_pretrained(pretrained, padding_side="left", config_key=key, repo_hint=repo,
                                               **kwargs)
    except TokenizerNotFoundError as err:
        raise ConfigError(key, str(err)) from None


def _load_image_tokenizer(cls_path: str, path: str, key: str, subfolder: str | None) -> Any:
    from htgrpo.policies.image_tokenizers import MissingWeightsError

    cls = _resolve_class(cls_path, cls_path)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, config_key=f"policy.{key}")
    except MissingWeightsError as err:
        raise ConfigError(key, str(err)) from None
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


def _load_backbone(pretrained: str, key: str, repo: str, dtype: torch.dtype) -> Any:
    try:
        return load_llada(pretrained, config_key=f"policy.{key}", dtype=dtype)
    except CheckpointNotFoundError as err:
        raise ConfigError(key, f"{err} ({download_hint(repo, 'policy.' + key)})") from None
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


def _checkpoint_config(pretrained: str, repo: str, model_types: tuple[str, ...], family: str) -> dict:
    """``pretrained``'s config.json, checked to be a ``family`` checkpoint (errors name ``policy.pretrained``)."""
    config = read_checkpoint_config(pretrained, "pretrained", repo)
    check_model_type(config, model_types, "pretrained", family)
    return config


def _grid_tokenizer(cls_path: str, path: str, key: str, subfolder: str | None, height: int, width: int,
                    vq_device: str) -> GridImageTokenizer:
    """The image tokenizer ``cls_path`` loaded from ``path[/subfolder]`` (errors name ``policy.<key>``), at a fixed
    ``height`` x ``width`` grid, running on ``vq_device``."""
    return GridImageTokenizer(_load_image_tokenizer(cls_path, path, key, subfolder), height, width, vq_device)


def _finish(policy: MaskedDiffusionPolicy, lora: Any, gradient_checkpointing: bool) -> MaskedDiffusionPolicy:
    """Train mode (``from_pretrained`` returns eval mode, which would switch gradient checkpointing and pretraining's
    LoRA dropout off; the samplers switch to eval and the GRPO log-prob passes to dropout-free train mode themselves),
    then LoRA / gradient checkpointing through ``htgrpo.policies.lora``."""
    policy.train()
    lora_r = int((lora or {}).get("r", 0) or 0) if isinstance(lora, Mapping) else 0
    try:
        from htgrpo.policies.lora import apply_lora
    except ImportError:
        require(lora_r == 0 and not gradient_checkpointing, "lora",
                "LoRA / gradient checkpointing need htgrpo.policies.lora, which is not available in this install")
        return policy
    return apply_lora(policy, lora, bool(gradient_checkpointing))


# ----------------------------------------------------------------------------------------------------------------
# Builders (the `_target_`s of conf/policy/mmada.yaml and dimoo.yaml)
# ----------------------------------------------------------------------------------------------------------------


def build_mmada_policy(
    pretrained: str = MMADA_REPO,
    vq_model: str = MAGVIT_REPO,
    resolution: int | Sequence[int] = 512,
    max_text_len: int = 256,
    dtype: str = "bfloat16",
    special_tokens: Mapping[str, int] | None = None,
    vq_device: str = "auto",
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> MaskedDiffusionPolicy:
    """MMaDA-8B text-to-image policy.

    Args:
        pretrained: checkpoint folder or hub id (``Gen-Verse/MMaDA-8B-Base`` / ``-MixCoT``); ``model_type: mmada``.
        vq_model: MAGVIT-v2 folder or hub id (``showlab/magvitv2``).
        resolution: image size, int or [height, width], multiple of 16 (512 -> 32x32 = 1024 codes).
        max_text_len: MMaDA's ``max_text_len`` L: the prompt part is L + 1 tokens (``[iPAD]* <|t2i|> <bos> text
            <eos>``), so the sequence is L + 1 + 1 + N + 1 long (L = 256: 1283 at 512 px, MaskGRPO's setting).
        dtype: backbone weights (``bfloat16`` for 8B; ``float32`` for CPU smoke tests).
        special_tokens: explicit ids (pad, t2i, bos, eos, soi, eoi, mask) overriding config/tokenizer/defaults.
        vq_device: where the image tokenizer runs (``auto``: CUDA when available).
        lora, gradient_checkpointing: passed to ``htgrpo.policies.lora.apply_lora``.
    """
    height, width = parse_resolution(resolution)
    require(int(max_text_len) >= 4, "max_text_len", f"must be >= 4, got {max_text_len}")
    torch_dtype = _dtype(dtype)
    pretrained = str(pretrained)
    config = _checkpoint_config(pretrained, MMADA_REPO, MMADA_MODEL_TYPES, "mmada")
    # MMaDA tokenises the bare prompt; its layout writes <|t2i|> <bos> … <eos> itself.
    text_tok = _load_text_tokenizer(pretrained, "pretrained", MMADA_REPO, add_special_tokens=False)
    ids = resolve_special_ids(MMADA_SPECIALS, config, text_tok, special_tokens, "pretrained")
    grid_tok = _grid_tokenizer("htgrpo.policies.image_tokenizers.MagvitImageTokenizer", str(vq_model), "vq_model",
                               None, height, width, vq_device)
    codebook = grid_tok.codebook_size
    if config.get("codebook_size") is not None:
        require(int(config["codebook_size"]) == codebook, "vq_model",
                f"the image tokenizer has {codebook} codes but the checkpoint's config.json says codebook_size="
                f"{config['codebook_size']}")
    offset = len(text_tok)  # MMaDA: image code c is token len(text_tokenizer) + c
    head_rows = int(config.get("embedding_size") or config.get("vocab_size") or 0)
    check_layout_fits(ids, offset, codebook, head_rows, "pretrained")
    if head_rows > FULL_SIZE_HEAD and offset != MMADA_IMAGE_OFFSET:
        log.warning("MMaDA image codes start at len(tokenizer) = %d, not the documented %d: check that "
                    "policy.pretrained holds MMaDA's own tokenizer", offset, MMADA_IMAGE_OFFSET)
    layout = T2ISequenceLayout(image_token_offset=offset, codebook_size=codebook,
                               num_image_tokens=grid_tok.num_tokens, max_text_len=int(max_text_len) - 2, **ids)
    backbone = _load_backbone(pretrained, "pretrained", MMADA_REPO, torch_dtype)
    policy = MaskedDiffusionPolicy(backbone, layout, text_tok, grid_tok)
    return _finish(policy, lora, gradient_checkpointing)


def build_dimoo_policy(
    pretrained: str = DIMOO_REPO,
    vq_model: str | None = None,
    resolution: int | Sequence[int] = 1024,
    max_text_len: int | None = None,
    padding_mask: bool = True,
    dtype: str = "bfloat16",
    special_tokens: Mapping[str, int] | None = None,
    vq_device: str = "auto",
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> MaskedDiffusionPolicy:
    """Lumina-DiMOO text-to-image policy.

    Args:
        pretrained: checkpoint folder or hub id (``Alpha-VLLM/Lumina-DiMOO``); ``model_type: llada``.
        vq_model: folder holding the ``vqvae/`` VQModel; None = ``pretrained`` (DiMOO ships it in the same repo).
        resolution: int or [height, width], multiples of 16, non-square allowed (1024 -> 64x64 codes + 64 newlines).
        max_text_len: None (default, as released): prompts are never cut; a batch's templated prompts (system +
            user template around the prompt) are left-padded to its longest. An int caps the templated prompt at
            that many tokens: longer ones keep their start plus ``</user>``, and each cut prompt is logged once.
        padding_mask: True masks the left pads of a batch (= the released one-prompt-at-a-time logits); False passes
            no padding mask, as the released model does (pads are then attended). See ``DimooSequenceLayout``.
        dtype, special_tokens, vq_device, lora, gradient_checkpointing: as for :func:`build_mmada_policy`
            (special names: pad, mask, newline, answer_start, answer_end, boi, eoi).
    """
    height, width = parse_resolution(resolution)
    if max_text_len is not None:
        require(int(max_text_len) >= 8, "max_text_len", f"must be >= 8 or null (no cap), got {max_text_len}")
    torch_dtype = _dtype(dtype)
    pretrained = str(pretrained)
    config = _checkpoint_config(pretrained, DIMOO_REPO, DIMOO_MODEL_TYPES, "dimoo")
    text_tok = _load_text_tokenizer(pretrained, "pretrained", DIMOO_REPO, template=DIMOO_TEMPLATE,
                                    add_special_tokens=True)
    ids = resolve_special_ids(DIMOO_SPECIALS, config, text_tok, special_tokens, "pretrained")
    no_pad_given = ids["pad"] == DIMOO_SPECIALS["pad"][0] and "pad" not in (special_tokens or {})
    if no_pad_given and text_tok.pad_token_id is not None:
        ids["pad"] = int(text_tok.pad_token_id)
    close_user = text_tok.tokenizer("</user>", add_special_tokens=False)["input_ids"]
    text_tok.keep_tail = list(close_user)  # truncation keeps the template closed
    uncond = tuple(text_tok.token_ids(DIMOO_UNCOND_PROMPT))
    require(max_text_len is None or len(uncond) <= int(max_text_len), "max_text_len",
            f"must hold the {len(uncond)}-token unconditional prompt, got {max_text_len}")
    grid_tok = _grid_tokenizer("htgrpo.policies.image_tokenizers.DiffusersVQImageTokenizer",
                               str(vq_model or pretrained), "vq_model" if vq_model else "pretrained", "vqvae",
                               height, width, vq_device)
    codebook = grid_tok.codebook_size
    head_rows = int(config.get("embedding_size") or config.get("vocab_size") or 0)
    offset = head_rows - codebook  # released generate_image: text_vocab_size = logits width - codebook size
    check_layout_fits(ids, offset, codebook, head_rows, "pretrained")
    if head_rows > FULL_SIZE_HEAD and offset != DIMOO_IMAGE_OFFSET:
        log.warning("DiMOO image codes start at LM-head width - codebook = %d, not the documented %d (the released "
                    "sampler infers the offset the same way)", offset, DIMOO_IMAGE_OFFSET)
    rows, cols = grid_tok.grid
    layout = DimooSequenceLayout(image_token_offset=offset, codebook_size=codebook, rows=rows, cols=cols,
                                 max_text_len=None if max_text_len is None else int(max_text_len), uncond_ids=uncond,
                                 padding_mask=bool(padding_mask),
                                 **ids)
    backbone = _load_backbone(pretrained, "pretrained", DIMOO_REPO, torch_dtype)
    policy = MaskedDiffusionPolicy(backbone, layout, text_tok, grid_tok)
    return _finish(policy, lora, gradient_checkpointing)
