"""Scoring overlapped with sampling: while rollout chunk i+1 samples, chunk i is scored on a background thread.

A rollout in chunks of ``algorithm.rollout_micro_batch_size`` images (``rollout.sample_in_micro_batches``) decodes each
chunk as soon as it is sampled and hands it to a :class:`ChunkScorer`; the reward for the whole batch is the
concatenation of the chunks' outputs, collected after the last chunk. With a remote reward (an HTTP server, a VLM
judge) the scorer waits on the network, so the wait hides behind sampling: a step takes about
``n·t_sample + t_score(last chunk) + t_update`` instead of ``n·t_sample + n·t_score + t_update``.

Same results as scoring after the rollout (``overlap_scoring: false``), for the same seed:

* the sampler draws only from its own per-step generator (``GRPOModule.step_generator(0)``), never from the global
  RNG, so a reward that draws random numbers on the scoring thread cannot shift the samples;
* one worker scores the chunks one after another, in order, so a reward's own draws and state changes happen in the
  same order as in a sequential run;
* every image is scored with its own record by the same reward, through the same
  :func:`~htgrpo.rewards.base.safe_score`: the rewards are identical wherever scoring an image does not depend on the
  other images of its call (ShapesWorld, JPEG, GenEval / DPG rules, the VLM judge's one-request-per-image; a
  batched float model may differ in the last bits between a batch of 48 and chunks of 8).

``overlap_scoring``: ``auto`` (default) overlaps rewards marked ``io_bound`` (``remote``, ``vlm_judge``, a ``mix``
holding one) and scores local ones after the rollout; ``true`` / ``false`` force it. A local reward on the GPU
runs on the same device as the sampler, so overlapping it gains little; on the CPU it competes for cores.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

from htgrpo.config import ConfigError
from htgrpo.rewards.base import RewardOutput, safe_score

log = logging.getLogger("htgrpo.algorithms.overlap")

OVERLAP_SETTINGS: tuple[str, ...] = ("auto", "true", "false")


def overlap_setting(value: Any, key: str = "overlap_scoring") -> str:
    """``auto`` | ``true`` | ``false`` from a config value (YAML gives booleans for true/false).

    Raises:
        ConfigError(key): anything else.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text not in OVERLAP_SETTINGS:
        raise ConfigError(key, f"must be one of {list(OVERLAP_SETTINGS)}, got {value!r}")
    return text


def wants_overlap(setting: str, reward: Any) -> bool:
    """Whether to overlap: ``true``; ``false``; ``auto`` -> the reward's ``io_bound`` flag (False for plain callables)."""
    if setting == "auto":
        return bool(getattr(reward, "io_bound", False))
    return setting == "true"


def _score_chunk(reward: Any, images: torch.Tensor, records: Sequence[Any]) -> RewardOutput:
    # Grad mode is thread-local (a new thread has it on): scoring never builds a graph.
    with torch.no_grad():
        return safe_score(reward, images, records)


class ChunkScorer:
    """Scores rollout chunks on one background thread, in submission order, while the caller samples the next one.

    Use: ``submit(images, records)`` per chunk, then ``result()`` (the whole batch's :class:`RewardOutput`, chunks
    concatenated in order); ``close()`` on an error path drops what has not started and waits for the rest.
    """

    def __init__(self, reward: Any) -> None:
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="htgrpo-scoring")
        self._futures: list[Future] = []

    def __len__(self) -> int:
        return len(self._futures)

    def submit(self, images: torch.Tensor, records: Sequence[Any]) -> None:
        """Queue one chunk: uint8 ``(b, 3, H, W)`` CPU images and their ``b`` records."""
        self._futures.append(self._pool.submit(_score_chunk, self.reward, images, list(records)))

    def result(self) -> RewardOutput:
        """Wait for every chunk; their outputs concatenated in submission order (re-raises a chunk's exception)."""
        try:
            return RewardOutput.concat([f.result() for f in self._futures])
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
