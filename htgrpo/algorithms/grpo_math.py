"""GRPO arithmetic as small pure torch functions (names follow TRL's ``GRPOTrainer``).

Everything here is stateless and device-agnostic; the training module composes these pieces:

- :func:`group_advantages`: group-normalised advantages from scalar rewards laid out group-contiguously
  (samples ``g*G .. g*G+G-1`` belong to group ``g``), with NaN/inf rewards and zero-variance groups handled
  explicitly and counted.
- :func:`clipped_surrogate`: the per-token PPO/GRPO clipped surrogate ``-min(r*A, clip(r, 1-eps, 1+eps_high)*A)``
  and TRL's low/high clip masks.
- :func:`k3_kl`: the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1``.
- :func:`aggregate_loss` / :func:`masked_mean`: token-mean or sequence-mean reduction over scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "GroupAdvantages",
    "SurrogateTerms",
    "aggregate_loss",
    "clipped_surrogate",
    "group_advantages",
    "k3_kl",
    "masked_mean",
]

#: Allowed values of ``scale_rewards`` (TRL names).
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
#: Allowed values of ``loss_type``.
LOSS_TYPES: tuple[str, ...] = ("token_mean", "seq_mean")


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupAdvantages:
    """Result of :func:`group_advantages`.

    Attributes:
        advantages: ``(B*G,)`` per-sample advantages (exactly 0 for non-finite rewards and zero-variance groups).
        zero_variance_groups: groups whose finite rewards are all equal, or that have fewer than 2 finite rewards.
        num_groups: ``B``, the number of groups.
        nonfinite_rewards: how many rewards were NaN or +-inf.
    """

    advantages: Tensor
    zero_variance_groups: int
    num_groups: int
    nonfinite_rewards: int

    @property
    def zero_variance_fraction(self) -> float:
        """``zero_variance_groups / num_groups`` (0.0 for an empty batch)."""
        return self.zero_variance_groups / self.num_groups if self.num_groups > 0 else 0.0


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> GroupAdvantages:
    """Group-normalised GRPO advantages.

    Rewards are group-contiguous: ``rewards.view(B, G)`` with ``G = num_generations``. For sample ``i`` of group
    ``g``, using only the *finite* rewards of the group (``n_g`` of them)::

        mean_g = (1/n_g) * sum_j r_gj
        std_g  = sqrt( (1/(n_g - 1)) * sum_j (r_gj - mean_g)^2 )        # unbiased, like TRL's torch.std
        A_gi   = (r_gi - mean_g) / (std_g + eps)     if scale_rewards == "group"
        A_gi   = (r_gi - mean_g) / (std_B + eps)     if scale_rewards == "batch"  (std_B: unbiased std of
                                                                                   all finite rewards in the batch)
        A_gi   =  r_gi - mean_g                      if scale_rewards == "none"

    Special cases (all give an advantage of exactly 0):

    - a non-finite reward (NaN, +-inf): excluded from its group's mean/std and counted in ``nonfinite_rewards``;
    - a zero-variance group (all its finite rewards are exactly equal, or it has fewer than 2 finite rewards):
      every sample of the group gets 0, and the group is counted in ``zero_variance_groups``.

    Args:
        rewards: ``(B*G,)`` rewards, group-contiguous.
        num_generations: ``G``, the group size (>= 1).
        scale_rewards: one of :data:`SCALE_REWARDS`.
        eps: added to the std before dividing.

    Raises:
        ValueError: unknown ``scale_rewards``; ``num_generations < 1``; ``len(rewards)`` not divisible by it.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if int(num_generations) < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    G = int(num_generations)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % G != 0:
        raise ValueError(f"len(rewards)={rewards.numel()} is not divisible by num_generations={G}")

    r = rewards if rewards.is_floating_point() else rewards.float()
    grouped = r.reshape(-1, G)
    num_groups = grouped.shape[0]
    finite = torch.isfinite(grouped)
    n = finite.sum(dim=1)  # finite rewards per group
    safe = torch.where(finite, grouped, torch.zeros_like(grouped))
    mean = safe.sum(dim=1) / n.clamp(min=1).to(r.dtype)
    dev = torch.where(finite, grouped - mean[:, None], torch.zeros_like(grouped))
    var = (dev * dev).sum(dim=1) / (n - 1).clamp(min=1).to(r.dtype)
    std = var.sqrt()

    hi = torch.where(finite, grouped, torch.full_like(grouped, -float("inf"))).amax(dim=1)
    lo = torch.where(finite, grouped, torch.full_like(grouped, float("inf"))).amin(dim=1)
    zero_var = (n < 2) | (hi == lo)

    if scale_rewards == "group":
        adv = dev / (std[:, None] + eps)
    elif scale_rewards == "batch":
        flat = r[torch.isfinite(r)]
        if flat.numel() >= 2:
            batch_std = (((flat - flat.mean()) ** 2).sum() / (flat.numel() - 1)).sqrt()
        else:
            batch_std = torch.zeros((), dtype=r.dtype, device=r.device)
        adv = dev / (batch_std + eps)
    else:  # "none"
        adv = dev

    keep = finite & ~zero_var[:, None]
    adv = torch.where(keep, adv, torch.zeros_like(adv)).reshape(-1)
    return GroupAdvantages(
        advantages=adv,
        zero_variance_groups=int(zero_var.sum().item()),
        num_groups=int(num_groups),
        nonfinite_rewards=int((~finite).sum().item()),
    )


# ---------------------------------------------------------------------------------------------------------------
# surrogate and KL
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurrogateTerms:
    """Per-token pieces of the clipped surrogate (all the shape of ``logp``).

    Attributes:
        loss: ``-min(r*A, clip(r, 1-eps, 1+eps_high)*A)``.
        ratio: ``r = exp(logp - old_logp)``.
        clipped_low: ``(r < 1-eps) & (A < 0)`` (TRL's ``is_low_clipped``: the clip is active on the low side).
        clipped_high: ``(r > 1+eps_high) & (A > 0)`` (TRL's ``is_high_clipped``).
    """

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor

    @property
    def clipped(self) -> Tensor:
        """Tokens where either clip is active (TRL's ``is_region_clipped``)."""
        return self.clipped_low | self.clipped_high


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, epsilon: float = 0.2,
                      epsilon_high: float | None = None) -> SurrogateTerms:
    """Per-token GRPO/PPO clipped surrogate loss.

    With ``r = exp(logp - old_logp)`` and ``eps_high = epsilon_high if given else epsilon``::

        loss = -min(r * A, clip(r, 1 - eps, 1 + eps_high) * A)

    ``advantages`` must broadcast to ``logp`` (pass per-token advantages of the same shape). The clip masks follow
    TRL: ``clipped_low = (r < 1 - eps) & (A < 0)``, ``clipped_high = (r > 1 + eps_high) & (A > 0)``.

    Raises:
        ValueError: a negative ``epsilon`` or ``epsilon_high``.
    """
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if eps_low < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if eps_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return SurrogateTerms(loss=loss, ratio=ratio, clipped_low=low, clipped_high=high)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (Schulman), always >= 0::

        d  = ref_logp - logp
        kl = exp(d) - d - 1
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------
def _as_weight(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(like.shape)}")
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


def _masked_values(x: Tensor, m: Tensor) -> Tensor:
    # x*m, but positions with m == 0 contribute exactly 0 even if x is NaN/inf there.
    return torch.where(m != 0, x * m, torch.zeros_like(x * m))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set::

        masked_mean = sum(x * mask) / sum(mask)      (0 where sum(mask) == 0)

    ``mask`` may be bool or float (a float mask acts as weights). Values at unmasked positions are ignored even if
    they are NaN/inf. With ``dim`` the reduction is along that dimension only.
    """
    m = _as_weight(mask, x)
    num = _masked_values(x, m)
    if dim is None:
        total, count = num.sum(), m.sum()
    else:
        total, count = num.sum(dim=dim), m.sum(dim=dim)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: str = "token_mean") -> Tensor:
    """Reduce a ``(B, N)`` per-token loss over its scored tokens (``mask``) to a scalar.

    - ``"token_mean"``: ``sum_{b,i} loss_bi * m_bi / max(sum_{b,i} m_bi, 1)`` -- every scored token in the batch
      counts equally (TRL's ``bnpo``-style token mean over the whole batch).
    - ``"seq_mean"``: ``mean_{b: n_b > 0} ( sum_i loss_bi * m_bi / n_b )`` with ``n_b = sum_i m_bi`` -- each
      sequence with at least one scored token counts equally (TRL's ``grpo`` loss). 0 if no token is scored.

    Raises:
        ValueError: unknown ``loss_type`` (allowed: :data:`LOSS_TYPES`), or a shape mismatch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if per_token.dim() != 2:
        raise ValueError(f"per_token must be (B, N), got shape {tuple(per_token.shape)}")
    m = _as_weight(mask, per_token)
    num = _masked_values(per_token, m)
    if loss_type == "token_mean":
        return num.sum() / m.sum().clamp(min=1.0)
    counts = m.sum(dim=1)
    has = counts > 0
    per_seq = num.sum(dim=1) / torch.where(has, counts, torch.ones_like(counts))
    n_seq = has.sum()
    if int(n_seq.item()) == 0:
        return num.sum() * 0.0  # keeps the autograd graph alive
    return torch.where(has, per_seq, torch.zeros_like(per_seq)).sum() / n_seq.to(per_seq.dtype)
