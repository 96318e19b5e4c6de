"""Locating the Hydra config tree and small helpers shared by the entry points."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


def config_dir() -> str:
    """Absolute path of the ``conf/`` tree: ``$HTGRPO_CONFIG_DIR``, else ``<repo>/conf`` next to the package.

    The package is meant to be installed in editable mode (``pip install -e .``) from a clone, so the
    config tree sits beside it.
    """
    env = os.environ.get("HTGRPO_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "fit.yaml").exists():
        raise FileNotFoundError(
            f"htgrpo's Hydra configs were not found at {path}. Install from a clone with `pip install -e .` "
            "or set HTGRPO_CONFIG_DIR to the repository's conf/ folder.")
    return str(path)


def available_options(group: str) -> list[str]:
    """Names of the configs in a group folder, e.g. ``experiment``."""
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def plain(cfg: DictConfig) -> dict:
    """A resolved plain-dict copy of ``cfg`` (for logging)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def run_or_exit_on_config_error(run: Callable[[DictConfig], T], cfg: DictConfig, log: logging.Logger) -> T:
    """``run(cfg)``; a :class:`~htgrpo.config.ConfigError` is logged and ends the process with
    ``Configuration error: <key>: <message>`` (no traceback: the message names the key to fix)."""
    from htgrpo.config import ConfigError

    try:
        return run(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(f"Configuration error: {err}") from None
