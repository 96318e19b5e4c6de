"""Memory model of one HT-GRPO step on a LLaDA-architecture policy (MMaDA-8B, Lumina-DiMOO, the toy).

    python experiments/benchmarks/memory.py                       # mmada_ht tables (LoRA 1 GPU, full FT 8 GPUs)
    python experiments/benchmarks/memory.py --experiment mmada_ht --strategy fsdp --gpus 8 --lora-r 0
    python experiments/benchmarks/memory.py --self-check          # model vs measured peak on a reduced-depth model (CPU)

For a named experiment (its G, K, micro-batch, LoRA and checkpointing settings and sequence length are read from
``conf/experiment/NAME.yaml``; any ``mmada_*``) and a strategy it prints, per GPU, the bytes of: weights (policy, and the reference when it is a
separate copy), LoRA adapters, gradients, optimiser state, and activations per update micro-batch (with and without
gradient checkpointing), the total, and the largest update micro-batch that fits the GPU.

Strategies are counted as ``htgrpo/strategies.py`` runs them (:func:`estimate`): ``fsdp`` shards the LLaDA blocks
only (each an FSDP unit) and keeps the embedding, LM head and norms replicated with their gradients and optimiser
state; ``deepspeed_zero3`` takes one backward pass per optimiser step, so its micro-batch is the whole rollout batch
(:func:`update_micro_batch`); both keep the frozen reference as a replica in the compute dtype.

What dominates is the autograd graph of the update forward (the rollout and the old/reference log-prob passes run
without grad). The model counts, per LLaDA block and token, every tensor autograd saves for the backward pass
(:func:`block_saved_bytes`, itemised in its docstring); it is checked against the measured peak of a real forward +
backward of ``LLaDAModelLM`` (same code, reduced depth and width, real token count) on CPU, where the process's peak
resident memory is read from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``) in a fresh
subprocess whose glibc allocator returns every large block to the system on free. ``--self-check`` prints both and
fails if they differ by more than 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace

GB = 1e9
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Shapes and set-ups
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """LLaDA block geometry. ``embedding_rows``: rows of wte and of the untied LM head; ``image_columns``: LM-head
    columns read for image codes (the update computes logits only there)."""

    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden: int
    embedding_rows: int
    image_columns: int

    def block_params(self) -> int:
        """4·D² (q, k, v, attn_out) + 3·D·F (ff_proj, up_proj, ff_out) + 2·D (the two RMSNorm weights)."""
        D, F = self.d_model, self.mlp_hidden
        return 4 * D * D + 3 * D * F + 2 * D

    def params(self) -> int:
        """L·block + 2·V·D (wte and LM head, untied) + D (ln_f)."""
        return self.n_layers * self.block_params() + self.outside_block_params()

    def outside_block_params(self) -> int:
        """The parameters outside the LLaDA blocks: 2·V·D (wte and the LM head ``ff_out``, untied) + D (ln_f).

        ``GRPOFSDPStrategy`` wraps each block as an FSDP unit and leaves these replicated on every rank."""
        return 2 * self.embedding_rows * self.d_model + self.d_model


MMADA_8B = ModelShape(d_model=4096, n_layers=32, n_heads=32, mlp_hidden=12288, embedding_rows=134656,
                      image_columns=8192)
"""MMaDA-8B (reference §3.2: d_model 4096, 32 layers, 32 heads, mlp 12288, embedding_size 134656, codebook 8192)."""

TARGET_INPUT_WIDTH = {"q_proj": "D", "k_proj": "D", "v_proj": "D", "attn_out": "D", "ff_proj": "D", "up_proj": "D",
                      "ff_out": "F"}
TARGET_OUTPUT_WIDTH = {"q_proj": "D", "k_proj": "D", "v_proj": "D", "attn_out": "D", "ff_proj": "F", "up_proj": "F",
                       "ff_out": "D"}
ALL_TARGETS = tuple(TARGET_INPUT_WIDTH)


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...] = ALL_TARGETS) -> int:
    """L · Σ_targets r·(in + out): lora_A is (r, in), lora_B is (out, r)."""
    width = {"D": shape.d_model, "F": shape.mlp_hidden}
    per_block = sum(r * (width[TARGET_INPUT_WIDTH[t]] + width[TARGET_OUTPUT_WIDTH[t]]) for t in targets)
    return shape.n_layers * per_block


@dataclass(frozen=True)
class Setup:
    """One training configuration. ``precision``: ``bf16-true`` (weights bf16, LoRA adapters fp32), ``bf16-mixed``
    (fp32 weights, bf16 compute) or ``32-true``. ``strategy``: single | ddp | fsdp | deepspeed_zero2 |
    deepspeed_zero3 over ``gpus`` devices. ``scored_tokens``: image tokens whose log-prob an update reads (all N in
    the global stage, the peak)."""

    name: str
    shape: ModelShape
    tokens: int
    image_tokens: int
    num_generations: int
    prompts_per_step: int
    inner_iterations: int
    micro_batch: int
    lora_r: int
    gradient_checkpointing: bool
    precision: str = "bf16-true"
    strategy: str = "single"
    gpus: int = 1
    beta: float = 0.01
    lora_targets: tuple[str, ...] = ALL_TARGETS

    @property
    def lora(self) -> bool:
        return self.lora_r > 0


MMADA_POLICY_TARGET = "htgrpo.policies.pretrained.build_mmada_policy"


def experiment_setup(name: str, overrides: list[str] | None = None) -> Setup:
    """The :class:`Setup` of a named experiment, read from its Hydra config (``conf/experiment/NAME.yaml``).

    From the config: G (``algorithm.num_generations``), prompts per step (``data.batch_size``), K (the stage counts),
    the update micro-batch (``algorithm.micro_batch_size``), β, ``policy.lora.{r, target_modules}`` and
    ``policy.gradient_checkpointing``; MMaDA's sequence length (L+1) + 1 + N + 1 from ``policy.max_text_len`` = L and
    ``policy.resolution`` (N = (res/16)² image tokens; 1283 at 512 px and L = 256, reference §3.6). The backbone
    shape is MMaDA-8B's (reference §3.2): the released config.json is not read, so nothing is downloaded.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from htgrpo._hydra import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose("fit", overrides=[f"experiment={name}", *(overrides or [])])
    GlobalHydra.instance().clear()
    if cfg.policy.get("_target_") != MMADA_POLICY_TARGET:
        raise ValueError(f"experiment {name!r}: the memory model knows the MMaDA-8B shape only "
                         f"(policy._target_ {MMADA_POLICY_TARGET}), got {cfg.policy.get('_target_')}")
    resolution = cfg.policy.resolution
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    image_tokens = (int(height) // 16) * (int(width) // 16)
    stages = cfg.algorithm.get("stages") or {}
    inner = sum(int(stages.get(k, 2)) for k in ("n_global", "n_struct", "n_refine"))
    G = int(cfg.algorithm.num_generations)
    micro = cfg.algorithm.get("micro_batch_size")
    lora = cfg.policy.get("lora") or {}
    return Setup(name=name, shape=MMADA_8B, tokens=int(cfg.policy.max_text_len) + 1 + 1 + image_tokens + 1,
                 image_tokens=image_tokens, num_generations=G, prompts_per_step=int(cfg.data.batch_size),
                 inner_iterations=inner, micro_batch=int(micro) if micro else G * int(cfg.data.batch_size),
                 lora_r=int(lora.get("r", 0) or 0), gradient_checkpointing=bool(cfg.policy.gradient_checkpointing),
                 beta=float(cfg.algorithm.beta),
                 lora_targets=tuple(lora.get("target_modules") or ALL_TARGETS))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def dtype_bytes(setup: Setup) -> tuple[int, int]:
    """(compute bytes s, trainable-weight bytes a): bf16-true -> (2, 4) (adapters fp32), bf16-mixed -> (2, 4),
    32-true -> (4, 4)."""
    return (4, 4) if setup.precision == "32-true" else (2, 4)


def block_saved_bytes(shape: ModelShape, tokens: int, s: int, a: int, lora_r: int,
                      targets: tuple[str, ...] = ALL_TARGETS) -> int:
    """Bytes autograd keeps for one LLaDA block's backward, for ``tokens`` = b·T tokens (BT below).

    With compute dtype of s bytes, trainable-weight dtype of a bytes, D = d_model, F = mlp_hidden, r = LoRA rank:

    common to both (attention through SDPA's fused kernels, which keep q, k, v, out and a per-row logsumexp — no T²;
    the fused output is laid out (B, T, H, hd), so attn_out's input is a view of it, not a copy):
      RMSNorm x2: the fp32 input (x.float(); the block's own tensor when s = 4)   2 · 4·BT·D
      attention: q, k (after RoPE), v, output                                    4 · s·BT·D
      SwiGLU: gate g, silu(g), up u                                              3 · s·BT·F
    LoRA (base weights frozen, so base Linear layers keep no input):
      each adapted Linear keeps its input cast to the adapter dtype. With s < a peft makes one fp32 copy per adapted
      layer (a·BT·in each); with s = a the "copies" are the inputs themselves: q/k/v share the attn-norm output,
      ff_proj/up_proj the ff-norm output, attn_out reads the attention output (already counted), ff_out silu(g)·u
      each adapter keeps lora_A's output                                         a·BT·r per target
    full fine-tuning (every weight trainable):
      RMSNorm weight-multiply keeps the normalised input                         2 · s·BT·D
      Linear inputs: attn-norm output (shared by q/k/v), ff-norm output (shared by
      ff_proj/up_proj), silu(g)·u (attn_out's input is the attention output)     2 · s·BT·D + s·BT·F
    """
    D, F = shape.d_model, shape.mlp_hidden
    bt = tokens
    total = 2 * 4 * bt * D + 4 * s * bt * D + 3 * s * bt * F
    if lora_r > 0:
        width = {"D": D, "F": F}
        if s < a:  # a separate fp32 copy per adapted layer
            copies = [width[TARGET_INPUT_WIDTH[t]] for t in targets]
        else:  # the layer inputs themselves; layers that share an input share it, attn_out's is counted above
            groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "ff_proj": "mlp_in",
                      "up_proj": "mlp_in", "ff_out": "mlp_mid"}
            copies = list({groups[t]: width[TARGET_INPUT_WIDTH[t]] for t in targets if t in groups}.values())
        total += sum(a * bt * w for w in copies) + len(targets) * a * bt * lora_r
    else:
        total += 2 * s * bt * D + 2 * s * bt * D + s * bt * F
    return total


def head_saved_bytes(shape: ModelShape, sequences: int, tokens: int, scored: int, s: int, lora: bool) -> int:
    """The LM head at the K scored positions, over the C image columns only (b = sequences).

    ln_f's fp32 input: with s = 2 a float copy of the scored rows (4·bK·D); with s = 4 the scored rows are a view of
    the last block's output, which is then kept whole (4·bT·D). The float32 logits kept by log_softmax (4·bK·C).
    Full fine-tuning adds ln_f's normalised input and the LM head's input (2 · s·bK·D).
    """
    bk = sequences * scored
    norm_input = 4 * bk * shape.d_model if s < 4 else 4 * sequences * tokens * shape.d_model
    total = norm_input + 4 * bk * shape.image_columns
    if not lora:
        total += 2 * s * bk * shape.d_model
    return total


def backward_workspace_bytes(shape: ModelShape, tokens: int, s: int, a: int) -> int:
    """Transient gradients alive at once inside one block's backward beyond the saved tensors (which are freed as
    the backward proceeds): about two BT·F gradients of the SwiGLU in the compute dtype and two BT·D gradients
    (block output, LoRA path) in the adapter dtype: 2·s·BT·F + 2·a·BT·D."""
    return 2 * s * tokens * shape.mlp_hidden + 2 * a * tokens * shape.d_model


def activation_bytes(setup: Setup, micro_batch: int | None = None) -> int:
    """Peak activation memory of one update micro-batch (forward with grad + backward).

    Without checkpointing: L · block_saved + head + workspace. With gradient checkpointing each block keeps only its
    input (s·BT·D) and one block is recomputed at a time: L·s·BT·D + block_saved + head + workspace.
    """
    b = setup.micro_batch if micro_batch is None else micro_batch
    s, a = dtype_bytes(setup)
    bt = b * setup.tokens
    block = block_saved_bytes(setup.shape, bt, s, a, setup.lora_r, setup.lora_targets)
    head = head_saved_bytes(setup.shape, b, setup.tokens, setup.image_tokens, s, setup.lora)
    work = backward_workspace_bytes(setup.shape, bt, s, a)
    L = setup.shape.n_layers
    if setup.gradient_checkpointing:
        return L * s * bt * setup.shape.d_model + block + head + work
    return L * block + head + work


@dataclass
class MemoryBreakdown:
    """Bytes per GPU."""

    weights: float
    reference: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    micro_batch: int

    @property
    def static(self) -> float:
        return self.weights + self.reference + self.adapters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations


def rollout_batch(setup: Setup) -> int:
    """Images one rank updates on per optimiser step: prompts per step (per device) · G."""
    return setup.prompts_per_step * setup.num_generations


def update_micro_batch(setup: Setup, micro_batch: int | None = None) -> int:
    """The images of one update forward + backward.

    ``deepspeed_zero3``: ``GRPODeepSpeedStrategy`` refuses a second backward pass before an optimiser step (under
    ZeRO-3 the gradients of several backward passes did not add up), so an update is one backward over the whole
    rollout batch (``algorithm.micro_batch_size=null``): always :func:`rollout_batch`, whatever the config's
    micro-batch, and an explicit smaller ``micro_batch`` is refused. Otherwise ``micro_batch`` or the set-up's.
    """
    if setup.strategy == "deepspeed_zero3":
        whole = rollout_batch(setup)
        if micro_batch is not None and micro_batch != whole:
            raise ValueError(f"deepspeed_zero3 takes one backward over the rollout batch ({whole} images, "
                             f"algorithm.micro_batch_size=null); a micro-batch of {micro_batch} is not possible")
        return whole
    return setup.micro_batch if micro_batch is None else micro_batch


def estimate(setup: Setup, micro_batch: int | None = None) -> MemoryBreakdown:
    """Per-GPU bytes of one HT-GRPO update (the step's peak) for ``setup``.

    LoRA (bf16-true): frozen weights 2·P on every GPU; adapters, their gradients 4·P_lora each, AdamW moments 8·P_lora;
    the reference is the same weights with adapters disabled (0 extra).
    Full fine-tuning (bf16-mixed: fp32 master weights, bf16 compute), AdamW 8 bytes per parameter; P = P_b + P_o with
    P_b the L blocks' parameters and P_o those outside them (wte, LM head, ln_f: 1.10 B of MMaDA-8B's 8.08 B):
      single/ddp: weights 4·P, grads 4·P, optimiser 8·P, all replicated;
      fsdp (``GRPOFSDPStrategy``, FULL_SHARD): only the blocks are FSDP units; the rest is replicated on every rank
        with its gradients averaged over the ranks: weights 4·P_b/N + 4·P_o + two gathered bf16 blocks (current and
        prefetched), grads 4·P_b/N + 4·P_o, optimiser 8·P_b/N + 8·P_o;
      deepspeed_zero2: bf16 weights 2·P replicated + fp32 master 4·P/N, grads 4·P/N, optimiser 8·P/N;
      deepspeed_zero3: bf16 weights 2·P/N + master 4·P/N + two gathered blocks, grads 4·P/N, optimiser 8·P/N, and
        the activations of the whole rollout batch (:func:`update_micro_batch`);
      the reference (beta > 0) is a frozen deep copy of the starting policy, replicated on every GPU (never sharded
      or wrapped): ``keep_out_of_strategy`` casts it to the compute dtype under fsdp and DeepSpeed with bf16-mixed
      (2·P); single/ddp keep it in the policy's weight dtype (4·P with fp32 weights).
    """
    P = setup.shape.params()
    N = setup.gpus
    b = update_micro_batch(setup, micro_batch)
    acts = activation_bytes(setup, b)
    if setup.lora:
        Pl = lora_params(setup.shape, setup.lora_r, setup.lora_targets)
        weight_bytes = 2 if setup.precision == "bf16-true" else 4
        return MemoryBreakdown(weights=weight_bytes * P, reference=0.0, adapters=4 * Pl, gradients=4 * Pl,
                               optimizer=8 * Pl, activations=acts, micro_batch=b)
    gathered = 2 * 2 * setup.shape.block_params()
    P_out = setup.shape.outside_block_params()
    P_blocks = P - P_out
    strategy = setup.strategy
    if strategy in ("single", "ddp"):
        weights, grads, opt = 4 * P, 4 * P, 8 * P
    elif strategy == "fsdp":
        weights = 4 * P_blocks / N + 4 * P_out + gathered
        grads, opt = 4 * P_blocks / N + 4 * P_out, 8 * P_blocks / N + 8 * P_out
    elif strategy == "deepspeed_zero2":
        weights, grads, opt = 2 * P + 4 * P / N, 4 * P / N, 8 * P / N
    elif strategy == "deepspeed_zero3":
        weights, grads, opt = 2 * P / N + 4 * P / N + gathered, 4 * P / N, 8 * P / N
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    sharded_half = strategy != "single" and strategy != "ddp" and setup.precision == "bf16-mixed"
    reference = (2 if sharded_half else 4) * P if setup.beta > 0 else 0.0
    return MemoryBreakdown(weights=weights, reference=reference, adapters=0.0, gradients=grads, optimizer=opt,
                           activations=acts, micro_batch=b)


CUDA_OVERHEAD = 2 * GB
"""Kept free for the CUDA context, cuBLAS/SDPA workspaces and allocator fragmentation when deciding what fits."""


def fits(breakdown: MemoryBreakdown, gpu_bytes: float) -> bool:
    return breakdown.total + CUDA_OVERHEAD <= gpu_bytes


def max_micro_batch(setup: Setup, gpu_bytes: float) -> int:
    """Largest update micro-batch (at most the rollout batch, prompts · G) that fits ``gpu_bytes`` (0 if none).

    Under deepspeed_zero3 the micro-batch is the rollout batch itself, so this is the largest rollout batch per GPU
    (prompts per step · G) whose one backward fits."""
    best = 0
    for b in range(1, rollout_batch(setup) + 1):
        # ZeRO-3: the same set-up with a rollout batch of b images (one prompt, G = b)
        trial = replace(setup, prompts_per_step=1, num_generations=b) if setup.strategy == "deepspeed_zero3" else setup
        if fits(estimate(trial, None if setup.strategy == "deepspeed_zero3" else b), gpu_bytes):
            best = b
    return best


def table(setups: list[Setup], gpu_bytes: float) -> str:
    """Markdown table of per-GPU GB (1e9 bytes) for each set-up; "fits" keeps 2 GB free (``CUDA_OVERHEAD``)."""
    rows = ["| set-up | GPUs | micro-batch | weights | reference | adapters | grads | optimiser | activations |"
            " total | fits | max micro-batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in setups:
        m = estimate(st)
        label = (f"{st.name} LoRA r={st.lora_r} {st.precision}" if st.lora else f"{st.name} full FT {st.strategy}"
                 f" {st.precision}") + (" + ckpt" if st.gradient_checkpointing else "")
        ok = "yes" if fits(m, gpu_bytes) else "no"
        rows.append(f"| {label} | {st.gpus} | {m.micro_batch} | {m.weights / GB:.1f} | {m.reference / GB:.1f} | "
                    f"{m.adapters / GB:.2f} | {m.gradients / GB:.2f} | {m.optimizer / GB:.2f} | "
                    f"{m.activations / GB:.1f} | {m.total / GB:.1f} | {ok} | {max_micro_batch(st, gpu_bytes)} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Self-check: the model against a measured peak on CPU
# ----------------------------------------------------------------------------------------------------------------

SELF_CHECK_SHAPE = ModelShape(d_model=256, n_layers=2, n_heads=4, mlp_hidden=768, embedding_rows=1024,
                              image_columns=512)
"""Reduced depth and width; the token count (1283) and image tokens (1024) are MMaDA's."""


def self_check_setups() -> list[Setup]:
    base = Setup(name="reduced", shape=SELF_CHECK_SHAPE, tokens=1283, image_tokens=1024, num_generations=9,
                 prompts_per_step=1, inner_iterations=6, micro_batch=2, lora_r=16, gradient_checkpointing=False,
                 precision="32-true")
    return [base, replace(base, gradient_checkpointing=True), replace(base, precision="bf16-true"),
            replace(base, precision="bf16-true", gradient_checkpointing=True), replace(base, lora_r=0)]


def measured_update_peak(setup: Setup) -> dict[str, float]:
    """Run one update forward + backward of a real ``LLaDAModelLM`` with ``setup``'s shape in a fresh subprocess and
    return its peak resident memory above the state before the forward (bytes), and the predicted value."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, __file__, "--measure-one", json.dumps(_setup_to_json(setup))],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    predicted = activation_bytes(setup) + 4 * (lora_params(setup.shape, setup.lora_r, setup.lora_targets)
                                               if setup.lora else setup.shape.params())
    return {"measured": measured["peak_bytes"], "predicted": float(predicted)}


def _setup_to_json(setup: Setup) -> dict:
    d = asdict(setup)
    d["lora_targets"] = list(setup.lora_targets)
    return d


def _setup_from_json(d: dict) -> Setup:
    d = dict(d)
    d["shape"] = ModelShape(**d["shape"])
    d["lora_targets"] = tuple(d["lora_targets"])
    return Setup(**d)


def _measure_one(setup: Setup) -> dict[str, float]:
    """(Runs in the subprocess.) Peak RSS of one forward + backward above the pre-forward RSS.

    The update's path: ``final_hidden`` at the image positions, ``project`` on the image columns only, float32
    log-softmax gathered at the rollout codes, mean -> backward. Parameter gradients (fp32, trainable only) are part
    of the measured peak, so the prediction adds 4 bytes per trainable parameter.
    """
    import gc
    import types

    import torch

    from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM
    from htgrpo.policies.lora import apply_lora

    torch.manual_seed(0)
    sh = setup.shape
    config = LLaDAConfig(d_model=sh.d_model, n_heads=sh.n_heads, n_layers=sh.n_layers, mlp_hidden_size=sh.mlp_hidden,
                         vocab_size=sh.embedding_rows, embedding_size=sh.embedding_rows,
                         max_sequence_length=setup.tokens, rope_theta=10000.0, mask_token_id=sh.embedding_rows - 1)
    holder = types.SimpleNamespace(backbone=LLaDAModelLM(config))
    lora = {"r": setup.lora_r, "alpha": 2 * setup.lora_r, "target_modules": list(setup.lora_targets)}
    apply_lora(holder, lora if setup.lora else None, setup.gradient_checkpointing)
    model = holder.backbone
    if setup.precision == "bf16-true":
        model.to(torch.bfloat16)  # what Lightning's bf16-true does; then the adapters back to fp32 (keep_trainable_fp32)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    b, T, K = setup.micro_batch, setup.tokens, setup.image_tokens
    ids = torch.randint(0, sh.embedding_rows - 1, (b, T))
    codes = torch.randint(0, sh.image_columns, (b, K))
    positions = slice(T - 1 - K, T - 1)
    columns = slice(0, sh.image_columns)

    def step() -> None:
        hidden = model.final_hidden(ids, None, positions)
        logits = model.project(hidden, columns).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, codes[..., None]).squeeze(-1)
        (-logp.mean()).backward()

    step()  # warm-up: one-off allocations (kernels, thread pools) are not part of the update's peak
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    return {"peak_bytes": (peak - before) * 1024.0}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def self_check(tolerance: float = 0.2) -> list[dict]:
    """Model vs measurement for :func:`self_check_setups`; prints a table, returns the rows."""
    rows = []
    print("| reduced model (D=256, F=768, L=2, T=1283, b=2) | predicted MB | measured MB | error |")
    print("|---|---|---|---|")
    for st in self_check_setups():
        r = measured_update_peak(st)
        err = r["predicted"] / r["measured"] - 1
        label = (f"LoRA r={st.lora_r}" if st.lora else "full FT") + f" {st.precision}" + (
            " + ckpt" if st.gradient_checkpointing else "")
        print(f"| {label} | {r['predicted'] / 1e6:.1f} | {r['measured'] / 1e6:.1f} | {err:+.1%} |", flush=True)
        rows.append({"setup": label, **r, "error": err, "ok": abs(err) <= tolerance})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def default_tables(gpu_gb: float) -> None:
    gpu = gpu_gb * GB
    mm = replace(experiment_setup("mmada_ht"), gradient_checkpointing=False)
    print(f"## mmada_ht, LoRA r={mm.lora_r}, bf16-true, one {gpu_gb:.0f} GB GPU "
          f"(P = {mm.shape.params() / 1e9:.2f} B, adapters {lora_params(mm.shape, mm.lora_r) / 1e6:.1f} M, "
          f"T = {mm.tokens}, G = {mm.num_generations}, K = {mm.inner_iterations})")
    print(table([mm, replace(mm, gradient_checkpointing=True)], gpu))
    print()
    full = replace(mm, lora_r=0, precision="bf16-mixed", gpus=8)
    print(f"## mmada_ht, full fine-tuning, bf16-mixed, 8 x {gpu_gb:.0f} GB")
    print(table([replace(full, strategy=s, gradient_checkpointing=c)
                 for s in ("fsdp", "deepspeed_zero3") for c in (False, True)]
                + [replace(full, strategy="ddp", gradient_checkpointing=True)], gpu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", help="a conf/experiment name with an MMaDA policy, e.g. mmada_ht")
    parser.add_argument("--strategy", default=None,
                        choices=["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=None, help="0 = full fine-tuning")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=["bf16-true", "bf16-mixed", "32-true"])
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--self-check", action="store_true")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_one:
        print(json.dumps(_measure_one(_setup_from_json(json.loads(args.measure_one)))))
        return 0
    if args.self_check:
        rows = self_check()
        bad = [r for r in rows if not r["ok"]]
        print("self-check:", "OK (all within 20%)" if not bad else f"FAILED for {[r['setup'] for r in bad]}")
        return 1 if bad else 0
    if args.experiment is None:
        default_tables(args.gpu_gb)
        return 0
    st = experiment_setup(args.experiment)
    changes = {k: v for k, v in {"strategy": args.strategy, "gpus": args.gpus, "lora_r": args.lora_r,
                                 "micro_batch": args.micro_batch, "precision": args.precision}.items()
               if v is not None}
    if changes.get("lora_r") == 0 and "precision" not in changes:
        changes["precision"] = "bf16-mixed"
    st = replace(st, **changes)
    if st.strategy == "deepspeed_zero3" and args.micro_batch is not None:
        try:
            update_micro_batch(st, args.micro_batch)
        except ValueError as e:
            parser.error(f"--micro-batch: {e}")
    print(table([st, replace(st, gradient_checkpointing=not st.gradient_checkpointing)], args.gpu_gb * GB))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
