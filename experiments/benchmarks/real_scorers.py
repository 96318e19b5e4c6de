"""Throughput of the real GenEval scorer (Mask2Former + CLIP) and of a DPG-Bench VQA backend.

GenEval: images/s of ``GenEvalDetectorScorer.score`` on random images with GenEval colour prompts (every image runs
the detector, and CLIP for the colour check when the class is detected). DPG: (image, question) pairs/s of a VQA
backend's ``answer`` and ``yes_probability``. Prints one JSON line per measurement.

    python experiments/benchmarks/real_scorers.py --detector DIR --clip DIR --class-names object_names.txt --vqa DIR
    python experiments/benchmarks/real_scorers.py --device cuda --image-size 512   # released weights from the HF cache
    python experiments/benchmarks/real_scorers.py --tiny          # tiny random models built on the fly (plumbing only)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from htgrpo.data.records import GenEvalRecord, GenEvalRequirement  # noqa: E402
from htgrpo.rewards.geneval_real import DEFAULT_CLIP, DEFAULT_DETECTOR, GenEvalDetectorScorer  # noqa: E402
from htgrpo.rewards.vqa import DEFAULT_BLIP_VQA, BlipVQA  # noqa: E402

QUESTIONS = ["Is there a dog?", "Is the dog brown?", "Is the dog left of the cat?", "Are there two cats?"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=DEFAULT_DETECTOR, help="Mask2Former repo id or folder")
    ap.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP repo id or folder")
    ap.add_argument("--class-names", default=None, help="GenEval's object_names.txt")
    ap.add_argument("--vqa", default=DEFAULT_BLIP_VQA, help="BLIP VQA repo id or folder")
    ap.add_argument("--tiny", action="store_true", help="build tiny random models (tests/tiny_scorers.py) instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="images per detector pass / pairs per VQA pass")
    ap.add_argument("--num-images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args(argv)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (lazy loading, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_scorers import save_tiny_blip_vqa, save_tiny_clip, save_tiny_mask2former

        workdir = tempfile.TemporaryDirectory(prefix="real_scorers_")  # removed at exit
        tmp = Path(workdir.name)
        args.detector = str(save_tiny_mask2former(tmp / "m2f", {0: "dog", 1: "cat"}, favour="dog"))
        args.clip = str(save_tiny_clip(tmp / "clip"))
        args.vqa = str(save_tiny_blip_vqa(tmp / "blip"))
        args.class_names = None
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=gen)
    record = GenEvalRecord("colors", "a photo of a brown dog", (GenEvalRequirement("dog", 1, color="brown"),))
    scorer = GenEvalDetectorScorer(detector=args.detector, clip=args.clip, class_names=args.class_names,
                                   device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    seconds = timed(lambda: scorer.score(images, [record] * len(images)), args.repeats)
    env = {"device": str(scorer.detector.device), "dtype": args.dtype, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine()}
    print(json.dumps({"bench": "geneval_scorer", "detector": args.detector, "clip": args.clip,
                      "image_size": args.image_size, "images": len(images), "seconds": round(seconds, 4),
                      "images_per_s": round(len(images) / seconds, 2), **env}))
    vqa = BlipVQA(args.vqa, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    pairs_images = [im for im in images for _ in QUESTIONS]
    pairs_questions = QUESTIONS * len(images)
    for what, fn in (("answer", vqa.answer), ("yes_probability", vqa.yes_probability)):
        seconds = timed(lambda: fn(pairs_images, pairs_questions), args.repeats)
        print(json.dumps({"bench": f"vqa_{what}", "vqa": args.vqa, "pairs": len(pairs_questions),
                          "seconds": round(seconds, 4), "pairs_per_s": round(len(pairs_questions) / seconds, 2), **env}))


if __name__ == "__main__":
    main()
