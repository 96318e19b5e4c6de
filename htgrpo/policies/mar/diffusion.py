"""Gaussian diffusion for MAR's per-token diffusion head (DDPM, cosine schedule, learned-range variance).

Written from the improved-DDPM / MAR DiffLoss description (reference/mar_grpo.md §2.4, §3). Tokens are flat
vectors: every tensor here is ``(N, D)`` (N tokens, D channels) and the timestep ``t`` is a LongTensor ``(N,)`` of
*indices into this diffusion's own (possibly respaced) schedule*.

Schedule (``T`` steps, cosine, Nichol & Dhariwal)::

    ᾱ(s)   = cos²((s + 0.008) / 1.008 · π/2)                   s ∈ [0, 1]
    β_i    = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999)               i = 0 … T−1
    ᾱ_i    = Π_{j≤i} (1 − β_j)

Respacing keeps a subset τ_0 < … < τ_{K−1} of the T steps (:func:`space_timesteps`) and re-derives
``β'_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_{k−1}}`` (ᾱ_{τ_{−1}} = 1), so ``ᾱ'_k = ᾱ_{τ_k}`` exactly. The network is always fed the
*original* timestep τ_k (:attr:`GaussianDiffusion.timestep_map`).

Reverse step (ε-prediction, ``LEARNED_RANGE`` variance; the network outputs ``[ε, v]`` with 2·D channels)::

    x̂_0        = √(1/ᾱ_t) · x_t − √(1/ᾱ_t − 1) · ε
    μ           = c1_t · x̂_0 + c2_t · x_t,     c1_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t),  c2_t = (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t)
                = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t      (the form computed: no float32 cancellation at ᾱ_t ≈ 0)
    β̃_t         = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)                   (posterior variance; log clipped at t=0 by β̃_1)
    log σ²      = f · log β_t + (1 − f) · log β̃_t,   f = (v + 1) / 2
    x_{t−1}     = μ + 1[t≠0] · τ · σ · ξ,           ξ ~ N(0, I), τ = temperature

Classifier-free guidance acts on ε only: ``ε = ε_u + s·(ε_c − ε_u)``; the variance value v is the conditional one
(:func:`cfg_combine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from htgrpo.config import ConfigError, require

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------------------------


def cosine_alpha_bar(s: float) -> float:
    """ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) for s ∈ [0, 1] (improved-DDPM's cosine schedule)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> torch.Tensor:
    """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for i = 0 … T−1, as float64 (T,)."""
    require(int(num_diffusion_timesteps) >= 1, "num_diffusion_timesteps",
            f"must be >= 1, got {num_diffusion_timesteps}")
    T = int(num_diffusion_timesteps)
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> torch.Tensor:
    """``cosine`` (MAR's) or ``linear`` (DDPM's, scaled to T: β from 1e-4·1000/T to 0.02·1000/T), float64 (T,)."""
    if name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    if name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=torch.float64, device="cpu")
    raise ConfigError("noise_schedule", f"must be one of ['cosine', 'linear'], got {name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int] | None) -> list[int]:
    """The kept subset of ``range(num_timesteps)`` (sorted), improved-DDPM style.

    ``section_counts``:
      - ``""`` / None: keep all steps;
      - ``"100"`` or ``"10,15,20"`` (or a list of ints): split ``range(T)`` into as many equal sections as there are
        counts (the first ``T % n`` sections one step longer) and keep ``count`` steps evenly spaced in each, both
        section ends included: section step ``round(k·(size−1)/(count−1))`` for k = 0 … count−1.
        For T = 1000 and ``"100"`` that is round(k·999/99) = 0, 10, 20, …, 989, 999;
      - ``"ddimN"``: the fixed integer stride that gives exactly N steps (DDIM's convention).
    """
    T = int(num_timesteps)
    if section_counts is None or section_counts == "":
        return list(range(T))
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            desired = int(text[len("ddim"):])
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise ConfigError("num_sampling_steps", f"cannot get exactly {desired} steps from {T} with an integer "
                                                    "stride")
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            raise ConfigError("num_sampling_steps", f"must be comma-separated integers like '100' or 'ddim25', got "
                                                    f"{section_counts!r}") from None
    else:
        counts = [int(c) for c in section_counts]
    require(len(counts) >= 1 and all(c >= 1 for c in counts), "num_sampling_steps",
            f"section counts must be >= 1, got {section_counts!r}")
    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        require(count <= size, "num_sampling_steps", f"cannot keep {count} steps out of a section of {size} "
                                                     f"(num_timesteps={T}, sections={counts})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return sorted(set(kept))


def respace_betas(betas: torch.Tensor, use_timesteps: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """β'_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_{k−1}} over the kept steps τ (ᾱ_{τ_{−1}} = 1).

    Returns ``(new_betas float64 (K,), timestep_map long (K,) = τ)``; the respaced ᾱ' equal ᾱ at the kept steps.
    """
    keep = sorted(set(int(t) for t in use_timesteps))
    alphas_cumprod = torch.cumprod(1.0 - betas.to(dtype=torch.float64, device="cpu"), dim=0)
    new_betas, last = [], 1.0
    for t in keep:
        ac = float(alphas_cumprod[t])
        new_betas.append(1.0 - ac / last)
        last = ac
    return (torch.tensor(new_betas, dtype=torch.float64, device="cpu"),
            torch.tensor(keep, dtype=torch.long, device="cpu"))


# ----------------------------------------------------------------------------------------------------------------
# Typed outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MeanVariance:
    """p(x_{t−1} | x_t) from one network output (all (N, D))."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor
    eps: Tensor


@dataclass
class HeadStep:
    """One sampled reverse transition x_t → x_{t−1}.

    ``log_variance`` is the log variance of the distribution ``x_prev`` was actually drawn from: the model's
    learned-range log σ² plus 2·log(temperature). At t = 0 no noise is added (``x_prev == mean``) but the value is
    still recorded, so a log-prob can be computed there (as MAR-GRPO does).
    """

    x_prev: Tensor
    mean: Tensor
    log_variance: Tensor
    x_t: Tensor
    t: Tensor


# ----------------------------------------------------------------------------------------------------------------
# Math helpers
# ----------------------------------------------------------------------------------------------------------------


STD_CLAMPS = ("released", "std")
"""How ``min_std`` bounds σ in a Gaussian log-density (see :func:`gaussian_step_log_prob`)."""


def gaussian_step_log_prob(x_prev: Tensor, mean: Tensor, log_variance: Tensor, reduce: str = "mean",
                           min_std: float = 0.0, clamp: str = "std") -> Tensor:
    """Per-token log N(x_prev; mean, exp(log_variance)·I), elementwise

        log p = −(x_prev − μ)² / (2σ²) − log σ − ½ log 2π,

    then reduced over the last (channel) dim: ``reduce="mean"`` (Flow-GRPO/DDPO convention: a per-dimension
    average, shape ``x.shape[:-1]``), ``"sum"`` (the true joint log density of the token) or ``"none"``
    (elementwise, MAR-GRPO's Harmon code keeps this and reduces through token masks). ``min_std`` = m > 0 bounds σ
    from below (MAR-GRPO uses 1e-6), in one of two ways:

        clamp="std":       σ ← max(σ, m) in both terms
        clamp="released":  −(x − μ)² / (2·max(σ², m)) − log max(σ, m) − ½ log 2π     (MAR-GRPO's code: the same
                           constant bounds σ² in the division and σ in the log, i.e. σ ≥ √m in the division)
    """
    if reduce not in ("mean", "sum", "none"):
        raise ConfigError("reduce", f"must be one of ['mean', 'sum', 'none'], got {reduce!r}")
    if clamp not in STD_CLAMPS:
        raise ConfigError("clamp", f"must be one of {list(STD_CLAMPS)}, got {clamp!r}")
    log_variance_div = log_variance
    if min_std > 0:
        floor = 2.0 * math.log(min_std)
        log_variance_div = log_variance.clamp(min=math.log(min_std) if clamp == "released" else floor)
        log_variance = log_variance.clamp(min=floor)
    elementwise = -0.5 * ((x_prev - mean) ** 2 * torch.exp(-log_variance_div) + log_variance + LOG_2PI)
    if reduce == "none":
        return elementwise
    return elementwise.mean(dim=-1) if reduce == "mean" else elementwise.sum(dim=-1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))) (the tanh approximation used by improved-DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data in [−1, 1] quantised to 256 bins, under N(means, e^{2·log_scales}); edge bins are open."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def cfg_combine(out_cond: Tensor, out_uncond: Tensor, cfg: float) -> Tensor:
    """Guided network output ``[ε_u + cfg·(ε_c − ε_u), v_c]`` from two ``(N, 2D)`` outputs ``[ε, v]``.

    Guidance acts on ε only; the variance value comes from the conditional half (MAR ``forward_with_cfg``).
    cfg = 1 gives the conditional ε, cfg = 0 the unconditional ε.
    """
    if out_cond.shape != out_uncond.shape:
        raise ValueError(f"out_uncond: shape {tuple(out_uncond.shape)} != out_cond shape {tuple(out_cond.shape)}")
    eps_c, v_c = out_cond.chunk(2, dim=-1)
    eps_u, _ = out_uncond.chunk(2, dim=-1)
    return torch.cat([eps_u + cfg * (eps_c - eps_u), v_c], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A (possibly respaced) DDPM with ε-prediction and learned-range variance. Plain Python: no parameters.

    Args:
        betas: float64 (K,) the β of this process (already respaced).
        timestep_map: long (K,) the original timestep fed to the network for each index; default ``arange(K)``.
        original_num_steps: T of the un-respaced schedule (for information).

    All schedule arrays are float64 on CPU; :meth:`_gather` moves the entries needed to the input's device/dtype.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None,
                 original_num_steps: int | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu").flatten()
        if betas.numel() < 1 or bool((betas <= 0).any()) or bool((betas > 1).any()):
            raise ValueError("betas: must be a non-empty 1-d tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self.timestep_map = (torch.arange(self.num_timesteps, device="cpu") if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long, device="cpu"))
        if self.timestep_map.numel() != self.num_timesteps:
            raise ValueError(f"timestep_map: {self.timestep_map.numel()} entries for {self.num_timesteps} betas")
        self.original_num_steps = int(original_num_steps or self.num_timesteps)

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        one = torch.ones(1, dtype=torch.float64, device="cpu")
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: clip its log with β̃_1 (only one step -> fall back to β_0).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # μ = c1·x̂_0(x_t, ε) + c2·x_t rewritten without x̂_0: μ = (x_t − β_t/√(1−ᾱ_t)·ε) / √α_t (same value; avoids
        # float32 cancellation in x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε when ᾱ_t ≈ 0, where 1/√ᾱ_t reaches ~3e4)
        self.mean_coef_xt = 1.0 / alphas.sqrt()
        self.mean_coef_eps = betas / (alphas.sqrt() * (1.0 - self.alphas_cumprod).sqrt())

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, original_num_steps={self.original_num_steps})"

    # -- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _gather(array: torch.Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``array[t]`` as ``like``'s dtype/device, shaped (N, 1, …) to broadcast against ``like`` (N, …)."""
        values = array.to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original timesteps τ_t the network is conditioned on (respacing keeps the network's time axis)."""
        return self.timestep_map.to(t.device)[t]

    def _check_t(self, t: Tensor, x: Tensor) -> None:
        if t.dtype != torch.long or t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: must be a LongTensor of shape ({x.shape[0]},), got {t.dtype} {tuple(t.shape)}")

    # -- forward process ----------------------------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε."""
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t−1} | x_t, x_0): (mean = c1_t·x_0 + c2_t·x_t, variance β̃_t, clipped log β̃_t)."""
        mean = (self._gather(self.posterior_mean_coef1, t, x_t) * x_start
                + self._gather(self.posterior_mean_coef2, t, x_t) * x_t)
        var = self._gather(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    # -- reverse process ----------------------------------------------------------------------------------------

    def learned_range_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """log σ² = f·log β_t + (1 − f)·log β̃_t (clipped), f = (v + 1)/2. v = 1 → log β_t; v = −1 → log β̃_t."""
        max_log = self._gather(self.log_betas, t, v)
        min_log = self._gather(self.posterior_log_variance_clipped, t, v)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor,
                        clip_denoised: bool = False) -> MeanVariance:
        """p(x_{t−1} | x_t) from the network output ``[ε, v]`` (N, 2D) (``clip_denoised``: clamp x̂_0 to [−1, 1])."""
        self._check_t(t, x_t)
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(f"model_output: expected shape {(*x_t.shape[:-1], 2 * x_t.shape[-1])} ([eps, v]), got "
                             f"{tuple(model_output.shape)}")
        eps, v = model_output.chunk(2, dim=-1)
        log_variance = self.learned_range_log_variance(v, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        else:
            mean = self._gather(self.mean_coef_xt, t, x_t) * x_t - self._gather(self.mean_coef_eps, t, x_t) * eps
        return MeanVariance(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance,
                            pred_xstart=pred_xstart, eps=eps)

    def p_sample(self, model_output: Tensor, x_t: Tensor, t: Tensor, temperature: float = 1.0,
                 generator: torch.Generator | None = None, noise: Tensor | None = None) -> HeadStep:
        """x_{t−1} = μ + 1[t≠0]·τ·σ·ξ (ancestral DDPM step with temperature τ). See :class:`HeadStep`."""
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        out = self.p_mean_variance(model_output, x_t, t)
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        x_prev = out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise * temperature
        log_variance = out.log_variance + (2.0 * math.log(temperature) if temperature > 0 else -math.inf)
        return HeadStep(x_prev=x_prev, mean=out.mean, log_variance=log_variance, x_t=x_t, t=t)

    # -- training -----------------------------------------------------------------------------------------------

    def vb_terms_bits(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Variational-bound term per token, in bits: KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) channel-mean for t > 0,
        the discretised-Gaussian decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out.mean, out.log_variance).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance)
        nll = nll.mean(dim=-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Callable[[Tensor, Tensor], Tensor], x_start: Tensor, t: Tensor,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """MAR DiffLoss objective per token: ``loss = mse + vb``.

        ``mse`` = channel-mean (ε − ε_θ)²; ``vb`` = :meth:`vb_terms_bits` with the ε output detached, so the VB term
        trains only the variance value v (improved-DDPM's hybrid loss, no rescaling). ``model(x_t, τ_t)`` receives
        the *original* timesteps. Returns ``{"loss", "mse", "vb"}``, each (N,).
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t))
        eps, v = out.chunk(2, dim=-1)
        vb = self.vb_terms_bits(torch.cat([eps.detach(), v], dim=-1), x_start, x_t, t)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", noise_schedule: str = "cosine",
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """A ``diffusion_steps``-step schedule respaced to ``timestep_respacing`` ("" = all steps, "100", "ddim25")."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    keep = space_timesteps(diffusion_steps, timestep_respacing)
    new_betas, timestep_map = respace_betas(betas, keep)
    return GaussianDiffusion(new_betas, timestep_map, original_num_steps=diffusion_steps)
