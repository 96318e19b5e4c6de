"""Multi-node launch: the cluster environment Lightning resolves under torchrun and SLURM (from the variables each
launcher sets, without launching), the documented launch scripts, the shared run folder, and the Hydra launchers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from htgrpo.config import instantiate_node
from htgrpo.strategies import GRPOFSDPStrategy
from conftest import REPO_ROOT

LAUNCH = REPO_ROOT / "experiments" / "launch"
# Every variable any of the two launchers sets, cleared before each test sets its own.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NODE_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in LAUNCHER_VARS:
            monkeypatch.delenv(name)
    # A Trainer built under launcher variables sets Lightning's process-global rank (rank_zero_only.rank, which
    # decides whether loggers write); put it back so later tests in this process log as rank 0 again.
    saved_ranks = [(fn, getattr(fn, "rank", None)) for fn in _rank_zero_functions()]
    yield monkeypatch
    for fn, rank in saved_ranks:
        if rank is None:
            if hasattr(fn, "rank"):
                del fn.rank
        else:
            fn.rank = rank


def _rank_zero_functions() -> list:
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero

    return [fabric_rank_zero.rank_zero_only, pytorch_rank_zero.rank_zero_only]


def build_trainer(compose, tmp_path, overrides):
    cfg = compose("fit", ["experiment=shapes_ht", *overrides, f"trainer.default_root_dir={tmp_path}"])
    return instantiate_node(cfg, "trainer", logger=False)


def test_torchrun_variables_give_the_world_and_ranks(compose, tmp_path, clean_env):
    # what `torchrun --nnodes=2 --nproc-per-node=4 --node-rank=1` sets for its second process on node 1
    for key, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                       "ROLE_RANK": "5", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                       "TORCHELASTIC_RUN_ID": "mmada-fsdp-1"}.items():
        clean_env.setenv(key, value)
    trainer = build_trainer(compose, tmp_path, ["trainer=fsdp_cpu", "trainer.devices=4", "trainer.num_nodes=2"])
    env = trainer.strategy.cluster_environment
    assert isinstance(env, TorchElasticEnvironment) and isinstance(trainer.strategy, GRPOFSDPStrategy)
    assert env.creates_processes_externally  # Lightning launches nothing itself
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert (env.main_address, env.main_port) == ("10.0.0.1", 29500)


def test_slurm_variables_give_the_world_and_ranks(compose, tmp_path, clean_env):
    # what `srun` sets for task 11 of `sbatch --nodes=2 --ntasks-per-node=8` (the 4th task on the second node)
    for key, value in {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "11",
                       "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
                       "SLURM_JOB_NAME": "htgrpo-mmada-fsdp", "SLURM_NODELIST": "gpu[07-08]"}.items():
        clean_env.setenv(key, value)
    trainer = build_trainer(compose, tmp_path, ["trainer=fsdp_cpu", "trainer.devices=8", "trainer.num_nodes=2"])
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (16, 11, 3, 1)
    assert env.main_address == "gpu07"  # the first node of the allocation
    assert env.main_port == 15000 + 4242  # every task derives the same port from the job id


def _script_overrides(script: Path, env: dict[str, str]) -> list[str]:
    """The key=value arguments the script passes to ``-m htgrpo.fit`` (shell variables expanded from ``env``)."""
    text = script.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "-m htgrpo.fit" in line)
    line = re.sub(r"\$\{(\w+)(:-[^}]*)?\}", lambda m: env.get(m.group(1), (m.group(2) or ":-")[2:]), line)
    args = shlex.split(line.split("-m htgrpo.fit", 1)[1])
    return [a for a in args if a != "$@"]


def test_the_sbatch_script_composes_a_16_rank_fsdp_run(compose, tmp_path):
    script = LAUNCH / "fsdp_2x8.sbatch"
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text and "srun python -m htgrpo.fit" in text
    overrides = _script_overrides(script, {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"})
    cfg = compose("fit", overrides)
    assert cfg.task_name == "mmada_ht"
    assert cfg.trainer.strategy._target_ == "htgrpo.strategies.GRPOFSDPStrategy"
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.accelerator) == (2, 8, "gpu")


def test_the_torchrun_script_composes_with_the_trainer_the_user_picks(compose, tmp_path):
    overrides = _script_overrides(LAUNCH / "torchrun_multinode.sh", {"NNODES": "2", "GPUS_PER_NODE": "8"})
    assert overrides == ["trainer.num_nodes=2", "trainer.devices=8"]
    cfg = compose("fit", ["experiment=mmada_ht", "trainer=deepspeed_zero3", *overrides])
    assert cfg.trainer.strategy.stage == 3 and (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 8)


def test_every_rank_gets_the_same_run_folder_from_htgrpo_run_id(compose, monkeypatch):
    monkeypatch.setenv("HTGRPO_RUN_ID", "4242")
    cfg = compose("fit", ["experiment=shapes_ht"])
    assert cfg.hydra.run.dir.endswith("shapes_ht/runs/4242")
    monkeypatch.delenv("HTGRPO_RUN_ID")
    cfg = compose("fit", ["experiment=shapes_ht"])
    assert re.search(r"shapes_ht/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$", cfg.hydra.run.dir)


def test_slurm_array_launcher_config(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose("fit", ["hydra/launcher=slurm"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)
    assert launcher.array_parallelism == 16


def test_local_parallel_launcher_config(compose):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = compose("fit", ["hydra/launcher=local_parallel"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 2 and launcher.backend == "loky"


TINY_RL = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "data.batch_size=2",
           "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
           "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
           "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
           "validate_at_end=false", "logger=csv", "reward=jpeg_compressibility"]


@pytest.mark.slow
def test_local_parallel_sweep_runs_two_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "htgrpo.fit", "-m", "hydra/launcher=local_parallel",
                           "experiment=shapes_ht", *TINY_RL, "trainer.max_steps=1", "algorithm.lr=1e-4,2e-4",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["steps"] == 1


@pytest.mark.slow
def test_torchrun_launch_of_two_fsdp_ranks_on_cpu(tmp_path):
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               HTGRPO_RUN_ID="torchrun-test")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nnodes=1", "--nproc-per-node=2", "-m", "htgrpo.fit",
                           "experiment=shapes_ht", *TINY_RL, "trainer=fsdp_cpu", "trainer.devices=2",
                           "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "logs" / "shapes_ht" / "runs" / "torchrun-test"  # both ranks wrote into one folder
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / "step000006.ckpt").glob("*.distcp")} == {"__0_0.distcp",
                                                                                              "__1_0.distcp"}
