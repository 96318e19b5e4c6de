"""Rewards by name: the files of ``conf/reward/`` are the registry (``reward=NAME`` in fit / serve, and
``metrics=[NAME, ...]`` in evaluate). An unknown name fails listing the valid ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf, open_dict

from htgrpo._hydra import config_dir
from htgrpo.config import ConfigError, instantiate_node


def available_rewards() -> list[str]:
    """Names of the rewards in ``conf/reward/`` (sorted)."""
    return sorted(p.stem for p in (Path(config_dir()) / "reward").glob("*.yaml"))


def reward_config(name: str, key: str = "reward", world: Any = None, options: Mapping[str, Any] | None = None) -> DictConfig:
    """The composed config of reward ``name`` (its defaults list resolved, as ``reward=NAME`` would give), under a
    root that also holds ``world`` (for rewards that read ``${world}``), with ``options`` merged into the reward node.

    Raises:
        ConfigError(key): unknown name (the message lists the valid ones).
    """
    names = available_rewards()
    if name not in names:
        raise ConfigError(key, f"unknown reward {name!r}; valid: {', '.join(names)}")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"reward={name}"]
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="serve", overrides=overrides)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
            cfg = compose(config_name="serve", overrides=overrides)
    with open_dict(cfg):
        if world is not None:
            cfg.world = world
        if options:
            cfg.reward = OmegaConf.merge(cfg.reward, OmegaConf.create(dict(options)))
    return cfg


def build_reward(name: str, key: str = "reward", world: Any = None, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate reward ``name`` (see :func:`reward_config`); errors name ``key`` (e.g. ``metric_options.clip_score``)."""
    cfg = reward_config(name, key, world, options)
    try:
        return instantiate_node(cfg, "reward")
    except ConfigError as err:
        raise ConfigError(key + err.key[len("reward"):], err.message) from None
