"""Paired GenEval difference between two evaluations of the same policy, prompts and seeds (e.g. sampled exactly and
with ``sampler.cache=ml_cache``), with a 95% bootstrap interval over prompts.

    python -m htgrpo.evaluate policy=shapes_llada_warm ckpt_path=CKPT sampler.num_steps=12 \\
        benchmark.images_per_prompt=6 seed=1234 sampler.cache=none hydra.run.dir=EXACT
    python -m htgrpo.evaluate ... sampler.cache=ml_cache hydra.run.dir=CACHED
    python experiments/benchmarks/cache_quality.py EXACT CACHED

GenEval's overall is the mean over tasks of each task's share of correct images (:func:`geneval_overall`). Both runs
draw the same prompts in the same order, so the interval resamples prompts (with all their images) once and scores
both runs on the same draw (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def load_images(run_dir: str | Path) -> list[dict]:
    """Per-image rows of an ``evaluate`` run (``geneval_images.jsonl``)."""
    path = Path(run_dir) / "geneval_images.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: pass the hydra.run.dir of a GenEval evaluate run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_prompt(rows: list[dict]) -> dict[str, tuple[str, int, int]]:
    """prompt key -> (task, correct images, images)."""
    out: dict[str, list] = {}
    for r in rows:
        task, ok, n = out.get(r["key"], (r["tag"], 0, 0))
        out[r["key"]] = (task, ok + int(bool(r["correct"])), n + 1)
    return out


def geneval_overall(prompts: list[tuple[str, int, int]]) -> float:
    """Mean over tasks of (correct images / images) of that task's prompts."""
    ok, n = defaultdict(int), defaultdict(int)
    for task, c, m in prompts:
        ok[task] += c
        n[task] += m
    return sum(ok[t] / n[t] for t in n) / len(n)


def paired_bootstrap(a: dict, b: dict, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(b − a overall, 2.5% and 97.5% quantiles of the difference over prompt resamples drawn within each task)."""
    keys = sorted(a)
    if sorted(b) != keys:
        raise SystemExit("the two runs scored different prompts: use the same benchmark, seed and images_per_prompt")
    by_task = defaultdict(list)
    for k in keys:
        by_task[a[k][0]].append(k)
    rng = random.Random(seed)
    diffs = []
    for _ in range(draws):
        sample = [rng.choice(ks) for ks in by_task.values() for _ in ks]
        diffs.append(geneval_overall([b[k] for k in sample]) - geneval_overall([a[k] for k in sample]))
    diffs.sort()
    point = geneval_overall([b[k] for k in keys]) - geneval_overall([a[k] for k in keys])
    return point, diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exact", help="evaluate run folder, exact sampler")
    ap.add_argument("other", help="evaluate run folder, the sampler compared (e.g. sampler.cache=ml_cache)")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args(argv)
    a, b = per_prompt(load_images(args.exact)), per_prompt(load_images(args.other))
    point, lo, hi = paired_bootstrap(a, b, args.draws)
    oa, ob = geneval_overall(list(a.values())), geneval_overall(list(b.values()))
    images = sum(v[2] for v in a.values())
    print(f"GenEval overall ({len(a)} prompts, {images} images): exact {oa:.3f}, other {ob:.3f}, "
          f"difference {point:+.3f} (95% paired bootstrap [{lo:+.3f}, {hi:+.3f}])")
    return {"exact": oa, "other": ob, "difference": point, "ci95": [lo, hi]}


if __name__ == "__main__":
    main()
