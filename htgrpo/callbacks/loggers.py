"""Logger backends (``logger=tensorboard | wandb | mlflow | csv``): what each receives, and the MLflow logger's
construction.

Where the callbacks' histograms go:

- TensorBoard: ``SummaryWriter.add_histogram(tag, values, step)``;
- Weights & Biases: ``run.log({tag: wandb.Histogram(values), "trainer/global_step": step})`` (Lightning's
  ``WandbLogger`` plots against ``trainer/global_step``);
- MLflow has no histogram type: each tag becomes summary metrics ``<tag>/{mean,std,min,p05,p50,p95,max,count}``
  at the step (:func:`summary_stats`);
- CSV: scalars only, no histograms and no summaries (the per-step CSV stays narrow).

Only rank 0 writes; the callbacks call :func:`log_histograms` there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
"""MLflow >= 3.x refuses a ``file:`` tracking store unless this environment variable is ``true``."""


def mlflow_logger(tracking_uri: str | None = None, **kwargs: Any) -> Any:
    """Lightning's ``MLFlowLogger`` (``conf/logger/mlflow.yaml``). A ``file:`` tracking URI is a local folder
    store: recent MLflow versions keep it in maintenance mode and refuse it without the opt-in environment variable
    ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here for this process (the config asked for that store; a server
    URL or ``sqlite:///...`` is passed through untouched)."""
    from lightning.pytorch.loggers import MLFlowLogger

    if tracking_uri and tracking_uri.startswith("file:") and os.environ.get(MLFLOW_FILE_STORE_OPT_IN) != "true":
        os.environ[MLFLOW_FILE_STORE_OPT_IN] = "true"
        log.info("MLflow: local file store %s (set %s=true for it)", tracking_uri, MLFLOW_FILE_STORE_OPT_IN)
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)

SUMMARY_QUANTILES = {"p05": 0.05, "p50": 0.5, "p95": 0.95}


def summary_stats(values: torch.Tensor) -> dict[str, float]:
    """mean, std (population, ``unbiased=False``; 0 for one value), min, the 5/50/95 % quantiles (linear
    interpolation), max and count of a 1-D tensor of finite values."""
    x = values.detach().double().flatten().cpu()
    stats = {"mean": float(x.mean()), "std": float(x.std(unbiased=False)), "min": float(x.min())}
    q = torch.quantile(x, torch.tensor(list(SUMMARY_QUANTILES.values()), dtype=torch.float64))
    stats.update({name: float(v) for name, v in zip(SUMMARY_QUANTILES, q)})
    stats.update({"max": float(x.max()), "count": float(x.numel())})
    return stats


def histogram_backends(trainer: Any) -> list[tuple[str, Any]]:
    """The trainer's loggers that receive histograms or their summaries, as (kind, logger) with kind
    ``tensorboard`` | ``wandb`` | ``mlflow``; the others (CSV) are left out."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    kinds = ((TensorBoardLogger, "tensorboard"), (WandbLogger, "wandb"), (MLFlowLogger, "mlflow"))
    return [(kind, lg) for lg in trainer.loggers for cls, kind in kinds if isinstance(lg, cls)]


def log_histograms(backends: list[tuple[str, Any]], histograms: Mapping[str, torch.Tensor], step: int) -> None:
    """Write each ``tag -> values`` (1-D, finite, non-empty) to every backend in the form it supports."""
    if not histograms:
        return
    for kind, lg in backends:
        if kind == "tensorboard":
            for tag, values in histograms.items():
                lg.experiment.add_histogram(tag, values, step)
        elif kind == "wandb":
            import wandb

            payload: dict[str, Any] = {tag: wandb.Histogram(values.numpy()) for tag, values in histograms.items()}
            payload["trainer/global_step"] = step
            lg.experiment.log(payload)
        elif kind == "mlflow":
            lg.log_metrics({f"{tag}/{name}": v for tag, values in histograms.items()
                            for name, v in summary_stats(values).items()}, step=step)
