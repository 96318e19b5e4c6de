"""The one checkpoint room: every kind of checkpoint htgrpo writes or reads, recognised and loaded here.

``fit`` (resume), ``evaluate``, ``generate`` and ``export`` all come through this module:

* :func:`detect_checkpoint_kind` names the kind of a file or folder (file names and small metadata only);
* :func:`load_checkpoint` returns a :class:`LoadedCheckpoint`: the kind, the policy, and for the training kinds the
  :class:`TrainingState` that ``fit`` resumes from;
* :func:`load_policy` is what ``evaluate`` / ``generate`` call with their config (``ckpt_path`` or ``policy``);
* :func:`resume_from` is what ``fit`` calls with ``ckpt_path`` before building anything;
* :func:`load_fit_checkpoint` is what ``export`` calls (the policy rebuilt from the fit run's own config).

The kinds (:data:`KINDS`; an unknown file or folder fails with a :class:`~htgrpo.config.ConfigError` listing them):

==================  ============================================================  ==================================
kind                what it is (written by)                                       the architecture comes from
==================  ============================================================  ==================================
lightning           ``.ckpt`` file of ``fit``: all ``policy.*`` weights + the     the ``policy`` the config builds
                    training state (optimiser, loops, step)                       (export: the fit run's config)
lightning_lora      ``.ckpt`` file of ``fit`` with ``policy.lora.r > 0``: only    the fit run's config (the base the
                    the adapter weights (``htgrpo_frozen_weights_stripped``)      adapters were trained on)
fsdp_sharded        folder of ``trainer=fsdp``: ``.metadata``, ``__<rank>_0.distcp``  as ``lightning``
                    shards (torch distributed checkpoint), Lightning's ``meta.pt``
deepspeed           folder of ``trainer=deepspeed_zero2/3``: ``latest``,           as ``lightning``
                    ``<tag>/mp_rank_00_model_states.pt``, ZeRO partitions
adapter             folder of ``export merge=false``: peft's                       the ``policy`` the config builds
                    ``adapter_config.json`` + ``adapter_model.safetensors``        (the base, ``policy.lora.r=0``)
policy_folder       folder of ``MaskedDiffusionPolicy.save_pretrained``:          the folder itself
                    ``config.json`` + ``policy.json`` / ``t2i_layout.json``
                    (``export merge=true``, full fine-tuning, the warm start)
mar_policy_folder   folder of ``ShapesMARPolicy.save_pretrained``                 the folder itself
                    (``policy.json`` type ``shapes_mar``: the MAR warm start)
mmada               released MMaDA folder (``config.json`` model_type ``mmada``)   ``policy=mmada`` (its ``pretrained``)
dimoo               released Lumina-DiMOO folder (model_type ``llada``)            ``policy=dimoo``
harmon              released Harmon folder (model_type ``harmon``; also what       ``policy=harmon``
                    ``HarmonPolicy.save_pretrained`` writes)
mar_lth14           released LTH14 MAR ``checkpoint-last.pth`` (``model``,         the file (class-conditional MAR,
                    ``model_ema``, ``args``) or its folder                         not a text-to-image policy)
==================  ============================================================  ==================================

Floor: this module stands with ``htgrpo.policies`` (README "Architecture"): it imports only ``htgrpo.config`` and
the policy modules, never an algorithm, a callback or an entry point. The training state is read from the files
with ``torch.load`` (no Lightning import); Lightning itself restores it in ``trainer.fit(ckpt_path=...)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from htgrpo.config import ConfigError, instantiate_node

KINDS: dict[str, str] = {
    "lightning": "a Lightning .ckpt file written by htgrpo.fit (policy.* weights and the training state)",
    "lightning_lora": "a LoRA .ckpt file written by htgrpo.fit with policy.lora.r > 0 (adapter weights only)",
    "fsdp_sharded": "an FSDP sharded checkpoint folder of trainer=fsdp (.metadata, __<rank>_0.distcp, meta.pt)",
    "deepspeed": "a DeepSpeed checkpoint folder of trainer=deepspeed_zero2/3 (latest, */mp_rank_00_model_states.pt)",
    "adapter": "a LoRA adapter folder written by htgrpo.export merge=false (adapter_config.json)",
    "policy_folder": "a masked-diffusion policy folder written by save_pretrained / htgrpo.export merge=true "
                     "(config.json with policy.json or t2i_layout.json)",
    "mar_policy_folder": "a ShapesWorld MAR policy folder written by ShapesMARPolicy.save_pretrained "
                         "(policy.json type shapes_mar)",
    "mmada": "a released MMaDA checkpoint folder (config.json model_type mmada): policy=mmada",
    "dimoo": "a released Lumina-DiMOO checkpoint folder (config.json model_type llada): policy=dimoo",
    "harmon": "a Harmon checkpoint folder, released or written by HarmonPolicy.save_pretrained (config.json "
              "model_type harmon): policy=harmon",
    "mar_lth14": "a released LTH14 MAR checkpoint-last.pth (model, model_ema, args), or a folder holding one",
}
"""Every kind htgrpo recognises, with the one-line description the errors list."""

TRAINING_KINDS = ("lightning", "lightning_lora", "fsdp_sharded", "deepspeed")
"""The kinds ``fit`` writes with the training state in them: what ``fit`` resumes from and ``export`` reads."""

RELEASED_BUILDERS = {
    "mmada": "htgrpo.policies.pretrained.build_mmada_policy",
    "dimoo": "htgrpo.policies.pretrained.build_dimoo_policy",
    "harmon": "htgrpo.policies.mar.harmon.build_harmon_policy",
}
"""The ``policy._target_`` that builds each released folder kind (its ``pretrained`` argument is the folder)."""

LIGHTNING_SPECIAL_PATHS = ("last", "best", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself in ``trainer.fit`` (e.g. ``last``: the run's newest checkpoint)."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
FSDP_METADATA_FILE = "meta.pt"           # Lightning's non-model state beside the torch distributed checkpoint
LORA_STRIPPED_FLAG = "htgrpo_frozen_weights_stripped"  # set by policies.lora.strip_frozen_weights
LTH14_FILE = "checkpoint-last.pth"


@dataclass(frozen=True)
class TrainingState:
    """Where ``fit`` resumes: ``ckpt_path`` as Lightning's ``trainer.fit(ckpt_path=...)`` takes it, and the step and
    epoch the checkpoint was written at (None when the file does not say, or for Lightning's special names)."""

    ckpt_path: str
    kind: str
    global_step: int | None = None
    epoch: int | None = None


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        kind: one of :data:`KINDS`.
        path: the checkpoint file or folder.
        policy: the policy with the checkpoint's weights (an ``nn.Module``; ``mar_lth14``: the bare ``MAR``).
        training_state: for :data:`TRAINING_KINDS`, the state ``fit`` resumes from; None for the others.
    """

    kind: str
    path: Path
    policy: Any
    training_state: TrainingState | None = None


# ======================================================================================================================
# Recognising
# ======================================================================================================================


def known_kinds_text() -> str:
    """The list of kinds, one per line, for error messages."""
    return "\n".join(f"  - {name}: {text}" for name, text in KINDS.items())


def unknown_checkpoint_error(path: Path, key: str = "ckpt_path", found: str = "") -> ConfigError:
    """The one error for a file or folder that is no checkpoint kind htgrpo knows."""
    what = "folder" if path.is_dir() else "file"
    seen = f" ({found})" if found else ""
    return ConfigError(key, f"{path} is a {what} that is no checkpoint kind htgrpo knows{seen}. The kinds are:\n"
                            f"{known_kinds_text()}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _peek(path: Path, weights_only: bool) -> Any:
    """The top level of a ``torch.save`` file, memory-mapped where the format allows (the tensors are not read)."""
    import argparse
    import pickle

    def load(mmap: bool) -> Any:
        if weights_only:  # LTH14 stores its argparse Namespace next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            return load(mmap=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        return None


def is_adapter_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is peft's adapter folder (``htgrpo.export`` without merge)."""
    return os.path.isfile(os.path.join(str(directory), ADAPTER_CONFIG_FILE))


def _folder_kind(path: Path) -> str | None:
    if is_adapter_folder(path):
        return "adapter"
    if (path / ".metadata").is_file() and (path / FSDP_METADATA_FILE).is_file():
        return "fsdp_sharded"
    if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")):
        return "deepspeed"
    from htgrpo.policies.mar.shapes import is_mar_policy_folder

    if is_mar_policy_folder(path):
        return "mar_policy_folder"
    config = path / "config.json"
    if config.is_file():
        from htgrpo.policies.masked_diffusion import POLICY_FILE
        from htgrpo.policies.t2i_layout import LAYOUT_FILE

        if (path / POLICY_FILE).is_file() or (path / LAYOUT_FILE).is_file():
            return "policy_folder"
        from htgrpo.policies.pretrained import DIMOO_MODEL_TYPES, MMADA_MODEL_TYPES

        model_type = _read_json(config).get("model_type")
        if model_type in MMADA_MODEL_TYPES:
            return "mmada"
        if model_type in DIMOO_MODEL_TYPES:
            return "dimoo"
        if model_type == "harmon":
            return "harmon"
    if (path / LTH14_FILE).is_file():
        return "mar_lth14"
    return None


def _file_kind(path: Path) -> str | None:
    if path.suffix in (".pth", ".pt"):  # weights-only first: LTH14 files need nothing else
        top = _peek(path, weights_only=True)
        if isinstance(top, Mapping) and "model" in top and "state_dict" not in top:
            return "mar_lth14"
    top = _peek(path, weights_only=False)  # a Lightning checkpoint pickles its hyper-parameters and loop state
    if isinstance(top, Mapping) and "state_dict" in top:
        return "lightning_lora" if top.get(LORA_STRIPPED_FLAG) else "lightning"
    return None


def detect_checkpoint_kind(path: str | os.PathLike, key: str = "ckpt_path") -> str:
    """The kind (a key of :data:`KINDS`) of the checkpoint file or folder at ``path``.

    Reads file names, small JSON files and, for single files, the top-level keys of the ``torch.save`` dict
    (memory-mapped). Folder checks, in order: ``adapter_config.json`` (adapter); ``.metadata`` + ``meta.pt``
    (FSDP sharded); ``latest`` or ``*/mp_rank_*_model_states.pt`` (DeepSpeed); ``policy.json`` type ``shapes_mar``
    (MAR policy folder); ``config.json`` with ``policy.json`` or ``t2i_layout.json`` (policy folder), else its
    ``model_type`` (mmada / llada = DiMOO / harmon); ``checkpoint-last.pth`` (LTH14 MAR). Files: ``.pth`` / ``.pt``
    with a ``model`` entry and no ``state_dict`` (LTH14 MAR); any file holding a ``state_dict`` (Lightning, LoRA
    when its frozen weights were stripped).

    Raises:
        ConfigError: (``key``) the path does not exist, or is no kind htgrpo knows (the message lists the kinds).
    """
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist (expected a checkpoint file or folder; the kinds are:\n"
                               f"{known_kinds_text()})")
    kind = _folder_kind(path) if path.is_dir() else _file_kind(path)
    if kind is None:
        raise unknown_checkpoint_error(path, key)
    return kind


# ======================================================================================================================
# Reading weights and training state
# ======================================================================================================================


def _strip_prefixes(state: Mapping[str, Any], prefix: str = "policy.") -> dict[str, torch.Tensor]:
    """``policy.*`` entries of a LightningModule state dict, prefix removed (and Lightning's ``_forward_module.``
    wrapper prefix, which DeepSpeed checkpoints of older Lightning versions carry)."""
    out = {}
    for name, value in state.items():
        name = name[len("_forward_module."):] if name.startswith("_forward_module.") else name
        if name.startswith(prefix):
            out[name[len(prefix):]] = value
    return out


def read_policy_weights(path: str | Path, policy: torch.nn.Module, key: str = "ckpt_path") -> dict[str, torch.Tensor]:
    """The ``policy.*`` weights (prefix removed) of a training checkpoint (:data:`TRAINING_KINDS`), on the CPU.

    * ``fsdp_sharded``: read with torch distributed checkpoint (no process group needed: one process reads every
      rank's shards) into tensors shaped like ``policy``'s own state dict;
    * ``deepspeed``: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO-1/2/3: the fp32 master weights,
      reassembled from every rank's partition);
    * ``lightning`` / ``lightning_lora``: the file's ``state_dict``.

    Raises:
        ConfigError: (``key``) not a training checkpoint, weights that do not fit ``policy`` (sharded), or no
            policy weights at all.
    """
    path = Path(path)
    kind = detect_checkpoint_kind(path, key)
    if kind == "fsdp_sharded":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        own = policy.state_dict()
        state = {"model": {f"policy.{k}": torch.empty_like(v, device="cpu") for k, v in own.items()}}
        try:
            dcp.load(state, checkpoint_id=path)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(key, f"the weights in {path} do not fit the architecture of `policy`: "
                                   f"{str(err).strip().splitlines()[-1]}") from None
        weights = _strip_prefixes(state["model"])
    elif kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = _strip_prefixes(get_fp32_state_dict_from_zero_checkpoint(str(path)))
    elif kind in ("lightning", "lightning_lora"):
        weights = _strip_prefixes(torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {}))
    else:
        raise ConfigError(key, f"{path} is {KINDS[kind]}, not a checkpoint written by htgrpo.fit (one of "
                               f"{list(TRAINING_KINDS)})")
    if not weights:
        raise ConfigError(key, f"{path} ({kind}) holds no 'policy.*' weights: not a checkpoint written by htgrpo.fit")
    return weights


def load_policy_weights(policy: torch.nn.Module, weights: Mapping[str, torch.Tensor], key: str = "ckpt_path") -> None:
    """Load ``policy.*`` weights from a fit checkpoint into a built policy; adapter-only (LoRA) checkpoints keep the
    policy's own frozen base weights. Every trainable/adapter weight must be present; unknown names and shapes that
    differ are errors naming ``key``."""
    from htgrpo.policies.lora import frozen_parameter_names, is_lora

    frozen = frozen_parameter_names(policy) if is_lora(policy) else set()
    try:
        result = policy.load_state_dict(dict(weights), strict=False)
    except RuntimeError as err:  # a shape that differs (raised whatever `strict` says)
        raise ConfigError(key, f"the weights do not fit the architecture of `policy`: {err}") from None
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        hint = ""
        if any(".lora_" in k for k in list(weights)) and not is_lora(policy):
            hint = " (the checkpoint has LoRA adapters: set policy.lora.r and the rest of policy.lora as in training)"
        more = "..." if len(missing) > 5 else ""
        raise ConfigError(key, f"weights do not fit the policy: missing {missing[:5]}{more}, unexpected "
                               f"{result.unexpected_keys[:5]}{hint}")


def load_adapter(policy: torch.nn.Module, directory: str | os.PathLike, trainable: bool = False) -> torch.nn.Module:
    """Put the adapter folder ``directory`` (written by ``policies.lora.save_adapter``) on a policy built without
    LoRA."""
    from peft import PeftModel

    from htgrpo.policies.lora import is_lora

    if is_lora(policy):
        raise ConfigError("policy.lora.r", "load an adapter folder into a policy built with lora.r=0")
    policy.backbone = PeftModel.from_pretrained(policy.backbone, str(directory), is_trainable=trainable)
    return policy


def _deepspeed_client_state_file(path: Path) -> Path | None:
    tag_file = path / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else None
    candidates = sorted((path / tag).glob("mp_rank_*_model_states.pt")) if tag else []
    return (candidates or sorted(path.glob("*/mp_rank_*_model_states.pt")) or [None])[0]


def read_training_state(path: str | Path, kind: str | None = None, key: str = "ckpt_path") -> TrainingState:
    """The :class:`TrainingState` of a training checkpoint: Lightning's ``global_step`` and ``epoch``, from the
    ``.ckpt`` file, FSDP's ``meta.pt`` or DeepSpeed's ``mp_rank_00_model_states.pt`` (memory-mapped)."""
    path = Path(str(path)).expanduser()
    kind = kind or detect_checkpoint_kind(path, key)
    if kind not in TRAINING_KINDS:
        raise ConfigError(key, f"{path} is {KINDS[kind]}: training resumes only from a checkpoint htgrpo.fit wrote "
                               f"({', '.join(TRAINING_KINDS)}). To start training from a policy, set the policy's "
                               "own path instead (e.g. policy=shapes_llada_warm policy.pretrained_path=DIR)")
    source = {"fsdp_sharded": path / FSDP_METADATA_FILE,
              "deepspeed": _deepspeed_client_state_file(path)}.get(kind, path)
    top = _peek(source, weights_only=False) if source is not None else None
    top = top if isinstance(top, Mapping) else {}
    step, epoch = top.get("global_step"), top.get("epoch")
    return TrainingState(ckpt_path=str(path), kind=kind, global_step=None if step is None else int(step),
                         epoch=None if epoch is None else int(epoch))


def resume_from(ckpt_path: str | os.PathLike | None, key: str = "ckpt_path") -> TrainingState | None:
    """``fit``'s ``ckpt_path``, checked at start-up: None (no resume); Lightning's own names (``last``, ...) as they
    are; otherwise a training checkpoint (:data:`TRAINING_KINDS`) whose state Lightning restores.

    Raises:
        ConfigError: (``key``) a path that does not exist, is no known kind, or is a kind that holds no training state
            (a policy, adapter or released folder).
    """
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) in LIGHTNING_SPECIAL_PATHS:
        return TrainingState(ckpt_path=str(ckpt_path), kind="lightning")
    return read_training_state(ckpt_path, key=key)


# ======================================================================================================================
# Loading
# ======================================================================================================================


def find_run_config(ckpt: Path, levels: int = 3) -> Path | None:
    """``.hydra/config.yaml`` in the checkpoint's folder or one of its ``levels`` parents (fit writes checkpoints to
    ``RUN/checkpoints/``)."""
    for folder in list(ckpt.resolve().parents)[:levels]:
        candidate = folder / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _run_policy(path: Path, run_config: str | Path | None) -> torch.nn.Module:
    """The policy rebuilt as the fit run that wrote ``path`` built it, from the run's composed config."""
    config_path = Path(str(run_config)).expanduser() if run_config else find_run_config(path)
    if config_path is None or not config_path.is_file():
        raise ConfigError("run_config", f"no fit run config found for {path} (looked for .hydra/config.yaml in its"
                                        " parent folders); pass run_config=RUN/.hydra/config.yaml")
    policy = instantiate_node(OmegaConf.load(config_path), "policy")
    if not isinstance(policy, torch.nn.Module):
        raise ConfigError("ckpt_path", f"the run's policy ({type(policy).__name__}) has no trainable weights to load")
    return policy


def _config_policy(cfg: DictConfig) -> torch.nn.Module:
    policy = instantiate_node(cfg, "policy")
    if not isinstance(policy, torch.nn.Module):
        raise ConfigError("policy", "a training checkpoint needs a trainable policy config (e.g. policy=shapes_llada)")
    return policy


def _released_policy(kind: str, path: Path, cfg: DictConfig | None, key: str) -> Any:
    """A released folder given as ``ckpt_path``: the config's ``policy`` (which must build that kind) with its
    ``pretrained`` set to the folder; without a config, the builder's defaults."""
    target = RELEASED_BUILDERS[kind]
    node = OmegaConf.select(cfg, "policy") if cfg is not None else None
    if node is None:
        return instantiate_node(OmegaConf.create({"policy": {"_target_": target, "pretrained": str(path)}}), "policy")
    if node.get("_target_") != target:
        raise ConfigError(key, f"{path} is {KINDS[kind]}, but `policy` builds {node.get('_target_')}: set "
                               f"policy={kind} (and policy.pretrained={path} without ckpt_path)")
    merged = OmegaConf.merge(cfg, {"policy": {"pretrained": str(path)}})
    return instantiate_node(merged, "policy")


def load_checkpoint(path: str | os.PathLike, cfg: DictConfig | None = None, run_config: str | Path | None = None,
                    key: str = "ckpt_path") -> LoadedCheckpoint:
    """Recognise the checkpoint at ``path`` (:func:`detect_checkpoint_kind`) and load its policy.

    Args:
        path: a checkpoint file or folder of any kind in :data:`KINDS`.
        cfg: a composed config whose ``policy`` node builds the architecture that weight-only kinds are loaded into
            (``lightning``, ``fsdp_sharded``, ``deepspeed``; ``adapter``: the base, ``policy.lora.r=0``; released
            folders: the matching ``policy``). None: the fit run's own config is used (what ``export`` does).
        run_config: the fit run's composed config for ``lightning_lora`` (and ``cfg=None``); None looks for
            ``.hydra/config.yaml`` in the checkpoint's parent folders.
        key: the config key errors name.

    Returns:
        :class:`LoadedCheckpoint` (with the :class:`TrainingState` for the training kinds).
    """
    path = Path(str(path)).expanduser()
    kind = detect_checkpoint_kind(path, key)
    state = read_training_state(path, kind, key) if kind in TRAINING_KINDS else None
    if kind in TRAINING_KINDS:
        # A LoRA .ckpt holds only the adapters: the frozen base comes from the run's own config.
        use_run = kind == "lightning_lora" or cfg is None
        policy = _run_policy(path, run_config) if use_run else _config_policy(cfg)
        load_policy_weights(policy, read_policy_weights(path, policy, key), key=key)
    elif kind == "adapter":
        if cfg is None:
            raise ConfigError(key, f"{path} is {KINDS[kind]}: give the config whose `policy` builds its base "
                                   "(policy.lora.r=0)")
        policy = load_adapter(instantiate_node(cfg, "policy"), path)
    elif kind == "policy_folder":
        from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy

        policy = MaskedDiffusionPolicy.from_pretrained(path)
    elif kind == "mar_policy_folder":
        from htgrpo.policies.mar.shapes import ShapesMARPolicy

        policy = ShapesMARPolicy.from_pretrained(path, config_key=key)
    elif kind in RELEASED_BUILDERS:
        policy = _released_policy(kind, path, cfg, key)
    else:  # mar_lth14
        from htgrpo.policies.mar.checkpoints import load_lth14_checkpoint

        policy = load_lth14_checkpoint(path)
    return LoadedCheckpoint(kind=kind, path=path, policy=policy, training_state=state)


def load_fit_checkpoint(ckpt_path: str | Path, run_config: str | Path | None = None, key: str = "ckpt_path"
                        ) -> torch.nn.Module:
    """The trained policy of a fit checkpoint (:data:`TRAINING_KINDS`), rebuilt from the run's own config
    (``run_config``, or ``.hydra/config.yaml`` next to the checkpoint): what ``htgrpo.export`` writes out."""
    path = Path(str(ckpt_path)).expanduser()
    kind = detect_checkpoint_kind(path, key)
    if kind not in TRAINING_KINDS:
        raise ConfigError(key, f"{path} is {KINDS[kind]}; expected a checkpoint written by htgrpo.fit "
                               f"({', '.join(TRAINING_KINDS)})")
    return load_checkpoint(path, None, run_config=run_config, key=key).policy


def load_policy(cfg: DictConfig) -> Any:
    """The policy ``evaluate`` / ``generate`` run: ``cfg.ckpt_path`` (any kind in :data:`KINDS` that is a
    text-to-image policy, loaded by :func:`load_checkpoint` with ``cfg``'s ``policy`` and ``run_config``), or, when
    it is unset, the ``policy`` node built as it is (released checkpoints through ``policy.pretrained``)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return instantiate_node(cfg, "policy")
    path = Path(str(ckpt)).expanduser()
    if detect_checkpoint_kind(path) == "mar_lth14":
        raise ConfigError("ckpt_path", f"{path} is {KINDS['mar_lth14']}: a class-conditional MAR, not a text-to-image"
                                       " policy that evaluate / generate can prompt")
    return load_checkpoint(path, cfg, run_config=cfg.get("run_config")).policy


__all__ = [
    "KINDS",
    "LoadedCheckpoint",
    "TRAINING_KINDS",
    "TrainingState",
    "detect_checkpoint_kind",
    "find_run_config",
    "is_adapter_folder",
    "load_adapter",
    "load_checkpoint",
    "load_fit_checkpoint",
    "load_policy",
    "load_policy_weights",
    "read_policy_weights",
    "read_training_state",
    "resume_from",
]
