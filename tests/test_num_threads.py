"""`num_threads` (issue 21 item 5): torch's CPU threads are set from the config at start-up, not from the caller's
OMP_NUM_THREADS."""

from __future__ import annotations

import pytest
import torch

from htgrpo._hydra import apply_num_threads
from htgrpo.config import ConfigError


def test_apply_num_threads_sets_torch_threads_and_null_leaves_them():
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(None) is None and torch.get_num_threads() == before
        target = 2 if before == 1 else 1
        assert apply_num_threads(target) == target
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_num_threads_names_the_key(bad):
    with pytest.raises(ConfigError, match="num_threads"):
        apply_num_threads(bad)


@pytest.mark.parametrize("experiment", ["shapes_ht", "shapes_grpo", "shapes_maskgrpo", "shapes_pretrain",
                                        "shapes_mar_pretrain", "shapes_mar_grpo", "shapes_mar_grpo_plain"])
def test_shapes_experiments_run_on_one_thread(compose, experiment):
    assert compose("fit", [f"experiment={experiment}"]).num_threads == 1


def test_fit_applies_num_threads_before_building(compose, tmp_path, monkeypatch):
    import htgrpo.fit as fit

    seen = []
    monkeypatch.setattr(fit, "apply_num_threads", lambda value: seen.append(value))

    def stop(*args, **kwargs):
        raise RuntimeError("stop after start-up")

    monkeypatch.setattr(fit.L, "seed_everything", stop)
    cfg = compose("fit", ["experiment=shapes_ht", f"hydra.run.dir={tmp_path}"])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="stop after start-up"):
        fit.run(cfg)
    assert seen == [1]
