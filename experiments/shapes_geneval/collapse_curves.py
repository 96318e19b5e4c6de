"""When does a run collapse? The rollout's colour spread per rollout step, per method, from TensorBoard (issue 19).

Every GRPO run logs, at each rollout step, how spread its rollout images' colours are
(``htgrpo.algorithms.diversity_bonus.RolloutColorSpread``; logged whatever ``algorithm.diversity_bonus.weight``):

* ``train/diversity/group_color_distance``: mean total-variation distance between the colour histograms of two
  images of one prompt (0 = every image of a prompt has the same colours);
* ``train/diversity/batch_color_distance``: the same over all pairs of the rollout batch (across prompts);
* ``train/diversity/top_color_pixel_share``: share of the batch's pixels in its most common colour after the
  background (the issue's "brown 38% of all pixels"; read when the runs logged it).

This script reads them from fit run folders, averages over the seeds of each setting, prints a table at a few
steps and each run's total rollout seconds (``time/rollout_s`` summed over its steps), and draws the curves (``--out`` PNG, markdown beside it). No training, no sampling.

    python experiments/shapes_geneval/collapse_curves.py --run GRPO=/runs/grpo_s0 --run GRPO=/runs/grpo_s1 \
        --run HT-GRPO=/runs/ht_s0 --out experiments/shapes_geneval/collapse/curves.png
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

TAGS = ("train/diversity/group_color_distance", "train/diversity/batch_color_distance")
TOP_SHARE = "train/diversity/top_color_pixel_share"  # logged by runs made after it was added; optional here
ROLLOUT_SECONDS = "time/rollout_s"  # seconds of each step's rollout phase: summed per run in the output
TAGS_SHORT = {TAGS[0]: "within prompt", TAGS[1]: "across batch", TOP_SHARE: "top colour, share of pixels"}


def read_curves(run_dir: Path) -> dict[str, np.ndarray]:
    """``{tag: values by rollout step}`` of one fit run folder (all its TensorBoard event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"{run_dir}: no TensorBoard events under tensorboard/ (is this a fit run folder?)")
    found: dict[str, dict[int, float]] = defaultdict(dict)
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        steps = {e.step: e.value for e in acc.Scalars("train/rollout_step")} if "train/rollout_step" in tags else {}
        for tag in (*TAGS, TOP_SHARE, ROLLOUT_SECONDS):
            if tag in tags:
                for event in acc.Scalars(tag):
                    found[tag][int(steps.get(event.step, event.step))] = float(event.value)
    missing = [t for t in TAGS if t not in found]
    if missing:
        raise SystemExit(f"{run_dir}: no {missing} in its TensorBoard events; runs made before the rollout colour "
                         "spread was logged cannot be read")
    return {tag: np.array([v for _, v in sorted(found[tag].items())]) for tag in found}


def mean_curves(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean over runs, step by step (truncated to the shortest run)."""
    out = {}
    for tag in [t for t in (*TAGS, TOP_SHARE) if all(t in r for r in runs)]:
        n = min(len(r[tag]) for r in runs)
        out[tag] = np.mean([r[tag][:n] for r in runs], axis=0)
    return out


def table(curves: dict[str, dict[str, np.ndarray]], seeds: dict[str, int], at: list[int]) -> str:
    """Markdown: per setting and measure, the mean over seeds at the given rollout steps."""
    head = "| setting | seeds | measure | " + " | ".join(f"step {s}" for s in at) + " |"
    lines = [head, "|" + "---|" * (3 + len(at))]
    for name, c in curves.items():
        for tag in c:
            cells = [f"{c[tag][s]:.3f}" if s < len(c[tag]) else "–" for s in at]
            lines.append(f"| {name} | {seeds[name]} | {TAGS_SHORT[tag]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rollout_seconds(by_name: dict[str, list[dict[str, np.ndarray]]]) -> str:
    """Markdown: per setting, each run's rollout seconds (``time/rollout_s`` summed over its steps; – if not logged)."""
    lines = ["| setting | rollout seconds per run |", "|---|---|"]
    for name, runs in by_name.items():
        each = [f"{r[ROLLOUT_SECONDS].sum():.0f}" if ROLLOUT_SECONDS in r else "–" for r in runs]
        lines.append(f"| {name} | {' / '.join(each)} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, np.ndarray]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [*TAGS, *([TOP_SHARE] if any(TOP_SHARE in c for c in curves.values()) else [])]
    fig, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags), 4))
    colour = {name: f"C{i}" for i, name in enumerate(curves)}  # one colour per setting in every panel
    for ax, tag in zip(axes, tags):
        for name, c in curves.items():
            if tag not in c:
                continue
            y = c[tag]
            k = 5  # 5-step running mean: one batch of 6 prompts is noisy
            smooth = np.convolve(y, np.ones(k) / k, mode="valid") if len(y) >= k else y
            ax.plot(np.arange(len(smooth)) + (len(y) - len(smooth)), smooth, label=name, color=colour[name])
        ax.set_title(f"rollout: {TAGS_SHORT[tag]}")
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("5-step running mean")
    axes[0].legend(fontsize=8)  # the first panel has every setting (the top-colour tag is newer)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="a fit run folder under a setting name (repeat; same name = seeds of one setting)")
    parser.add_argument("--at", type=int, nargs="*", default=[0, 5, 10, 20, 30, 39], help="steps in the table")
    parser.add_argument("--out", type=Path, default=Path("collapse_curves.png"), help="PNG; the table goes beside it")
    args = parser.parse_args()
    if not args.run:
        parser.error("give at least one --run NAME=DIR")
    by_name: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run takes NAME=DIR, got {spec!r}")
        by_name[name].append(read_curves(Path(path)))
    curves = {name: mean_curves(runs) for name, runs in by_name.items()}
    text = table(curves, {n: len(r) for n, r in by_name.items()}, args.at) + "\n\n" + rollout_seconds(by_name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"plot: {args.out}")
    if any(math.isnan(float(c[t][0])) for c in curves.values() for t in c):
        print("note: NaN at step 0 (a batch with fewer than 2 images)")


if __name__ == "__main__":
    main()
