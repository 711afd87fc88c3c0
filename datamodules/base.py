"""What every detection data module shares: loaders with the batch collate, and the train/val sample transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detectors.batch import collate_detection

# (image uint8 (3, h, w), target dict) -> the same, e.g. datamodules.transforms.SSDAugmentation / ResizeTo
SampleTransform = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


class DetectionDataModule(L.LightningDataModule):
    """Subclasses set ``self.train_set`` / ``self.val_set`` in ``__init__`` or ``setup``; loaders are built here.

    ``train_transform`` / ``val_transform`` (None: none) are applied by those data sets, last in
    ``__getitem__``, so ``train_set[i]`` is exactly what the model receives (datamodules/browse.py shows it).
    """

    def __init__(self, classes: Sequence[str], batch_size: int = 8, val_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, train_transform: SampleTransform | None = None,
                 val_transform: SampleTransform | None = None) -> None:
        super().__init__()
        self.classes = list(classes)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_transform, self.val_transform = train_transform, val_transform
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_detection, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
