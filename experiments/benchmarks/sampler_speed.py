"""MaskGIT sampler throughput of the masked-diffusion policy, and what restricting logits buys.

Measures images/s of ``maskgit_sample`` at its default settings, once computing logits only at the N image positions
over the image-code columns (the default) and once the full way (full-vocabulary logits at every position, then
sliced), on the same policy, prompts and generator seed. Both ways must give identical samples; the script checks.

    python experiments/benchmarks/sampler_speed.py                      # toy ShapesWorld policy, random weights
    python experiments/benchmarks/sampler_speed.py --policy PATH        # a saved MaskedDiffusionPolicy folder
    python experiments/benchmarks/sampler_speed.py --embedding-size 134656 --batch-size 4 --steps 4 --repeats 1
        # toy body with an MMaDA-wide LM head (134656 rows): the head restriction at MMaDA's vocabulary size
"""

from __future__ import annotations

import argparse
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
from htgrpo.policies.sampling import maskgit_sample  # noqa: E402

PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle left of a yellow diamond",
    "a photo of a purple circle and an orange square",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="saved MaskedDiffusionPolicy folder (default: random toy policy)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16, help="sampling steps (maskgit_sample default: 16)")
    ap.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale (maskgit_sample default: 3.0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--embedding-size", type=int, default=None, help="pad the toy LM head to this many rows")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    return ap.parse_args(argv)


def timed_sample(policy, prompt, args, full_vocab: bool) -> tuple[float, torch.Tensor]:
    gen = torch.Generator(device=policy.device).manual_seed(args.seed)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = maskgit_sample(
        policy, prompt, num_steps=args.steps, guidance_scale=args.guidance_scale, generator=gen, full_vocab=full_vocab
    )
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.codes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.policy:
        policy = MaskedDiffusionPolicy.from_pretrained(args.policy)
    else:
        policy = toy_masked_diffusion_policy(embedding_size=args.embedding_size, seed=args.seed)
    policy = policy.to(args.device).eval()
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    prompt = policy.encode_prompts(texts)

    settings = {"restricted": False, "full_vocab": True}
    for _ in range(args.warmup):
        for full in settings.values():
            timed_sample(policy, prompt, args, full)
    # interleave the two settings so that background load hits both alike; report medians
    times: dict[str, list[float]] = {name: [] for name in settings}
    codes = {}
    for _ in range(args.repeats):
        for name, full in settings.items():
            dt, codes[name] = timed_sample(policy, prompt, args, full)
            times[name].append(dt)
    results = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        results[name] = {"seconds_per_batch": sec, "images_per_s": args.batch_size / sec, "times": ts}
    identical = torch.equal(codes["restricted"], codes["full_vocab"])
    speedup = results["full_vocab"]["seconds_per_batch"] / results["restricted"]["seconds_per_batch"]

    cfg = policy.backbone.config
    layout = policy.layout
    report = {
        "device": str(policy.device) if policy.device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "policy": args.policy or "toy (random weights)",
        "params": sum(p.numel() for p in policy.parameters()),
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "lm_head_rows": cfg.effective_embedding_size,
        "seq_len": layout.seq_len,
        "image_tokens": layout.num_image_tokens,
        "codebook_size": layout.codebook_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "repeats": args.repeats,
        "results": results,
        "speedup_restricted_vs_full": speedup,
        "identical_samples": identical,
    }
    print(
        f"maskgit_sample: {report['policy']}, {report['params'] / 1e6:.2f}M params, "
        f"head {cfg.effective_embedding_size} rows, "
        f"seq {layout.seq_len} ({layout.num_image_tokens} image tokens x {layout.codebook_size} codes), "
        f"batch {args.batch_size}, {args.steps} steps, cfg {args.guidance_scale}, {report['device']}"
    )
    print(f"{'logits computed':<40} {'s/batch':>9} {'images/s':>9}")
    labels = {"restricted": "image positions x code columns", "full_vocab": "all positions x full vocabulary"}
    for name, label in labels.items():
        r = results[name]
        print(f"{label:<40} {r['seconds_per_batch']:>9.3f} {r['images_per_s']:>9.2f}")
    print(f"speed-up from restricting logits: {speedup:.2f}x   identical samples: {identical}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if not identical:
        raise SystemExit("restricted and full-vocabulary logits gave different samples")
    return report


if __name__ == "__main__":
    main()
