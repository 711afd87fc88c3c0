"""Lightning callbacks the configs use beside Lightning's own (conf/callbacks/)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainingTime(L.Callback):
    """Logs ``time/train_min``, the wall minutes of fitting so far, at every validation, so accuracy can be
    read (and plotted) against time. Kept in checkpoints, so a resumed run continues its clock."""

    def __init__(self) -> None:
        self.elapsed = 0.0  # seconds before the current fit started (from a resumed checkpoint)
        self._start: float | None = None

    def minutes(self) -> float:
        return (self.elapsed + (time.monotonic() - self._start if self._start is not None else 0.0)) / 60

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.elapsed, self._start = self.minutes() * 60, None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._start is not None:
            pl_module.log("time/train_min", self.minutes())

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.minutes() * 60}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed = float(state_dict["elapsed"])
