"""Learning-rate schedule of the GRPO modules (``algorithm.lr_schedule``, issue 21 item 4).

The learning rate of optimiser update ``u`` (0-based, counted over the run) taken on rollout batch ``t`` (0-based)
is ``lr · warmup(u) · decay(t)``:

* ``warmup(u) = min(1, (u + 1) / warmup_steps)`` (1 when ``warmup_steps = 0``): the linear warm-up the modules
  always had, in optimiser updates;
* ``decay(t)`` with progress ``p = min(1, t / T)`` over ``T = lr_decay_batches`` rollout batches and floor
  ``m = lr_min_ratio``:

  - ``constant``: ``1`` (the default: the runs measured so far);
  - ``linear``:   ``m + (1 − m) · (1 − p)``;
  - ``cosine``:   ``m + (1 − m) · (1 + cos(π p)) / 2``.

The decay is counted in rollout batches, not updates, so every one of a batch's K updates (HT-GRPO's stages) uses
the same rate, and ``T`` is the run's length as the user sets it (``trainer.limit_train_batches``).
"""

from __future__ import annotations

import math

from htgrpo.config import ConfigError, require_choice

__all__ = ["LR_SCHEDULES", "lr_decay_factor", "validate_lr_schedule", "warmup_factor"]

#: Allowed ``algorithm.lr_schedule`` values.
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def validate_lr_schedule(schedule: str, min_ratio: float, decay_batches: int | None) -> tuple[str, float, int | None]:
    """Check ``lr_schedule`` (one of :data:`LR_SCHEDULES`), ``lr_min_ratio`` (a number in ``[0, 1]``) and
    ``lr_decay_batches`` (``None`` or an integer ``>= 1``); returns them typed.

    Raises:
        ConfigError: naming the offending key.
    """
    require_choice(schedule, LR_SCHEDULES, "lr_schedule")
    try:
        ratio = float(min_ratio) if not isinstance(min_ratio, bool) else math.nan
    except (TypeError, ValueError):
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:  # also NaN
        raise ConfigError("lr_min_ratio", f"must be a number in [0, 1], got {min_ratio!r}")
    if decay_batches is not None and (isinstance(decay_batches, bool) or not isinstance(decay_batches, int)
                                      or decay_batches < 1):
        raise ConfigError("lr_decay_batches", f"must be null or an integer >= 1, got {decay_batches!r}")
    return str(schedule), ratio, decay_batches


def warmup_factor(update: int, warmup_steps: int) -> float:
    """``min(1, (update + 1) / warmup_steps)``; 1 without warm-up."""
    return min(1.0, (update + 1) / warmup_steps) if warmup_steps else 1.0


def lr_decay_factor(batch: int, total_batches: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """``decay(t)`` of the module docstring for rollout batch ``batch`` of ``total_batches``.

    ``constant`` returns exactly ``1.0`` (so the rate is bit-for-bit the old one).
    """
    if schedule == "constant":
        return 1.0
    if total_batches < 1:
        raise ValueError(f"total_batches must be >= 1, got {total_batches}")
    p = min(1.0, max(0.0, batch / total_batches))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
