"""``python -m htgrpo.evaluate benchmark=NAME policy=NAME [ckpt_path=PATH] hydra.run.dir=DIR``.

Generates ``benchmark.images_per_prompt`` images for every benchmark prompt, scores them with the
benchmark's official rules, prints the table in the papers' format, and writes into the run folder:

* ``geneval_results.json`` — ``{"benchmark", "overall" in [0,1], "tasks": {tag: score}, "num_images"}``, or
  ``dpg_results.json`` — ``{"benchmark", "overall" in [0,100], "categories": {L1: score}, "num_prompts"}``;
* ``geneval_images.jsonl`` / ``dpg_images.jsonl`` — one row per image (GenEval's per-image result format);
* ``samples/grid_<task>.png`` — sample grids, one prompt per row.
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
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.evaluation.benchmark import run_benchmark, save_grid
from htgrpo.policies.generators import as_image_generator

log = logging.getLogger("htgrpo.evaluate")


def load_policy(cfg: DictConfig) -> Any:
    """The policy to evaluate: ``ckpt_path`` (a save_pretrained folder or a Lightning .ckpt) or ``policy``."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return instantiate_node(cfg, "policy")
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise ConfigError("ckpt_path", f"{path} does not exist (expected a policy folder or a Lightning .ckpt)")
    if path.is_dir():
        from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
        from htgrpo.policies.mar.shapes import ShapesMARPolicy, is_mar_policy_folder

        if not (path / "config.json").exists():
            raise ConfigError("ckpt_path", f"{path} is a folder without config.json: not a save_pretrained policy")
        if is_mar_policy_folder(path):  # written by ShapesMARPolicy.save_pretrained (evaluate it with sampler=mar)
            return ShapesMARPolicy.from_pretrained(path, config_key="ckpt_path")
        return MaskedDiffusionPolicy.from_pretrained(path)
    policy = instantiate_node(cfg, "policy")
    if not isinstance(policy, torch.nn.Module):
        raise ConfigError("policy", "a Lightning .ckpt needs a trainable policy config (e.g. policy=shapes_llada)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = {k[len("policy."):]: v for k, v in state.get("state_dict", {}).items() if k.startswith("policy.")}
    if not weights:
        raise ConfigError("ckpt_path", f"{path} holds no 'policy.*' weights: not a checkpoint written by htgrpo.fit")
    try:
        policy.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ConfigError("ckpt_path", f"weights in {path} do not fit the architecture of `policy`: {err}") from None
    return policy


def run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    benchmark = instantiate_node(cfg, "benchmark")
    sampler = instantiate_node(cfg, "sampler")
    policy = load_policy(cfg)
    if isinstance(policy, torch.nn.Module):
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        policy = policy.to(device).eval()
    generator = as_image_generator(policy, sampler)
    report = run_benchmark(benchmark, generator, seed=int(cfg.seed), samples_per_group=int(cfg.samples_per_group))

    results = report.results_json()
    (output_dir / f"{report.kind}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(output_dir / f"{report.kind}_images.jsonl", "w") as fh:
        for row in report.rows:
            fh.write(json.dumps(row) + "\n")
    for group, images in report.samples.items():
        save_grid(images, output_dir / "samples" / f"grid_{group}.png", nrow=benchmark.images_per_prompt)
    print()
    print(report.table())
    print(f"({time.perf_counter() - started:.1f} s) results: {output_dir / f'{report.kind}_results.json'}")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["overall"]
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(f"Configuration error: {err}") from None


if __name__ == "__main__":
    main()
