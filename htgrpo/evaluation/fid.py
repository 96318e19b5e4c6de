"""FID and KID of generated images against a reference image folder, through clean-fid.

Both sets go through clean-fid's own pipeline (``get_folder_features``: PIL bicubic resize to 299 in ``clean``
mode, then the feature extractor), so the numbers are clean-fid's:

* FID  = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))        (:func:`frechet_distance`, clean-fid's
  algorithm; S = covariance with ddof 1)
* KID  = unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over ``kid_subsets``
  random subsets of ``min(n_g, n_r, kid_subset_size)`` images (``cleanfid.fid.kernel_distance``; seeded here).

Feature extractors: ``inception_v3`` (clean-fid's TorchScript Inception, the standard; its weights file
``inception-2015-12-05.pt`` is downloaded once into ``weights_dir``), or the import path of any callable that
returns a torch module (or function) mapping float ``(B, 3, 299, 299)`` images in 0..255 to ``(B, D)`` features
(tests use a tiny one, so they run offline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from htgrpo.config import ConfigError, require, require_choice

log = logging.getLogger("htgrpo.fid")

FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff")


@dataclass(frozen=True)
class FIDResult:
    """``fid`` / ``kid`` (None when not asked for), and the image counts and feature size they come from."""

    fid: float | None
    kid: float | None
    num_generated: int
    num_reference: int
    feature_dim: int


def build_extractor(name: str, mode: str, device: torch.device, weights_dir: str = "/tmp") -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature extractor clean-fid calls on each batch (see the module docstring). Errors name ``fid.feature_extractor``."""
    key = "fid.feature_extractor"
    if name == "inception_v3":
        try:
            if mode == "legacy_pytorch":
                from cleanfid.features import build_feature_extractor

                return build_feature_extractor(mode, device, use_dataparallel=False)
            from cleanfid.inception_torchscript import InceptionV3W

            model = InceptionV3W(str(weights_dir), download=True, resize_inside=(mode == "legacy_tensorflow")).to(device).eval()
        except Exception as err:  # noqa: BLE001 - offline download failures come in many types
            raise ConfigError(key, (
                f"clean-fid's Inception weights could not be loaded ({type(err).__name__}: {str(err)[:200]}). They are "
                f"downloaded once (inception-2015-12-05.pt, NVIDIA's StyleGAN2-ADA metrics release, ~100 MB) into "
                f"fid.weights_dir={weights_dir}: run this once with network, or copy the file there; or set {key} to "
                "the import path of your own extractor")) from None
        return model
    from hydra.utils import get_object

    try:
        factory = get_object(name)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(key, f"must be inception_v3 or an importable callable, got {name!r} ({err})") from None
    extractor = factory()
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(device).eval()
    return extractor


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, clean-fid's extensions), sorted."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def save_images(images: torch.Tensor, folder: str | Path, start: int = 0) -> list[Path]:
    """Save uint8 ``(B, 3, H, W)`` images as ``folder/{start+i:06d}.png`` (lossless, what FID reads back)."""
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = root / f"{start + i:06d}.png"
        Image.fromarray(im.permute(1, 2, 0).contiguous().numpy()).save(path)
        paths.append(path)
    return paths


def folder_features(folder: str | Path, extractor: Any, mode: str = "clean", batch_size: int = 32,
                    num_workers: int = 0, device: torch.device | str = "cpu") -> np.ndarray:
    """``(N, D)`` features of every image in ``folder`` through clean-fid's resize + ``extractor``."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), extractor, num_workers=int(num_workers), batch_size=int(batch_size),
                               device=torch.device(device), mode=mode, verbose=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``.

    clean-fid's algorithm (``cleanfid.fid.frechet_distance``): when ``S1 S2`` is singular and its square root is not
    finite, ``eps * I`` is added to both covariances; the (numerically) imaginary part of the root is dropped. Our
    own copy because clean-fid 0.1.35 calls ``scipy.linalg.sqrtm(..., disp=False)``, which SciPy >= 1.16 removed.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_feats(gen: np.ndarray, ref: np.ndarray) -> float:
    """FID of two feature sets ``(N, D)``: :func:`frechet_distance` of their means and (ddof 1) covariances."""
    return frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))


def kid_from_feats(gen: np.ndarray, ref: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """clean-fid's KID (``kernel_distance``) with numpy's global RNG seeded by ``seed`` (and restored after)."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(int(seed))
    try:
        return float(kernel_distance(ref, gen, num_subsets=int(subsets), max_subset_size=int(subset_size)))
    finally:
        np.random.set_state(state)


def compute_fid_kid(generated_dir: str | Path, reference_dir: str | Path, metrics: Sequence[str] = ("fid", "kid"),
                    feature_extractor: str = "inception_v3", mode: str = "clean", batch_size: int = 32,
                    num_workers: int = 0, device: str = "cpu", weights_dir: str = "/tmp", kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0, extractor: Any = None) -> FIDResult:
    """FID and/or KID of the images in ``generated_dir`` against those in ``reference_dir`` (see module docstring).

    Raises:
        ConfigError: unknown metric or mode, a missing / empty folder (``fid.reference_dir``), too few images
            (FID needs >= 2 per set for a covariance, KID >= 2 per subset).
    """
    wanted = [m for m in metrics]
    for m in wanted:
        require_choice(m, ("fid", "kid"), "metrics")
    require_choice(mode, FID_MODES, "fid.mode")
    ref = Path(str(reference_dir)).expanduser() if reference_dir else None
    require(ref is not None and ref.is_dir(), "fid.reference_dir",
            f"must be a folder of reference images for {'/'.join(wanted)}, got {reference_dir!r}")
    n_ref, n_gen = len(list_images(ref)), len(list_images(generated_dir))
    require(n_ref >= 2, "fid.reference_dir", f"{ref} holds {n_ref} images ({', '.join(IMAGE_EXTENSIONS)}); need >= 2")
    require(n_gen >= 2, "metrics", f"FID/KID need >= 2 generated images, got {n_gen}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if extractor is None:  # (an extractor built earlier, e.g. at start-up, is used as is)
        extractor = build_extractor(str(feature_extractor), mode, dev, weights_dir)
    gen_feats = folder_features(generated_dir, extractor, mode, batch_size, num_workers, dev)
    ref_feats = folder_features(ref, extractor, mode, batch_size, num_workers, dev)
    fid = kid = None
    if "fid" in wanted:
        fid = fid_from_feats(gen_feats, ref_feats)
    if "kid" in wanted:
        kid = kid_from_feats(gen_feats, ref_feats, kid_subsets, kid_subset_size, seed)
    return FIDResult(fid=fid, kid=kid, num_generated=n_gen, num_reference=n_ref, feature_dim=int(gen_feats.shape[1]))
