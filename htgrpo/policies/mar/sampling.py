"""The MAR sampling loop with the logging MAR-GRPO needs (reference/mar_grpo.md §1.3, §2.5, §4.2).

One rollout of B images, L = seq_h·seq_w tokens, S = ``num_ar_steps``::

    order  = a random permutation of the L positions per image (decode order: order[:, 0] first)
    for step i = 0 … S−1:
        z        = MAR encoder/decoder on the known tokens (cond; and uncond with fake_latent when cfg ≠ 1)
        n_i      = tokens decoded at step i (cosine schedule, :func:`cosine_mask_schedule`)
        decoded  = the next n_i positions of the order
        cfg_i    = cfg (constant) or 1 + (cfg − 1)·(L − mask_len_i)/L (linear, mask_len_i = masked after step i)
        tokens[decoded] = diffusion head chain from fresh noise, conditioned on z[decoded] (guided with cfg_i)

At the steps listed in ``log_ar_steps`` the head denoises **all L positions** of every image (as MAR-GRPO's Harmon
rollout does) and keeps the whole chain, so RL can re-score the step-i transitions of any position and compare head
proposals between steps; only the ``decoded`` positions are written into the image. Every random draw (orders,
head noise) comes from the one ``generator``, so a rollout is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.policies.mar.backbone import MAR
from htgrpo.policies.mar.diffusion import create_diffusion
from htgrpo.policies.mar.head import HeadChain

CFG_SCHEDULES = ("constant", "linear")
MASK_ROUNDINGS = ("floor", "round")
DECODE_ORDERS = ("from_end", "from_start")


@dataclass(frozen=True)
class MaskSchedule:
    """How many tokens each AR step decodes.

    Attributes:
        decoded: tokens decoded at step i (sum = L).
        masked_after: tokens still masked after step i (last = 0).
        cfg_mask_len: the mask length the linear CFG schedule uses at step i (LTH14 uses the clamped
            ``mask_len``, which is 1 at the last step, not 0).
    """

    decoded: tuple[int, ...]
    masked_after: tuple[int, ...]
    cfg_mask_len: tuple[int, ...]


def cosine_mask_schedule(seq_len: int, num_ar_steps: int, rounding: str = "floor") -> MaskSchedule:
    """MAR/MaskGIT cosine schedule: after step i, ``mask_len_i = ⌊L·cos(π/2·(i+1)/S)⌋`` tokens stay masked.

    ``rounding="floor"`` (MAR, Harmon): clamp ``mask_len`` to [1, remaining − 1] so every non-final step decodes
    at least one token while any is left, and the final step decodes everything left.
    ``rounding="round"`` (NOVA): ``mask_len_i = round(L·cos(π/2·(i+1)/S))`` without clamping; steps can decode
    nothing.
    """
    require(int(seq_len) >= 1, "seq_len", f"must be >= 1, got {seq_len}")
    require(int(num_ar_steps) >= 1, "num_ar_steps", f"must be >= 1, got {num_ar_steps}")
    require_choice(rounding, MASK_ROUNDINGS, "mask_rounding")
    L, S = int(seq_len), int(num_ar_steps)
    remaining = L
    decoded, masked_after, cfg_len = [], [], []
    for step in range(S):
        ratio = math.cos(math.pi / 2.0 * (step + 1) / S)
        if rounding == "floor":
            mask_len = max(1, min(remaining - 1, int(math.floor(L * ratio))))
        else:
            mask_len = min(remaining, int(round(L * ratio)))
        cfg_len.append(mask_len)
        after = 0 if step == S - 1 else mask_len
        decoded.append(remaining - after)
        masked_after.append(after)
        remaining = after
    return MaskSchedule(tuple(decoded), tuple(masked_after), tuple(cfg_len))


def cfg_at_step(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """constant: cfg; linear: 1 + (cfg − 1)·(L − mask_len)/L (grows from ≈1 to ≈cfg over the rollout)."""
    require_choice(schedule, CFG_SCHEDULES, "cfg_schedule")
    if schedule == "constant":
        return float(cfg)
    return 1.0 + (float(cfg) - 1.0) * (seq_len - mask_len) / seq_len


@dataclass
class MARStepLog:
    """Everything recorded at one logged AR step (conditional branch).

    Attributes:
        step: the AR step index i.
        input_tokens: (B, L, D) the tokens before the step (unknown positions are 0).
        known: (B, L) bool, positions known before the step (the encoder's visible set; the mask is ``~known``).
        decoded: (B, L) bool, positions decoded at this step.
        z: (B, L, Dz) the conditional AR latent of every position at this step.
        z_uncond: (B, L, Dz) the unconditional one (None without CFG).
        cfg: the guidance scale used at this step.
        chain: the head chain for all B·L positions; token n = b·L + l (so ``chain.x_t.view(T, B, L, D)``).
    """

    step: int
    input_tokens: Tensor
    known: Tensor
    decoded: Tensor
    z: Tensor
    z_uncond: Tensor | None
    cfg: float
    chain: HeadChain

    @property
    def proposals(self) -> Tensor:
        """(B, L, D) the head's final sample at this step for every position (the x_0 proposals)."""
        B, L, D = self.input_tokens.shape
        return self.chain.final.view(B, L, D)


@dataclass
class MARRollout:
    """A MAR rollout of B images.

    Attributes:
        tokens: (B, L, D) the final tokens.
        order: (B, L) long, decode order: ``order[b, k]`` is the k-th position decoded in image b.
        decoded: (S, B, L) bool, which positions each AR step decoded (disjoint, covering all positions).
        step_of_token: (B, L) long, the AR step at which each position was decoded.
        ar_latents: (B, L, Dz) the conditional z each token was decoded from (MAR-GRPO's ``all_ar_latents``).
        ar_latents_uncond: (B, L, Dz) the unconditional z at the same steps (None without CFG).
        cfg_per_step: guidance scale used at each step.
        schedule: the :class:`MaskSchedule`.
        steps: AR step index → :class:`MARStepLog`, for the requested ``log_ar_steps``.
        temperature: head sampling temperature.
    """

    tokens: Tensor
    order: Tensor
    decoded: Tensor
    step_of_token: Tensor
    ar_latents: Tensor
    ar_latents_uncond: Tensor | None
    cfg_per_step: list[float]
    schedule: MaskSchedule
    steps: dict[int, MARStepLog] = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def num_ar_steps(self) -> int:
        return int(self.decoded.shape[0])

    def known_before(self, step: int) -> Tensor:
        """(B, L) bool, positions decoded before AR step ``step``."""
        return self.step_of_token < step


def _as_step_set(log_ar_steps: Iterable[int] | None, num_ar_steps: int) -> set[int]:
    steps = set()
    for s in log_ar_steps or ():
        s = int(s)
        if not 0 <= s < num_ar_steps:
            raise ValueError(f"log_ar_steps: step {s} out of range [0, {num_ar_steps})")
        steps.add(s)
    return steps


def sample_mar(model: MAR, condition: Any = None, *, batch_size: int | None = None, num_ar_steps: int = 64,
               cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
               log_ar_steps: Iterable[int] | None = None, generator: torch.Generator | None = None,
               orders: Tensor | None = None, mask_rounding: str = "floor", eval_mode: bool = True,
               decode_order: str = "from_end") -> MARRollout:
    """Generate B token grids with MAR (no gradients) and return a :class:`MARRollout`.

    Args:
        model: the MAR.
        condition: what the model's conditioner takes (class labels (B,), :class:`TextCondition`, …); None for an
            unconditional model (then ``batch_size`` is required).
        num_ar_steps: S (LTH14 demo and MAR-GRPO: 64).
        cfg, cfg_schedule: guidance scale and ``constant`` | ``linear`` schedule (LTH14 default linear; MAR-GRPO
            Harmon: 3.0 constant). cfg = 1 runs no unconditional branch.
        temperature: head temperature τ (noise scale of every reverse step).
        log_ar_steps: AR step indices whose full head chains (all positions) are kept.
        generator: the only source of randomness (must live on the model's device).
        orders: optional (B, L) orders instead of random ones (read as ``decode_order`` says).
        decode_order: ``from_end`` (LTH14 / Harmon, the release: positions at the END of an order are decoded first,
            since their ``mask_by_order`` keeps ``order[:, :mask_len]`` masked) or ``from_start`` (``order[:, 0]``
            first). For random orders the two are the same distribution; they differ for a given order.
            ``MARRollout.order`` is always the effective decode order (its column 0 is decoded first).
        mask_rounding: ``floor`` (MAR) or ``round`` (NOVA), see :func:`cosine_mask_schedule`.
        eval_mode: run the model in eval mode (no dropout) and restore its mode afterwards.
    """
    require(int(num_ar_steps) >= 1, "num_ar_steps", f"must be >= 1, got {num_ar_steps}")
    require(float(cfg) >= 0, "cfg", f"must be >= 0, got {cfg}")
    require_choice(cfg_schedule, CFG_SCHEDULES, "cfg_schedule")
    require(float(temperature) >= 0, "temperature", f"must be >= 0, got {temperature}")
    require_choice(decode_order, DECODE_ORDERS, "decode_order")
    S = int(num_ar_steps)
    log_set = _as_step_set(log_ar_steps, S)
    if log_set:
        require(float(temperature) > 0, "temperature", "must be > 0 when log_ar_steps is set (the logged "
                                                       "transitions need a density)")
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            return _sample(model, condition, batch_size, S, float(cfg), cfg_schedule, float(temperature), log_set,
                           generator, orders, mask_rounding, decode_order)
    finally:
        model.train(was_training)


def _sample(model: MAR, condition: Any, batch_size: int | None, S: int, cfg: float, cfg_schedule: str,
            temperature: float, log_set: set[int], generator: torch.Generator | None, orders: Tensor | None,
            mask_rounding: str, decode_order: str = "from_end") -> MARRollout:
    device, dtype = model.fake_latent.device, model.fake_latent.dtype
    cond_emb = model.condition_embedding(condition, batch_size=batch_size)   # a buffer tensor, or Harmon's KV cache
    B, L, D, Dz = len(cond_emb), model.seq_len, model.token_embed_dim, model.decoder_embed_dim
    use_cfg = cfg != 1.0
    uncond_emb = model.unconditional_embedding(B, like=cond_emb) if use_cfg else None
    schedule = cosine_mask_schedule(L, S, mask_rounding)

    if orders is None:
        order = model.random_orders(B, generator, device=device)
    else:
        order = torch.as_tensor(orders, device=device).long()
        if order.shape != (B, L) or not bool((order.sort(dim=1).values == torch.arange(L, device=device)).all()):
            raise ValueError(f"orders: expected a permutation of range({L}) per row, shape ({B}, {L})")
    if decode_order == "from_end":
        # LTH14: step i keeps order[:, :mask_len_i] masked, i.e. decodes order[:, mask_len_i:mask_len_{i-1}]; as
        # sets per step that is exactly decoding the reversed order from its start.
        order = order.flip(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=device).expand(B, L))

    tokens = torch.zeros(B, L, D, device=device, dtype=dtype)
    known = torch.zeros(B, L, dtype=torch.bool, device=device)
    decoded_all = torch.zeros(S, B, L, dtype=torch.bool, device=device)
    step_of_token = torch.full((B, L), -1, dtype=torch.long, device=device)
    ar_latents = torch.zeros(B, L, Dz, device=device, dtype=dtype)
    ar_latents_uncond = torch.zeros_like(ar_latents) if use_cfg else None
    cfg_per_step: list[float] = []
    logs: dict[int, MARStepLog] = {}
    head = model.diffloss
    n_known = 0

    for step in range(S):
        n_dec = schedule.decoded[step]
        cfg_i = cfg_at_step(cfg, cfg_schedule, schedule.cfg_mask_len[step], L)
        cfg_per_step.append(cfg_i)
        decoded = (rank >= n_known) & (rank < n_known + n_dec)
        if n_dec == 0 and step not in log_set:
            continue
        mask = ~known
        if use_cfg:
            z, z_u = model.guided_ar_latents(tokens, mask, cond_emb, uncond_emb)
        else:
            z, z_u = model.ar_latents(tokens, mask, cond_emb), None

        if step in log_set:
            out = head.sample_chain(z.reshape(B * L, Dz), temperature, cfg_i, log_steps=True,
                                    z_uncond=None if z_u is None else z_u.reshape(B * L, Dz), generator=generator)
            new_values = out.tokens.view(B, L, D)[decoded]
            logs[step] = MARStepLog(step=step, input_tokens=tokens.clone(), known=known.clone(),
                                    decoded=decoded.clone(), z=z.clone(), z_uncond=None if z_u is None else z_u.clone(),
                                    cfg=cfg_i, chain=out.chain)
        else:
            out = head.sample_chain(z[decoded], temperature, cfg_i, log_steps=False,
                                    z_uncond=None if z_u is None else z_u[decoded], generator=generator)
            new_values = out.tokens

        tokens = tokens.clone()
        tokens[decoded] = new_values.to(tokens.dtype)
        ar_latents[decoded] = z[decoded]
        if use_cfg:
            ar_latents_uncond[decoded] = z_u[decoded]
        decoded_all[step] = decoded
        step_of_token[decoded] = step
        known |= decoded
        n_known += n_dec

    return MARRollout(tokens=tokens, order=order, decoded=decoded_all, step_of_token=step_of_token,
                      ar_latents=ar_latents, ar_latents_uncond=ar_latents_uncond, cfg_per_step=cfg_per_step,
                      schedule=schedule, steps=logs, temperature=temperature)


# ----------------------------------------------------------------------------------------------------------------
# Sampler settings (the ``sampler=mar`` config node), for any MAR policy
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MARSampled:
    """What :meth:`MARSamplerSettings.sample` returns: palette ``codes`` (B, N) (what ``PolicyImageGenerator``
    decodes; None for a policy without a palette ``codec``), the continuous ``tokens`` (B, N, D) and the full
    :class:`MARRollout`."""

    codes: Tensor | None
    tokens: Tensor
    rollout: MARRollout


@dataclass(frozen=True)
class MARSamplerSettings:
    """How a MAR policy turns a prompt into tokens (``conf/sampler/mar.yaml``; MAR's ``sample_tokens`` flags).

    Attributes:
        name: ``mar``.
        num_ar_steps: AR steps S (cosine schedule; MAR / MAR-GRPO: 64).
        cfg: guidance scale of the head's ε: ε_u + cfg·(ε_c − ε_u); 1 = no unconditional branch.
        cfg_schedule: ``constant`` (Harmon in MAR-GRPO) or ``linear`` (LTH14: grows from ≈1 to cfg).
        temperature: head noise scale τ (> 0 for RL: the logged transitions need a density).
        num_diffusion_steps: respacing of the head's sampling chain (25–100 in MAR; null = the policy's own).
        mask_rounding: ``floor`` (MAR/Harmon) or ``round`` (NOVA) in the cosine mask schedule.
        decode_order: ``from_end`` (LTH14 / Harmon / the release) or ``from_start``: which end of an order is decoded
            first (see :func:`sample_mar`; matters only for explicitly given orders).
    """

    name: str = "mar"
    num_ar_steps: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    num_diffusion_steps: int | str | None = "ddim25"
    mask_rounding: str = "floor"
    decode_order: str = "from_end"

    def __post_init__(self) -> None:
        require_choice(self.name, ("mar",), "name")
        require_choice(self.decode_order, DECODE_ORDERS, "decode_order")
        require(int(self.num_ar_steps) >= 1, "num_ar_steps", f"must be >= 1, got {self.num_ar_steps}")
        require(float(self.cfg) >= 0, "cfg", f"must be >= 0, got {self.cfg}")
        require_choice(self.cfg_schedule, CFG_SCHEDULES, "cfg_schedule")
        require(float(self.temperature) >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require_choice(self.mask_rounding, MASK_ROUNDINGS, "mask_rounding")
        if self.num_diffusion_steps is not None:
            try:
                create_diffusion(str(self.num_diffusion_steps))
            except (ValueError, ConfigError) as err:
                msg = err.message if isinstance(err, ConfigError) else str(err)
                raise ConfigError("num_diffusion_steps", msg) from None

    def sample(self, policy: Any, prompt_tokens: Any, generator: torch.Generator | None = None,
               log_ar_steps: Iterable[int] | None = None) -> MARSampled:
        """Sample one token grid per prompt row; ``log_ar_steps`` keeps those steps' full head chains (RL).

        ``policy``: any MAR policy (``.mar``, ``.use_sampling_steps``; ``.codec`` when tokens map to palette codes).
        Sampling runs on ``policy.ar_model`` when the policy has one (what owns the conditioning path: Harmon's
        MAR encoder → LLM → decoder), else on ``policy.mar``.
        """
        if not hasattr(policy, "mar"):
            raise ConfigError("sampler", f"sampler=mar drives a MAR policy, got {type(policy).__name__} "
                                         "(use sampler=emerge or sampler=maskgit for masked-diffusion policies)")
        policy.use_sampling_steps(self.num_diffusion_steps)
        model = policy.ar_model if hasattr(policy, "ar_model") else policy.mar
        rollout = sample_mar(model, prompt_tokens, num_ar_steps=int(self.num_ar_steps), cfg=float(self.cfg),
                             cfg_schedule=self.cfg_schedule, temperature=float(self.temperature),
                             log_ar_steps=log_ar_steps, generator=generator, mask_rounding=self.mask_rounding,
                             decode_order=self.decode_order)
        # Palette policies map tokens to discrete codes (what PolicyImageGenerator decodes); others decode `tokens`.
        codec = getattr(policy, "codec", None)
        codes = codec.tokens_to_codes(rollout.tokens) if codec is not None else None
        return MARSampled(codes=codes, tokens=rollout.tokens, rollout=rollout)


def require_mar_sampler(sampler: Any, key: str = "sampler") -> None:
    """Raise a ConfigError naming ``key`` unless ``sampler`` is a :class:`MARSamplerSettings`."""
    if sampler is not None and not isinstance(sampler, MARSamplerSettings):
        raise ConfigError(key, f"a MAR policy needs the MAR sampler (sampler=mar), got {type(sampler).__name__} "
                               f"{getattr(sampler, 'name', '')!r}")


__all__ = [
    "CFG_SCHEDULES",
    "DECODE_ORDERS",
    "MARRollout",
    "MARSampled",
    "MARSamplerSettings",
    "MARStepLog",
    "MaskSchedule",
    "cfg_at_step",
    "cosine_mask_schedule",
    "require_mar_sampler",
    "sample_mar",
]
