"""How many seeds and validation images resolve a paired difference of ±0.03 against HT-GRPO (issue 21)?

    python experiments/shapes_geneval/power.py                       # from the committed study tables (README)
    python experiments/shapes_geneval/power.py --images-jsonl RUN/val_end_images.jsonl --target 0.03

The ablation table tests each row against HT-GRPO with ``gain.py``'s ``paired_difference``: a bootstrap that
resamples the seeds and, within each GenEval task, the validation prompts. For ``n`` seeds and ``I`` images per
prompt (``P_t`` prompts in task ``t``, ``T`` tasks) its variance is modelled as::

    Var(d) = A / n  +  2 B / (n I)  +  C

* ``A = 2 σ²_train``: training noise of two independently trained methods (per seed, true-score variance);
  ``σ²_train = sd²_seed − B / (2 I₀)``: the spread of a method's final score over seeds (``sd_seed``, measured at
  ``I₀`` images per prompt) minus the image noise of one evaluation;
* ``B / I = 2 · (1/T²) Σ_t Σ_p π_p(1 − π_p) / (P_t² I)``: the binomial noise of the two final evaluations
  (``π_p``: a prompt's success rate); it enters twice, once through the seeds and once through the prompts the
  bootstrap resamples (the ``2``);
* ``C = (1/T²) Σ_t τ_t² / P_t``: how much the true difference varies between the prompts of a task; it does not
  shrink with seeds or images, only with more prompts. It is calibrated from observed paired intervals:
  ``C = (h_obs / z)² − A / n_obs − 2B / (n_obs I_obs)`` (floored at 0).

The half-width is ``z · sqrt(Var(d))`` (z = 1.96). The script prints, per images-per-prompt, the seeds needed for
``--target``, and the same when the prompts are held fixed (a bootstrap of the seeds only:
``Var = (A + B / I) / n``, no prompt terms), the right model when the validation prompts are the task's whole prompt
space (ShapesWorld's single_object task has 3 prompts in all).

Defaults are the committed study's numbers (experiments/shapes_geneval/README.md, 3 seeds x 504 images): HT-GRPO's
final per-task accuracies for ``π`` (each task's rate for all its prompts: an upper bound of the binomial noise),
the per-method seed std of the final overall, and the four paired half-widths against HT-GRPO.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

Z95 = 1.959964

# committed study numbers (experiments/shapes_geneval/README.md, "Results" and "Gain over the warm start")
README_TASK_RATES = {"single_object": 0.944, "two_object": 0.759, "counting": 0.407, "colors": 0.433,
                     "position": 0.261, "color_attr": 0.026}   # HT-GRPO after training, mean of 3 seeds
README_PROMPTS_PER_TASK = {"single_object": 3, "two_object": 6, "counting": 9, "colors": 19, "position": 17,
                           "color_attr": 30}                   # the 84 validation prompts
README_SEED_SDS = [0.034, 0.011, 0.021, 0.027, 0.023]           # final overall std over 3 seeds: GRPO ... HT-GRPO
README_HALF_WIDTHS = [(0.058 + 0.068) / 2, (0.004 + 0.088) / 2, (0.091 + 0.034) / 2, (0.066 + 0.052) / 2]


@dataclass(frozen=True)
class Components:
    """Variance components of the paired difference (module docstring)."""

    A: float   # 2 σ²_train
    B: float   # image-noise coefficient: two evaluations' binomial variance is B / I
    C: float   # prompt heterogeneity of the difference under the prompt bootstrap


def binomial_coefficient(rates_by_task: dict[str, list[float]]) -> float:
    """``B = 2 · (1/T²) Σ_t Σ_p π_p (1 − π_p) / P_t²`` from per-prompt success rates grouped by task."""
    T = len(rates_by_task)
    if T == 0:
        raise ValueError("no tasks")
    total = 0.0
    for rates in rates_by_task.values():
        P = len(rates)
        total += sum(p * (1.0 - p) for p in rates) / P ** 2
    return 2.0 * total / T ** 2


def training_variance(seed_sds: list[float], B: float, images: int) -> float:
    """``A = 2 · max(0, mean(sd²) − B / (2 I₀))``: the seed spread of one method minus one evaluation's image
    noise."""
    mean_sq = sum(s * s for s in seed_sds) / len(seed_sds)
    return 2.0 * max(0.0, mean_sq - B / (2.0 * images))


def calibrate_prompt_term(half_width: float, seeds: int, images: int, A: float, B: float, z: float = Z95) -> float:
    """``C = max(0, (h / z)² − A / n − 2B / (n I))`` from an observed half-width ``h`` at ``n`` seeds and ``I``
    images per prompt."""
    return max(0.0, (half_width / z) ** 2 - A / seeds - 2.0 * B / (seeds * images))


def half_width(c: Components, seeds: int, images: int, prompts_fixed: bool = False, z: float = Z95) -> float:
    """``z · sqrt(A/n + 2B/(nI) + C)``; with ``prompts_fixed``: ``z · sqrt((A + B/I) / n)``."""
    if prompts_fixed:
        return z * math.sqrt((c.A + c.B / images) / seeds)
    return z * math.sqrt(c.A / seeds + 2.0 * c.B / (seeds * images) + c.C)


def seeds_needed(c: Components, images: int, target: float, prompts_fixed: bool = False,
                 z: float = Z95) -> int | None:
    """The smallest ``n`` with :func:`half_width` ≤ ``target`` (None: unreachable at any ``n``, i.e.
    ``z²C ≥ target²``)."""
    budget = (target / z) ** 2 - (0.0 if prompts_fixed else c.C)
    if budget <= 0:
        return None
    per_seed = c.A + (c.B if prompts_fixed else 2.0 * c.B) / images
    return max(1, math.ceil(per_seed / budget - 1e-12))


def rates_from_jsonl(path: Path) -> dict[str, list[float]]:
    """Per task, each prompt's share of correct images from a ``*_images.jsonl`` (``htgrpo.fit``/``evaluate``)."""
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        hits[(str(row["tag"]), str(row["key"]))].append(bool(row["correct"]))
    out: dict[str, list[float]] = defaultdict(list)
    for (task, _), values in sorted(hits.items()):
        out[task].append(sum(values) / len(values))
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-jsonl", type=Path, default=None,
                    help="per-image results of a trained policy (val_end_images.jsonl) for the binomial term; "
                         "default: the README's per-task rates for every prompt of the task")
    ap.add_argument("--seed-sds", type=float, nargs="+", default=README_SEED_SDS,
                    help="std over seeds of each method's final overall (README study table)")
    ap.add_argument("--observed-half-widths", type=float, nargs="+", default=README_HALF_WIDTHS,
                    help="paired 95%% half-widths against HT-GRPO observed in the study (README gain table)")
    ap.add_argument("--observed-seeds", type=int, default=3)
    ap.add_argument("--observed-images", type=int, default=6, help="images per prompt of the observed study")
    ap.add_argument("--target", type=float, default=0.03, help="wanted half-width of the paired 95%% interval")
    ap.add_argument("--images", type=int, nargs="+", default=[6, 12, 24, 48], help="images per prompt to consider")
    args = ap.parse_args(argv)

    if args.images_jsonl is not None:
        rates = rates_from_jsonl(args.images_jsonl)
        source = str(args.images_jsonl)
    else:
        rates = {t: [r] * README_PROMPTS_PER_TASK[t] for t, r in README_TASK_RATES.items()}
        source = "README per-task rates of HT-GRPO"
    B = binomial_coefficient(rates)
    A = training_variance(args.seed_sds, B, args.observed_images)
    h_obs = sum(args.observed_half_widths) / len(args.observed_half_widths)
    C = calibrate_prompt_term(h_obs, args.observed_seeds, args.observed_images, A, B)
    c = Components(A, B, C)
    prompts = sum(len(v) for v in rates.values())
    print(f"binomial term from {source} ({prompts} prompts): B = {B:.6f}  (one evaluation's image sd at 6 images: "
          f"{math.sqrt(B / 2 / 6):.4f})")
    print(f"training variance A = 2·σ²_train = {A:.6f} (seed sds {args.seed_sds})")
    print(f"prompt term C = {C:.6f} from the observed mean half-width {h_obs:.4f} at {args.observed_seeds} seeds × "
          f"{args.observed_images} images/prompt; alone it gives ±{Z95 * math.sqrt(C):.4f}")
    check = half_width(c, args.observed_seeds, args.observed_images)
    print(f"model check: half-width at the observed design {check:.4f}")
    print()
    print(f"| images per prompt | validation images | seeds for ±{args.target} (gain.py bootstrap: seeds + prompts) "
          f"| half-width at those seeds | seeds for ±{args.target} with prompts fixed (seed bootstrap) |")
    print("|---|---|---|---|---|")
    for images in args.images:
        n = seeds_needed(c, images, args.target)
        n_fixed = seeds_needed(c, images, args.target, prompts_fixed=True)
        hw = f"{half_width(c, n, images):.4f}" if n else "–"
        print(f"| {images} | {images * prompts} | {n if n else 'unreachable (prompt term)'} | {hw} | {n_fixed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
