"""The end of a training run (docs/ARCHITECTURE.md §1, "Every fit ends validated"): last.ckpt saved at the final
step, the validation metrics written to metrics.json and the console, the skipped image files listed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from engine.callbacks import ValidateAtTheEnd

log = logging.getLogger(__name__)


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """last.ckpt at the final step where the loop saved none there (a run without validation data ends between
    its epoch-end saves); the ``ValidateAtTheEnd`` callback knows the step of the last save."""
    end = next((c for c in trainer.callbacks if isinstance(c, ValidateAtTheEnd)), None)
    last = next((c for c in trainer.checkpoint_callbacks if not c.monitor), None)
    if end is None or last is None or end.saved_step == trainer.global_step:
        return
    path = Path(last.dirpath, f"{last.filename}{last.FILE_EXTENSION}")
    trainer.save_checkpoint(path)
    log.info("saved %s at the final step %d", path, trainer.global_step)


def write_metrics(trainer: L.Trainer, output_dir: Path, what: str) -> dict[str, float]:
    """The validation metrics Lightning holds now, into metrics.json and the console (rank 0)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if metrics and trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes them
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nvalidation metrics ({what}):\n{format_metrics(metrics)}")
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """One `name  value` line a metric, the names aligned."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:8.4f}" for k, v in metrics.items())


def list_bad_images(datamodule: L.LightningDataModule, output_dir: Path) -> None:
    """The image files the run skipped as unreadable (data.bad_images=skip), in bad_images.txt and the summary."""
    bad = getattr(datamodule, "bad_files", None)
    if not bad:
        return
    path = output_dir / "bad_images.txt"
    path.write_text("".join(f"{file}: {problem}\n" for file, problem in bad.items()))
    print(f"\n{len(bad)} unreadable image file(s) were skipped (data.bad_images=skip), listed in {path}")
