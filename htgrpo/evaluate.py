"""``python -m htgrpo.evaluate benchmark=NAME policy=NAME [ckpt_path=PATH] hydra.run.dir=DIR``.

Generates ``benchmark.images_per_prompt`` images for every benchmark prompt, scores them with the
benchmark's official rules, prints the table in the papers' format, and writes into the run folder:

* ``geneval_results.json`` — ``{"benchmark", "overall" in [0,1], "tasks": {tag: score}, "num_images"}``, or
  ``dpg_results.json`` — ``{"benchmark", "overall" in [0,100], "categories": {L1: score}, "num_prompts"}``;
* ``geneval_images.jsonl`` / ``dpg_images.jsonl`` — one row per image (GenEval's per-image result format);
* ``results.jsonl`` (GenEval benchmarks) — GenEval's own per-image results format (``metadata``/``details`` as JSON
  strings), which GenEval's ``summary_scores.py`` reads unchanged;
* ``images/`` (``save_images=true``) — every image in the official layout (GenEval ``<index>/samples/<i>.png``,
  DPG-Bench ``<item_id>.png`` 2x2 grids), so the official scorers can be run on them too;
* ``samples/grid_<task>.png`` — sample grids, one prompt per row, each row captioned with its prompt and each image
  framed green (correct) / red (wrong) by the benchmark's verdict.

ShapesWorld GenEval benchmarks also report diversity / fidelity metrics beside GenEval (``diversity/*``, see
``htgrpo.evaluation.diversity``): printed under the table and written into the results file under ``diversity``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from htgrpo._hydra import config_dir
from htgrpo.checkpoints import load_policy  # ckpt_path of any kind, or the `policy` node (htgrpo.checkpoints)
from htgrpo.config import ConfigError, call_checked, instantiate_node
from htgrpo.data.records import MetadataError
from htgrpo.evaluation.image_metrics import ImageMetrics, TappedGenerator
from htgrpo.evaluation.benchmark import run_benchmark, save_grid
from htgrpo.evaluation.official import write_geneval_results
from htgrpo.policies.generators import as_image_generator

log = logging.getLogger("htgrpo.evaluate")


def run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    benchmark = instantiate_node(cfg, "benchmark")
    call_checked(benchmark.prepare, "benchmark.scorer")  # scorer weights + prompt checks fail here, at start-up
    sampler = instantiate_node(cfg, "sampler")
    image_metrics = ImageMetrics(cfg, output_dir)  # metrics=[fid, kid, <reward>, ...]: built and checked at start-up
    policy = load_policy(cfg)
    if isinstance(policy, torch.nn.Module):
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        policy = policy.to(device).eval()
    generator = as_image_generator(policy, sampler)
    if image_metrics:  # sees every generated batch, so the images are generated once
        generator = TappedGenerator(generator, image_metrics)
    image_dir = output_dir / "images" if cfg.get("save_images", False) else None
    report = run_benchmark(benchmark, generator, seed=int(cfg.seed), samples_per_group=int(cfg.samples_per_group),
                           image_dir=image_dir)

    results = report.results_json()
    if report.diversity:
        results["diversity"] = report.diversity
    if image_metrics:
        results["metrics"] = image_metrics.compute()
    (output_dir / f"{report.kind}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(output_dir / f"{report.kind}_images.jsonl", "w") as fh:
        for row in report.rows:
            fh.write(json.dumps(row) + "\n")
    if report.kind == "geneval":  # GenEval's own results.jsonl: summary_scores.py reads it unchanged
        write_geneval_results(report.rows, output_dir / "results.jsonl")
    for group, images in report.samples.items():
        save_grid(images, output_dir / "samples" / f"grid_{group}.png", nrow=benchmark.images_per_prompt,
                  prompts=report.sample_prompts.get(group), verdicts=report.sample_correct.get(group))
    print()
    print(report.table())
    for name, value in results.get("metrics", {}).items():
        print(f"{name}: {value:.4f}")
    print(f"({time.perf_counter() - started:.1f} s) results: {output_dir / f'{report.kind}_results.json'}")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["overall"]
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(f"Configuration error: {err}") from None
    except MetadataError as err:  # a bad prompt/metadata file (the message names file:line)
        log.error("metadata error: %s", err)
        raise SystemExit(f"Metadata error: {err}") from None


if __name__ == "__main__":
    main()
