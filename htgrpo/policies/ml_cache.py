"""Max-logit cache (ML-Cache) for sampling LLaDA-architecture image generators (``sampler.cache=ml_cache``).

Lumina-DiMOO's released sampler (``generators/image_generation_generator.py::generate_image`` with ``--use-cache``;
``model/modeling_llada.py``; facts, no code copied) saves most of the work of a denoising step by recomputing only
the positions whose prediction is least settled and reusing everything else from the last step:

- **Refresh steps** compute the whole sequence and fill the caches: step k refreshes when
  ``k <= int(T · warmup_ratio)`` or ``(k − int(T · warmup_ratio)) % refresh_interval == 0`` (:func:`refresh_steps`).
- After a step whose successor is not a refresh step, each sequence (the conditional and, with CFG, the
  unconditional one, each with its own cache) picks the positions to recompute next: the max logit over the image
  codes at every sequence position (prompt positions included), and the positions at or below its
  ``1 − cache_ratio`` quantile (:func:`positions_to_recompute`; 10 % of the sequence at the default 0.9).
- **Cached steps** run only those positions through the blocks: their queries, keys and values are computed from the
  current tokens, the keys/values written into each block's cache, and attention reads every position's key/value
  from the cache (stale ones for the positions not recomputed); the MLP, final norm and LM head run on those
  positions only, and their logits are written into a logit cache that supplies every other position.
- Defaults (``generate_image`` and ``inference_t2i.py``): ``cache_ratio`` 0.9, ``warmup_ratio`` 0.3,
  ``refresh_interval`` 5.

Differences from the release, all where it has no batch: the release asserts one prompt per call; here a batch is
sampled at once and every row picks its own positions (the quantile of each row over its real tokens, pads left out,
so a row's choice is what the release chooses for that prompt alone); rows pad their position lists to the batch's
longest and the padding positions are computed but never written. The refresh schedule is indexed by forward pass
(the samplers skip the forward of a step that commits nothing; ``count_rule=dimoo`` only does so after the last
token, as the release ``break``s). The caches hold keys after RoPE (the release keeps them before and rotates every
step: the same values). The uncond sequence of CFG is the same batch's second half, as in the exact path.

``ml_cache_fresh`` (not in the release) also recomputes, on a cached step, every position whose token changed since
its keys and values were last computed: the release leaves a just-committed token's keys/values as they were while it
was [MASK] until it happens to be chosen or a refresh comes (dKV-Cache's observation: a decoded token's
representation changes once, the step it is decoded, then settles). It costs the newly committed share of the
image per step on top of ``1 − cache_ratio``.

The sampler's logits are therefore approximate on cached steps. RL algorithms whose importance ratios come from a
separate scoring pass (HT-GRPO's prompt-conditioned pass, UniGRPO, MaskGRPO, d1, coupled) are unaffected in how they
score; TraceRL-style estimators read the rollout's own trajectory (``estimator=trace`` re-scores the recorded
commit order with exact forwards), so with a cached rollout the trajectory they re-score was chosen by an
approximate model: the old log-probs they compute are exact for that trajectory, but the trajectory is not the one
the exact policy would have sampled (the behaviour policy is the cached sampler, not π_old).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from htgrpo.config import require
from htgrpo.policies.llada import padding_bias, rotary_cos_sin

CACHES = ("none", "ml_cache", "ml_cache_fresh", "kv_refresh")
"""``sampler.cache`` values: ``none`` (exact sampling), ``ml_cache`` (DiMOO's released cache), ``ml_cache_fresh``
(the same, and every position whose token changed since its keys/values were computed is recomputed too) or
``kv_refresh`` (:class:`KeyValueRefreshLogits`: only the positions the sampler reads and the just-committed ones are
recomputed; a full pass once a share of the image changed)."""


@dataclass(frozen=True)
class MLCacheSettings:
    """The three knobs of DiMOO's ``--use-cache`` (names and defaults as released).

    Attributes:
        cache_ratio: share of positions reused on a cached step, in (0, 1); 1 − cache_ratio are recomputed.
        warmup_ratio: the first ``int(T · warmup_ratio)`` + 1 steps are computed in full, in [0, 1).
        refresh_interval: after the warm-up every ``refresh_interval``-th step is computed in full, >= 1.
    """

    cache_ratio: float = 0.9
    warmup_ratio: float = 0.3
    refresh_interval: int = 5

    def __post_init__(self) -> None:
        require(0 < float(self.cache_ratio) < 1, "cache_ratio", f"must be in (0, 1), got {self.cache_ratio}")
        require(0 <= float(self.warmup_ratio) < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(int(self.refresh_interval) >= 1 and float(self.refresh_interval) == int(self.refresh_interval),
                "refresh_interval", f"must be an integer >= 1, got {self.refresh_interval}")


def refresh_steps(num_steps: int, warmup_ratio: float, refresh_interval: int) -> list[bool]:
    """Which steps run in full: step k when ``k <= w`` or ``(k − w) % refresh_interval == 0``, w = int(T·warmup_ratio)
    (DiMOO's ``generate_image``)."""
    warmup = int(num_steps * warmup_ratio)
    return [k <= warmup or (k - warmup) % refresh_interval == 0 for k in range(num_steps)]


def positions_to_recompute(max_logits: torch.Tensor, valid: torch.Tensor, compute_ratio: float) -> torch.Tensor:
    """(B, T) bool: the valid positions whose max logit is <= the ``compute_ratio`` quantile of the row's valid
    positions (torch.quantile's linear interpolation, as released; pads are left out of the quantile)."""
    conf = max_logits.float().masked_fill(~valid, float("nan"))
    threshold = torch.nanquantile(conf, compute_ratio, dim=-1, keepdim=True)
    return (conf <= threshold) & valid


class _SequenceCache:
    """Per block post-RoPE keys and values, and image-column logits, of one batch of sequences."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None
        self.recompute: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        """(B, T) the token each position's keys/values were computed from."""


class CachedPassLogits:
    """What both caches share: per-block key/value and logit caches of one batch of sequences, the full pass that
    fills them, and the partial pass that runs only chosen positions (``cache.recompute``) against them. A subclass's
    ``__call__`` decides, per sampler step, which of the two runs and what is chosen.

    ``policy``: a :class:`~htgrpo.policies.masked_diffusion.MaskedDiffusionPolicy` (LoRA adapters included);
    ``prompt``: its :class:`PromptTokens`. ``recompute_changed``: a partial pass also runs every position whose token
    changed since its keys/values were computed. One object per sampling call.
    """

    def __init__(self, policy: Any, prompt: Any, recompute_changed: bool = False) -> None:
        self.policy = policy
        self.prompt = prompt
        self.recompute_changed = bool(recompute_changed)
        self.calls = 0
        self.cache = _SequenceCache()
        self.positions_computed = 0
        """Sequence positions run through the blocks so far (the cost measure; a full step adds B·T)."""

    def _sequences(self, codes: torch.Tensor, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of the batch; with CFG the unconditional copies (prompt masked out) follow."""
        codes = codes.to(self.policy.device)
        if guidance_scale == 0:
            return self.policy.sequences(codes, self.prompt)
        p = self.prompt
        both = type(p)(torch.cat([p.ids, p.ids]), torch.cat([p.mask, torch.zeros_like(p.mask)]))
        return self.policy.sequences(torch.cat([codes, codes]), both)

    def _guided_image_logits(self, logits: torch.Tensor, batch: int, guidance_scale: float) -> torch.Tensor:
        """(B, N, C) float image logits of the sequences' logits, ``(1+s)·cond − s·uncond`` with CFG."""
        img = self.policy.layout.image_positions_in(logits.shape[1])
        image_logits = logits[:, img] if isinstance(img, slice) else logits.index_select(1, img.to(logits.device))
        image_logits = image_logits.float()
        if guidance_scale == 0:
            return image_logits
        cond, unc = image_logits[:batch], image_logits[batch:]
        return (1.0 + guidance_scale) * cond - guidance_scale * unc

    # -- passes --------------------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        backbone = _llada(self.policy.backbone)
        x = backbone.get_input_embeddings()(ids)
        if backbone.config.image_grid is not None:
            x = backbone._add_grid_embedding(x)
        return x

    def _tables(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.policy.backbone.config
        return rotary_cos_sin(T, cfg.d_model // cfg.n_heads, float(cfg.rope_theta), device)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        backbone = _llada(self.policy.backbone)
        return backbone.project(_transformer(backbone)["ln_f"](hidden), self.policy.layout.image_columns)

    def _full(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Every position through the blocks (the exact computation), filling the caches: (B, T, C) logits."""
        x = self._embed(ids)
        B, T, _ = x.shape
        cos, sin = self._tables(T, x.device)
        bias = None if bool(attn.all()) else padding_bias(attn, x.dtype)
        keys, values = [], []
        for block in _transformer(self.policy.backbone)["blocks"]:
            h = block.attn_norm(x)
            q, k, v = _qkv(block, h)
            q, k = _rope(q, k, v.dtype, cos[None], sin[None])
            keys.append(k)
            values.append(v)
            x = x + _attend(block, q, k, v, bias)
            x = x + block.mlp(block.ff_norm(x))
        self.cache.keys, self.cache.values = keys, values
        self.cache.ids = ids.clone()
        self.cache.logits = self._head(x)
        self.positions_computed += B * T
        return self.cache.logits

    def _cached(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Only the positions chosen after the last step: (B, T, C) logits, the others from the logit cache."""
        chosen = self.cache.recompute
        if self.recompute_changed:
            chosen = chosen | ((ids != self.cache.ids) & attn.bool())
        B, T = ids.shape
        counts = chosen.sum(1)
        K = int(counts.max())
        # per row the chosen positions first (in order), padded with unchosen ones that are computed, never written
        order = (~chosen).long().argsort(dim=1, stable=True)[:, :K]
        write = chosen.gather(1, order)
        x_all = self._embed(ids)
        D = x_all.shape[-1]
        x = x_all.gather(1, order[..., None].expand(-1, -1, D))
        cos, sin = self._tables(T, x.device)
        cos_k, sin_k = cos[order], sin[order]  # (B, K, head_dim): each row's own positions
        bias = None if bool(attn.all()) else padding_bias(attn, x.dtype)
        for i, block in enumerate(_transformer(self.policy.backbone)["blocks"]):
            h = block.attn_norm(x)
            q, k, v = _qkv(block, h)
            q, k = _rope(q, k, v.dtype, cos_k, sin_k)
            keys = _scatter_rows(self.cache.keys[i], k, order, write)
            values = _scatter_rows(self.cache.values[i], v, order, write)
            self.cache.keys[i], self.cache.values[i] = keys, values
            x = x + _attend(block, q, keys, values, bias)
            x = x + block.mlp(block.ff_norm(x))
        new = self._head(x)
        C = new.shape[-1]
        idx = order[..., None].expand(-1, -1, C)
        kept = self.cache.logits.gather(1, idx)
        self.cache.logits = self.cache.logits.scatter(1, idx, torch.where(write[..., None], new.to(kept.dtype), kept))
        self.cache.ids = self.cache.ids.scatter(1, order, torch.where(write, ids.gather(1, order),
                                                                      self.cache.ids.gather(1, order)))
        self.positions_computed += B * K
        return self.cache.logits


class MaxLogitCacheLogits(CachedPassLogits):
    """Guided image logits with ML-Cache: a ``logits_fn(codes (B, N), guidance_scale) -> (B, N, C)`` for
    :func:`~htgrpo.policies.sampling.maskgit_sample` / :func:`~htgrpo.policies.sampling.emerge_sample`.

    One object per sampling call (it counts forward passes to follow the refresh schedule of ``num_steps``).
    ``recompute_changed``: also recompute every position whose token changed since its keys/values were computed
    (``sampler.cache=ml_cache_fresh``).
    """

    def __init__(self, policy: Any, prompt: Any, num_steps: int, settings: MLCacheSettings,
                 recompute_changed: bool = False) -> None:
        super().__init__(policy, prompt, recompute_changed)
        self.settings = settings
        self.refresh = refresh_steps(int(num_steps), float(settings.warmup_ratio), int(settings.refresh_interval))
        self.compute_ratio = 1.0 - float(settings.cache_ratio)

    def __call__(self, codes: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        refresh = step >= len(self.refresh) or self.refresh[step] or self.cache.recompute is None
        ids, attn = self._sequences(codes, guidance_scale)
        logits = self._full(ids, attn) if refresh else self._cached(ids, attn)
        nxt = step + 1
        if nxt < len(self.refresh) and not self.refresh[nxt]:
            self.cache.recompute = positions_to_recompute(logits.amax(-1), attn.bool(), self.compute_ratio)
        return self._guided_image_logits(logits, codes.shape[0], guidance_scale)


def _llada(backbone: Any) -> Any:
    """The ``LLaDAModelLM`` under a peft wrapper (LoRA), or ``backbone`` itself."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def _transformer(backbone: Any) -> Any:
    return _llada(backbone).model.transformer


def _qkv(block: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, heads, t, head_dim) queries and (B, kv_heads, t, head_dim) keys / values of ``h`` (B, t, D)."""
    B, t, _ = h.shape
    q = block.q_proj(h).view(B, t, block.n_heads, block.head_dim).transpose(1, 2)
    k = block.k_proj(h).view(B, t, block.n_kv_heads, block.head_dim).transpose(1, 2)
    v = block.v_proj(h).view(B, t, block.n_kv_heads, block.head_dim).transpose(1, 2)
    return q, k, v


def _rope(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in float32 (LLaDA's rope_full_precision), cast back, as ``LLaDABlock.attention``; cos/sin (1|B, t, hd)."""
    q_rot, k_rot = apply_rotary_pos_emb(q.float(), k.float(), cos, sin)
    return q_rot.to(dtype), k_rot.to(dtype)


def _attend(block: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention of the queries over all keys, then ``attn_out``: (B, t, D)."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False,
                                       enable_gqa=block.n_kv_heads != block.n_heads)
    B, _, t, _ = q.shape
    return block.attn_out(y.transpose(1, 2).reshape(B, t, -1))


def _scatter_rows(cache: torch.Tensor, new: torch.Tensor, order: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """``cache`` (B, h, T, d) with ``new`` (B, h, K, d) written at positions ``order`` (B, K) where ``write``."""
    B, H, _, d = new.shape
    idx = order[:, None, :, None].expand(B, H, -1, d)
    old = cache.gather(2, idx)
    return cache.scatter(2, idx, torch.where(write[:, None, :, None], new.to(cache.dtype), old))


class KeyValueRefreshLogits(CachedPassLogits):
    """Guided image logits with a key/value cache that recomputes only what the sampler reads
    (``sampler.cache=kv_refresh``; dKV-Cache / dLLM-Cache's idea for bidirectional image generation, facts only).

    A sampler tells the logits_fn which image positions it will read this step (``needed``): the emerge sampler
    draws which positions unmask *before* the forward, independently of the logits, so it reads only those (about
    1/T of the image per step); the MaskGIT sampler ranks every masked position, so it reads all of them. A cached
    step runs through the blocks only

    - the needed positions (their logits are exact given the cached keys/values of the others), and
    - the positions whose token changed since their keys/values were computed (the tokens committed last step:
      dKV-Cache's observation that a decoded token's representation changes once, when it is decoded),

    and attends over every position's cached keys/values (stale for the others, by at most the steps since the last
    full pass). A **full pass** (the exact computation, refilling every cache) runs on the first call and whenever
    the share of the image whose token changed since the last full pass reaches ``refresh_share``: with the cosine
    schedule that is few full passes early, when few tokens commit per step, and more late. Unread positions get the
    logits of their last computation (the samplers do not use them). One object per sampling call.

    Cost: per cached step the needed share plus the newly committed share; for the emerge sampler at T = 12 and
    ``refresh_share`` 0.25 about a third of the positions of exact sampling (:attr:`positions_computed`).
    """

    takes_needed = True
    """The samplers pass ``needed`` (B, N) to a logits_fn with this attribute."""

    def __init__(self, policy: Any, prompt: Any, refresh_share: float = 0.25) -> None:
        require(0 < float(refresh_share) <= 1, "kv_refresh_share", f"must be in (0, 1], got {refresh_share}")
        super().__init__(policy, prompt, recompute_changed=True)
        self.refresh_share = float(refresh_share)
        self.full_ids: torch.Tensor | None = None
        """(B, T) the tokens of the last full pass (what "changed since the last full pass" compares with)."""
        self.full_passes = 0

    def __call__(self, codes: torch.Tensor, guidance_scale: float, needed: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        ids, attn = self._sequences(codes, guidance_scale)
        img = self.policy.layout.image_positions_in(ids.shape[1])
        full = needed is None or self.full_ids is None
        if not full:
            changed = (ids != self.full_ids)[:, img]
            full = float(changed.float().mean()) >= self.refresh_share
        if full:
            logits = self._full(ids, attn)
            self.full_ids = ids.clone()
            self.full_passes += 1
        else:
            need = torch.zeros_like(attn, dtype=torch.bool)
            needed = needed.to(need.device)
            need[:, img] = torch.cat([needed, needed]) if guidance_scale != 0 else needed
            self.cache.recompute = need
            logits = self._cached(ids, attn)
        return self._guided_image_logits(logits, codes.shape[0], guidance_scale)

