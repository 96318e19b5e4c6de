"""experiments/benchmarks/sampler_speed.py end to end at a tiny size: the geometry row, every cache mode, the last
line the issue's check reads, and identical restricted/full-vocabulary samples."""

from __future__ import annotations

import re

import pytest

from conftest import REPO_ROOT, load_script

speed = load_script("bench_sampler_speed", REPO_ROOT / "experiments" / "benchmarks" / "sampler_speed.py")


@pytest.mark.parametrize("sampler", ["emerge", "maskgit"])
def test_sampler_speed_prints_rows_caches_and_the_ratio_line(sampler, capsys, tmp_path):
    report = speed.main(["--geometry", "real", "--d-model", "32", "--n-layers", "1", "--batch-size", "2",
                         "--steps", "12", "--repeats", "1", "--warmup", "0", "--threads", "1", "--sampler", sampler,
                         "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"cached vs exact: \d+\.\d\dx", out[-1])
    assert report["rows"]["real"]["identical_samples"] and report["sampler"] == sampler
    modes = report["cache"]["modes"]
    assert set(modes) == {"ml_cache", "ml_cache_fresh", "kv_refresh"}
    assert all(0 < m["positions_computed_share"] <= 1 for m in modes.values())
    if sampler == "emerge":  # reads only what unmasks: fewer positions than the released cache's 47%-ish
        assert modes["kv_refresh"]["positions_computed_share"] < modes["ml_cache_fresh"]["positions_computed_share"]
    assert (tmp_path / "r.json").exists()


def test_cache_positions_counts_each_mode_per_sampler():
    """cache_positions.py on the shipped warm start, 4 prompts: emerge's kv_refresh computes less than ML-Cache, MaskGIT's
    more (it reads every masked position), and a larger refresh share never computes more."""
    positions = load_script("bench_cache_positions", REPO_ROOT / "experiments" / "benchmarks" / "cache_positions.py")
    out = positions.main(["--limit", "4", "--batch-size", "4"])
    emerge, maskgit = out[("emerge", 12)], out[("maskgit", 12)]
    assert all(0 < v <= 1 for shares in out.values() for v in shares.values())
    assert emerge["kv_refresh@0.25"] < emerge["ml_cache"] < emerge["ml_cache_fresh"]
    assert maskgit["kv_refresh@0.25"] > maskgit["ml_cache"]
    assert emerge["kv_refresh@0.5"] <= emerge["kv_refresh@0.25"]
