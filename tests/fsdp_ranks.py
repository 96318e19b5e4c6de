"""Worker of the two-rank FSDP grad-norm test (tests/test_strategies.py), in its own small module so each spawned
rank imports only torch, Lightning and ``htgrpo.strategies``.

Per sharding strategy, every rank builds the same toy model (blocks = FSDP units, the rest replicated) twice:
``GRPOFSDPStrategy`` wraps it (``_setup_model``) and clips and steps it (``clip_and_step``); a root FSDP module with
the same units and strategy clips it with FSDP's own ``clip_grad_norm_``. Each rank feeds its own batch, so the
ranks' gradients differ before FSDP / the strategy averages them.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import torch
from torch import nn

WIDTH, DEPTH = 7, 2  # odd sizes: FSDP pads the flat parameters of the units to split them over two ranks
MAX_NORM = 1e-3      # far below the gradient norm, so both sides really clip


class Block(nn.Module):
    """h + down(tanh(up(h))): one FSDP unit. ``up.bias`` is frozen, as the base weights are next to LoRA adapters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.up.bias.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(h)))


class Toy(nn.Module):
    """embed -> blocks -> head; embed and head stay replicated under ``GRPOFSDPStrategy``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _loss(model: nn.Module, rank: int) -> torch.Tensor:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + rank))
    return model(x).square().mean()


def _full_parameters(model: nn.Module, fsdp_modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` in full (FSDP's ``summon_full_params`` on each given FSDP module)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with ExitStack() as stack:
        for m in fsdp_modules:
            stack.enter_context(FSDP.summon_full_params(m))
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}


def _with_strategy(sharding: str, rank: int, world_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from htgrpo.strategies import GRPOFSDPStrategy

    env = LightningEnvironment()
    env.set_world_size(world_size)
    env.set_global_rank(rank)
    strategy = GRPOFSDPStrategy(wrap_modules=["Block"], sharding_strategy=sharding, cluster_environment=env,
                                parallel_devices=[torch.device("cpu")] * world_size)
    torch.manual_seed(0)
    model = strategy._setup_model(Toy())
    assert len(strategy.sharded_units) == DEPTH
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    _loss(model, rank).backward()
    norm = strategy.clip_and_step(optimizer, MAX_NORM)
    return norm, _full_parameters(model, strategy.sharded_units)


def _with_fsdp_root(sharding: str, rank: int) -> tuple[float, dict[str, torch.Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    root = FSDP(Toy(), auto_wrap_policy=ModuleWrapPolicy({Block}), sharding_strategy=ShardingStrategy[sharding],
                use_orig_params=True, device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=1.0)
    _loss(root, rank).backward()
    norm = float(root.clip_grad_norm_(MAX_NORM))
    optimizer.step()
    return norm, _full_parameters(root, [root])


def grad_norm_worker(rank: int, world_size: int, port: int, strategies: list[str], out: str) -> None:
    """One rank: for each strategy, (our norm, FSDP's norm, max |Δ| of the parameters after the clipped step)."""
    import warnings

    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # FSDP's NO_SHARD deprecation and frozen-parameter notes
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        results = {}
        for sharding in strategies:
            ours, ours_params = _with_strategy(sharding, rank, world_size)
            theirs, their_params = _with_fsdp_root(sharding, rank)
            assert ours_params.keys() == their_params.keys()
            diff = max(float((ours_params[k] - their_params[k]).abs().max()) for k in ours_params)
            results[sharding] = (ours, theirs, diff)
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()
