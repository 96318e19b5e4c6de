"""Sample grids a person can read: each row captioned with its prompt, each image framed by its verdict.

Layout of :func:`annotated_grid`: rows of ``nrow`` images; above each row its caption (the row's prompt, or the
distinct prompts of the row joined by `` | ``, then ``[k/n correct]``), word-wrapped to the row's width; each image
sits in a frame: green = the benchmark's verdict is correct, red = wrong, white = no verdict (e.g. DPG crops, or a
grid drawn without verdicts). Text uses PIL's built-in default font (``ImageFont.load_default``, embedded in Pillow,
nothing to download): its TrueType face at ``CAPTION_PX`` pixels, or the bitmap font where Pillow lacks FreeType.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

CORRECT_RGB = (0, 170, 60)
WRONG_RGB = (215, 25, 25)
NO_VERDICT_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
BACKGROUND_RGB = (255, 255, 255)
CAPTION_PX = 14
"""Caption font size in pixels (PIL's default TrueType face; readable next to 110-128 px images)."""


def caption_font():
    """PIL's built-in font at ``CAPTION_PX`` (Pillow >= 10.1 with FreeType), else its bitmap default font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=CAPTION_PX)
    except TypeError:  # Pillow < 10.1: no size argument, only the bitmap font
        return ImageFont.load_default()


def frame_color(verdict: bool | None) -> tuple[int, int, int]:
    """Frame colour of one image: green if correct, red if wrong, white (no frame) when there is no verdict."""
    if verdict is None:
        return NO_VERDICT_RGB
    return CORRECT_RGB if verdict else WRONG_RGB


def row_caption(prompts: Sequence[str], verdicts: Sequence[bool | None]) -> str:
    """Caption of one grid row: its distinct prompts in order (joined by `` | ``), then ``[k/n correct]`` when the
    row has verdicts. Example: ``(["a photo of a circle"] * 3, [True, False, True])`` ->
    ``"a photo of a circle  [2/3 correct]"``."""
    distinct = list(dict.fromkeys(prompts))
    text = " | ".join(distinct)
    judged = [v for v in verdicts if v is not None]
    if judged:
        text += f"  [{sum(bool(v) for v in judged)}/{len(judged)} correct]"
    return text


def wrap_text(text: str, max_width: float, measure) -> list[str]:
    """Greedy word wrap: lines whose ``measure(line)`` (pixel width) stays within ``max_width``; a single word
    wider than that gets a line of its own."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = word if not current else f"{current} {word}"
        if current and measure(candidate) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current or not lines:
        lines.append(current)
    return lines


def annotated_grid(images: torch.Tensor | np.ndarray, nrow: int, prompts: Sequence[str] | None = None,
                   verdicts: Sequence[bool | None] | None = None, frame: int = 4, gap: int = 4) -> np.ndarray:
    """One ``uint8`` ``(H, W, 3)`` picture of ``images`` (uint8 ``(B, 3, h, w)``) in rows of ``nrow``, captioned and
    framed as the module docstring says.

    Args:
        prompts: the prompt of each image (``B`` of them); None = no captions.
        verdicts: per image True (correct) / False (wrong) / None (no verdict); None = no frames.
        frame: frame width in pixels.
        gap: white space between images and around rows, in pixels.
    """
    from PIL import Image, ImageDraw

    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got shape {arr.shape}")
    b, _, h, w = arr.shape
    if prompts is not None and len(prompts) != b:
        raise ValueError(f"got {len(prompts)} prompts for {b} images")
    if verdicts is not None and len(verdicts) != b:
        raise ValueError(f"got {len(verdicts)} verdicts for {b} images")
    nrow = max(1, min(int(nrow), b)) if b else 1
    rows = [list(range(r, min(r + nrow, b))) for r in range(0, b, nrow)]
    font = caption_font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> float:
        return scratch.textlength(text, font=font)

    left, top, right, bottom = scratch.textbbox((0, 0), "Ayg|[", font=font)
    line_h = bottom - top + 2
    cell_w, cell_h = w + 2 * frame, h + 2 * frame
    width = gap + nrow * (cell_w + gap)
    captions: list[list[str]] = []
    for idx in rows:
        if prompts is None:
            captions.append([])
        else:
            row_verdicts = [verdicts[i] for i in idx] if verdicts is not None else []
            captions.append(wrap_text(row_caption([prompts[i] for i in idx], row_verdicts), width - 2 * gap, measure))
    height = gap + sum(len(c) * line_h + cell_h + gap for c in captions)
    canvas = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    y = gap
    for idx, lines in zip(rows, captions):
        for line in lines:
            draw.text((gap, y - top), line, fill=TEXT_RGB, font=font)
            y += line_h
        x = gap
        for i in idx:
            verdict = verdicts[i] if verdicts is not None else None
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=frame_color(verdict))
            canvas.paste(Image.fromarray(np.ascontiguousarray(arr[i].transpose(1, 2, 0)).astype(np.uint8)),
                         (x + frame, y + frame))
            x += cell_w + gap
        y += cell_h + gap
    return np.asarray(canvas)


def save_annotated_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int,
                        prompts: Sequence[str] | None = None, verdicts: Sequence[bool | None] | None = None) -> Path:
    """:func:`annotated_grid` saved as a PNG (parent folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(annotated_grid(images, nrow, prompts, verdicts)).save(path)
    return path
