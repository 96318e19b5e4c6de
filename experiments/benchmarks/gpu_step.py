"""One-command GPU check: HT-GRPO steps of MMaDA-8B's full architecture with random weights (nothing downloaded).

The policy is the LLaDA-8B body MMaDA-8B uses (reference §3.2: d_model 4096, 32 layers, 32 heads, SwiGLU 12288, an
untied 134,656-row LM head, image codes at columns [126349, 126349 + 8192)), initialised at random directly on the
GPU in bf16, with the ``mmada_ht`` configuration composed from ``conf/experiment/mmada_ht.yaml`` (LoRA r 128 on the
seven block Linears, gradient checkpointing, G = 9, 12 emerge steps with CFG 3, K = 6, micro-batch 3,
``trainer.precision=bf16-true``) and a cheap reward (``reward=jpeg_compressibility``). Text: the byte-level BPE of
``htgrpo.tiny_checkpoint``, prompts padded to MMaDA's max_text_len 256 (T = 1283 at 512 px); images decoded by the
tiny random MAGVIT-v2 of the same module (8192 codes, 16 px per code): the decoder and the reward are not what is
measured. It runs ``--steps`` rollout steps (the first is a warm-up) and prints, per phase (rollout, reward,
old/ref log-prob passes, the K updates): seconds, peak GPU memory, the step-time model's FLOPs
(``step_time.llada_phase_flops``), achieved TFLOP/s and MFU against the GPU's dense bf16 peak; and the update's
peak memory against the memory model (``memory.estimate`` of ``mmada_ht``, LoRA, one GPU).

The device command (one line; the device image has torch, lightning, peft and transformers but not Hydra, so its
three pure-Python packages travel in ``.whl``; fetch them once here first with
``python -m pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3``
(antlr4 4.9.3 is a source archive, hence ``--no-build-isolation`` below; checked here) and add ``/.whl/`` to
``.git/info/exclude``; carry ``.whl``; timeout 600 s, about 3-5 minutes expected on an H100)::

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* && export PYTHONPATH=/tmp/site:. && set -o pipefail && PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 experiments/benchmarks/gpu_step.py --steps 3 --out $OUT/gpu_step.json 2>&1 | tee $OUT/gpu_step.log

Then the sampler benchmark, exact and cached, on the same GPU (same call or the same warm machine)::

    PYTHONPATH=/tmp/site:. python3 experiments/benchmarks/sampler_speed.py --batch-size 16 --repeats 3 --out $OUT/sampler_speed.json 2>&1 | tee $OUT/sampler_speed.log

``--small`` runs the same path on CPU in seconds (a 2-layer d64 body, 64 px images, G = 3, 4 sampler steps,
float32): the default test suite runs it (tests/test_step_time.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory as memory_model  # noqa: E402
import step_time  # noqa: E402
from memory import MMADA_8B, ModelShape  # noqa: E402

MMADA_IMAGE_OFFSET = 126349
"""MMaDA's first image-code column (reference §3.4: len(LLaDA tokenizer))."""

SMALL_SHAPE = ModelShape(d_model=64, n_layers=2, n_heads=4, mlp_hidden=192, embedding_rows=0, image_columns=8192)
"""--small: the body of a 2-layer d64 LLaDA (embedding rows = the tiny tokenizer + 8192 codes, set at build)."""

SMALL_OVERRIDES = ["policy.resolution=64", "policy.max_text_len=32", "algorithm.num_generations=3",
                   "sampler.num_steps=4", "algorithm.micro_batch_size=3", "algorithm.rollout_micro_batch_size=3",
                   "policy.lora.r=8"]
"""--small: 4×4 image tokens, 32-token prompts, G = 3, 4 sampler steps, LoRA r 8 (the rest is mmada_ht's)."""


def compose_config(small: bool):
    """``experiment=mmada_ht`` with the cheap reward (and the --small reductions); mandatory paths filled with
    placeholders (no data is read: prompts come from ShapesWorld's generator)."""
    overrides = ["reward=jpeg_compressibility", "data.train.path=unused.jsonl", "benchmark.prompts.path=unused"]
    return step_time.compose("mmada_ht", overrides + (SMALL_OVERRIDES if small else []))


def build_policy(cfg, shape: ModelShape, device: torch.device, dtype: torch.dtype, workdir: Path):
    """A ``MaskedDiffusionPolicy`` with a random LLaDA body of ``shape`` built on ``device`` in ``dtype``, the tiny
    BPE text tokenizer and MAGVIT-v2 of ``htgrpo.tiny_checkpoint`` and MMaDA's sequence layout; then LoRA and
    checkpointing from ``cfg.policy`` (``htgrpo.policies.lora.apply_lora``, as ``build_mmada_policy`` does)."""
    from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM
    from htgrpo.policies.lora import apply_lora
    from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
    from htgrpo.policies.pretrained import build_mmada_policy
    from htgrpo.tiny_checkpoint import write_tiny_mmada

    write_tiny_mmada(workdir)
    tiny = build_mmada_policy(str(workdir), vq_model=str(workdir / "magvitv2"), resolution=cfg.policy.resolution,
                              max_text_len=int(cfg.policy.max_text_len), dtype="float32", vq_device=device.type)
    layout = tiny.layout
    if shape.embedding_rows >= MMADA_IMAGE_OFFSET + layout.codebook_size:  # full size: MMaDA's columns
        layout = replace(layout, image_token_offset=MMADA_IMAGE_OFFSET)
    rows = shape.embedding_rows or layout.image_token_offset + layout.codebook_size
    config = LLaDAConfig(d_model=shape.d_model, n_heads=shape.n_heads, n_layers=shape.n_layers,
                         mlp_hidden_size=shape.mlp_hidden, vocab_size=rows, embedding_size=rows,
                         max_sequence_length=4096, rope_theta=500000.0, mask_token_id=layout.mask)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):  # random init where the weights live: 8B parameters in seconds, no host copy
            backbone = LLaDAModelLM(config)
    finally:
        torch.set_default_dtype(previous)
    policy = MaskedDiffusionPolicy(backbone, layout, tiny.text_tokenizer, tiny.image_tokenizer)
    policy.train()
    lora = dict(cfg.policy.lora)
    return apply_lora(policy, lora, bool(cfg.policy.gradient_checkpointing)), replace(shape, embedding_rows=rows)


class PhaseClock:
    """Seconds and peak device memory per phase (CUDA synchronised at both ends; memory peaks reset per phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, dict[str, float]]] = []

    def new_step(self) -> None:
        self.steps.append({})

    def run(self, phase: str, fn, *args, **kwargs):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        rec = self.steps[-1].setdefault(phase, {"s": 0.0, "peak_bytes": 0.0})
        rec["s"] += time.perf_counter() - t0
        if cuda:
            rec["peak_bytes"] = max(rec["peak_bytes"], float(torch.cuda.max_memory_allocated()))
        return out


def timed_module(cfg, policy, clock: PhaseClock):
    """The ``algorithm`` node of ``cfg`` (HTGRPO) instantiated on ``policy``, each phase run through ``clock``."""
    from htgrpo.algorithms.ht_grpo import HTGRPO
    from htgrpo.config import instantiate_node

    class TimedHTGRPO(HTGRPO):
        def rollout(self, batch, scorer=None):
            clock.new_step()
            return clock.run("rollout", super().rollout, batch, scorer)

        def reward(self, rollout, scorer=None):
            return clock.run("reward", super().reward, rollout, scorer)

        def plan_inner_iterations(self, scored):
            return clock.run("old_ref", super().plan_inner_iterations, scored)

        def inner_update(self, scored, it):
            return clock.run("update", super().inner_update, scored, it)

    sampler = instantiate_node(cfg, "sampler")
    node = cfg.algorithm
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    kwargs["reward"] = instantiate_node(cfg, "reward")
    kwargs["rollout_sampler"] = sampler
    kwargs.pop("sampler", None)
    return TimedHTGRPO(policy, benchmark=None, sampler=sampler, **kwargs)


def step_of(cfg, shape: ModelShape, policy) -> step_time.LLaDAStep:
    """The step-time model's :class:`~step_time.LLaDAStep` of this run (this body's shape, the config's settings)."""
    N = policy.layout.num_image_tokens
    lora = cfg.policy.lora
    return step_time.LLaDAStep(
        name="gpu_step", shape=shape, seq_len=policy.layout.seq_len, image_tokens=N,
        images=int(cfg.data.batch_size) * int(cfg.algorithm.num_generations),
        sampler_passes=step_time.emerge_forward_passes(int(cfg.sampler.num_steps)) if cfg.sampler.name == "emerge"
        else step_time.maskgit_forward_passes(N, int(cfg.sampler.num_steps), str(cfg.sampler.count_rule)),
        cfg=float(cfg.sampler.guidance_scale) > 0,
        update_head_positions=step_time.stage_head_positions(cfg.algorithm, N), lora_r=int(lora.r),
        lora_targets=tuple(lora.target_modules), checkpointing=bool(cfg.policy.gradient_checkpointing),
        beta=float(cfg.algorithm.beta))


def memory_setup(cfg, shape: ModelShape, policy, precision: str) -> memory_model.Setup:
    """The memory model's set-up of this run (``memory.experiment_setup`` fields, this body's shape)."""
    lora = cfg.policy.lora
    G = int(cfg.algorithm.num_generations)
    return memory_model.Setup(
        name="gpu_step", shape=shape, tokens=policy.layout.seq_len, image_tokens=policy.layout.num_image_tokens,
        num_generations=G, prompts_per_step=int(cfg.data.batch_size), inner_iterations=6,
        micro_batch=int(cfg.algorithm.micro_batch_size or G), lora_r=int(lora.r),
        gradient_checkpointing=bool(cfg.policy.gradient_checkpointing), precision=precision,
        beta=float(cfg.algorithm.beta), lora_targets=tuple(lora.target_modules))


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """Dense bf16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s); on CPU this process's measured float32 matmul rate
    (so CPU 'MFU' reads as a share of what a plain matmul reaches here)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name or "H800" in name:
            return step_time.H100_BF16_DENSE_TFLOPS, f"{name}, dense bf16 peak"
        return float(os.environ.get("GPU_PEAK_TFLOPS", "0") or 0) or float("nan"), f"{name} (set GPU_PEAK_TFLOPS)"
    rate = step_time.matmul_flops_per_s(2048, 256, 768) / 1e12
    return rate, "CPU: measured float32 matmul rate in this process"


def run(small: bool, steps: int, out: str | None = None) -> dict:
    import lightning as L

    from htgrpo.data.datamodules import PromptDataModule
    from htgrpo.data.prompt_sets import ShapesPromptStream
    from htgrpo.data.shapes.palette import ShapesWorldConfig

    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    precision = "bf16-true" if device.type == "cuda" else "32-true"
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    cfg = compose_config(small)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy, shape = build_policy(cfg, SMALL_SHAPE if small else MMADA_8B, device, dtype, Path(tmp))
    build_s = time.perf_counter() - t0
    clock = PhaseClock(device)
    module = timed_module(cfg, policy, clock)
    data = PromptDataModule(ShapesPromptStream(ShapesWorldConfig.roomy(), seed=0), batch_size=int(cfg.data.batch_size))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision)
    trainer.fit(module, datamodule=data)

    timed = clock.steps[1:] or clock.steps  # the first step pays allocations, kernel selection, lazy init
    phases = ("rollout", "reward", "old_ref", "update")
    secs = {p: statistics.median(s[p]["s"] for s in timed) for p in phases}
    peaks = {p: max(s[p]["peak_bytes"] for s in clock.steps) for p in phases}
    flops = step_time.llada_phase_flops(step_of(cfg, shape, policy)).as_dict()
    peak, peak_note = peak_tflops(device)
    predicted_memory = memory_model.estimate(memory_setup(cfg, shape, policy, precision)).total

    params = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(f"gpu_step: {'--small (CPU)' if small else 'MMaDA-8B architecture, random weights'}; {device} "
          f"({peak_note}); {params / 1e9:.3f} B parameters ({trainable / 1e6:.2f} M trainable, LoRA r "
          f"{int(cfg.policy.lora.r)}), T = {policy.layout.seq_len}, N = {policy.layout.num_image_tokens}, "
          f"G = {int(cfg.algorithm.num_generations)}, {int(cfg.sampler.num_steps)} {cfg.sampler.name} steps, CFG "
          f"{float(cfg.sampler.guidance_scale)}, precision {precision}; built in {build_s:.1f} s; median of "
          f"{len(timed)} timed step(s) after a warm-up")
    print("| phase | seconds | peak memory GB | model TFLOP | achieved TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    rows = {}
    for p in phases:
        f = flops.get(p)
        tput = f / secs[p] / 1e12 if f is not None and secs[p] > 0 else None
        mfu = tput / peak if tput is not None else None
        rows[p] = {"seconds": secs[p], "peak_bytes": peaks[p], "tflop": None if f is None else f / 1e12,
                   "achieved_tflops": tput, "mfu": mfu}
        cells = (f"{f / 1e12:.3g}", f"{tput:.3g}", f"{mfu:.1%}") if f is not None else ("-", "-", "-")
        print(f"| {p} | {secs[p]:.3f} | {peaks[p] / 1e9:.2f} | {cells[0]} | {cells[1]} | {cells[2]} |")
    measured_update = peaks["update"]
    if device.type == "cuda":
        err = predicted_memory / measured_update - 1
        print(f"update peak memory: measured {measured_update / 1e9:.2f} GB, memory model {predicted_memory / 1e9:.2f}"
              f" GB ({err:+.1%})")
    else:
        print(f"update peak memory: memory model {predicted_memory / 1e9:.4f} GB (not measured on CPU)")
    report = {"device": str(device), "peak_note": peak_note, "peak_tflops": peak, "small": small,
              "precision": precision,
              "params": params, "trainable": trainable, "seq_len": policy.layout.seq_len, "steps_timed": len(timed),
              "phases": rows, "memory_model_update_bytes": predicted_memory, "build_s": build_s}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny body on CPU (seconds; the default tests run it)")
    ap.add_argument("--steps", type=int, default=3, help="rollout steps (the first is a warm-up; default 3)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not args.small and not torch.cuda.is_available():
        ap.error("the full-size check needs a CUDA GPU (about 40 GB); use --small on CPU")
    run(args.small, args.steps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
