"""Samplers for masked-diffusion image generators, recording per token when it was committed and how sure the model was.

Both samplers take either

- a policy with ``guided_image_logits(codes, prompt, guidance_scale)`` (e.g. :class:`MaskedDiffusionPolicy`) and its
  ``prompt`` (:class:`PromptTokens` or a list of strings), or
- a plain function ``logits_fn(codes_with_mask (B,N), guidance_scale) -> logits (B,N,C)`` and, as ``prompt``, the
  initial canvas (B,N) filled with -1.

CFG is ``(1+s)·cond − s·uncond``; policies compute it in ONE batched forward over [cond; uncond] (the uncond half is
skipped when s = 0). Logits are read only at image positions and only over the image-code columns.

- :func:`maskgit_sample`: MaskGIT confidence sampling as in Lumina-DiMOO / MMaDA (reference §3.7, §5.5); with
  ``count_rule="mmada"`` / ``"dimoo"`` its per-step counts are the released samplers' (float32 arithmetic, last-token
  rule), so given the same logits and noise it commits the positions they commit (tests/test_released_samplers.py).
- :func:`emerge_sample`: MaskGRPO's ancestral "emerge" sampler (reference §4.1).

``confidence`` and ``entropy`` are read from the guided distribution softmax(logits) (temperature 1) at the step a
token is committed. All randomness comes from ``generator`` (drawn on its device), so a fixed generator reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from htgrpo.policies.t2i_layout import MASKED

ImageLogitsFn = Callable[[torch.Tensor, float], torch.Tensor]
"""(codes_with_mask (B, N) long, guidance_scale) -> guided logits over image codes (B, N, C)."""


@dataclass
class SampledImageTokens:
    codes: torch.Tensor
    """(B, N) long image codes."""
    commit_step: torch.Tensor
    """(B, N) long: 0-based sampling step at which each token was committed."""
    confidence: torch.Tensor
    """(B, N) float: probability of the committed code at commit time."""
    entropy: torch.Tensor
    """(B, N) float: predictive entropy (nats) of the position's distribution at commit time."""
    num_steps: int

    def to(self, device: torch.device | str) -> SampledImageTokens:
        return SampledImageTokens(
            self.codes.to(device), self.commit_step.to(device), self.confidence.to(device), self.entropy.to(device),
            self.num_steps,
        )

    @staticmethod
    def concat(parts: Sequence[SampledImageTokens]) -> SampledImageTokens:
        """Rows of several samples, in order (micro-batched rollouts). All must share ``num_steps``."""
        if not parts:
            raise ValueError("nothing to concatenate")
        steps = {p.num_steps for p in parts}
        if len(steps) != 1:
            raise ValueError(f"parts were sampled with different num_steps {sorted(steps)}")
        return SampledImageTokens(
            torch.cat([p.codes for p in parts]), torch.cat([p.commit_step for p in parts]),
            torch.cat([p.confidence for p in parts]), torch.cat([p.entropy for p in parts]), parts[0].num_steps,
        )


# ----------------------------------------------------------------------------------------------------------------
# Schedules and noise
# ----------------------------------------------------------------------------------------------------------------


def masked_fraction(ratio: float, schedule: str = "cosine") -> float:
    """Fraction of tokens still masked after progress ``ratio`` in [0, 1]."""
    if schedule == "cosine":
        return math.cos(0.5 * math.pi * ratio)
    if schedule == "linear":
        return 1.0 - ratio
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'linear'")


COUNT_RULES = ("float64", "mmada", "dimoo")
"""How :func:`maskgit_commit_counts` turns the cosine schedule into per-step counts (``sampler.count_rule``)."""


def mmada_keep_target(num_tokens: int, step: int, num_steps: int) -> int:
    """floor(N·cos(π/2·r)), r = (k+1)/T, exactly as MMaDA's ``t2i_generate`` evaluates it (released code, fact).

    r is formed in Python (float64) and becomes a 0-d float32 tensor on the CPU; the schedule is
    ``cos((r·π)·0.5)`` and the product with N is floored, every operation in float32 torch arithmetic. At r = 2/3
    this gives N/2 − 1 where float64 gives N/2 (N = 16, T = 12, k = 7: 7.9999995 against 8.000000000000002).
    torch's float32 cos is not correctly rounded (on the CPU it is 1 ulp off float32(math.cos) for many r), so the
    same torch call is made, not a float64 cos rounded to float32.
    """
    ratio = torch.tensor(1.0 * (step + 1) / num_steps, dtype=torch.float32)  # on the CPU, as released
    fraction = torch.cos(ratio * math.pi * 0.5)
    return int(torch.floor(num_tokens * fraction).item())


def dimoo_keep_target(num_tokens: int, step: int, num_steps: int, device: torch.device | str = "cpu") -> int:
    """max(1, floor(N·cos(π/2·r))), r = (k+1)/T, exactly as Lumina-DiMOO's ``generate_image`` evaluates it (fact).

    r is formed in Python (float64) and becomes a 1-element float32 tensor on the model's ``device``; the schedule
    is ``cos((0.5·π)·r)`` with 0.5·π folded in float64 first; N is cast to float32 and the product floored and
    clamped to >= 1, all float32. It is evaluated on ``device`` as released, since float32 cos kernels need not agree
    in the last bit across devices.
    """
    ratio = torch.tensor([(step + 1) / num_steps], dtype=torch.float32, device=device)
    fraction = torch.cos(0.5 * math.pi * ratio)
    masked_start = torch.tensor([num_tokens], dtype=torch.float32, device=device)
    return int((masked_start * fraction).floor().clamp_min(1).item())


def maskgit_commit_counts(
    num_tokens: int,
    num_steps: int,
    schedule: str = "cosine",
    rule: str = "float64",
    device: torch.device | str = "cpu",
) -> list[int]:
    """Tokens committed at each MaskGIT step; sums to N. M_k = tokens still masked before step k (M_0 = N).

    ``rule``:

    - ``float64``: keep_k = floor(N·γ((k+1)/T)) in float64 (math.cos), clipped to [1, M_k − 1]; 0 at the last
      step. ``sampler=maskgit``'s documented behaviour; ``schedule`` may be ``cosine`` or ``linear``.
    - ``mmada``: MMaDA's ``t2i_generate``: keep_k = max(1, min(:func:`mmada_keep_target`, M_k − 1)), so one lone
      masked token waits (count 0) until the last step, which commits everything (the released code returns the
      step's samples at every position).
    - ``dimoo``: Lumina-DiMOO's ``generate_image``: keep_k = min(:func:`dimoo_keep_target`, M_k − 1), 0 at the last
      step. The clamp to M_k − 1 comes from its ``mask_by_random_topk`` (cut-off index clamped to L − 1 over the L
      masked positions), which commits a lone masked token at once (keep 0); the loop then ends, and later steps
      commit 0. ``device``: where DiMOO's cosine is evaluated (the model's device).

    ``mmada``/``dimoo`` need ``schedule="cosine"`` (the released t2i defaults).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if rule not in COUNT_RULES:
        raise ValueError(f"unknown count rule {rule!r}; expected one of {COUNT_RULES}")
    if rule != "float64" and schedule != "cosine":
        raise ValueError(f"count rule {rule!r} follows the released cosine schedule; got schedule {schedule!r}")
    masked, counts = num_tokens, []
    for k in range(num_steps):
        if masked == 0:  # DiMOO's loop has ended (it breaks once nothing is masked)
            keep = 0
        elif k == num_steps - 1:
            keep = 0
        elif rule == "float64":
            keep = math.floor(num_tokens * masked_fraction((k + 1) / num_steps, schedule))
            keep = max(1, min(keep, masked - 1))
        elif rule == "mmada":
            keep = max(1, min(mmada_keep_target(num_tokens, k, num_steps), masked - 1))
        else:  # dimoo: the >= 1 clamp comes first, then the cut-off clamp to L - 1 (may reach 0)
            keep = min(dimoo_keep_target(num_tokens, k, num_steps, device), masked - 1)
        counts.append(masked - keep)
        masked = keep
    return counts


def _uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


def _gumbel(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = _uniform(shape, generator, device)
    return -torch.log(-torch.log(u.clamp_min(1e-20)))


def _sample_codes(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max sample from softmax(logits / temperature); argmax when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    return (logits / temperature + _gumbel(logits.shape, generator, logits.device)).argmax(-1)


def _resolve(policy: Any, prompt: Any, full_vocab: bool) -> tuple[ImageLogitsFn, torch.Tensor]:
    """-> (logits_fn(codes, guidance_scale), fully masked initial canvas (B, N))."""
    if hasattr(policy, "guided_image_logits"):
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and not isinstance(prompt, torch.Tensor)):
            prompt = policy.encode_prompts(list(prompt) if not isinstance(prompt, str) else [prompt])
        shape = (prompt.batch_size, policy.num_image_tokens)
        canvas = torch.full(shape, MASKED, dtype=torch.long, device=policy.device)

        def fn(codes: torch.Tensor, s: float) -> torch.Tensor:
            return policy.guided_image_logits(codes, prompt, s, full_vocab=full_vocab)

        return fn, canvas
    if callable(policy):
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
            raise TypeError("with a plain logits_fn, pass the initial canvas (B, N) of -1 as `prompt`")
        if bool((prompt != MASKED).any()):
            raise ValueError("the initial canvas must be fully masked (-1)")
        return policy, prompt.long().clone()
    raise TypeError(f"expected a policy with guided_image_logits or a logits_fn, got {type(policy).__name__}")


def _logits(fn: ImageLogitsFn, codes: torch.Tensor, guidance_scale: float, needed: torch.Tensor) -> torch.Tensor:
    """``fn(codes, s)``; a logits_fn that can skip positions (``takes_needed``, the ``kv_refresh`` cache) is also told
    which positions (B, N) this step reads, and may return stale logits elsewhere."""
    if getattr(fn, "takes_needed", False):
        return fn(codes, guidance_scale, needed=needed)
    return fn(codes, guidance_scale)


def _commit(
    out: SampledImageTokens, where: torch.Tensor, step: int, sampled: torch.Tensor, logp: torch.Tensor
) -> None:
    lp = logp.gather(-1, sampled[..., None]).squeeze(-1)
    ent = torch.special.entr(logp.exp()).sum(-1)  # -sum p log p, 0 where p == 0
    out.codes = torch.where(where, sampled, out.codes)
    out.commit_step = torch.where(where, torch.full_like(out.commit_step, step), out.commit_step)
    out.confidence = torch.where(where, lp.exp(), out.confidence)
    out.entropy = torch.where(where, ent, out.entropy)


def _empty_record(canvas: torch.Tensor, num_steps: int) -> SampledImageTokens:
    return SampledImageTokens(
        codes=canvas,
        commit_step=torch.full_like(canvas, -1),
        confidence=torch.zeros(canvas.shape, device=canvas.device),
        entropy=torch.zeros(canvas.shape, device=canvas.device),
        num_steps=num_steps,
    )


# ----------------------------------------------------------------------------------------------------------------
# MaskGIT confidence sampler
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def maskgit_sample(
    policy: Any,
    prompt: Any,
    num_steps: int = 16,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    *,
    noise_anneal: str = "linear",
    choice_temperature: float | None = None,
    count_rule: str = "float64",
    full_vocab: bool = False,
) -> SampledImageTokens:
    """MaskGIT confidence-ordered sampling.

    Step k = 0..T−1: sample a code at every masked position (Gumbel-max at ``temperature``); keep_n positions
    (:func:`maskgit_commit_counts` under ``count_rule``: ``float64``, or the released ``mmada`` / ``dimoo``
    arithmetic and last-token rule) stay masked: those with the lowest ``log p(sampled) + τ_k·Gumbel``; the other
    masked positions are committed. A step that commits nothing (a lone token waiting for the last step under
    ``float64``/``mmada``; the steps after DiMOO's loop ended) runs no forward and draws no noise. ``noise_anneal``
    sets τ_k: ``"linear"`` τ·(1−(k+1)/T) (MaskGIT), ``"compound"`` the product of those factors (MMaDA's in-place
    quirk), ``"none"`` τ (Lumina-DiMOO). τ is ``choice_temperature`` when given (MaskGIT's own default is 4.5), else
    ``temperature`` (MMaDA and DiMOO use one temperature for both).
    ``full_vocab`` (policies only) computes full-vocabulary logits at all positions: a reference path for benchmarks.
    """
    fn, canvas = _resolve(policy, prompt, full_vocab)
    B, N = canvas.shape
    out = _empty_record(canvas, num_steps)
    counts = maskgit_commit_counts(N, num_steps, schedule, count_rule, device=canvas.device)
    base_tau = float(temperature if choice_temperature is None else choice_temperature)
    masked_left, tau = N, base_tau
    for k in range(num_steps):
        ratio = (k + 1) / num_steps
        if noise_anneal == "linear":
            tau = base_tau * (1.0 - ratio)
        elif noise_anneal == "compound":
            tau = tau * (1.0 - ratio)
        elif noise_anneal == "none":
            tau = base_tau
        else:
            raise ValueError(f"unknown noise_anneal {noise_anneal!r}")
        if counts[k] == 0:
            continue
        is_masked = out.codes == MASKED
        logp = torch.log_softmax(_logits(fn, out.codes, guidance_scale, is_masked).float(), dim=-1)
        sampled = _sample_codes(logp, temperature, generator)
        keep = masked_left - counts[k]
        if keep == 0:
            commit = is_masked
        else:
            score = logp.gather(-1, sampled[..., None]).squeeze(-1)
            if tau > 0:
                score = score + tau * _gumbel((B, N), generator, score.device)
            score = score.masked_fill(~is_masked, math.inf)
            stay = torch.zeros_like(is_masked).scatter_(1, score.topk(keep, dim=1, largest=False).indices, True)
            commit = is_masked & ~stay
        _commit(out, commit, k, sampled, logp)
        masked_left = keep
    return out


# ----------------------------------------------------------------------------------------------------------------
# MaskGRPO "emerge" (ancestral) sampler
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def emerge_sample(
    policy: Any,
    prompt: Any,
    num_steps: int = 12,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    *,
    full_vocab: bool = False,
) -> SampledImageTokens:
    """Ancestral sampling of the masked diffusion (MaskGRPO's ``t2i_generate_emerge``).

    Step k: κ_t = γ(k/T), κ_s = γ((k+1)/T). Each masked position stays masked with probability κ_s/κ_t, otherwise it
    takes a code sampled from softmax(logits / temperature) of the (CFG) logits; the last step commits everything.
    Not confidence-ordered; the number committed per step is random. Steps where nothing unmasks skip the forward.
    """
    fn, canvas = _resolve(policy, prompt, full_vocab)
    B, N = canvas.shape
    out = _empty_record(canvas, num_steps)
    for k in range(num_steps):
        is_masked = out.codes == MASKED
        if k == num_steps - 1:
            unmask = is_masked
        else:
            kappa_t = masked_fraction(k / num_steps, schedule)
            kappa_s = masked_fraction((k + 1) / num_steps, schedule)
            stay_prob = kappa_s / kappa_t if kappa_t > 0 else 0.0
            unmask = is_masked & (_uniform((B, N), generator, canvas.device) >= stay_prob)
        if not bool(unmask.any()):
            continue
        logp = torch.log_softmax(_logits(fn, out.codes, guidance_scale, unmask).float(), dim=-1)
        sampled = _sample_codes(logp, temperature, generator)
        _commit(out, unmask, k, sampled, logp)
    return out
