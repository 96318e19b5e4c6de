"""MAR-GRPO arithmetic as small pure torch functions (SPEC §5, reference/mar_grpo.md §1.5-§1.9, §3, §4).

A MAR-style policy emits, per image token, an AR latent ``z``; a (frozen) diffusion head turns ``z`` into the
continuous token through a chain of Gaussian transitions ``x_t -> x_{t-1}``. The policy log-probability of a token
is therefore a sum of Gaussian log-densities whose means depend on ``z``. The pieces here compose the training loss;
the GRPO-generic parts (advantages, clipped surrogate, aggregation) are reused from
:mod:`htgrpo.algorithms.grpo_math`.

Shapes used throughout: ``T`` diffusion steps, ``S`` extra MTE chains, ``B`` images, ``N`` (or ``L``) tokens per
image, ``D`` channels per token.

- :func:`gaussian_log_prob`: log N(x; mean, exp(log_variance)) of one transition, reduced over channels.
- :func:`chain_log_prob`: per-step log-probs of one chain -> one per-token term (mean over the scored steps).
- :func:`token_uncertainty`: std over S fresh-noise chains of the final sample, channel-averaged.
- :func:`top_k_percent_mask`: the k% most uncertain tokens (per image), exact count, deterministic ties.
- :func:`multi_trajectory_log_prob`: the MTE term (chain-averaged) on uncertain tokens, the single term elsewhere.
- :func:`consistency_mask`: keep a token when cos(proposal_i, final) - cos(proposal_{i-1}, final) > tau.
- :func:`selection_masks`: the policy / KL token masks of one AR step, incl. the Harmon mask-offset quirk.
- :func:`gaussian_mean_kl`: KL between same-variance Gaussians, or the released ``exp(d) - d - 1`` on means.
- :func:`importance_ratio`: the released detach ratio ``exp(logp - sg(logp))`` or the PPO ratio.
- :func:`mar_grpo_loss`: clipped surrogate + beta * KL with token masks, aggregated with ``aggregate_loss``.

How this reproduces the released Harmon loss (reference §1.6): the release keeps log-probs elementwise
``[k*B, L, D]`` and divides ``sum(A * exp(logp - sg logp) * mask)`` by ``k * (#masked tokens)``, i.e. it *sums*
over the D channels and *averages* over the k scored diffusion steps and the tokens. ``gaussian_log_prob(...,
reduce="sum")`` -> ``chain_log_prob(..., reduce="mean")`` -> ``mar_grpo_loss(..., ratio_mode="released",
loss_type="token_mean")`` gives exactly the same gradient (and the KL gets the same normalisation). The release
back-propagates each of its 12 AR steps separately, so gradients *sum* over AR steps; that is the caller's business.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from htgrpo.algorithms.grpo_math import LOSS_TYPES, aggregate_loss, clipped_surrogate, masked_mean

__all__ = [
    "CHANNEL_REDUCTIONS",
    "KL_TYPES",
    "MTE_MODES",
    "RATIO_MODES",
    "STD_CLAMPS",
    "STEP_REDUCTIONS",
    "TOP_K_ROUNDINGS",
    "MarGrpoLoss",
    "SelectionMasks",
    "chain_log_prob",
    "consistency_mask",
    "gaussian_log_prob",
    "gaussian_mean_kl",
    "importance_ratio",
    "mar_grpo_loss",
    "multi_trajectory_log_prob",
    "selection_masks",
    "token_uncertainty",
    "top_k_count",
    "top_k_percent_mask",
]

#: Channel reductions of :func:`gaussian_log_prob` / :func:`gaussian_mean_kl` (``"none"`` keeps channels).
CHANNEL_REDUCTIONS: tuple[str, ...] = ("sum", "mean", "none")
#: Diffusion-step reductions of :func:`chain_log_prob`.
STEP_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
#: Rounding rules of :func:`top_k_count`.
TOP_K_ROUNDINGS: tuple[str, ...] = ("floor", "round")
#: How :func:`multi_trajectory_log_prob` averages the S chains.
MTE_MODES: tuple[str, ...] = ("mean_log_prob", "log_mean_prob")
#: KL forms of :func:`gaussian_mean_kl`.
KL_TYPES: tuple[str, ...] = ("gaussian", "released")
#: How ``min_std`` bounds the std in :func:`gaussian_log_prob` (``released``: the variance in the division).
STD_CLAMPS: tuple[str, ...] = ("released", "std")
#: Ratio forms of :func:`importance_ratio`.
RATIO_MODES: tuple[str, ...] = ("released", "ppo")

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _reduce_channels(x: Tensor, reduce: str) -> Tensor:
    _check_choice("reduce", reduce, CHANNEL_REDUCTIONS)
    if reduce == "sum":
        return x.sum(dim=-1)
    if reduce == "mean":
        return x.mean(dim=-1)
    return x


# ---------------------------------------------------------------------------------------------------------------
# per-transition and per-chain log-probabilities
# ---------------------------------------------------------------------------------------------------------------
def gaussian_log_prob(x: Tensor, mean: Tensor, log_variance: Tensor | float, reduce: str = "sum",
                      min_std: float | None = None, clamp: str = "std") -> Tensor:
    """Per-token log-density of one Gaussian transition, reduced over the channel (last) dim.

    Elementwise, with ``s = exp(log_variance / 2)`` (``s = max(s, min_std)`` if ``min_std`` is given)::

        lp_c = -(x_c - mean_c)^2 / (2 s_c^2) - log s_c - 0.5 * log(2*pi)

    ``clamp="released"`` bounds the variance instead of the std in the division, with the same constant, as the
    released code does (``(std**2).clamp(1e-6)`` there, ``std.clamp(1e-6)`` in the log)::

        lp_c = -(x_c - mean_c)^2 / (2 max(s_c^2, min_std)) - log max(s_c, min_std) - 0.5 * log(2*pi)

    and per token ``sum_c lp_c`` (``reduce="sum"``, default), ``mean_c lp_c`` (``"mean"``) or ``lp`` itself
    (``"none"``). ``"sum"`` is the exact log N(x; mean, diag(s^2)) of the D-dim token, so its gradient is the
    policy-gradient score. The released code keeps ``lp`` elementwise and normalises by the mask count (reference
    §1.6 item 9): Harmon's mask is ``[.., L, 1]`` against a ``[.., L, 16]`` loss, i.e. channel-*sum* per token
    (identical to ``"sum"``); NOVA's mask is channel-expanded, i.e. channel-*mean* (``"mean"``: a 1/D-scaled
    gradient). Flow-GRPO / DanceGRPO take the mean over all non-batch dims (reference §3).

    In the release the std is the *stored rollout std* (temperature included), clamped to ``>= 1e-6`` (§1.5); pass
    it as ``log_variance = 2 * log(std)`` and ``min_std=1e-6`` to match. Gradients flow through ``mean`` (and
    ``log_variance`` if it requires grad).

    Args:
        x: ``(..., D)`` the sample ``x_{t-1}``.
        mean: ``(..., D)`` the transition mean ``mu_theta(x_t, t, z)``.
        log_variance: log s^2, broadcastable to ``x`` (tensor or float).
        reduce: one of :data:`CHANNEL_REDUCTIONS`.
        min_std: optional lower bound on ``s``.

    Raises:
        ValueError: unknown ``reduce``; ``min_std <= 0``; ``x`` / ``mean`` shape mismatch.
    """
    _check_choice("reduce", reduce, CHANNEL_REDUCTIONS)
    if x.shape != mean.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} does not match x shape {tuple(x.shape)}")
    lv = torch.as_tensor(log_variance, dtype=mean.dtype, device=mean.device)
    log_std = 0.5 * lv
    if min_std is not None:
        if not float(min_std) > 0:
            raise ValueError(f"min_std must be > 0, got {min_std}")
        log_std = torch.clamp(log_std, min=math.log(float(min_std)))
    _check_choice("clamp", clamp, STD_CLAMPS)
    log_var_div = 2.0 * log_std
    if min_std is not None and clamp == "released":
        log_var_div = torch.clamp(lv, min=math.log(float(min_std)))
    lp = -((x - mean) ** 2) * torch.exp(-log_var_div) / 2.0 - log_std - _HALF_LOG_2PI
    return _reduce_channels(lp, reduce)


def chain_log_prob(step_log_probs: Tensor, step_mask: Tensor | None = None, reduce: str = "mean") -> Tensor:
    """Combine the per-diffusion-step log-probs of one chain (step dim first) into one per-token term.

    With ``m_t`` the scored steps (``step_mask``, all steps if ``None``)::

        "mean" (default):  term = sum_t m_t * lp_t / sum_t m_t        (0 where no step is scored)
        "sum":             term = sum_t m_t * lp_t

    The release (reference §1.5, §1.6 item 8) scores ``k = min(10, T)`` random steps of the chain and divides the
    summed element loss by ``k * #tokens``: a *mean over the scored steps* -- hence the default. ``"sum"`` is the
    log-probability of the scored transitions jointly (the full chain log-likelihood when every step is scored);
    in the released single-update form it only rescales the gradient by ``k``, but in a PPO ratio it multiplies the
    per-step ratios together. Values at unscored steps are ignored even if NaN/inf. The same reduction applies to
    per-step KL terms.

    Args:
        step_log_probs: ``(T, ...)`` per-step per-token log-probs (e.g. from :func:`gaussian_log_prob`).
        step_mask: bool/float, ``(T,)`` or the shape of ``step_log_probs``.
        reduce: one of :data:`STEP_REDUCTIONS`.

    Raises:
        ValueError: unknown ``reduce``; 0-dim input; a ``step_mask`` of another shape.
    """
    _check_choice("reduce", reduce, STEP_REDUCTIONS)
    if step_log_probs.dim() == 0:
        raise ValueError("step_log_probs must have a leading step dim, got a 0-dim tensor")
    if step_mask is None:
        return step_log_probs.mean(dim=0) if reduce == "mean" else step_log_probs.sum(dim=0)
    if step_mask.shape != step_log_probs.shape:
        if step_mask.shape != step_log_probs.shape[:1]:
            raise ValueError(f"step_mask must be (T,)={tuple(step_log_probs.shape[:1])} or "
                             f"{tuple(step_log_probs.shape)}, got {tuple(step_mask.shape)}")
        view = (-1,) + (1,) * (step_log_probs.dim() - 1)
        step_mask = step_mask.reshape(view).expand_as(step_log_probs)
    if reduce == "mean":
        return masked_mean(step_log_probs, step_mask, dim=0)
    m = step_mask.to(step_log_probs.dtype)
    return torch.where(m != 0, step_log_probs * m, torch.zeros_like(step_log_probs)).sum(dim=0)


# ---------------------------------------------------------------------------------------------------------------
# MTE: uncertainty, top-k selection, chain-averaged term
# ---------------------------------------------------------------------------------------------------------------
def token_uncertainty(final_samples: Tensor) -> Tensor:
    """Per-token uncertainty from S head chains run from fresh noise on the same AR latents (reference §1.6.3)::

        u_n = (1/D) * sum_c std_s(x0[s, n, c])        std with 1/S (biased, ``unbiased=False`` as released)

    Args:
        final_samples: ``(S, ..., D)`` the final x_0 of each chain (e.g. ``(S, N, D)`` -> ``(N,)``;
            ``(S, B, N, D)`` -> ``(B, N)``). ``S = 1`` gives zeros.

    Raises:
        ValueError: fewer than 2 dims, or ``S == 0``.
    """
    if final_samples.dim() < 2:
        raise ValueError(f"final_samples must be (S, ..., D), got shape {tuple(final_samples.shape)}")
    if final_samples.shape[0] < 1:
        raise ValueError("final_samples must hold at least one chain (S >= 1)")
    return final_samples.std(dim=0, unbiased=False).mean(dim=-1)


def top_k_count(count: int, k_percent: float, rounding: str = "floor", min_count: int = 0) -> int:
    """How many of ``count`` tokens are "the top ``k_percent`` %".

    ``q = k_percent/100 * count`` evaluated exactly on the decimal value of ``k_percent`` (so 30% of 10 is exactly
    3), then ``floor(q)`` (``"floor"``, default) or ``floor(q + 1/2)`` (``"round"``, half up). ``"floor"`` is the
    release's ``int(N * top_mask_percent)`` (reference §1.6.3, §4.3: "exactly int(0.3·L) ones"); the release's
    float product can lose one for some (k, N) pairs (e.g. ``int(90 * 0.7) == 62``), the exact rule here does not
    (for k = 30% the two agree for every N < 5000). ``min_count`` is a floor on the result (capped at ``count``):
    the release takes ``max(1, int(N * k))``, so it picks one token even where ``int(0.3 * N) == 0`` (N <= 3).

    Raises:
        ValueError: ``k_percent`` outside [0, 100] (or not a real number), ``count < 0``, unknown ``rounding``.
    """
    _check_choice("rounding", rounding, TOP_K_ROUNDINGS)
    if isinstance(k_percent, bool) or not isinstance(k_percent, numbers.Real) or not (0.0 <= k_percent <= 100.0):
        raise ValueError(f"k_percent must be a number in [0, 100], got {k_percent!r}")
    if int(count) < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    q = Fraction(repr(float(k_percent))) * int(count) / 100
    n = math.floor(q) if rounding == "floor" else math.floor(q + Fraction(1, 2))
    if int(min_count) < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    return min(int(count), max(n, int(min_count)))


def top_k_percent_mask(scores: Tensor, k_percent: float, valid: Tensor | None = None,
                       rounding: str = "floor", min_count: int = 0) -> Tensor:
    """Boolean mask of the ``k_percent`` % highest-score tokens, per image.

    For a 1-D ``(N,)`` input this is one image; for ``(B, L)`` every row is an image and only its ``valid``
    positions (all if ``None``) compete. Row ``b`` selects exactly ``top_k_count(n_b, k_percent, rounding,
    min_count)`` tokens,
    ``n_b`` = its valid count (0% -> none, 100% -> all valid ones). Order: higher score first; NaN scores rank
    below every number; ties go to the lower position index (deterministic). Padding is never selected.

    ``k_percent`` is in percent (SPEC §5 default 30); the release's ``top_mask_percent=0.3`` is a fraction.

    Raises:
        ValueError: ``scores`` not 1-D/2-D, a ``valid`` of another shape, bad ``k_percent`` / ``rounding``.
    """
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be (N,) or (B, L), got shape {tuple(scores.shape)}")
    if valid is not None and valid.shape != scores.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} does not match scores shape {tuple(scores.shape)}")
    top_k_count(0, k_percent, rounding)  # validates k_percent / rounding
    s = scores.unsqueeze(0) if scores.dim() == 1 else scores
    v = torch.ones_like(s, dtype=torch.bool) if valid is None else (valid.unsqueeze(0) if valid.dim() == 1 else valid)
    v = v.bool()
    B, L = s.shape
    key = s.detach().float()
    key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key)
    # Lexicographic stable order: (valid first, score descending, position ascending).
    _, order = torch.sort(key, dim=1, descending=True, stable=True)
    _, idx = torch.sort(v.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True)
    order = order.gather(1, idx)
    counts = [top_k_count(int(n), k_percent, rounding, min_count) for n in v.sum(dim=1).tolist()]
    take = torch.arange(L, device=s.device).unsqueeze(0) < torch.tensor(counts, device=s.device).unsqueeze(1)
    mask = torch.zeros((B, L), dtype=torch.bool, device=s.device).scatter(1, order, take)
    return mask[0] if scores.dim() == 1 else mask


def multi_trajectory_log_prob(single_term: Tensor, mte_terms: Tensor, uncertain_mask: Tensor,
                              mode: str = "mean_log_prob") -> Tensor:
    """The MTE policy term: chain-averaged on uncertain tokens, the rollout's single-chain term elsewhere::

        term_n = avg_s(mte_terms[s, n])   if uncertain_mask[n]
               = single_term[n]           otherwise

    ``"mean_log_prob"`` (default): ``avg_s = (1/S) sum_s lp_s``. The release (reference §1.6.4) uses
    ``(1/S) sum_s exp(lp_s - sg(lp_s)) * A``, whose value is A and whose gradient is ``A * (1/S) sum_s grad lp_s``
    -- exactly the released-ratio surrogate of the mean of the log-probs. ``"log_mean_prob"``:
    ``avg_s = logsumexp_s(lp_s) - log S`` (log of the chain-averaged probability; its gradient weights chains by
    their softmax probability) -- not what the release does, offered as the alternative reading of
    "chain-averaged". With ``S = 1`` and ``mte_terms[0] == single_term`` both give ``single_term`` exactly.

    Args:
        single_term: ``(...)`` per-token log-prob of the rollout chain (e.g. ``(N,)`` or ``(B, N)``).
        mte_terms: ``(S, ...)`` per-token log-probs of the S fresh-noise chains, scored with the *same* current AR
            latent (reference §1.6.4).
        uncertain_mask: bool, the shape of ``single_term`` (from :func:`top_k_percent_mask`).
        mode: one of :data:`MTE_MODES`.

    Raises:
        ValueError: unknown ``mode``; shape mismatches; ``S == 0``.
    """
    _check_choice("mode", mode, MTE_MODES)
    if mte_terms.dim() != single_term.dim() + 1 or mte_terms.shape[1:] != single_term.shape:
        raise ValueError(f"mte_terms must be (S,)+{tuple(single_term.shape)}, got {tuple(mte_terms.shape)}")
    if mte_terms.shape[0] < 1:
        raise ValueError("mte_terms must hold at least one chain (S >= 1)")
    if uncertain_mask.shape != single_term.shape:
        raise ValueError(f"uncertain_mask shape {tuple(uncertain_mask.shape)} does not match single_term shape "
                         f"{tuple(single_term.shape)}")
    if mode == "mean_log_prob":
        avg = mte_terms.mean(dim=0)
    else:
        avg = torch.logsumexp(mte_terms, dim=0) - math.log(mte_terms.shape[0])
    return torch.where(uncertain_mask.bool(), avg, single_term)


# ---------------------------------------------------------------------------------------------------------------
# consistency-aware selection and per-step token masks
# ---------------------------------------------------------------------------------------------------------------
def consistency_mask(proposals_prev: Tensor, proposals_cur: Tensor, final_tokens: Tensor,
                     threshold: float = 0.0) -> Tensor:
    """Tokens whose head proposal moved towards the final token between AR steps i-1 and i (reference §0.5, §1.6.6)::

        keep_n = cos(cur_n, final_n) - cos(prev_n, final_n) > threshold        (strict; tau = 0.0 released)

    ``cos`` is over the channel (last) dim, ``F.cosine_similarity`` (eps 1e-8, so a zero vector has cos 0). The
    proposals are the head's final x_0 for *every* position at the two steps (``diff_xt_prev[i][-1]``).

    Args:
        proposals_prev, proposals_cur, final_tokens: ``(..., D)``, e.g. ``(N, D)`` -> ``(N,)``.
        threshold: tau.

    Raises:
        ValueError: shape mismatch or 0-dim inputs.
    """
    if proposals_prev.dim() < 1:
        raise ValueError("proposals must have a channel dim")
    for name, t in (("proposals_cur", proposals_cur), ("final_tokens", final_tokens)):
        if t.shape != proposals_prev.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match proposals_prev shape "
                             f"{tuple(proposals_prev.shape)}")
    cos_cur = F.cosine_similarity(proposals_cur, final_tokens, dim=-1)
    cos_prev = F.cosine_similarity(proposals_prev, final_tokens, dim=-1)
    return (cos_cur - cos_prev) > float(threshold)


@dataclass(frozen=True)
class SelectionMasks:
    """Token masks of one trained AR step (all bool, the shape of the inputs).

    Attributes:
        policy: tokens scored by the policy term (the release's ``completion * sim_mask``).
        kl: tokens scored by the KL term (the release's ``completion``; the consistency test does not apply).
    """

    policy: Tensor
    kl: Tensor


def selection_masks(masked_before: Tensor, predicted_now: Tensor, consistency: Tensor | None = None,
                    harmon_mask_offset: bool = False) -> SelectionMasks:
    """Policy and KL token masks of AR step i (reference §1.6 item 7, §1.9 "Harmon mask bookkeeping")::

        completion = masked_before                      (harmon_mask_offset=False: current + future tokens)
                   = masked_before & ~predicted_now      (harmon_mask_offset=True:  future tokens only)
        sim        = (consistency & completion) | predicted_now          (consistency=None: all True)
        policy     = completion & sim
        kl         = completion

    Default (NOVA's convention, recommended by reference §4.2): tokens predicted at step i are always scored, other
    still-unknown tokens only if their proposal improved. ``harmon_mask_offset=True`` copies the released Harmon
    code, whose ``mask_list[i]`` is the mask *after* step i: ``completion`` excludes the step-i tokens, so the
    policy covers only future tokens that passed the consistency test -- an apparent bug (§1.9), off by default.
    Pass ``consistency=None`` for the first AR step (there is no step i-1) or when consistency selection is off.

    Args:
        masked_before: bool, tokens not yet known before step i (``~prev_ids``).
        predicted_now: bool, tokens generated at step i (a subset of ``masked_before``).
        consistency: bool from :func:`consistency_mask`, or ``None``.
        harmon_mask_offset: reproduce the Harmon mask quirk.

    Raises:
        ValueError: shape mismatch, or ``predicted_now`` not contained in ``masked_before``.
    """
    before, now = masked_before.bool(), predicted_now.bool()
    if now.shape != before.shape:
        raise ValueError(f"predicted_now shape {tuple(now.shape)} does not match masked_before shape "
                         f"{tuple(before.shape)}")
    if consistency is not None and consistency.shape != before.shape:
        raise ValueError(f"consistency shape {tuple(consistency.shape)} does not match masked_before shape "
                         f"{tuple(before.shape)}")
    if bool((now & ~before).any()):
        raise ValueError("predicted_now must be a subset of masked_before (a token predicted at step i was known)")
    completion = before & ~now if harmon_mask_offset else before
    hard = torch.ones_like(before) if consistency is None else consistency.bool()
    sim = (hard & completion) | now
    return SelectionMasks(policy=completion & sim, kl=completion)


# ---------------------------------------------------------------------------------------------------------------
# KL on Gaussian means, ratio, loss
# ---------------------------------------------------------------------------------------------------------------
def gaussian_mean_kl(mean_policy: Tensor, mean_ref: Tensor, log_variance: Tensor | float | None = None,
                     reduce: str = "sum", kl_type: str = "gaussian", min_std: float | None = None) -> Tensor:
    """Per-token KL between the policy's and the reference's transition Gaussians (same variance s^2).

    ``"gaussian"`` (default): the exact KL(N(mu, s^2) || N(mu_ref, s^2)), elementwise::

        kl_c = (mu_c - mu_ref_c)^2 / (2 s_c^2)           (s = exp(log_variance/2), ``min_std`` as in gaussian_log_prob)

    ``"released"``: what the release computes instead (reference §0.6, §1.6.5), a k3-form on the *means*, with no
    variance at all (``log_variance`` is ignored)::

        d = mu_ref_c - mu_c,    kl_c = exp(d) - d - 1    (~ d^2/2: the Gaussian KL with s = 1, up to O(d^3))

    Both are reduced over channels like :func:`gaussian_log_prob` (``"sum"`` default = the KL of the D-dim token;
    Harmon's released normalisation also sums the 16 channels, §1.6 item 9). Per-step values are combined over
    diffusion steps with :func:`chain_log_prob`.

    Raises:
        ValueError: unknown ``reduce`` / ``kl_type``; shape mismatch; ``log_variance`` missing for ``"gaussian"``.
    """
    _check_choice("reduce", reduce, CHANNEL_REDUCTIONS)
    _check_choice("kl_type", kl_type, KL_TYPES)
    if mean_ref.shape != mean_policy.shape:
        raise ValueError(f"mean_ref shape {tuple(mean_ref.shape)} does not match mean_policy shape "
                         f"{tuple(mean_policy.shape)}")
    if kl_type == "released":
        d = mean_ref - mean_policy
        return _reduce_channels(torch.exp(d) - d - 1.0, reduce)
    if log_variance is None:
        raise ValueError("log_variance is required for kl_type='gaussian'")
    lv = torch.as_tensor(log_variance, dtype=mean_policy.dtype, device=mean_policy.device)
    log_std = 0.5 * lv
    if min_std is not None:
        if not float(min_std) > 0:
            raise ValueError(f"min_std must be > 0, got {min_std}")
        log_std = torch.clamp(log_std, min=math.log(float(min_std)))
    kl = (mean_policy - mean_ref) ** 2 * torch.exp(-2.0 * log_std) / 2.0
    return _reduce_channels(kl, reduce)


def _old_log_prob(logp_new: Tensor, logp_old: Tensor | None, mode: str) -> Tensor:
    _check_choice("mode", mode, RATIO_MODES)
    if mode == "released":
        return logp_new.detach()
    if logp_old is None:
        raise ValueError("logp_old is required for mode='ppo'")
    if logp_old.shape != logp_new.shape:
        raise ValueError(f"logp_old shape {tuple(logp_old.shape)} does not match logp_new shape "
                         f"{tuple(logp_new.shape)}")
    return logp_old.detach()


def importance_ratio(logp_new: Tensor, logp_old: Tensor | None = None, mode: str = "released") -> Tensor:
    """Per-token importance ratio.

    - ``"released"`` (default; reference §0.3, §1.6.3, §4.4): ``r = exp(logp_new - sg(logp_new))``. Its value is
      exactly 1 and its gradient is ``grad logp_new``, so ``r * A`` is REINFORCE with group advantages; the release
      makes one update per rollout and has no clip (``logp_old`` is ignored).
    - ``"ppo"``: ``r = exp(logp_new - sg(logp_old))`` with ``logp_old`` recomputed from the rollout-time parameters
      on exactly the same inputs (SPEC §4). With one update and a deterministic forward it equals ``"released"``.

    Raises:
        ValueError: unknown ``mode``; ``logp_old`` missing or of another shape for ``"ppo"``.
    """
    return torch.exp(logp_new - _old_log_prob(logp_new, logp_old, mode))


@dataclass(frozen=True)
class MarGrpoLoss:
    """Result of :func:`mar_grpo_loss`.

    Attributes:
        loss: scalar to back-propagate: ``policy_loss + beta * kl``.
        policy_loss: aggregated clipped surrogate over ``mask``.
        kl: aggregated per-token KL over ``kl_mask`` (0 without a KL).
        ratio_mean, ratio_min, ratio_max: ratio statistics over the kept tokens (1.0 when none is kept).
        clip_fraction: fraction of kept tokens where either clip is active.
        kept_tokens: number of tokens in ``mask``.
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    clip_fraction: float
    kept_tokens: int


def mar_grpo_loss(logp: Tensor, advantages: Tensor, mask: Tensor, *, logp_old: Tensor | None = None,
                  kl: Tensor | None = None, kl_mask: Tensor | None = None, beta: float = 0.01,
                  ratio_mode: str = "released", epsilon: float = 0.2, epsilon_high: float | None = None,
                  loss_type: str = "token_mean") -> MarGrpoLoss:
    """MAR-GRPO loss of one trained AR step::

        r        = importance_ratio(logp, logp_old, ratio_mode)
        per_tok  = -min(r * A, clip(r, 1-eps, 1+eps_high) * A)           (clipped_surrogate)
        loss     = aggregate(per_tok, mask) + beta * aggregate(kl, kl_mask)

    ``logp`` is the per-token policy term (:func:`chain_log_prob` of :func:`gaussian_log_prob`, with the MTE term
    on uncertain tokens via :func:`multi_trajectory_log_prob`; for ``"ppo"`` build ``logp_old`` the same way).
    ``kl`` is the per-token KL (:func:`gaussian_mean_kl` combined over steps). The release (reference §1.6 item 8)
    normalises the policy term over the policy mask and the KL over ``completion`` separately, hence ``kl_mask``
    (``None`` -> ``mask``; :func:`selection_masks` gives both). In ``"released"`` mode r == 1, so the clip never
    acts and the loss value is ``-aggregate(A)`` with gradient ``-aggregate(A * grad logp)``.

    Args:
        logp: ``(B, N)`` per-token log-probs with grad.
        advantages: ``(B,)`` per-image or ``(B, N)`` per-token advantages.
        mask: bool/float ``(B, N)`` tokens in the policy term.
        logp_old: ``(B, N)``, required for ``ratio_mode="ppo"``.
        kl: ``(B, N)`` per-token KL or ``None`` (no KL term).
        kl_mask: ``(B, N)`` tokens in the KL term (``None`` -> ``mask``).
        beta: KL coefficient (SPEC §5: 0.01).
        ratio_mode: one of :data:`RATIO_MODES`.
        epsilon, epsilon_high: clip range (see :func:`clipped_surrogate`).
        loss_type: one of :data:`LOSS_TYPES` (``"token_mean"`` = the release's normalisation).

    Raises:
        ValueError: bad shapes, unknown modes, negative ``beta`` or ``epsilon``.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, N), got shape {tuple(logp.shape)}")
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if float(beta) < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logp shape {tuple(logp.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        adv = advantages[:, None].expand_as(logp)
    elif advantages.shape == logp.shape:
        adv = advantages
    else:
        raise ValueError(f"advantages must be (B,)=({logp.shape[0]},) or {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")
    adv = adv.detach().to(logp.dtype)
    old = _old_log_prob(logp, logp_old, ratio_mode)
    terms = clipped_surrogate(logp, old, adv, epsilon=epsilon, epsilon_high=epsilon_high)
    policy_loss = aggregate_loss(terms.loss, mask, loss_type)

    if kl is None:
        kl_value = policy_loss.new_zeros(())
    else:
        km = mask if kl_mask is None else kl_mask
        if kl.shape != logp.shape or km.shape != logp.shape:
            raise ValueError(f"kl {tuple(kl.shape)} and kl_mask {tuple(km.shape)} must be {tuple(logp.shape)}")
        kl_value = aggregate_loss(kl, km, loss_type)
    loss = policy_loss + float(beta) * kl_value

    keep = mask.bool()
    n = int(keep.sum().item())
    with torch.no_grad():
        if n > 0:
            r = terms.ratio.detach()[keep]
            r_mean, r_min, r_max = float(r.mean()), float(r.min()), float(r.max())
            clip_frac = float(terms.clipped[keep].float().mean())
        else:
            r_mean = r_min = r_max = 1.0
            clip_frac = 0.0
    return MarGrpoLoss(loss=loss, policy_loss=policy_loss, kl=kl_value, ratio_mean=r_mean, ratio_min=r_min,
                       ratio_max=r_max, clip_fraction=clip_frac, kept_tokens=n)
