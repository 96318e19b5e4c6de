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


def _parametrized_experiments(test_module: str) -> set[str]:
    """The ``experiment`` values of every ``@pytest.mark.parametrize("experiment", [...])`` in a test module, read
    from its source (importing it would build its module-level fixtures)."""
    import ast

    from conftest import REPO_ROOT

    found: set[str] = set()
    for node in ast.walk(ast.parse((REPO_ROOT / "tests" / test_module).read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "experiment"
                and isinstance(node.args[1], (ast.List, ast.Tuple))):
            found |= {e.value for e in node.args[1].elts if isinstance(e, ast.Constant)}
    return found


def test_every_experiment_file_is_composed_and_instantiated_by_a_test():
    """Each conf/experiment/*.yaml (listed here with os.listdir, not through available_options) is parametrized
    into test_experiment_composes_and_instantiates above, or, on a real-checkpoint layout, into the compose-and-
    instantiate tests of test_mmada_dimoo.py / test_harmon.py with tiny released-format checkpoints."""
    import os

    from conftest import CONFIG_DIR

    on_disk = {f[: -len(".yaml")] for f in os.listdir(CONFIG_DIR / "experiment") if f.endswith(".yaml")}
    assert "shapes_ht" in on_disk and "mmada_ht" in on_disk
    real = _parametrized_experiments("test_mmada_dimoo.py") | _parametrized_experiments("test_harmon.py")
    assert set(EXPERIMENTS) | real == on_disk, f"not composed by any test: {sorted(on_disk - set(EXPERIMENTS) - real)}"
    assert set(EXPERIMENTS).isdisjoint(real)  # the tiny-override list above is not applied to real layouts


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


def test_shipped_world_is_the_dataclass_default(compose):
    """conf/world/shapes.yaml is ``ShapesWorldConfig()`` (every key, not only the grid), and ``roomy()`` is the
    16-cell geometry the unit tests and benchmark scripts were measured on."""
    from htgrpo.data.shapes.palette import ShapesWorldConfig

    shipped = instantiate_node(compose("fit"), "world")
    assert shipped == ShapesWorldConfig()
    assert (shipped.grid_size, shipped.cell_px, shipped.position_step) == (11, 10, 6)
    assert ShapesWorldConfig.roomy() == ShapesWorldConfig(grid_size=16, cell_px=8, min_object_size=5, max_object_size=7,
                                                          small_size=5, large_size=7, position_step=1)
    assert ShapesWorldConfig.roomy(grid_size=10, max_object_size=5).large_size == 7  # overrides keep the rest


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
