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


#: config keys whose values are secrets. A config holding one (non-null) is refused before Hydra writes anything:
#: Hydra copies every config value and command-line override into the run's ``.hydra/*.yaml``, and ``fit`` logs the
#: config to the loggers. Secrets come from the environment or a file (``reward.token_file``, ``serve.token_file``).
SECRET_KEYS = frozenset({"token", "api_key", "apikey", "password", "secret", "bearer_token"})


def secret_paths(cfg: DictConfig) -> list[str]:
    """Dotted paths of the non-null values under keys named in :data:`SECRET_KEYS` (the ``hydra`` node skipped)."""
    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if str(key).lower() in SECRET_KEYS and value not in (None, ""):
                    found.append(where)
                walk(value, where)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    container = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(container, dict):
        container.pop("hydra", None)
    walk(container, "")
    return found


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - very old Hydra
    _HydraCallback = object  # type: ignore[assignment,misc]


class RefuseSecretsInConfig(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (``conf/hydra/default.yaml``): stop before the run folder is written when the config holds a
    secret (:data:`SECRET_KEYS`), e.g. ``+serve.token=...`` on the command line."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        paths = secret_paths(config)
        if paths:
            raise SystemExit(f"Configuration error: {', '.join(paths)}: secrets are not accepted as config values "
                             "(Hydra writes every value into .hydra/*.yaml and fit logs the config). Put the token in "
                             "$HTGRPO_REWARD_TOKEN or a file (reward.token_file / serve.token_file); nothing was "
                             "written")


def apply_num_threads(value: object, key: str = "num_threads") -> int | None:
    """Set torch's intra-op CPU threads from the config key ``num_threads`` (``null``: leave torch's default).

    ``torch.set_num_threads(n)`` at start-up, before any model is built, so a run does not depend on the caller's
    ``OMP_NUM_THREADS``: the ShapesWorld experiments set 1, which reproduces their measured tables bit for bit (float
    reductions split over several threads add in another order). Returns the value set (None when left alone).

    Raises:
        ConfigError: ``value`` is not null or an integer >= 1.
    """
    from htgrpo.config import ConfigError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be null (torch's default) or an integer >= 1, got {value!r}")
    import torch

    torch.set_num_threads(int(value))
    return int(value)
