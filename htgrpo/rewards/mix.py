"""``reward=mix``: a weighted sum of any rewards.

Rule, per image ``x`` with record ``m``::

    mix(x, m) = sum_k  weight_k * reward_k(x, m)

An image for which any part is NaN (that part failed) gets NaN (advantage 0 in training; the other images of the
batch keep their scores, because each part is scored through ``safe_score``). Components: each part's own score
under its name (unweighted), and each part's components under ``<name>/<component>``; they are logged as
``train/reward/<name>``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from htgrpo.config import ConfigError, require
from htgrpo.rewards.base import Reward, RewardOutput, safe_score


def _build_part(node: Any, key: str) -> Any:
    """A part given as a config node (a mapping with ``_target_``) is built here, errors naming ``key``."""
    if isinstance(node, Mapping) and "_target_" in node:
        from htgrpo.config import _build

        return _build(OmegaConf.create(dict(node)), key, {})
    require(callable(node), key, f"must be a reward (a config node with _target_, or a callable), got {node!r}")
    return node


class MixReward(Reward):
    """Weighted sum of rewards.

    Args:
        components: ``{name: {"weight": float, "reward": <reward or config node>}}``, at least one; names must be
            non-empty and contain no ``/``; weights finite.
    """

    name = "mix"

    def __init__(self, components: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        require(isinstance(components, Mapping) and len(components) > 0, "components",
                "needs at least one entry {name: {weight: W, reward: <reward node>}}")
        self.parts: dict[str, Any] = {}
        self.weights: dict[str, float] = {}
        for name, spec in components.items():
            key = f"components.{name}"
            require(bool(str(name)) and "/" not in str(name), key, "component names must be non-empty, without '/'")
            require(isinstance(spec, Mapping), key, f"must be a mapping {{weight, reward}}, got {spec!r}")
            unknown = set(spec) - {"weight", "reward"}
            require(not unknown, key, f"unknown keys {sorted(unknown)}; expected weight and reward")
            require("reward" in spec and spec["reward"] is not None, f"{key}.reward", "is missing")
            try:
                weight = float(spec.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"{key}.weight", f"must be a number, got {spec.get('weight')!r}") from None
            require(math.isfinite(weight), f"{key}.weight", f"must be finite, got {weight}")
            self.weights[str(name)] = weight
            self.parts[str(name)] = _build_part(spec["reward"], f"{key}.reward")

    @property
    def max_failed_batches(self) -> int:  # type: ignore[override]
        """The smallest positive ``max_failed_batches`` of the parts (0 when none sets one): a mix holding a served
        reward stops the run when that server stays down, as the served reward alone would."""
        limits = [int(getattr(part, "max_failed_batches", 0) or 0) for part in self.parts.values()]
        return min((n for n in limits if n > 0), default=0)

    def check_ready(self) -> None:
        """Each part's start-up check (a served part checks its server), errors naming the part's key."""
        from htgrpo.config import call_checked

        for name, part in self.parts.items():
            check = getattr(part, "check_ready", None)
            if callable(check):
                call_checked(check, f"components.{name}.reward")

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        n = len(records)
        total = torch.zeros(n, dtype=torch.float32)
        failed = torch.zeros(n, dtype=torch.bool)
        components: dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            out = safe_score(part, images, records)
            failed |= ~torch.isfinite(out.scores)
            total += self.weights[name] * out.scores
            components[name] = out.scores
            for sub, values in out.components.items():
                components[f"{name}/{sub}"] = values
        total[failed] = math.nan
        return RewardOutput(total, components, num_failed=int(failed.sum()))

    @property
    def io_bound(self) -> bool:  # type: ignore[override]
        """A mix waits on another process when any of its parts does (``remote``, ``vlm_judge``)."""
        return any(bool(getattr(part, "io_bound", False)) for part in self.parts.values())

    def follow(self, device: str | torch.device) -> "MixReward":
        """Each part follows ``device`` by its own setting (see :meth:`Reward.follow`)."""
        for part in self.parts.values():
            if isinstance(part, Reward):
                part.follow(device)
        return self

    def _move(self, device: torch.device) -> None:
        for part in self.parts.values():
            if isinstance(part, Reward):
                part.to(device)
