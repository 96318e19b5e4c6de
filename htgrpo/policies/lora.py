"""LoRA on the LLaDA backbone through peft, the adapter-disabled reference, adapter-only checkpoints, bf16 adapters.

Config (``policy.lora`` in ``conf/policy/*.yaml``)::

    lora: {r: 0, alpha: 16, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out]}
    gradient_checkpointing: false

**Target names -> module paths.** A target name is the leaf name of a ``Linear`` inside a transformer block,
``model.transformer.blocks.{i}.<name>`` (LLaDA's checkpoint names). peft matches a plain name list by suffix, so
``ff_out`` would also hit the untied LM head ``model.transformer.ff_out``; we therefore hand peft a regular expression
anchored on the blocks, ``model\\.transformer\\.blocks\\.\\d+\\.(q_proj|...|ff_out)``, which peft full-matches
against each module path. The LM head, embeddings, norms and the toy grid embeddings are never adapted.

With LoRA on, ``policy.backbone`` is a ``peft.PeftModel`` around the ``LLaDAModelLM``: attribute access
(``final_hidden``, ``project``, ``lm_head_weight``) falls through to the backbone, only the ``lora_A``/``lora_B``
weights require grad, ``backbone.save_pretrained`` writes the adapter folder, ``merge_and_unload`` the merged model.

The GRPO modules use four helpers from here:

- :func:`make_reference`: the frozen reference policy. With LoRA it is the *same* model seen with adapters disabled
  (:class:`AdapterDisabledView`, no second copy of the weights); without LoRA a frozen deep copy; ``beta = 0`` none.
- :func:`strip_frozen_weights` / :func:`restore_frozen_weights`: a LoRA checkpoint holds only the trainable (adapter)
  weights, buffers and the optimiser state; on load the frozen base weights are taken from the freshly built module,
  so Lightning's strict loading still catches any real mismatch.
- :func:`keep_trainable_fp32`: under ``trainer.precision=bf16-true`` Lightning casts the whole module to bf16 before
  the optimiser is built; this puts the trainable (adapter) weights back in fp32, with the values they had before the
  cast, so AdamW updates fp32 adapters while the frozen 8B weights stay bf16.
"""

from __future__ import annotations

import os
import copy
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from htgrpo.config import ConfigError, require

LLADA_BLOCK_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
"""Every ``Linear`` of a LLaDA block (attention q/k/v/out, SwiGLU gate/up/down): the default LoRA targets."""

BLOCK_PREFIX = r"model\.transformer\.blocks\.\d+\."
"""Module-path prefix of the LLaDA blocks inside ``LLaDAModelLM`` (target names are leaf names under it)."""


@dataclass(frozen=True)
class LoRASettings:
    """LoRA adapters on the LLaDA blocks (peft ``LoraConfig``); ``r = 0`` turns LoRA off.

    Attributes:
        r: adapter rank (0 = full fine-tuning, no adapters). MaskGRPO trains MMaDA-8B with r = 128.
        alpha: peft ``lora_alpha``; the adapter output is scaled by alpha / r.
        dropout: dropout on the adapter input (peft ``lora_dropout``).
        target_modules: leaf names of block ``Linear`` layers (see the module docstring for the path mapping).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=LLADA_BLOCK_TARGETS)

    def __post_init__(self) -> None:
        require(int(self.r) >= 0, "lora.r", f"must be >= 0 (0 = off), got {self.r}")
        require(float(self.alpha) > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= float(self.dropout) < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        require(len(tuple(targets)) > 0, "lora.target_modules", "must list at least one module name")
        object.__setattr__(self, "target_modules", tuple(str(t) for t in targets))

    @property
    def enabled(self) -> bool:
        return int(self.r) > 0

    @classmethod
    def from_config(cls, value: LoRASettings | Mapping[str, Any] | None) -> LoRASettings:
        """From the ``policy.lora`` YAML node (a dict), a settings object, or None (off). Unknown keys are errors."""
        if value is None:
            return cls()
        if isinstance(value, LoRASettings):
            return value
        known = {"r", "alpha", "dropout", "target_modules"}
        unknown = sorted(set(value) - known)
        require(not unknown, "lora", f"unknown keys {unknown} (known: {sorted(known)})")
        return cls(**dict(value))

    def target_regex(self) -> str:
        """peft ``target_modules`` as a regex full-matched against module paths: only Linear layers in blocks."""
        return BLOCK_PREFIX + "(" + "|".join(re.escape(t) for t in self.target_modules) + ")"


def block_linear_names(backbone: nn.Module) -> list[str]:
    """Leaf names of the ``Linear`` layers inside the blocks of ``backbone`` (what ``target_modules`` may name)."""
    pattern = re.compile(BLOCK_PREFIX + r"([^.]+)")
    names = {m.group(1) for path, module in backbone.named_modules()
             if isinstance(module, nn.Linear) and (m := pattern.fullmatch(path))}
    return sorted(names)


def apply_lora(policy: nn.Module, lora: LoRASettings | Mapping[str, Any] | None = None,
               gradient_checkpointing: bool = False) -> nn.Module:
    """Set up a masked-diffusion policy (``policy.backbone`` an ``LLaDAModelLM``) for training at scale.

    - ``gradient_checkpointing``: each LLaDA block's activations are recomputed in the backward pass instead of
      stored (transformers' ``GradientCheckpointingLayer``, non-reentrant so it works when the block inputs do not
      require grad, as with frozen embeddings under LoRA). Only active in train mode with grad enabled.
    - ``lora`` with ``r > 0``: wraps the backbone in a peft ``PeftModel`` with LoRA on the named block layers; all
      other weights are frozen. A name that is not a block ``Linear`` fails with ``ConfigError`` listing the names
      that exist.

    Returns the same policy object (modified in place). Policy builders call this last:
    ``return apply_lora(policy, lora, gradient_checkpointing)``.
    """
    settings = LoRASettings.from_config(lora)
    backbone = policy.backbone
    if gradient_checkpointing:
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise ConfigError("gradient_checkpointing", f"{type(backbone).__name__} does not support it")
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not settings.enabled:
        return policy
    if is_lora(policy):
        raise ConfigError("lora", "the policy already has LoRA adapters")
    available = block_linear_names(backbone)
    missing = [t for t in settings.target_modules if t not in available]
    require(not missing, "lora.target_modules",
            f"{missing} not found in the model's blocks; the block Linear layers are {available}"
            " (the LM head model.transformer.ff_out is never a target)")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                        target_modules=settings.target_regex(), bias="none")
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        policy.backbone = get_peft_model(backbone, config)
    return policy


def is_lora(policy: Any) -> bool:
    """Whether ``policy.backbone`` is a peft model (LoRA adapters on)."""
    from peft import PeftModel

    return isinstance(getattr(policy, "backbone", None), PeftModel)


# ----------------------------------------------------------------------------------------------------------------
# The reference policy
# ----------------------------------------------------------------------------------------------------------------


class AdapterDisabledView:
    """The policy as it was before RL: every method call runs under peft's ``disable_adapter()``.

    Not an ``nn.Module``, so it adds no parameters to the LightningModule (nothing to checkpoint, shard or wrap);
    attributes (``device``, ``layout``, ``training``) read through to the policy.
    """

    def __init__(self, policy: nn.Module) -> None:
        if not is_lora(policy):
            raise ValueError("AdapterDisabledView needs a policy with LoRA adapters (policy.lora.r > 0)")
        object.__setattr__(self, "_policy", policy)

    def __getattr__(self, name: str) -> Any:
        policy = self.__dict__.get("_policy")
        if policy is None:  # while unpickling (ddp_spawn), before __dict__ is restored
            raise AttributeError(name)
        value = getattr(policy, name)
        if not callable(value) or isinstance(value, nn.Module):
            return value

        def without_adapters(*args: Any, **kwargs: Any) -> Any:
            with self._policy.backbone.disable_adapter():
                return value(*args, **kwargs)

        return without_adapters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._policy.backbone.disable_adapter():
            return self._policy(*args, **kwargs)

    def __repr__(self) -> str:
        return f"AdapterDisabledView({type(self._policy).__name__})"


def make_reference(policy: nn.Module, beta: float) -> Any:
    """The frozen reference for the KL term: None when ``beta == 0`` (never computed); the adapter-disabled view of
    the policy itself under LoRA (no copy); otherwise a frozen deep copy of the starting policy."""
    if float(beta) == 0:
        return None
    if is_lora(policy):
        return AdapterDisabledView(policy)
    return copy.deepcopy(policy).requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Adapter-only checkpoints
# ----------------------------------------------------------------------------------------------------------------


def frozen_parameter_names(module: nn.Module) -> set[str]:
    """State-dict names of the parameters that do not require grad (the frozen base weights under LoRA)."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _has_lora(module: nn.Module) -> bool:
    policy = getattr(module, "policy", None)
    return policy is not None and is_lora(policy)


def strip_frozen_weights(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: with LoRA, drop the frozen parameters from ``checkpoint["state_dict"]``, leaving the
    adapter weights and buffers (the optimiser state already covers only trainable parameters)."""
    if not _has_lora(module) or "state_dict" not in checkpoint:
        return
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        # Sharded strategies write and read the model state themselves (torch.distributed.checkpoint / DeepSpeed's
        # engine) and need every key back; each rank stores only its 1/N shard of the frozen weights there.
        return
    state = checkpoint["state_dict"]
    frozen = frozen_parameter_names(module)
    for name in [k for k in state if k in frozen]:
        del state[name]
    checkpoint["htgrpo_frozen_weights_stripped"] = True


def restore_frozen_weights(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint`` (runs before Lightning loads the state dict): put the frozen base weights of the freshly
    built module back into an adapter-only checkpoint, so strict loading still checks every other key.
    Also remembers the checkpoint's fp32 trainable weights for :func:`keep_trainable_fp32`."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    if checkpoint.get("htgrpo_frozen_weights_stripped"):
        if not _has_lora(module):
            raise ConfigError("policy.lora.r", "this checkpoint holds only LoRA adapter weights; build the policy with"
                                               " the same policy.lora settings as the run that wrote it")
        own = module.state_dict()
        for name in frozen_parameter_names(module):
            if name not in state and name in own:
                state[name] = own[name]
    if _has_lora(module):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        module._htgrpo_trainable_snapshot = {n: state[n].detach().clone() for n in trainable if n in state}


# ----------------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------------


HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")
"""Lightning precisions that cast the weights themselves to a half dtype."""


def snapshot_trainable(module: nn.Module) -> None:
    """Remember the (adapter) weights before Lightning's precision plugin casts the module (``setup`` hook, LoRA
    only: the snapshot is the size of the adapters)."""
    if _has_lora(module) and not getattr(module, "_htgrpo_trainable_snapshot", None):
        module._htgrpo_trainable_snapshot = {
            n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def keep_trainable_fp32(module: nn.Module, precision: str | None) -> None:
    """Under ``bf16-true``/``16-true``: trainable (adapter) parameters back to fp32 with their pre-cast values.

    Lightning casts the whole module to the half dtype before ``configure_optimizers``; the optimiser must see fp32
    adapters (AdamW's update of a bf16 weight loses most of its mantissa). Full fine-tuning keeps fp32 master weights
    with ``bf16-mixed`` instead; ``bf16-true`` without LoRA is refused here. Call at the top of
    ``configure_optimizers``.
    """
    snapshot = getattr(module, "_htgrpo_trainable_snapshot", None) or {}
    if str(precision) not in HALF_TRUE_PRECISIONS:
        module._htgrpo_trainable_snapshot = {}
        return
    _require_lora_for_half_true(module, precision)
    for name, p in module.named_parameters():
        if p.requires_grad:
            source = snapshot.get(name)
            p.data = (source if source is not None else p.data).to(device=p.device, dtype=torch.float32)
    module._htgrpo_trainable_snapshot = {}


def check_precision(module: nn.Module, precision: str | None, strategy: Any = None) -> None:
    """Start-up check (``htgrpo.fit``) that AdamW updates fp32 weights: trainable parameters loaded in a half dtype
    (e.g. ``policy.dtype=bfloat16`` with ``lora.r=0``) are refused, and so is a ``*-true`` half precision, which casts
    every weight, unless the module trains LoRA adapters only (they go back to fp32). Full fine-tuning uses
    ``bf16-mixed`` (fp32 master weights). DeepSpeed keeps its own fp32 master copy, so it is exempt."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return
    half = sorted({str(p.dtype) for p in module.parameters()
                   if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
    if half:
        raise ConfigError("policy.dtype", f"trainable weights are {half}; AdamW needs fp32 master weights: load the"
                                          " policy in float32 (policy.dtype=float32) and train with"
                                          " trainer.precision=bf16-mixed, or train LoRA adapters (policy.lora.r > 0)")
    _require_lora_for_half_true(module, precision)


def _require_lora_for_half_true(module: nn.Module, precision: str | None) -> None:
    if str(precision) not in HALF_TRUE_PRECISIONS:
        return
    trainable = any(p.requires_grad for p in module.parameters())
    if trainable and not _has_lora(module):
        raise ConfigError("trainer.precision", f"{precision} trains every weight in half precision; full fine-tuning"
                                               " needs fp32 master weights: use trainer.precision=bf16-mixed, or LoRA"
                                               " (policy.lora.r > 0) whose adapters stay fp32 under bf16-true")


def parameter_counts(policy: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (for logs and the memory model's self-check)."""
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# ----------------------------------------------------------------------------------------------------------------
# Export of adapter folders (loading them, and every other checkpoint kind: htgrpo.checkpoints)
# ----------------------------------------------------------------------------------------------------------------

def save_adapter(policy: nn.Module, directory: str | os.PathLike) -> None:
    """peft's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter weights only).

    ``base_model_name_or_path`` in the config is the folder/hub id the backbone was loaded from (empty for a policy
    initialised from scratch), so ``PeftModel.from_pretrained(LLaDAModelLM.from_pretrained(base), directory)`` loads it.
    """
    if not is_lora(policy):
        raise ConfigError("policy.lora.r", "the policy has no LoRA adapters to save (r = 0)")
    os.makedirs(directory, exist_ok=True)
    policy.backbone.save_pretrained(str(directory))


def merge_lora(policy: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W + B·A·alpha/r) in place; ``policy.backbone`` becomes a plain
    ``LLaDAModelLM`` again, so ``policy.save_pretrained`` writes a full model folder (config.json + safetensors)."""
    if is_lora(policy):
        policy.backbone = policy.backbone.merge_and_unload()
    return policy
