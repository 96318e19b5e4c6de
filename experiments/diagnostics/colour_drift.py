"""Colour drift of a ShapesWorld run: which colour its objects collapse onto, and when (issue 19, "why brown").

For each checkpoint of a `fit` run folder (``checkpoints/step*.ckpt`` and ``last.ckpt``; add ``--warm-start`` for
the shipped warm start), two probes on fixed prompts and seeds:

1. **asked colour**: ``--images`` images of "a photo of a <colour> <shape>" for every palette colour and shape;
   the share the benchmark's GenEval rule reads as correct, per colour (how reliably the policy draws each colour
   when asked);
2. **unasked colour**: ``4 * --images`` images of each "a photo of a <shape>" (single_object, no colour named); the
   colour mix of the detected objects (what the policy paints when the reward cannot see colour).

Prints one markdown table (a row per checkpoint) and writes it to ``--out``. A run whose "unasked" mix moves onto
one colour that its "asked" accuracy did not favour is plain mode collapse under a colour-blind reward, not a
detector preference.

    python experiments/diagnostics/colour_drift.py RUN_DIR --warm-start --images 8
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def checkpoints(run_dir: Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of a run's step checkpoints in step order, then ``last.ckpt``."""
    folder = run_dir / "checkpoints"
    steps = sorted(folder.glob("step*.ckpt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    found = [(f"update {int(re.sub(r'[^0-9]', '', p.stem))}", p) for p in steps]
    if (folder / "last.ckpt").exists():
        found.append(("last", folder / "last.ckpt"))
    if not found:
        raise SystemExit(f"{run_dir}: no checkpoints/step*.ckpt or last.ckpt (a fit run folder with checkpoints?)")
    return found


def probe(ckpt: Path | None, images: int, seed: int) -> tuple[dict[str, float], dict[str, float], int]:
    """Per-colour accuracy when asked, colour shares of the objects when not asked, and how many objects."""
    from hydra import compose, initialize_config_dir

    from htgrpo._hydra import config_dir
    from htgrpo.checkpoints import load_policy
    from htgrpo.config import instantiate_node
    from htgrpo.data.records import GENEVAL_COLORS, BenchmarkPrompt, GenEvalRecord, GenEvalRequirement
    from htgrpo.data.shapes.prompts import with_article
    from htgrpo.evaluation.diversity import kept_objects
    from htgrpo.policies.generators import as_image_generator

    overrides = ["policy=shapes_llada_warm", "sampler.num_steps=12"] + ([f"ckpt_path={ckpt}"] if ckpt else [])
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose("evaluate", overrides)
    policy = load_policy(cfg).eval()
    bench = instantiate_node(cfg, "benchmark")
    generator = as_image_generator(policy, instantiate_node(cfg, "sampler"))
    shapes = list(cfg.world.shapes)

    def prompt(task: str, text: str, req: GenEvalRequirement) -> BenchmarkPrompt:
        record = GenEvalRecord(task, text, (req,))
        return BenchmarkPrompt("colour_drift", text, text, task, record)

    asked = [prompt("colors", f"a photo of {with_article(f'{c} {s}')}", GenEvalRequirement(s, 1, color=c))
             for c in GENEVAL_COLORS for s in shapes for _ in range(images)]
    unasked = [prompt("single_object", f"a photo of {with_article(s)}", GenEvalRequirement(s, 1))
               for s in shapes for _ in range(4 * images)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        asked_images = torch.cat([generator.generate(asked[i:i + 120], g) for i in range(0, len(asked), 120)])
        unasked_images = generator.generate(unasked, g)
    verdicts = bench.scorer.score(asked_images, [p.record for p in asked])
    by_colour: dict[str, list[bool]] = collections.defaultdict(list)
    for p, v in zip(asked, verdicts):
        by_colour[p.record.include[0].color].append(bool(v.correct))
    colours = collections.Counter(d.color for dets in bench.scorer.detector.detect_batch(unasked_images)
                                  for d in kept_objects(dets))
    total = sum(colours.values())
    return ({c: float(np.mean(by_colour[c])) for c in GENEVAL_COLORS},
            {c: colours[c] / total if total else float("nan") for c in GENEVAL_COLORS}, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a ShapesWorld fit run folder (hydra.run.dir)")
    parser.add_argument("--warm-start", action="store_true", help="also probe the shipped warm start (first row)")
    parser.add_argument("--images", type=int, default=8, help="images per asked-colour prompt (x4 per shape unasked)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default RUN_DIR/colour_drift.md)")
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be >= 1")
    torch.set_num_threads(1)
    from htgrpo.data.records import GENEVAL_COLORS

    points: list[tuple[str, Path | None]] = ([("warm start", None)] if args.warm_start else [])
    points += checkpoints(args.run_dir)
    lines = ["| checkpoint | asked: accuracy per colour | unasked: top colours of the objects (share) | objects |",
             "|---|---|---|---|"]
    for label, ckpt in points:
        accuracy, shares, total = probe(ckpt, args.images, args.seed)
        top = sorted(GENEVAL_COLORS, key=lambda c: -shares[c])[:3]
        lines.append(f"| {label} | " + " ".join(f"{c} {accuracy[c]:.2f}" for c in GENEVAL_COLORS) + " | "
                     + ", ".join(f"{c} {shares[c]:.2f}" for c in top) + f" | {total} |")
        print(lines[-1], flush=True)
    out = args.out or args.run_dir / "colour_drift.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
