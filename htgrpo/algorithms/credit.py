"""HT-GRPO pieces (SPEC section 4): token partition, credit weights and the Sketch-Then-Paint stages.

All functions are pure torch on ``(B, N)`` tensors (``B`` images, ``N`` image tokens each):

1. **Partition.** :func:`structure_rank` orders each image's tokens by a key recorded during the rollout
   (``decode_step``: earliest committed first; or ``entropy``: commit-time predictive entropy); :func:`structure_mask`
   takes the first ``k = round(fraction * N)`` (at least 1) of that order as the structure set ``S``; everything else
   is the refinement set ``R``.
2. **Credit.** :func:`credit_weights` gives a per-token weight map ``w`` (``binary``, ``soft`` or ``uniform``),
   normalised to mean 1 per image; :func:`token_advantages` gives ``A_hat_i = A_g * w_i``.
3. **Stages.** :class:`StageSchedule` says which :class:`Stage` each inner iteration (or global step) is in;
   :func:`stage_candidates` gives the candidate tokens of a stage (all / S / R) and :func:`sample_scored` draws the
   random subset of candidates scored in one iteration.

Rounding: ``round(x)`` here is round-half-up, ``floor(x + 0.5)`` (so ``round(2.5) = 3``), not Python's banker's
rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from htgrpo.config import ConfigError

__all__ = [
    "CREDIT_KINDS",
    "ENTROPY_ORDERS",
    "PARTITION_KEYS",
    "STAGE_MODES",
    "Stage",
    "StageSchedule",
    "credit_weights",
    "sample_scored",
    "stage_candidates",
    "structure_count",
    "structure_mask",
    "structure_rank",
    "token_advantages",
    "validate_credit",
    "validate_fraction",
]

#: Allowed ``partition.key`` values.
PARTITION_KEYS: tuple[str, ...] = ("decode_step", "entropy")
#: Allowed ``partition.entropy_order`` values.
ENTROPY_ORDERS: tuple[str, ...] = ("ascending", "descending")
#: Allowed ``credit.kind`` values.
CREDIT_KINDS: tuple[str, ...] = ("binary", "soft", "uniform")
#: Allowed ``stages.mode`` values.
STAGE_MODES: tuple[str, ...] = ("inner", "outer")


def validate_fraction(value: float, key: str) -> float:
    """Return ``float(value)`` if it lies in ``(0, 1]``; otherwise raise ``ValueError`` naming ``key``.

    Used for ``partition.fraction`` and ``stages.scored_fraction``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):  # also rejects NaN
        raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    return v


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def structure_count(num_tokens: int, fraction: float) -> int:
    """``k = min(N, max(1, round(fraction * N)))`` (0 when ``N == 0``): the size of the structure set."""
    frac = validate_fraction(fraction, "partition.fraction")
    if num_tokens <= 0:
        return 0
    return min(int(num_tokens), max(1, _round_half_up(frac * num_tokens)))


# ---------------------------------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------------------------------
def _check_2d(name: str, t: Tensor, shape: torch.Size | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be (B, N), got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match {tuple(shape)}")


def _stable_order(keys: list[Tensor]) -> Tensor:
    """Per-row permutation sorting ascending by ``keys[0]``, ties by ``keys[1]``, ..., then by position."""
    B, N = keys[0].shape
    order = torch.arange(N, device=keys[0].device).expand(B, N).contiguous()
    # Least significant key first; stable sorts keep the earlier (less significant) order among ties.
    for key in reversed(keys):
        _, idx = torch.sort(key.gather(1, order), dim=1, stable=True)
        order = order.gather(1, idx)
    return order


def structure_rank(commit_step: Tensor | None, entropy: Tensor | None, confidence: Tensor | None,
                   key: str = "decode_step", entropy_order: str = "ascending") -> Tensor:
    """Rank of every token in its image's structure order (0 = first, i.e. most "structure").

    - ``key="decode_step"``: ascending ``commit_step`` (earliest committed first); ties (tokens committed in the
      same sampler step) by descending ``confidence``; remaining ties by position.
    - ``key="entropy"``: ``entropy`` ascending (``entropy_order="ascending"``, most certain first) or descending;
      ties by position.

    NaN keys sort last (NaN confidence counts as the lowest confidence). ``entropy`` / ``confidence`` may be
    ``None`` when the chosen key does not need them.

    Returns:
        ``(B, N)`` long tensor; each row is a permutation of ``0..N-1``.

    Raises:
        ValueError: unknown ``partition.key`` / ``partition.entropy_order`` or bad shapes.
    """
    if key not in PARTITION_KEYS:
        raise ValueError(f"partition.key must be one of {PARTITION_KEYS}, got {key!r}")
    if entropy_order not in ENTROPY_ORDERS:
        raise ValueError(f"partition.entropy_order must be one of {ENTROPY_ORDERS}, got {entropy_order!r}")
    if key == "decode_step":
        if commit_step is None:
            raise ValueError("partition.key='decode_step' needs the commit_step tensor")
        _check_2d("commit_step", commit_step)
        shape = commit_step.shape
        step = commit_step.to(torch.float64)
        step = torch.where(torch.isnan(step), torch.full_like(step, math.inf), step)
        if confidence is None:
            keys = [step]
        else:
            _check_2d("confidence", confidence, shape)
            conf = confidence.to(torch.float64)
            neg = torch.where(torch.isnan(conf), torch.full_like(conf, math.inf), -conf)
            keys = [step, neg]
    else:
        if entropy is None:
            raise ValueError("partition.key='entropy' needs the entropy tensor")
        _check_2d("entropy", entropy)
        shape = entropy.shape
        ent = entropy.to(torch.float64)
        ent = ent if entropy_order == "ascending" else -ent
        keys = [torch.where(torch.isnan(ent), torch.full_like(ent, math.inf), ent)]
    B, N = shape
    order = _stable_order(keys)
    rank = torch.empty((B, N), dtype=torch.long, device=order.device)
    rank.scatter_(1, order, torch.arange(N, device=order.device).expand(B, N).contiguous())
    return rank


def structure_mask(commit_step: Tensor | None, entropy: Tensor | None, confidence: Tensor | None,
                   key: str = "decode_step", fraction: float = 0.25, entropy_order: str = "ascending") -> Tensor:
    """Structure set ``S`` per image: the first ``k = round(fraction * N)`` (at least 1) tokens of
    :func:`structure_rank`'s order, i.e. ``S = {i : rank_i < k}``. Returns a ``(B, N)`` bool mask.

    Raises:
        ValueError: ``partition.fraction`` outside ``(0, 1]``, or as :func:`structure_rank`.
    """
    validate_fraction(fraction, "partition.fraction")
    rank = structure_rank(commit_step, entropy, confidence, key=key, entropy_order=entropy_order)
    return rank < structure_count(rank.shape[1], fraction)


# ---------------------------------------------------------------------------------------------------------------
# credit
# ---------------------------------------------------------------------------------------------------------------
def validate_credit(kind: str, alpha: float, gamma: float) -> tuple[str, float, float]:
    """The one range check of the credit keys (used by :func:`credit_weights` and the HT-GRPO module alike).

    ``credit.kind`` in ``CREDIT_KINDS``; ``credit.alpha`` a finite number ``>= 0`` (structure tokens get at least
    the refinement tokens' credit); ``credit.gamma`` a finite number ``> 0`` (``gamma = 0`` would make ``soft``
    uniform). Returns ``(kind, float(alpha), float(gamma))``.

    Raises:
        ConfigError: (a ``ValueError``) naming the offending ``credit.*`` key.
    """
    if kind not in CREDIT_KINDS:
        raise ConfigError("credit.kind", f"must be one of {list(CREDIT_KINDS)}, got {kind!r}")
    values = []
    for key, value, ok, bound in (("credit.alpha", alpha, lambda v: v >= 0.0, ">= 0"),
                                  ("credit.gamma", gamma, lambda v: v > 0.0, "> 0")):
        try:
            v = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            v = math.nan
        if not (math.isfinite(v) and ok(v)):
            raise ConfigError(key, f"must be a finite number {bound}, got {value!r}")
        values.append(v)
    return kind, values[0], values[1]


def credit_weights(rank: Tensor, structure: Tensor, kind: str = "binary", alpha: float = 1.0, gamma: float = 1.0,
                   normalize: bool = True) -> Tensor:
    """Per-token credit weights ``w`` (``(B, N)`` float32).

    - ``binary``:  ``w_i = 1 + alpha`` if ``i in S`` else ``1``;
    - ``soft``:    ``w_i = 1 + alpha * (1 - rank_i / N) ** gamma`` (rank 0 gets ``1 + alpha``; ``structure`` unused);
    - ``uniform``: ``w_i = 1``.

    With ``normalize``: ``w_i <- w_i / mean_j(w_j)`` per image, so each image's weights average 1.

    Raises:
        ValueError: a credit key out of range (:func:`validate_credit`); bad shapes.
    """
    kind, alpha, gamma = validate_credit(kind, alpha, gamma)
    _check_2d("rank", rank)
    B, N = rank.shape
    if kind == "uniform":
        return torch.ones((B, N), dtype=torch.float32, device=rank.device)
    if kind == "binary":
        _check_2d("structure", structure, rank.shape)
        w = torch.where(structure.bool(), torch.full((B, N), 1.0 + float(alpha), device=rank.device),
                        torch.ones((B, N), device=rank.device))
    else:  # soft
        r = rank.to(torch.float32)
        w = 1.0 + float(alpha) * (1.0 - r / max(N, 1)).clamp(min=0.0) ** float(gamma)
    if normalize and N > 0:
        w = w / w.mean(dim=1, keepdim=True)
    return w.to(torch.float32)


def token_advantages(image_advantages: Tensor, weights: Tensor) -> Tensor:
    """Token advantages ``A_hat_bi = A_b * w_bi`` (``(B,)`` x ``(B, N)`` -> ``(B, N)``)."""
    if image_advantages.dim() != 1 or weights.dim() != 2 or weights.shape[0] != image_advantages.shape[0]:
        raise ValueError(f"expected image_advantages (B,) and weights (B, N), got {tuple(image_advantages.shape)} "
                         f"and {tuple(weights.shape)}")
    return image_advantages[:, None].to(weights.dtype) * weights


# ---------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------
class Stage(str, Enum):
    """Sketch-Then-Paint stage: which tokens are candidates for scoring."""

    GLOBAL = "global"        #: all tokens
    STRUCTURE = "structure"  #: structure set S
    REFINE = "refine"        #: refinement set R


@dataclass(frozen=True)
class StageSchedule:
    """Which stage is active, in one of two modes.

    ``mode="inner"`` (the HT-GRPO figure): one rollout batch gets ``K = n_global + n_struct + n_refine`` inner
    iterations (policy updates on the same rollouts); 0-based inner iteration ``k`` is::

        GLOBAL     if k < n_global
        STRUCTURE  if k < n_global + n_struct
        REFINE     otherwise                     (k < K)

    The global step is ignored. E.g. (2, 2, 2) -> G G S S R R for every batch.

    ``mode="outer"`` (curriculum): every inner iteration of a rollout batch uses the same stage, chosen by the
    global step. Stage lengths in global steps are ``n_global * s``, ``n_struct * s``, ``n_refine * s`` with
    ``s = steps_per_stage or 1``, and the sequence repeats cyclically::

        p = global_step mod ((n_global + n_struct + n_refine) * s)
        GLOBAL if p < n_global * s;  STRUCTURE if p < (n_global + n_struct) * s;  REFINE otherwise

    E.g. (1, 1, 1), s = 2 -> steps 0,1: G; 2,3: S; 4,5: R; 6,7: G; ... The inner iteration is ignored.
    :attr:`num_inner_iterations` is ``n_global + n_struct + n_refine`` in both modes, so ``outer`` spends the same
    number of updates per batch as ``inner``. ``steps_per_stage`` has no effect in ``inner`` mode.

    A stage whose count is 0 is skipped. Baselines without stages: ``StageSchedule(K, 0, 0)``.
    """

    n_global: int = 2
    n_struct: int = 2
    n_refine: int = 2
    mode: str = "inner"
    steps_per_stage: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the offending ``stages.*`` key.

        Counts must be true integers: ``1.5`` fails (it is never truncated to 1)."""
        for name in ("n_global", "n_struct", "n_refine"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"stages.{name}", f"must be an integer >= 0, got {v!r}")
        if self.n_global + self.n_struct + self.n_refine < 1:
            raise ConfigError("stages", "stages.n_global + stages.n_struct + stages.n_refine must be >= 1, got 0")
        if self.mode not in STAGE_MODES:
            raise ConfigError("stages.mode", f"must be one of {list(STAGE_MODES)}, got {self.mode!r}")
        s = self.steps_per_stage
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ConfigError("stages.steps_per_stage", f"must be None or an integer >= 1, got {s!r}")

    @property
    def num_inner_iterations(self) -> int:
        """``K = n_global + n_struct + n_refine`` inner iterations per rollout batch."""
        return self.n_global + self.n_struct + self.n_refine

    def _pick(self, pos: int, unit: int) -> Stage:
        if pos < self.n_global * unit:
            return Stage.GLOBAL
        if pos < (self.n_global + self.n_struct) * unit:
            return Stage.STRUCTURE
        return Stage.REFINE

    def stage_for(self, inner_iteration: int, global_step: int) -> Stage:
        """Stage of 0-based ``inner_iteration`` (in ``[0, K)``) of the batch at ``global_step`` (>= 0)."""
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        if not 0 <= inner_iteration < self.num_inner_iterations:
            raise ValueError(f"inner_iteration must be in [0, {self.num_inner_iterations}), got {inner_iteration}")
        if self.mode == "inner":
            return self._pick(inner_iteration, 1)
        unit = self.steps_per_stage or 1
        return self._pick(global_step % (self.num_inner_iterations * unit), unit)

    def stages(self, global_step: int) -> tuple[Stage, ...]:
        """The stages of all ``K`` inner iterations of the batch at ``global_step``."""
        return tuple(self.stage_for(k, global_step) for k in range(self.num_inner_iterations))


def stage_candidates(stage: Stage | str, structure: Tensor) -> Tensor:
    """Candidate tokens of a stage: GLOBAL -> all tokens, STRUCTURE -> ``S``, REFINE -> ``R = not S``."""
    stage = Stage(stage)
    s = structure.bool()
    if stage is Stage.GLOBAL:
        return torch.ones_like(s)
    if stage is Stage.STRUCTURE:
        return s.clone()
    return ~s


def sample_scored(candidates: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Per image, a uniformly random subset of ``k_b = round(fraction * c_b)`` of its ``c_b`` candidates
    (``k_b >= 1`` when ``c_b >= 1``; ``k_b = 0`` otherwise). ``fraction == 1`` returns the candidates exactly.

    Sampling: iid uniforms are drawn for every position (from ``generator``, on its device), non-candidates are
    pushed last, and the ``k_b`` smallest are kept -- a uniform random ``k_b``-subset. With a seeded generator the
    result is reproducible.

    Raises:
        ValueError: ``stages.scored_fraction`` outside ``(0, 1]``.
    """
    frac = validate_fraction(fraction, "stages.scored_fraction")
    _check_2d("candidates", candidates)
    cand = candidates.bool()
    if frac == 1.0:
        return cand.clone()
    B, N = cand.shape
    count = cand.sum(dim=1)
    k = torch.floor(count.to(torch.float64) * frac + 0.5).to(torch.long)
    k = torch.minimum(torch.where(count > 0, k.clamp(min=1), torch.zeros_like(k)), count)
    if generator is not None:
        u = torch.rand((B, N), generator=generator, device=generator.device).to(cand.device)
    else:
        u = torch.rand((B, N), device=cand.device)
    u = torch.where(cand, u, torch.full_like(u, 2.0))
    order = torch.argsort(u, dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=cand.device).expand(B, N).contiguous())
    return (rank < k[:, None]) & cand
