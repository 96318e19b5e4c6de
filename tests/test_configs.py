"""Every config composes, every node instantiates, and bad values fail at start-up naming their key."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from htgrpo._hydra import available_options
from htgrpo.config import ConfigError, instantiate_node

# Experiments on real checkpoints (mmada_*, dimoo_*, harmon_*) need weights: tests/test_mmada_dimoo.py and
# tests/test_harmon.py compose and instantiate each of them with tiny checkpoints in the released format.
REAL_CHECKPOINT_EXPERIMENTS = ("mmada_", "dimoo_", "harmon_")
EXPERIMENTS = [e for e in available_options("experiment") if not e.startswith(REAL_CHECKPOINT_EXPERIMENTS)]
TINY = ["benchmark.prompts.per_task=2", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2"]


def _tmp_paths(cfg, tmp_path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
        cfg.paths.log_dir = str(tmp_path / "logs")
    return cfg


def test_there_are_experiments():
    assert "shapes_pretrain" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, compose, tmp_path):
    cfg = _tmp_paths(compose("fit", [f"experiment={experiment}", *TINY]), tmp_path)
    if cfg.policy.get("init") == "pretrained":
        # RL experiments start from the warm-start export; its absence is tested below.
        with open_dict(cfg):
            cfg.policy.init = "scratch"
    OmegaConf.resolve(cfg)  # every interpolation resolves
    benchmark = instantiate_node(cfg, "benchmark")
    assert len(benchmark.prompts) > 0
    datamodule = instantiate_node(cfg, "data", val_prompts=benchmark.prompts)
    batch = next(iter(datamodule.train_dataloader()))
    assert len(batch) == cfg.data.batch_size
    policy = instantiate_node(cfg, "policy")
    sampler = instantiate_node(cfg, "sampler")
    module = instantiate_node(cfg, "algorithm", policy=policy, benchmark=benchmark, sampler=sampler)
    assert module.policy is policy
    for name in cfg.callbacks:
        instantiate_node(cfg, f"callbacks.{name}")


@pytest.mark.parametrize("config_name", ["fit", "evaluate"])
def test_default_configs_compose(config_name, compose):
    cfg = compose(config_name)
    assert cfg.world.grid_size == 11  # conf/world/shapes.yaml (issue 13 redesign)
    assert cfg.benchmark.images_per_prompt == 4


def test_unknown_experiment_lists_the_available_ones(compose):
    with pytest.raises(MissingConfigException) as err:
        compose("fit", ["experiment=does_not_exist"])
    assert "shapes_pretrain" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.num_steps=0", "sampler.num_steps"),
        ("sampler.name=beam", "sampler.name"),
        ("sampler.guidance_scale=-1", "sampler.guidance_scale"),
        ("algorithm.lr=0", "algorithm.lr"),
        ("algorithm.cond_dropout=1.5", "algorithm.cond_dropout"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.train.dpg_fraction=2", "data.train.dpg_fraction"),
        ("benchmark.images_per_prompt=0", "benchmark.images_per_prompt"),
        ("benchmark.prompts.per_task=0", "benchmark.prompts.per_task"),
        ("policy.init=magic", "policy.init"),
        ("policy.d_model=30", "policy.d_model"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key, compose, tmp_path):
    cfg = _tmp_paths(compose("fit", [override]), tmp_path)
    section = key.split(".")[0]
    kwargs = {}
    if section in ("data", "algorithm"):
        benchmark = instantiate_node(cfg, "benchmark")
        if section == "data":
            kwargs = {"val_prompts": benchmark.prompts}
        else:
            kwargs = {"policy": None, "benchmark": benchmark, "sampler": None}
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, section, **kwargs)
    assert err.value.key == key, str(err.value)


def test_official_prompt_sets_need_their_path(compose, tmp_path):
    cfg = _tmp_paths(compose("fit", ["data=geneval"]), tmp_path)
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "data")
    assert "data" in err.value.key and "path" in str(err.value)


def test_official_prompt_sets_load_from_a_given_path(compose, tmp_path, shared_data):
    cfg = _tmp_paths(compose("fit", ["data=geneval", f"data.train.path={shared_data / 'geneval'}"]), tmp_path)
    dm = instantiate_node(cfg, "data")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == cfg.data.batch_size and batch.prompts[0].record.tag
    cfg = _tmp_paths(compose("fit", ["data=dpg", f"data.train.prompts_path={shared_data / 'dpg_bench' / 'prompts'}"]), tmp_path)
    dm = instantiate_node(cfg, "data")
    assert len(dm.train_dataset()) == 1065


def test_missing_warm_start_names_the_key_and_the_fix(compose, tmp_path):
    # (the default warm start ships in the package: point the key at a folder that is not there)
    cfg = _tmp_paths(compose("fit", ["experiment=shapes_ht", *TINY, f"policy.pretrained_path={tmp_path / 'missing'}"]),
                     tmp_path)
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "policy")
    assert "policy.pretrained_path" in str(err.value)
    assert "experiment=shapes_pretrain" in str(err.value)
