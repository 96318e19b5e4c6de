"""Training stability of study methods across seeds: spread of the rollout-reward curve and of the final score.

    python experiments/shapes_geneval/stability.py [--study LOG_DIR/study_mar] [--methods "MAR-GRPO" "MAR-GRPO plain"]
                                                   [--readme experiments/shapes_geneval/README.md]

Reads, for every ``<study>/<method>/seed<k>/`` run, the per-step mean rollout reward (``train/reward/mean`` in the
run's TensorBoard events) and ``summary.json`` (GenEval overall before and after), and reports per method (n seeds,
T rollout steps, r[s, t] the reward of seed s at step t):

* **across-seed spread of the reward curve**: mean over t of the sample std over seeds of r[s, t] (how far the
  seeds' curves lie apart at the same step);
* **step-to-step jitter**: mean over seeds of std_t(r[s, t+1] − r[s, t]) / √2 (for white noise this is the noise
  std; a smooth curve gives a small value);
* **reward drift**: mean over seeds of (mean of the last third − mean of the first third) of r[s, ·];
* **final-score spread**: sample std over seeds of the final GenEval overall and of its change from the base,
  and the range (max − min) of the final overall;
* **gain interval**: the mean gain over seeds with its 95% task-stratified paired bootstrap interval over the
  validation prompts (``gain.py``'s ``bootstrap_gain`` on the runs' ``val_start_images.jsonl`` /
  ``val_end_images.jsonl``), so "improves on the warm start" is read against validation noise.

The table replaces the text between ``<!-- stability-table:start -->`` and ``<!-- stability-table:end -->`` of the
README (skipped when the markers are absent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START, END = "<!-- stability-table:start -->", "<!-- stability-table:end -->"
REWARD_TAG = "train/reward/mean"


def read_reward_curve(run_dir: Path, tag: str = REWARD_TAG) -> list[float]:
    """The per-step values of ``tag`` from the run's TensorBoard events, ordered by step (last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, float] = {}
    for events in sorted(run_dir.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                by_step[int(ev.step)] = float(ev.value)
    return [by_step[s] for s in sorted(by_step)]


def across_seed_spread(curves: list[list[float]]) -> float:
    """mean_t std_s r[s, t] over the steps every seed reached (sample std; needs >= 2 seeds). E.g. curves [0, 1] and
    [2, 1] → stds [√2, 0] → √2/2."""
    n = min(len(c) for c in curves)
    if len(curves) < 2 or n == 0:
        return math.nan
    return statistics.mean(statistics.stdev(c[t] for c in curves) for t in range(n))


def step_jitter(curve: list[float]) -> float:
    """std_t(r[t+1] − r[t]) / √2 (sample std; needs >= 3 steps). E.g. [0, 1, 0, 1] → diffs [1, −1, 1] → std 1.155
    → 0.816."""
    if len(curve) < 3:
        return math.nan
    diffs = [b - a for a, b in zip(curve, curve[1:])]
    return statistics.stdev(diffs) / math.sqrt(2.0)


def drift(curve: list[float]) -> float:
    """Mean of the last third minus mean of the first third (the last third holds the remainder; needs >= 3 steps).
    E.g. [1, 2, 3, 4] → 3.5 − 1 = 2.5."""
    n = len(curve)
    if n < 3:
        return math.nan
    k = n // 3
    return statistics.mean(curve[2 * k:]) - statistics.mean(curve[:k])


def gain_interval(run_dirs: list[Path], resamples: int = 2000) -> tuple[float, float, float] | None:
    """(mean gain, 2.5%, 97.5%) over the runs' paired per-image validations (None without them)."""
    sys.path.insert(0, str(HERE))
    from gain import bootstrap_gain, per_prompt, read_rows

    starts, ends, keys_by_task = [], [], None
    for run_dir in run_dirs:
        start_file, end_file = run_dir / "val_start_images.jsonl", run_dir / "val_end_images.jsonl"
        if not (start_file.exists() and end_file.exists()):
            continue
        start, end = read_rows(start_file), read_rows(end_file)
        if set(start) != set(end):
            continue
        if keys_by_task is None:
            by_task: dict[str, set[str]] = {}
            for (key, _), (tag, _) in start.items():
                by_task.setdefault(tag, set()).add(key)
            keys_by_task = {t: sorted(k) for t, k in sorted(by_task.items())}
        starts.append(per_prompt(start, keys_by_task))
        ends.append(per_prompt(end, keys_by_task))
    if not starts:
        return None
    return bootstrap_gain(starts, ends, keys_by_task, resamples)


def _std(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) >= 2 else math.nan


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def method_stability(study: Path, method: str) -> dict[str, float] | None:
    """The stability figures of one method (``None`` when it has no finished run)."""
    curves, finals, deltas, runs = [], [], [], []
    for run_dir in sorted((study / method.replace(" ", "_")).glob("seed*")):
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            continue
        runs.append(run_dir)
        summary = json.loads(summary_path.read_text())
        end = summary.get("val_end", {}).get("geneval/overall")
        start = summary.get("val_start", {}).get("geneval/overall")
        if end is not None:
            finals.append(float(end))
            if start is not None:
                deltas.append(float(end) - float(start))
        curve = read_reward_curve(run_dir)
        if curve:
            curves.append(curve)
    if not curves and not finals:
        return None
    interval = gain_interval(runs)
    return {
        "gain_ci": interval,
        "seeds": float(max(len(curves), len(finals))),
        "steps": float(min((len(c) for c in curves), default=0)),
        "reward_mean": _mean([statistics.mean(c) for c in curves]),
        "curve_spread": across_seed_spread(curves) if len(curves) >= 2 else math.nan,
        "jitter": _mean([step_jitter(c) for c in curves]),
        "drift": _mean([drift(c) for c in curves]),
        "final_mean": _mean(finals),
        "final_std": _std(finals),
        "final_range": (max(finals) - min(finals)) if len(finals) >= 2 else math.nan,
        "delta_mean": _mean(deltas),
        "delta_std": _std(deltas),
    }


def render(study: Path, methods: list[str]) -> str:
    def f(v: float, digits: int = 3, sign: bool = False) -> str:
        return "–" if v is None or math.isnan(v) else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}")

    head = ["method", "seeds", "rollout steps", "mean reward", "reward spread across seeds", "step-to-step jitter",
            "reward drift (last − first third)", "final overall", "final std", "final range", "Δ overall",
            "Δ std", "gain, 95% bootstrap interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        s = method_stability(study, m)
        if s is None:
            continue
        lines.append("| " + " | ".join([
            m, f"{s['seeds']:.0f}", f"{s['steps']:.0f}", f(s["reward_mean"]), f(s["curve_spread"]), f(s["jitter"]),
            f(s["drift"], sign=True), f(s["final_mean"]), f(s["final_std"]), f(s["final_range"]),
            f(s["delta_mean"], sign=True), f(s["delta_std"]),
            "–" if s["gain_ci"] is None else f"{s['gain_ci'][0]:+.3f} [{s['gain_ci'][1]:+.3f}, {s['gain_ci'][2]:+.3f}]",
        ]) + " |")
    return "\n".join(lines)


def write_table(study: Path, methods: list[str], readme: Path) -> str:
    text = render(study, methods)
    if readme.exists():
        doc = readme.read_text()
        if START in doc and END in doc:
            before, rest = doc.split(START, 1)
            _, after = rest.split(END, 1)
            readme.write_text(f"{before}{START}\n{text}\n{END}{after}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("HTGRPO_ROOT", REPO))
    ap.add_argument("--study", type=Path, default=root / "logs" / "study_mar")
    ap.add_argument("--methods", nargs="+", default=["MAR-GRPO", "MAR-GRPO plain"])
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = ap.parse_args(argv)
    if not args.study.is_dir():
        raise SystemExit(f"{args.study}: no study runs (run experiments/shapes_geneval/run_study.py first)")
    print(write_table(args.study, args.methods, args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
