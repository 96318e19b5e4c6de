"""``python -m htgrpo.generate``: images in the official GenEval and DPG-Bench folder layouts, for any policy."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import shared_data_dir
from htgrpo.config import ConfigError
from htgrpo.generate import image_grid, run

GENEVAL = shared_data_dir() / "geneval" / "evaluation_metadata.jsonl"
DPG_PROMPTS = shared_data_dir() / "dpg_bench" / "prompts"
SHAPES_POLICY = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
                 "sampler.num_steps=2", "progress=false"]

# Only the tests that read the official files skip without them (a fresh clone still runs the rest).
needs_geneval = pytest.mark.skipif(not GENEVAL.exists(), reason=f"official GenEval metadata not found at {GENEVAL}")
needs_dpg = pytest.mark.skipif(not DPG_PROMPTS.is_dir(), reason=f"official DPG-Bench prompts not found at {DPG_PROMPTS}")


def test_image_grid_is_row_major_2x2():
    # four 1x2-pixel images with values 0..3 -> a 2x4 canvas [[0 0 1 1], [2 2 3 3]]
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 1, 2)
    grid = image_grid(images, nrow=2)
    assert grid.shape == (3, 2, 4)
    assert grid[0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]


@needs_geneval
def test_geneval_layout_with_a_shapes_policy(compose, tmp_path):
    out = tmp_path / "geneval"
    cfg = compose("generate", [*SHAPES_POLICY, f"prompts.path={GENEVAL}", f"out={out}", "limit=3",
                               "images_per_prompt=2", "batch_size=4"])
    assert run(cfg) == {"prompts": 3, "written": 3, "skipped": 0}
    official = [json.loads(line) for line in GENEVAL.read_text().splitlines()[:3]]
    for i in range(3):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == official[i]
        pngs = sorted(p.name for p in (folder / "samples").iterdir())
        assert pngs == ["0000.png", "0001.png"]
        px = cfg.world.grid_size * cfg.world.cell_px  # ShapesWorld image size
        assert Image.open(folder / "samples" / "0000.png").size == (px, px)
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    # a second run finds everything written and skips it (resume)
    assert run(cfg) == {"prompts": 3, "written": 0, "skipped": 3}


@needs_geneval
@pytest.mark.parametrize("cache", ["kv_refresh", "ml_cache"])
def test_generate_with_a_cached_sampler(compose, tmp_path, cache):
    """`sampler.cache=...` reaches htgrpo.generate: 12 steps, so cached steps run, and every image is written."""
    out = tmp_path / cache
    cfg = compose("generate", [*SHAPES_POLICY, "sampler.num_steps=12", f"sampler.cache={cache}",
                               f"prompts.path={GENEVAL}", f"out={out}", "limit=2", "images_per_prompt=2"])
    assert run(cfg) == {"prompts": 2, "written": 2, "skipped": 0}
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]


@needs_dpg
def test_dpg_layout_one_2x2_grid_per_prompt_id(compose, tmp_path):
    out = tmp_path / "dpg"
    cfg = compose("generate", [*SHAPES_POLICY, "prompts=dpg", f"prompts.path={DPG_PROMPTS}", f"out={out}", "limit=2"])
    run(cfg)
    from htgrpo.generate import load_prompts

    ids = [p.key for p in load_prompts("dpg", str(DPG_PROMPTS), limit=2)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in ids)
    px = cfg.world.grid_size * cfg.world.cell_px
    assert Image.open(out / f"{ids[0]}.png").size == (2 * px, 2 * px)  # 2 x 2 images
    bad = compose("generate", [*SHAPES_POLICY, "prompts=dpg", f"prompts.path={DPG_PROMPTS}", f"out={out}",
                               "images_per_prompt=3"])
    with pytest.raises(ConfigError, match="^images_per_prompt: DPG-Bench scores a 2x2 grid"):
        run(bad)


def test_missing_prompt_file_fails_with_the_key(compose, tmp_path):
    cfg = compose("generate", [*SHAPES_POLICY, f"prompts.path={tmp_path / 'nope.jsonl'}", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^prompts\.path: .* does not exist"):
        run(cfg)


@needs_geneval
def test_generate_with_a_tiny_dimoo_checkpoint(compose, tmp_path):
    """The README command: `python -m htgrpo.generate <tiny_checkpoint overrides> prompts=geneval ...`."""
    from htgrpo.tiny_checkpoint import write_tiny_dimoo

    overrides = write_tiny_dimoo(tmp_path / "dimoo").split()
    out = tmp_path / "images"
    cfg = compose("generate", [*overrides, "sampler=dimoo", "sampler.num_steps=2", f"prompts.path={GENEVAL}",
                               f"out={out}", "limit=2", "images_per_prompt=2", "progress=false"])
    assert run(cfg)["written"] == 2
    img = Image.open(out / "00001" / "samples" / "0001.png")
    assert img.size == (64, 64) and img.mode == "RGB"
