"""GenEval on real images: a transformers Mask2Former instance detector + CLIP colour classification + the official rules.

This follows djghosh13/geneval ``evaluation/evaluate_images.py`` step by step:

1. **Detection.** Mask2Former (COCO instance checkpoint; the official one is mmdet's
   ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``, here the transformers port, default
   ``facebook/mask2former-swin-small-coco-instance``). Post-processing as mmdet's ``MaskFormerFusionHead``
   (instance branch): mask logits resized to the padded input, cropped to the valid region, resized to the image;
   ``top-k`` (``max_per_image``, 100) over all query x class probabilities; score = class probability x mean
   mask probability inside the binary mask; box = tight box of the mask (``x2``/``y2`` exclusive, as mmdet's
   ``mask2bbox``). Class index ``i`` is the ``i``-th line of GenEval's ``object_names.txt``
   (shipped as ``htgrpo.data.geneval_vocab.GENEVAL_OBJECT_NAMES``).
2. **Filtering.** ``filter_detections`` (threshold 0.3 / 0.9 in float32, official tie order, 16 per class,
   ``max_overlap`` NMS).
3. **Colour.** CLIP ViT-L/14 zero-shot over GenEval's ten colours with its three templates
   (``"a photo of a {c} {cls}"``, ``"a photo of a {c}-colored {cls}"``, ``"a photo of a {c} object"``), classifier
   built as clip_benchmark does (per colour: mean of the L2-normalised template embeddings, re-normalised). The
   image is each object's mask composited on a grey ``#999`` background, then cropped to its box, then open_clip's
   eval transform (torchvision: bicubic resize of the shorter side, centre crop with torchvision's rounding,
   ``ToTensor``, normalise; :func:`clip_eval_pixels`), not the Hugging Face processor's own resize/crop, which
   places the crop one pixel off for some box shapes.
4. **Rules.** ``evaluate_geneval`` (official include/exclude/colour/position rules) + partial credit.

The official numbers use mmdet weights and open_clip's OpenAI ViT-L-14; ours are the transformers ports of the same
checkpoints, so expect small differences (pre-processing/resizing details), not identical numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from htgrpo.config import ConfigError, require, require_range
from htgrpo.data.detection import Detection
from htgrpo.data.geneval_vocab import GENEVAL_OBJECT_NAMES
from htgrpo.data.records import GENEVAL_COLORS, GenEvalRecord, MetadataError
from htgrpo.rewards._hf import load_pretrained
from htgrpo.rewards.base import DTYPES, Reward, RewardOutput, check_images, freeze, resolve_device
from htgrpo.rewards.geneval import GenEvalThresholds, evaluate_geneval, filter_detections

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
GENEVAL_COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
"""The official colour prompts (``{c}`` = colour, ``{cls}`` = class name)."""


@dataclass(frozen=True)
class InstanceDetections:
    """The detector's output for one image, in the detector's order (before GenEval's filtering).

    Attributes:
        labels: class index per detection (index into the class list).
        scores: float32 confidence per detection.
        boxes: ``(N, 4)`` float ``x1, y1, x2, y2`` (``x2``/``y2`` exclusive).
        masks: ``(N, H, W)`` bool instance masks at image resolution.
    """

    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class GenEvalDetectionResult:
    """Verdict for one image, with what the official results row needs.

    Attributes:
        correct / partial / reason: as ``GenEvalImageResult``.
        details: kept detections per class, ``[x1, y1, x2, y2, score]`` each (the official ``details`` field).
        colors: per class with a colour requirement, the predicted colours of its top objects.
    """

    correct: bool
    partial: float
    reason: str = ""
    details: dict[str, list[list[float]]] = field(default_factory=dict)
    colors: dict[str, list[str]] = field(default_factory=dict)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a binary mask as mmdet's ``mask2bbox``: ``(x_min, y_min, x_max + 1, y_max + 1)``; all zeros
    for an empty mask. E.g. a mask with pixels at rows 2..4 and columns 1..3 -> ``(1, 2, 4, 5)``."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0 or len(ys) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def instance_postprocess(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, max_per_image: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's Mask2Former instance post-processing for one image (mask logits already at image size).

    ``p = softmax(class_logits)[:, :-1]`` (drop "no object"); take the ``k = min(max_per_image, Q*C)`` largest
    ``p[q, c]``; for each, ``binary = mask_logits[q] > 0`` and
    ``score = p[q, c] * sum(sigmoid(mask_logits[q]) * binary) / (sum(binary) + 1e-6)``.

    Args:
        class_logits: ``(Q, C + 1)``.
        mask_logits: ``(Q, H, W)``.
    Returns:
        ``(labels (k,), scores (k,) float32, masks (k, H, W) bool)``.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(int(max_per_image), probs.numel())
    top_probs, top_index = probs.flatten().topk(k, sorted=True)
    labels = top_index % num_classes
    queries = torch.div(top_index, num_classes, rounding_mode="floor")
    logits = mask_logits[queries].float()
    binary = logits > 0
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, (top_probs * mask_score).to(torch.float32), binary


def read_class_names(path: str | Path) -> list[str]:
    """GenEval's ``object_names.txt``: one class per line; the line index is the detector's class index."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("class_names", f"{p} does not exist: point it at GenEval's object_names.txt")
    names = [line.strip() for line in p.read_text().splitlines()]
    if names and names[-1] == "":
        names.pop()
    if not names or any(not n for n in names):
        raise ConfigError("class_names", f"{p}: expected one non-empty class name per line")
    return names


def default_class_names(id2label: dict[int, str], num_labels: int) -> list[str]:
    """The class list of a detector given no ``object_names.txt``: GenEval's 80 names for an 80-class detector, else
    its own ``id2label`` in index order.

    An 80-class COCO instance checkpoint (every GenEval detector) has COCO's classes in COCO's order, so its class
    ``i`` is GenEval's object ``i`` (:data:`~htgrpo.data.geneval_vocab.GENEVAL_OBJECT_NAMES`, shipped in the package);
    its ``id2label`` may spell them COCO's way (e.g. ``remote`` / ``keyboard`` / ``mouse`` where GenEval's metadata
    says ``tv remote`` / ``computer keyboard`` / ``computer mouse``), which would fail every such prompt. A detector of
    another size (e.g. the ShapesWorld one) keeps its own names.
    """
    if num_labels == len(GENEVAL_OBJECT_NAMES):
        return list(GENEVAL_OBJECT_NAMES)
    return [str(id2label[i]) for i in range(num_labels)]


class Mask2FormerDetector:
    """Instance segmentation through transformers ``Mask2FormerForUniversalSegmentation`` (frozen).

    Args:
        model: Hub repo id or ``save_pretrained`` folder (with its image processor).
        class_names: path to ``object_names.txt``; None -> :func:`default_class_names` (GenEval's 80 names for an
            80-class checkpoint, else its ``id2label`` in index order).
        device, dtype: where and in what precision the model runs.
        max_per_image: detections kept per image before GenEval's filtering (mmdet's test ``max_per_image``, 100).
        config_key: the config key of ``model`` (named in errors).
    """

    def __init__(self, model: str = DEFAULT_DETECTOR, class_names: str | None = None, device: str = "auto",
                 dtype: str = "float32", max_per_image: int = 100, config_key: str = "detector") -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        require(int(max_per_image) >= 1, "max_per_image", f"must be >= 1, got {max_per_image}")
        require(dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.max_per_image = int(max_per_image)
        what = "the GenEval detector (a Mask2Former COCO instance-segmentation checkpoint)"
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, model, config_key, what)
        net = load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, model, config_key, what)
        self.model = freeze(net).to(self.device, self.dtype)
        num_labels = int(self.model.config.num_labels)
        if class_names is None:
            self.class_names = default_class_names(self.model.config.id2label, num_labels)
        else:
            self.class_names = read_class_names(class_names)
            require(
                len(self.class_names) == num_labels, "class_names",
                f"{class_names} lists {len(self.class_names)} classes but the detector {model} has {num_labels}",
            )

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[InstanceDetections]:
        """Detections for uint8 images ``(B, 3, H, W)`` (all the same size)."""
        arrays = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        inputs = self.processor(images=arrays, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        pixel_mask = inputs.get("pixel_mask")
        out = self.model(pixel_values=pixel_values,
                         pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device))
        padded = pixel_values.shape[-2:]
        results = []
        for i, arr in enumerate(arrays):
            h, w = arr.shape[:2]
            logits = F.interpolate(out.masks_queries_logits[i : i + 1].float(), size=padded, mode="bilinear",
                                   align_corners=False)
            if pixel_mask is not None:  # crop the padding, as mmdet crops to img_shape
                valid = pixel_mask[i].bool()
                vh, vw = int(valid.any(1).sum()), int(valid.any(0).sum())
                logits = logits[..., :vh, :vw]
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
            labels, scores, masks = instance_postprocess(out.class_queries_logits[i], logits, self.max_per_image)
            masks_np = masks.cpu().numpy()
            boxes = np.array([mask_to_box(m) for m in masks_np], dtype=np.float32).reshape(-1, 4)
            results.append(InstanceDetections(labels=labels.cpu().numpy(), scores=scores.cpu().numpy(),
                                              boxes=boxes, masks=masks_np))
        return results


class ClipColorClassifier:
    """GenEval's colour classifier: CLIP zero-shot over ``GENEVAL_COLORS`` with the official templates.

    Args:
        model: CLIP Hub repo id or ``save_pretrained`` folder (with processor + tokenizer).
        bgcolor: background colour the object's mask is composited on (official ``#999``; ``original`` keeps the image).
        crop: crop to the object's box after compositing (official ``crop=1``).
    """

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "auto", dtype: str = "float32",
                 bgcolor: str = "#999", crop: bool = True, config_key: str = "clip") -> None:
        from PIL import ImageColor
        from transformers import AutoProcessor, CLIPModel

        require(dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        if bgcolor != "original":
            try:
                ImageColor.getrgb(bgcolor)
            except ValueError:
                raise ConfigError("bgcolor", f"{bgcolor!r} is not a colour PIL understands (e.g. '#999') nor 'original'") from None
        self.bgcolor, self.crop = bgcolor, bool(crop)
        what = "the GenEval colour classifier (CLIP ViT-L/14)"
        self.processor = load_pretrained(AutoProcessor.from_pretrained, model, config_key, what)
        self.model = freeze(load_pretrained(CLIPModel.from_pretrained, model, config_key, what)).to(self.device, self.dtype)
        self._classifiers: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def classifier(self, classname: str) -> torch.Tensor:
        """``(D, 10)`` zero-shot weights: per colour ``normalize(mean_t normalize(text_emb(template_t)))``."""
        if classname not in self._classifiers:
            columns = []
            for color in GENEVAL_COLORS:
                texts = [t.format(c=color, cls=classname) for t in GENEVAL_COLOR_TEMPLATES]
                tok = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = self._features(self.model.get_text_features(**tok)).float()
                mean = F.normalize(emb, dim=-1).mean(0)
                columns.append(mean / mean.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    def object_images(self, image: np.ndarray, boxes: Sequence[Sequence[float]],
                      masks: Sequence[np.ndarray | None]) -> list[Any]:
        """Per object: the image with pixels outside its mask set to ``bgcolor``, cropped to its box (PIL rounding)."""
        from PIL import Image

        pil = Image.fromarray(image).convert("RGB")
        blank = pil.copy() if self.bgcolor == "original" else Image.new("RGB", pil.size, color=self.bgcolor)
        crops = []
        for box, mask in zip(boxes, masks):
            im = pil if mask is None else Image.composite(pil, blank, Image.fromarray(np.asarray(mask, dtype=bool)))
            if self.crop:
                im = im.crop(tuple(float(v) for v in box[:4]))
            crops.append(im)
        return crops

    @torch.no_grad()
    def color_logits(self, image: np.ndarray, boxes: Sequence[Sequence[float]], masks: Sequence[np.ndarray | None],
                     classname: str) -> torch.Tensor:
        """(objects, 10) zero-shot logits ``100 · normalize(image_emb) @ classifier(classname)`` (clip_benchmark's
        ``run_classification``), columns in ``GENEVAL_COLORS`` order."""
        crops = self.object_images(image, boxes, masks)
        ip = self.processor.image_processor
        size = ip.crop_size["height"] if ip.do_center_crop else ip.size["shortest_edge"]
        pixels = clip_eval_pixels(crops, int(size), ip.image_mean, ip.image_std)
        emb = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        return 100.0 * F.normalize(emb, dim=-1) @ self.classifier(classname)

    def classify(self, image: np.ndarray, boxes: Sequence[Sequence[float]], masks: Sequence[np.ndarray | None],
                 classname: str) -> list[str]:
        """Predicted colour name per object (argmax of :meth:`color_logits`)."""
        if not len(boxes):
            return []
        return [GENEVAL_COLORS[int(i)] for i in self.color_logits(image, boxes, masks, classname).argmax(1)]


def clip_eval_pixels(images: Sequence[Any], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """open_clip's eval transform (``image_transform(size, is_train=False)``, what GenEval's colour step runs) on PIL
    images -> (N, 3, size, size): shorter side resized to ``size`` (bicubic, antialiased), centre crop to
    ``size x size`` (torchvision's offsets: ``round((H - size) / 2)``), RGB in [0, 1], then ``(x - mean) / std``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = []
    for im in images:
        im = TF.resize(im.convert("RGB"), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.normalize(TF.to_tensor(TF.center_crop(im, [size, size])), list(mean), list(std)))
    return torch.stack(out)


class GenEvalDetectorScorer:
    """GenEval with Mask2Former + CLIP: ``score(images, records) -> [GenEvalDetectionResult]``.

    The models are loaded on first use (``load()``), so a config that builds this scorer but never scores
    (e.g. ``fit`` with validation off) needs no weights; ``htgrpo.evaluate`` calls ``load()`` at start-up.

    Args:
        detector: Mask2Former repo id or folder (``detector=``).
        clip: CLIP repo id or folder.
        class_names: GenEval's ``object_names.txt`` (class index order); null -> the ``object_names.txt`` next to
            the benchmark's metadata file when there is one, else :func:`default_class_names` (GenEval's 80 names,
            shipped in the package, for an 80-class detector; else the detector's ``id2label``).
        device, dtype: for both models.
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: the official ``--options``.
        bgcolor, crop: colour-crop options (official ``bgcolor``/``crop``).
        max_per_image: detector top-k before filtering.
        batch_size: images per detector forward pass.
    """

    def __init__(self, detector: str = DEFAULT_DETECTOR, clip: str = DEFAULT_CLIP, class_names: str | None = None,
                 device: str = "auto", dtype: str = "float32", threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, max_overlap: float = 1.0,
                 position_threshold: float = 0.1, bgcolor: str = "#999", crop: bool = True,
                 max_per_image: int = 100, batch_size: int = 8) -> None:
        require_range(threshold, "threshold", 0.0, 1.0)
        require_range(counting_threshold, "counting_threshold", 0.0, 1.0)
        require(int(max_objects) >= 1, "max_objects", f"must be >= 1, got {max_objects}")
        require_range(max_overlap, "max_overlap", 0.0, 1.0)
        require(float(position_threshold) >= 0, "position_threshold", f"must be >= 0, got {position_threshold}")
        require(int(batch_size) >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        require(int(max_per_image) >= 1, "max_per_image", f"must be >= 1, got {max_per_image}")
        require(dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        require(detector not in (None, ""), "detector", f"is not set: a Mask2Former repo id (e.g. {DEFAULT_DETECTOR}) or folder")
        require(clip not in (None, ""), "clip", f"is not set: a CLIP repo id (e.g. {DEFAULT_CLIP}) or folder")
        self.thresholds = GenEvalThresholds(score=float(threshold), counting_score=float(counting_threshold),
                                            max_objects=int(max_objects), position_margin=float(position_threshold),
                                            max_overlap=float(max_overlap))
        self.batch_size = int(batch_size)
        self._detector_args = (str(detector), class_names, device, dtype, int(max_per_image), "detector")
        self._clip_args = (str(clip), device, dtype, bgcolor, bool(crop), "clip")
        self._file_class_names = None if class_names in (None, "") else read_class_names(class_names)
        self._detector: Mask2FormerDetector | None = None
        self._colors: ClipColorClassifier | None = None

    def load(self) -> "GenEvalDetectorScorer":
        """Load both models now (raises ``ConfigError`` naming ``detector`` / ``clip`` when weights are missing)."""
        if self._detector is None:
            self._detector = Mask2FormerDetector(*self._detector_args)
        if self._colors is None:
            self._colors = ClipColorClassifier(*self._clip_args)
        return self

    @property
    def detector(self) -> Mask2FormerDetector:
        return self.load()._detector  # type: ignore[return-value]

    @property
    def colors(self) -> ClipColorClassifier:
        return self.load()._colors  # type: ignore[return-value]

    def to(self, device: torch.device) -> None:
        for part in (self._detector, self._colors):
            if part is not None:
                part.model.to(device)
                part.device = device

    def _use_class_names(self, path: Path) -> None:
        names = read_class_names(path)
        if self._detector is not None:
            n = int(self._detector.model.config.num_labels)
            require(len(names) == n, "class_names", f"{path} lists {len(names)} classes but the detector has {n}")
            self._detector.class_names = names
        self._file_class_names = names
        self._detector_args = (self._detector_args[0], str(path), *self._detector_args[2:])

    @property
    def class_names(self) -> list[str]:
        """The class list (``class_names`` file when given, else :func:`default_class_names`; loads the detector)."""
        return self._file_class_names if self._file_class_names is not None else self.detector.class_names

    def check_records(self, records: Iterable[tuple[str, GenEvalRecord]]) -> None:
        """Fail at start-up on a metadata line naming a class the detector cannot detect.

        Args:
            records: ``(source, record)`` pairs, ``source`` = ``file:line``.
        Raises:
            MetadataError: ``"<file>:<line>: key 'include[i].class': found 'x', expected one of ..."``.
        """
        known = set(self.class_names)
        for source, record in records:
            for kind, reqs in (("include", record.include), ("exclude", record.exclude)):
                for i, req in enumerate(reqs):
                    if req.cls not in known:
                        raise MetadataError(
                            f"{source}: key '{kind}[{i}].class': found {req.cls!r}, expected one of the detector's "
                            f"{len(known)} classes (GenEval's object_names.txt order); fix the line or pass the "
                            "matching class list (class_names=)"
                        )

    @staticmethod
    def _metadata_file(prompts: Any) -> Path | None:
        from htgrpo.data.loaders import _geneval_file

        path = getattr(prompts, "path", None)
        return None if path is None else _geneval_file(path)

    def use_prompt_set(self, prompts: Any) -> None:
        """Without ``class_names``: use GenEval's ``object_names.txt`` next to the prompt set's metadata file when
        there is one (GenEval's ``prompts/`` folder holds both); else :func:`default_class_names` stays. Cheap."""
        file = self._metadata_file(prompts)
        if self._file_class_names is None and file is not None and (file.parent / "object_names.txt").is_file():
            self._use_class_names(file.parent / "object_names.txt")

    def check_prompt_set(self, prompts: Any) -> None:
        """``check_records`` over a GenEval prompt set; sources are ``<metadata file>:<line>``."""
        self.use_prompt_set(prompts)
        meta = self._metadata_file(prompts)
        file = str(meta) if meta is not None else str(getattr(prompts, "name", "prompts"))
        self.check_records((f"{file}:{int(p.key) + 1}" if str(p.key).isdigit() else f"{file}:{p.key}", p.record)
                           for p in prompts.prompts if isinstance(p.record, GenEvalRecord))

    def _score_one(self, image: np.ndarray, found: InstanceDetections, record: GenEvalRecord) -> GenEvalDetectionResult:
        names = self.class_names
        dets = [Detection(label=names[int(c)], score=float(s), box=tuple(float(v) for v in b), area=int(m.sum()))
                for c, s, b, m in zip(found.labels, found.scores, found.boxes, found.masks)]
        mask_of = {id(d): m for d, m in zip(dets, found.masks)}
        kept = filter_detections(dets, record.tag, self.thresholds)
        colors: dict[str, list[str]] = {}
        need: dict[str, int] = {}
        for req in record.include:
            if req.color is not None:
                need[req.cls] = max(need.get(req.cls, 0), req.count)
        for cls, n in need.items():
            # The official code classifies the top-`count` objects of a colour requirement; each crop is
            # classified on its own, so classifying them once here gives the same colours.
            top = kept.get(cls, [])[:n]
            predicted = self.colors.classify(image, [d.box for d in top], [mask_of[id(d)] for d in top], cls)
            colors[cls] = predicted
            if top:
                kept[cls] = [replace(d, color=c) for d, c in zip(top, predicted)] + kept[cls][n:]
        verdict = evaluate_geneval(kept, record, self.thresholds)
        details = {cls: [[*map(float, d.box), float(np.float32(d.score))] for d in ds] for cls, ds in kept.items()}
        return GenEvalDetectionResult(correct=verdict.correct, partial=verdict.partial, reason=verdict.reason,
                                      details=details, colors=colors)

    def score(self, images: torch.Tensor, records: Sequence[GenEvalRecord]) -> list[GenEvalDetectionResult]:
        """One verdict per uint8 image ``(B, 3, H, W)``; ``records`` has length B."""
        images = check_images(images)
        if images.shape[0] != len(records):
            raise ValueError(f"got {images.shape[0]} images but {len(records)} records")
        for r in records:
            if not isinstance(r, GenEvalRecord):
                raise TypeError(f"the GenEval scorer got a {type(r).__name__} record; it scores GenEval records only")
        self.check_records((f"record {i}", r) for i, r in enumerate(records))
        out: list[GenEvalDetectionResult] = []
        for start in range(0, len(records), self.batch_size):
            batch = images[start : start + self.batch_size]
            found = self.detector.detect(batch)
            for im, f, rec in zip(batch, found, records[start : start + self.batch_size]):
                out.append(self._score_one(im.permute(1, 2, 0).numpy(), f, rec))
        return out


class GenEvalReward(Reward):
    """``reward=geneval``: GenEval credit from Mask2Former + CLIP as an RL reward.

    ``mode``: ``binary`` (1.0 iff the image is GenEval-correct) or ``partial`` (share of requirements met, see
    ``evaluate_geneval``). Components: ``geneval/correct`` and ``geneval/partial`` whatever the mode. Other
    arguments are :class:`GenEvalDetectorScorer`'s; the models load when the reward is built.
    """

    name = "geneval"

    def __init__(self, mode: Literal["binary", "partial"] = "binary", device: str = "auto", dtype: str = "float32",
                 **scorer_kwargs: Any) -> None:
        super().__init__(device=device, dtype=dtype)
        require(mode in ("binary", "partial"), "mode", f"must be 'binary' or 'partial', got {mode!r}")
        self.mode = mode
        self.scorer = GenEvalDetectorScorer(device=str(self.device), dtype=dtype, **scorer_kwargs)
        # A reward scores every training step: load now, so missing weights stop the run at start-up naming
        # `reward.detector` / `reward.clip` (inside a step, safe_score would turn the error into NaN rewards).
        self.scorer.load()

    def _move(self, device: torch.device) -> None:
        self.scorer.to(device)

    def score(self, images: torch.Tensor, records: Sequence[GenEvalRecord]) -> RewardOutput:
        results = self.scorer.score(images, records)
        correct = torch.tensor([float(r.correct) for r in results], dtype=torch.float32)
        partial = torch.tensor([float(r.partial) for r in results], dtype=torch.float32)
        return RewardOutput(correct if self.mode == "binary" else partial,
                            {"geneval/correct": correct, "geneval/partial": partial})


def official_results_row(filename: str, record: GenEvalRecord, result: Any) -> dict[str, Any]:
    """One line of GenEval's ``results.jsonl`` (what ``evaluate_images.py`` writes via pandas):
    ``filename, tag, prompt, correct, reason, metadata`` (the record's JSON line as a string), ``details``
    (JSON string ``{class: [[x1, y1, x2, y2, score], ...]}``)."""
    return {
        "filename": filename,
        "tag": record.tag,
        "prompt": record.prompt,
        "correct": bool(result.correct),
        "reason": str(result.reason),
        "metadata": json.dumps(record.to_json()),
        "details": json.dumps(getattr(result, "details", {}) or {}),
    }
