"""What every detection data module shares: loaders with the batch collate, and the train/val sample transforms."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import lightning as L
from torch import Tensor
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from detectors.batch import collate_detection

from .images import ImageReadError, image_file_problems
from .sampling import (
    EpochRandomSampler,
    KeyedBatchSampler,
    ResumableDataLoader,
    SampleKey,
    SeededSamples,
    keyed_batches,
)

log = logging.getLogger(__name__)

# (image uint8 (3, h, w), target dict) -> the same, e.g. datamodules.transforms.SSDAugmentation / ResizeTo
SampleTransform = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a cluster's allocation sets), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class SkipBadImages(Dataset):
    """``dataset`` where an image that cannot be read is replaced by the next readable one: those ``known`` from the
    start-up check (``image_file_problems``: missing, empty, not an image) without a try, others (a file damaged
    inside) when their read fails (``ImageReadError``), each logged with the file and the count (in this process).
    Past ``limit`` unreadable images in all it stops, naming them. The replacement depends on the index alone, so
    a resumed run reads what the uninterrupted one read."""

    def __init__(self, dataset: Dataset, known: dict[int, str] | None = None, limit: int | None = None) -> None:
        self.dataset, self.known = dataset, dict(known or {})
        self.limit = len(dataset) if limit is None else limit
        self.found: dict[int, str] = {}  # read failures this process met

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for step in range(len(self.dataset)):
            i = (index + step) % len(self.dataset)
            if i in self.known:
                continue
            try:
                return self.dataset[i]
            except ImageReadError as e:
                self.found[i] = str(e)
                self.known[i] = str(e)
                log.warning("%s; skipped (data.bad_images=skip): %d image(s) skipped so far", e, len(self.found))
                if len(self.known) > self.limit:
                    raise ImageReadError(
                        f"{len(self.known)} of {len(self.dataset)} images cannot be read, more than "
                        f"data.max_bad_fraction allows ({self.limit}): " + "; ".join(list(self.known.values())[:10])
                    ) from e
        raise ImageReadError(f"none of the {len(self.dataset)} images could be read (data.bad_images=skip)")


class AspectRatioGroupedBatchSampler(BatchSampler):
    """Batches whose images are all landscape (w ≥ h) or all portrait, so little of a padded batch is padding
    (the grouping Detectron and torchvision's references use for RetinaNet). Takes indices from ``sampler`` in
    its order and emits a group's batch once it holds ``batch_size``; what is left at the end is batched per group
    unless ``drop_last``. Lightning swaps ``sampler`` for a DistributedSampler under DDP (the argument's name)."""

    def __init__(
        self,
        sampler: Sampler[int],
        aspect_ratios: Sequence[float],
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.aspect_ratios = list(aspect_ratios)
        self.groups = [int(r >= 1.0) for r in self.aspect_ratios]
        self.seed, self.skip = int(seed), 0  # batches of SampleKeys, as sampling.KeyedBatchSampler

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return keyed_batches(self._grouped(), self)

    def _grouped(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {0: [], 1: []}
        for index in self.sampler:
            bucket = buckets[self.groups[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        if not self.drop_last:
            for bucket in buckets.values():
                if bucket:
                    yield bucket

    def __len__(self) -> int:
        counts = [0, 0]
        for index in self.sampler:
            counts[self.groups[index]] += 1
        if self.drop_last:
            return sum(c // self.batch_size for c in counts)
        return sum(math.ceil(c / self.batch_size) for c in counts)


def fraction_split(ids: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a ``fraction`` of ``ids`` for validation, the rest for training, drawn by ``seed`` alone (the
    same split on every machine and rank, whatever else was drawn before); each part keeps the ids' order. At least
    one of each when there are two or more."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction={fraction}: give a fraction between 0 and 1, e.g. 0.2")
    n = len(ids)
    if n < 2:
        raise ValueError(f"data.val_fraction={fraction}: {n} image(s) cannot be split into training and validation")
    num_val = min(n - 1, max(1, round(n * fraction)))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:num_val]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[chosen] = True
    return [i for i, v in zip(ids, is_val.tolist()) if not v], [i for i, v in zip(ids, is_val.tolist()) if v]


def warn_validation_only_classes(val_only: Sequence[str], where: str) -> None:
    """A class with validation objects and no training object: a warning (it stays a class, scored AP 0 at first,
    and the metrics table shows it), not a stop: a rare class missing from one split is ordinary in real data."""
    if val_only:
        log.warning(
            "class(es) %s have validation objects in %s but no training object: the model cannot learn them, "
            "and their AP (val/ap/<class>) will stay near 0",
            sorted(val_only),
            where,
        )


class DetectionDataModule(L.LightningDataModule):
    """Subclasses set ``self.train_set`` / ``self.val_set`` in ``__init__`` or ``setup``; loaders are built here.

    ``train_transform`` / ``val_transform`` (None: none) are applied by those data sets, last in
    ``__getitem__``, so ``train_set[i]`` is exactly what the model receives (datamodules/browse.py shows it).
    ``size_divisible`` pads each batch's height and width up to a multiple (RetinaNet: 128);
    ``aspect_ratio_grouping`` batches training images by orientation, for data sets with ``aspect_ratios()``.
    ``num_workers`` is at most :func:`usable_cpus` (more only wait for a CPU); ``pin_memory`` pins only where the
    batches go to an accelerator. ``persistent_workers`` (None: whenever there are workers) keeps loader workers
    between epochs.
    Under DDP, evaluation loaders split the images between ranks without repeating any (the metrics gather
    them once per evaluation), so mAP on N processes equals mAP on one.
    ``bad_images``: an image file that cannot be read (missing, empty, not an image; checked from each file's first
    bytes when a loader is first made, and again when it is decoded) stops the run naming it (``error``), or is
    replaced by the next one with a warning naming it (``skip``), unless more than ``max_bad_fraction`` of a set's
    images are: then the run stops naming them. ``bad_files`` lists what was skipped ({path: problem}).
    """

    def __init__(
        self,
        classes: Sequence[str] | None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        train_transform: SampleTransform | None = None,
        val_transform: SampleTransform | None = None,
        size_divisible: int = 1,
        aspect_ratio_grouping: bool = False,
        bad_images: str = "skip",
        max_bad_fraction: float = 0.01,
        order_seed: int = 0,
    ) -> None:
        super().__init__()
        self.order_seed = int(order_seed)  # the run's seed: training order and augmentation (sampling.py)
        # None: read from the training data by the subclass (data.classes=null), before the model is built
        self.classes: list[str] = list(classes) if classes is not None else []
        # batch_size may be set after construction (train.py resolves data.batch_size=auto): val follows it unless given
        self.batch_size, self._val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = min(num_workers, usable_cpus()), pin_memory
        if self.num_workers < num_workers:
            log.info("data.num_workers=%d: %d, the CPUs this process may use", num_workers, self.num_workers)
        self.persistent_workers = num_workers > 0 and persistent_workers is not False
        self.train_transform, self.val_transform = train_transform, val_transform
        if size_divisible < 1:
            raise ValueError(f"data.size_divisible={size_divisible}: must be ≥ 1 (1: no extra padding)")
        self.size_divisible, self.aspect_ratio_grouping = int(size_divisible), aspect_ratio_grouping
        if bad_images not in ("error", "skip"):
            raise ValueError(f"data.bad_images={bad_images!r}: choose 'error' or 'skip'")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction}: a share of the images in [0, 1], e.g. 0.01")
        self.bad_images, self.max_bad_fraction = bad_images, float(max_bad_fraction)
        self.bad_files: dict[str, str] = {}
        self._checked: dict[int, dict[int, str]] = {}  # id(dataset) → its unreadable files found at start-up
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def val_batch_size(self) -> int:
        return self._val_batch_size or self.batch_size

    @val_batch_size.setter
    def val_batch_size(self, value: int | None) -> None:
        self._val_batch_size = value

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        common: dict = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and self._to_accelerator(),
            persistent_workers=self.persistent_workers,
            collate_fn=partial(collate_detection, size_divisible=self.size_divisible),
        )
        ratios = dataset.aspect_ratios() if hasattr(dataset, "aspect_ratios") else None
        known = self.unreadable_images(dataset, "training" if shuffle else "evaluation")
        if self.bad_images == "skip":
            dataset = SkipBadImages(dataset, known, limit=int(self.max_bad_fraction * len(dataset)))
        if shuffle:  # training: the order and each sample's augmentation from (seed, epoch, index) (sampling.py)
            order, seed = EpochRandomSampler(dataset, self.order_seed), self.order_seed
            if self.aspect_ratio_grouping and ratios is not None:
                batches = AspectRatioGroupedBatchSampler(order, ratios, batch_size, drop_last=True, seed=seed)
            else:
                batches = KeyedBatchSampler(order, batch_size, drop_last=True, seed=seed)
            # the loader's own generator: creating its iterator draws nothing from the model's global one
            return ResumableDataLoader(
                SeededSamples(dataset),
                batch_sampler=batches,
                generator=torch.Generator(),
                position=self.training_position,
                **common,
            )
        if not shuffle and self._world_size() > 1:
            # each image on exactly one rank (Lightning's own sampler pads ranks with repeats, which skews mAP)
            trainer = self.trainer
            common["sampler"] = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(), **common)

    def unreadable_images(self, dataset: Dataset, part: str) -> dict[int, str]:
        """{index: problem} of ``dataset``'s image files that cannot be read, checked once from their first bytes;
        with ``bad_images=error``, or more than ``max_bad_fraction`` of them, an error naming them."""
        if id(dataset) in self._checked or not hasattr(dataset, "image_paths"):
            return self._checked.get(id(dataset), {})
        paths = dataset.image_paths()
        start = time.perf_counter()
        problems = image_file_problems(paths)
        seconds = time.perf_counter() - start
        log.info("checked the %d %s image files in %.1f s: %d unreadable", len(paths), part, seconds, len(problems))
        self._checked[id(dataset)] = problems
        if not problems:
            return problems
        listed = [f"{paths[i]}: {problem}" for i, problem in problems.items()]
        shown = "; ".join(listed[:10]) + (f"; and {len(listed) - 10} more" if len(listed) > 10 else "")
        if self.bad_images == "error":
            raise ImageReadError(
                f"{len(problems)} {part} image file(s) cannot be read (data.bad_images=error): {shown}. Repair or "
                f"remove them, or skip them with data.bad_images=skip"
            )
        if len(problems) > self.max_bad_fraction * len(paths):
            raise ImageReadError(
                f"{len(problems)} of the {len(paths)} {part} image files ({len(problems) / len(paths):.1%}) cannot "
                f"be read, more than data.max_bad_fraction={self.max_bad_fraction:g}: {shown}. Repair or remove "
                f"them, or raise data.max_bad_fraction"
            )
        log.warning(
            "%d of the %d %s image files cannot be read and are skipped, each replaced by the next "
            "(data.bad_images=skip): %s",
            len(problems),
            len(paths),
            part,
            shown,
        )
        self.bad_files.update({str(paths[i]): problem for i, problem in problems.items()})
        return problems

    def training_position(self) -> tuple[int, int]:
        """(epoch, batches of it trained): where a checkpoint taken now stands in the training data."""
        loop = self.trainer.fit_loop
        return self.trainer.current_epoch, loop.epoch_loop.batch_idx + 1

    def _to_accelerator(self) -> bool:
        """Whether the batches go to an accelerator: the trainer's device, else (no trainer yet) whether one exists."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type != "cpu"
        return torch.cuda.is_available() or torch.backends.mps.is_available()  # torch.accelerator: 2.6+

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
