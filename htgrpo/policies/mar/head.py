"""MAR's per-token diffusion head: a small adaLN MLP denoiser and the DiffLoss-style wrapper around it.

Architecture (reference/mar_grpo.md §2.4; parameter names are LTH14's ``diffloss.net.*`` so checkpoints load)::

    x (N, D), t (N,), c (N, Dz)
    h = input_proj(x)                                     Linear(D → w)
    y = time_embed(t) + cond_embed(c)                     sinusoid(256) → Linear → SiLU → Linear;  Linear(Dz → w)
    depth × ResBlock:  h = h + gate · mlp(modulate(in_ln(h), shift, scale)),  (shift, scale, gate) = adaLN(y)
    out = final_layer(h, y) = linear(modulate(norm_final(h), shift, scale))      (N, 2D) = [ε, v]

    modulate(h, shift, scale) = h · (1 + scale) + shift

:class:`DiffusionHead` (LTH14 ``DiffLoss``) holds ``net`` plus two plain-Python diffusions: ``train_diffusion`` (1000
cosine steps) and ``gen_diffusion`` (respaced to ``num_sampling_steps``). It trains with :meth:`DiffusionHead.loss`,
samples with :meth:`DiffusionHead.sample_chain` (optionally keeping every transition as a :class:`HeadChain`) and
re-scores stored transitions under the current head/conditioning with :meth:`DiffusionHead.chain_log_probs`, the
quantity RL differentiates (gradients reach z, and the head unless it is frozen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from htgrpo.config import require
from htgrpo.policies.mar.diffusion import (
    GaussianDiffusion,
    HeadStep,
    cfg_combine,
    create_diffusion,
    gaussian_step_log_prob,
)

def _guided(cfg: float | Tensor) -> bool:
    """Whether a guidance scale (a float, or one scale per token as a tensor) asks for the unconditional branch."""
    if torch.is_tensor(cfg):
        return bool((cfg != 1.0).any())
    return cfg != 1.0


# ----------------------------------------------------------------------------------------------------------------
# The denoiser network
# ----------------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x · (1 + scale) + shift."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t ↦ MLP([cos(t·f_0..f_{k−1}), sin(t·f_0..f_{k−1})]), f_i = max_period^(−i/k), k = frequency_embedding_size/2."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """Sinusoidal features (N, dim): cosines first, then sines (zero-padded when dim is odd)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """h + gate · mlp(modulate(in_ln(h), shift, scale)), (shift, scale, gate) = adaLN_modulation(y)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """linear(modulate(norm_final(h), shift, scale)), norm_final without affine parameters."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser ε_θ(x_t, t, c) (with the variance value v): (N, D), (N,), (N, Dz) → (N, 2D).

    Args:
        in_channels: token dim D.
        model_channels: width w.
        out_channels: 2·D (ε and v).
        z_channels: conditioning dim Dz (MAR decoder width).
        num_res_blocks: depth d.
        grad_checkpointing: recompute residual blocks in backward.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias; N(0, 0.02) time MLP; zero adaLN and output layers (so a fresh head
        predicts ε = 0, v = 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        h = self.input_proj(x)
        # The time embedding depends on t only: embed each distinct timestep once (sampling steps share one t).
        t_unique, inverse = torch.unique(t, return_inverse=True)
        y = self.time_embed(t_unique)[inverse] + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)


# ----------------------------------------------------------------------------------------------------------------
# Typed chain records
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HeadChain:
    """The reverse chain of N tokens, T transitions, in sampling order (first row: t = T−1, last row: t = 0).

    Attributes:
        x_t: (T, N, D) the input of each transition.
        x_prev: (T, N, D) the sampled output; ``x_prev[-1]`` is the final token, ``x_prev[k] == x_t[k+1]``.
        mean: (T, N, D) the mean it was drawn around (guided when sampled with CFG).
        log_variance: (T, N, D) the log variance it was drawn with, temperature included (see ``HeadStep``).
        timesteps: (T,) long, indices into the head's sampling diffusion (not the original 0..999 timesteps).
        temperature: the sampling temperature (so a recomputed model variance can be tempered the same way).
    """

    x_t: Tensor
    x_prev: Tensor
    mean: Tensor
    log_variance: Tensor
    timesteps: Tensor
    temperature: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def final(self) -> Tensor:
        """(N, D) the sampled tokens."""
        return self.x_prev[-1]

    def log_prob(self, reduce: str = "mean") -> Tensor:
        """(T, N) per-token log-probs of the stored transitions under the stored Gaussians (the rollout's log-prob)."""
        return gaussian_step_log_prob(self.x_prev, self.mean, self.log_variance, reduce=reduce)

    def select(self, tokens: Tensor) -> "HeadChain":
        """The chain restricted to some tokens (index or bool mask over N)."""
        return HeadChain(self.x_t[:, tokens], self.x_prev[:, tokens], self.mean[:, tokens],
                         self.log_variance[:, tokens], self.timesteps, self.temperature)

    def to(self, device: torch.device | str) -> "HeadChain":
        return HeadChain(self.x_t.to(device), self.x_prev.to(device), self.mean.to(device),
                         self.log_variance.to(device), self.timesteps.to(device), self.temperature)


@dataclass
class HeadSample:
    """Output of :meth:`DiffusionHead.sample_chain`: the tokens (N, D) and, when asked for, the chain."""

    tokens: Tensor
    chain: HeadChain | None = None


@dataclass
class ChainScore:
    """Transitions of a :class:`HeadChain` re-scored under the current head and conditioning.

    Attributes:
        log_prob: (S, N) per-token log-probs (or (S, N, D) with ``reduce="none"``).
        mean: (S, N, D) the recomputed means μ_θ (what MAR-GRPO's KL compares with the reference model's).
        log_variance: (S, N, D) the log variance used (the stored one, or the recomputed model one).
        steps: (S,) long, which rows of the chain were scored.
    """

    log_prob: Tensor
    mean: Tensor
    log_variance: Tensor
    steps: Tensor


# ----------------------------------------------------------------------------------------------------------------
# DiffLoss
# ----------------------------------------------------------------------------------------------------------------


class DiffusionHead(nn.Module):
    """LTH14 ``DiffLoss``: the denoiser ``net`` plus ``train_diffusion`` (1000 steps) and respaced ``gen_diffusion``.

    Args:
        target_channels: token dim D.
        z_channels: conditioning dim Dz (the MAR decoder width).
        depth, width: residual blocks and width of the MLP.
        num_sampling_steps: respacing of the sampling chain ("100", "25", "ddim25", …).
        grad_checkpointing: recompute blocks in backward.
        diffusion_steps / noise_schedule: the training process (MAR: 1000, cosine).
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str = "100", grad_checkpointing: bool = False,
                 diffusion_steps: int = 1000, noise_schedule: str = "cosine"):
        super().__init__()
        require(int(target_channels) >= 1, "target_channels", f"must be >= 1, got {target_channels}")
        require(int(z_channels) >= 1, "z_channels", f"must be >= 1, got {z_channels}")
        require(int(depth) >= 1, "diffloss_d", f"must be >= 1, got {depth}")
        require(int(width) >= 1, "diffloss_w", f"must be >= 1, got {width}")
        self.in_channels = int(target_channels)
        self.z_channels = int(z_channels)
        self.num_sampling_steps = str(num_sampling_steps)
        self.net = SimpleMLPAdaLN(self.in_channels, int(width), 2 * self.in_channels, self.z_channels, int(depth),
                                  grad_checkpointing=grad_checkpointing)
        self.train_diffusion: GaussianDiffusion = create_diffusion("", noise_schedule, diffusion_steps)
        self.gen_diffusion: GaussianDiffusion = create_diffusion(self.num_sampling_steps, noise_schedule,
                                                                 diffusion_steps)

    # -- network call ------------------------------------------------------------------------------------------

    def model_output(self, x_t: Tensor, t: Tensor, z: Tensor, z_uncond: Tensor | None = None,
                     cfg: float | Tensor = 1.0, diffusion: GaussianDiffusion | None = None) -> Tensor:
        """The (guided) network output ``[ε, v]`` (N, 2D) at indices ``t`` of ``diffusion`` (default: sampling one).

        Without ``z_uncond`` (or with cfg == 1) this is the conditional output. Otherwise the net runs once on the
        stacked batch ``[(x_t, z); (x_t, z_uncond)]`` and :func:`cfg_combine` guides ε only. ``cfg`` may also be a
        tensor (N,) of per-token scales (e.g. each token's own AR-step scale under a linear CFG schedule).
        """
        diffusion = diffusion or self.gen_diffusion
        tau = diffusion.model_timesteps(t)
        if z_uncond is None or not _guided(cfg):
            return self.net(x_t, tau, z)
        if z_uncond.shape != z.shape:
            raise ValueError(f"z_uncond: shape {tuple(z_uncond.shape)} != z shape {tuple(z.shape)}")
        both = self.net(torch.cat([x_t, x_t]), torch.cat([tau, tau]), torch.cat([z, z_uncond]))
        out_cond, out_uncond = both.chunk(2, dim=0)
        if torch.is_tensor(cfg):  # one guidance scale per token
            cfg = cfg.to(out_cond.dtype).reshape(-1, 1)
            if cfg.shape[0] != out_cond.shape[0]:
                raise ValueError(f"cfg: {cfg.shape[0]} per-token scales for {out_cond.shape[0]} tokens")
        return cfg_combine(out_cond, out_uncond, cfg)

    # -- training ----------------------------------------------------------------------------------------------

    def loss(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Mean over tokens of the DiffLoss objective (MSE(ε) + VB) at uniform random t ∈ [0, 1000).

        ``target`` (N, D) clean tokens, ``z`` (N, Dz) conditioning, ``mask`` (N,) optional weights (1 = counts).
        """
        if target.dim() != 2 or target.shape[-1] != self.in_channels:
            raise ValueError(f"target: expected (N, {self.in_channels}), got {tuple(target.shape)}")
        if z.shape != (target.shape[0], self.z_channels):
            raise ValueError(f"z: expected ({target.shape[0]}, {self.z_channels}), got {tuple(z.shape)}")
        n = target.shape[0]
        t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), generator=generator, device=target.device)
        noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        terms = self.train_diffusion.training_losses(lambda x, tau: self.net(x, tau, z), target, t, noise)
        loss = terms["loss"]
        if mask is not None:
            mask = mask.to(loss.dtype)
            return (loss * mask).sum() / mask.sum().clamp(min=1.0)
        return loss.mean()

    # -- sampling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_chain(self, z: Tensor, temperature: float = 1.0, cfg: float | Tensor = 1.0, log_steps: bool = False,
                     z_uncond: Tensor | None = None, generator: torch.Generator | None = None,
                     noise: Tensor | None = None, step_noise: Tensor | None = None) -> HeadSample:
        """Run the full reverse chain for N tokens at once, from x_T = ``noise`` (default N(0, I) from ``generator``).

        ``step_noise`` (T, N, D), optional, is the standard normal noise of every reverse step in sampling order
        (default: drawn from ``generator`` step by step); with ``noise`` it fixes the chain completely, e.g. to compare
        one batched call over S·N tokens with S calls over N tokens.

        ``z`` (N, Dz) is the conditional latent; CFG (cfg ≠ 1) needs ``z_uncond`` (N, Dz), and both branches share
        x_t (only the conditional chain is kept, as in MAR). With ``log_steps`` every transition is returned as a
        :class:`HeadChain` (needs temperature > 0 so the transition densities exist). Runs without autograd; the
        stored chain is re-scored with gradients by :meth:`chain_log_probs`.
        """
        if z.dim() != 2 or z.shape[-1] != self.z_channels:
            raise ValueError(f"z: expected (N, {self.z_channels}), got {tuple(z.shape)}")
        if _guided(cfg) and z_uncond is None:
            raise ValueError(f"z_uncond: required for classifier-free guidance (cfg={cfg})")
        if log_steps and temperature <= 0:
            raise ValueError(f"temperature: must be > 0 when log_steps=True, got {temperature}")
        n, device = z.shape[0], z.device
        diffusion = self.gen_diffusion
        dtype = z.dtype if z.is_floating_point() else torch.float32
        if noise is None:
            x = torch.randn((n, self.in_channels), generator=generator, device=device, dtype=dtype)
        else:
            if noise.shape != (n, self.in_channels):
                raise ValueError(f"noise: expected ({n}, {self.in_channels}), got {tuple(noise.shape)}")
            x = noise
        T = diffusion.num_timesteps
        if step_noise is not None and step_noise.shape != (T, n, self.in_channels):
            raise ValueError(f"step_noise: expected ({T}, {n}, {self.in_channels}), got {tuple(step_noise.shape)}")
        steps: list[HeadStep] = []
        for k, i in enumerate(reversed(range(T))):
            t = torch.full((n,), i, dtype=torch.long, device=device)
            out = self.model_output(x, t, z, z_uncond, cfg, diffusion)
            step = diffusion.p_sample(out, x, t, temperature=temperature, generator=generator,
                                      noise=None if step_noise is None else step_noise[k].to(x.dtype))
            if log_steps:
                steps.append(step)
            x = step.x_prev
        chain = None
        if log_steps:
            chain = HeadChain(
                x_t=torch.stack([s.x_t for s in steps]),
                x_prev=torch.stack([s.x_prev for s in steps]),
                mean=torch.stack([s.mean for s in steps]),
                log_variance=torch.stack([s.log_variance for s in steps]),
                timesteps=torch.arange(diffusion.num_timesteps - 1, -1, -1, device=device),
                temperature=float(temperature),
            )
        return HeadSample(tokens=x, chain=chain)

    # -- re-scoring stored transitions --------------------------------------------------------------------------

    def score_chain(self, z: Tensor, chain: HeadChain, steps: Tensor | None = None, z_uncond: Tensor | None = None,
                    cfg: float | Tensor = 1.0, reduce: str = "mean", variance: str = "chain", min_std: float = 0.0,
                    clamp: str = "std") -> ChainScore:
        """Recompute μ_θ(x_t, t, z) for stored transitions and score x_{t−1} under N(μ_θ, σ²).

        Args:
            z: (N, Dz) conditioning (with grad for RL); N must match the chain.
            chain: the stored transitions.
            steps: (S,) rows of the chain to score (default: all T); evaluated in one batched net call.
            z_uncond, cfg: optional guidance, to reproduce the sampling-time means exactly. MAR-GRPO scores with
                the conditional branch only (cfg = 1), even when the rollout used CFG.
            reduce: channel reduction of the log-prob (see ``gaussian_step_log_prob``).
            variance: ``"chain"`` uses the stored (rollout) σ², so gradients flow only through the mean, as in
                MAR-GRPO; ``"model"`` uses the recomputed learned-range σ² (tempered by ``chain.temperature``).
            min_std: lower clamp on σ (MAR-GRPO: 1e-6).
            clamp: how ``min_std`` applies: ``std`` (σ in both terms) or ``released`` (σ² in the division, σ in the
                log; see :func:`~htgrpo.policies.mar.diffusion.gaussian_step_log_prob`).

        Numerics: the first (noisiest) transition is ill-conditioned, μ = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t with 1/√α_t of
        10²–10⁴ under coarse respacing, so in float32 a recomputed μ there can differ from the recorded one by
        ~1e-3–1e-2 (batch-size-dependent matmul rounding); all other steps agree to float precision, and in float64
        everywhere.
        """
        if variance not in ("chain", "model"):
            raise ValueError(f"variance: must be 'chain' or 'model', got {variance!r}")
        T, N, D = chain.x_t.shape
        if z.shape != (N, self.z_channels):
            raise ValueError(f"z: expected ({N}, {self.z_channels}) to match the chain's {N} tokens, got "
                             f"{tuple(z.shape)}")
        if steps is None:
            steps = torch.arange(T, device=chain.x_t.device)
        steps = torch.as_tensor(steps, dtype=torch.long, device=chain.x_t.device).flatten()
        if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= T):
            raise ValueError(f"steps: indices must be in [0, {T}), got {steps.tolist()}")
        S = steps.numel()
        x_t = chain.x_t[steps].reshape(S * N, D)
        t = chain.timesteps[steps].repeat_interleave(N)
        zz = z.repeat(S, 1)
        zu = None if z_uncond is None else z_uncond.repeat(S, 1)
        if torch.is_tensor(cfg):
            cfg = cfg.reshape(-1).repeat(S)
        out = self.model_output(x_t, t, zz, zu, cfg, self.gen_diffusion)
        mv = self.gen_diffusion.p_mean_variance(out, x_t, t)
        mean = mv.mean.reshape(S, N, D)
        if variance == "chain":
            log_variance = chain.log_variance[steps]
        else:
            log_variance = mv.log_variance.reshape(S, N, D) + 2.0 * math.log(chain.temperature)
        log_prob = gaussian_step_log_prob(chain.x_prev[steps], mean, log_variance, reduce=reduce, min_std=min_std,
                                          clamp=clamp)
        return ChainScore(log_prob=log_prob, mean=mean, log_variance=log_variance, steps=steps)

    def chain_log_probs(self, z: Tensor, chain: HeadChain, steps: Tensor | None = None,
                        z_uncond: Tensor | None = None, cfg: float | Tensor = 1.0, reduce: str = "mean",
                        variance: str = "chain", min_std: float = 0.0, clamp: str = "std") -> Tensor:
        """(S, N) per-token log-probs of stored transitions under the current head and ``z`` (differentiable in z and
        in the head's parameters). Same arguments as :meth:`score_chain`."""
        return self.score_chain(z, chain, steps, z_uncond, cfg, reduce, variance, min_std, clamp).log_prob

    def forward(self, target: Tensor, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """The training loss (LTH14 ``DiffLoss.forward``)."""
        return self.loss(target, z, mask)


__all__ = [
    "ChainScore",
    "DiffusionHead",
    "FinalLayer",
    "HeadChain",
    "HeadSample",
    "ResBlock",
    "SimpleMLPAdaLN",
    "TimestepEmbedder",
    "modulate",
]
