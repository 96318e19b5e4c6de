"""Head cost of MAR-GRPO's multi-trajectory expectation (MTE): one RL step with S = 5 extra chains vs S = 1.

The issue-level question is what S costs per RL step on the diffusion head. Every MAR-GRPO step runs the head in
three places: the rollout (each decoded token's chain, plus all L positions at the logged AR steps, as the release
does), the MTE chains (S full chains from fresh noise on every token's AR latent, one batched call), and the scoring
of the stored transitions (forward + backward through the frozen head into z; critic tokens once per chain).

Part 1 — head cost per RL step, in ONE process: real MAR-GRPO steps (Lightning trainer, the shapes_mar_grpo
defaults) for each S of ``--trajectories``, interleaved over ``--rounds`` (S=1, S=5, S=1, S=5, ...) so both see the
same machine load; the same seed gives the same rollout noise. Timed per step (first step of every run is a
warm-up): the head network's work (token rows through its forward, plus twice the rows through its backward: a
load-independent FLOP proxy, the head being an MLP applied row by row), the seconds inside it (forward hooks on
every call + its backward through full-backward hooks), the MTE phase alone, and the whole step. Reports medians
and the S / S_first ratios; on a shared machine trust the work ratio over the seconds.

Part 2 — batched vs per-S loop for the MTE chains alone on one rollout (what ``mte`` runs), median of ``--repeats``.

    python experiments/benchmarks/mte_cost.py --threads 1                    # warm start if exported, else random
    python experiments/benchmarks/mte_cost.py --policy PATH --steps 3 --rounds 2 --out mte_cost.json
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
    ap.add_argument("--prompts", type=int, default=6, help="prompts per rollout batch (shapes_mar_grpo: 6)")
    ap.add_argument("--generations", type=int, default=8, help="num_generations (shapes_mar_grpo: 8)")
    ap.add_argument("--ar-steps", type=int, default=64, help="AR steps of the rollouts (sampler=mar: 64)")
    ap.add_argument("--diffusion-steps", default="ddim25", help="head sampling steps (shapes_mar_grpo: ddim25)")
    ap.add_argument("--train-ar-steps", type=int, default=4, help="AR steps trained per rollout (shapes_mar_grpo: 4)")
    ap.add_argument("--trajectories", default="1,5", help="values of S compared (the first is the reference)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps per run in part 1 (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved runs per S in part 1")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per S in part 2 (median); 0 skips part 2")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    return ap.parse_args(argv)


def project_world() -> ShapesWorldConfig:
    """The world the experiments use, read from conf/world/shapes.yaml (the dataclass defaults equal it)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "world" / "shapes.yaml"))
    node.pop("_target_", None)
    return ShapesWorldConfig(**node)


def load_policy(args: argparse.Namespace, world: ShapesWorldConfig):
    path = args.policy or (str(DEFAULT_POLICY) if DEFAULT_POLICY.exists() else None)
    if path is not None:
        return (lambda: build_mar_policy(world, init="pretrained", pretrained_path=path)), path
    return (lambda: build_mar_policy(world)), "random init (shapes_mar defaults)"


class HeadTimer:
    """Wall seconds spent in a module: forward (pre/post forward hooks) + backward (full backward pre/post hooks),
    and the work done: token rows through the forward, and through the backward (about 2 forwards each).

    The head network is never nested in itself, and CPU autograd runs one node at a time, so the intervals add up
    without overlap. The row counts do not depend on machine load; the seconds do.
    """

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0           # token rows through the forward
        self.backward_rows = 0  # token rows through the backward
        self._t0 = 0.0
        self._b0 = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)
        module.register_full_backward_pre_hook(self._bstart)
        module.register_full_backward_hook(self._bstop)

    def _start(self, _module, args):
        self.rows += int(args[0].shape[0])
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def _bstart(self, _module, grad_output):
        self.backward_rows += int(grad_output[0].shape[0])
        self._b0 = time.perf_counter()

    def _bstop(self, *_):
        self.seconds += time.perf_counter() - self._b0


def rl_step_costs(args: argparse.Namespace, make_policy, sampler: MARSamplerSettings, world: ShapesWorldConfig,
                  S: int) -> list[dict[str, float]]:
    """``args.steps`` real MAR-GRPO steps with S MTE chains; per step: head, MTE-phase and total seconds."""
    policy = make_policy()
    module = MARGRPO(policy, ShapesPromptReward(world, "partial"), sampler=sampler,
                     num_generations=args.generations, lr=1e-4, beta=0.01, num_train_ar_steps=args.train_ar_steps,
                     num_train_diffusion_steps=10, mte={"num_trajectories": S}, seed=0)
    timer = HeadTimer(policy.mar.diffloss.net)
    rows: list[dict[str, float]] = []
    mark: dict[str, float] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            mark.update(head=timer.seconds, rows=timer.rows, brows=timer.backward_rows, t=time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = pl_module.last_timings
            fwd, bwd = timer.rows - mark["rows"], timer.backward_rows - mark["brows"]
            rows.append({"head_s": timer.seconds - mark["head"], "head_work": fwd + 2 * bwd, "head_fwd_rows": fwd,
                         "head_bwd_rows": bwd, "mte_s": t["mte"],
                         "step_s": time.perf_counter() - mark["t"], "rollout_s": t["rollout"],
                         "update_s": t["update"]})

    data = PromptDataModule(ShapesPromptStream(world, seed=0), batch_size=args.prompts)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    return rows[1:] or rows


def head_cost_per_step(args: argparse.Namespace, make_policy, sampler: MARSamplerSettings,
                       world: ShapesWorldConfig) -> list[dict]:
    values = [int(s) for s in args.trajectories.split(",")]
    per_s: dict[int, list[dict[str, float]]] = {S: [] for S in values}
    for _ in range(args.rounds):
        for S in values:
            per_s[S] += rl_step_costs(args, make_policy, sampler, world, S)
    med = {S: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for S, rows in per_s.items()}
    ref = med[values[0]]
    return [{"S": S, **m, "steps_timed": len(per_s[S]), "head_ratio": m["head_s"] / ref["head_s"],
             "work_ratio": m["head_work"] / ref["head_work"],
             "mte_ratio": m["mte_s"] / ref["mte_s"], "step_ratio": m["step_s"] / ref["step_s"]}
            for S, m in med.items()]


def _median_time(fn, repeats: int) -> float:
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if r > 0:  # r = 0 warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batched_vs_loop(args: argparse.Namespace, make_policy, sampler: MARSamplerSettings,
                    world: ShapesWorldConfig) -> list[dict]:
    data = ShapesPromptStream(world, seed=1)
    batch = collate_prompts([data[i] for i in range(args.prompts)])
    rows, rollout = [], None
    for S in [int(s) for s in args.trajectories.split(",")]:
        module = MARGRPO(make_policy(), ShapesPromptReward(world, "partial"), sampler=sampler,
                         num_generations=args.generations, mte={"num_trajectories": S})
        rollout = rollout or module.rollout(batch)
        batched = _median_time(lambda: module.multi_trajectory(rollout, torch.Generator().manual_seed(0), True),
                               args.repeats)
        loop = _median_time(lambda: module.multi_trajectory(rollout, torch.Generator().manual_seed(0), False),
                            args.repeats)
        tokens = rollout.rollout.tokens.shape[0] * rollout.rollout.tokens.shape[1]
        rows.append({"S": S, "chain_tokens": S * tokens, "batched_s": batched, "loop_s": loop,
                     "loop_over_batched": loop / batched})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = project_world()
    make_policy, source = load_policy(args, world)
    sampler = MARSamplerSettings(num_ar_steps=args.ar_steps, num_diffusion_steps=args.diffusion_steps)
    L_tok = world.grid_size ** 2
    print(f"policy: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {args.prompts}x{args.generations} images x {L_tok} tokens, "
          f"{args.ar_steps} AR steps ({args.train_ar_steps} trained), head {args.diffusion_steps}")
    part1 = head_cost_per_step(args, make_policy, sampler, world)
    print(f"\nPart 1: one MAR-GRPO step (median over {part1[0]['steps_timed']} steps per S, {args.rounds} "
          f"interleaved round(s)); ratios against S={part1[0]['S']}")
    print("| S | head work / step (token rows, fwd + 2 bwd) | work ratio | head s / step | head s ratio | "
          "MTE phase s | MTE ratio | step s | step ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in part1:
        print(f"| {r['S']} | {r['head_work']:.0f} | {r['work_ratio']:.2f} | {r['head_s']:.3f} | {r['head_ratio']:.2f} | "
              f"{r['mte_s']:.3f} | {r['mte_ratio']:.2f} | {r['step_s']:.3f} | {r['step_ratio']:.2f} |")
    part2 = batched_vs_loop(args, make_policy, sampler, world) if args.repeats > 0 else []
    if part2:
        print(f"\nPart 2: the MTE chains alone on one rollout (median of {args.repeats})")
        print("| S | chain tokens | batched s | per-S loop s | loop / batched |\n|---|---|---|---|---|")
        for r in part2:
            print(f"| {r['S']} | {r['chain_tokens']} | {r['batched_s']:.3f} | {r['loop_s']:.3f} | "
                  f"{r['loop_over_batched']:.2f} |")
    result = {"policy": source, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rl_step": part1, "mte_chains": part2}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
