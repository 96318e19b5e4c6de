"""Training stability of MAR-GRPO against plain GRPO on the toy MAR, across seeds, paired by seed (issue 21, item 5).

Two steps, like ``ablation_table.py``; neither trains nor samples:

1. ``--collect`` reads the finished runs of ``run_study.py --study-name study_mar`` (``LOG_DIR/study_mar/<method>/
   seed<k>/``) and writes one small JSON row per run to ``study_mar/runs/<method>_s<seed>.json``: ``collapse.py``'s row
   (summary, config, per-prompt shares of correct validation images before and after) plus ``reward_curve``, the
   per-step mean rollout reward (``train/reward/mean`` in the run's TensorBoard events). These rows are committed;
   the tables are made from them alone.
2. The tables. Per method (n seeds, T rollout steps, r[s, t] the reward of seed s at step t):

   * **across-seed spread of the reward curve**: mean over t of the sample std over seeds of r[s, t];
   * **step-to-step jitter**: mean over seeds of std_t(r[s, t+1] − r[s, t]) / √2 (for white noise the noise std);
   * **reward drift**: mean over seeds of (mean of the last third − mean of the first third) of r[s, ·];
   * **final-score spread**: sample std over seeds of the final GenEval overall and of its change, and the range;
   * **gain**: the mean change over the warm start with its 95% t-interval over seeds (prompts fixed) and
     ``gain.py``'s bootstrap interval (seeds and, within each task, validation prompts resampled).

   Then **MAR-GRPO − plain, paired by seed** (both start from the same warm start, and the same seed gives both the
   same prompts and the same validation noise before training): for every per-seed figure (gain, mean reward,
   jitter, drift, and the fidelity figures after training: ``diversity/stray_share``, ``objects_ratio``,
   ``color_divergence``, ``per_prompt``) the mean difference with its 95% paired t-interval; for the two spreads
   across seeds (final overall, reward curve) the ratio of the stds with its 95% F interval (for the curve, the
   root-mean-square over steps of the per-step std, with n − 1 degrees of freedom: conservative, since the steps are
   not independent). A figure is *resolved* when its interval excludes 0 (a ratio: 1).

The tables replace the text between ``<!-- stability-table:start -->`` and ``<!-- stability-table:end -->`` of the
README (``stability-table-<tag>`` with ``--tag``; skipped when the markers are absent).

    python experiments/shapes_geneval/stability.py --collect    # rows from LOG_DIR/study_mar, then the tables
    python experiments/shapes_geneval/stability.py              # the tables from the committed rows
    python experiments/shapes_geneval/stability.py --collect --study LOG_DIR/study_mar_lr3e-4 \
        --rows experiments/shapes_geneval/study_mar/runs_lr3e-4 --tag lr3e-4      # another setting, its own table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from collapse import COLOR_DIVERGENCE, PER_PROMPT, STRAY, RunRow, collect_rows, load_row, run_gain  # noqa: E402
from gain import bootstrap_gain, format_interval, paired_difference, t_interval  # noqa: E402
from make_table import _replace_between  # noqa: E402

REWARD_TAG = "train/reward/mean"
ROWS_DIR = HERE / "study_mar" / "runs"
METHODS = ("MAR-GRPO", "MAR-GRPO plain")  # run_study.MAR_METHODS; the first is compared with the second
OBJECTS_RATIO = "diversity/objects_ratio"
FIDELITY = (STRAY, OBJECTS_RATIO, COLOR_DIVERGENCE, PER_PROMPT)  # after training, per seed


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


@dataclass
class MarRun:
    """One committed run row: the validations before/after (``collapse.RunRow``) and the rollout-reward curve."""

    row: RunRow
    reward_curve: list[float]

    @property
    def gain(self) -> float:
        return run_gain(self.row)


def collect(study: Path, rows_dir: Path = ROWS_DIR) -> list[Path]:
    """Write a row file, with its reward curve, for every finished run under ``study`` (``<method>/seed<k>/``;
    ``MAR_base``, the warm start's DPG scores, has no ``summary.json`` and is not a run)."""
    return collect_rows(study, rows_dir, extra=lambda run_dir: {"reward_curve": read_reward_curve(run_dir)})


def load_runs(rows_dir: Path = ROWS_DIR) -> dict[str, dict[int, MarRun]]:
    """method -> seed -> run, from the committed row files."""
    by_method: dict[str, dict[int, MarRun]] = {}
    for path in sorted(rows_dir.glob("*.json")):
        row = load_row(path)
        curve = [float(v) for v in json.loads(path.read_text()).get("reward_curve", [])]
        by_method.setdefault(row.setting, {})[row.seed] = MarRun(row, curve)
    return by_method


def std_ratio_interval(sd_a: float, sd_b: float, df_a: int, df_b: int) -> tuple[float, float, float]:
    """sd_a / sd_b with the 95% interval of the F test for the ratio of two normal variances (degrees of freedom
    df_a, df_b): [√(R / F(0.975; df_a, df_b)), √(R / F(0.025; df_a, df_b))], R = (sd_a / sd_b)². E.g. sd 2 and 1
    on 1 and 1 degrees of freedom: ratio 2, interval [2 / √647.8, 2 · √647.8] = [0.079, 50.9]."""
    from scipy import stats

    r = (sd_a / sd_b) ** 2
    return (math.sqrt(r), math.sqrt(r / float(stats.f.ppf(0.975, df_a, df_b))),
            math.sqrt(r / float(stats.f.ppf(0.025, df_a, df_b))))


def rms_spread(curves: list[list[float]]) -> float:
    """√(mean_t var_s r[s, t]) over the steps every curve reached (sample variance; needs >= 2 curves). E.g. curves
    [0, 1] and [2, 1] → variances [2, 0] → 1.0."""
    steps = min(len(c) for c in curves)
    return math.sqrt(float(np.mean(np.var(np.array([c[:steps] for c in curves]), axis=0, ddof=1))))


def method_stability(runs: dict[int, MarRun], resamples: int = 2000) -> dict:
    """The stability figures of one method's runs (module docstring)."""
    seeds = sorted(runs)
    curves = [runs[s].reward_curve for s in seeds if runs[s].reward_curve]
    finals = [float(runs[s].row.val_end["geneval/overall"]) for s in seeds]
    deltas = [runs[s].gain for s in seeds]
    keys_by_task = runs[seeds[0]].row.keys_by_task
    boot = bootstrap_gain([runs[s].row.start_shares for s in seeds], [runs[s].row.end_shares for s in seeds],
                          keys_by_task, resamples)
    return {
        "seeds": len(seeds),
        "steps": min((len(c) for c in curves), default=0),
        "reward_mean": _mean([statistics.mean(c) for c in curves]),
        "curve_spread": across_seed_spread(curves) if len(curves) >= 2 else math.nan,
        "jitter": _mean([step_jitter(c) for c in curves]),
        "drift": _mean([drift(c) for c in curves]),
        "final_mean": _mean(finals),
        "final_std": _std(finals),
        "final_range": (max(finals) - min(finals)) if len(finals) >= 2 else math.nan,
        "delta": t_interval(deltas),
        "delta_std": _std(deltas),
        "gain_bootstrap": boot,
    }


def _std(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) >= 2 else math.nan


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


def _f(v: float, digits: int = 3, sign: bool = False) -> str:
    return "–" if v is None or math.isnan(v) else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}")


def per_method_table(by_method: dict[str, dict[int, MarRun]], methods: list[str], resamples: int) -> str:
    head = ["method", "seeds", "rollout steps", "mean reward", "reward spread across seeds", "step-to-step jitter",
            "reward drift (last − first third)", "final overall", "final std", "final range",
            "Δ overall [95% t-CI, prompts fixed]", "Δ std", "Δ, prompts resampled [bootstrap]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m not in by_method:
            continue
        s = method_stability(by_method[m], resamples)
        point, lo, hi = s["gain_bootstrap"]
        lines.append("| " + " | ".join([
            m, str(s["seeds"]), str(s["steps"]), _f(s["reward_mean"]), _f(s["curve_spread"]), _f(s["jitter"]),
            _f(s["drift"], sign=True), _f(s["final_mean"]), _f(s["final_std"]), _f(s["final_range"]),
            format_interval(*s["delta"]), _f(s["delta_std"]), f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]",
        ]) + " |")
    return "\n".join(lines)


def paired_table(a: dict[int, MarRun], b: dict[int, MarRun], names: tuple[str, str], resamples: int) -> str:
    """``names[0]`` − ``names[1]`` over the seeds both ran (module docstring)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return f"(paired comparison: {len(seeds)} common seed(s); it needs 2)"
    ra, rb = [a[s] for s in seeds], [b[s] for s in seeds]
    lines = [f"{names[0]} − {names[1]}, paired by seed (seeds {', '.join(map(str, seeds))}):", "",
             f"| figure | {names[0]} | {names[1]} | difference [95% paired t-CI] or sd ratio [95% F-CI] "
             "| resolved |", "|---|---|---|---|---|"]

    def diff_line(label: str, va: list[float], vb: list[float], digits: int = 3) -> None:
        mean, half = t_interval([x - y for x, y in zip(va, vb)])
        resolved = not math.isnan(half) and (mean - half > 0 or mean + half < 0)
        lines.append(f"| {label} | {np.mean(va):.{digits}f} | {np.mean(vb):.{digits}f} | {format_interval(mean, half, digits)} "
                     f"| {'yes' if resolved else 'no'} |")

    def ratio_line(label: str, sd_a: float, sd_b: float) -> None:
        r, lo, hi = std_ratio_interval(sd_a, sd_b, len(seeds) - 1, len(seeds) - 1)
        lines.append(f"| {label} | {sd_a:.3f} | {sd_b:.3f} | ×{r:.2f} [{lo:.2f}, {hi:.2f}] "
                     f"| {'yes' if lo > 1 or hi < 1 else 'no'} |")

    diff_line("GenEval Δ overall (prompts fixed)", [r.gain for r in ra], [r.gain for r in rb])
    point, lo, hi, _ = paired_difference(([r.row.start_shares for r in ra], [r.row.end_shares for r in ra]),
                                         ([r.row.start_shares for r in rb], [r.row.end_shares for r in rb]),
                                         ra[0].row.keys_by_task, resamples)
    lines.append(f"| GenEval Δ overall (prompts resampled, bootstrap) | | | {point:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                 f"| {'yes' if lo > 0 or hi < 0 else 'no'} |")
    if all(r.reward_curve for r in ra + rb):
        ca, cb = [r.reward_curve for r in ra], [r.reward_curve for r in rb]
        diff_line("mean rollout reward", [statistics.mean(c) for c in ca], [statistics.mean(c) for c in cb])
        diff_line("step-to-step jitter", [step_jitter(c) for c in ca], [step_jitter(c) for c in cb])
        diff_line("reward drift (last − first third)", [drift(c) for c in ca], [drift(c) for c in cb])
        ratio_line("reward-curve spread across seeds (rms over steps of the sd)", rms_spread(ca), rms_spread(cb))
    finals_a = [float(r.row.val_end["geneval/overall"]) for r in ra]
    finals_b = [float(r.row.val_end["geneval/overall"]) for r in rb]
    ratio_line("final-overall spread across seeds (sd)", _std(finals_a), _std(finals_b))
    for key in FIDELITY:
        if all(key in r.row.val_end for r in ra + rb):
            diff_line(f"{key.split('/')[-1]} after training", [float(r.row.val_end[key]) for r in ra],
                      [float(r.row.val_end[key]) for r in rb], 4 if key == COLOR_DIVERGENCE else 3)
    warm = ra + rb
    lines += ["", "Warm start (every run's `val_start`, mean): " + ", ".join(
        f"{k.split('/')[-1]} {np.mean([float(r.row.val_start[k]) for r in warm if k in r.row.val_start]):.4g}"
        for k in ("geneval/overall", *FIDELITY) if any(k in r.row.val_start for r in warm)) + "."]
    return "\n".join(lines)


def render(by_method: dict[str, dict[int, MarRun]], methods: list[str] = list(METHODS), resamples: int = 2000) -> str:
    text = per_method_table(by_method, methods, resamples)
    if len(methods) == 2 and all(m in by_method for m in methods):
        text += "\n\n" + paired_table(by_method[methods[0]], by_method[methods[1]], (methods[0], methods[1]),
                                       resamples)
    return text


def markers(tag: str = "") -> tuple[str, str]:
    """The README markers of a stability table: ``stability-table`` (the default study) or ``stability-table-<tag>``."""
    name = f"stability-table-{tag}" if tag else "stability-table"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_table(by_method: dict[str, dict[int, MarRun]], methods: list[str], readme: Path,
                resamples: int = 2000, tag: str = "") -> str:
    text = render(by_method, methods, resamples)
    start, end = markers(tag)
    doc = readme.read_text() if readme.exists() else ""
    if start in doc and end in doc:
        readme.write_text(_replace_between(doc, start, end, text))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("HTGRPO_ROOT", REPO))
    ap.add_argument("--collect", action="store_true", help="write row files from the finished runs first")
    ap.add_argument("--study", type=Path, default=root / "logs" / "study_mar", help="run_study's MAR folder")
    ap.add_argument("--rows", type=Path, default=ROWS_DIR, help="row files (committed)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--tag", default="", help="README markers stability-table-TAG instead of stability-table (another "
                                              "setting's study, e.g. lr3e-4 with --rows study_mar/runs_lr3e-4)")
    args = ap.parse_args(argv)
    if args.collect:
        if not args.study.is_dir():
            raise SystemExit(f"{args.study}: no study runs (run experiments/shapes_geneval/run_study.py first)")
        print(f"collected {len(collect(args.study, args.rows))} runs from {args.study} into {args.rows}")
    by_method = load_runs(args.rows)
    if not by_method:
        raise SystemExit(f"{args.rows}: no run rows (collect them with --collect --study LOG_DIR/study_mar)")
    print(write_table(by_method, args.methods, args.readme, args.resamples, args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
