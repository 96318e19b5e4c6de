"""The reward / metric interface: ``(images uint8 (B,3,H,W), records) -> RewardOutput``.

One interface serves RL rewards (``reward=`` in ``htgrpo.fit``) and evaluation metrics (``metrics=[...]`` in
``htgrpo.evaluate``):

* :class:`RewardOutput` — ``scores`` ``(B,)`` float32 (NaN where scoring failed) plus per-component ``(B,)``
  values (GenEval correctness / partial credit, DPG score, the parts of a mix, ...; NaN where a component does
  not apply to an image).
* :class:`Reward` — ``score(images, records) -> RewardOutput`` (batched); ``reward(images, records)`` returns
  just the scores, so any plain callable ``(images, records) -> tensor`` is a reward too.
* :func:`safe_score` — what the training modules call: a scorer exception for a whole batch is retried image by
  image; an image whose scoring still raises gets NaN. The modules count NaN/inf rewards in
  ``train/nonfinite_rewards`` and give them advantage 0 (``grpo_math.group_advantages``), and training goes on.

Reward models (CLIP, BLIP, detectors ...) are frozen, in eval mode, and are held by a :class:`Reward`, which is a
plain Python object, not an ``nn.Module``: a LightningModule that stores a reward in an attribute does not
register its weights, so they are never trained, checkpointed, or wrapped by DDP / FSDP / DeepSpeed.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger("htgrpo.rewards")

#: Torch dtypes a reward's ``dtype`` setting accepts (by name).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RewardOutput:
    """What a reward returns for a batch of B images.

    Attributes:
        scores: ``(B,)`` float32 rewards; NaN where scoring failed (advantage 0 in training).
        components: name -> ``(B,)`` float32 per-image values of the reward's parts (e.g. ``geneval/correct``,
            the parts of a ``mix``); NaN where a component does not apply or failed. Logged as
            ``train/reward/<name>`` (mean over the finite values).
        num_failed: how many images failed to score (their ``scores`` are NaN); set by :func:`safe_score`.
    """

    scores: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    num_failed: int = 0

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu().reshape(-1)
        self.components = {
            str(k): torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1) for k, v in self.components.items()
        }
        for k, v in self.components.items():
            if v.numel() != self.scores.numel():
                raise ValueError(f"component {k!r} has {v.numel()} values for {self.scores.numel()} scores")

    def __len__(self) -> int:
        return int(self.scores.numel())

    def component_means(self) -> dict[str, float]:
        """Per component, the mean over its finite values (components with none are left out)."""
        out = {}
        for k, v in self.components.items():
            ok = torch.isfinite(v)
            if ok.any():
                out[k] = float(v[ok].mean())
        return out

    @staticmethod
    def concat(outputs: Sequence["RewardOutput"]) -> "RewardOutput":
        """Concatenate along the batch; a component missing from some part is NaN there."""
        names: list[str] = []
        for o in outputs:
            names += [k for k in o.components if k not in names]
        comps = {
            k: torch.cat([o.components.get(k, torch.full((len(o),), math.nan)) for o in outputs]) for k in names
        }
        scores = torch.cat([o.scores for o in outputs]) if outputs else torch.zeros(0)
        return RewardOutput(scores, comps, sum(o.num_failed for o in outputs))


class RewardUnavailableError(RuntimeError):
    """No finite reward for ``max_failed_batches`` consecutive rollout batches: the run stops (``htgrpo.fit`` saves a
    checkpoint first and exits with this message)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else as torch reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Reward(abc.ABC):
    """Base class of rewards and metrics.

    Subclasses implement :meth:`score` (batched). Model-backed rewards load their (frozen, eval-mode) models in
    ``__init__`` onto ``self.device`` in ``self.dtype`` and move them in :meth:`to` (override ``_move``).

    Args:
        device: where the reward's models run: ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (cuda if available).
        dtype: ``float32`` | ``float16`` | ``bfloat16``: the models' weights and compute dtype.
    """

    #: short name (the ``conf/reward/<name>.yaml`` file); used in logs and by the reward server.
    name: str = "reward"
    #: True for rewards that mostly wait on another process or machine (``remote``, ``vlm_judge``): with
    #: ``algorithm.overlap_scoring: auto`` their scoring of rollout chunk i runs while chunk i+1 samples.
    io_bound: bool = False
    #: consecutive rollout batches with no finite reward after which the RL modules stop the run (an error and a
    #: checkpoint, :class:`RewardUnavailableError`); 0 = never. A batch with no finite reward is never trained on,
    #: whatever this is (``GRPOModule.skip_unscored_batch``). ``reward=remote`` sets it from ``max_failed_batches``.
    max_failed_batches: int = 0
    #: True for rewards whose constructor loads nothing (clients of a served reward): ``htgrpo.fit`` then builds one
    #: and runs :meth:`check_ready` before loading the policy, so a wrong URL or token stops the run in seconds.
    cheap_to_build: bool = False

    def __init__(self, device: str | torch.device | None = "cpu", dtype: str = "float32") -> None:
        from htgrpo.config import require_choice

        require_choice(str(dtype), DTYPES, "dtype")
        self.device_setting = "auto" if device in (None, "auto") else str(device)
        self.device = resolve_device(device)
        self.dtype_name = str(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @abc.abstractmethod
    def score(self, images: Tensor, records: Sequence[Any]) -> RewardOutput:
        """Score ``images`` (uint8 ``(B, 3, H, W)``) against ``records`` (length B; the prompts' metadata)."""

    def check_ready(self) -> None:
        """Called by ``htgrpo.fit`` before validation and training. A reward that depends on something outside this
        process (a server) checks it here and raises :class:`~htgrpo.config.ConfigError` naming the key to fix, so
        a wrong URL or token stops the run at start-up. Rewards computed in-process have nothing to check."""

    def __call__(self, images: Tensor, records: Sequence[Any]) -> Tensor:
        """Just the ``(B,)`` float32 scores (the plain-callable reward contract)."""
        return self.score(images, records).scores

    def to(self, device: str | torch.device) -> "Reward":
        """Move the reward's models to ``device`` (returns self)."""
        self.device = resolve_device(device)
        self._move(self.device)
        return self

    def follow(self, device: str | torch.device) -> "Reward":
        """With ``device: auto``, move to the training process's accelerator ``device`` (e.g. ``cuda:3`` on DDP rank 3:
        the reward is built before Lightning picks each rank's GPU, when ``auto`` can only mean ``cuda:0``).
        An explicit device setting is kept. Training modules call this in ``on_fit_start``."""
        target = torch.device(device)
        if self.device_setting == "auto" and target.type != "cpu" and target != self.device:
            self.to(target)
        return self

    def _move(self, device: torch.device) -> None:
        """Move the models; rewards without models have nothing to do."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, dtype={self.dtype_name!r})"


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad = False`` on every parameter (reward models are never trained)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_images(images: Any) -> Tensor:
    """``images`` as a uint8 ``(B, 3, H, W)`` CPU tensor (a single ``(3, H, W)`` image gets a batch axis).

    Raises:
        ValueError: wrong rank, channel count or dtype.
    """
    t = torch.as_tensor(images)
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {t.dtype}")
    return t.detach().cpu()


def _as_output(result: Any, n: int) -> RewardOutput:
    out = result if isinstance(result, RewardOutput) else RewardOutput(torch.as_tensor(result, dtype=torch.float32))
    if len(out) != n:
        raise RuntimeError(f"reward returned {len(out)} scores for {n} images")
    return out


def _call(reward: Any, images: Tensor, records: Sequence[Any]) -> RewardOutput:
    if isinstance(reward, Reward):
        return _as_output(reward.score(images, records), len(records))
    return _as_output(reward(images, records), len(records))


def safe_score(reward: Reward | Callable[..., Any], images: Tensor, records: Sequence[Any]) -> RewardOutput:
    """Score a batch so that a failing scorer never stops training.

    1. ``reward.score(images, records)`` (or ``reward(images, records)`` for a plain callable) on the whole batch;
    2. if that raises (or returns the wrong number of scores), score each image alone;
    3. an image whose scoring still raises gets score NaN (all its components NaN) and is counted in
       ``num_failed``. Each failure is logged as a warning with the exception.

    Non-finite scores a reward returns itself are passed through unchanged (the training modules count every
    NaN/inf in ``train/nonfinite_rewards``).
    """
    n = len(records)
    if n == 0:
        return RewardOutput(torch.zeros(0))
    try:
        return _call(reward, images, records)
    except Exception as err:  # noqa: BLE001 - a scorer may raise anything; we must keep training
        log.warning("reward %s failed on a batch of %d (%s: %s); retrying image by image",
                    getattr(reward, "name", reward), n, type(err).__name__, err)
    parts: list[RewardOutput] = []
    for i in range(n):
        try:
            parts.append(_call(reward, images[i:i + 1], [records[i]]))
        except Exception as err:  # noqa: BLE001
            log.warning("reward %s failed on image %d (%s: %s); its reward is NaN",
                        getattr(reward, "name", reward), i, type(err).__name__, err)
            parts.append(RewardOutput(torch.full((1,), math.nan), num_failed=1))
    out = RewardOutput.concat(parts)
    if out.num_failed == n:
        log.error("reward %s failed on every image of the batch (%d): all rewards are NaN", getattr(reward, "name", reward), n)
    return out


def reward_log(output: RewardOutput, prefix: str = "train/reward/") -> dict[str, float]:
    """Log entries for a step: ``<prefix><component>`` = mean over the component's finite values."""
    return {f"{prefix}{k}": v for k, v in output.component_means().items()}
