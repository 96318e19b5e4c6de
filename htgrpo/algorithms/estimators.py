"""Per-token log-probability estimators for GRPO on masked-diffusion image generators (``algorithm.estimator``).

A masked diffusion model has no tractable sequence likelihood, so every RL method for it picks some *scoring
states*: a canvas x_M̄ (the rollout codes with a set M of positions replaced by [MASK]) and, for positions i in M,
reads the per-token log-probability

    log π_θ(x_i | c, x_M̄) = log_softmax(f_θ(c, x_M̄))[i, x_i]        (reference/htgrpo_mmada_dimoo.md §2)

from one forward pass without CFG. The estimators differ only in which canvases they build and which positions each
canvas scores, so they are split into two parts:

- :meth:`LogProbEstimator.plan` -> :class:`ScoringPlan`: a list of :class:`ScoringPass` (canvas, scored positions and,
  for d1, a prompt-word mask). All randomness comes from the ``generator`` argument, so the trainer builds ONE plan
  per inner iteration and reuses it for the old, reference and current policy: the three log-probs then have
  identical inputs (required by the importance ratio and the k3 KL; reference §4.1 "seeds ... reused for old, ref
  and current logps").
- :func:`token_log_probs` runs the passes of a plan through a policy and returns (B, N) log-probs (0 where unscored)
  and the scored mask. It is differentiable; call it under ``torch.no_grad()`` for the old/reference policy.

``candidates`` (B, N) bool is the set of tokens the current stage may score: all True for the baselines; for
HT-GRPO the stage's token set (all / structure / refinement), already subsampled by the stage's fraction ρ.
Estimators only ever score candidates, and every token is scored by at most one pass of a plan.

Registered estimators (:data:`ESTIMATORS`, built by :func:`build_estimator`):

============================  =====================================================================================
``prompt_conditioned``        HT-GRPO (SPEC §4, reference §1.3): one pass, canvas fully masked (or unscored visible)
``unigrpo``                   MMaDA UniGRPO (reference §2): random mask at ratio p ∈ [lower, upper]
``maskgrpo``                  MaskGRPO (reference §2, §4.1): random mask at rising ratio r_k
``d1``                        d1 / diffu-GRPO (reference §2): canvas fully masked, prompt words masked at random
``coupled``                   coupled-GRPO / DiffuCoder (reference §2): random mask and its complement
``trace``                     TraceRL (reference §2): the recorded rollout trajectory, blocks of ``shrink`` steps
============================  =====================================================================================
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from htgrpo.policies.masked_diffusion import PromptTokens
from htgrpo.policies.sampling import SampledImageTokens
from htgrpo.policies.t2i_layout import MASKED

CONFIG_KEY = "algorithm.estimator"

__all__ = [
    "ESTIMATORS",
    "CoupledEstimator",
    "D1Estimator",
    "LogProbEstimator",
    "MaskGRPOEstimator",
    "PromptConditionedEstimator",
    "ScoringPass",
    "ScoringPlan",
    "TokenLogProbs",
    "TraceEstimator",
    "UniGRPOEstimator",
    "build_estimator",
    "mask_prompt_words",
    "token_log_probs",
]


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScoringPass:
    """One forward pass of the policy.

    ``canvas`` (B, N) long: the rollout codes with ``MASKED`` (-1) where hidden from the model.
    ``scored`` (B, N) bool: positions whose log-prob is read from this pass (a subset of the masked positions).
    ``prompt_mask`` (B, L) bool or None: prompt word positions replaced by [MASK] (d1 only; True only on real words).
    """

    canvas: torch.Tensor
    scored: torch.Tensor
    prompt_mask: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        """(B, N) bool: positions the canvas hides from the model."""
        return self.canvas == MASKED

    def to(self, device: torch.device | str) -> ScoringPass:
        pm = None if self.prompt_mask is None else self.prompt_mask.to(device)
        return ScoringPass(self.canvas.to(device), self.scored.to(device), pm)


@dataclass
class ScoringPlan:
    """The scoring passes of one inner iteration; every token is scored by at most one pass."""

    passes: list[ScoringPass] = field(default_factory=list)
    shape: tuple[int, int] | None = None
    """(B, N); needed only when there are no passes (then :attr:`scored` is all False)."""

    @property
    def num_forward_passes(self) -> int:
        return len(self.passes)

    @property
    def scored(self) -> torch.Tensor:
        """(B, N) bool: union of the passes' scored positions."""
        if not self.passes:
            if self.shape is None:
                raise ValueError("an empty ScoringPlan needs `shape` to report its scored mask")
            return torch.zeros(self.shape, dtype=torch.bool)
        out = torch.zeros_like(self.passes[0].scored)
        for p in self.passes:
            out = out | p.scored
        return out

    def to(self, device: torch.device | str) -> ScoringPlan:
        return ScoringPlan([p.to(device) for p in self.passes], self.shape)

    def validate(self, candidates: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> ScoringPlan:
        """Assert the plan's invariants (returns ``self``):

        - every pass: canvas (B, N) long, scored (B, N) bool, scored ⊆ masked positions of the canvas;
        - no token is scored by two passes;
        - ``candidates`` given: scored ⊆ candidates;
        - ``codes`` given: visible canvas positions hold the rollout codes.
        """
        count = None
        for i, p in enumerate(self.passes):
            assert p.canvas.dim() == 2 and p.canvas.dtype == torch.long, f"pass {i}: canvas must be (B, N) long"
            assert p.scored.shape == p.canvas.shape and p.scored.dtype == torch.bool, f"pass {i}: bad scored mask"
            if self.shape is not None:
                assert tuple(p.canvas.shape) == tuple(self.shape), f"pass {i}: shape {tuple(p.canvas.shape)}"
            assert not bool((p.scored & ~p.hidden).any()), f"pass {i} scores tokens the canvas shows"
            if p.prompt_mask is not None:
                assert p.prompt_mask.dim() == 2 and p.prompt_mask.shape[0] == p.canvas.shape[0], (
                    f"pass {i}: prompt_mask must be (B, L)"
                )
                assert p.prompt_mask.dtype == torch.bool, f"pass {i}: prompt_mask must be bool"
            if codes is not None:
                ok = p.hidden | (p.canvas == codes.to(p.canvas.device))
                assert bool(ok.all()), f"pass {i}: visible canvas tokens differ from the rollout codes"
            c = p.scored.long()
            count = c if count is None else count + c
        if count is not None:
            assert int(count.max()) <= 1, "a token is scored by more than one pass"
            if candidates is not None:
                assert not bool((self.scored & ~candidates.to(count.device)).any()), "plan scores non-candidates"
        return self


def _make_plan(passes: Sequence[ScoringPass], shape: Sequence[int]) -> ScoringPlan:
    """Plan without the passes that score nothing (they would cost a forward pass for no tokens)."""
    kept = [p for p in passes if bool(p.scored.any())]
    return ScoringPlan(kept, (int(shape[0]), int(shape[1])))


# ----------------------------------------------------------------------------------------------------------------
# Randomness helpers (drawn on the generator's device, returned on the data's device: reproducible)
# ----------------------------------------------------------------------------------------------------------------


def _uniform(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


def _random_mask(num_masked: torch.Tensor, num_tokens: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """(B, N) bool with exactly ``num_masked[b]`` True positions per row, chosen uniformly at random."""
    B = int(num_masked.shape[0])
    ranks = _uniform((B, num_tokens), generator, device).argsort(1).argsort(1)
    return ranks < num_masked.to(device)[:, None]


def _count(ratio: torch.Tensor, num_tokens: int, low: int = 1, high: int | None = None) -> torch.Tensor:
    """round(ratio·N) clipped to [low, high (default N)]."""
    high = num_tokens if high is None else high
    return (ratio * num_tokens).round().long().clamp(low, max(low, high))


# ----------------------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------------------


def _arg_error(arg: str, message: str) -> ValueError:
    return ValueError(f"{CONFIG_KEY}.{arg}: {message}")


def _check_unit(arg: str, value: float, *, open_high: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or v > 1 or (open_high and v >= 1):
        interval = "[0, 1)" if open_high else "[0, 1]"
        raise _arg_error(arg, f"must be in {interval}, got {value!r}")
    return v


class LogProbEstimator(ABC):
    """Builds the scoring plan of one inner GRPO iteration.

    Subclasses implement :meth:`_plan`; :meth:`plan` checks the inputs and the result's invariants.
    ``needs_prompt``: the plan depends on the prompt (d1 masks prompt words); pass ``prompt=`` to :meth:`plan`.
    """

    name: ClassVar[str] = ""
    needs_prompt: ClassVar[bool] = False

    def plan(
        self,
        sampled: SampledImageTokens,
        candidates: torch.Tensor,
        iteration: int,
        num_iterations: int,
        generator: torch.Generator,
        prompt: PromptTokens | None = None,
    ) -> ScoringPlan:
        """Scoring passes for inner iteration ``iteration`` (0-based) of ``num_iterations``.

        ``candidates`` (B, N) bool: the tokens this iteration may score. ``generator`` supplies all randomness, so
        the same generator state gives the same plan. ``prompt`` is needed only when ``needs_prompt``.
        """
        codes = sampled.codes
        if codes.dim() != 2:
            raise ValueError(f"sampled.codes must be (B, N), got {tuple(codes.shape)}")
        if tuple(candidates.shape) != tuple(codes.shape):
            raise ValueError(f"candidates {tuple(candidates.shape)} must match codes {tuple(codes.shape)}")
        if bool((codes == MASKED).any()):
            raise ValueError("sampled.codes still contain masked (-1) tokens: score finished rollouts only")
        if num_iterations < 1 or not 0 <= iteration < num_iterations:
            raise ValueError(f"need 0 <= iteration < num_iterations, got {iteration} of {num_iterations}")
        if generator is None:
            raise ValueError("plan() needs a torch.Generator (all randomness must be reproducible)")
        if self.needs_prompt:
            if prompt is None:
                raise ValueError(f"estimator {self.name!r} masks prompt words: pass prompt= to plan()")
            if prompt.batch_size != codes.shape[0]:
                raise ValueError(f"prompt batch {prompt.batch_size} != image batch {codes.shape[0]}")
        cand = candidates.to(device=codes.device, dtype=torch.bool)
        plan = self._plan(sampled, cand, int(iteration), int(num_iterations), generator, prompt)
        return plan.validate(cand, codes)

    @abstractmethod
    def _plan(
        self,
        sampled: SampledImageTokens,
        candidates: torch.Tensor,
        iteration: int,
        num_iterations: int,
        generator: torch.Generator,
        prompt: PromptTokens | None,
    ) -> ScoringPlan: ...

    def config(self) -> dict[str, Any]:
        """The constructor arguments (for logging)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class PromptConditionedEstimator(LogProbEstimator):
    """HT-GRPO's estimator (SPEC §4; reference §1.3 "[infer] About fully masked state").

    One pass. The prompt is fully visible, scored = candidates (the caller already drew the stage's fraction ρ).

    - ``context="masked"`` [default]: the canvas is fully masked: log π(x_i | c) for i ∈ candidates.
    - ``context="unscored"``: the unscored tokens stay visible: log π(x_i | c, x_{¬S}) with S = candidates, canvas =
      codes outside S, [MASK] on S.
    """

    name = "prompt_conditioned"
    CONTEXTS = ("masked", "unscored")

    def __init__(self, context: str = "masked") -> None:
        if context not in self.CONTEXTS:
            raise _arg_error("context", f"must be one of {list(self.CONTEXTS)}, got {context!r}")
        self.context = context

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes = sampled.codes
        hide = torch.ones_like(candidates) if self.context == "masked" else candidates
        canvas = codes.masked_fill(hide, MASKED)
        return _make_plan([ScoringPass(canvas, candidates.clone())], codes.shape)


class UniGRPOEstimator(LogProbEstimator):
    """MMaDA's UniGRPO (reference §2): prompt never masked; per sample a mask ratio p ∈ [lower, upper],
    round(p·N) (≥ 1) image positions masked uniformly at random; scored = masked ∩ candidates.

    ``structured=True`` (the paper's "uniformly spaced" timesteps): p_k = lower + (upper − lower)·(k + 0.5)/K for
    inner iteration k of K; ``structured=False`` (dLLM-RL's ``random_masking``): p ~ U(lower, upper) per sample.
    """

    name = "unigrpo"

    def __init__(self, lower: float = 0.1, upper: float = 0.9, structured: bool = True) -> None:
        self.lower = _check_unit("lower", lower)
        self.upper = _check_unit("upper", upper)
        if self.lower > self.upper:
            raise _arg_error("lower", f"must be <= upper ({self.upper}), got {self.lower}")
        self.structured = bool(structured)

    def mask_ratio(self, iteration: int, num_iterations: int) -> float:
        """Structured ratio p_k of inner iteration k."""
        return self.lower + (self.upper - self.lower) * (iteration + 0.5) / num_iterations

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes = sampled.codes
        B, N = codes.shape
        if self.structured:
            p = torch.full((B,), self.mask_ratio(iteration, num_iterations), device=codes.device)
        else:
            p = self.lower + (self.upper - self.lower) * _uniform((B,), generator, codes.device)
        masked = _random_mask(_count(p, N), N, generator, codes.device)
        return _make_plan([ScoringPass(codes.masked_fill(masked, MASKED), masked & candidates)], codes.shape)


class MaskGRPOEstimator(LogProbEstimator):
    """MaskGRPO (reference §2, §4.1): prompt unmasked; inner iteration k of K masks round(r_k·N) (≥ 1) image
    positions uniformly at random, r_k = min(m + (1 − m)(k + 1)/K, 0.999) with m = ``min_mask_rate`` (0.6 for text-to-image);
    scored = masked ∩ candidates.
    """

    name = "maskgrpo"
    MAX_RATE = 0.999

    def __init__(self, min_mask_rate: float = 0.6) -> None:
        self.min_mask_rate = _check_unit("min_mask_rate", min_mask_rate)

    def mask_ratio(self, iteration: int, num_iterations: int) -> float:
        m = self.min_mask_rate
        return min(m + (1.0 - m) * (iteration + 1) / num_iterations, self.MAX_RATE)

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes = sampled.codes
        B, N = codes.shape
        r = torch.full((B,), self.mask_ratio(iteration, num_iterations), device=codes.device)
        masked = _random_mask(_count(r, N), N, generator, codes.device)
        return _make_plan([ScoringPass(codes.masked_fill(masked, MASKED), masked & candidates)], codes.shape)


class D1Estimator(LogProbEstimator):
    """d1 / diffu-GRPO (reference §2): the image canvas is fully masked and each real prompt word (not padding) is
    replaced by [MASK] with probability ``p_mask_prompt`` (0.15, MaskGRPO's config), drawn fresh each inner
    iteration; one pass, scored = candidates: log π(x_i | c_masked). Needs ``prompt=`` in :meth:`plan`.
    """

    name = "d1"
    needs_prompt = True

    def __init__(self, p_mask_prompt: float = 0.15) -> None:
        self.p_mask_prompt = _check_unit("p_mask_prompt", p_mask_prompt)

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes = sampled.codes
        words = prompt.mask.to(codes.device).bool()
        prompt_mask = (_uniform(tuple(words.shape), generator, codes.device) < self.p_mask_prompt) & words
        canvas = torch.full_like(codes, MASKED)
        return _make_plan([ScoringPass(canvas, candidates.clone(), prompt_mask)], codes.shape)


class CoupledEstimator(LogProbEstimator):
    """coupled-GRPO (DiffuCoder; reference §2): per sample t ~ U(lower, upper) and a random mask M of round(t·N)
    positions (clipped to [1, N − 1]); two passes, (canvas hides M, scores M ∩ candidates) and (canvas hides the
    complement, scores ¬M ∩ candidates), so every candidate is scored exactly once.
    """

    name = "coupled"

    def __init__(self, lower: float = 0.1, upper: float = 0.9) -> None:
        self.lower = _check_unit("lower", lower)
        self.upper = _check_unit("upper", upper)
        if self.lower > self.upper:
            raise _arg_error("lower", f"must be <= upper ({self.upper}), got {self.lower}")

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes = sampled.codes
        B, N = codes.shape
        t = self.lower + (self.upper - self.lower) * _uniform((B,), generator, codes.device)
        masked = _random_mask(_count(t, N, 1, N - 1), N, generator, codes.device)
        passes = [
            ScoringPass(codes.masked_fill(masked, MASKED), masked & candidates),
            ScoringPass(codes.masked_fill(~masked, MASKED), ~masked & candidates),
        ]
        return _make_plan(passes, codes.shape)


class TraceEstimator(LogProbEstimator):
    """TraceRL (dLLM-RL; reference §2): scores tokens in the context the rollout actually had, from the recorded
    ``commit_step``. Sampler steps 0..T−1 are grouped in blocks of ``shrink`` consecutive steps; block b covers
    [s0, s1) = [b·shrink, min((b+1)·shrink, T)). Its pass hides every token committed at step ≥ s0 and scores the
    tokens committed in [s0, s1) ∩ candidates. One pass per block that scores something.

    ``shrink`` defaults to 4 (TraceRL uses 8 for long text decodes): with the 12-step image samplers used here that
    is 3 passes over blocks of 4 steps, instead of 2 uneven ones. TraceRL groups the *distinct* steps of each
    sample; blocks of consecutive steps are the same thing whenever every step commits a token (MaskGIT), and keep
    blocks aligned across the batch for the ancestral sampler, whose steps may commit nothing.
    """

    name = "trace"

    def __init__(self, shrink: int = 4) -> None:
        if isinstance(shrink, bool) or int(shrink) != shrink or int(shrink) < 1:
            raise _arg_error("shrink", f"must be an integer >= 1, got {shrink!r}")
        self.shrink = int(shrink)

    def blocks(self, num_steps: int) -> list[tuple[int, int]]:
        return [(s0, min(s0 + self.shrink, num_steps)) for s0 in range(0, num_steps, self.shrink)]

    def _plan(self, sampled, candidates, iteration, num_iterations, generator, prompt):
        codes, step = sampled.codes, sampled.commit_step.to(sampled.codes.device)
        T = int(sampled.num_steps)
        if tuple(step.shape) != tuple(codes.shape):
            raise ValueError("sampled.commit_step must have the shape of sampled.codes")
        if bool((step < 0).any()) or bool((step >= T).any()):
            raise ValueError(f"trace estimator needs every commit_step in [0, {T}) (a finished, recorded rollout)")
        passes = []
        for s0, s1 in self.blocks(T):
            hide = step >= s0
            passes.append(ScoringPass(codes.masked_fill(hide, MASKED), hide & (step < s1) & candidates))
        return _make_plan(passes, codes.shape)


ESTIMATORS: dict[str, type[LogProbEstimator]] = {
    cls.name: cls
    for cls in (
        PromptConditionedEstimator,
        UniGRPOEstimator,
        MaskGRPOEstimator,
        D1Estimator,
        CoupledEstimator,
        TraceEstimator,
    )
}


def build_estimator(name: str, **kwargs: Any) -> LogProbEstimator:
    """``algorithm.estimator.name`` and its arguments -> estimator. Unknown names/arguments raise ValueError."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown {CONFIG_KEY}.name {name!r}; valid names: {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"{CONFIG_KEY}: estimator {name!r} got unknown argument(s) {unknown}; it accepts {params or 'none'}"
        )
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Running a plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenLogProbs:
    logp: torch.Tensor
    """(B, N) float32 log π(x_i | pass state) at scored positions, 0 elsewhere."""
    scored: torch.Tensor
    """(B, N) bool."""
    entropy: torch.Tensor | None = None
    """(B, N) float32 entropy ``−Σ_c π(c | pass state) log π(c | pass state)`` over the image codes at scored
    positions, 0 elsewhere; only when asked for (``token_log_probs(..., with_entropy=True)``)."""

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())


def mask_prompt_words(prompt: PromptTokens, prompt_mask: torch.Tensor | None, mask_id: int) -> PromptTokens:
    """Prompt with the words at ``prompt_mask`` (B, L) replaced by ``mask_id``; padding and attention are kept."""
    if prompt_mask is None:
        return prompt
    if tuple(prompt_mask.shape) != tuple(prompt.ids.shape):
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} must match prompt ids {tuple(prompt.ids.shape)}")
    where = prompt_mask.to(prompt.ids.device).bool() & prompt.mask.bool()
    return PromptTokens(prompt.ids.masked_fill(where, int(mask_id)), prompt.mask)


def _pass_log_probs(policy: Any, prompt: PromptTokens, codes: torch.Tensor, p: ScoringPass,
                    gather_positions: bool, with_entropy: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N) log-probs of the rollout codes from one pass, 0 where the pass scores nothing; with ``with_entropy``
    also the (B, N) entropy of the pass's distribution over image codes there (else None)."""
    B, N = codes.shape
    counts = p.scored.sum(1)
    K = int(counts.max())
    if gather_positions and K < N:
        # Only the scored rows of the LM head: per sample the scored positions first (stable), padded with others.
        order = (~p.scored).long().argsort(dim=1, stable=True)[:, :K]
        logits = policy.image_logits(p.canvas, prompt, positions=order)  # (B, K, C)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scored = p.scored.gather(1, order)
        lp = log_probs.gather(-1, codes.gather(1, order)[..., None]).squeeze(-1).masked_fill(~scored, 0.0)
        out = torch.zeros((B, N), dtype=lp.dtype, device=lp.device).scatter(1, order, lp)
        if not with_entropy:
            return out, None
        ent = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~scored, 0.0)
        return out, torch.zeros((B, N), dtype=ent.dtype, device=ent.device).scatter(1, order, ent)
    logits = policy.image_logits(p.canvas, prompt)  # (B, N, C)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    lp = log_probs.gather(-1, codes[..., None]).squeeze(-1).masked_fill(~p.scored, 0.0)
    if not with_entropy:
        return lp, None
    return lp, -(log_probs.exp() * log_probs).sum(-1).masked_fill(~p.scored, 0.0)


def token_log_probs(
    policy: Any,
    prompt: PromptTokens,
    codes: torch.Tensor,
    plan: ScoringPlan,
    gather_positions: bool = True,
    with_entropy: bool = False,
) -> TokenLogProbs:
    """Per-token log-probs of the rollout ``codes`` (B, N) under ``policy`` for every pass of ``plan``.

    Per pass: one conditional forward (no CFG) ``policy.image_logits(canvas, prompt with the pass's words masked)``,
    log_softmax over the image codes, gathered at the rollout codes, kept at the pass's scored positions. Passes
    score disjoint tokens, so the result is their sum. Differentiable w.r.t. the policy's parameters.

    ``gather_positions`` computes the LM head only at the scored positions (same values, less memory when few
    tokens are scored); False reads logits at all N positions. ``with_entropy`` also returns each scored token's
    entropy over the image codes (``TokenLogProbs.entropy``; same forward, differentiable).
    """
    device = policy.device
    codes = codes.to(device).long()
    prompt = prompt.to(device)
    plan = plan.to(device)
    plan.validate(codes=codes)
    mask_id = int(policy.layout.mask)
    logp = torch.zeros(codes.shape, dtype=torch.float32, device=device)
    entropy = torch.zeros(codes.shape, dtype=torch.float32, device=device) if with_entropy else None
    for p in plan.passes:
        if not bool(p.scored.any()):
            continue
        lp, ent = _pass_log_probs(policy, mask_prompt_words(prompt, p.prompt_mask, mask_id), codes, p,
                                  gather_positions, with_entropy)
        logp = logp + lp
        if entropy is not None:
            entropy = entropy + ent
    scored = plan.scored.to(device) if plan.passes else torch.zeros(codes.shape, dtype=torch.bool, device=device)
    return TokenLogProbs(logp=logp, scored=scored, entropy=entropy)
