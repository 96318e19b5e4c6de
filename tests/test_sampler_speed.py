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
