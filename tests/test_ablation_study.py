"""The ablation rows of the ShapesWorld study (issue 21): every row names an experiment that exists and differs
from `shapes_ht` in the one part it ablates; the gain table goes between the ablation markers."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO_ROOT

STUDY = REPO_ROOT / "experiments" / "shapes_geneval"
sys.path.insert(0, str(STUDY))  # run_study / make_table import gain from their own folder


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, STUDY / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_study = _load("ablation_run_study", "run_study.py")
make_table = _load("study_make_table_ablation", "make_table.py")
from test_study_stats import _write_run  # noqa: E402


def test_ablation_rows_name_existing_experiments():
    known = {**run_study.METHODS, **run_study.ABLATION_METHODS}
    assert run_study.ABLATIONS[0] == "HT-GRPO" and {"MaskGRPO", "GRPO"} <= set(run_study.ABLATIONS)
    for row in run_study.ABLATIONS:
        assert (REPO_ROOT / "conf" / "experiment" / f"{known[row]}.yaml").exists(), row


@pytest.mark.parametrize("row,key,value", [
    ("HT-GRPO no stages", "stages", {"n_global": 6, "n_struct": 0, "n_refine": 0}),
    ("HT-GRPO random-mask estimator", "estimator", "unigrpo"),
    ("HT-GRPO alpha 0", "alpha", 0.0),
    ("HT-GRPO alpha 2", "alpha", 2.0),
    ("HT-GRPO alpha 0 phi 0.1", "alpha_phi", (0.0, 0.1)),
])
def test_each_ablation_changes_only_its_part(compose, row, key, value):
    full = compose("fit", ["experiment=shapes_ht"]).algorithm
    ablated = compose("fit", [f"experiment={run_study.ABLATION_METHODS[row]}"]).algorithm
    got = {"stages": {k: ablated.stages[k] for k in ("n_global", "n_struct", "n_refine")},
           "estimator": ablated.estimator.name, "alpha": ablated.credit.alpha,
           "alpha_phi": (ablated.credit.alpha, ablated.partition.fraction)}[key]
    assert got == value
    changed = {k for k in full if full[k] != ablated[k]}
    assert changed == {"stages": {"stages"}, "estimator": {"estimator"}, "alpha": {"credit"},
                       "alpha_phi": {"credit", "partition"}}[key]


def test_ablation_gains_go_between_the_ablation_markers(tmp_path):
    study = tmp_path / "ablation"
    for seed in (0, 1):
        _write_run(study, "HT-GRPO", seed, lambda k, i: False, lambda k, i: True)
        _write_run(study, "HT-GRPO_alpha_0", seed, lambda k, i: False, lambda k, i: False)
    readme = tmp_path / "README.md"
    readme.write_text(f"{make_table.GAIN_START}\nmain\n{make_table.GAIN_END}\n"
                      f"{make_table.ABLATION_START}\nold\n{make_table.ABLATION_END}\n")
    text = make_table.write_gains(study, readme, resamples=200,
                                  markers=(make_table.ABLATION_START, make_table.ABLATION_END))
    assert "| HT-GRPO alpha 0 | 0,1 | +0.000 |" in text and "yes, lower" in text
    doc = readme.read_text()
    assert "main" in doc and "old" not in doc   # the main study's gain table is left alone
