"""The training order and each sample's augmentation as pure functions of (seed, epoch, index), so a run stopped at
any step and resumed draws exactly the batches, in the same order and with the same augmentation, that the
uninterrupted run would have: no hidden random state to save, whatever the number of loader workers or ranks.

- ``EpochRandomSampler``: the epoch's permutation from ``(seed, epoch)`` (Lightning calls ``set_epoch``); under DDP
  Lightning puts its ``DistributedSampler`` in its place, itself a function of ``(seed, epoch)``.
- The batch samplers (``KeyedBatchSampler``, ``base.AspectRatioGroupedBatchSampler``) yield ``SampleKey(index,
  seed)``: the sample's own seed, from ``(seed, epoch, index)``; ``skip`` leaves out the first batches of the next
  epoch they draw (a resumed run's), computed but never loaded.
- ``ResumableDataLoader``: Lightning keeps its ``state_dict`` (epoch, batches of it trained) in each checkpoint and
  gives it back before iterating on resume: the epoch goes on where it stopped.
- ``SeededSamples`` runs the data set's ``__getitem__`` (and its transform) with torch's generator seeded by the
  key, then restores the generator: the caller's random state (the model's dropout) is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler


def derived_seed(*values: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class SampleKey(NamedTuple):
    """What a training batch sampler yields for one sample: its index and the seed of its augmentation."""

    index: int
    seed: int


class EpochRandomSampler(RandomSampler):
    """A permutation of ``range(len(data_source))`` drawn from ``(seed, epoch)`` alone (``set_epoch``). A
    ``RandomSampler``, so Lightning knows the loader shuffles and shuffles its DistributedSampler under DDP."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class KeyedBatchSampler(BatchSampler):
    """``BatchSampler`` whose batches are ``SampleKey``s seeded by ``(seed, epoch, index)``; the first ``skip``
    batches of its next pass are left out (then ``skip`` returns to 0). ``sampler`` keeps its name: Lightning puts
    a DistributedSampler there under DDP."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, seed: int = 0) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.seed, self.skip = int(seed), 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return keyed_batches(super().__iter__(), self)


def keyed_batches(batches: Iterator[list[int]], batch_sampler: Any) -> Iterator[list[SampleKey]]:
    """``batches`` of indices as ``SampleKey``s seeded by (``batch_sampler.seed``, its sampler's epoch, index),
    without the first ``batch_sampler.skip`` of them (which it resets to 0)."""
    # the epoch Lightning set on the sampler (set_epoch: ours and DistributedSampler keep it as `epoch`)
    epoch, seed, skip = int(getattr(batch_sampler.sampler, "epoch", 0)), batch_sampler.seed, batch_sampler.skip
    batch_sampler.skip = 0
    for number, batch in enumerate(batches):
        if number >= skip:
            yield [SampleKey(i, derived_seed(seed, epoch, i)) for i in batch]


class SeededSamples(Dataset):
    """``dataset`` read by ``SampleKey``: each sample made with torch's generator seeded by its key (torch's own
    state around it restored); a plain index reads it as the data set does, from the global generator."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey | int) -> Any:
        if not isinstance(key, SampleKey):
            return self.dataset[key]
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: transforms draw from it
            torch.default_generator.manual_seed(key.seed)
            return self.dataset[key.index]


class ResumableDataLoader(DataLoader):
    """The training ``DataLoader``, resumable at any step: ``position()`` says (epoch, batches of it trained) when a
    checkpoint is taken (Lightning saves ``state_dict()`` for loaders that have one); on resume Lightning calls
    ``load_state_dict`` before it creates the epoch's iterator, which then starts at that epoch's next batch
    (``skip``; workers prefetch at once, so it cannot wait for a later hook). An epoch that was done resumes with
    the next one."""

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        if self.position is None:
            return {}
        epoch, batches = self.position()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if batches >= len(self.batch_sampler):  # type: ignore[arg-type]
            epoch, batches = epoch + 1, 0
        set_epoch = getattr(self.batch_sampler.sampler, "set_epoch", None)  # type: ignore[union-attr]
        if callable(set_epoch):  # Lightning sets it only after it has created (and workers prefetched) the iterator
            set_epoch(epoch)
        self.batch_sampler.skip = batches  # type: ignore[union-attr]
