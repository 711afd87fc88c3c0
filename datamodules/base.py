"""What every detection data module shares: loaders with the batch collate."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from detectors.batch import collate_detection


class DetectionDataModule(L.LightningDataModule):
    """Subclasses set ``self.train_set`` / ``self.val_set`` in ``setup``; loaders are built here."""

    def __init__(self, classes: Sequence[str], batch_size: int = 8, val_batch_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.classes = list(classes)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
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
