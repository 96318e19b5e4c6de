"""Share of the exact sampler's work each sampler cache does: sequence positions run through the blocks, per cache
mode, sampler and number of steps. Load-free (a count, not a time), so it is the figure to quote beside speed.

For every ShapesWorld-GenEval validation prompt (84, in batches of ``--batch-size``, CFG ``--guidance-scale``), one
sampling call per cache mode; the share is ``positions computed / (T · rows · sequence length)``, i.e. against T
full forwards of the exact sampler. For the emerge and MaskGIT samplers the share does not depend on the weights:
which positions unmask (emerge) or how many commit (MaskGIT), and when a full pass comes, do not depend on the
logits, except through the positions ML-Cache picks, whose number is fixed by its quantile.

    python experiments/benchmarks/cache_positions.py                          # emerge and MaskGIT, 12 steps
    python experiments/benchmarks/cache_positions.py --samplers emerge --steps 4 8 12 16 32 64
    python experiments/benchmarks/cache_positions.py --policy PATH            # a saved MaskedDiffusionPolicy folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from htgrpo.assets import asset_path  # noqa: E402
from htgrpo.data.prompt_sets import ShapesGenEvalPrompts  # noqa: E402
from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy  # noqa: E402
from htgrpo.policies.ml_cache import KeyValueRefreshLogits, MaxLogitCacheLogits, MLCacheSettings  # noqa: E402
from htgrpo.policies.sampling import emerge_sample, maskgit_sample  # noqa: E402
from htgrpo.policies.t2i_layout import MASKED  # noqa: E402

SAMPLERS = {"emerge": emerge_sample, "maskgit": maskgit_sample}


def cache_fn(mode: str, policy, prompt, steps: int):
    """The logits_fn of a mode: ``kv_refresh@S`` (share S), ``ml_cache`` or ``ml_cache_fresh`` (released knobs)."""
    if mode.startswith("kv_refresh@"):
        return KeyValueRefreshLogits(policy, prompt, float(mode.split("@", 1)[1]))
    return MaxLogitCacheLogits(policy, prompt, steps, MLCacheSettings(), recompute_changed=mode == "ml_cache_fresh")


@torch.no_grad()
def positions_share(policy, prompts: list[str], sampler: str, steps: int, mode: str, batch_size: int,
                    guidance_scale: float, seed: int = 0) -> float:
    """Positions the cache computed over all ``prompts``, as a share of T full forwards of every row."""
    computed = exact = 0
    rows_per_prompt = 2 if guidance_scale else 1
    for i in range(0, len(prompts), batch_size):
        prompt = policy.encode_prompts(prompts[i:i + batch_size])
        fn = cache_fn(mode, policy, prompt, steps)
        canvas = torch.full((prompt.batch_size, policy.num_image_tokens), MASKED, dtype=torch.long)
        SAMPLERS[sampler](fn, canvas, num_steps=steps, guidance_scale=guidance_scale,
                          generator=torch.Generator().manual_seed(seed + i))
        computed += fn.positions_computed
        exact += steps * rows_per_prompt * prompt.batch_size * policy.layout.seq_len
    return computed / exact


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="saved policy folder (default: the shipped ShapesWorld warm start)")
    ap.add_argument("--samplers", nargs="+", default=["emerge", "maskgit"], choices=list(SAMPLERS))
    ap.add_argument("--steps", type=int, nargs="+", default=[12])
    ap.add_argument("--modes", nargs="+", default=["kv_refresh@0.25", "kv_refresh@0.5", "ml_cache", "ml_cache_fresh"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=None, help="first N validation prompts only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policy = MaskedDiffusionPolicy.from_pretrained(args.policy or str(asset_path("shapes_llada_warmstart"))).eval()
    prompts = [p.prompt for p in ShapesGenEvalPrompts(ShapesWorldConfig()).prompts][:args.limit]
    print(f"positions computed / exact sampler's, {len(prompts)} ShapesWorld-GenEval prompts, batch {args.batch_size}, "
          f"CFG {args.guidance_scale}")
    print("| sampler | steps | " + " | ".join(args.modes) + " |")
    print("|---|---|" + "---|" * len(args.modes))
    out: dict = {}
    for sampler in args.samplers:
        for steps in args.steps:
            shares = [positions_share(policy, prompts, sampler, steps, m, args.batch_size, args.guidance_scale)
                      for m in args.modes]
            out[(sampler, steps)] = dict(zip(args.modes, shares))
            print(f"| {sampler} | {steps} | " + " | ".join(f"{s:.0%}" for s in shares) + " |", flush=True)
    return out


if __name__ == "__main__":
    main()
