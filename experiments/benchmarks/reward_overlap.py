"""Scoring overlapped with sampling (``algorithm.overlap_scoring``): seconds of one HT-GRPO step with a served reward,
scored after the rollout (sequential) vs chunk by chunk while the next chunk samples (overlapped), in one process.

Setup: the shipped ShapesWorld warm-start policy, ``--prompts`` x ``--generations`` images per step sampled in chunks
of ``--chunk`` images (``algorithm.rollout_micro_batch_size``), rewarded by ``reward=vlm_judge`` against a fake
OpenAI-compatible judge on 127.0.0.1 (``experiments/reward_servers/fake_openai.py``, its own process, as a served
judge is) that

* takes ``latency`` seconds per request, with ``latency`` = the measured median sampling time of one chunk, and
* serves ``--chunk`` requests at once (a GPU-bound judge: its throughput is one chunk per ``latency``), so scoring
  a chunk takes as long as sampling it, whichever mode asks;
* answers ``Score: X`` with X from the image's mean brightness (a real, image-dependent reward, so the updates of
  the two modes can be compared).

It runs ``--rounds`` fits of ``--steps`` rollout steps per mode (same seed, same initial weights), the modes
alternating so that load changes on a shared machine hit both alike, and reports the median step time of each, their
ratio, the ideal ratio ``((n+1)·s + u) / (2n·s + u)`` for n
chunks of sampling time s and update time u, and whether the two runs ended with identical rewards and weights.

    OMP_NUM_THREADS=1 python experiments/benchmarks/reward_overlap.py
    OMP_NUM_THREADS=1 python experiments/benchmarks/reward_overlap.py --chunk 8 --stages 2 2 2 --out overlap.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
FAKE_SERVER = ROOT / "experiments" / "reward_servers" / "fake_openai.py"

import lightning as L  # noqa: E402

from htgrpo.algorithms.ht_grpo import HTGRPO  # noqa: E402
from htgrpo.assets import asset_path  # noqa: E402
from htgrpo.data.datamodules import PromptDataModule, collate_prompts  # noqa: E402
from htgrpo.data.prompt_sets import ShapesPromptStream  # noqa: E402
from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.policies.generators import SamplerSettings  # noqa: E402
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy  # noqa: E402
from htgrpo.rewards.vlm_judge import VLMJudgeReward  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch")
    ap.add_argument("--generations", type=int, default=8, help="num_generations (G)")
    ap.add_argument("--chunk", type=int, default=4, help="images per rollout chunk (rollout_micro_batch_size)")
    ap.add_argument("--sampling-steps", type=int, default=12, help="rollout sampling steps (shapes_ht: 12)")
    ap.add_argument("--stages", type=int, nargs=3, default=[1, 1, 0], metavar=("GLOBAL", "STRUCT", "REFINE"),
                    help="inner iterations per stage (K = their sum; shapes_ht: 2 2 2)")
    ap.add_argument("--steps", type=int, default=2, help="rollout steps per fit")
    ap.add_argument("--rounds", type=int, default=3, help="fits per mode, the modes alternating")
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="the fake judge stops after this many seconds")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    return ap.parse_args(argv)


def start_judge(latency: float, capacity: int, max_seconds: float) -> tuple[subprocess.Popen, str]:
    """The fake judge in its own process on a free port (``Score: 10 x brightness``); returns (process, API root)."""
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", "0", "--latency", f"{latency:.4f}",
                             "--capacity", str(capacity), "--score-brightness", "--max-seconds", str(max_seconds)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "fake OpenAI-compatible server on http://127.0.0.1:PORT/v1 (...)"
    if " on http" not in line:
        proc.kill()
        raise RuntimeError(f"fake judge did not start: {line!r}")
    return proc, line.split(" on ", 1)[1].split()[0]


def make_module(args: argparse.Namespace, world: ShapesWorldConfig, reward, overlap: bool) -> HTGRPO:
    torch.manual_seed(0)
    policy = build_masked_diffusion_policy(world, init="pretrained", pretrained_path=asset_path("shapes_llada_warmstart"))
    n_global, n_struct, n_refine = args.stages
    return HTGRPO(policy, reward, num_generations=args.generations, sampler=SamplerSettings(num_steps=args.sampling_steps),
                  stages={"n_global": n_global, "n_struct": n_struct, "n_refine": n_refine}, lr=5e-4, beta=0.01,
                  rollout_micro_batch_size=args.chunk, overlap_scoring=overlap, seed=0)


def chunk_sampling_seconds(args: argparse.Namespace, world: ShapesWorldConfig, module: HTGRPO, repeats: int = 3) -> float:
    """Median seconds to sample (and decode) one rollout chunk of ``--chunk`` images, timed inside real rollouts of
    the module: the gaps between consecutive chunks handed to the scorer."""
    stream = ShapesPromptStream(world, seed=0)
    batch = collate_prompts([stream[i] for i in range(args.prompts)])

    class Stopwatch:  # stands in for a ChunkScorer: records when each chunk is ready, scores nothing
        def __init__(self) -> None:
            self.ready = [time.perf_counter()]

        def submit(self, images, records) -> None:
            self.ready.append(time.perf_counter())

    gaps: list[float] = []
    for r in range(repeats + 1):
        watch = Stopwatch()
        module.rollout(batch, watch)
        if r:  # r = 0 warms up
            gaps += [b - a for a, b in zip(watch.ready, watch.ready[1:])]
    return statistics.median(gaps)


def run_fit(args: argparse.Namespace, world: ShapesWorldConfig, reward, overlap: bool) -> dict:
    """``--steps`` rollout steps of a fresh module (same initial weights and seed every time) in one mode."""
    module = make_module(args, world, reward, overlap)
    step_seconds: list[float] = []
    phases: list[dict[str, float]] = []
    rewards: list[torch.Tensor] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_seconds.append(time.perf_counter() - self.t0)
            phases.append(dict(pl_module.last_timings))
            rewards.append(pl_module.last_scored.rewards.clone())

    torch.manual_seed(1)
    data = PromptDataModule(ShapesPromptStream(world, seed=0), batch_size=args.prompts)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[Clock()])
    trainer.fit(module, datamodule=data)
    return {"steps_s": step_seconds, "phases": phases, "rewards": torch.cat(rewards),
            "weights": [p.detach().clone() for p in module.policy.parameters()]}


def run_modes(args: argparse.Namespace, world: ShapesWorldConfig, reward) -> dict[str, dict]:
    """Both modes in ``--rounds`` alternating rounds (sequential first, then overlapped first, ...), so that a load
    change on a shared machine hits both alike; per mode the medians over every timed step."""
    runs: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
    for r in range(args.rounds):
        order = ["sequential", "overlapped"] if r % 2 == 0 else ["overlapped", "sequential"]
        for name in order:
            runs[name].append(run_fit(args, world, reward, overlap=name == "overlapped"))
            print(f"  round {r + 1}/{args.rounds} {name}: steps " +
                  ", ".join(f"{t:.2f}" for t in runs[name][-1]["steps_s"]) + " s", flush=True)
    out = {}
    for name, fits in runs.items():
        steps = [t for f in fits for t in f["steps_s"]]
        phases = [p for f in fits for p in f["phases"]]
        out[name] = {"step_s": statistics.median(steps), "steps_s": steps,
                     "phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
                     "rewards": [f["rewards"] for f in fits], "weights": [f["weights"] for f in fits]}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    world = ShapesWorldConfig.roomy()
    images = args.prompts * args.generations
    n_chunks = -(-images // args.chunk)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{args.prompts} prompts x {args.generations} = {images} images in {n_chunks} chunks of {args.chunk}, "
          f"{args.sampling_steps} sampling steps, K = {sum(args.stages)} inner updates")

    probe = make_module(args, world, lambda im, rec: torch.zeros(len(rec)), overlap=False)
    latency = chunk_sampling_seconds(args, world, probe)
    print(f"sampling one chunk: {latency:.3f} s (median) -> judge latency {latency:.3f} s per request, "
          f"{args.chunk} requests at once")

    proc, url = start_judge(latency, args.chunk, args.max_seconds)
    try:
        reward = VLMJudgeReward(url, "fake-judge", "Rate 0-10: {prompt}", concurrency=args.chunk,
                                timeout=60 + 4 * latency * n_chunks, retries=0)
        reward.check_ready()
        modes = run_modes(args, world, reward)
    finally:
        proc.terminate()
        requests = proc.communicate(timeout=30)[0].strip()

    sequential, overlapped = modes["sequential"], modes["overlapped"]
    s = latency
    u = sequential["phases_s"]["update"]
    ideal = ((n_chunks + 1) * s + u) / (2 * n_chunks * s + u)
    ratio = overlapped["step_s"] / sequential["step_s"]
    same_rewards = all(torch.equal(a, b) for a in sequential["rewards"] for b in overlapped["rewards"])
    same_weights = all(torch.equal(a, b) for wa in sequential["weights"] for wb in overlapped["weights"]
                       for a, b in zip(wa, wb))
    print(f"\none RL step, median of {len(sequential['steps_s'])} steps per mode (judge: {requests}):")
    print("| mode | step s | rollout s | reward wait s | update s |\n|---|---|---|---|---|")
    for name, r in (("sequential", sequential), ("overlapped", overlapped)):
        p = r["phases_s"]
        print(f"| {name} | {r['step_s']:.2f} | {p['rollout']:.2f} | {p['reward']:.2f} | {p['update']:.2f} |")
    print(f"ideal ratio ((n+1)s + u)/(2ns + u) = {ideal:.3f}")
    print(f"identical rewards and weights after {args.steps} steps, every fit of both modes: "
          f"{same_rewards and same_weights}")
    print(f"overlapped / sequential step time: {ratio:.3f} ({'<=' if ratio <= 0.65 else '>'} 0.65)")
    result = {"images": images, "chunks": n_chunks, "chunk_sampling_s": latency, "ideal_ratio": ideal,
              "ratio": ratio, "identical_rewards": same_rewards, "identical_weights": same_weights,
              **{f"{name}_{k}": v for name, r in (("sequential", sequential), ("overlapped", overlapped))
                 for k, v in r.items() if k in ("step_s", "steps_s", "phases_s")}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
