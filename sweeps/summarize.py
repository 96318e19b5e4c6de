"""Summarise a Hydra multirun of `python -m htgrpo.fit -m ...`: one table row per job, one plot per swept key.

    python sweeps/summarize.py logs/sweeps/credit_assignment/<time> [--metric geneval/overall] [--out DIR]
                               [--pivot algorithm.partition.fraction algorithm.credit.alpha]

Reads every job folder under the sweep folder (the ones holding `.hydra/overrides.yaml`), takes the job's command-line
overrides and its `summary.json` (written by htgrpo.fit at the end of a job), and writes into `--out` (default: the
sweep folder):

* `summary.csv`  - one row per job: job folder, each swept key, the metric at the start and end of training, its
  change, steps, seconds, status (`ok`, or `missing summary.json` for a crashed / unfinished job);
* `summary.md`   - the same table in markdown, best final score first, plus the mean final score per value of each
  swept key (the marginal the plot shows);
* `summary.png`  - one panel per swept key: final score of every job against that key's value, with the per-value mean;
* with `--pivot ROW COL`: a ROW × COL table of the mean change (± std over the cell's jobs, e.g. seeds) in
  `summary.md` and its heatmap `summary_pivot.png` (a 2-D grid such as partition.fraction × credit.alpha).

A key counts as swept when its value differs between jobs (keys given the same value everywhere are listed as fixed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class SweepJob:
    """One job of a multirun: its folder, command-line overrides and (if it finished) its summary."""

    folder: Path
    overrides: dict[str, str]
    summary: dict | None = None
    status: str = "ok"
    metrics: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str, when: str = "val_end") -> float:
        if self.summary is None:
            return math.nan
        return float(self.summary.get(when, {}).get(metric, math.nan))


def _override_key(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_jobs(sweep_dir: Path) -> list[SweepJob]:
    """Every job folder below ``sweep_dir`` (identified by ``.hydra/overrides.yaml``), sorted by Hydra job number."""
    jobs = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        try:
            raw = yaml.safe_load(overrides_file.read_text()) or []
        except yaml.YAMLError as err:
            raise SystemExit(f"{overrides_file}: not valid YAML ({err})") from None
        overrides = dict(_override_key(str(o)) for o in raw)
        job = SweepJob(folder, overrides)
        summary_file = folder / "summary.json"
        if summary_file.exists():
            try:
                job.summary = json.loads(summary_file.read_text())
            except json.JSONDecodeError as err:
                job.status = f"unreadable summary.json ({err})"
        else:
            job.status = "missing summary.json"
        jobs.append(job)

    def job_number(job: SweepJob) -> tuple[int, str]:
        head = job.folder.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 10**9, job.folder.name)

    return sorted(jobs, key=job_number)


def swept_keys(jobs: list[SweepJob]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, {key: value} of keys set identically on every job)."""
    values: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        for key in {k for j in jobs for k in j.overrides}:
            values[key].add(job.overrides.get(key, "<default>"))
    swept = sorted(k for k, v in values.items() if len(v) > 1)
    fixed = {k: next(iter(v)) for k, v in sorted(values.items()) if len(v) == 1}
    return swept, fixed


def _sort_values(values: list[str]) -> list[str]:
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(values, key=key)


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.4f}"


@dataclass
class PivotCell:
    """The jobs of one (row value, column value) cell of a pivot: mean and std of their change."""

    changes: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.changes) / len(self.changes) if self.changes else math.nan

    @property
    def std(self) -> float:
        """Sample std (n − 1); 0 for a single job."""
        n = len(self.changes)
        if n < 2:
            return 0.0 if n else math.nan
        m = self.mean
        return math.sqrt(sum((c - m) ** 2 for c in self.changes) / (n - 1))


def pivot_changes(jobs: list[SweepJob], row_key: str, col_key: str, metric: str
                  ) -> tuple[list[str], list[str], dict[tuple[str, str], PivotCell]]:
    """Row values, column values and per-cell change (``val_end − val_start`` of ``metric``) of the finished jobs."""
    cells: dict[tuple[str, str], PivotCell] = defaultdict(PivotCell)
    for job in jobs:
        change = job.value(metric) - job.value(metric, "val_start")
        if not math.isnan(change):
            cells[(job.overrides.get(row_key, "<default>"), job.overrides.get(col_key, "<default>"))].changes.append(change)
    rows = _sort_values(list({r for r, _ in cells}))
    cols = _sort_values(list({c for _, c in cells}))
    return rows, cols, dict(cells)


def _pivot_lines(rows: list[str], cols: list[str], cells: dict[tuple[str, str], PivotCell], row_key: str,
                 col_key: str, metric: str) -> list[str]:
    lines = ["", f"## Mean change of `{metric}` by `{row_key}` (rows) × `{col_key}` (columns), ± std over jobs", "",
             f"| {row_key} \\ {col_key} | " + " | ".join(cols) + " | row mean |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        vals = [cells[(r, c)] for c in cols if (r, c) in cells]
        row_mean = sum(v for cell in vals for v in cell.changes) / max(1, sum(len(cell.changes) for cell in vals))
        lines.append(f"| {r} | " + " | ".join(
            f"{cells[(r, c)].mean:+.3f} ± {cells[(r, c)].std:.3f} (n={len(cells[(r, c)].changes)})"
            if (r, c) in cells else "" for c in cols) + f" | {row_mean:+.3f} |")
    col_means = []
    for c in cols:
        vals = [v for r in rows if (r, c) in cells for v in cells[(r, c)].changes]
        col_means.append(f"{sum(vals) / len(vals):+.3f}" if vals else "")
    lines.append("| column mean | " + " | ".join(col_means) + " | |")
    return lines


def _plot_pivot(rows: list[str], cols: list[str], cells: dict[tuple[str, str], PivotCell], row_key: str,
                col_key: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[cells[(r, c)].mean if (r, c) in cells else math.nan for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.5, 1.0 * len(rows) + 1.8))
    image = ax.imshow(grid, cmap="RdYlGn", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (r, c) in cells:
                ax.text(j, i, f"{cells[(r, c)].mean:+.3f}\n±{cells[(r, c)].std:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    ax.set_title(f"mean change of {metric}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(sweep_dir: Path, metric: str = "geneval/overall", out_dir: Path | None = None,
              pivot: tuple[str, str] | None = None) -> dict[str, Path]:
    """Write summary.csv / summary.md / summary.png (and, with ``pivot``, summary_pivot.png) for the sweep in
    ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir}: no such sweep folder")
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no Hydra job folders (none holds .hydra/overrides.yaml)")
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, fixed = swept_keys(jobs)

    header = ["job", *keys, f"start {metric}", f"end {metric}", "change", "steps", "seconds", "status"]
    rows = []
    for job in jobs:
        start, end = job.value(metric, "val_start"), job.value(metric, "val_end")
        rows.append([job.folder.name, *(job.overrides.get(k, "<default>") for k in keys), _fmt(start), _fmt(end),
                     _fmt(end - start), "" if job.summary is None else str(job.summary.get("steps", "")),
                     "" if job.summary is None else str(job.summary.get("seconds", "")), job.status])
    csv_path = out_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    end_col = header.index(f"end {metric}")
    ranked = sorted(rows, key=lambda r: -float(r[end_col]) if r[end_col] else math.inf)
    lines = [f"# Sweep {sweep_dir}", "", f"Metric: `{metric}` (validation at the end of each job); "
             f"{sum(j.status == 'ok' for j in jobs)} of {len(jobs)} jobs finished.", ""]
    if fixed:
        lines += ["Fixed overrides: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in ranked]
    marginals: dict[str, list[tuple[str, float, int]]] = {}
    for key in keys:
        groups: dict[str, list[float]] = defaultdict(list)
        for job in jobs:
            v = job.value(metric)
            if not math.isnan(v):
                groups[job.overrides.get(key, "<default>")].append(v)
        marginals[key] = [(val, sum(groups[val]) / len(groups[val]), len(groups[val]))
                          for val in _sort_values(list(groups))]
        lines += ["", f"## Mean final `{metric}` by `{key}`", "", "| value | mean | jobs |", "|---|---|---|"]
        lines += [f"| {val} | {mean:.4f} | {n} |" for val, mean, n in marginals[key]]
    paths = {"csv": csv_path}
    if pivot is not None:
        missing = [k for k in pivot if k not in keys]
        if missing:
            raise SystemExit(f"--pivot: {missing} not swept in {sweep_dir}; swept keys: {keys}")
        rows_, cols_, cells = pivot_changes(jobs, pivot[0], pivot[1], metric)
        lines += _pivot_lines(rows_, cols_, cells, pivot[0], pivot[1], metric)
        paths["pivot_png"] = out_dir / "summary_pivot.png"
        _plot_pivot(rows_, cols_, cells, pivot[0], pivot[1], metric, paths["pivot_png"])
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")

    png_path = out_dir / "summary.png"
    _plot(jobs, keys, marginals, metric, png_path)
    return {**paths, "md": md_path, "png": png_path}


def _plot(jobs: list[SweepJob], keys: list[str], marginals: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    panels = keys or ["(no swept key)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key in marginals:
            order = [val for val, _, _ in marginals[key]]
            pos = {val: i for i, val in enumerate(order)}
            xs = [pos[j.overrides.get(key, "<default>")] for j in jobs
                  if not math.isnan(j.value(metric)) and j.overrides.get(key, "<default>") in pos]
            ys = [j.value(metric) for j in jobs
                  if not math.isnan(j.value(metric)) and j.overrides.get(key, "<default>") in pos]
            ax.scatter(xs, ys, alpha=0.5, s=18, label="jobs")
            ax.plot(range(len(order)), [m for _, m, _ in marginals[key]], "o-", color="C3", label="mean")
            ax.set_xticks(range(len(order)), order)
            ax.set_xlabel(key)
        else:
            ys = [j.value(metric) for j in jobs if not math.isnan(j.value(metric))]
            ax.scatter(range(len(ys)), ys, s=18)
            ax.set_xlabel("job")
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    parser.add_argument("--metric", default="geneval/overall", help="summary.json metric to compare")
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default: sweep_dir)")
    parser.add_argument("--pivot", nargs=2, metavar=("ROW_KEY", "COL_KEY"), default=None,
                        help="also tabulate and plot the mean change over a 2-D grid of two swept keys")
    args = parser.parse_args(argv)
    paths = summarize(args.sweep_dir, args.metric, args.out, tuple(args.pivot) if args.pivot else None)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
