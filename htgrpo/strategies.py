"""Distributed strategies for the GRPO modules: DDP, FSDP and DeepSpeed ZeRO-2/3 under manual optimisation.

The GRPO modules (:class:`~htgrpo.algorithms.grpo_base.GRPOModule`) optimise manually: several backward passes,
then one clipped optimiser step, per update. Lightning's automatic clipping does not apply there, and each strategy
clips differently, so :func:`clip_and_step` uses the strategy's own mechanism and returns the true global norm:

==============  ===========================================================================================
strategy        clip-and-step
==============  ===========================================================================================
single / DDP    ‖g‖ over the local gradients (DDP has all-reduced them: every rank holds the global mean
                gradient), then ``clip_gradients`` through the precision plugin, then ``optimizer.step()``.
FSDP            (:class:`GRPOFSDPStrategy`: the policy's blocks are FSDP units, the rest replicated) the replicated
                gradients are averaged over the ranks, then ‖g‖² = Σ_ranks ‖local shards‖² + ‖whole‖², where
                the shards are those of ``FULL_SHARD`` / ``SHARD_GRAD_OP`` units and "whole" are the ``NO_SHARD``
                units and the replicated rest (every rank holds the same averaged gradient; what
                ``FullyShardedDataParallel.clip_grad_norm_`` computes; a plain ``clip_grad_norm_`` would see
                only the local shard), the same clip rule, then ``optimizer.step()``.
DeepSpeed       the engine clips inside ``engine.step()`` with its config's ``gradient_clipping`` (which
                :class:`GRPODeepSpeedStrategy` sets to ``algorithm.max_grad_norm``); the norm is the engine's
                ``get_global_grad_norm()`` (ZeRO frees ``p.grad``, so reading it would give 0).
==============  ===========================================================================================

Frozen modules stay out of sharding: the modules a LightningModule names in ``unsharded_modules`` (the GRPO
modules: the frozen ``reference``) are taken out of the module tree before FSDP wraps it or DeepSpeed builds its
engine (:func:`keep_out_of_strategy`), so each rank holds a plain frozen replica that is neither sharded nor given
to the optimiser nor checkpointed (on resume it is rebuilt from the starting policy, which is what it is). Reward
models are plain Python objects (:class:`~htgrpo.rewards.base.Reward`), never part of the module tree.

:func:`check_trainer_hardware` makes a strategy that needs CUDA, asked for on a machine without it, fail at
start-up naming the ``trainer`` key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from htgrpo.config import ConfigError

log = logging.getLogger("htgrpo.strategies")

#: ``trainer.strategy.wrap_modules`` value that wraps the classes the policy lists in ``_no_split_modules``.
AUTO_WRAP = "auto"
#: ``trainer.strategy.sharding_strategy`` values of :class:`GRPOFSDPStrategy`.
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


# ======================================================================================================================
# Frozen modules out of the sharded tree
# ======================================================================================================================


def keep_out_of_strategy(module: torch.nn.Module, device: torch.device | None = None,
                         dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """Unregister the submodules ``module.unsharded_modules`` names, keeping each as a plain attribute.

    A sharding strategy wraps / partitions every registered submodule; an unregistered one stays a full frozen
    replica on each rank (moved to ``device``; floating tensors cast to ``dtype`` if given). Returns what was moved.
    """
    moved = {}
    for name in getattr(module, "unsharded_modules", ()):
        child = module._modules.get(name)
        if child is None:
            continue
        del module._modules[name]
        if device is not None or dtype is not None:
            child = child.to(device=device, dtype=dtype) if dtype is not None else child.to(device)
        object.__setattr__(module, name, child)  # a plain attribute: not a parameter owner of ``module`` any more
        moved[name] = child
    if moved:
        log.info("kept out of the sharded model (frozen, replicated per rank): %s", ", ".join(moved))
    return moved


# ======================================================================================================================
# Precision plugins that pass prompt batches through
# ======================================================================================================================


def _is_prompt_batch(data: Any) -> bool:
    from htgrpo.data.datamodules import PromptBatch

    return isinstance(data, PromptBatch)


class _PromptBatchFSDPPrecision(FSDPPrecision):
    """FSDP precision that leaves a :class:`~htgrpo.data.datamodules.PromptBatch` as it is: it holds text and
    integer images, nothing to cast (Lightning's cast walks it and refuses its frozen dataclasses)."""

    def convert_input(self, data: Any) -> Any:
        return data if _is_prompt_batch(data) else super().convert_input(data)


class _PromptBatchDeepSpeedPrecision(DeepSpeedPrecision):
    """DeepSpeed precision that leaves a prompt batch as it is (see :class:`_PromptBatchFSDPPrecision`)."""

    def convert_input(self, data: Any) -> Any:
        return data if _is_prompt_batch(data) else super().convert_input(data)


def _prompt_batch_precision_property(strategy_cls: type, plugin_cls: type, convert: Any) -> property:
    """A ``precision_plugin`` property for a subclass of ``strategy_cls`` that swaps the plain ``plugin_cls`` that
    Lightning's connector makes for ``convert(plugin)`` (one that passes prompt batches through); any other plugin
    (a user's own) is kept as given."""

    def fget(self: Any) -> Any:
        return strategy_cls.precision_plugin.fget(self)

    def fset(self: Any, plugin: Any) -> None:
        if plugin is not None and type(plugin) is plugin_cls:  # the one Lightning's connector makes
            plugin = convert(plugin)
        strategy_cls.precision_plugin.fset(self, plugin)

    return property(fget, fset)


# ======================================================================================================================
# FSDP
# ======================================================================================================================


def resolve_wrap_classes(model: torch.nn.Module, wrap_modules: str | Sequence[str]) -> set[type[torch.nn.Module]]:
    """The module classes FSDP wraps as units, found among ``model``'s submodules.

    ``"auto"``: the classes named in any submodule's ``_no_split_modules`` (Hugging Face's list of blocks that must
    stay whole: ``LLaDABlock`` for LLaDA); none found means only the root is wrapped. A list: those class names.

    Raises:
        ConfigError: (``trainer.strategy.wrap_modules``) a listed class name that no submodule has.
    """
    present: dict[str, type[torch.nn.Module]] = {type(m).__name__: type(m) for m in model.modules()}
    if isinstance(wrap_modules, str):
        if wrap_modules != AUTO_WRAP:
            raise ConfigError("trainer.strategy.wrap_modules",
                              f"must be {AUTO_WRAP!r} or a list of module class names, got {wrap_modules!r}")
        names = sorted({n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])})
        return {present[n] for n in names if n in present}
    names = [str(n) for n in wrap_modules]
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError("trainer.strategy.wrap_modules",
                          f"no module of class {missing} in the model; classes present: {sorted(present)}")
    return {present[n] for n in names}


def outermost_units(model: torch.nn.Module, classes: set[type[torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the submodules of a class in ``classes`` that are not inside another such one."""
    units: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) in classes and not any(name.startswith(prefix + ".") for prefix, _ in units):
            units.append((name, module))
    return units


def global_grad_norm(sharded: Sequence[torch.nn.Parameter], replicated: Sequence[torch.nn.Parameter],
                     group: Any = None) -> torch.Tensor:
    """‖g‖₂ of a model whose ``sharded`` parameters each hold one rank's shard and whose ``replicated`` ones hold
    the same (already averaged) gradient on every rank:

        ‖g‖² = Σ_ranks Σ_{p ∈ sharded} ‖g_p^rank‖²  +  Σ_{p ∈ replicated} ‖g_p‖²

    (the first sum all-reduced over ``group`` when torch.distributed is initialised).
    """
    sq_sharded = local_grad_norm(list(sharded)).double() ** 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq_sharded, group=group)
    sq_replicated = local_grad_norm(list(replicated)).double().to(sq_sharded.device) ** 2
    return torch.sqrt(sq_sharded + sq_replicated).float()


def shards_gradients(unit: Any) -> bool:
    """Whether each rank of an FSDP unit holds only its own shard of the unit's gradient after backward.

    ``FULL_SHARD`` and ``SHARD_GRAD_OP`` reduce-scatter the gradient: yes (the hybrid strategies too, within their
    shard group). ``NO_SHARD`` all-reduces it: every rank holds the whole averaged gradient, which must count once in
    the norm, not once per rank. FSDP also falls back to ``NO_SHARD`` on a single rank; ``unit.sharding_strategy`` is
    the strategy in effect.
    """
    from torch.distributed.fsdp import ShardingStrategy

    return unit.sharding_strategy != ShardingStrategy.NO_SHARD


def clip_grads_(parameters: Sequence[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)) (``torch.nn.utils.clip_grad_norm_``'s rule)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))


class GRPOFSDPStrategy(FSDPStrategy):
    """FSDP for the GRPO modules: each policy block is its own FSDP unit; the small rest is replicated.

    A GRPO training step runs several forward and backward passes and optimiser steps inside one Lightning
    ``training_step``. FSDP (v1) cannot run that inside the forward of a root FSDP module (its root state stays
    "forward" during the backward passes), which is how Lightning's ``FSDPStrategy`` wraps the LightningModule. So
    here each block (``wrap_modules``: the LLaDA blocks, ~90 % of an 8B policy's weights) is wrapped as an FSDP
    module of its own, called through its ``forward`` like any layer; the rest (embeddings, head, norms: parameters
    the policy also reads outside a ``forward``) stays a plain replica on every rank whose gradients are averaged
    over the ranks before the clip, like DDP's. The LightningModule itself is not wrapped, so ``training_step`` runs
    as written. Lightning's FSDP checkpointing (``state_dict_type``), precision plugin and launch are used as they
    are. The frozen reference is kept out of the sharded tree (a replica per rank).

    Args:
        wrap_modules: ``auto`` (the policy's ``_no_split_modules``: ``LLaDABlock`` for LLaDA) or a list of class
            names; each such submodule is sharded as one FSDP unit.
        state_dict_type: ``sharded`` (a checkpoint folder, each rank writing its shards: torch distributed
            checkpoint) or ``full`` (rank 0 writes one ``.ckpt`` file).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3-like), ``SHARD_GRAD_OP`` (ZeRO-2-like), ``NO_SHARD`` (each unit is
            its own FSDP root, so a hybrid strategy would make process groups per unit: not offered).
        use_orig_params: keep the original parameters visible (the optimiser and the clip read them; needed when
            frozen and trainable parameters share a unit: LoRA).
        **kwargs: passed to Lightning's ``FSDPStrategy`` (``cpu_offload``, ``process_group_backend``, ...).
    """

    def __init__(self, wrap_modules: str | Sequence[str] = AUTO_WRAP, state_dict_type: str = "sharded",
                 sharding_strategy: str = "FULL_SHARD", use_orig_params: bool = True, **kwargs: Any):
        if state_dict_type not in ("sharded", "full"):
            raise ConfigError("state_dict_type", f"must be 'sharded' or 'full', got {state_dict_type!r}")
        if str(sharding_strategy) not in FSDP_SHARDING:
            raise ConfigError("sharding_strategy", f"must be one of {list(FSDP_SHARDING)}, got {sharding_strategy!r}")
        if not (wrap_modules == AUTO_WRAP or (isinstance(wrap_modules, Sequence) and not isinstance(wrap_modules, str))):
            raise ConfigError("wrap_modules", f"must be {AUTO_WRAP!r} or a list of module class names, got "
                                              f"{wrap_modules!r}")
        super().__init__(state_dict_type=state_dict_type, sharding_strategy=sharding_strategy,
                         use_orig_params=use_orig_params, **kwargs)
        self.wrap_modules = wrap_modules if isinstance(wrap_modules, str) else list(wrap_modules)
        self.sharded_units: list[torch.nn.Module] = []
        self.replicated_params: list[torch.nn.Parameter] = []

    precision_plugin = _prompt_batch_precision_property(
        FSDPStrategy, FSDPPrecision, lambda plugin: _PromptBatchFSDPPrecision(plugin.precision, plugin.scaler))

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device
        from torch.distributed.fsdp import FullyShardedDataParallel

        # The frozen reference runs under the precision plugin's autocast: with mixed precision its copy is kept in the
        # half dtype (half the memory of an fp32 replica).
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(self.precision_plugin.precision))
        if getattr(model, "automatic_optimization", False):
            raise ConfigError("trainer", "trainer=fsdp / fsdp_cpu trains the RL modules (manual optimisation: "
                                         "algorithm=ht_grpo / mar_grpo); train the warm start with trainer=ddp or "
                                         "trainer=deepspeed_zero2")
        keep_out_of_strategy(model, self.root_device, dtype=half)
        already = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
        if already:  # set up before (a validation before fit): the units are wrapped already
            self.sharded_units = already
            sharded = {id(p) for u in already for p in u.parameters()}
            self.replicated_params = [p for p in model.parameters() if id(p) not in sharded]
            return model
        classes = resolve_wrap_classes(model, self.wrap_modules)
        # Lightning passes device_id=root_device.index (None on CPU), which FSDP rejects without an accelerator;
        # an explicit CPU device makes FSDP run over gloo (tests, debugging).
        device_id = torch.device("cpu") if self.root_device.type == "cpu" else self.root_device.index
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("auto_wrap_policy", "device_mesh")}
        self.sharded_units = []
        for name, unit in outermost_units(model, classes):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = FullyShardedDataParallel(unit, cpu_offload=self.cpu_offload,
                                               mixed_precision=self.mixed_precision_config,
                                               sharding_strategy=self.sharding_strategy, device_id=device_id,
                                               **kwargs)
            parent.register_module(child, wrapped)
            self.sharded_units.append(wrapped)
        sharded = {id(p) for u in self.sharded_units for p in u.parameters()}
        model.to(self.root_device)
        self.replicated_params = [p for p in model.parameters() if id(p) not in sharded]
        if torch.distributed.is_initialized():  # the replicas start equal on every rank (as DDP makes them)
            for p in self.replicated_params:
                torch.distributed.broadcast(p.data, src=0)
        _move_torchmetrics_to_device(model, self.root_device)
        log.info("FSDP: %d units (%s), %d replicated parameter tensors", len(self.sharded_units),
                 sorted(c.__name__ for c in classes) or "none", len(self.replicated_params))
        return model

    # -- checkpoints: torch.distributed.checkpoint's state-dict API handles a module tree that mixes FSDP units and
    # plain (replicated) parameters, for the weights and for the optimiser state alike. ------------------------------
    def _state_dict_options(self, full: bool | None = None) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = self._state_dict_type == "full" if full is None else full
        return StateDictOptions(full_state_dict=full, cpu_offload=full)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._state_dict_options())

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=self._state_dict_options())

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load weights and optimiser state from a sharded checkpoint folder (any number of ranks wrote it) or a
        full ``.ckpt`` file into the live model; returns the rest (counters, loops, callbacks)."""
        import torch.distributed.checkpoint as dcp
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers] if fitting else []
        if path.is_dir():
            options = self._state_dict_options(full=False)
            state = {"model": get_model_state_dict(self.model, options=options)}
            for i, opt in enumerate(optimizers):
                state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, opt, options=options)
            dcp.load(state, checkpoint_id=path)
            metadata = torch.load(path / "meta.pt", weights_only=bool(weights_only))
        else:
            options = self._state_dict_options(full=True)
            metadata = torch.load(path, map_location="cpu", weights_only=bool(weights_only))
            state = {"model": metadata.pop("state_dict")}
            for i, opt_state in enumerate(metadata.pop("optimizer_states", [])[: len(optimizers)]):
                state[f"optimizer_{i}"] = opt_state
        set_model_state_dict(self.model, state["model"], options=options)
        for i, opt in enumerate(optimizers):
            if f"optimizer_{i}" in state:
                set_optimizer_state_dict(self.model, opt, state[f"optimizer_{i}"], options=options)
        return metadata

    def clip_and_step(self, optimizer: Any, max_grad_norm: float) -> float:
        """Average the replicated gradients over the ranks, measure the global norm, clip, step."""
        trainable = [p for p in self.replicated_params if p.requires_grad]
        if torch.distributed.is_initialized() and self.world_size > 1:
            for p in trainable:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        # FSDP has already averaged the units' gradients; a NO_SHARD unit's whole gradient is on every rank.
        sharded = [p for u in self.sharded_units if shards_gradients(u) for p in u.parameters()]
        whole = [p for u in self.sharded_units if not shards_gradients(u) for p in u.parameters()]
        norm = global_grad_norm(sharded, [*whole, *trainable])
        if max_grad_norm > 0:
            clip_grads_([*sharded, *whole, *trainable], max_grad_norm, norm)
        optimizer.step()
        return float(norm)


# ======================================================================================================================
# DeepSpeed
# ======================================================================================================================


class GRPODeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with clipping and gradient accumulation that work under manual optimisation.

    Lightning fills DeepSpeed's ``gradient_clipping`` from ``Trainer(gradient_clip_val)``, which manual optimisation
    must leave unset, so clipping was silently off. Here, for a module that clips itself (``max_grad_norm`` and
    manual optimisation), ``gradient_clipping`` is the module's ``max_grad_norm`` (0 = off) and the engine clips in
    ``step()``; ``managed_gradient_accumulation: false`` makes the gradients of all backward passes before a
    ``step()`` add up (DeepSpeed otherwise treats each backward as a complete micro-step). The frozen reference is kept out of the engine (ZeRO-3 would partition it), cast to the engine's
    compute dtype.

    Args:
        stage: ZeRO stage: 2 shards optimiser state and gradients, 3 also the parameters.
        allow_cpu: run on DeepSpeed's CPU accelerator (gloo). For tests only: DeepSpeed is meant for CUDA.
        **kwargs: passed to Lightning's ``DeepSpeedStrategy`` (``offload_optimizer``, ``offload_parameters``,
            ``config``, ...).
    """

    def __init__(self, stage: int = 2, allow_cpu: bool = False, **kwargs: Any):
        if int(stage) not in (1, 2, 3):
            raise ConfigError("stage", f"must be 1, 2 or 3, got {stage!r}")
        super().__init__(stage=int(stage), **kwargs)
        self.allow_cpu = bool(allow_cpu)

    precision_plugin = _prompt_batch_precision_property(
        DeepSpeedStrategy, DeepSpeedPrecision, lambda plugin: _PromptBatchDeepSpeedPrecision(plugin.precision))

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # ZeRO-3 here: the gradients of several backward passes before one step() did not add up (measured with
        # DeepSpeed 0.19 on its CPU accelerator: the first update's norm came out 5.7x too small), so a second backward
        # pass before a step is refused rather than trained on silently.
        self._backwards_since_step = getattr(self, "_backwards_since_step", 0) + 1
        if self.zero_stage_3 and self._backwards_since_step > 1:
            raise RuntimeError(
                "trainer=deepspeed_zero3 takes one backward pass per optimiser step: set algorithm.micro_batch_size=null"
                " (HT-GRPO), or use trainer=fsdp or trainer=deepspeed_zero2 (MAR-GRPO runs one backward per AR step)")
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def setup_environment(self) -> None:
        from lightning.pytorch.accelerators import CUDAAccelerator

        if self.allow_cpu and not isinstance(self.accelerator, CUDAAccelerator):
            DDPStrategy.setup_environment(self)  # skip Lightning's CUDA-only check; DeepSpeed picks its CPU backend
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self.allow_cpu and self.root_device.type == "cpu":  # CPU devices have no index to validate
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _format_batch_size_and_grad_accum_config(self) -> None:
        super()._format_batch_size_and_grad_accum_config()
        module = self.lightning_module
        if module is not None and not module.automatic_optimization and hasattr(module, "max_grad_norm"):
            self.config["gradient_clipping"] = float(module.max_grad_norm)
            # An update is several backward passes (micro-batches, MAR's AR steps) and then one step: with DeepSpeed's
            # own counting (gradient_accumulation_steps = 1) every backward would be a boundary and ZeRO would keep
            # only the last one's gradients. Unmanaged: backward() accumulates, step() is the boundary.
            self.config["managed_gradient_accumulation"] = False

    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        import argparse

        import deepspeed

        moved = keep_out_of_strategy(model, self.root_device)
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
        if dtype is not None:
            for name, child in moved.items():
                object.__setattr__(model, name, child.to(dtype))
        return engine, deepspeed_optimizer


    def _device_rank(self) -> int | None:
        # (Lightning passes device_rank=root_device.index, which is None on CPU; DeepSpeed needs the local rank.)
        return self.root_device.index if self.root_device.type != "cpu" else self.local_rank

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        """The engine of a validation run before fit (``validate_at_start``): Lightning's, with the reference kept
        out of it as in training, and the CPU device rank."""
        import argparse

        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        keep_out_of_strategy(model, self.root_device)
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        config.update({k: self.config[k] for k in ("fp16", "bf16") if k in self.config})
        if self.zero_stage_3:
            config.update({k: self.config[k] for k in ("zero_allow_untested_optimizer", "zero_optimization")})
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=self._device_rank()),
                                                   config=config, model=model, optimizer=None, lr_scheduler=None,
                                                   model_parameters=[], dist_init_required=False)


def deepspeed_config(strategy: DeepSpeedStrategy) -> dict[str, Any]:
    """The config dict the strategy will give ``deepspeed.initialize`` (formatted against its attached module)."""
    strategy._init_config_if_needed()
    return dict(strategy.config)


# ======================================================================================================================
# Clip and step
# ======================================================================================================================


def local_grad_norm(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """‖g‖₂ = sqrt(Σ_p ‖g_p‖₂²) over the parameters that have a gradient (0 when none has)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_and_step(module: Any, optimizer: Any, max_grad_norm: float) -> float:
    """Clip the accumulated gradients to ``max_grad_norm`` (0: no clipping) with the strategy's own mechanism, step
    ``optimizer`` (Lightning's wrapper), and return the global gradient norm before clipping (see module docstring).

    Raises:
        RuntimeError: under a DeepSpeed engine whose ``gradient_clipping`` differs from ``max_grad_norm`` (plain
            Lightning ``DeepSpeedStrategy``: clipping would be silently off).
    """
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if isinstance(strategy, DeepSpeedStrategy):
        engine = strategy.deepspeed_engine
        clipping = float(engine.gradient_clipping())
        if not math.isclose(clipping, float(max_grad_norm)):
            raise RuntimeError(
                f"DeepSpeed clips at gradient_clipping={clipping} but algorithm.max_grad_norm={max_grad_norm}: use "
                "trainer=deepspeed_zero2 / deepspeed_zero3 (htgrpo.strategies.GRPODeepSpeedStrategy), which sets it")
        optimizer.step()  # engine.step(): clip by gradient_clipping, optimiser step, zero grads
        strategy._backwards_since_step = 0
        norm = engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)
    if isinstance(strategy, GRPOFSDPStrategy):
        return strategy.clip_and_step(optimizer, max_grad_norm)
    if isinstance(strategy, FSDPStrategy):
        # Lightning's own FSDP: the root FSDP module reduces the shard norms over the ranks (an infinite limit
        # measures without clipping).
        norm = strategy.model.clip_grad_norm_(max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()
        return float(norm)
    # Single device / DDP (gradients already all-reduced): the local norm is the global one.
    norm = local_grad_norm(list(module.policy.parameters()))
    if max_grad_norm > 0:
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    return float(norm)


# ======================================================================================================================
# Start-up checks
# ======================================================================================================================


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, Mapping):
        return str(strategy.get("_target_", ""))
    return str(strategy or "")


def needs_cuda(trainer_cfg: Mapping[str, Any]) -> str | None:
    """Why this ``trainer`` config needs CUDA GPUs (None if it does not): a GPU accelerator, or DeepSpeed (CUDA
    only, unless its ``allow_cpu`` test switch is on)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    strategy = trainer_cfg.get("strategy")
    name = _strategy_name(strategy).lower()
    if "deepspeed" in name and not (isinstance(strategy, Mapping) and strategy.get("allow_cpu", False)):
        return "DeepSpeed runs only on CUDA GPUs"
    if accelerator in ("gpu", "cuda"):
        return f"accelerator={accelerator} asks for CUDA GPUs"
    return None


def check_trainer_hardware(trainer_cfg: Mapping[str, Any], cuda_available: bool | None = None) -> None:
    """Fail at start-up, naming ``trainer``, when the trainer config needs CUDA and this machine has none."""
    reason = needs_cuda(trainer_cfg)
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if reason and not available:
        raise ConfigError("trainer", f"{reason}, but torch.cuda.is_available() is False on this machine; on CPU "
                                     "use trainer=cpu, trainer=ddp_cpu or trainer=fsdp_cpu")


def check_strategy_supports(strategy: Any, module: Any) -> None:
    """Fail at start-up, naming the key to change, when the strategy cannot run the module's updates.

    DeepSpeed ZeRO-3 takes one backward pass per optimiser step (:meth:`GRPODeepSpeedStrategy.backward` refuses a
    second one, because the gradients of several did not add up); a module whose updates accumulate several
    (HT-GRPO with ``algorithm.micro_batch_size`` set, MAR-GRPO always) is refused here instead of at its first step.
    """
    if not (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
        return
    if getattr(module, "one_backward_per_update", True):
        return
    if getattr(module, "micro_batch_size", None) is not None:
        raise ConfigError("algorithm.micro_batch_size", "trainer=deepspeed_zero3 takes one backward pass per optimiser "
                          "step: set algorithm.micro_batch_size=null (with policy.gradient_checkpointing=true), or use "
                          "trainer=fsdp / trainer=deepspeed_zero2")
    raise ConfigError("trainer", f"trainer=deepspeed_zero3 takes one backward pass per optimiser step, and "
                                 f"{type(module).__name__} accumulates several per update; use trainer=fsdp or "
                                 "trainer=deepspeed_zero2")


__all__ = [
    "AUTO_WRAP",
    "GRPODeepSpeedStrategy",
    "GRPOFSDPStrategy",
    "check_strategy_supports",
    "check_trainer_hardware",
    "clip_and_step",
    "deepspeed_config",
    "keep_out_of_strategy",
    "local_grad_norm",
    "needs_cuda",
    "resolve_wrap_classes",
]
