"""LightningDataModules serving prompt batches (and, for ShapesWorld warm starts, target images).

``train`` is either an index-addressable :class:`ShapesPromptStream` (ShapesWorld: unbounded, seeded) or a
:class:`PromptSet` (official prompts, reshuffled each epoch with a seeded sampler). ``val`` is always the
benchmark's fixed prompt set, served in order, each prompt once (the module draws its images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from htgrpo.config import require
from htgrpo.data.train_val_overlap import check_train_val_overlap
from htgrpo.data.prompt_sets import PromptSet, ShapesPromptStream, StreamItem
from htgrpo.data.records import BenchmarkPrompt

log = logging.getLogger(__name__)


@dataclass(init=False)
class PromptBatch:
    """A batch of prompts.

    Attributes:
        prompts: the prompts with their scoring records.
        indices: position of each prompt in its source (the data position, for exact resume).
        images: ground-truth images (uint8, B×3×H×W) when the source renders them, else None.
    """

    # init=False: Lightning's apply_to_collection (e.g. the bf16-true precision plugin's convert_input) then leaves
    # the field alone instead of rebuilding the frozen BenchmarkPrompt records, which it cannot do.
    prompts: list[BenchmarkPrompt] = field(init=False)
    indices: torch.Tensor
    images: torch.Tensor | None = None

    def __init__(self, prompts: list[BenchmarkPrompt], indices: torch.Tensor, images: torch.Tensor | None = None):
        self.prompts, self.indices, self.images = prompts, indices, images

    @property
    def texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> "PromptBatch":
        images = None if self.images is None else self.images.to(device)
        return PromptBatch(self.prompts, self.indices.to(device), images)


def collate_prompts(items: Sequence[StreamItem]) -> PromptBatch:
    images = [it.image for it in items]
    stacked = torch.stack(images) if all(im is not None for im in images) else None
    return PromptBatch(prompts=[it.prompt for it in items], indices=torch.tensor([it.index for it in items]), images=stacked)


class _StreamDataset(Dataset):
    def __init__(self, stream: ShapesPromptStream, length: int):
        self.stream, self.length = stream, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> StreamItem:
        return self.stream[index]


class _PromptSetDataset(Dataset):
    def __init__(self, prompts: PromptSet):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> StreamItem:
        return StreamItem(index=index, prompt=self.prompts[index], image=None)


class ResumableSampler(Sampler[int]):
    """Indices of one epoch, in order (streams) or in a permutation seeded by (seed, epoch) (prompt sets),
    starting after ``start`` already-consumed examples.

    The permutation depends only on (seed, epoch), never on how many epochs this process has run, and ``start``
    skips what a resumed run already trained on: together they give exact resume (Lightning does not fast-forward
    a plain DataLoader).

    With ``world_size`` > 1 each rank takes every ``world_size``-th index of the epoch's order from position
    ``rank`` (the order cut to a multiple of ``world_size``, so every rank runs the same number of batches), and
    ``start`` counts this rank's examples: resume stays exact under DDP / FSDP / DeepSpeed (the trainer configs set
    ``use_distributed_sampler: false`` so Lightning does not re-wrap this sampler).
    """

    def __init__(self, length: int, shuffle: bool, seed: int, epoch: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.epoch, self.start = int(epoch), int(start)
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch start
        if int(epoch) != self.epoch:
            self.start = 0  # skipping applies to the epoch a run resumed in only
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
            order_list = order.tolist()
        else:
            order_list = range(self.length)
        mine = order_list[self.rank:self._usable_length():self.world_size]
        for i in range(self.start, len(mine)):
            yield int(mine[i])

    def _usable_length(self) -> int:
        return self.length if self.world_size == 1 else self.length // self.world_size * self.world_size

    def __len__(self) -> int:
        return self._usable_length() // self.world_size - self.start


def hold_out_validation(stream: ShapesPromptStream, val_prompts: PromptSet | Sequence[BenchmarkPrompt]
                        ) -> ShapesPromptStream:
    """``stream`` with every validation prompt held out, logged with the tasks left without training prompts."""
    val = val_prompts.prompts if isinstance(val_prompts, PromptSet) else list(val_prompts)
    held = stream.holding_out([p.prompt for p in val])
    if held.exhausted_tasks:
        log.info("ShapesWorld training prompts hold out the %d validation prompts; %s: every prompt of %s is a "
                 "validation prompt, so they are not trained on (their validation scores measure transfer)",
                 len(val), "tasks " + ", ".join(held.exhausted_tasks),
                 "these tasks" if len(held.exhausted_tasks) > 1 else "this task")
    else:
        log.info("ShapesWorld training prompts hold out the %d validation prompts", len(val))
    return held


class PromptDataModule(L.LightningDataModule):
    """Prompts for training and the benchmark's prompts for validation.

    Args:
        train: the training source (a ShapesWorld stream or an official prompt set).
        val_prompts: the validation prompt set (``fit`` passes the benchmark's).
        batch_size: prompts per training batch (per process).
        val_batch_size: prompts per validation batch (each gets the benchmark's ``images_per_prompt`` images).
        train_length: examples per training "epoch" for a stream (the stream never repeats an index).
        num_workers: DataLoader worker processes (0 = load in the main process; ShapesWorld is cheap).
        seed: shuffling seed for prompt-set sources.
        allow_train_val_overlap: train on prompts that are also validation prompts on purpose. By default a
            prompt-set ``train`` sharing a prompt with ``val_prompts`` stops at start-up naming the count and an
            example (:func:`htgrpo.data.train_val_overlap.check_train_val_overlap`), and a ShapesWorld stream holds
            every validation prompt out (:func:`hold_out_validation`; tasks whose whole prompt space is in the
            validation set are then not trained on at all). ``true`` trains the stream on its whole prompt space
            (the warm starts do: they play the pretrained base model).
    """

    def __init__(self, train: ShapesPromptStream | PromptSet, val_prompts: PromptSet | None = None,
                 batch_size: int = 32, val_batch_size: int = 16, train_length: int = 1_000_000,
                 num_workers: int = 0, seed: int = 0, allow_train_val_overlap: bool = False):
        super().__init__()
        require(isinstance(allow_train_val_overlap, bool), "allow_train_val_overlap",
                f"must be true or false, got {allow_train_val_overlap!r}")
        require(int(batch_size) >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        require(int(val_batch_size) >= 1, "val_batch_size", f"must be >= 1, got {val_batch_size}")
        require(int(train_length) >= 1, "train_length", f"must be >= 1, got {train_length}")
        require(int(num_workers) >= 0, "num_workers", f"must be >= 0, got {num_workers}")
        # Before any model loads (fit builds the data before the policy): a test-set run stops here.
        check_train_val_overlap(train, val_prompts, allow=allow_train_val_overlap)
        if isinstance(train, ShapesPromptStream) and val_prompts is not None and not allow_train_val_overlap:
            train = hold_out_validation(train, val_prompts)
        block = getattr(train, "block_size", 0)
        if block and int(batch_size) % block:
            # Still balanced over every block, just not within each batch: worth a word, not a failure.
            log.warning("data.batch_size=%s is not a multiple of the stratified block of %d prompts "
                        "(data.train.task_weights): batches will not all have the same task mix", batch_size, block)
        self.train_source, self.val_prompts = train, val_prompts
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.train_length, self.num_workers, self.seed = int(train_length), int(num_workers), int(seed)

    def train_dataset(self) -> Dataset:
        if isinstance(self.train_source, ShapesPromptStream):
            return _StreamDataset(self.train_source, self.train_length)
        return _PromptSetDataset(self.train_source)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_prompts,
                          persistent_workers=self.num_workers > 0)

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, examples already consumed in it) of a run restored from a checkpoint; (0, 0) otherwise."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        # `processed`, not `completed`: a checkpoint written in on_train_batch_end (every_n_train_steps) has
        # processed the batch but not yet marked it completed; Lightning completes it on restore, after this call.
        done = int(loop.epoch_loop.batch_progress.current.processed) if loop.restarting else 0
        return int(trainer.current_epoch), done * self.batch_size

    def train_dataloader(self) -> DataLoader:
        # A stream is already random per index; a prompt set is reshuffled each epoch with a (seed, epoch) permutation.
        dataset = self.train_dataset()
        epoch, start = self._resume_position()
        shuffle = not isinstance(self.train_source, ShapesPromptStream)
        rank, world_size = self._rank_and_world_size()
        sampler = ResumableSampler(len(dataset), shuffle, self.seed, epoch=epoch, start=start, rank=rank,
                                   world_size=world_size)
        return self._loader(dataset, self.batch_size, sampler)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def val_dataloader(self) -> DataLoader:
        if self.val_prompts is None:
            raise RuntimeError("PromptDataModule has no validation prompts (fit passes the benchmark's)")
        dataset = _PromptSetDataset(self.val_prompts)
        rank, world_size = self._rank_and_world_size()
        if world_size == 1:
            return self._loader(dataset, self.val_batch_size)
        # Each rank scores its share of the validation prompts (the metric is synchronised over the ranks).
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return self._loader(dataset, self.val_batch_size, sampler)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
