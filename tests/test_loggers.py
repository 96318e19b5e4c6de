"""logger=tensorboard | wandb | mlflow: the per-stage credit histograms reach every backend in the form it supports
(TensorBoard and W&B histograms, MLflow summary metrics), offline: W&B with WANDB_MODE=offline, MLflow on a local
file store. One fit writes all three, and their numbers are checked against each other and against numpy."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict

from htgrpo.callbacks.loggers import summary_stats
from htgrpo.callbacks.rl import CreditHistograms
from htgrpo.config import instantiate_node
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from test_cli import run_cli
from test_ht_grpo import TINY_RL, WORLD, make_module

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

STAGE_TAGS = [f"credit/{stage}/{name}" for stage in ("global", "structure", "refine")
              for name in ("weights", "token_advantages", "ratios")] + ["credit/structure_decode_steps"]


def test_summary_stats_match_numpy():
    values = torch.from_numpy(np.random.default_rng(0).normal(2.0, 3.0, 1001).astype(np.float32))
    x = values.double().numpy()
    got = summary_stats(values)
    want = {"mean": x.mean(), "std": x.std(), "min": x.min(), "p05": np.percentile(x, 5), "p50": np.median(x),
            "p95": np.percentile(x, 95), "max": x.max(), "count": 1001.0}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    assert summary_stats(torch.tensor([4.0]))["std"] == 0.0


# ---- reading each backend back -----------------------------------------------------------------------------------
def tensorboard_histograms(run_dir: Path) -> dict[str, tuple[int, float, float, float]]:
    """tag -> (count, sum, min, max) of the last histogram event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"histograms": 0})
        acc.Reload()
        for tag in acc.Tags().get("histograms", []):
            h = acc.Histograms(tag)[-1].histogram_value
            out[tag] = (int(h.num), h.sum, h.min, h.max)
    return out


def wandb_offline_history(run_dir: Path) -> list[dict[str, object]]:
    """The history rows of the offline run file ``wandb/offline-run-*/run-*.wandb``: a LevelDB-log-format file
    (7-byte header ``:W&B`` + magic + version; 32 KiB blocks of records with a 7-byte header: crc32, length,
    type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, chunks, pending = 7, [], b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 1:
            chunks.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            chunks.append(pending + payload)
    rows = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_histograms(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """tag -> {"values": bin counts, "bins": bin edges} of the wandb.Histogram entries."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in wandb_offline_history(run_dir):
        for key, value in row.items():
            tag, _, part = key.rpartition("/")
            if part in ("values", "bins") and row.get(f"{tag}/_type") == "histogram":
                out.setdefault(tag, {})[part] = value
    return out


def mlflow_metrics(tracking_uri: str) -> dict[str, float]:
    """Last value of every metric of the single run in the store."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads a file: store only with this opt-in
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return dict(run.data.metrics)


def check_backends_agree(run_dir: Path, mlflow_uri: str) -> None:
    tb = tensorboard_histograms(run_dir)
    wb = wandb_histograms(run_dir)
    # wandb's offline writer is a separate service process: on a loaded machine its last records can reach the file
    # a moment after wandb.finish() returns (seen once in CI beside two training runs), so wait for them (<= 60 s)
    deadline = time.monotonic() + 60
    while not set(STAGE_TAGS) <= set(wb) and time.monotonic() < deadline:
        time.sleep(0.5)
        wb = wandb_histograms(run_dir)
    ml = mlflow_metrics(mlflow_uri)
    assert set(STAGE_TAGS) <= set(tb), sorted(tb)
    for tag in STAGE_TAGS:
        count, total, lo, hi = tb[tag]
        # W&B: a 64-bin histogram (np.histogram) over [min, max] of the same values; [v - 0.5, v + 0.5] when all
        # values are one v (e.g. every ratio is 1 at the first update)
        assert sum(wb[tag]["values"]) == count, tag
        edges = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        assert (wb[tag]["bins"][0], wb[tag]["bins"][-1]) == pytest.approx(edges, abs=1e-6), tag
        # MLflow: the summary metrics of the same values
        assert ml[f"{tag}/count"] == count
        assert ml[f"{tag}/mean"] == pytest.approx(total / count, rel=1e-5, abs=1e-6), tag
        assert (ml[f"{tag}/min"], ml[f"{tag}/max"]) == pytest.approx((lo, hi), abs=1e-6), tag
        assert ml[f"{tag}/min"] <= ml[f"{tag}/p05"] <= ml[f"{tag}/p50"] <= ml[f"{tag}/p95"] <= ml[f"{tag}/max"]


def test_credit_histograms_reach_tensorboard_wandb_offline_and_mlflow_file_store(compose, tmp_path, monkeypatch):
    """The three logger configs of conf/logger/, instantiated as fit does, on one tiny HT-GRPO step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # mlflow_logger must opt in itself; restored after
    loggers = []
    for name in ("tensorboard", "wandb", "mlflow"):
        cfg = compose("fit", ["experiment=shapes_ht", f"logger={name}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
        loggers.append(instantiate_node(cfg, f"logger.{name}"))
    mlflow_uri = f"file:{tmp_path}/mlruns"
    module = make_module()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=loggers,
                        callbacks=[CreditHistograms(every_n_steps=1)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        accelerator="cpu")
    trainer.fit(module, datamodule=PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2))
    for lg in loggers:
        lg.finalize("success")
    import wandb

    wandb.finish()
    check_backends_agree(tmp_path, mlflow_uri)


@pytest.mark.slow
def test_fit_cli_with_each_logger_writes_the_credit_histograms(tmp_path, monkeypatch):
    """``python -m htgrpo.fit experiment=shapes_ht logger=wandb`` (WANDB_MODE=offline) and ``logger=mlflow``, as a
    user runs them (all three loggers in one run, tiny sizes)."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_RL if not o.startswith("logger=")]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the logger config must opt in by itself
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *overrides, "logger=[tensorboard,wandb,mlflow]",
                           f"hydra.run.dir={run_dir}", "trainer.limit_train_batches=1",
                           "callbacks.credit_histograms.every_n_steps=1"], tmp_path)
    check_backends_agree(run_dir, f"file:{run_dir}/mlruns")
