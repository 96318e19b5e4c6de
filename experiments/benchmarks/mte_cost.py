"""Cost of MAR-GRPO's multi-trajectory expectation (MTE) as S grows, and seconds per MAR-GRPO step by phase.

Part 1 takes ONE rollout of the ShapesWorld MAR policy (``--prompts`` x ``--generations`` images) and, for
S = 1, 2, 4, 8 extra head chains per token, times side by side in the same process
  - sampling the S chains as ONE batched head call per reverse step over S·B·L tokens (what MARGRPO does), and
  - a loop over the S chains (one head call per chain per reverse step), with the same noise,
  - scoring the MTE term of one trained AR step (forward + backward through the AR part, frozen head),
and reports the loop / batched ratio (median of ``--repeats``).

Part 2 runs ``--steps`` real MAR-GRPO steps (Lightning trainer, shapes_mar_grpo defaults) and reports the median
seconds of the rollout, reward, MTE and update phases (the first step is a warm-up).

    python experiments/benchmarks/mte_cost.py                        # warm-start export if present, else random init
    python experiments/benchmarks/mte_cost.py --policy PATH --steps 4 --threads 1 --out mte_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402

from htgrpo.algorithms.mar_grpo import MARGRPO  # noqa: E402
from htgrpo.data.datamodules import PromptDataModule, collate_prompts  # noqa: E402
from htgrpo.data.prompt_sets import ShapesPromptStream  # noqa: E402
from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.policies.mar.shapes import MARSamplerSettings, build_mar_policy  # noqa: E402
from htgrpo.rewards.shapes import ShapesPromptReward  # noqa: E402

DEFAULT_POLICY = Path(os.environ.get("HTGRPO_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")) / \
    "shapes_mar_warmstart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help=f"saved MAR policy folder (default: {DEFAULT_POLICY} if present)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per rollout batch (shapes_mar_grpo: 2)")
    ap.add_argument("--generations", type=int, default=8, help="num_generations (shapes_mar_grpo: 8)")
    ap.add_argument("--ar-steps", type=int, default=16, help="AR steps of the rollouts (sampler=mar: 16)")
    ap.add_argument("--diffusion-steps", type=int, default=25, help="head sampling steps (sampler=mar: 25)")
    ap.add_argument("--trajectories", default="1,2,4,8", help="values of S in part 1")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per S in part 1 (median)")
    ap.add_argument("--steps", type=int, default=3, help="MAR-GRPO steps timed in part 2 (first one is warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    return ap.parse_args(argv)


def load_policy(args: argparse.Namespace, world: ShapesWorldConfig):
    path = args.policy or (str(DEFAULT_POLICY) if DEFAULT_POLICY.exists() else None)
    if path is not None:
        return (lambda: build_mar_policy(world, init="pretrained", pretrained_path=path)), path
    return (lambda: build_mar_policy(world)), "random init (shapes_mar defaults)"


def _median_time(fn, repeats: int) -> float:
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if r > 0:  # r = 0 warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mte_costs(args: argparse.Namespace, make_policy, sampler: MARSamplerSettings, world: ShapesWorldConfig) -> list:
    rows = []
    data = ShapesPromptStream(world, seed=1)
    batch = collate_prompts([data[i] for i in range(args.prompts)])
    base = None
    for S in [int(s) for s in args.trajectories.split(",")]:
        module = MARGRPO(make_policy(), ShapesPromptReward(world, "partial"), sampler=sampler,
                         num_generations=args.generations, mte={"num_trajectories": S})
        if base is None:
            base = module.rollout(batch)
        rollout = base
        batched = _median_time(lambda: module.multi_trajectory(rollout, torch.Generator().manual_seed(0), True),
                               args.repeats)
        loop = _median_time(lambda: module.multi_trajectory(rollout, torch.Generator().manual_seed(0), False),
                            args.repeats)
        mte = module.multi_trajectory(rollout, torch.Generator().manual_seed(0))
        plan = module.plan_updates(rollout, mte)[0]

        def score():
            module.policy.zero_grad(set_to_none=True)
            terms = module.step_terms(module.policy, rollout, plan, mte)
            (-(terms.logp * plan.masks.policy).sum()).backward()

        scoring = _median_time(score, args.repeats)
        tokens = rollout.rollout.tokens.shape[0] * rollout.rollout.tokens.shape[1]
        rows.append({"S": S, "batched_s": batched, "loop_s": loop, "loop_over_batched": loop / batched,
                     "chain_tokens": S * tokens, "score_step_s": scoring, "critic_tokens": int(plan.critic.sum())})
    return rows


def phase_seconds(args: argparse.Namespace, make_policy, sampler: MARSamplerSettings,
                  world: ShapesWorldConfig) -> dict:
    module = MARGRPO(make_policy(), ShapesPromptReward(world, "partial"), sampler=sampler,
                     num_generations=args.generations, lr=1e-4, beta=0.01, num_train_ar_steps=4,
                     num_train_diffusion_steps=10)
    per_step: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            per_step.append(dict(pl_module.last_timings))

    data = PromptDataModule(ShapesPromptStream(world, seed=0), batch_size=args.prompts)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    timed = per_step[1:] or per_step
    phases = {k: statistics.median(s[k] for s in timed) for k in ("rollout", "reward", "mte", "update")}
    total = sum(phases.values())
    images = args.prompts * args.generations
    return {"phases_s": phases, "step_s": total, "share": {k: v / total for k, v in phases.items()},
            "images_per_step": images, "images_per_s": images / total, "steps_timed": len(timed),
            "train_ar_steps": module.num_train_ar_steps, "mte_trajectories": module.mte["num_trajectories"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = ShapesWorldConfig()
    make_policy, source = load_policy(args, world)
    sampler = MARSamplerSettings(num_ar_steps=args.ar_steps, num_diffusion_steps=args.diffusion_steps)
    print(f"policy: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    n_img = args.prompts * args.generations
    rows = mte_costs(args, make_policy, sampler, world)
    print(f"\nPart 1: MTE on one rollout of {n_img} images x 256 tokens, {args.diffusion_steps} head steps "
          f"(median of {args.repeats})")
    print("| S | chain tokens | batched s | per-S loop s | loop / batched | score 1 AR step (fwd+bwd) s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['chain_tokens']} | {r['batched_s']:.3f} | {r['loop_s']:.3f} | "
              f"{r['loop_over_batched']:.2f} | {r['score_step_s']:.3f} |")
    part2 = phase_seconds(args, make_policy, sampler, world)
    print(f"\nPart 2: one MAR-GRPO step ({part2['images_per_step']} images, {part2['train_ar_steps']} trained AR "
          f"steps, S={part2['mte_trajectories']}), median of {part2['steps_timed']} steps")
    print("| phase | seconds | share |\n|---|---|---|")
    for k, v in part2["phases_s"].items():
        print(f"| {k} | {v:.3f} | {part2['share'][k]:.0%} |")
    print(f"| total | {part2['step_s']:.3f} | {part2['images_per_s']:.2f} images/s |")
    result = {"policy": source, "threads": torch.get_num_threads(), "torch": torch.__version__, "mte": rows,
              "step": part2}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
