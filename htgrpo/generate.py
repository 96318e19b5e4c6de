"""``python -m htgrpo.generate <policy overrides> prompts=geneval prompts.path=FILE out=DIR [limit=N] [images_per_prompt=K]``

Writes images in the folder layouts the official evaluators read, so their scripts score them unchanged:

* ``prompts=geneval`` (``prompts.path`` = GenEval's ``prompts/evaluation_metadata.jsonl``): one folder per prompt,
  ``DIR/<index:05d>/metadata.jsonl`` (the prompt's metadata line) and ``DIR/<index:05d>/samples/<k:04d>.png``
  (GenEval's ``generation/diffusers_generate.py`` layout, read by ``evaluation/evaluate_images.py DIR``);
* ``prompts=dpg`` (``prompts.path`` = DPG-Bench's ``prompts/`` folder): one 2x2 grid PNG per prompt,
  ``DIR/<prompt id>.png`` (what DPG-Bench's ``compute_dpg_bench.py --pic-num 4`` splits into 4 images).

Works with every policy (``policy=mmada`` / ``dimoo`` with their checkpoints, ``policy=shapes_llada``, ``oracle``,
``random``, MAR policies with ``sampler=mar``) and with a trained one via ``ckpt_path`` (as in ``evaluate``).
Prompts whose outputs already exist are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from htgrpo._hydra import config_dir, run_or_exit_on_config_error
from htgrpo.config import ConfigError, instantiate_node, require, require_choice
from htgrpo.data.records import BenchmarkPrompt

log = logging.getLogger("htgrpo.generate")

PROMPT_KINDS = ("geneval", "dpg")


def load_prompts(kind: str, path: str, limit: int | None = None) -> list[BenchmarkPrompt]:
    """The official prompt set: ``geneval`` (metadata jsonl or its folder) or ``dpg`` (prompts/ folder or jsonl)."""
    from htgrpo.data.prompt_sets import DPGPrompts, GenEvalPrompts

    require_choice(kind, PROMPT_KINDS, "kind")
    try:
        prompt_set = GenEvalPrompts(path, limit=limit) if kind == "geneval" else DPGPrompts(path, limit=limit)
    except ConfigError as err:
        raise ConfigError("path" if err.key == "prompts_path" else err.key, err.message) from None
    return prompt_set.prompts


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(K, 3, H, W) uint8 -> one (3, rows·H, nrow·W) uint8 image, row-major, no padding (DPG's 2x2 grid)."""
    k, c, h, w = images.shape
    rows = -(-k // nrow)
    canvas = torch.zeros((c, rows * h, nrow * w), dtype=images.dtype)
    for i in range(k):
        r, col = divmod(i, nrow)
        canvas[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
    return canvas


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def geneval_done(out: Path, index: int, k: int) -> bool:
    folder = out / f"{index:05d}"
    samples = folder / "samples"
    return (folder / "metadata.jsonl").exists() and all((samples / f"{j:04d}.png").exists() for j in range(k))


def write_geneval(out: Path, index: int, prompt: BenchmarkPrompt, images: torch.Tensor) -> None:
    """GenEval's layout for prompt ``index``: metadata.jsonl + samples/0000.png …"""
    folder = out / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        save_png(img, folder / "samples" / f"{j:04d}.png")
    (folder / "metadata.jsonl").write_text(json.dumps(prompt.record.to_json()) + "\n")


def write_dpg(out: Path, prompt: BenchmarkPrompt, images: torch.Tensor) -> None:
    save_png(image_grid(images, nrow=2), out / f"{prompt.key}.png")


def generate_all(generator: Any, prompts: Sequence[BenchmarkPrompt], kind: str, out: Path, images_per_prompt: int,
                 batch_size: int, seed: int, progress: bool = True) -> dict[str, int]:
    """Draw ``images_per_prompt`` images per prompt (batches of ``batch_size`` images) and write them.

    Each batch's noise comes from a generator seeded with (seed, index of its first prompt): a fixed seed and batch
    size reproduce the images.
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(prompts)
            if not (geneval_done(out, i, images_per_prompt) if kind == "geneval" else (out / f"{p.key}.png").exists())]
    per_batch = max(1, batch_size // images_per_prompt)
    bar = tqdm(total=len(todo), desc=f"generate {kind}", unit="prompt", disable=not progress)
    written = 0
    for start in range(0, len(todo), per_batch):
        chunk = todo[start:start + per_batch]
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk[0])
        expanded = [prompts[i] for i in chunk for _ in range(images_per_prompt)]
        flat = generator.generate(expanded, g).cpu()
        images = flat.view(len(chunk), images_per_prompt, *flat.shape[1:])
        for i, imgs in zip(chunk, images):
            if imgs.dtype != torch.uint8:
                raise TypeError(f"the generator returned {imgs.dtype} images; expected uint8")
            if kind == "geneval":
                write_geneval(out, i, prompts[i], imgs)
            else:
                write_dpg(out, prompts[i], imgs)
            written += 1
        bar.update(len(chunk))
    bar.close()
    return {"prompts": len(prompts), "written": written, "skipped": len(prompts) - len(todo)}


def run(cfg: DictConfig) -> dict[str, Any]:
    from htgrpo.checkpoints import load_policy
    from htgrpo.policies.generators import as_image_generator

    started = time.perf_counter()
    require(cfg.get("out") not in (None, "", "???"), "out", "is not set: the folder to write the images into")
    k = int(cfg.images_per_prompt)
    require(k >= 1, "images_per_prompt", f"must be >= 1, got {k}")
    require(int(cfg.batch_size) >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    prompt_list = instantiate_node(cfg, "prompts")
    kind = str(cfg.prompts.kind)
    if kind == "dpg":
        require(k == 4, "images_per_prompt", f"DPG-Bench scores a 2x2 grid of 4 images per prompt, got {k}")
    policy = load_policy(cfg)
    sampler = instantiate_node(cfg, "sampler")
    if isinstance(policy, torch.nn.Module):
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        policy = policy.to(device).eval()
    generator = as_image_generator(policy, sampler)
    out = Path(str(cfg.out)).expanduser()
    counts = generate_all(generator, prompt_list, kind, out, k, int(cfg.batch_size), int(cfg.seed),
                          progress=bool(cfg.progress))
    seconds = time.perf_counter() - started
    print(f"{counts['written']} prompts x {k} images written, {counts['skipped']} already there, "
          f"{counts['prompts']} prompts in {seconds:.1f} s -> {out}")
    return counts


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
def main(cfg: DictConfig) -> None:
    run_or_exit_on_config_error(run, cfg, log)


if __name__ == "__main__":
    main()
