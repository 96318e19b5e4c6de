"""Files in the official benchmark layouts, so the official scripts can read what ``htgrpo.evaluate`` writes.

* GenEval images: ``<dir>/<index:05d>/metadata.jsonl`` (the prompt's metadata line) + ``samples/<i:04d>.png``
  (what ``evaluate_images.py`` reads).
* GenEval ``results.jsonl``: one JSON object per image with ``filename, tag, prompt, correct, reason, metadata,
  details``; ``metadata`` and ``details`` are JSON strings, as ``evaluate_images.py`` writes them through pandas, so
  GenEval's ``summary_scores.py`` reads the file unchanged.
* DPG-Bench images: ``<dir>/<item_id>.png``, the 2x2 grid of a prompt's 4 images (top-left, top-right,
  bottom-left, bottom-right), what ``compute_dpg_bench.py --pic-num 4 --resolution R`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from htgrpo.data.records import BenchmarkPrompt, GenEvalRecord


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)


def geneval_image_path(image_dir: Path, key: str, index: int) -> Path:
    """``<image_dir>/<key:05d>/samples/<index:04d>.png`` (GenEval's generation layout)."""
    folder = f"{int(key):05d}" if str(key).isdigit() else str(key)
    return Path(image_dir) / folder / "samples" / f"{index:04d}.png"


def save_geneval_images(image_dir: Path, prompts: Sequence[BenchmarkPrompt], images: torch.Tensor) -> list[str]:
    """Save prompt-major images (``len(images) // len(prompts)`` per prompt) in GenEval's layout; returns the paths."""
    ipp = images.shape[0] // max(1, len(prompts))
    paths = []
    for j, p in enumerate(prompts):
        record = p.record
        folder = geneval_image_path(image_dir, p.key, 0).parent.parent
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(record, GenEvalRecord):
            (folder / "metadata.jsonl").write_text(json.dumps(record.to_json()) + "\n")
        for i in range(ipp):
            path = geneval_image_path(image_dir, p.key, i)
            _save_png(images[j * ipp + i], path)
            paths.append(str(path))
    return paths


def save_dpg_grids(image_dir: Path, prompts: Sequence[BenchmarkPrompt], images: torch.Tensor) -> list[str]:
    """Save each prompt's 4 images as ``<item_id>.png`` 2x2 grids; one path per image (its grid's path)."""
    from htgrpo.rewards.dpg_real import make_grid_2x2

    ipp = images.shape[0] // max(1, len(prompts))
    paths = []
    for j, p in enumerate(prompts):
        path = Path(image_dir) / f"{p.key}.png"
        if ipp == 4:
            _save_png(make_grid_2x2(images[j * 4:(j + 1) * 4]), path)
        else:  # not the official layout; keep the first image
            _save_png(images[j * ipp], path)
        paths += [str(path)] * ipp
    return paths


def geneval_results_row(row: dict[str, Any]) -> dict[str, Any]:
    """The official ``results.jsonl`` row of one of ``Benchmark.score``'s GenEval rows."""
    metadata = row["metadata"]
    return {
        "filename": row.get("filename", ""),
        "tag": row["tag"],
        "prompt": row["prompt"],
        "correct": bool(row["correct"]),
        "reason": row.get("reason", ""),
        "metadata": metadata if isinstance(metadata, str) else json.dumps(metadata),
        "details": row.get("details", "{}"),
    }


def write_geneval_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write GenEval's ``results.jsonl`` (one official row per image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(geneval_results_row(row)) + "\n")
    return path
