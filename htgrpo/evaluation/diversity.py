"""Diversity and fidelity of ShapesWorld images beside GenEval: is a GenEval gain bought with a collapse?

GenEval's ``single_object``, ``two_object``, ``counting`` and ``position`` prompts name no colour, so a policy that
paints every object in one colour (or grows every object) loses nothing on them. These metrics see it. All of them
are read from the ShapesWorld detector's output (the same detections the GenEval scorer uses; kept when
``score > 0.3``, GenEval's threshold) and from the image's palette cells:

* ``diversity/color_divergence`` (lower is better, in [0, 1]): Jensen–Shannon divergence (base 2) between the colour
  distribution of the detected objects and the distribution the prompts ask for (:func:`expected_color_mass`: a
  named colour gets its object count, an unnamed object is spread uniformly over the ten palette colours).
* ``diversity/top_color_share``: share of detected objects in the most common colour (0.1 when uniform).
* ``diversity/per_prompt`` (higher is better, in [0, 1]): per prompt, the mean over pairs of its images of the
  foreground distance (:func:`foreground_distance`: 1 - cells with the same object colour in both / cells with an
  object in either); averaged over prompts. 0 = every image of a prompt is the same picture.
* ``diversity/per_prompt_color`` (higher is better, in [0, 1]): the same with the total-variation distance between
  the two images' detected-colour histograms (:func:`colour_distance`): 0 = every image of a prompt uses the same
  colours.
* ``diversity/coverage``: mean fraction of the canvas covered by detected objects; ``diversity/coverage_ratio`` =
  that / the same for oracle scenes of the same prompts (1 = objects as large and as many as the oracle draws).
* ``diversity/object_size``: mean side of a detected object in cells (``sqrt`` of its box area);
  ``diversity/object_size_ratio`` = that / the oracle's.
* ``diversity/objects_per_image``: detected objects per image; ``diversity/objects_ratio`` = that / the oracle's (the
  oracle draws exactly the objects a prompt asks for; GenEval does not penalise extra objects on most tasks, so a
  policy can paint more of them to raise its chance of showing the asked-for class).
* ``diversity/stray_share`` (lower is better, in [0, 1]): share of the painted (non-background) cells that lie in no
  detected object: speckle, ragged fringes and blobs too malformed to read. Oracle scenes score 0; a policy that
  paints noisy colour to look diverse shows here.

The oracle reference (:class:`OracleReference`) renders ``images_per_prompt`` scenes per prompt with the oracle's
sampler (``htgrpo.data.shapes.sampler.scene_for_record``), seeded by the prompt key, and detects them once; it is
cached per prompt, so every validation compares against the same scenes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from htgrpo.data.detection import Detection
from htgrpo.data.records import GENEVAL_COLORS, GenEvalRecord

DETECTION_THRESHOLD = 0.3
"""GenEval's ``threshold``: detections with ``score`` above it count as objects (also on counting prompts, whose
0.9 threshold is a counting rule, not a statement about what is in the picture)."""

DIVERSITY_KEYS = ("color_divergence", "top_color_share", "per_prompt", "per_prompt_color", "coverage",
                  "coverage_ratio", "object_size", "object_size_ratio", "objects_per_image", "objects_ratio",
                  "stray_share")
"""Names :meth:`ShapesDiversityMetric.compute` returns (logged as ``diversity/<name>``)."""


# ----------------------------------------------------------------------------------------------- pure functions


def expected_color_mass(record: GenEvalRecord, colors: Sequence[str] = GENEVAL_COLORS) -> np.ndarray:
    """Object-colour mass a prompt asks for: ``(C,)``, summing to the number of objects it asks for.

    For every ``include`` requirement with count ``n``: ``n`` on its colour if it names one, else ``n / C`` on each
    of the ``C`` colours (an unprompted colour is expected uniform over the palette). Example (hand-checked):
    ``a photo of a red circle and a square`` -> red ``1 + 0.1 = 1.1``, every other colour ``0.1``.
    """
    mass = np.zeros(len(colors), dtype=np.float64)
    for req in record.include:
        if req.color is not None:
            mass[list(colors).index(req.color)] += req.count
        else:
            mass += req.count / len(colors)
    return mass


def color_histogram(detected_colors: Sequence[str | None], colors: Sequence[str] = GENEVAL_COLORS) -> np.ndarray:
    """Counts ``(C,)`` of the given object colours over ``colors`` (``None`` / unknown colours are not counted)."""
    hist = np.zeros(len(colors), dtype=np.float64)
    index = {c: i for i, c in enumerate(colors)}
    for c in detected_colors:
        if c in index:
            hist[index[c]] += 1.0
    return hist


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of two non-negative weight vectors, each normalised first.

    ``JS(P, Q) = ½ KL(P || M) + ½ KL(Q || M)`` with ``M = (P + Q) / 2`` and ``0 log 0 = 0``. Examples
    (hand-checked): ``JS((1, 0), (0, 1)) = 1``; ``JS((1, 0), (½, ½)) = ½ log2(4/3) + ¼ log2(2/3) + ¼ log2 2
    = 0.3113``. NaN when either vector sums to 0 (no distribution to compare).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"distributions differ in size: {p.shape} vs {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise ValueError("distributions must be non-negative")
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        on = a > 0
        return float((a[on] * np.log2(a[on] / m[on])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def foreground_distance(cells_a: np.ndarray, cells_b: np.ndarray, background: int = 0) -> float:
    """How different two pictures are where they hold objects, in [0, 1].

    ``1 - |{cells where both hold the same non-background colour}| / |{cells where either holds an object}|``
    (a Jaccard distance that also asks the colours to agree); 0 when both are empty. Example (hand-checked): a
    red 2x2 square vs the same square shifted by one column -> 2 shared cells of 6 -> ``1 - 2/6 = 0.667``; vs the
    same square in blue -> 1.
    """
    a, b = np.asarray(cells_a), np.asarray(cells_b)
    if a.shape != b.shape:
        raise ValueError(f"cell grids differ in shape: {a.shape} vs {b.shape}")
    fg_a, fg_b = a != background, b != background
    union = int((fg_a | fg_b).sum())
    if union == 0:
        return 0.0
    same = int((fg_a & (a == b)).sum())
    return 1.0 - same / union


def colour_distance(hist_a: Sequence[float], hist_b: Sequence[float]) -> float:
    """Total-variation distance ``½ Σ|p - q|`` between two images' normalised colour histograms, in [0, 1].

    0 when both hold no object, 1 when exactly one does. Example (hand-checked): ``{red: 1}`` vs ``{red: 1, blue: 1}``
    -> ``½ (|1 - ½| + |0 - ½|) = 0.5``.
    """
    p = np.asarray(hist_a, dtype=np.float64)
    q = np.asarray(hist_b, dtype=np.float64)
    if p.sum() <= 0 and q.sum() <= 0:
        return 0.0
    if p.sum() <= 0 or q.sum() <= 0:
        return 1.0
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def mean_pairwise(items: Sequence[Any], distance: Any) -> float:
    """Mean of ``distance(items[i], items[j])`` over the pairs ``i < j``; NaN with fewer than 2 items."""
    n = len(items)
    if n < 2:
        return math.nan
    total = sum(distance(items[i], items[j]) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def kept_objects(detections: Sequence[Detection], threshold: float = DETECTION_THRESHOLD) -> list[Detection]:
    """Detections that count as objects: ``score > threshold`` compared in float32, as GenEval compares them."""
    thr = np.float32(threshold)
    return [d for d in detections if np.float32(d.score) > thr]


@dataclass(frozen=True)
class ImageStats:
    """What the diversity metrics need from one image.

    Attributes:
        color_counts: ``(C,)`` detected objects per palette colour (``GENEVAL_COLORS`` order).
        coverage: fraction of the canvas inside detected objects' masks (``sum(area) / (H * W)``).
        object_sides: per detected object, ``sqrt`` of its box area, in cells.
        cells: ``(G, G)`` palette indices of the image (0 = background).
    """

    color_counts: np.ndarray
    coverage: float
    object_sides: tuple[float, ...]
    cells: np.ndarray


def image_stats(detections: Sequence[Detection], cells: np.ndarray, image_px: tuple[int, int],
                threshold: float = DETECTION_THRESHOLD) -> ImageStats:
    """:class:`ImageStats` of one image from its raw detections, its ``(G, G)`` cells and its ``(H, W)`` in pixels."""
    objects = kept_objects(detections, threshold)
    h, w = image_px
    cell_area = (h / cells.shape[0]) * (w / cells.shape[1])
    sides = tuple(math.sqrt(max(d.size[0], 0.0) * max(d.size[1], 0.0) / cell_area) for d in objects)
    return ImageStats(color_counts=color_histogram([d.color for d in objects]),
                      coverage=float(sum(d.area for d in objects)) / float(h * w),
                      object_sides=sides, cells=np.asarray(cells))


# -------------------------------------------------------------------------------------------- oracle reference


class OracleReference:
    """Oracle scenes of given prompts, detected once and cached per ``(prompt key, image index)``.

    Args:
        world: the ShapesWorld geometry (``ShapesWorldConfig``).
        detector: the ShapesDetector the scorer uses (oracle scenes go through the same reading).
        seed: base seed; scene ``i`` of prompt ``key`` uses ``default_rng([seed, crc32(key), i])``.
    """

    def __init__(self, world: Any, detector: Any, seed: int = 0) -> None:
        self.world, self.detector, self.seed = world, detector, int(seed)
        self._cache: dict[tuple[str, int], ImageStats] = {}

    def stats(self, key: str, record: GenEvalRecord, index: int) -> ImageStats:
        """Stats of oracle scene ``index`` of the prompt ``key`` (rendered and detected on first use)."""
        from htgrpo.data.shapes.sampler import scene_for_record
        from htgrpo.data.shapes.scene import render_cells

        k = (str(key), int(index))
        if k not in self._cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(str(key).encode()), int(index)])
            cells = render_cells(scene_for_record(record, rng, self.world))
            px = self.world.cell_px
            dets = self.detector.detect_cells(cells, px, px)
            self._cache[k] = image_stats(dets, cells, (cells.shape[0] * px, cells.shape[1] * px))
        return self._cache[k]


# ------------------------------------------------------------------------------------------------------- metric


class ShapesDiversityMetric(Metric):
    """Accumulates the diversity / fidelity statistics of the module docstring (sum states: DDP-safe).

    ``update`` takes one batch in the benchmark's prompt-major order (``images_per_prompt`` consecutive images per
    prompt, complete prompts only); ``compute`` returns ``{name: value}`` for the names in ``DIVERSITY_KEYS``.

    Args:
        world: ShapesWorld geometry.
        detector: the scorer's ``ShapesDetector`` (for the oracle reference).
        oracle_seed: seed of the oracle reference scenes.
    """

    full_state_update = False

    def __init__(self, world: Any, detector: Any, oracle_seed: int = 0) -> None:
        super().__init__()
        self.world = world
        self.oracle = OracleReference(world, detector, oracle_seed)
        c = len(GENEVAL_COLORS)
        for name, default in (
            ("color_counts", torch.zeros(c, dtype=torch.float64)),
            ("expected_mass", torch.zeros(c, dtype=torch.float64)),
            ("per_prompt_sum", torch.zeros((), dtype=torch.float64)),
            ("per_prompt_color_sum", torch.zeros((), dtype=torch.float64)),
            ("num_prompts", torch.zeros((), dtype=torch.float64)),
            ("coverage_sum", torch.zeros((), dtype=torch.float64)),
            ("painted_sum", torch.zeros((), dtype=torch.float64)),
            ("side_sum", torch.zeros((), dtype=torch.float64)),
            ("num_objects", torch.zeros((), dtype=torch.float64)),
            ("num_images", torch.zeros((), dtype=torch.float64)),
            ("oracle_coverage_sum", torch.zeros((), dtype=torch.float64)),
            ("oracle_side_sum", torch.zeros((), dtype=torch.float64)),
            ("oracle_num_objects", torch.zeros((), dtype=torch.float64)),
            ("oracle_num_images", torch.zeros((), dtype=torch.float64)),
        ):
            self.add_state(name, default=default, dist_reduce_fx="sum")

    def update(self, prompts: Sequence[Any], images: Any, detections: Sequence[Sequence[Detection]],  # type: ignore[override]
               images_per_prompt: int) -> None:
        """Add one batch: ``prompts`` (with ``.key`` and ``.record``), uint8 ``images`` ``(len(prompts) * ipp, 3, H,
        W)`` and the scorer's raw ``detections`` of each image."""
        from htgrpo.data.shapes.scene import image_to_cells

        ipp = int(images_per_prompt)
        if len(detections) != len(prompts) * ipp:
            raise ValueError(f"expected {len(prompts) * ipp} detection lists for {len(prompts)} prompts, got {len(detections)}")
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        cells = image_to_cells(arr, self.world.grid_size)
        h, w = arr.shape[-2:]
        for j, prompt in enumerate(prompts):
            stats = [image_stats(detections[j * ipp + i], cells[j * ipp + i], (h, w)) for i in range(ipp)]
            self.expected_mass += torch.from_numpy(expected_color_mass(prompt.record) * ipp)
            for s in stats:
                self.color_counts += torch.from_numpy(s.color_counts)
                self.coverage_sum += s.coverage
                self.painted_sum += float((s.cells != 0).mean())
                self.side_sum += float(sum(s.object_sides))
                self.num_objects += len(s.object_sides)
                self.num_images += 1
            if ipp >= 2:
                self.per_prompt_sum += mean_pairwise([s.cells for s in stats], foreground_distance)
                self.per_prompt_color_sum += mean_pairwise([s.color_counts for s in stats], colour_distance)
                self.num_prompts += 1
            for i in range(ipp):
                ref = self.oracle.stats(prompt.key, prompt.record, i)
                self.oracle_coverage_sum += ref.coverage
                self.oracle_side_sum += float(sum(ref.object_sides))
                self.oracle_num_objects += len(ref.object_sides)
                self.oracle_num_images += 1

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(a / b) if float(b) > 0 else math.nan

        counts = self.color_counts.numpy()
        coverage = ratio(self.coverage_sum, self.num_images)
        side = ratio(self.side_sum, self.num_objects)
        return {
            "color_divergence": js_divergence(counts, self.expected_mass.numpy()),
            "top_color_share": float(counts.max() / counts.sum()) if counts.sum() > 0 else math.nan,
            "per_prompt": ratio(self.per_prompt_sum, self.num_prompts),
            "per_prompt_color": ratio(self.per_prompt_color_sum, self.num_prompts),
            "coverage": coverage,
            "coverage_ratio": coverage / ratio(self.oracle_coverage_sum, self.oracle_num_images)
            if float(self.oracle_coverage_sum) > 0 else math.nan,
            "object_size": side,
            "object_size_ratio": side / ratio(self.oracle_side_sum, self.oracle_num_objects)
            if float(self.oracle_side_sum) > 0 else math.nan,
            "objects_per_image": ratio(self.num_objects, self.num_images),
            # painted cells outside every kept object's mask / painted cells (masks are painted cells, so >= 0)
            "stray_share": max(0.0, 1.0 - ratio(self.coverage_sum, self.painted_sum))
            if float(self.painted_sum) > 0 else math.nan,
            "objects_ratio": ratio(self.num_objects, self.num_images) / ratio(self.oracle_num_objects, self.oracle_num_images)
            if float(self.oracle_num_objects) > 0 else math.nan,
        }

    def __bool__(self) -> bool:  # a Metric is an nn.Module; `if metric:` must not depend on its length
        return True


def make_diversity_metric(scorer: Any, kind: str) -> ShapesDiversityMetric | None:
    """The diversity metric for a benchmark's scorer: a :class:`ShapesDiversityMetric` for a ShapesWorld GenEval
    scorer (it hands its detections over through ``score_with_detections``), else None (no metrics beside the
    benchmark's own)."""
    from htgrpo.data.shapes.palette import ShapesWorldConfig

    if kind != "geneval" or not hasattr(scorer, "score_with_detections"):
        return None
    world, detector = getattr(scorer, "world", None), getattr(scorer, "detector", None)
    if not isinstance(world, ShapesWorldConfig) or not hasattr(detector, "detect_cells"):
        return None
    return ShapesDiversityMetric(world, detector)


# ------------------------------------------------------------------------------------------ FID/KID features


class PaletteLayoutFeatures(torch.nn.Module):
    """ShapesWorld scene features for FID / KID (``evaluate metrics=[fid,kid]
    fid.feature_extractor=htgrpo.evaluation.diversity.PaletteLayoutFeatures``): nothing to download.

    Why not Inception: its weights are a download, and ImageNet features say little about flat palette scenes. These
    features measure what ShapesWorld scenes vary in — which colours are where, and how much of them:

    1. average-pool the image to ``grid_size x grid_size`` cells and read each cell's nearest palette colour (the
       reading the detector uses; robust to clean-fid's bicubic resize to 299, which only blurs cell borders);
    2. one-hot the cells over the ``P = 11`` palette entries (background included) and average-pool to
       ``regions x regions`` blocks: feature = the share of each colour in each block, ``(B, P · regions²)``,
       colour-major (``11 x 4 x 4 = 176`` by default).

    Args:
        grid_size: cells per side of the images (11 = ``conf/world/shapes.yaml``).
        regions: blocks per side of the layout histogram.
    """

    def __init__(self, grid_size: int = 11, regions: int = 4) -> None:
        super().__init__()
        from htgrpo.data.shapes.palette import PALETTE_RGB

        if grid_size < 1 or not 1 <= regions <= grid_size:
            raise ValueError(f"need grid_size >= 1 and 1 <= regions <= grid_size, got {grid_size}, {regions}")
        self.grid_size, self.regions = int(grid_size), int(regions)
        self.register_buffer("palette", torch.tensor(PALETTE_RGB, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float ``(B, 3, H, W)`` in 0..255 -> ``(B, P · regions²)`` colour shares per block (colour-major)."""
        x = torch.nn.functional.adaptive_avg_pool2d(images.float(), self.grid_size)  # (B, 3, G, G) mean cell colour
        d = ((x.permute(0, 2, 3, 1)[..., None, :] - self.palette) ** 2).sum(-1)    # (B, G, G, P)
        onehot = torch.nn.functional.one_hot(d.argmin(-1), self.palette.shape[0]).permute(0, 3, 1, 2).float()
        return torch.nn.functional.adaptive_avg_pool2d(onehot, self.regions).flatten(1)
