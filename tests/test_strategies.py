"""Strategies under manual optimisation: FSDP units and clipping, DeepSpeed clipping, sharded resume, start-up checks.

Real FSDP (torch FSDP over gloo on CPU) and real DeepSpeed (its CPU accelerator, ``allow_cpu``) run in-process on one
rank; the two-rank FSDP run (sharding for real, resume through a sharded folder, grad norm equal to DDP's) is slow.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

from htgrpo.checkpoints import detect_checkpoint_kind, read_policy_weights, read_training_state
from htgrpo.config import ConfigError
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.strategies import (
    FSDP_SHARDING,
    GRPODeepSpeedStrategy,
    GRPOFSDPStrategy,
    check_strategy_supports,
    check_trainer_hardware,
    clip_and_step,
    clip_grads_,
    deepspeed_config,
    global_grad_norm,
    keep_out_of_strategy,
    resolve_wrap_classes,
)
from test_cli import run_cli
from test_ht_grpo import WORLD, make_module, tiny_policy


@pytest.fixture
def single_rank_group():
    """Tear down the process group (and DeepSpeed's handle on it) an in-process strategy run initialises."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    try:  # DeepSpeed caches its communicator and the groups made from the destroyed world group
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb = None
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            setattr(ds_groups, name, None)
    except ImportError:
        pass


class UpdateLog(L.Callback):
    """Per rollout step: each update's (loss, grad norm)."""

    def __init__(self, keep_weights: bool = False) -> None:
        self.steps: dict[int, list[tuple[float, float]]] = {}
        self.keep_weights = keep_weights
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.rollout_step - 1
        self.steps[step] = [(u.loss, u.grad_norm) for u in pl_module.last_update_stats]
        if self.keep_weights:  # the policy after this rollout step (single-device runs)
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def fit(module, tmp_path: Path, rollout_steps: int, strategy="auto", ckpt_path=None, callbacks=(), log=None):
    log = log or UpdateLog()
    data = PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=rollout_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=bool(callbacks), callbacks=[log, *callbacks],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        accelerator="cpu", devices=1, strategy=strategy, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, log.steps


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def test_wrap_classes_are_the_llada_blocks_and_unknown_names_fail_listing_what_exists():
    from htgrpo.policies.llada import LLaDABlock

    policy = tiny_policy()
    assert resolve_wrap_classes(policy, "auto") == {LLaDABlock}  # from the model's _no_split_modules
    assert resolve_wrap_classes(policy, ["LLaDABlock"]) == {LLaDABlock}
    with pytest.raises(ConfigError) as err:
        resolve_wrap_classes(policy, ["LlamaDecoderLayer"])
    assert err.value.key == "trainer.strategy.wrap_modules" and "LLaDABlock" in err.value.message
    with pytest.raises(ConfigError):
        GRPOFSDPStrategy(state_dict_type="local")
    with pytest.raises(ConfigError, match="sharding_strategy"):
        GRPOFSDPStrategy(sharding_strategy="HYBRID_SHARD")


def test_reference_is_kept_out_of_the_sharded_tree():
    module = make_module()  # beta > 0: a frozen reference copy
    n_policy = sum(p.numel() for p in module.policy.parameters())
    assert sum(p.numel() for p in module.parameters()) == 2 * n_policy
    moved = keep_out_of_strategy(module, torch.device("cpu"))
    assert list(moved) == ["reference"] and module.reference is moved["reference"]
    assert sum(p.numel() for p in module.parameters()) == n_policy  # only the policy is left to shard / optimise
    assert not any(k.startswith("reference.") for k in module.state_dict())
    assert all(not p.requires_grad for p in module.reference.parameters())


def test_global_grad_norm_and_clip_by_hand():
    # sharded grads (3, 4) and (12,), replicated (0, 0, 84): ‖g‖ = sqrt(9 + 16 + 144 + 7056) = 85
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 1, 3))
    a.grad, b.grad, c.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0]), torch.tensor([0.0, 0.0, 84.0])
    norm = global_grad_norm([a, b], [c])
    assert float(norm) == pytest.approx(85.0)
    clip_grads_([a, b, c], 8.5, norm)  # scale 8.5 / (85 + 1e-6)
    assert float(global_grad_norm([a, b], [c])) == pytest.approx(8.5, rel=1e-6)
    assert torch.allclose(a.grad, torch.tensor([0.3, 0.4]), atol=1e-6)


def test_fsdp_grad_norm_equals_fsdps_own_clip_for_every_sharding_strategy(tmp_path):
    # Issue 17 item 6: two gloo CPU ranks, one spawn for all three strategies. FULL_SHARD / SHARD_GRAD_OP units hold
    # one shard of the gradient per rank (squared norms add over ranks); a NO_SHARD unit holds the whole averaged
    # gradient on every rank (adding would give sqrt(2) times the norm). The clipped step must match too.
    import socket

    import fsdp_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "norms.pt"
    torch.multiprocessing.spawn(fsdp_ranks.grad_norm_worker, args=(2, port, list(FSDP_SHARDING), str(out)), nprocs=2)
    results = torch.load(out)
    assert sorted(results) == sorted(FSDP_SHARDING)
    for sharding, (ours, theirs, param_diff) in results.items():
        assert theirs > 100 * fsdp_ranks.MAX_NORM  # a real clip
        assert ours == pytest.approx(theirs, rel=1e-6), sharding
        assert param_diff <= 1e-7, sharding


@pytest.mark.parametrize("trainer_name, needs", [("deepspeed_zero2", True), ("deepspeed_zero3", True), ("deepspeed", True),
                                                 ("ddp", True), ("fsdp", True), ("gpu", True), ("fsdp_cpu", False),
                                                 ("ddp_cpu", False), ("cpu", False)])
def test_cuda_only_trainers_fail_at_startup_on_cpu(compose, trainer_name, needs):
    from omegaconf import OmegaConf

    cfg = compose("fit", ["experiment=shapes_ht", f"trainer={trainer_name}"])
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=False)
    if needs:
        with pytest.raises(ConfigError) as err:
            check_trainer_hardware(trainer_cfg, cuda_available=False)
        assert err.value.key == "trainer" and "torch.cuda.is_available() is False" in err.value.message
    else:
        check_trainer_hardware(trainer_cfg, cuda_available=False)
    check_trainer_hardware(trainer_cfg, cuda_available=True)  # with GPUs every trainer is fine


@pytest.mark.slow
def test_fit_with_deepspeed_on_a_cpu_machine_names_trainer(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("htgrpo.fit", ["experiment=shapes_ht", "trainer=deepspeed_zero3", f"hydra.run.dir={tmp_path / 'r'}"],
                   tmp_path, check=False)
    assert proc.returncode != 0
    assert "Configuration error: trainer: DeepSpeed runs only on CUDA GPUs" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed: clipping is on, and the logged norm is the engine's
# ----------------------------------------------------------------------------------------------------------------


def _attach(strategy, module):
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    return trainer


def test_deepspeed_config_clips_at_max_grad_norm():
    module = make_module(max_grad_norm=0.7)
    strategy = GRPODeepSpeedStrategy(stage=3, allow_cpu=True, logging_batch_size_per_gpu=1)
    _attach(strategy, module)
    config = deepspeed_config(strategy)
    assert config["gradient_clipping"] == 0.7
    assert config["managed_gradient_accumulation"] is False  # several backward passes, then step() is the boundary
    assert config["zero_optimization"]["stage"] == 3
    # Lightning's own strategy takes it from Trainer(gradient_clip_val), which manual optimisation leaves unset:
    plain = DeepSpeedStrategy(stage=2, logging_batch_size_per_gpu=1)
    _attach(plain, make_module(max_grad_norm=0.7))
    assert deepspeed_config(plain)["gradient_clipping"] == 0.0


def test_zero3_refuses_at_startup_a_module_that_accumulates_several_backward_passes():
    zero3 = GRPODeepSpeedStrategy(stage=3, allow_cpu=True, logging_batch_size_per_gpu=1)
    zero2 = GRPODeepSpeedStrategy(stage=2, allow_cpu=True, logging_batch_size_per_gpu=1)
    whole_batch, micro = make_module(micro_batch_size=None), make_module(micro_batch_size=2)
    assert whole_batch.one_backward_per_update and not micro.one_backward_per_update
    check_strategy_supports(zero3, whole_batch)  # one backward per update: fine
    check_strategy_supports(zero2, micro)        # ZeRO-2 accumulates correctly
    with pytest.raises(ConfigError, match=r"algorithm\.micro_batch_size.*micro_batch_size=null"):
        check_strategy_supports(zero3, micro)

    class Accumulating:  # MAR-GRPO: one backward per trained AR step
        one_backward_per_update = False

    with pytest.raises(ConfigError, match=r"trainer: .*Accumulating accumulates several"):
        check_strategy_supports(zero3, Accumulating())


class FakeEngine:
    def __init__(self, clipping: float):
        self.clipping, self.steps = clipping, 0

    def gradient_clipping(self) -> float:
        return self.clipping

    def step(self) -> None:
        self.steps += 1

    def get_global_grad_norm(self) -> float:
        return 3.25


class FakeOptimizer:
    def __init__(self, engine):
        self.engine = engine

    def step(self):  # Lightning's DeepSpeed precision plugin steps the engine
        self.engine.step()


@pytest.mark.parametrize("strategy_cls", [GRPODeepSpeedStrategy, DeepSpeedStrategy])
def test_clip_and_step_under_deepspeed_steps_the_engine_and_reads_its_norm(strategy_cls):
    module = make_module(max_grad_norm=1.0)
    strategy = strategy_cls(stage=2)
    _attach(strategy, module)
    engine = FakeEngine(clipping=1.0)
    strategy.model = engine
    assert clip_and_step(module, FakeOptimizer(engine), 1.0) == 3.25 and engine.steps == 1
    engine.clipping = 0.0  # what plain Lightning configures under manual optimisation: no clipping at all
    with pytest.raises(RuntimeError, match="gradient_clipping=0.0 but algorithm.max_grad_norm=1.0"):
        clip_and_step(module, FakeOptimizer(engine), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Real runs on one CPU rank
# ----------------------------------------------------------------------------------------------------------------


def _same_updates(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert len(a[step]) == len(b[step]) == 3, step
        for (la, ga), (lb, gb) in zip(a[step], b[step]):
            assert lb == pytest.approx(la, rel=1e-4, abs=1e-7), step
            assert gb == pytest.approx(ga, rel=1e-4, abs=1e-7), step


def test_fsdp_one_rank_trains_like_single_device_and_resumes_from_a_sharded_folder(tmp_path, single_rank_group):
    torch.manual_seed(0)
    # a tight clip (every update is clipped) and 3 backward passes per update (micro-batches of 3 of the 8 images)
    plain = make_module(max_grad_norm=0.05, micro_batch_size=3)
    _, ref = fit(plain, tmp_path / "plain", 3)

    torch.manual_seed(0)
    module = make_module(max_grad_norm=0.05, micro_batch_size=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=3, save_top_k=-1)
    trainer, full = fit(module, tmp_path / "fsdp", 3, strategy=GRPOFSDPStrategy(), callbacks=[ckpt])
    strategy = trainer.strategy
    assert len(strategy.sharded_units) == 1  # the toy's one LLaDA block is an FSDP unit ...
    assert type(module.policy.backbone.model.transformer["blocks"][0]).__name__ == "FullyShardedDataParallel"
    assert "reference" not in module._modules  # ... the reference is not part of the sharded tree
    _same_updates(ref, full, range(3))  # clipped updates and global norms as on one device
    assert all(g > 0.05 for step in ref.values() for _, g in step)

    folder = tmp_path / "ckpt" / "step000003.ckpt"
    assert detect_checkpoint_kind(folder) == "fsdp_sharded" and (folder / "__0_0.distcp").is_file()
    assert read_training_state(folder).global_step == 3  # from Lightning's meta.pt (3 updates per rollout step)
    # evaluate's reader: the weights in the folder of the last step are the trained ones
    last = tmp_path / "ckpt" / "step000009.ckpt"
    weights = read_policy_weights(last, tiny_policy())
    assert weights.keys() == tiny_policy().state_dict().keys()
    final = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in module.policy.state_dict().items()}
    for k, v in weights.items():
        assert torch.allclose(v, final[k], atol=1e-6), k
    from htgrpo.policies.shapes_llada import build_masked_diffusion_policy

    with pytest.raises(ConfigError, match="do not fit the architecture of `policy`"):
        read_policy_weights(last, build_masked_diffusion_policy(WORLD, d_model=16, n_layers=1, n_heads=2))

    torch.manual_seed(0)
    resumed = make_module(max_grad_norm=0.05, micro_batch_size=3)
    _, tail = fit(resumed, tmp_path / "resumed", 3, strategy=GRPOFSDPStrategy(), ckpt_path=str(folder))
    assert sorted(tail) == [1, 2]
    _same_updates(full, tail, [1, 2])  # resume through the sharded folder continues with identical losses


@pytest.mark.parametrize("stage, micro_batch_size", [(2, 3), pytest.param(3, None, marks=pytest.mark.slow)])
def test_deepspeed_cpu_clips_like_single_device_and_its_folder_resumes_and_evaluates(tmp_path, single_rank_group,
                                                                                     stage, micro_batch_size):
    pytest.importorskip("deepspeed")
    # ZeRO-2 with micro_batch_size=3: each update is 3 backward passes (8 images) before one step; their gradients
    # must add up. ZeRO-3 takes one backward pass per step (the next test).
    torch.manual_seed(0)
    plain_log = UpdateLog(keep_weights=True)
    _, ref = fit(make_module(max_grad_norm=0.05, micro_batch_size=micro_batch_size), tmp_path / "plain", 3, log=plain_log)

    torch.manual_seed(0)
    module = make_module(max_grad_norm=0.05, micro_batch_size=micro_batch_size)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=3, save_top_k=-1)
    trainer, full = fit(module, tmp_path / "ds", 2, strategy=GRPODeepSpeedStrategy(stage=stage, allow_cpu=True),
                        callbacks=[ckpt])
    assert trainer.strategy.deepspeed_engine.gradient_clipping() == 0.05
    _same_updates(ref, full, range(2))  # the engine clipped (every norm > 0.05) and reported the global norm
    assert all(g > 0.05 for step in ref.values() for _, g in step)

    # evaluate's reader reassembles the fp32 weights from the ZeRO partitions: the single-device run's after 2 steps
    folder = tmp_path / "ckpt" / "step000006.ckpt"
    assert detect_checkpoint_kind(folder) == "deepspeed"
    assert read_training_state(folder).global_step == 6  # from DeepSpeed's client state (mp_rank_00_model_states.pt)
    weights = read_policy_weights(folder, tiny_policy())
    for k, v in plain_log.weights[1].items():
        assert torch.allclose(weights[k], v, atol=1e-6), k

    torch.manual_seed(0)
    resumed = make_module(max_grad_norm=0.05, micro_batch_size=micro_batch_size)
    _, tail = fit(resumed, tmp_path / "resumed", 3, strategy=GRPODeepSpeedStrategy(stage=stage, allow_cpu=True),
                  ckpt_path=str(tmp_path / "ckpt" / "step000003.ckpt"))
    assert sorted(tail) == [1, 2]
    _same_updates(ref, tail, [1, 2])  # resume through the DeepSpeed folder continues with identical losses


def test_deepspeed_zero3_refuses_a_second_backward_pass_before_a_step(tmp_path, single_rank_group):
    """The run-time guard behind the start-up check above (a real ZeRO-3 engine on one CPU rank, ~20 s)."""
    pytest.importorskip("deepspeed")
    with pytest.raises(RuntimeError, match="deepspeed_zero3 takes one backward pass per optimiser step"):
        fit(make_module(micro_batch_size=3), tmp_path, 1, strategy=GRPODeepSpeedStrategy(stage=3, allow_cpu=True))


def test_mar_grpo_trains_the_same_under_fsdp_and_deepspeed(tmp_path, single_rank_group):
    """MAR-GRPO runs one backward pass per trained AR step before its one step per update: the gradients must add
    up (FSDP's replicated parameters; DeepSpeed's unmanaged accumulation) and clip as on one device."""
    pytest.importorskip("deepspeed")
    import test_mar_grpo as mar_tests

    runs = {}
    for name, strategy in (("single", "auto"), ("fsdp", GRPOFSDPStrategy()),
                           ("zero2", GRPODeepSpeedStrategy(stage=2, allow_cpu=True))):
        torch.manual_seed(0)
        log = UpdateLog()
        module = mar_tests.make_module(max_grad_norm=0.05)
        data = PromptDataModule(ShapesPromptStream(mar_tests.WORLD, seed=5), batch_size=2)
        trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, callbacks=[log],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path / name), accelerator="cpu", devices=1, strategy=strategy,
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=data)
        runs[name] = log.steps
    assert all(g > 0.05 for step in runs["single"].values() for _, g in step)  # every update clipped
    for name in ("fsdp", "zero2"):
        for step in (0, 1):
            for (la, ga), (lb, gb) in zip(runs["single"][step], runs[name][step]):
                assert lb == pytest.approx(la, rel=1e-4, abs=1e-7) and gb == pytest.approx(ga, rel=1e-4), (name, step)


# ----------------------------------------------------------------------------------------------------------------
# Two ranks (slow): FSDP shards for real
# ----------------------------------------------------------------------------------------------------------------

TINY_RL = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "data.batch_size=2",
           "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
           "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
           "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
           "validate_at_end=false", "logger=csv", "reward=jpeg_compressibility", "trainer.limit_train_batches=4"]


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for row in csv.DictReader(open(next(run_dir.rglob("metrics.csv")))):
        if row.get("train/loss"):
            rows[int(float(row["train/rollout_step"]))] = {k: float(row[k]) for k in ("train/loss", "train/grad_norm",
                                                                                     "train/reward/mean")}
    return rows


@pytest.mark.slow
def test_fsdp_two_ranks_resume_from_sharded_folder_and_match_ddp(tmp_path):
    full, resumed, ddp = tmp_path / "full", tmp_path / "resumed", tmp_path / "ddp"
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, "trainer=fsdp_cpu", f"hydra.run.dir={full}",
                           "callbacks.model_checkpoint.every_n_train_steps=3"], tmp_path)
    folder = full / "checkpoints" / "step000006.ckpt"
    assert {p.name for p in folder.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # one shard per rank
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, "trainer=fsdp_cpu", f"hydra.run.dir={resumed}",
                           f"ckpt_path={folder}"], tmp_path)
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *TINY_RL, "trainer=ddp_cpu", f"hydra.run.dir={ddp}"], tmp_path)
    a, b, d = _metrics(full), _metrics(resumed), _metrics(ddp)
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]
    assert any(a[s]["train/grad_norm"] > 0 for s in a)
    for step in (2, 3):  # resume through the sharded folder is exact
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    for step in a:  # the FSDP global norm (shards + replicated parts, over both ranks) is DDP's norm
        for key, value in a[step].items():
            assert d[step][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (step, key)
