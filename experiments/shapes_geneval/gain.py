"""HT-GRPO's gain over its warm start on ShapesWorld-GenEval, over several seeds, with a bootstrap interval.

Runs the README main command (``python -m htgrpo.fit experiment=shapes_ht``) once per seed (skipping seeds whose
run folder already holds a ``summary.json``), then reads each run's per-image validation results before and after
training (``val_start_images.jsonl`` / ``val_end_images.jsonl``, written by ``htgrpo.fit``) and reports:

* per seed: overall before, after, gain; the mean rollout reward of the first and last third of training;
* the mean gain over seeds with a 95% paired bootstrap interval: each of ``--resamples`` draws resamples the
  validation prompts with replacement within each GenEval task (the same draw for before/after and for every seed,
  so the pairing is kept), recomputes GenEval's overall (mean of the task means) per seed, and averages the gains
  of a resample (with replacement) of the seeds; the interval is the 2.5% and 97.5% quantiles of those means.

    python experiments/shapes_geneval/gain.py --seeds 0 1 2            # runs what is missing, writes logs/gain/gain.md
    python experiments/shapes_geneval/gain.py --seeds 0 1 2 -- trainer.limit_train_batches=60   # extra fit overrides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def read_rows(path: Path) -> dict[tuple[str, int], tuple[str, bool]]:
    """``(prompt key, image index) -> (task, correct)`` from a ``*_images.jsonl`` file."""
    rows = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            rows[(str(r["key"]), int(r["image_index"]))] = (str(r["tag"]), bool(r["correct"]))
    return rows


def overall(correct: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> float:
    """GenEval's overall: the unweighted mean over tasks of the (weighted) share of correct images."""
    return float(np.mean([(correct[t] * weights[t]).sum() / weights[t].sum() for t in correct]))


def per_prompt(rows: dict[tuple[str, int], tuple[str, bool]], keys_by_task: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per task, the share of correct images of each prompt (in ``keys_by_task`` order)."""
    acc: dict[str, list[bool]] = defaultdict(list)
    for (key, _), (tag, ok) in rows.items():
        acc[key].append(ok)
    return {t: np.array([np.mean(acc[k]) for k in keys]) for t, keys in keys_by_task.items()}


def resample_prompt_weights(rng: np.random.Generator, keys_by_task: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per task, the multiplicity of each prompt in one resample (with replacement) of that task's prompts."""
    return {t: np.bincount(rng.integers(0, len(k), len(k)), minlength=len(k)).astype(float)
            for t, k in keys_by_task.items()}


def bootstrap_gain(starts: list[dict], ends: list[dict], keys_by_task: dict[str, list[str]], resamples: int,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean gain over seeds and its 95% percentile interval under a bootstrap of the seeds and, within each task,
    of the validation prompts (paired: one prompt draw serves before and after of every seed)."""
    rng = np.random.default_rng(seed)
    ones = {t: np.ones(len(k)) for t, k in keys_by_task.items()}
    point = float(np.mean([overall(e, ones) - overall(s, ones) for s, e in zip(starts, ends)]))
    draws = np.empty(resamples)
    for i in range(resamples):
        w = resample_prompt_weights(rng, keys_by_task)
        gains = [overall(e, w) - overall(s, w) for s, e in zip(starts, ends)]
        draws[i] = np.mean([gains[j] for j in rng.integers(0, len(gains), len(gains))])  # seeds resampled too
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return point, float(lo), float(hi)


def load_run(run_dir: Path, keys_by_task: dict[str, list[str]] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[str]]]:
    """Per-prompt shares of correct images before and after training of one ``fit`` run folder, and the task ->
    prompt keys map they are ordered by (built from this run when ``keys_by_task`` is None)."""
    start, end = read_rows(run_dir / "val_start_images.jsonl"), read_rows(run_dir / "val_end_images.jsonl")
    if set(start) != set(end):
        raise SystemExit(f"{run_dir}: the validation images before and after differ in their prompts")
    if keys_by_task is None:
        by_task: dict[str, set[str]] = defaultdict(set)
        for (key, _), (tag, _) in start.items():
            by_task[tag].add(key)
        keys_by_task = {t: sorted(k) for t, k in sorted(by_task.items())}
    return per_prompt(start, keys_by_task), per_prompt(end, keys_by_task), keys_by_task


def t_quantile(n: int) -> float:
    """t(0.975, n − 1): the two-sided 95% Student-t quantile for n values."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval over the values); the half-width is NaN below 2 values. E.g.
    [0, 0.25, 0] → mean 0.0833, sd 0.1443, half 4.303 · 0.1443 / √3 = 0.3586."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    return mean, t_quantile(len(values)) * float(np.std(values, ddof=1)) / float(np.sqrt(len(values)))


def format_interval(mean: float, half: float, digits: int = 3) -> str:
    """``+m [+lo, +hi]`` (signed) for a mean and its half-width; the mean alone when the half-width is NaN."""
    if half != half:  # NaN
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def paired_difference(a: tuple[list[dict], list[dict]], b: tuple[list[dict], list[dict]],
                      keys_by_task: dict[str, list[str]], resamples: int, seed: int = 0
                      ) -> tuple[float, float, float, float]:
    """Mean gain of method ``a`` minus that of method ``b`` (each ``(starts, ends)`` per seed, seeds paired by
    position), with its 95% paired bootstrap interval and a two-sided bootstrap p-value.

    Each resample draws the validation prompts with replacement within each task and the seeds with replacement,
    the same draw for both methods (same seed = same validation images before training), and computes
    ``d = mean_s gain_a(s) − mean_s gain_b(s)``. The interval is the 2.5%/97.5% quantiles of ``d``;
    ``p = min(1, 2 · min(P(d ≤ 0), P(d ≥ 0)))``: the difference is significant at 5% when the interval excludes 0.
    """
    (sa, ea), (sb, eb) = a, b
    if len(sa) != len(sb):
        raise ValueError(f"paired_difference needs the same seeds for both methods, got {len(sa)} and {len(sb)}")
    rng = np.random.default_rng(seed)
    ones = {t: np.ones(len(k)) for t, k in keys_by_task.items()}

    def gains(starts, ends, w):
        return np.array([overall(e, w) - overall(s, w) for s, e in zip(starts, ends)])

    point = float(np.mean(gains(sa, ea, ones)) - np.mean(gains(sb, eb, ones)))
    draws = np.empty(resamples)
    for i in range(resamples):
        w = resample_prompt_weights(rng, keys_by_task)
        pick = rng.integers(0, len(sa), len(sa))
        draws[i] = gains(sa, ea, w)[pick].mean() - gains(sb, eb, w)[pick].mean()
    lo, hi = np.quantile(draws, [0.025, 0.975])
    p_value = min(1.0, 2.0 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))
    return point, float(lo), float(hi), p_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiment", default="shapes_ht")
    parser.add_argument("--out", type=Path, default=Path("logs/gain"))
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("overrides", nargs="*", help="extra `python -m htgrpo.fit` overrides (after --)")
    args = parser.parse_args()

    starts, ends, lines = [], [], []
    keys_by_task: dict[str, list[str]] | None = None
    for seed in args.seeds:
        run_dir = args.out / f"{args.experiment}_seed{seed}"
        if not (run_dir / "summary.json").exists():
            cmd = [sys.executable, "-m", "htgrpo.fit", f"experiment={args.experiment}", f"seed={seed}",
                   f"hydra.run.dir={run_dir}", *args.overrides]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env=dict(os.environ))
        summary = json.loads((run_dir / "summary.json").read_text())
        s, e, keys_by_task = load_run(run_dir, keys_by_task)
        starts.append(s)
        ends.append(e)
        ones = {t: np.ones(len(k)) for t, k in keys_by_task.items()}
        curve = summary.get("reward_curve", {})
        thirds = curve.get("thirds", [float("nan")] * 3)
        lines.append(f"| {seed} | {overall(s, ones):.3f} | {overall(e, ones):.3f} | {overall(e, ones) - overall(s, ones):+.3f} "
                     f"| {thirds[0]:.3f} | {thirds[-1]:.3f} | {summary['steps']} | {summary['seconds']:.0f} |")
    assert keys_by_task is not None
    point, lo, hi = bootstrap_gain(starts, ends, keys_by_task, args.resamples)
    n_images = sum(len(k) for k in keys_by_task.values())
    images = len(read_rows(args.out / f"{args.experiment}_seed{args.seeds[0]}" / "val_start_images.jsonl"))
    table = "\n".join([
        f"`{args.experiment}` gain on ShapesWorld-GenEval ({n_images} prompts, {images} validation images per "
        f"evaluation; seeds {', '.join(map(str, args.seeds))})",
        "",
        "| seed | overall before | overall after | gain | rollout reward, first third | last third | rollout steps | s |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"mean gain {point:+.3f}, 95% bootstrap interval [{lo:+.3f}, {hi:+.3f}] "
        f"({args.resamples} resamples of the seeds and, within each task, of the validation prompts; paired)",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gain.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
