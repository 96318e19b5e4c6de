"""Start-up configuration checking.

Every component validates its own arguments in ``__init__`` and raises :class:`ConfigError` with the
argument's name. :func:`instantiate_node` instantiates one config node and prefixes that name with the
node's path, so a bad value fails before training starts with the full key a user typed, e.g.::

    ConfigError: sampler.num_steps: must be >= 1, got 0
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid. ``key`` is the (dotted) config key at fault."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` put in front of its key."""
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.message)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(key, message)


def require_choice(value: Any, choices: Iterable[Any], key: str) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")


def require_range(value: float, key: str, low: float | None = None, high: float | None = None,
                  low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise unless ``low <= value <= high`` (bounds optional, inclusiveness configurable)."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
        hi = "" if high is None else f"{high}" + ("]" if high_inclusive else ")")
        raise ConfigError(key, f"must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value!r}")


def instantiate_node(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate the config node at dotted path ``key`` (like ``hydra.utils.instantiate``), depth first.

    Nested nodes with a ``_target_`` are built first, each under its own path, so an error anywhere is
    re-raised as a :class:`ConfigError` naming the full key (``data.train.dpg_fraction``). ``kwargs``
    are passed to the top-level constructor (objects built elsewhere, e.g. the policy).
    """
    from omegaconf.errors import MissingMandatoryValue

    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(key, "is mandatory (???) and has no value: set it on the command line") from None
    if node is None:
        raise ConfigError(key, "is missing from the configuration")
    return _build(node, key, kwargs)


def _build(node: Any, path: str, extra: dict[str, Any]) -> Any:
    import functools

    from hydra.utils import get_object
    from omegaconf import DictConfig as _DictConfig
    from omegaconf.errors import MissingMandatoryValue

    if not isinstance(node, _DictConfig) or "_target_" not in node:
        raise ConfigError(path, "has no _target_: cannot build an object from it")
    target = node["_target_"]
    partial = bool(node.get("_partial_", False))
    kwargs: dict[str, Any] = {}
    for name in node.keys():
        name = str(name)
        if name.startswith("_") and name.endswith("_"):
            continue
        try:
            value = node[name]
        except MissingMandatoryValue:
            raise ConfigError(f"{path}.{name}", "is mandatory (???) and has no value: set it on the command line") from None
        if isinstance(value, _DictConfig) and "_target_" in value:
            kwargs[name] = _build(value, f"{path}.{name}", {})
        elif OmegaConf.is_config(value):
            try:
                kwargs[name] = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
            except MissingMandatoryValue as err:
                raise ConfigError(f"{path}.{name}", f"has a mandatory (???) value that is not set: {err}") from None
        else:
            kwargs[name] = value
    kwargs.update(extra)
    try:
        fn = get_object(str(target))
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{path}._target_", f"cannot import {target!r}: {err}") from None
    if partial:
        return functools.partial(fn, **kwargs)
    try:
        return fn(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None
    except TypeError as err:
        if "argument" in str(err):
            raise ConfigError(path, f"{target}: {err}") from None
        raise


def call_checked(fn: Callable[..., Any], key: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and re-raise its ``ConfigError`` under ``key``."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as err:
        raise err.under(key) from None
