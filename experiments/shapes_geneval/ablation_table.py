"""The ablation table (issue 21): which part of HT-GRPO buys what, each row against the full method, paired by seed.

Two steps, neither trains nor samples:

1. ``--collect`` reads the finished runs of ``run_study.py --study-name ablation`` (``LOG_DIR/ablation/<row>/seed<k>/``,
   LOG_DIR = ``$HTGRPO_ROOT/logs``) and writes one small JSON row per run to ``ablation/runs/<row>_s<seed>.json``
   (``collapse.py``'s row format: the run's summary, config, and per-prompt shares of correct validation images
   before and after). These rows are committed; the table is made from them alone.
2. The table: per row (method), over its seeds,

   - the GenEval gain over the warm start with its 95% Student-t interval over seeds;
   - **the difference to HT-GRPO, prompts fixed**: the mean over the seeds both rows ran of
     ``gain_row(s) − gain_HT(s)`` with its 95% paired t-interval (n − 1 degrees of freedom). The benchmark is the
     fixed set of 84 validation prompts (as GenEval is a fixed file): the interval covers training and sampling
     noise, which the seeds replicate, not a different draw of prompts. Three of the six tasks' validation prompts
     are their whole prompt space, so resampling prompts would invent a variance those tasks do not have;
   - the same difference with ``gain.py``'s paired bootstrap that also resamples the prompts within each task
     (shown for comparison; it adds the between-prompt spread of the true difference);
   - **seeds for ±0.03**: the smallest n with t(0.975, n − 1) · sd / √n ≤ 0.03 for the measured sd of the paired
     differences (the design's sizing, updated as seeds arrive);
   - **image-noise share**: the part of the paired variance that is the final evaluations' image sampling
     (:func:`image_noise_variance` of both runs' end validations over the variance of the differences): near 1,
     more validation images per prompt would narrow the interval; near 0, only more seeds will;
   - the diversity / fidelity columns of the collapse issue after training: ``diversity/color_divergence`` (lower is
     better) and ``diversity/per_prompt`` (higher), both also as a ratio to the warm start's, ``geneval/colors`` and
     ``diversity/stray_share``, means over seeds. A gain bought by collapse shows here.

    python experiments/shapes_geneval/ablation_table.py --collect     # rows from the finished runs
    python experiments/shapes_geneval/ablation_table.py               # table -> README (ablation markers) + stdout
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from collapse import COLOR_DIVERGENCE, COLORS, PER_PROMPT, STRAY, RunRow, collect_rows, load_row, run_gain  # noqa: E402
from gain import format_interval, paired_difference, t_interval, t_quantile  # noqa: E402
from make_table import ABLATION_END, ABLATION_START, _replace_between  # noqa: E402
from run_study import ABLATIONS  # noqa: E402

REFERENCE = "HT-GRPO"
HALF_WIDTH_TARGET = 0.03  # issue 21: the paired interval of every row against HT-GRPO at most ±0.03
ROWS_DIR = HERE / "ablation" / "runs"


def collect(study: Path, rows_dir: Path = ROWS_DIR) -> list[Path]:
    """Write a row file for every finished run under ``study`` (``<row>/seed<k>/summary.json``)."""
    return collect_rows(study, rows_dir)


def seeds_needed(sd: float, half_width: float = HALF_WIDTH_TARGET, cap: int = 500) -> int | None:
    """Smallest n >= 2 with t(0.975, n − 1)·sd/√n <= half_width (None beyond ``cap``)."""
    if not math.isfinite(sd):
        return None
    for n in range(2, cap + 1):
        if t_quantile(n) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def image_noise_variance(shares: dict[str, np.ndarray], images: int) -> float:
    """The sampling variance of one evaluation's GenEval overall at ``images`` per prompt, given the policy: overall =
    (1/T) Σ_t (1/P_t) Σ_p s_tp with s_tp the share of m = ``images`` correct images (Bernoulli(π_tp)), so
    Var = (1/T²) Σ_t (1/P_t²) Σ_p π_tp(1 − π_tp)/m, estimated without bias by s(1 − s)/(m − 1). E.g. one task, two
    prompts at 2 images with shares 0.5 and 1: (0.25/1 + 0)/4 = 0.0625."""
    if images < 2:
        return math.nan
    per_task = [float(np.sum(v * (1.0 - v) / (images - 1))) / len(v) ** 2 for v in shares.values()]
    return float(np.sum(per_task)) / len(per_task) ** 2


def images_per_prompt(row: RunRow) -> int:
    """The run's validation images per prompt (``benchmark.images_per_prompt`` of its config; 0 when absent)."""
    return int(row.config.get("benchmark", {}).get("images_per_prompt", 0) or 0)


def _mean(rows: list[RunRow], part: str, key: str) -> float:
    values = [float(getattr(r, part).get(key, math.nan)) for r in rows]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def load_rows(rows_dir: Path = ROWS_DIR) -> dict[str, dict[int, RunRow]]:
    by_method: dict[str, dict[int, RunRow]] = {}
    for path in sorted(rows_dir.glob("*.json")):
        row = load_row(path)
        by_method.setdefault(row.setting, {})[row.seed] = row
    return by_method


def table(by_method: dict[str, dict[int, RunRow]], resamples: int = 4000) -> str:
    """The markdown table (module docstring)."""
    if REFERENCE not in by_method:
        return "(no HT-GRPO runs collected yet)"
    ref = by_method[REFERENCE]
    keys_by_task = next(iter(ref.values())).keys_by_task
    order = [m for m in ABLATIONS if m in by_method] + sorted(m for m in by_method if m not in ABLATIONS)
    warm = [r for rows in by_method.values() for r in rows.values()]
    warm_div, warm_pp = _mean(warm, "val_start", COLOR_DIVERGENCE), _mean(warm, "val_start", PER_PROMPT)
    lines = [
        "| row | seeds | GenEval gain [95% t-CI] | − HT-GRPO, prompts fixed [95% paired t-CI] | half-width "
        "| − HT-GRPO, prompts resampled [bootstrap] | seeds for ±0.03 | image-noise share | color_divergence (× warm) "
        "| per_prompt (× warm) | colors | stray_share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for method in order:
        rows = by_method[method]
        seeds = sorted(rows)
        mean_gain, half_gain = t_interval([run_gain(rows[s]) for s in seeds])
        div, pp = _mean(list(rows.values()), "val_end", COLOR_DIVERGENCE), _mean(list(rows.values()), "val_end",
                                                                                  PER_PROMPT)
        cells = [method, str(len(seeds)), format_interval(mean_gain, half_gain)]
        if method == REFERENCE:
            cells += ["–", "–", "–", "–", "–"]
        else:
            common = [s for s in seeds if s in ref]
            diffs = [run_gain(rows[s]) - run_gain(ref[s]) for s in common]
            if len(diffs) >= 2:
                mean_d, half_d = t_interval(diffs)
                worst = max(worst, half_d)
                point, lo, hi, _ = paired_difference(
                    ([rows[s].start_shares for s in common], [rows[s].end_shares for s in common]),
                    ([ref[s].start_shares for s in common], [ref[s].end_shares for s in common]),
                    keys_by_task, resamples)
                need = seeds_needed(float(np.std(diffs, ddof=1)))
                # how much of the paired variance is the final evaluations' image sampling (the warm start's
                # evaluation is the same images for both rows of a seed, so it cancels)
                noise = float(np.mean([image_noise_variance(rows[s].end_shares, images_per_prompt(rows[s]))
                                       + image_noise_variance(ref[s].end_shares, images_per_prompt(ref[s]))
                                       for s in common]))
                share = noise / float(np.var(diffs, ddof=1)) if np.var(diffs, ddof=1) > 0 else math.nan
                cells += [format_interval(mean_d, half_d), f"±{half_d:.3f}" + (" ✓" if half_d <= HALF_WIDTH_TARGET else ""),
                          f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]", str(need) if need else "> 500",
                          "–" if math.isnan(share) else f"{share:.2f}"]
            else:
                cells += [f"{np.mean(diffs):+.3f}" if diffs else "–", "–", "–", "–", "–"]
        cells += [f"{div:.4f} ({div / warm_div:.2f}×)", f"{pp:.3f} ({pp / warm_pp:.2f}×)",
                  f"{_mean(list(rows.values()), 'val_end', COLORS):.3f}",
                  f"{_mean(list(rows.values()), 'val_end', STRAY):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Warm start (every run's `val_start`, mean): color_divergence {warm_div:.4f}, per_prompt "
              f"{warm_pp:.3f}, colors {_mean(warm, 'val_start', COLORS):.3f}, stray_share "
              f"{_mean(warm, 'val_start', STRAY):.3f}. Widest paired half-width (prompts fixed): ±{worst:.3f} "
              f"(target ±{HALF_WIDTH_TARGET})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("HTGRPO_ROOT", REPO))
    ap.add_argument("--collect", action="store_true", help="write row files from the finished runs first")
    ap.add_argument("--study", type=Path, default=root / "logs" / "ablation", help="run_study's ablation folder")
    ap.add_argument("--rows", type=Path, default=ROWS_DIR, help="row files (committed)")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--resamples", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.collect:
        written = collect(args.study, args.rows)
        print(f"collected {len(written)} runs from {args.study} into {args.rows}")
    text = table(load_rows(args.rows), args.resamples)
    doc = args.readme.read_text() if args.readme.exists() else ""
    if ABLATION_START in doc and ABLATION_END in doc:
        args.readme.write_text(_replace_between(doc, ABLATION_START, ABLATION_END, text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
