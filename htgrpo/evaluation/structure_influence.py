"""Structure-influence probe (issue 21): does the structure set S that HT-GRPO partitions out decide the reward?

For a prompt, a rollout ``x = (x_S, x_R)`` is split by HT-GRPO's own partition (:func:`htgrpo.algorithms.credit.
structure_mask`: the earliest-committed fraction φ of its tokens is S, the rest R). Two conditional experiments:

* **S fixed**: keep ``x_S``, resample ``x_R`` M times from the policy (S visible from the first step). The spread of
  the per-rollout mean reward across rollouts is ``Var(E[f | S])``, the reward variance S explains (a first-order
  Sobol index, ``share_S = Var(E[f|S]) / Var(f)``).
* **R fixed**: keep ``x_R``, resample ``x_S`` M times: ``share_R = Var(E[f|R]) / Var(f)``.

Both come from a one-way random-effects ANOVA over the ``n x M`` reward table of a prompt (:func:`one_way_components`),
pooled over the prompts of a task (:func:`pooled_share`), with a bootstrap over prompts (:func:`bootstrap_share`).
``1 - share_S - share_R`` is what neither part explains alone (their interaction, and the dependence of S and R).

**Agreement** between S and the tokens that change the verdict: each token ``j`` of a rollout is resampled alone
(everything else fixed, one forward pass), and its influence is ``|f(x with x_j resampled) - f(x)|`` (for a
pass/fail verdict: 1 when the verdict flips). :func:`influence_share` is the share of the total influence that falls
in S; if S were unrelated to influence it would be ``|S| / N`` (≈ φ).

The conditional sampling (:func:`clamped_logits_fn`) wraps the policy's guided logits for the configured sampler
(MaskGIT or emerge, unchanged): positions held fixed are shown to the model with their codes at every step, and
their logits are replaced by a point mass on the fixed code, so whenever the sampler commits them it commits
exactly that code. The free positions are thus drawn from the policy's conditional given the fixed ones, by the
sampler's own schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "VarianceComponents",
    "bootstrap_ratio",
    "bootstrap_share",
    "clamped_logits_fn",
    "influence_share",
    "one_way_components",
    "pooled_share",
    "resample_single_tokens",
]


# ---------------------------------------------------------------------------------------------------------------
# variance decomposition (pure numpy)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VarianceComponents:
    """One prompt's one-way random-effects ANOVA of an ``n x M`` reward table (row ``i``: the M rewards of rollout
    ``i`` with its held part fixed).

    Attributes:
        between: ``sigma_b^2 = Var_rows(row means) - within / M``, the unbiased estimate of ``Var(E[f | held part])``
            (may be slightly negative by chance).
        within: ``sigma_w^2 = mean_i Var(row i)`` (ddof 1), the estimate of ``E[Var(f | held part)]``.
        rows: n.
        draws: M.
    """

    between: float
    within: float
    rows: int
    draws: int

    @property
    def total(self) -> float:
        """``Var(f) = sigma_b^2 + sigma_w^2`` (law of total variance)."""
        return self.between + self.within


def one_way_components(table: np.ndarray) -> VarianceComponents:
    """Variance components of ``table`` (``n >= 2`` rows, ``M >= 2`` draws per row)::

        within  = (1/n) Σ_i  (1/(M-1)) Σ_m (y_im - ȳ_i)^2
        between = (1/(n-1)) Σ_i (ȳ_i - ȳ)^2  -  within / M

    The ``within / M`` correction removes the sampling noise of the row means, so ``between`` estimates the variance
    of the true conditional means.

    Raises:
        ValueError: a table that is not 2-D with at least 2 rows and 2 columns, or holds a non-finite value.
    """
    y = np.asarray(table, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"expected an (n >= 2, M >= 2) reward table, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("the reward table holds a non-finite value (a failed score): drop or rescore it first")
    n, m = y.shape
    within = float(y.var(axis=1, ddof=1).mean())
    between = float(y.mean(axis=1).var(ddof=1)) - within / m
    return VarianceComponents(between=between, within=within, rows=n, draws=m)


def pooled_share(components: list[VarianceComponents], weights: np.ndarray | None = None) -> float:
    """Share of the reward variance explained by the held part, pooled over prompts::

        share = clip( Σ_p w_p · between_p / Σ_p w_p · total_p , 0, 1 )

    (``w_p`` = 1, or a bootstrap multiplicity). Pooling the sums (not averaging per-prompt ratios) weights each
    prompt by how much its reward varies; a prompt whose reward never varies adds nothing. NaN when the pooled total
    is 0 (no prompt's reward varies).
    """
    if not components:
        return float("nan")
    w = np.ones(len(components)) if weights is None else np.asarray(weights, dtype=np.float64)
    between = float(np.sum(w * np.array([c.between for c in components])))
    total = float(np.sum(w * np.array([c.total for c in components])))
    if total <= 0:
        return float("nan")
    return float(min(1.0, max(0.0, between / total)))


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, resamples: int = 1000, seed: int = 0,
                    clip: bool = False) -> tuple[float, float]:
    """95% percentile interval of ``Σ_p w_p·num_p / Σ_p w_p·den_p`` when the prompts ``p`` are resampled with
    replacement (``w_p``: how often prompt ``p`` is drawn); with ``clip`` each draw is clipped to ``[0, 1]``.

    Draws whose denominator is not positive are dropped; ``(nan, nan)`` with fewer than 2 prompts or no draw left.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"expected two (P,) arrays, got {num.shape} and {den.shape}")
    if len(num) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(resamples)):
        w = np.bincount(rng.integers(0, len(num), len(num)), minlength=len(num))
        d = float(np.sum(w * den))
        if d > 0:
            value = float(np.sum(w * num)) / d
            draws.append(min(1.0, max(0.0, value)) if clip else value)
    if not draws:
        return float("nan"), float("nan")
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def bootstrap_share(components: list[VarianceComponents], resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of :func:`pooled_share` under resampling the prompts with replacement
    (:func:`bootstrap_ratio` of the ``between`` and ``total`` components, clipped to ``[0, 1]``)."""
    return bootstrap_ratio(np.array([c.between for c in components]), np.array([c.total for c in components]),
                           resamples, seed, clip=True)


def influence_share(influence: np.ndarray, structure: np.ndarray) -> tuple[float, float]:
    """``(Σ_{j in S} infl_j / Σ_j infl_j, |S| / N)`` over all rollouts given: the share of the single-token
    influence that falls in the structure set, and the share S would get if influence ignored it (chance).

    ``influence`` and ``structure`` are ``(rollouts, N)``; NaN share when no token changes anything.
    """
    infl = np.asarray(influence, dtype=np.float64)
    s = np.asarray(structure, dtype=bool)
    if infl.shape != s.shape:
        raise ValueError(f"influence {infl.shape} and structure {s.shape} must have the same shape")
    chance = float(s.mean()) if s.size else float("nan")
    total = float(infl.sum())
    return (float(infl[s].sum()) / total if total > 0 else float("nan")), chance


# ---------------------------------------------------------------------------------------------------------------
# conditional sampling on a masked-diffusion policy
# ---------------------------------------------------------------------------------------------------------------
def clamped_logits_fn(policy, prompt_tokens, fixed_codes: torch.Tensor, fixed: torch.Tensor
                      ) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """A ``logits_fn(codes, guidance_scale)`` for :mod:`htgrpo.policies.sampling` that samples the free positions
    given the fixed ones.

    The model sees ``where(fixed, fixed_codes, codes)`` (the fixed tokens are visible from the first step); its
    guided logits at fixed positions are replaced by ``0`` at the fixed code and ``-inf`` elsewhere, so the sampler
    commits the fixed code there with probability 1 (at whatever step its schedule picks).

    Args:
        policy: a masked-diffusion policy (``guided_image_logits``).
        prompt_tokens: its tokenised prompts, one row per canvas.
        fixed_codes: ``(B, N)`` long, the codes of the fixed positions (other entries ignored).
        fixed: ``(B, N)`` bool, which positions are held fixed.
    """
    fixed = fixed.to(policy.device).bool()
    fixed_codes = fixed_codes.to(policy.device).long()

    def fn(codes: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        visible = torch.where(fixed, fixed_codes, codes)
        logits = policy.guided_image_logits(visible, prompt_tokens, guidance_scale).float()
        point = torch.full_like(logits, -torch.inf)
        point.scatter_(-1, fixed_codes.clamp_min(0)[..., None], 0.0)
        return torch.where(fixed[..., None], point, logits)

    return fn


@torch.no_grad()
def resample_single_tokens(policy, prompt_tokens, codes: torch.Tensor, guidance_scale: float, temperature: float,
                           generator: torch.Generator | None) -> torch.Tensor:
    """For one image's ``codes`` ``(N,)``: N canvases, canvas ``j`` with token ``j`` re-masked and the rest fixed;
    token ``j`` is drawn from the policy's guided conditional at temperature ``temperature`` (Gumbel-max; argmax at
    0), everything else kept. Returns ``(N, N)`` codes (row ``j`` differs from ``codes`` at most at ``j``).

    ``prompt_tokens``: the image's prompt, one row (repeated here). One forward pass over the N canvases.
    """
    from htgrpo.policies.t2i_layout import MASKED

    n = codes.shape[0]
    device = policy.device
    base = codes.to(device).long()
    canvases = base.expand(n, n).clone()
    idx = torch.arange(n, device=device)
    canvases[idx, idx] = MASKED
    prompts = prompt_tokens[[0] * n] if hasattr(prompt_tokens, "__getitem__") else prompt_tokens
    logits = policy.guided_image_logits(canvases, prompts, guidance_scale, positions=idx[:, None]).float()[:, 0]
    if temperature <= 0:
        drawn = logits.argmax(-1)
    else:
        u = torch.rand(logits.shape, generator=generator, device=generator.device if generator is not None else device)
        gumbel = -torch.log(-torch.log(u.to(device).clamp_min(1e-20)))
        drawn = (logits / temperature + gumbel).argmax(-1)
    out = base.expand(n, n).clone()
    out[idx, idx] = drawn
    return out
