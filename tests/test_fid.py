"""FID / KID through clean-fid with small custom feature extractors (offline), and `evaluate metrics=[...]`."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from htgrpo.config import ConfigError
from htgrpo.evaluation.fid import compute_fid_kid, save_images


class MeanGrey(torch.nn.Module):
    """1-D feature: the mean pixel value / 255 (clean-fid hands float images in 0..255, resized to 299)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] / 255.0


class MeanColour(torch.nn.Module):
    """3-D feature: per-channel mean / 255."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) / 255.0


def _constant_images(levels, size: int = 16) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), v, dtype=torch.uint8) for v in levels])


def _kid_by_hand(x: list[float], y: list[float]) -> float:
    """Unbiased MMD^2, kernel (a*b/d + 1)^3 with d = 1, on the full sets (m = n = 3: every subset is the full set)."""
    k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(a, b) for a, b in itertools.permutations(x, 2)) / (m * (m - 1))
    yy = sum(k(a, b) for a, b in itertools.permutations(y, 2)) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * m)
    return xx + yy - 2 * xy


def test_fid_and_kid_by_hand_on_constant_images(tmp_path):
    gen, ref = [10, 20, 30], [50, 70, 90]
    save_images(_constant_images(gen), tmp_path / "gen")
    save_images(_constant_images(ref, size=24), tmp_path / "ref")
    res = compute_fid_kid(tmp_path / "gen", tmp_path / "ref", ("fid", "kid"), feature_extractor=f"{__name__}.MeanGrey")
    # 1-D features g = (10, 20, 30)/255, r = (50, 70, 90)/255: FID = (mu_g - mu_r)^2 + (sd_g - sd_r)^2 (ddof 1)
    mu_g, mu_r, sd_g, sd_r = 20 / 255, 70 / 255, 10 / 255, 20 / 255
    assert res.fid == pytest.approx((mu_g - mu_r) ** 2 + (sd_g - sd_r) ** 2, rel=1e-4)
    assert res.kid == pytest.approx(_kid_by_hand([v / 255 for v in gen], [v / 255 for v in ref]), rel=1e-4, abs=1e-7)
    assert (res.num_generated, res.num_reference, res.feature_dim) == (3, 3, 1)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_the_shift(tmp_path):
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.integers(0, 200, (8, 3, 16, 16), dtype=np.uint8))
    save_images(base, tmp_path / "ref")
    fids = []
    for shift in (0, 20, 50):
        folder = tmp_path / f"gen{shift}"
        save_images(base + shift, folder)
        fids.append(compute_fid_kid(folder, tmp_path / "ref", ("fid",), feature_extractor=f"{__name__}.MeanColour").fid)
    assert abs(fids[0]) < 1e-6 and fids[0] < fids[1] < fids[2]


def test_bad_fid_settings_name_their_key(tmp_path):
    save_images(_constant_images([1, 2]), tmp_path / "gen")
    with pytest.raises(ConfigError, match="fid.reference_dir"):
        compute_fid_kid(tmp_path / "gen", tmp_path / "nope", ("fid",), feature_extractor=f"{__name__}.MeanGrey")
    with pytest.raises(ConfigError, match="fid.feature_extractor"):
        compute_fid_kid(tmp_path / "gen", tmp_path / "gen", ("fid",), feature_extractor="no.such.extractor")
    with pytest.raises(ConfigError, match="fid.mode"):
        compute_fid_kid(tmp_path / "gen", tmp_path / "gen", ("fid",), mode="fast")


def _without_hydra(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def test_evaluate_with_fid_kid_and_reward_metrics(compose, tmp_path):
    from htgrpo.evaluate import run

    from htgrpo.data.prompt_sets import ShapesPromptStream
    from htgrpo.config import instantiate_node

    ref = tmp_path / "ref"
    cfg = compose("evaluate", ["benchmark=shapes_geneval", "policy=oracle", "benchmark.prompts.per_task=2",
                               "benchmark.images_per_prompt=2", f"paths.output_dir={tmp_path / 'run'}",
                               "metrics=[fid,kid,jpeg_compressibility,shapes]", f"fid.reference_dir={ref}",
                               f"fid.feature_extractor={__name__}.MeanColour", "fid.kid_subset_size=8"])
    world = instantiate_node(cfg, "world")
    stream = ShapesPromptStream(world, seed=7, with_images=True)
    save_images(torch.stack([stream[i].image for i in range(10)]), ref)  # ground-truth scenes as the reference
    results = run(_without_hydra(cfg))
    metrics = results["metrics"]
    assert json.loads((tmp_path / "run" / "geneval_results.json").read_text())["metrics"] == metrics
    n = len(list((tmp_path / "run" / "fid_images").glob("*.png")))
    assert n == results["num_images"] > 2  # every generated image, saved once for FID
    assert math.isfinite(metrics["fid"]) and metrics["fid"] >= 0 and math.isfinite(metrics["kid"])
    assert metrics["fid/num_reference"] == 10
    assert metrics["jpeg_compressibility"] < 0 and metrics["jpeg_compressibility/failed"] == 0
    assert metrics["shapes"] == pytest.approx(results["overall"], abs=1e-6)  # oracle: the reward = the benchmark (1.0)
    assert metrics["shapes/geneval/correct"] == pytest.approx(1.0)


@pytest.mark.parametrize("overrides, key", [
    (["metrics=[nope]"], "metrics"),
    (["metrics=[fid]"], "fid.reference_dir"),
    (["metrics=[kid]", "fid.reference_dir=.", "fid.feature_extractor=no.such.extractor"], "fid.feature_extractor"),
    (["metrics=[jpeg_compressibility]", "+metric_options.jpeg_compressibility.quality=0"],
     "metric_options.jpeg_compressibility.quality"),
])
def test_bad_metrics_fail_at_startup_naming_the_key(compose, tmp_path, overrides, key):
    from htgrpo.evaluate import run

    cfg = compose("evaluate", ["policy=oracle", f"paths.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as err:
        run(_without_hydra(cfg))
    assert str(err.value).startswith(key)
    if key == "metrics":
        assert "valid: fid, kid" in str(err.value) and "clip_score" in str(err.value)
