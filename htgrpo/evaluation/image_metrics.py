"""``metrics=[...]`` of ``htgrpo.evaluate``: metrics over every generated image, next to the benchmark's own score.

* ``fid`` / ``kid``: the generated images are saved (PNG) into ``<run>/fid_images`` and compared with
  ``fid.reference_dir`` through clean-fid (:mod:`htgrpo.evaluation.fid`);
* any reward name of ``conf/reward/`` (``clip_score``, ``pickscore``, ``hpsv2``, ``aesthetic``, ``jpeg_compressibility``,
  ``remote`` ...): the mean of its scores over all generated images (failed images are left out and counted as
  ``<name>/failed``), plus the mean of each of its components (``<name>/<component>``).

The images are taken as the benchmark run generates them (:class:`TappedGenerator`), so they are generated once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.evaluation.fid import FID_MODES, build_extractor, compute_fid_kid, save_images
from htgrpo.rewards.base import RewardOutput, safe_score

FID_METRICS = ("fid", "kid")


def _plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    return dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node)


class ImageMetrics:
    """Accumulates the ``metrics`` of an evaluation run. Everything is built (and checked) in ``__init__``."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        from htgrpo.rewards.registry import available_rewards, build_reward

        names = [str(n) for n in (cfg.get("metrics") or [])]
        require(len(set(names)) == len(names), "metrics", f"lists a metric twice: {names}")
        valid = [*FID_METRICS, *available_rewards()]
        unknown = [n for n in names if n not in valid]
        require(not unknown, "metrics", f"unknown metric(s) {unknown}; valid: {', '.join(valid)}")
        self.fid_metrics = [n for n in names if n in FID_METRICS]
        self.fid_cfg = _plain(cfg.get("fid"))
        if self.fid_metrics:
            ref = self.fid_cfg.get("reference_dir")
            require(ref is not None and Path(str(ref)).expanduser().is_dir(), "fid.reference_dir",
                    f"must be a folder of reference images for {'/'.join(self.fid_metrics)}, got {ref!r}")
            f = self.fid_cfg
            require_choice(str(f.get("mode", "clean")), FID_MODES, "fid.mode")
            device = str(f.get("device", "cpu"))
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            # built now, so missing Inception weights stop the run before any image is generated
            self.extractor = build_extractor(str(f.get("feature_extractor", "inception_v3")), str(f.get("mode", "clean")),
                                             torch.device(device), str(f.get("weights_dir", "/tmp")))
        options = _plain(cfg.get("metric_options"))
        self.rewards = {n: build_reward(n, f"metric_options.{n}", cfg.get("world"), options.get(n))
                        for n in names if n not in FID_METRICS}
        self.image_dir = Path(output_dir) / "fid_images"
        self.outputs: dict[str, list[RewardOutput]] = {n: [] for n in self.rewards}
        self.count = 0

    def __bool__(self) -> bool:
        return bool(self.fid_metrics or self.rewards)

    def observe(self, prompts: Sequence[Any], images: torch.Tensor) -> None:
        """Score / store one generated batch (``prompts``: one per image, with ``.record``)."""
        images = images.detach().cpu()
        records = [getattr(p, "record", p) for p in prompts]
        for name, reward in self.rewards.items():
            self.outputs[name].append(safe_score(reward, images, records))
        if self.fid_metrics:
            save_images(images, self.image_dir, start=self.count)
        self.count += images.shape[0]

    def compute(self) -> dict[str, float]:
        """``{metric: value}``: reward means (and ``<name>/failed``, ``<name>/<component>``), ``fid``, ``kid``."""
        out: dict[str, float] = {}
        for name, parts in self.outputs.items():
            total = RewardOutput.concat(parts)
            ok = torch.isfinite(total.scores)
            out[name] = float(total.scores[ok].mean()) if ok.any() else math.nan
            out[f"{name}/failed"] = float((~ok).sum())
            for comp, value in total.component_means().items():
                out[f"{name}/{comp}"] = value
        if self.fid_metrics:
            f = self.fid_cfg
            res = compute_fid_kid(self.image_dir, f.get("reference_dir"), self.fid_metrics,
                                  feature_extractor=str(f.get("feature_extractor", "inception_v3")),
                                  mode=str(f.get("mode", "clean")), batch_size=int(f.get("batch_size", 32)),
                                  num_workers=int(f.get("num_workers", 0)), device=str(f.get("device", "cpu")),
                                  weights_dir=str(f.get("weights_dir", "/tmp")),
                                  kid_subsets=int(f.get("kid_subsets", 100)),
                                  kid_subset_size=int(f.get("kid_subset_size", 1000)), seed=int(f.get("seed", 0)),
                                  extractor=self.extractor)
            if res.fid is not None:
                out["fid"] = res.fid
            if res.kid is not None:
                out["kid"] = res.kid
            out["fid/num_reference"] = float(res.num_reference)
        return out


class TappedGenerator:
    """An image generator that hands every batch it generates to :class:`ImageMetrics` (and returns it unchanged)."""

    def __init__(self, inner: Any, metrics: ImageMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def generate(self, prompts: Sequence[Any], generator: torch.Generator | None = None) -> torch.Tensor:
        images = self.inner.generate(prompts, generator)
        self.metrics.observe(prompts, images)
        return images

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


__all__ = ["ConfigError", "FID_METRICS", "ImageMetrics", "TappedGenerator"]
