"""Loading MAR weights: LTH14 ``checkpoint-last.pth`` files and the MAR part of a Harmon checkpoint.

Formats (reference/mar_grpo.md §2.6, §1.2):

- **LTH14** (``torch.save`` dict): ``model`` and ``model_ema`` (state dicts with identical keys; the EMA one is used
  for inference), plus ``optimizer``, ``epoch``, ``scaler`` and ``args`` (the ``main_mar.py`` argparse Namespace:
  ``model``, ``img_size``, ``vae_stride``, ``patch_size``, ``vae_embed_dim``, ``buffer_size``, ``class_num``,
  ``diffloss_d``, ``diffloss_w``, ``num_sampling_steps``, …). Files written by :func:`save_lth14_checkpoint` also
  carry ``mar_config`` (our :class:`MARConfig` as a dict), which takes precedence over ``args``.
- **Harmon** (a whole-model state dict, ``.safetensors`` / ``.pth`` / ``.bin``, or a directory with
  ``model.safetensors`` or a sharded index): the MAR keys sit under ``mar.`` (or ``module.mar.``) next to ``llm.``,
  ``vae.``, ``proj_in.``, ``proj_out.`` …; only the ``mar.`` keys are read. Harmon's ``class_emb`` is unused by
  Harmon and is dropped when the target model has no class conditioner.

What the state dict fixes (token dim, widths, depths, MLP ratio, buffer size, grid length, class count, head depth
and width) is inferred from it; what it cannot (attention heads, dropout, sampling steps) comes from the file's
metadata, then from ``config``, then from the LTH14 size presets by width. When the requested grid differs from the
checkpoint's, the learned position embeddings are interpolated (buffer rows kept).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from htgrpo.config import ConfigError
from htgrpo.policies.mar.backbone import MAR, MAR_PRESETS, MARConfig, interpolate_pos_embed

HARMON_PREFIXES = ("mar.", "module.mar.")
POS_EMBED_KEYS = ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "diffusion_pos_embed_learned")

LTH14_HINT = ("Expected an LTH14 MAR `checkpoint-last.pth` (mar_base / mar_large / mar_huge) from "
              "https://github.com/LTH14/mar: `python util/download.py` in that repository saves them to "
              "pretrained_models/mar/<model>/checkpoint-last.pth (the README also links MAR-B/L/H directly). Download "
              "it on a machine with network access and point the checkpoint path at the file or its directory.")
HARMON_HINT = ("Expected a Harmon checkpoint whose MAR weights are stored under `mar.` (the weight file of the "
               "Hugging Face model wusize/Harmon-1_5B, or a MAR-GRPO output directory holding model.safetensors): a "
               ".safetensors / .pth / .bin file, or a directory with model.safetensors, pytorch_model.bin or a "
               "sharded *.index.json. Download it on a machine with network access (e.g. `huggingface-cli download "
               "wusize/Harmon-1_5B --local-dir <dir>`) and point the checkpoint path at it.")

# -----------------------------------------------------------------------------------------------------------------
# Reading files
# -----------------------------------------------------------------------------------------------------------------


def _torch_load(path: Path, map_location: Any, trust_checkpoint: bool) -> Any:
    """``torch.load`` with ``weights_only`` (argparse.Namespace allowed, as LTH14 stores its args) unless trusted."""
    if trust_checkpoint:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: weights-only loading refused an object in the file ({err}). If you trust the file, "
                         "pass trust_checkpoint=True.") from None


def _find_in_dir(directory: Path, names: Iterable[str], hint: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    singles = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in directory.glob(ext))
    if len(singles) == 1:
        return singles[0]
    raise FileNotFoundError(f"no checkpoint file found in directory {directory} (looked for {list(names)}). {hint}")


def read_lth14_checkpoint(path: str | Path, use_ema: bool = True, map_location: Any = "cpu",
                          trust_checkpoint: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, hints) from an LTH14 checkpoint. ``use_ema`` picks ``model_ema`` (default) over ``model``.

    ``hints`` holds the MARConfig fields the file's metadata gives (``mar_config`` or LTH14 ``args``).
    A bare state dict (no ``model`` key) is accepted too.
    """
    path = Path(path)
    if path.is_dir():
        path = _find_in_dir(path, ("checkpoint-last.pth",), LTH14_HINT)
    if not path.is_file():
        raise FileNotFoundError(f"LTH14 MAR checkpoint not found: {path}. {LTH14_HINT}")
    obj = _torch_load(path, map_location, trust_checkpoint)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with 'model' / 'model_ema' state dicts, got {type(obj).__name__}")
    if "model" in obj or "model_ema" in obj:
        key = "model_ema" if use_ema else "model"
        if key not in obj:
            other = "model" if use_ema else "model_ema"
            raise ValueError(f"{path}: no '{key}' entry (keys: {sorted(obj)[:8]}); pass use_ema={not use_ema} to "
                             f"load '{other}'")
        state = dict(obj[key])
    else:
        state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    hints: dict[str, Any] = {}
    if obj.get("args") is not None:
        hints.update(config_hints_from_lth14_args(obj["args"]))
    if isinstance(obj.get("mar_config"), Mapping):
        hints.update(obj["mar_config"])
    return state, hints


def config_hints_from_lth14_args(args: Any) -> dict[str, Any]:
    """MARConfig fields from LTH14 ``main_mar.py`` arguments (Namespace or dict); unknown/missing ones are skipped."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    hints: dict[str, Any] = {}
    if a.get("model") in MAR_PRESETS:
        hints.update(MAR_PRESETS[a["model"]])
    if all(k in a for k in ("img_size", "vae_stride", "patch_size")):
        side = int(a["img_size"]) // int(a["vae_stride"]) // int(a["patch_size"])
        hints.update(seq_h=side, seq_w=side)
    if "vae_embed_dim" in a and "patch_size" in a:
        hints["token_embed_dim"] = int(a["vae_embed_dim"]) * int(a["patch_size"]) ** 2
    if "class_num" in a:
        hints["num_classes"] = int(a["class_num"])
    for key in ("buffer_size", "label_drop_prob", "mask_ratio_min", "attn_dropout", "proj_dropout", "diffloss_d",
                "diffloss_w", "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing"):
        if key in a and a[key] is not None:
            hints[key] = a[key]
    if "num_sampling_steps" in hints:
        hints["num_sampling_steps"] = str(hints["num_sampling_steps"])
    return hints


def read_harmon_mar_state_dict(path: str | Path, prefixes: Iterable[str] = HARMON_PREFIXES,
                               map_location: Any = "cpu", trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The ``mar.*`` part of a Harmon checkpoint with the prefix stripped (other keys are never loaded from
    safetensors files, and ignored in pickled ones)."""
    path = Path(path)
    prefixes = tuple(prefixes)
    if path.is_dir():
        path = _find_in_dir(path, ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                   "pytorch_model.bin.index.json"), HARMON_HINT)
    if not path.is_file():
        raise FileNotFoundError(f"Harmon checkpoint not found: {path}. {HARMON_HINT}")

    def strip(key: str) -> str | None:
        for p in prefixes:
            if key.startswith(p):
                return key[len(p):]
        return None

    files = [path]
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        files = sorted({path.parent / f for k, f in weight_map.items() if strip(k) is not None})
    state: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = strip(key)
                    if name is not None:
                        state[name] = f.get_tensor(key)
        else:
            obj = _torch_load(file, map_location, trust_checkpoint)
            for wrapper in ("state_dict", "model", "module"):
                if isinstance(obj, Mapping) and wrapper in obj and not any(strip(k) for k in obj if isinstance(k, str)):
                    obj = obj[wrapper]
            for key, value in obj.items():
                name = strip(key) if isinstance(key, str) else None
                if name is not None:
                    state[name] = value
    if not state:
        raise ValueError(f"{path}: no keys with prefix {list(prefixes)} (is this a Harmon checkpoint?). "
                         f"{HARMON_HINT}")
    return state


# -----------------------------------------------------------------------------------------------------------------
# Config inference
# -----------------------------------------------------------------------------------------------------------------


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _require_key(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        sample = sorted(state)[:6]
        raise ValueError(f"{source}: missing '{key}', so this is not a MAR state dict (first keys: {sample})")
    return state[key]


def state_dict_shape_fields(state: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """The MARConfig fields a MAR state dict fixes, plus ``seq_len`` (the grid's shape is not in the weights)."""
    z_proj = _require_key(state, "z_proj.weight", source)
    enc_pos = _require_key(state, "encoder_pos_embed_learned", source)
    diff_pos = _require_key(state, "diffusion_pos_embed_learned", source)
    fields: dict[str, Any] = {
        "token_embed_dim": int(z_proj.shape[1]),
        "encoder_embed_dim": int(z_proj.shape[0]),
        "encoder_depth": _count_blocks(state, "encoder_blocks"),
        "decoder_embed_dim": int(_require_key(state, "decoder_embed.weight", source).shape[0]),
        "decoder_depth": _count_blocks(state, "decoder_blocks"),
        "buffer_size": int(enc_pos.shape[1] - diff_pos.shape[1]),
        "seq_len": int(diff_pos.shape[1]),
        "diffloss_w": int(_require_key(state, "diffloss.net.input_proj.weight", source).shape[0]),
        "diffloss_d": _count_blocks(state, "diffloss.net.res_blocks"),
    }
    fc1 = state.get("encoder_blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        fields["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    if "class_emb.weight" in state:
        fields.update(conditioning="class", num_classes=int(state["class_emb.weight"].shape[0]))
    elif any(k.startswith("text_encoder.") for k in state):
        fields["conditioning"] = "text"
    else:
        fields["conditioning"] = "none"
    return fields


def infer_mar_config(state: Mapping[str, Tensor], hints: Mapping[str, Any] | None = None,
                     source: str = "checkpoint") -> MARConfig:
    """The checkpoint's own MARConfig: shape fields from the state dict, the rest from ``hints``, else the LTH14
    preset matching the width (heads), else MARConfig defaults. The grid is ``hints``' when it has L cells, else
    square."""
    hints = dict(hints or {})
    fields = state_dict_shape_fields(state, source)
    seq_len = fields.pop("seq_len")
    side = math.isqrt(seq_len)
    if hints.get("seq_h", 0) * hints.get("seq_w", 0) == seq_len:
        fields.update(seq_h=int(hints["seq_h"]), seq_w=int(hints["seq_w"]))
    elif side * side == seq_len:
        fields.update(seq_h=side, seq_w=side)
    else:
        raise ValueError(f"{source}: {seq_len} grid positions is not a square grid and the file does not say its "
                         "shape; pass config=MARConfig(seq_h=..., seq_w=...)")
    values = {**hints, **fields}
    by_width = {p["encoder_embed_dim"]: p for p in MAR_PRESETS.values()}
    for part in ("encoder", "decoder"):
        key = f"{part}_num_heads"
        if key not in values:
            preset = by_width.get(values[f"{part}_embed_dim"])
            if preset is None:
                width = values[f"{part}_embed_dim"]
                raise ConfigError(key, f"{source}: cannot be inferred from the weights (width {width} matches no "
                                       "LTH14 preset); pass config=MARConfig(...)")
            values[key] = preset[key]
    if values.get("conditioning") == "class":
        values.setdefault("num_classes", 1000)
    known = set(MARConfig.__dataclass_fields__)
    return MARConfig(**{k: v for k, v in values.items() if k in known})


# -----------------------------------------------------------------------------------------------------------------
# Building the model
# -----------------------------------------------------------------------------------------------------------------


def _source_grid(state: Mapping[str, Tensor], hints: Mapping[str, Any], target: MARConfig) -> tuple[int, int]:
    seq_len = int(state["diffusion_pos_embed_learned"].shape[1])
    if hints.get("seq_h", 0) * hints.get("seq_w", 0) == seq_len:
        return int(hints["seq_h"]), int(hints["seq_w"])
    if target.seq_len == seq_len:
        return target.seq_h, target.seq_w
    side = math.isqrt(seq_len)
    if side * side == seq_len:
        return side, side
    raise ValueError(f"checkpoint grid of {seq_len} tokens is not square and not the target's; cannot interpolate")


def adapt_position_embeddings(state: dict[str, Tensor], source_hw: tuple[int, int], config: MARConfig,
                              mode: str = "bicubic") -> dict[str, Tensor]:
    """Interpolate the three learned position embeddings from ``source_hw`` to ``config``'s grid (buffer kept)."""
    target_hw = (config.seq_h, config.seq_w)
    if tuple(source_hw) == target_hw:
        return state
    state = dict(state)
    for key in POS_EMBED_KEYS:
        prefix = 0 if key == "diffusion_pos_embed_learned" else config.buffer_size
        state[key] = interpolate_pos_embed(state[key], prefix, tuple(source_hw), target_hw, mode)
    return state


def load_mar_state_dict(model: MAR, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load with an error that lists a few missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})")
        raise ValueError(f"{source} does not fit MAR({model.config}): " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def build_mar_from_state_dict(state: Mapping[str, Tensor], hints: Mapping[str, Any] | None = None,
                              config: MARConfig | None = None, interpolation: str = "bicubic",
                              source: str = "checkpoint") -> MAR:
    """A MAR holding ``state``: its config is ``config`` (target; grid may differ → interpolation) or the inferred
    one."""
    hints = dict(hints or {})
    state = dict(state)
    inferred = infer_mar_config(state, hints, source) if config is None else None
    target = config or inferred
    ckpt_buffer = int(state["encoder_pos_embed_learned"].shape[1] - state["diffusion_pos_embed_learned"].shape[1])
    if ckpt_buffer != target.buffer_size:
        raise ValueError(f"{source}: buffer_size {ckpt_buffer} in the checkpoint != config.buffer_size "
                         f"{target.buffer_size} (buffer rows cannot be interpolated)")
    state = adapt_position_embeddings(state, _source_grid(state, hints, target), target, interpolation)
    model = MAR(target)
    load_mar_state_dict(model, state, source)
    return model


def load_lth14_checkpoint(path: str | Path, config: MARConfig | None = None, use_ema: bool = True,
                          interpolation: str = "bicubic", map_location: Any = "cpu",
                          trust_checkpoint: bool = False) -> MAR:
    """A MAR from an LTH14 ``checkpoint-last.pth`` (``model_ema`` by default; ``use_ema=False`` for ``model``).

    ``config`` fixes the target architecture (e.g. a larger grid: position embeddings are interpolated); without it
    the config is inferred from the weights and the file's ``args``.
    """
    state, hints = read_lth14_checkpoint(path, use_ema, map_location, trust_checkpoint)
    return build_mar_from_state_dict(state, hints, config, interpolation, source=f"LTH14 checkpoint {path}")


def load_harmon_mar(path: str | Path, config: MARConfig | None = None, prefixes: Iterable[str] = HARMON_PREFIXES,
                    interpolation: str = "bilinear", map_location: Any = "cpu", trust_checkpoint: bool = False,
                    hints: Mapping[str, Any] | None = None) -> MAR:
    """A MAR from the ``mar.*`` keys of a Harmon checkpoint (everything else is ignored).

    Harmon-1.5B's MAR is ``mar_huge`` with DiffLoss (12, 1536) and a 64-token buffer filled with ``fake_latent``;
    its ``class_emb`` is unused and dropped when ``config`` has no class conditioner. Harmon generates at 512 px
    (32×32 tokens): pass ``config`` with ``seq_h=seq_w=32``; the position embeddings are interpolated bilinearly by
    default, as Harmon does (``interpolation="bicubic"`` for the LTH14 loader's choice). The full Harmon policy
    (:mod:`htgrpo.policies.mar.harmon`) keeps the 16×16 weights and interpolates on the fly instead.
    """
    state = read_harmon_mar_state_dict(path, prefixes, map_location, trust_checkpoint)
    if config is not None and config.conditioning != "class":
        state.pop("class_emb.weight", None)
    return build_mar_from_state_dict(state, hints, config, interpolation, source=f"Harmon checkpoint {path}")


# -----------------------------------------------------------------------------------------------------------------
# Writing (tests, exports)
# -----------------------------------------------------------------------------------------------------------------


def lth14_args_for(config: MARConfig) -> argparse.Namespace:
    """LTH14 ``main_mar.py``-style args describing ``config`` (patch_size 1, vae_stride 16)."""
    preset = next((name for name, p in MAR_PRESETS.items()
                   if all(getattr(config, k) == v for k, v in p.items() if not k.startswith("diffloss"))), "custom")
    return argparse.Namespace(
        model=preset, img_size=config.seq_h * 16, vae_stride=16, patch_size=1, vae_embed_dim=config.token_embed_dim,
        buffer_size=config.buffer_size, class_num=config.num_classes, label_drop_prob=config.label_drop_prob,
        mask_ratio_min=config.mask_ratio_min, attn_dropout=config.attn_dropout, proj_dropout=config.proj_dropout,
        diffloss_d=config.diffloss_d, diffloss_w=config.diffloss_w, num_sampling_steps=config.num_sampling_steps,
        diffusion_batch_mul=config.diffusion_batch_mul, grad_checkpointing=config.grad_checkpointing)


def save_lth14_checkpoint(model: MAR, path: str | Path, ema_state_dict: Mapping[str, Tensor] | None = None,
                          epoch: int = 0, with_config: bool = True) -> Path:
    """Write ``{"model", "model_ema", "epoch", "args"[, "mar_config"]}`` like LTH14's ``checkpoint-last.pth``.

    ``model_ema`` is ``ema_state_dict`` or a copy of the model's weights. ``with_config=False`` leaves out our
    ``mar_config`` entry, so the file looks exactly like an LTH14 one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ema = {k: v.detach().cpu().clone() for k, v in (ema_state_dict or state).items()}
    payload: dict[str, Any] = {"model": state, "model_ema": ema, "epoch": int(epoch),
                               "args": lth14_args_for(model.config)}
    if with_config:
        payload["mar_config"] = model.config.to_dict()
    torch.save(payload, path)
    return path


def save_harmon_checkpoint(model: MAR, path: str | Path, extra: Mapping[str, Tensor] | None = None,
                           prefix: str = "mar.") -> Path:
    """Write the MAR weights under ``prefix`` (plus ``extra`` tensors, e.g. ``llm.*``) as safetensors (``.safetensors``
    suffix) or with ``torch.save`` (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


__all__ = [
    "adapt_position_embeddings",
    "build_mar_from_state_dict",
    "config_hints_from_lth14_args",
    "infer_mar_config",
    "load_harmon_mar",
    "load_lth14_checkpoint",
    "load_mar_state_dict",
    "lth14_args_for",
    "read_harmon_mar_state_dict",
    "read_lth14_checkpoint",
    "save_harmon_checkpoint",
    "save_lth14_checkpoint",
    "state_dict_shape_fields",
]
