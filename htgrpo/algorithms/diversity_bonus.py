"""Group-diversity reward shaping (``algorithm.diversity_bonus``): a counter to mode collapse under a reward that is
blind to part of what the prompt leaves free (colour, on ShapesWorld's GenEval prompts that name none).

Why: GenEval's ``single_object``, ``two_object``, ``counting`` and ``position`` prompts name no colour, so the
reward cannot tell a green scene from a brown one. GRPO then drifts every prompt's images onto one colour (the
colour collapse measured in ``experiments/shapes_geneval/README.md``). A KL to the start (``beta``) holds the colours
but also holds back the layout the reward asks for. This term rewards, within each group of G images of one prompt,
an image for differing from its siblings, so the group baseline itself pays for spread; the reward still decides
everything it can see.

Rule, per image ``i`` of group ``g`` (G images of one prompt, laid out group-contiguously as in
:func:`~htgrpo.algorithms.grpo_math.group_advantages`)::

    h_i      = colour histogram of image i: share of its pixels in each of levels^3 RGB cells (sums to 1)
    d(i, j)  = ½ · Σ_c |h_i[c] − h_j[c]|                   (total-variation distance, in [0, 1])
    bonus_i  = 1/(G − 1) · Σ_{j ∈ g, j ≠ i} d(i, j)         (scope=group: mean distance to its siblings, in [0, 1])
    bonus_i  = 1/(N − 1) · Σ_{j ≠ i} d(i, j)                (scope=batch: to every other image of the N = B·G)
    shaped_i = reward_i + weight · bonus_i                  (NaN stays NaN: a failed score is not rescued)

``scope=group`` pays for spread among a prompt's images (per-prompt diversity); ``scope=batch`` pays an image for
colours that are rare in the whole rollout batch, which also flattens the colour distribution across prompts (the
colour divergence). The shaped reward feeds the advantages; the unshaped reward is what ``val/*`` and the benchmarks measure.
The histogram works on any RGB image (no model, no download); with ``levels = 4`` the 11 ShapesWorld palette
colours fall in 11 different cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from htgrpo.config import ConfigError, require

#: Image features the bonus can compare (``diversity_bonus.feature``).
FEATURES: tuple[str, ...] = ("color_histogram",)
#: Which images an image is compared with (``diversity_bonus.scope``).
SCOPES: tuple[str, ...] = ("group", "batch")


def color_histogram(images: Tensor, levels: int = 4) -> Tensor:
    """Per image, the share of its pixels in each cell of an RGB grid of ``levels`` steps per channel.

    ``cell(r, g, b) = (r·L // 256)·L² + (g·L // 256)·L + (b·L // 256)`` for ``L = levels``.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        levels: steps per channel, in [1, 256].

    Returns:
        ``(N, levels**3)`` float32, each row summing to 1.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if not 1 <= int(levels) <= 256:
        raise ValueError(f"levels must be in [1, 256], got {levels}")
    q = (images.to(torch.int64) * int(levels)) // 256                      # (N, 3, H, W) in [0, L)
    cells = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]                # (N, H, W)
    flat = cells.reshape(cells.shape[0], -1)
    counts = torch.zeros(flat.shape[0], int(levels) ** 3, dtype=torch.float32)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / float(flat.shape[1])


def group_diversity_bonus(features: Tensor, num_generations: int) -> Tensor:
    """``bonus_i = 1/(G−1) · Σ_{j≠i in i's group} ½·‖f_i − f_j‖₁`` for group-contiguous ``(B·G, D)`` features.

    With histograms (rows summing to 1) each distance is a total-variation distance in [0, 1], so the bonus is too.
    A group of identical images gets 0 everywhere; one image unlike its G−1 identical siblings gets d, they get
    d/(G−1) each.
    """
    G = int(num_generations)
    if G < 2:
        raise ValueError(f"num_generations must be >= 2, got {num_generations}")
    if features.dim() != 2 or features.shape[0] % G:
        raise ValueError(f"features must be (B*G, D) with B*G divisible by G={G}, got {tuple(features.shape)}")
    f = features.to(torch.float32).reshape(-1, G, features.shape[1])       # (B, G, D)
    dist = 0.5 * torch.cdist(f, f, p=1)                                     # (B, G, G), zero diagonal
    return (dist.sum(-1) / (G - 1)).reshape(-1)


def batch_diversity_bonus(features: Tensor) -> Tensor:
    """``bonus_i = 1/(N−1) · Σ_{j≠i} ½·‖f_i − f_j‖₁`` over all ``N`` rows (scope ``batch``; 0 for a single row)."""
    n = features.shape[0]
    if n < 2:
        return torch.zeros(n)
    f = features.to(torch.float32)
    return 0.5 * torch.cdist(f[None], f[None], p=1)[0].sum(-1) / (n - 1)


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean ``½·‖f_i − f_j‖₁`` over all ordered pairs ``i ≠ j`` of a batch (across prompts; NaN below 2 rows)."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    f = features.to(torch.float32)
    return float(0.5 * torch.cdist(f, f, p=1).sum() / (n * (n - 1)))


@dataclass(frozen=True)
class RolloutColorSpread:
    """How spread a rollout batch's colours are, logged every step whatever the bonus weight (so *when* a run
    collapses shows in TensorBoard): ``within_group``, the mean bonus (colour-histogram distance between images of
    one prompt); ``across_batch``, the same distance over all pairs of the batch."""

    within_group: float
    across_batch: float
    top_color_pixel_share: float = float("nan")

    @staticmethod
    def of(features: Tensor, group_bonus: Tensor) -> "RolloutColorSpread":
        """From a rollout's features and their :func:`group_diversity_bonus` (computed once by the caller, who
        also shapes the reward with it)."""
        return RolloutColorSpread(float(group_bonus.mean()), mean_pairwise_distance(features),
                                  top_color_pixel_share(features))

    def log(self) -> dict[str, float]:
        return {"train/diversity/group_color_distance": self.within_group,
                "train/diversity/batch_color_distance": self.across_batch,
                "train/diversity/top_color_pixel_share": self.top_color_pixel_share}


def top_color_pixel_share(histograms: Tensor) -> float:
    """Share of all the batch's pixels in its most common histogram cell *after* the most common one.

    The most common cell is the background on ShapesWorld (grey), so this is the share of the canvas painted in the
    dominant object colour: the issue's "brown 38% of all pixels" measure (about 0.06 at the warm start).
    """
    totals = histograms.to(torch.float64).mean(0)
    if totals.numel() < 2:
        return float("nan")
    return float(torch.topk(totals, 2).values[1])


@dataclass(frozen=True)
class DiversityBonus:
    """``algorithm.diversity_bonus``: ``weight`` (λ ≥ 0; 0 = off, the default), ``feature`` (one of
    :data:`FEATURES`), ``levels`` (histogram steps per channel), ``scope`` (one of :data:`SCOPES`)."""

    weight: float = 0.0
    feature: str = "color_histogram"
    levels: int = 4
    scope: str = "group"

    @staticmethod
    def from_config(node: Mapping[str, Any] | None) -> "DiversityBonus":
        """Validated settings; a bad value raises :class:`~htgrpo.config.ConfigError` naming its key."""
        node = dict(node or {})
        unknown = set(node) - {"weight", "feature", "levels", "scope"}
        require(not unknown, "diversity_bonus",
                f"unknown keys {sorted(unknown)}; expected weight, feature, levels, scope")
        try:
            weight = float(node.get("weight", 0.0))
        except (TypeError, ValueError):
            raise ConfigError("diversity_bonus.weight", f"must be a number >= 0, got {node.get('weight')!r}") from None
        require(weight >= 0 and weight == weight and weight != float("inf"), "diversity_bonus.weight",
                f"must be a finite number >= 0, got {weight}")
        feature = str(node.get("feature", "color_histogram"))
        require(feature in FEATURES, "diversity_bonus.feature", f"must be one of {FEATURES}, got {feature!r}")
        levels = node.get("levels", 4)
        require(isinstance(levels, int) and not isinstance(levels, bool) and 1 <= levels <= 16,
                "diversity_bonus.levels", f"must be an integer in [1, 16], got {levels!r}")
        scope = str(node.get("scope", "group"))
        require(scope in SCOPES, "diversity_bonus.scope", f"must be one of {SCOPES}, got {scope!r}")
        return DiversityBonus(weight, feature, int(levels), scope)

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def features(self, images: Tensor) -> Tensor:
        """``(B·G, D)`` features of a rollout's uint8 images."""
        return color_histogram(images, self.levels)

    def bonus_of(self, features: Tensor, group_bonus: Tensor) -> Tensor:
        """``(B·G,)`` bonus (before the weight) by ``scope``: the rollout's :func:`group_diversity_bonus` as given,
        or the batch bonus of its features."""
        return batch_diversity_bonus(features) if self.scope == "batch" else group_bonus
