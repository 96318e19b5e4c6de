"""Structure-influence probe (issue 21): variance decomposition against hand-computed values, the clamped
conditional sampler and the single-token resampler on a fake policy, and (slow) the script end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from htgrpo.evaluation.structure_influence import (
    VarianceComponents,
    bootstrap_ratio,
    bootstrap_share,
    clamped_logits_fn,
    influence_share,
    one_way_components,
    pooled_share,
    resample_single_tokens,
)
from htgrpo.policies.sampling import emerge_sample, maskgit_sample
from htgrpo.policies.t2i_layout import MASKED

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# variance decomposition
# ---------------------------------------------------------------------------------------------------------------
def test_one_way_components_hand_computed():
    # rows: (1, 0), (1, 1), (0, 0). Row variances (ddof 1): 0.5, 0, 0 -> within = 1/6.
    # Row means 0.5, 1, 0: variance (ddof 1) 0.25; between = 0.25 - (1/6)/2 = 1/6; total 1/3.
    c = one_way_components(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert c.within == pytest.approx(1 / 6)
    assert c.between == pytest.approx(1 / 6)
    assert c.total == pytest.approx(1 / 3)
    assert (c.rows, c.draws) == (3, 2)
    assert pooled_share([c]) == pytest.approx(0.5)


def test_one_way_components_extremes():
    # each row constant, rows differ: everything is explained by the held part
    held = one_way_components(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert held.within == 0 and held.between == pytest.approx(0.5)
    assert pooled_share([held]) == 1.0
    # identical rows: nothing is explained; the unbiased between estimate is -within/M
    rows = one_way_components(np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert rows.within == pytest.approx(0.5) and rows.between == pytest.approx(-0.25)
    assert pooled_share([rows]) == 0.0   # clipped at 0


@pytest.mark.parametrize("bad", [np.zeros((1, 3)), np.zeros((3, 1)), np.zeros(4), np.array([[1.0, np.nan], [0, 0]])])
def test_one_way_components_rejects_bad_tables(bad):
    with pytest.raises(ValueError):
        one_way_components(bad)


def test_pooled_share_sums_then_divides():
    a = VarianceComponents(between=1 / 6, within=1 / 6, rows=3, draws=2)
    b = VarianceComponents(between=-0.05, within=0.1, rows=3, draws=2)
    # (1/6 - 0.05) / (1/3 + 0.05), not the mean of the per-prompt ratios
    assert pooled_share([a, b]) == pytest.approx((1 / 6 - 0.05) / (1 / 3 + 0.05))
    assert pooled_share([a, b], np.array([2.0, 0.0])) == pytest.approx(0.5)
    flat = VarianceComponents(between=0.0, within=0.0, rows=2, draws=2)
    assert math.isnan(pooled_share([flat]))
    assert math.isnan(pooled_share([]))


def test_bootstrap_ratio_bounds_and_degenerate_cases():
    # two prompts, ratios 1 and 0: draws are 1, 0.5 or 0
    lo, hi = bootstrap_ratio(np.array([1.0, 0.0]), np.array([1.0, 1.0]), resamples=2000, seed=3)
    assert lo == 0.0 and hi == 1.0
    # identical prompts: every draw equals the point estimate
    lo, hi = bootstrap_ratio(np.array([0.3, 0.3, 0.3]), np.array([1.0, 1.0, 1.0]), resamples=200)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    assert all(math.isnan(v) for v in bootstrap_ratio(np.array([1.0]), np.array([1.0])))
    # same seed, same interval
    num, den = np.array([0.1, 0.5, 0.2, 0.9]), np.array([1.0, 1.0, 2.0, 1.0])
    assert bootstrap_ratio(num, den, 500, seed=1) == bootstrap_ratio(num, den, 500, seed=1)


def test_bootstrap_share_clips_and_contains_point():
    comps = [VarianceComponents(0.2, 0.1, 4, 4), VarianceComponents(0.05, 0.2, 4, 4),
             VarianceComponents(0.1, 0.1, 4, 4), VarianceComponents(-0.01, 0.3, 4, 4)]
    lo, hi = bootstrap_share(comps, 2000, seed=0)
    assert 0.0 <= lo <= pooled_share(comps) <= hi <= 1.0


def test_influence_share_hand_computed():
    influence = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    structure = np.array([[True, False, False, False], [False, False, True, True]])
    share, chance = influence_share(influence, structure)
    assert share == pytest.approx(3 / 4)       # (1 + 2) of 4 in S
    assert chance == pytest.approx(3 / 8)      # |S| / N over both rollouts
    assert math.isnan(influence_share(np.zeros((1, 4)), structure[:1])[0])
    with pytest.raises(ValueError):
        influence_share(influence, structure[:1])


# ---------------------------------------------------------------------------------------------------------------
# conditional sampling on a fake policy
# ---------------------------------------------------------------------------------------------------------------
class FakePolicy:
    """Logits that depend on the visible canvas (so conditioning matters); records every canvas it is shown."""

    device = torch.device("cpu")

    def __init__(self, num_tokens: int = 12, codebook: int = 5):
        self.n, self.c = num_tokens, codebook
        self.weight = torch.randn(codebook + 1, codebook, generator=torch.Generator().manual_seed(0))
        self.seen: list[torch.Tensor] = []

    def guided_image_logits(self, codes, prompt, guidance_scale=0.0, positions=None, full_vocab=False):
        self.seen.append(codes.clone())
        # every position's logits: a function of the previous token's code (MASKED -> row `codebook`)
        prev = torch.roll(codes, 1, dims=1)
        prev = torch.where(prev == MASKED, torch.full_like(prev, self.c), prev)
        logits = self.weight[prev] * 3.0
        if positions is not None:
            logits = logits.gather(1, positions[..., None].expand(-1, -1, self.c))
        return logits


@pytest.mark.parametrize("sample", [maskgit_sample, emerge_sample])
def test_clamped_sampler_keeps_fixed_tokens_and_shows_them_from_the_start(sample):
    policy = FakePolicy()
    g = torch.Generator().manual_seed(1)
    B, N = 6, policy.n
    fixed_codes = torch.randint(0, policy.c, (B, N), generator=g)
    fixed = torch.rand(B, N, generator=g) < 0.4
    fn = clamped_logits_fn(policy, None, fixed_codes, fixed)
    out = sample(fn, torch.full((B, N), MASKED), num_steps=6, guidance_scale=0.0, generator=g)
    assert torch.equal(out.codes[fixed], fixed_codes[fixed])
    assert bool((out.codes != MASKED).all())
    assert policy.seen, "the policy was never called"
    for canvas in policy.seen:   # the fixed tokens are visible at every step, the first included
        assert torch.equal(canvas[fixed], fixed_codes[fixed])
    # the free tokens are drawn: over several seeds they are not always the same
    draws = {tuple(sample(fn, torch.full((B, N), MASKED), num_steps=6, guidance_scale=0.0,
                          generator=torch.Generator().manual_seed(s)).codes[~fixed].tolist()) for s in range(4)}
    assert len(draws) > 1


def test_resample_single_tokens_changes_only_its_token():
    policy = FakePolicy(num_tokens=8, codebook=4)
    codes = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = resample_single_tokens(policy, None, codes, guidance_scale=0.0, temperature=0.0, generator=None)
    assert out.shape == (8, 8)
    canvas = policy.seen[-1]
    for j in range(8):
        others = torch.arange(8) != j
        assert torch.equal(out[j, others], codes[others])
        assert canvas[j, j] == MASKED and torch.equal(canvas[j, others], codes[others])
        # temperature 0: the argmax of the conditional given the previous token
        prev = int(codes[j - 1])
        assert int(out[j, j]) == int(policy.weight[prev].argmax())


# ---------------------------------------------------------------------------------------------------------------
# the script, end to end (tiny)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_structure_influence_script_runs(tmp_path):
    out = tmp_path / "probe"
    cmd = [sys.executable, str(REPO / "experiments" / "diagnostics" / "structure_influence.py"),
           "probe.prompts_per_task=1", "probe.rollouts=2", "probe.resamples=2", "probe.bootstrap=50",
           "sampler.num_steps=4", f"hydra.run.dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "share S" in proc.stdout
    result = json.loads((out / "structure_influence.json").read_text())
    assert [r["task"] for r in result["summary"]][-1] == "all"
    assert len(result["prompts"]) == 6 and len(result["prompts"][0]["structure_fixed"]) == 2
    assert (out / "structure_influence.png").stat().st_size > 0


@pytest.mark.slow
def test_structure_influence_script_runs_on_the_mmada_layout(tmp_path):
    """A tiny random checkpoint in MMaDA's released format, its sampler and a continuous reward."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    ckpt = tmp_path / "mmada"
    made = subprocess.run([sys.executable, "-m", "htgrpo.tiny_checkpoint", "mmada", str(ckpt)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    overrides = made.stdout.strip().splitlines()[-1].split()
    out = tmp_path / "probe"
    cmd = [sys.executable, str(REPO / "experiments" / "diagnostics" / "structure_influence.py"), *overrides,
           "sampler=mmada", "sampler.num_steps=4", "probe.score=reward", "reward=jpeg_compressibility",
           "probe.prompts_per_task=1", "probe.rollouts=2", "probe.resamples=2", "probe.bootstrap=50",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "structure_influence.json").read_text())
    assert result["sampler"]["name"] == "maskgit" and result["settings"]["score"] == "reward"
    assert len(result["prompts"]) == 6


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "structure_influence_script", REPO / "experiments" / "diagnostics" / "structure_influence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key,value", [("rollouts", 1), ("resamples", 1.5), ("score", "loss"),
                                       ("partition.fraction", 0.0), ("partition.key", "random")])
def test_probe_settings_name_the_bad_key(key, value):
    from omegaconf import OmegaConf

    from htgrpo.config import ConfigError

    script = _load_script()
    node = OmegaConf.load(REPO / "conf" / "structure_influence.yaml").probe
    assert script.ProbeSettings.from_config(node).fraction == 0.25   # the shipped defaults pass
    OmegaConf.update(node, key, value)
    with pytest.raises(ConfigError, match=f"probe.{key}"):
        script.ProbeSettings.from_config(node)


def test_pick_prompts_takes_per_task_in_task_order():
    from types import SimpleNamespace

    script = _load_script()
    prompts = [SimpleNamespace(group=g, key=f"{g}{i}") for g in ("a", "b", "c") for i in range(4)]
    chosen = script.pick_prompts(prompts, 2, seed=0)
    assert [p.group for p in chosen] == ["a", "a", "b", "b", "c", "c"]
    assert len({p.key for p in chosen}) == 6
    assert chosen == script.pick_prompts(prompts, 2, seed=0)


def test_probe_config_composes_with_the_experiments_sampler(compose):
    cfg = compose("structure_influence", [])
    assert cfg.sampler.name == "emerge" and cfg.sampler.num_steps == 12   # conf/experiment/shapes_ht.yaml's rollouts
    assert cfg.policy.init == "pretrained" and cfg.probe.partition.fraction == 0.25
    assert compose("structure_influence", ["sampler=maskgit"]).sampler.num_steps == 12
