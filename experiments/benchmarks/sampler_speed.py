"""Sampler throughput of the masked-diffusion policy, what restricting logits buys at two geometries, and the caches.

Measures the seconds per batch of the ``--sampler`` (``emerge``, MaskGRPO's ancestral sampler that the ShapesWorld
experiments use, by default; ``maskgit`` for MMaDA/DiMOO's) once computing logits only at the N image positions over
the image-code columns (the default) and once the full way (full-vocabulary logits at every position, then sliced),
on the same policy, prompts and generator seed; both must give identical samples (the script checks). Two rows, one
process:

- ``real``: a body-dominated geometry whose LM-head : body FLOP ratio equals MMaDA-8B's. MMaDA-8B's full head
  (134,656 rows) costs 2·D·V per position; its body 2·L·(4D² + 3DF) + attention 4·L·T·D per token
  (D 4096, F 12288, L 32, T 1283): head/body = 0.0754 (:func:`mmada_head_body_ratio`). The head/body ratio of a
  LLaDA body goes as V / (L·(4D + 3F + 2T)), so at the toy body (d256 × 4 layers) the vocabulary is scaled down
  with the width and depth to keep that ratio (:func:`vocabulary_for_ratio`: 1,180 rows at T 293): restricting
  logits is then worth what it is worth on MMaDA-8B (about 1.1×), because what dominates is the body's 12–64 full
  passes, not the head.
- ``toy``: the same body with MMaDA's full 134,656-row head, where the head costs ~10× the body; the 5× speed-up
  measured there comes from the head and does not carry over to 8B models.

Then, at the real geometry, the exact sampler against each ``sampler.cache`` mode, same sampler, steps, CFG and seed,
interleaved: ``ml_cache`` (DiMOO's max-logit cache at its released knobs, ``--cache-ratio/--warmup-ratio/
--refresh-interval``), ``ml_cache_fresh`` and ``kv_refresh`` (``--kv-refresh-share``). The last line is
``cached vs exact: R.RRx`` for ``--cache`` (default kv_refresh). On the CPU times are process CPU seconds (a shared
machine stretches wall time, not this process's CPU time); on a GPU, wall seconds.

    python experiments/benchmarks/sampler_speed.py                      # both rows, random weights
    python experiments/benchmarks/sampler_speed.py --geometry real      # one row
    python experiments/benchmarks/sampler_speed.py --policy PATH        # a saved MaskedDiffusionPolicy folder (one row)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy  # noqa: E402
from htgrpo.policies.shapes_llada import toy_masked_diffusion_policy  # noqa: E402
from htgrpo.policies.ml_cache import KeyValueRefreshLogits, MaxLogitCacheLogits, MLCacheSettings  # noqa: E402
from htgrpo.policies.sampling import emerge_sample, maskgit_sample  # noqa: E402
from htgrpo.policies.t2i_layout import MASKED  # noqa: E402

PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle left of a yellow diamond",
    "a photo of a purple circle and an orange square",
]


MMADA_HEAD_ROWS = 134656
"""MMaDA-8B's LM-head rows (reference §3.2: embedding_size 134656)."""


def body_flops_per_token(d_model: int, n_layers: int, mlp_hidden: int, seq_len: int) -> int:
    """Forward FLOPs per token of a LLaDA body: L·(2·(4D² + 3DF) + 4·T·D) (Linear layers + full attention)."""
    return n_layers * (2 * (4 * d_model * d_model + 3 * d_model * mlp_hidden) + 4 * seq_len * d_model)


def head_flops_per_token(d_model: int, rows: int) -> int:
    """Forward FLOPs per position of an LM head with ``rows`` rows: 2·D·V."""
    return 2 * d_model * rows


def mmada_head_body_ratio() -> float:
    """MMaDA-8B's full-head : body FLOP ratio per position (D 4096, F 12288, L 32, T 1283 at 512 px): 0.0754."""
    return head_flops_per_token(4096, MMADA_HEAD_ROWS) / body_flops_per_token(4096, 32, 12288, 1283)


def vocabulary_for_ratio(ratio: float, d_model: int, n_layers: int, mlp_hidden: int, seq_len: int) -> int:
    """Head rows V giving ``ratio`` = 2·D·V / body per token at this body: V = ratio · body / (2·D), rounded."""
    return round(ratio * body_flops_per_token(d_model, n_layers, mlp_hidden, seq_len) / (2 * d_model))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="saved MaskedDiffusionPolicy folder (one row; default: random toy)")
    ap.add_argument("--geometry", default="both", choices=["both", "real", "toy"],
                    help="real: head:body FLOP ratio of MMaDA-8B; toy: MMaDA's 134656-row head on the toy body")
    ap.add_argument("--d-model", type=int, default=256, help="toy body width (default 256)")
    ap.add_argument("--n-layers", type=int, default=4, help="toy body depth (default 4)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="sampling steps (the ShapesWorld experiments': 12)")
    ap.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale (the ShapesWorld experiments': 2.0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="emerge", choices=["emerge", "maskgit"],
                    help="emerge (MaskGRPO's ancestral sampler, the ShapesWorld experiments') or maskgit (MMaDA/DiMOO)")
    ap.add_argument("--kv-refresh-share", type=float, default=0.25, help="kv_refresh knob (default 0.25)")
    ap.add_argument("--cache", default="kv_refresh", choices=["ml_cache", "ml_cache_fresh", "kv_refresh"],
                    help="the cache mode of the last line (both are measured)")
    ap.add_argument("--cache-ratio", type=float, default=0.9, help="ML-Cache knob (DiMOO default 0.9)")
    ap.add_argument("--warmup-ratio", type=float, default=0.3, help="ML-Cache knob (DiMOO default 0.3)")
    ap.add_argument("--refresh-interval", type=int, default=5, help="ML-Cache knob (DiMOO default 5)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    return ap.parse_args(argv)


def clock_for(device: torch.device):
    """Process CPU seconds on the CPU (the machine may be shared: other processes stretch wall time, not this
    process's CPU time; run with one thread), wall seconds with CUDA synchronisation on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def sampler_fn(args):
    """The sampling function ``--sampler`` names."""
    return emerge_sample if args.sampler == "emerge" else maskgit_sample


def timed_sample(policy, prompt, args, mode: str, cache: MLCacheSettings | None = None
                 ) -> tuple[float, torch.Tensor, float]:
    """One ``--sampler`` call: ``restricted`` (image logits only), ``full_vocab``, or a ``sampler.cache`` mode
    (``ml_cache``, ``ml_cache_fresh``, ``kv_refresh``). Returns (seconds, codes, share of the exact sampler's
    positions computed)."""
    gen = torch.Generator(device=policy.device).manual_seed(args.seed)
    clock = clock_for(policy.device)
    sample = sampler_fn(args)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    share = 1.0
    if mode in CACHE_MODES:
        if mode == "kv_refresh":
            fn = KeyValueRefreshLogits(policy, prompt, args.kv_refresh_share)
        else:
            fn = MaxLogitCacheLogits(policy, prompt, args.steps, cache or MLCacheSettings(),
                                     recompute_changed=mode == "ml_cache_fresh")
        canvas = torch.full((prompt.batch_size, policy.num_image_tokens), MASKED, dtype=torch.long,
                            device=policy.device)
        out = sample(fn, canvas, num_steps=args.steps, guidance_scale=args.guidance_scale, generator=gen)
        rows = prompt.batch_size * (2 if args.guidance_scale else 1)
        calls = fn.calls
        share = fn.positions_computed / (calls * rows * policy.layout.seq_len)
    else:
        out = sample(policy, prompt, num_steps=args.steps, guidance_scale=args.guidance_scale, generator=gen,
                     full_vocab=mode == "full_vocab")
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0, out.codes, share


CACHE_MODES = ("ml_cache", "ml_cache_fresh", "kv_refresh")


def measure_cache(policy, args) -> dict:
    """Exact (restricted logits) vs each cache mode at the given knobs (DiMOO's released ones by default), same
    sampler, steps, CFG and seed, interleaved so that background load hits all alike; medians."""
    prompt = policy.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)])
    settings = MLCacheSettings(args.cache_ratio, args.warmup_ratio, args.refresh_interval)
    modes = ("restricted", *CACHE_MODES)
    for _ in range(args.warmup):
        for mode in modes:
            timed_sample(policy, prompt, args, mode, settings)
    times: dict[str, list[float]] = {m: [] for m in modes}
    shares: dict[str, float] = {}
    for _ in range(args.repeats):
        for mode in modes:
            dt, _, shares[mode] = timed_sample(policy, prompt, args, mode, settings)
            times[mode].append(dt)
    exact = statistics.median(times["restricted"])
    out = {"settings": {**dataclasses.asdict(settings), "kv_refresh_share": args.kv_refresh_share},
           "exact_s": exact, "times": times, "modes": {}}
    for mode in CACHE_MODES:
        sec = statistics.median(times[mode])
        out["modes"][mode] = {"seconds": sec, "speedup": exact / sec, "positions_computed_share": shares[mode]}
    return out


def measure(policy, args) -> dict:
    """Restricted vs full-vocabulary sampling on ``policy``: medians of interleaved runs, identical-samples check."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    prompt = policy.encode_prompts(texts)
    settings = {"restricted": False, "full_vocab": True}
    for _ in range(args.warmup):
        for name in settings:
            timed_sample(policy, prompt, args, name)
    # interleave the two settings so that background load hits both alike; report medians
    times: dict[str, list[float]] = {name: [] for name in settings}
    codes = {}
    for _ in range(args.repeats):
        for name in settings:
            dt, codes[name], _ = timed_sample(policy, prompt, args, name)
            times[name].append(dt)
    results = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        results[name] = {"seconds_per_batch": sec, "images_per_s": args.batch_size / sec, "times": ts}
    cfg = policy.backbone.config
    layout = policy.layout
    head_rows = cfg.effective_embedding_size
    ratio = head_flops_per_token(cfg.d_model, head_rows) / body_flops_per_token(
        cfg.d_model, cfg.n_layers, cfg.effective_mlp_hidden_size, layout.seq_len)
    return {"params": sum(p.numel() for p in policy.parameters()), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "lm_head_rows": head_rows, "head_body_ratio": ratio, "seq_len": layout.seq_len,
            "image_tokens": layout.num_image_tokens, "codebook_size": layout.codebook_size, "results": results,
            "speedup_restricted_vs_full": results["full_vocab"]["seconds_per_batch"]
            / results["restricted"]["seconds_per_batch"],
            "identical_samples": torch.equal(codes["restricted"], codes["full_vocab"])}


def build_rows(args) -> dict[str, object]:
    """Policies to measure: a saved one, or the toy body at the real (MMaDA head:body) and toy (134656 rows) heads."""
    if args.policy:
        return {"policy": MaskedDiffusionPolicy.from_pretrained(args.policy)}
    probe = toy_masked_diffusion_policy(d_model=args.d_model, n_layers=args.n_layers, seed=args.seed)
    cfg, T = probe.backbone.config, probe.layout.seq_len
    rows = {"real": vocabulary_for_ratio(mmada_head_body_ratio(), cfg.d_model, cfg.n_layers,
                                         cfg.effective_mlp_hidden_size, T),
            "toy": MMADA_HEAD_ROWS}
    names = ["real", "toy"] if args.geometry == "both" else [args.geometry]
    return {n: toy_masked_diffusion_policy(d_model=args.d_model, n_layers=args.n_layers, embedding_size=rows[n],
                                           seed=args.seed) for n in names}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = f"cpu ({torch.get_num_threads()} threads)" if args.device == "cpu" else args.device
    report = {"device": device, "torch": torch.__version__, "machine": platform.machine(),
              "load_average": os.getloadavg()[0], "batch_size": args.batch_size, "steps": args.steps,
              "guidance_scale": args.guidance_scale, "repeats": args.repeats, "sampler": args.sampler,
              "mmada_head_body_ratio": mmada_head_body_ratio(), "rows": {}}
    unit = "process CPU seconds" if args.device == "cpu" else "seconds"
    weights = f"weights of {args.policy}" if args.policy else "random weights"
    print(f"{args.sampler} sampler, {weights}, batch {args.batch_size}, {args.steps} steps, cfg {args.guidance_scale}, "
          f"{device}, load average {report['load_average']:.1f}, times in {unit}; MMaDA-8B head:body FLOP ratio "
          f"{report['mmada_head_body_ratio']:.4f} (134656-row head vs D 4096 × 32 layers at T 1283)")
    print(f"{'geometry':<10} {'body':>10} {'head rows':>9} {'head:body':>9} {'restricted s':>12} {'full s':>8} "
          f"{'speed-up':>8} {'identical':>9}")
    policies = build_rows(args)
    for name, policy in policies.items():
        policy = policy.to(args.device).eval()
        row = measure(policy, args)
        report["rows"][name] = row
        r = row["results"]
        print(f"{name:<10} {'d%d x %d' % (row['d_model'], row['n_layers']):>10} {row['lm_head_rows']:>9} "
              f"{row['head_body_ratio']:>9.4f} {r['restricted']['seconds_per_batch']:>12.3f} "
              f"{r['full_vocab']['seconds_per_batch']:>8.3f} {row['speedup_restricted_vs_full']:>7.2f}x "
              f"{str(row['identical_samples']):>9}", flush=True)
    cache_row = "real" if "real" in report["rows"] else next(iter(report["rows"]))
    cache = measure_cache(policies[cache_row].to(args.device).eval(), args)
    report["cache"] = {"geometry": cache_row, **cache}
    s = cache["settings"]
    print(f"caches at the {cache_row} geometry (ml_cache: cache_ratio {s['cache_ratio']}, warmup_ratio "
          f"{s['warmup_ratio']}, refresh_interval {s['refresh_interval']}; kv_refresh: kv_refresh_share "
          f"{s['kv_refresh_share']}), exact {cache['exact_s']:.3f} s per batch:")
    for mode, m in cache["modes"].items():
        print(f"  {mode:<15} {m['seconds']:.3f} s  {m['speedup']:.2f}x  ({m['positions_computed_share']:.0%} of the "
              f"exact sampler's positions computed)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if not all(row["identical_samples"] for row in report["rows"].values()):
        raise SystemExit("restricted and full-vocabulary logits gave different samples")
    print(f"cached vs exact: {cache['modes'][args.cache]['speedup']:.2f}x")
    return report


if __name__ == "__main__":
    main()
