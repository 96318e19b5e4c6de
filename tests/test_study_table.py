"""The study table is rebuilt from run logs: per-method mean ± std over seeds, base from val_start, DPG columns."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("study_make_table", REPO_ROOT / "experiments" / "shapes_geneval" /
                                              "make_table.py")
make_table = importlib.util.module_from_spec(spec)
sys.modules["study_make_table"] = make_table
spec.loader.exec_module(make_table)


def _run(study, method, seed, start, end, dpg=None):
    run = study / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"val_start": {"geneval/overall": start},
                                                  "val_end": {"geneval/overall": end}, "steps": 25, "seconds": 100}))
    if dpg is not None:
        (run / "dpg").mkdir()
        (run / "dpg" / "dpg_results.json").write_text(json.dumps({"overall": dpg}))


def test_table_averages_seeds_and_takes_the_base_from_val_start(tmp_path):
    study = tmp_path / "study"
    _run(study, "HT-GRPO", 0, 0.10, 0.30, dpg=40.0)
    _run(study, "HT-GRPO", 1, 0.20, 0.40, dpg=50.0)
    _run(study, "GRPO", 0, 0.10, 0.20)
    _run(study, "GRPO", 1, 0.20, 0.20)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_table.START}\nold\n{make_table.END}\noutro\n")
    table = make_table.write_table(study, readme)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "**0.150 ± 0.071**" in rows["Base (warm start)"]  # one val_start per seed, not per method
    assert "**0.350 ± 0.071**" in rows["HT-GRPO"] and "45.0 ± 7.1" in rows["HT-GRPO"]
    assert "0.200 ± 0.000" in rows["HT-GRPO"]  # Δ overall per seed: +0.2, +0.2
    assert list(rows)[1:] == ["Base (warm start)", "GRPO", "HT-GRPO"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
