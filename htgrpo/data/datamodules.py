"""LightningDataModules serving prompt batches (and, for ShapesWorld warm starts, target images).

``train`` is either an index-addressable :class:`ShapesPromptStream` (ShapesWorld: unbounded, seeded) or a
:class:`PromptSet` (official prompts, reshuffled each epoch with a seeded sampler). ``val`` is always the
benchmark's fixed prompt set, served in order, each prompt once (the module draws its images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from htgrpo.config import require
from htgrpo.data.prompt_sets import PromptSet, ShapesPromptStream, StreamItem
from htgrpo.data.records import BenchmarkPrompt


@dataclass
class PromptBatch:
    """A batch of prompts.

    Attributes:
        prompts: the prompts with their scoring records.
        indices: position of each prompt in its source (the data position, for exact resume).
        images: ground-truth images (uint8, B×3×H×W) when the source renders them, else None.
    """

    prompts: list[BenchmarkPrompt]
    indices: torch.Tensor
    images: torch.Tensor | None = None

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
    """

    def __init__(self, length: int, shuffle: bool, seed: int, epoch: int = 0, start: int = 0):
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.epoch, self.start = int(epoch), int(start)

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
        for i in range(self.start, self.length):
            yield int(order_list[i])

    def __len__(self) -> int:
        return self.length - self.start


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
    """

    def __init__(self, train: ShapesPromptStream | PromptSet, val_prompts: PromptSet | None = None,
                 batch_size: int = 32, val_batch_size: int = 16, train_length: int = 1_000_000,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        require(int(batch_size) >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        require(int(val_batch_size) >= 1, "val_batch_size", f"must be >= 1, got {val_batch_size}")
        require(int(train_length) >= 1, "train_length", f"must be >= 1, got {train_length}")
        require(int(num_workers) >= 0, "num_workers", f"must be >= 0, got {num_workers}")
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
        sampler = ResumableSampler(len(dataset), shuffle, self.seed, epoch=epoch, start=start)
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        if self.val_prompts is None:
            raise RuntimeError("PromptDataModule has no validation prompts (fit passes the benchmark's)")
        return self._loader(_PromptSetDataset(self.val_prompts), self.val_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
