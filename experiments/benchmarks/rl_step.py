"""Cost of one HT-GRPO step on ShapesWorld: seconds per phase, and each log-prob estimator per inner iteration.

Part 1 runs `--steps` real rollout steps of the `HTGRPO` module (Lightning trainer, manual optimisation) with the
shapes_ht defaults (4 prompts x 8 generations, 12 sampling steps, K = 6 inner updates) and reports the median
seconds of the rollout, reward and update phases (the update phase includes planning the K iterations and their old
and reference log-probs).

Part 2 takes ONE rollout of that policy and, for every estimator, plans an inner iteration over all image tokens and
times a forward + backward of its token log-probs, side by side in the same process: number of forward passes
(policy evaluations per image) and seconds, also as a ratio to HT-GRPO's `prompt_conditioned` estimator.

    python experiments/benchmarks/rl_step.py                       # warm-start export if present, else random init
    python experiments/benchmarks/rl_step.py --policy PATH --steps 5 --out rl_step.json
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

from htgrpo.algorithms.estimators import ESTIMATORS, build_estimator, token_log_probs  # noqa: E402
from htgrpo.algorithms.ht_grpo import HTGRPO  # noqa: E402
from htgrpo.data.datamodules import PromptDataModule  # noqa: E402
from htgrpo.data.prompt_sets import ShapesPromptStream  # noqa: E402
from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.policies.generators import SamplerSettings  # noqa: E402
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy  # noqa: E402
from htgrpo.rewards.shapes import ShapesPromptReward  # noqa: E402

DEFAULT_POLICY = Path(os.environ.get("HTGRPO_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")) / \
    "shapes_llada_warmstart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help=f"saved policy folder (default: {DEFAULT_POLICY} if it exists)")
    ap.add_argument("--steps", type=int, default=4, help="rollout steps timed in part 1 (first one is warm-up)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (shapes_ht: 4)")
    ap.add_argument("--generations", type=int, default=8, help="num_generations (shapes_ht: 8)")
    ap.add_argument("--sampling-steps", type=int, default=12, help="rollout sampling steps (shapes_ht: 12)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per estimator in part 2 (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    return ap.parse_args(argv)


def load_policy(args: argparse.Namespace, world: ShapesWorldConfig):
    path = args.policy or (str(DEFAULT_POLICY) if DEFAULT_POLICY.exists() else None)
    if path is not None:
        return build_masked_diffusion_policy(world, init="pretrained", pretrained_path=path), path
    return build_masked_diffusion_policy(world), "random init (shapes_llada defaults)"


def phase_seconds(args: argparse.Namespace, world: ShapesWorldConfig, policy) -> dict:
    module = HTGRPO(policy, ShapesPromptReward(world, "partial"), num_generations=args.generations,
                    sampler=SamplerSettings(num_steps=args.sampling_steps), lr=3e-4, beta=0.01)
    per_step: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            per_step.append(dict(pl_module.last_timings))

    data = PromptDataModule(ShapesPromptStream(world, seed=0), batch_size=args.prompts)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    timed = per_step[1:] or per_step  # the first step pays one-off costs (allocations, lazy init)
    phases = {k: statistics.median(s[k] for s in timed) for k in ("rollout", "reward", "update")}
    total = sum(phases.values())
    images = args.prompts * args.generations
    return {"phases_s": phases, "step_s": total, "share": {k: v / total for k, v in phases.items()},
            "images_per_step": images, "inner_updates": module.schedule.num_inner_iterations,
            "images_per_s": images / total, "steps_timed": len(timed), "module": module}


def estimator_costs(args: argparse.Namespace, module: HTGRPO) -> list[dict]:
    policy = module.policy
    data = ShapesPromptStream(ShapesWorldConfig.roomy(), seed=1)
    from htgrpo.data.datamodules import collate_prompts

    batch = collate_prompts([data[i] for i in range(args.prompts)])
    rollout = module.rollout(batch)
    sampled = rollout.sampled
    candidates = torch.ones_like(sampled.codes, dtype=torch.bool)  # score every image token (global stage)
    rows = []
    for name in ESTIMATORS:
        estimator = build_estimator(name)
        times, passes = [], []
        for r in range(args.repeats + 1):
            gen = torch.Generator().manual_seed(r)
            plan = estimator.plan(sampled, candidates, 0, 6, gen, prompt=rollout.prompt_tokens)
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logp = token_log_probs(policy, rollout.prompt_tokens, sampled.codes, plan).logp
            (-(logp.sum())).backward()
            if r > 0:  # r = 0 warms up
                times.append(time.perf_counter() - t0)
                passes.append(plan.num_forward_passes)
        rows.append({"estimator": name, "forward_passes": statistics.median(passes),
                     "seconds": statistics.median(times)})
    base = next(r["seconds"] for r in rows if r["estimator"] == "prompt_conditioned")
    for r in rows:
        r["x_prompt_conditioned"] = r["seconds"] / base
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = ShapesWorldConfig.roomy()
    policy, source = load_policy(args, world)
    print(f"policy: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    part1 = phase_seconds(args, world, policy)
    module = part1.pop("module")
    print(f"\nPart 1: one HT-GRPO step ({part1['images_per_step']} images, K={part1['inner_updates']} updates), "
          f"median of {part1['steps_timed']} steps")
    print("| phase | seconds | share |\n|---|---|---|")
    for k, v in part1["phases_s"].items():
        print(f"| {k} | {v:.3f} | {part1['share'][k]:.0%} |")
    print(f"| total | {part1['step_s']:.3f} | {part1['images_per_s']:.1f} images/s |")

    rows = estimator_costs(args, module)
    print(f"\nPart 2: one inner iteration over all image tokens of {part1['images_per_step']} images "
          f"(forward + backward), median of {args.repeats}")
    print("| estimator | forward passes | seconds | x prompt_conditioned |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['estimator']} | {r['forward_passes']} | {r['seconds']:.3f} | {r['x_prompt_conditioned']:.2f} |")
    result = {"policy": source, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "step": part1, "estimators": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
