"""The default warm start lands in the target range (slow: ~10 minutes on 2 CPU cores; `pytest -m slow`)."""

from __future__ import annotations

import json

import pytest

from test_cli import run_cli


@pytest.mark.slow
def test_default_warm_start_scores_between_quarter_and_three_quarters(tmp_path):
    run_dir = tmp_path / "pretrain"
    run_cli("htgrpo.fit", ["experiment=shapes_pretrain", f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seconds"] < 600
    assert 0.25 <= summary["val_end"]["geneval/overall"] <= 0.75, summary
