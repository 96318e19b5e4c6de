"""Step-time model of one RL step: FLOPs per phase and predicted seconds on a GPU at a stated MFU.

    python experiments/benchmarks/step_time.py                     # mmada_ht, dimoo_ht, harmon_mar_grpo tables
    python experiments/benchmarks/step_time.py --experiment mmada_ht --mfu 0.35 --peak-tflops 989
    python experiments/benchmarks/step_time.py --self-check        # model vs measured phase times on CPU (< ~2 min)

For a named experiment (its Hydra config is composed: G, prompts per device, sampler steps and CFG, K and the
stages, micro-batches, LoRA and checkpointing) it counts the matmul FLOPs of each phase of one rollout step:

- ``rollout``: every sampler step is one forward pass over B·G sequences, twice that with CFG (cond + uncond in
  one batch), logits at the N image positions over the C image-code columns only;
- ``old/ref``: the log-prob passes before the K updates, no grad. HT-GRPO's ``prompt_conditioned`` estimator scores
  every iteration on the same fully masked canvas, so the trainer computes them once per step (its pass cache):
  one pass of the policy (``old``) and one of the reference (LoRA: adapters disabled, no adapter FLOPs);
- ``update``: K × (forward + backward), with the LM head only at the iteration's scored positions (global: all N,
  structure: φ·N, refinement: (1−φ)·N, times the scored fraction ρ) and, with gradient checkpointing, one more
  forward of every block in the backward (recompute).

Counted: the Linear layers (2·rows·in·out per forward), attention scores and their weighted sum (4·B·T²·D per
block), the LM head columns read, LoRA's two small matmuls. Not counted (as for MFU): norms, RoPE, softmax, sampling
noise, the image tokenizer and the reward. Backward: a trained weight costs 2× its forward (input and weight
gradients), a frozen one 1× (input gradient only: LoRA's base layers and the LM head), attention 2×.

Seconds = FLOPs / (GPUs' peak × MFU). On 8 GPUs with FSDP every rank runs its own B·G images (``data.batch_size``
is per device), so the compute per rank equals one GPU's; FSDP adds the all-gather of the sharded blocks for every
forward (each sampler step, each update forward and its recompute) and the gradient reduce-scatter; the table gives
that traffic and its time at ``--link-gbs`` and assumes it overlaps the compute (step = max of the two per phase).

``--self-check`` runs real HT-GRPO steps of a reduced-size LLaDA policy on CPU (timed at the ``rl_step.py`` phase
boundaries, with the old/ref passes apart from the updates), measures this process's achieved matmul FLOP/s on the
model's own GEMM shape right before each phase, and compares measured seconds with FLOPs / that rate: each phase
within 20%. The calibration runs in the same process as the measurement and both are timed in process CPU seconds
(``time.process_time``), so the check is about the FLOP count, not the machine's load (the machine running the
tests is shared; other processes stretch wall time, not this process's CPU time).

Harmon (MAR-GRPO) is counted from its modules' widths (Qwen2.5-1.5B over the MAR encoder's tokens, mar_huge encoder
and decoder, the 12 × 1536 diffusion head): see :func:`harmon_phase_flops` for what each phase runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import ALL_TARGETS, MMADA_8B, TARGET_INPUT_WIDTH, TARGET_OUTPUT_WIDTH, ModelShape  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA H100 SXM5 dense BF16 tensor-core peak (TFLOP/s, no sparsity): the denominator of MFU here."""

DIMOO_8B = replace(MMADA_8B, embedding_rows=134548)
"""Lumina-DiMOO: LLaDA-8B body (reference §5); LM-head width 126356 + 8192 = 134548 (implied by its sampler, §5.3)."""

DIMOO_TEMPLATED_PROMPT_TOKENS = 40
"""Assumed length of DiMOO's templated prompt (system + user template around a GenEval prompt, ~28 + ~12 tokens):
DiMOO pads a batch only to its longest prompt, so the real value varies; it moves T by a few percent."""


# ----------------------------------------------------------------------------------------------------------------
# FLOP formulas (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def linear_flops(rows: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of ``rows`` vectors through a ``d_in -> d_out`` Linear: 2·rows·d_in·d_out (multiply + add)."""
    return 2 * rows * d_in * d_out


def attention_flops(sequences: int, seq_len: int, d_model: int) -> int:
    """Forward FLOPs of full (bidirectional) attention in one block: scores Q·Kᵀ (2·T·T·D per sequence) and the
    weighted sum P·V (2·T·T·D): 4·B·T²·D. Grouped-query attention does not change it (every query head reads T
    keys of head_dim)."""
    return 4 * sequences * seq_len * seq_len * d_model


def block_linear_flops(shape: ModelShape, rows: int) -> int:
    """Forward FLOPs of one LLaDA block's Linear layers for ``rows`` tokens (multi-head, no GQA):
    q, k, v, attn_out: 4·(2·rows·D·D); ff_proj, up_proj: 2·(2·rows·D·F); ff_out: 2·rows·F·D."""
    D, F = shape.d_model, shape.mlp_hidden
    return 4 * linear_flops(rows, D, D) + 2 * linear_flops(rows, D, F) + linear_flops(rows, F, D)


def lora_flops(shape: ModelShape, rows: int, r: int, targets: tuple[str, ...] = ALL_TARGETS) -> int:
    """Forward FLOPs of one block's LoRA adapters: per target 2·rows·in·r (lora_A) + 2·rows·r·out (lora_B)."""
    width = {"D": shape.d_model, "F": shape.mlp_hidden}
    if r <= 0:
        return 0
    return sum(linear_flops(rows, width[TARGET_INPUT_WIDTH[t]], r)
               + linear_flops(rows, r, width[TARGET_OUTPUT_WIDTH[t]]) for t in targets)


def head_flops(rows: int, d_model: int, columns: int) -> int:
    """LM head at ``rows`` positions over ``columns`` image-code columns only: 2·rows·D·C."""
    return linear_flops(rows, d_model, columns)


@dataclass(frozen=True)
class PassFlops:
    """FLOPs of one pass of the LLaDA body + head, split by what their backward costs."""

    base_linear: int
    """Block Linear layers (frozen under LoRA)."""
    attention: int
    lora: int
    head: int
    first_block_input_grads: int = 0
    """Input gradients a LoRA backward skips: the first block's q, k, v layers (base and lora_A) read the frozen
    embedding's normalised output, which needs no gradient."""

    @property
    def forward(self) -> int:
        return self.base_linear + self.attention + self.lora + self.head


def pass_flops(shape: ModelShape, sequences: int, seq_len: int, head_positions: int, lora_r: int = 0,
               targets: tuple[str, ...] = ALL_TARGETS) -> PassFlops:
    """One forward of ``sequences`` sequences of ``seq_len`` tokens through the L blocks, and the LM head at
    ``head_positions`` positions per sequence over the image columns: L·(linear + attention + LoRA) + head."""
    rows = sequences * seq_len
    L, D = shape.n_layers, shape.d_model
    qkv = [t for t in ("q_proj", "k_proj", "v_proj") if t in targets] if lora_r > 0 else []
    skipped = 3 * linear_flops(rows, D, D) + len(qkv) * linear_flops(rows, D, lora_r)
    return PassFlops(base_linear=L * block_linear_flops(shape, rows),
                     attention=L * attention_flops(sequences, seq_len, D),
                     lora=L * lora_flops(shape, rows, lora_r, targets),
                     head=head_flops(sequences * head_positions, D, shape.image_columns),
                     first_block_input_grads=skipped)


def backward_flops(p: PassFlops, lora: bool, checkpointing: bool) -> int:
    """Backward FLOPs of a pass: attention 2×; LoRA adapters 2× (input + weight gradients); base Linear layers and
    the LM head 1× when frozen (LoRA: input gradients only, less the first block's q/k/v input gradients, which
    nothing needs unless checkpointing makes the embedding output require grad), 2× when trained; + one forward of
    the blocks (not the head) when gradient checkpointing recomputes them."""
    trained = 1 if lora else 2
    bwd = 2 * p.attention + 2 * p.lora + trained * p.base_linear + trained * p.head
    if lora and not checkpointing:  # checkpointed LoRA models make the embedding output require grad (transformers'
        bwd -= p.first_block_input_grads  # enable_input_require_grads), so the first block's input grads do run
    if checkpointing:
        bwd += p.base_linear + p.attention + p.lora
    return bwd


def update_flops(p: PassFlops, lora: bool, checkpointing: bool) -> int:
    """Forward + backward of one update micro-batch: p.forward + :func:`backward_flops`."""
    return p.forward + backward_flops(p, lora, checkpointing)


def maskgit_forward_passes(num_tokens: int, num_steps: int, count_rule: str = "float64") -> int:
    """Forward passes of ``maskgit_sample``: one per step that commits at least one token (a step that commits
    nothing runs no forward)."""
    from htgrpo.policies.sampling import maskgit_commit_counts

    return sum(1 for c in maskgit_commit_counts(num_tokens, num_steps, "cosine", count_rule) if c > 0)


def emerge_forward_passes(num_steps: int) -> int:
    """Forward passes of ``emerge_sample``: one per step (a step where no token of the batch unmasks skips its
    forward; at 1024 tokens per image that has probability ~0, so it is not subtracted)."""
    return num_steps


# ----------------------------------------------------------------------------------------------------------------
# A named experiment
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLaDAStep:
    """What one HT-GRPO rollout step computes on a LLaDA-architecture policy (per device)."""

    name: str
    shape: ModelShape
    seq_len: int
    image_tokens: int
    images: int
    """B·G rollout images per device."""
    sampler_passes: int
    cfg: bool
    update_head_positions: tuple[int, ...]
    """Scored positions per image of each of the K updates."""
    lora_r: int
    lora_targets: tuple[str, ...]
    checkpointing: bool
    beta: float
    old_ref_passes: int = 1
    """Distinct scoring canvases per step (prompt_conditioned: 1)."""

    @property
    def lora(self) -> bool:
        return self.lora_r > 0


@dataclass
class PhaseFlops:
    rollout: float
    old_ref: float
    update: float
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.rollout + self.old_ref + self.update

    def as_dict(self) -> dict[str, float]:
        return {"rollout": self.rollout, "old_ref": self.old_ref, "update": self.update}


def llada_phase_flops(step: LLaDAStep) -> PhaseFlops:
    """FLOPs of the three phases of :class:`LLaDAStep` (see the module docstring)."""
    sh, T, N, B = step.shape, step.seq_len, step.image_tokens, step.images
    r = step.lora_r
    seqs = B * (2 if step.cfg else 1)
    rollout = step.sampler_passes * pass_flops(sh, seqs, T, N, r, step.lora_targets).forward
    old = pass_flops(sh, B, T, N, r, step.lora_targets).forward
    ref = pass_flops(sh, B, T, N, 0).forward if step.beta > 0 else 0
    old_ref = step.old_ref_passes * (old + ref)
    update = sum(update_flops(pass_flops(sh, B, T, k, r, step.lora_targets), step.lora, step.checkpointing)
                 for k in step.update_head_positions)
    return PhaseFlops(rollout=float(rollout), old_ref=float(old_ref), update=float(update))


def compose(name: str, overrides: list[str] | None = None):
    """The composed ``fit`` config of ``experiment=name`` (mandatory paths filled with placeholders)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from htgrpo._hydra import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
            return hydra_compose("fit", overrides=[f"experiment={name}", *(overrides or [])])
    finally:
        GlobalHydra.instance().clear()


def stage_head_positions(algorithm, image_tokens: int) -> tuple[int, ...]:
    """Scored positions per image of each update: n_global × N, n_struct × φN, n_refine × (1−φ)N, each × ρ
    (``algorithm.stages``, ``algorithm.partition.fraction``)."""
    stages = algorithm.get("stages") or {}
    rho = float(stages.get("scored_fraction", 1.0))
    phi = float((algorithm.get("partition") or {}).get("fraction", 0.25))
    n_struct = round(phi * image_tokens)
    per = {"n_global": image_tokens, "n_struct": n_struct, "n_refine": image_tokens - n_struct}
    out: list[int] = []
    for key, tokens in per.items():
        out += [max(1, round(rho * tokens))] * int(stages.get(key, 2))
    return tuple(out)


def llada_step_from_config(name: str, overrides: list[str] | None = None) -> LLaDAStep:
    """:class:`LLaDAStep` of a named MMaDA or DiMOO experiment (the 8B shape from reference §3.2 / §5)."""
    cfg = compose(name, overrides)
    target = str(cfg.policy.get("_target_"))
    res = cfg.policy.resolution
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    rows, cols = int(h) // 16, int(w) // 16
    N = rows * cols
    if target.endswith("build_mmada_policy"):
        shape, T = MMADA_8B, int(cfg.policy.max_text_len) + 1 + 1 + N + 1
    elif target.endswith("build_dimoo_policy"):
        prompt = cfg.policy.max_text_len or DIMOO_TEMPLATED_PROMPT_TOKENS
        shape, T = DIMOO_8B, int(prompt) + 2 + rows * (cols + 1) + 2
    else:
        raise ValueError(f"experiment {name!r}: policy {target} is not a LLaDA 8B policy")
    sampler = cfg.sampler
    steps = int(sampler.num_steps)
    passes = (emerge_forward_passes(steps) if sampler.name == "emerge"
              else maskgit_forward_passes(N, steps, str(sampler.get("count_rule", "float64"))))
    alg = cfg.algorithm
    est = (alg.get("estimator") or {}).get("name", "prompt_conditioned")
    if est != "prompt_conditioned":
        raise ValueError(f"experiment {name!r}: only the prompt_conditioned estimator is modelled, got {est}")
    lora = cfg.policy.get("lora") or {}
    return LLaDAStep(name=name, shape=shape, seq_len=T, image_tokens=N,
                     images=int(cfg.data.batch_size) * int(alg.num_generations), sampler_passes=passes,
                     cfg=float(sampler.guidance_scale) > 0, update_head_positions=stage_head_positions(alg, N),
                     lora_r=int(lora.get("r", 0) or 0), lora_targets=tuple(lora.get("target_modules") or ALL_TARGETS),
                     checkpointing=bool(cfg.policy.gradient_checkpointing), beta=float(alg.beta))


# ----------------------------------------------------------------------------------------------------------------
# Harmon (MAR-GRPO)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarmonStep:
    """Geometry of a MAR-GRPO step on Harmon-1.5B (widths from ``harmon_memory.build_full_size_harmon``)."""

    name: str
    images: int
    prompt_tokens: int = 64
    """Assumed chat-templated GenEval prompt length (the LLM reads it once per rollout, cached)."""
    llm_d: int = 1536
    llm_f: int = 8960
    llm_layers: int = 28
    llm_kv: int = 256
    """Key/value width of Qwen2.5-1.5B (2 KV heads × 128)."""
    mar_d: int = 1280
    mar_depth: int = 20
    buffer: int = 64
    tokens: int = 1024
    """Image tokens (512 px, 32 × 32)."""
    token_dim: int = 16
    head_d: int = 12
    head_w: int = 1536
    ar_steps: int = 64
    head_steps: int = 25
    cfg: bool = True
    train_ar_steps: int = 12
    train_head_steps: int = 10
    mte_trajectories: int = 5
    mte_fraction: float = 0.3
    inner_updates: int = 1


def transformer_layer_flops(rows: int, ctx: int, sequences: int, d: int, f: int, kv: int, swiglu: bool) -> int:
    """One pre-norm transformer layer over ``rows`` = sequences·t new tokens attending to ``ctx`` keys each:
    q, out: 2·(2·rows·d·d); k, v: 2·(2·rows·d·kv); MLP (SwiGLU 3 matrices, GELU 2): n·2·rows·d·f; attention
    4·rows·ctx·d."""
    mlp = (3 if swiglu else 2) * linear_flops(rows, d, f)
    return 2 * linear_flops(rows, d, d) + 2 * linear_flops(rows, d, kv) + mlp + 4 * rows * ctx * d


def harmon_ar_step_flops(s: HarmonStep, sequences: int, visible: int) -> dict[str, int]:
    """One AR step's body for ``sequences`` sequences with ``visible`` known tokens, split by what is trained:
    ``mar``: MAR encoder over buffer + visible tokens and decoder over buffer + all N (ViT blocks, GELU MLP 4×);
    ``llm``: Qwen2.5 over the encoder's tokens (the cached prompt as extra keys) and the two projectors. The
    diffusion head is counted apart (:func:`harmon_head_flops`)."""
    enc_t = s.buffer + visible
    dec_t = s.buffer + s.tokens
    enc = s.mar_depth * transformer_layer_flops(sequences * enc_t, enc_t, sequences, s.mar_d, 4 * s.mar_d, s.mar_d,
                                                False)
    dec = s.mar_depth * transformer_layer_flops(sequences * dec_t, dec_t, sequences, s.mar_d, 4 * s.mar_d, s.mar_d,
                                                False)
    llm = s.llm_layers * transformer_layer_flops(sequences * enc_t, enc_t + s.prompt_tokens, sequences, s.llm_d,
                                                 s.llm_f, s.llm_kv, True)
    proj = 2 * (linear_flops(sequences * enc_t, s.mar_d, s.llm_d) + linear_flops(sequences * enc_t, s.llm_d, s.llm_d))
    return {"mar": enc + dec, "llm": llm + proj}


def harmon_head_flops(s: HarmonStep, rows: int) -> int:
    """Diffusion-head evaluations of ``rows`` (token, timestep) pairs: ``head_d`` residual blocks of width w, each an
    adaLN modulation w → 3w and an MLP w → w → w: rows·head_d·(2·3·w² + 2·2·w²) (embeddings and the final layer,
    under 5%, left out)."""
    w = s.head_w
    return rows * s.head_d * (2 * 3 * w * w + 2 * 2 * w * w)


def cosine_masked(tokens: int, step: int, steps: int) -> int:
    """Tokens still unknown before AR step ``step`` of ``steps`` under MAR's cosine schedule: ⌊N·cos(π/2·k/S)⌋."""
    return int(tokens * math.cos(0.5 * math.pi * step / steps))


def harmon_phase_flops(s: HarmonStep) -> PhaseFlops:
    """MAR-GRPO phases on Harmon (experiment harmon_mar_grpo: frozen LLM, projectors and head; trained MAR):

    rollout: ``ar_steps`` AR steps (known tokens N − ⌊N·cos(π/2·k/S)⌋ before step k), 2× with CFG; each decoded
    token's head chain of ``head_steps`` evaluations, and at the ``train_ar_steps`` logged steps a chain for all N
    positions (as the release logs them), all 2× with CFG; then MTE: S chains of ``head_steps`` on the top
    ``mte_fraction`` of tokens (2× with CFG);
    old_ref: per trained AR step the reference's conditional AR latents and the head at the scored transitions
    (every still-unknown token × ``train_head_steps``; released ratio mode has no separate old pass);
    update: per trained step forward + backward: MAR 3× (trained), LLM and projectors 2× (frozen: input gradients),
    head 2× (frozen: gradients into z) on the scored transitions plus the S critic chains (``mte_fraction`` of them).
    Trained AR steps are random: the expected unknown count is the mean over all steps."""
    B = s.images
    cfg = 2 if s.cfg else 1
    S = s.ar_steps
    masked = [cosine_masked(s.tokens, k, S) for k in range(S)] + [0]
    rollout = 0
    for k in range(S):
        body = harmon_ar_step_flops(s, B * cfg, s.tokens - masked[k])
        decoded = masked[k] - masked[k + 1]
        rollout += body["mar"] + body["llm"] + harmon_head_flops(s, B * cfg * decoded * s.head_steps)
    rollout += s.train_ar_steps * harmon_head_flops(s, B * cfg * s.tokens * s.head_steps)
    mte = s.mte_trajectories * harmon_head_flops(s, int(B * cfg * s.tokens * s.mte_fraction) * s.head_steps)
    mean_body = {key: sum(harmon_ar_step_flops(s, B, s.tokens - masked[k])[key] for k in range(S)) / S
                 for key in ("mar", "llm")}
    mean_scored = sum(masked[:S]) / S
    scored_rows = int(B * mean_scored * s.train_head_steps)
    critic_rows = int(s.mte_trajectories * s.mte_fraction * scored_rows)
    ref = s.train_ar_steps * (mean_body["mar"] + mean_body["llm"] + harmon_head_flops(s, scored_rows))
    update = s.inner_updates * s.train_ar_steps * (3 * mean_body["mar"] + 2 * mean_body["llm"]
                                                   + 2 * harmon_head_flops(s, scored_rows + critic_rows))
    return PhaseFlops(rollout=float(rollout + mte), old_ref=float(ref), update=float(update),
                      detail={"mte": float(mte)})


def harmon_step_from_config(name: str, overrides: list[str] | None = None) -> HarmonStep:
    cfg = compose(name, overrides)
    alg, smp = cfg.algorithm, cfg.sampler
    mte = alg.get("mte") or {}
    res = int(cfg.policy.get("image_size", 512) or 512)
    return HarmonStep(name=name, images=int(cfg.data.batch_size) * int(alg.num_generations),
                      tokens=(res // 16) ** 2, ar_steps=int(smp.num_ar_steps),
                      head_steps=int(str(smp.num_diffusion_steps).lstrip("ddim") or 25),
                      cfg=float(smp.cfg) > 0, train_ar_steps=int(alg.num_train_ar_steps),
                      train_head_steps=int(alg.num_train_diffusion_steps),
                      mte_trajectories=int(mte.get("num_trajectories", 1)),
                      mte_fraction=float(mte.get("top_k_percent", 100)) / 100,
                      inner_updates=int(alg.get("num_inner_updates", 1) or 1))


# ----------------------------------------------------------------------------------------------------------------
# Seconds
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus: int = 1
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    mfu: float = 0.4
    link_gbs: float = 300.0
    """All-gather / reduce-scatter bus bandwidth per GPU, GB/s (NVLink 4 ring, a stated assumption)."""


def seconds(flops: float, hw: Hardware) -> float:
    """Compute seconds of ``flops`` on ONE device of ``hw`` at its MFU: flops / (peak·MFU)."""
    return flops / (hw.peak_tflops * 1e12 * hw.mfu)


def fsdp_gather_bytes(step: LLaDAStep, gpus: int, param_bytes: int = 2) -> dict[str, float]:
    """Per-rank FSDP traffic of one step (blocks sharded, the rest replicated): every forward all-gathers the
    (N−1)/N missing shards of the L blocks (bf16), every checkpointed backward gathers them again; each update
    backward reduce-scatters their fp32 gradients. Rollout: one gather per sampler pass; old/ref: one each; update:
    per update forward + backward (+ recompute with checkpointing, which FSDP gathers with the backward)."""
    frac = (gpus - 1) / gpus
    blocks = step.shape.n_layers * step.shape.block_params()
    gather = param_bytes * blocks * frac
    K = len(step.update_head_positions)
    return {"rollout": step.sampler_passes * gather, "old_ref": 2 * step.old_ref_passes * gather,
            "update": K * (2 * gather + 4 * blocks * frac)}


def predicted_seconds(flops: PhaseFlops, hw: Hardware, traffic: dict[str, float] | None = None) -> dict[str, float]:
    """Per phase max(compute seconds, traffic / link) (traffic overlapped with compute), and the total."""
    out = {}
    for k, f in flops.as_dict().items():
        comm = (traffic or {}).get(k, 0.0) / (hw.link_gbs * 1e9)
        out[k] = max(seconds(f, hw), comm)
    out["total"] = sum(out.values())
    return out


def table(rows: list[tuple[str, PhaseFlops, Hardware, dict | None, int]]) -> str:
    lines = ["| experiment | set-up | images/GPU | rollout PFLOP | old/ref PFLOP | update PFLOP | rollout s | "
             "old/ref s | update s | step s | images/s (all GPUs) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, fl, hw, traffic, images in rows:
        s = predicted_seconds(fl, hw, traffic)
        lines.append(f"| {label} | {hw.name} | {images} | {fl.rollout / 1e15:.2f} | {fl.old_ref / 1e15:.3f} | "
                     f"{fl.update / 1e15:.2f} | {s['rollout']:.1f} | {s['old_ref']:.1f} | {s['update']:.1f} | "
                     f"{s['total']:.1f} | {hw.gpus * images / s['total']:.2f} |")
    return "\n".join(lines)


def default_tables(mfu: float, peak: float, link: float) -> None:
    one = Hardware(f"1×H100, MFU {mfu:.0%}", 1, peak, mfu, link)
    eight = Hardware(f"8×H100 FSDP, MFU {mfu:.0%}", 8, peak, mfu, link)
    rows = []
    for name in ("mmada_ht", "dimoo_ht"):
        st = llada_step_from_config(name)
        rows.append((f"{name}, LoRA r={st.lora_r} (T={st.seq_len}, G·B={st.images}, {st.sampler_passes} passes"
                     f"{' ×2 CFG' if st.cfg else ''}, K={len(st.update_head_positions)})",
                     llada_phase_flops(st), one, None, st.images))
        full = replace(st, lora_r=0)
        rows.append((f"{name}, full fine-tuning", llada_phase_flops(full), eight, fsdp_gather_bytes(full, 8),
                     st.images))
    hs = harmon_step_from_config("harmon_mar_grpo")
    hf = harmon_phase_flops(hs)
    label = (f"harmon_mar_grpo, MAR trained (G·B={hs.images}, {hs.ar_steps} AR × {hs.head_steps} head steps, "
             f"{hs.train_ar_steps} trained, MTE S={hs.mte_trajectories})")
    rows.append((label, hf, one, None, hs.images))
    # Harmon's trained MAR is 0.9 B parameters: its FSDP traffic (one gather per AR step) is small; not modelled.
    rows.append(("harmon_mar_grpo", hf, eight, None, hs.images))
    print(f"Predicted seconds per rollout step at {mfu:.0%} MFU of {peak:.0f} TFLOP/s per GPU; per-device batch "
          f"(data.batch_size) on every GPU; FSDP all-gather / reduce-scatter traffic of the 8B blocks at {link:.0f} "
          f"GB/s, overlapped with compute (phase = max of the two)")
    print(table(rows))


# ----------------------------------------------------------------------------------------------------------------
# Self-check on CPU
# ----------------------------------------------------------------------------------------------------------------

SELF_CHECK = dict(d_model=768, n_layers=2, n_heads=12, mlp_ratio=3.0, prompts=1, generations=4, sampler_steps=4,
                  lora_r=16, steps=2)
"""Reduced size: a ShapesWorld LLaDA policy (T = 301, N = 256 image tokens) wide enough that matmuls dominate."""


def matmul_flops_per_s(rows: int, d_in: int, d_out: int, repeats: int = 3, clock=time.perf_counter) -> float:
    """This process's achieved FLOP/s on a float32 (rows × d_in) @ (d_in × d_out) matmul, median of ``repeats``
    timed with ``clock`` (wall clock by default; ``time.process_time`` for CPU seconds)."""
    import torch

    a, b = torch.randn(rows, d_in), torch.randn(d_in, d_out)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = clock()
        a @ b
        times.append(clock() - t0)
    return linear_flops(rows, d_in, d_out) / statistics.median(times)


def self_check(tolerance: float = 0.2) -> bool:
    """Real HT-GRPO steps of a reduced policy (CPU), measured phase seconds vs FLOPs / calibrated FLOP/s."""
    import os
    import warnings

    import lightning as L
    import torch

    from htgrpo.algorithms.ht_grpo import HTGRPO
    from htgrpo.data.datamodules import PromptDataModule
    from htgrpo.data.prompt_sets import ShapesPromptStream
    from htgrpo.data.shapes.palette import ShapesWorldConfig
    from htgrpo.policies.generators import SamplerSettings
    from htgrpo.policies.shapes_llada import build_masked_diffusion_policy
    from htgrpo.rewards.shapes import ShapesPromptReward

    warnings.filterwarnings("ignore")
    c = SELF_CHECK
    torch.manual_seed(0)
    world = ShapesWorldConfig.roomy()
    lora = {"r": c["lora_r"], "alpha": 2 * c["lora_r"], "dropout": 0.0}
    policy = build_masked_diffusion_policy(world, d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"],
                                           mlp_ratio=c["mlp_ratio"], lora=lora, gradient_checkpointing=True)
    layout = policy.layout
    D, F = c["d_model"], int(c["mlp_ratio"] * c["d_model"])
    images = c["prompts"] * c["generations"]
    rates: dict[str, list[float]] = {"rollout": [], "old_ref": [], "update": []}
    measured: list[dict[str, float]] = []

    def calibrate(phase: str, rows: int) -> None:
        rates[phase].append(matmul_flops_per_s(rows, D, F, clock=time.process_time))

    def timed(phase: str, fn, *args):
        """Run fn, adding its CPU seconds to this step's ``phase`` (the rl_step.py phase boundaries)."""
        t0 = time.process_time()
        out = fn(*args)
        measured[-1][phase] += time.process_time() - t0
        return out

    class Timed(HTGRPO):
        """HTGRPO whose phases (rollout, old/ref passes, K updates) are timed in process CPU seconds, each after a
        matmul calibration of this process's FLOP/s."""

        def rollout(self, batch, scorer=None):
            measured.append({"rollout": 0.0, "old_ref": 0.0, "update": 0.0})
            calibrate("rollout", 2 * images * layout.seq_len)
            return timed("rollout", super().rollout, batch, scorer)

        def plan_inner_iterations(self, scored):
            calibrate("old_ref", images * layout.seq_len)
            out = timed("old_ref", super().plan_inner_iterations, scored)
            calibrate("update", images * layout.seq_len)
            return out

        def inner_update(self, scored, it):
            return timed("update", super().inner_update, scored, it)

    module = Timed(policy, ShapesPromptReward(world, "partial"), num_generations=c["generations"],
                   sampler=SamplerSettings(name="emerge", num_steps=c["sampler_steps"], guidance_scale=3.0),
                   lr=1e-5, beta=0.01)

    data = PromptDataModule(ShapesPromptStream(world, seed=0), batch_size=c["prompts"])
    trainer = L.Trainer(max_epochs=1, limit_train_batches=c["steps"], limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(module, datamodule=data)

    shape = ModelShape(d_model=D, n_layers=c["n_layers"], n_heads=c["n_heads"], mlp_hidden=F,
                       embedding_rows=policy.backbone.config.effective_embedding_size,
                       image_columns=layout.codebook_size)
    alg = {"stages": {"n_global": 2, "n_struct": 2, "n_refine": 2, "scored_fraction": 1.0},
           "partition": {"fraction": 0.25}}
    step = LLaDAStep(name="self-check", shape=shape, seq_len=layout.seq_len, image_tokens=layout.num_image_tokens,
                     images=images, sampler_passes=emerge_forward_passes(c["sampler_steps"]), cfg=True,
                     update_head_positions=stage_head_positions(alg, layout.num_image_tokens), lora_r=c["lora_r"],
                     lora_targets=ALL_TARGETS, checkpointing=True, beta=0.01)
    flops = llada_phase_flops(step).as_dict()
    timed = measured[1:] or measured  # the first step pays one-off costs
    print(f"self-check: ShapesWorld LLaDA D={D} F={F} L={c['n_layers']} T={layout.seq_len} N={layout.num_image_tokens}"
          f", LoRA r={c['lora_r']} + checkpointing, {images} images, {c['sampler_steps']} emerge steps with CFG, K=6; "
          f"CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}")
    print("The CPU's FLOP/s is calibrated in this process (a float32 matmul of the model's (b·T × D) @ (D × F) "
          "shape, measured before each phase) and both it and the phases are timed in process CPU seconds, so the "
          "comparison is about the FLOP count, not the machine's load (other processes only stretch wall time).")
    print("| phase | GFLOP | calibrated GFLOP/CPU-s | predicted CPU s | measured CPU s | error |\n"
          "|---|---|---|---|---|---|")
    ok = True
    tot_pred = tot_meas = 0.0
    for phase in ("rollout", "old_ref", "update"):
        rate = statistics.median(rates[phase])
        pred = flops[phase] / rate
        meas = statistics.median(m[phase] for m in timed)
        err = pred / meas - 1
        ok &= abs(err) <= tolerance
        tot_pred, tot_meas = tot_pred + pred, tot_meas + meas
        print(f"| {phase} | {flops[phase] / 1e9:.1f} | {rate / 1e9:.1f} | {pred:.2f} | {meas:.2f} | {err:+.1%} |")
    err = tot_pred / tot_meas - 1
    ok &= abs(err) <= tolerance
    print(f"| total | {sum(flops.values()) / 1e9:.1f} | | {tot_pred:.2f} | {tot_meas:.2f} | {err:+.1%} |")
    print("self-check:", "OK (every phase within 20%)" if ok else "FAILED (a phase is off by more than 20%)")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default=None, help="one experiment (default: mmada_ht, dimoo_ht, harmon_mar_grpo)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed (default 0.4)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="per-GPU peak (H100 bf16)")
    ap.add_argument("--link-gbs", type=float, default=300.0, help="FSDP collective bandwidth per GPU, GB/s")
    ap.add_argument("--self-check", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.self_check:
        return 0 if self_check() else 1
    if args.experiment is None:
        default_tables(args.mfu, args.peak_tflops, args.link_gbs)
        return 0
    hw = Hardware(f"1×GPU, MFU {args.mfu:.0%}", 1, args.peak_tflops, args.mfu, args.link_gbs)
    if args.experiment.startswith("harmon"):
        hs = harmon_step_from_config(args.experiment)
        print(table([(args.experiment, harmon_phase_flops(hs), hw, None, hs.images)]))
    else:
        st = llada_step_from_config(args.experiment)
        print(table([(args.experiment, llada_phase_flops(st), hw, None, st.images)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
