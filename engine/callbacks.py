"""Lightning callbacks the configs use beside Lightning's own (conf/callbacks/)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from detectors.batch import DetectionBatch
from engine.detection_module import DetectionModule
from evaluation.visualization import (
    DEFAULT_DRAWING_THRESHOLD,
    plot_pr_curves,
    prediction_grid,
    save_png,
    wandb_boxes,
)

log = logging.getLogger(__name__)


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


class TimeBudget(L.Callback):
    """Keeps fitting within ``minutes`` of wall time on any machine: where the planned steps would not fit, fewer
    are trained and the learning-rate schedule, warm-up and decays included, is compressed onto them.

    After ``check_after_steps`` steps and again after every validation, the time a step takes (validations left
    out) and a validation takes are measured; if the rest of the planned schedule and the validations it brings
    would end past the budget, the run is cut to the steps that fit and the schedule's remaining part is squeezed
    linearly onto them, so the last steps still run at the decayed rates; a later measurement (steps got faster)
    may give steps back, up to the plan. A plan that validates every N steps (``val_check_interval`` across
    epochs, as the CPU recipes) keeps its number of validations: they come every N planned steps, N ÷ the
    compression trained ones (the callback tells Lightning when, through ``trainer.val_check_batch``); but they
    take at most ``val_share`` of the time left (fewer, further apart, where a validation is slow against the
    budget). The last step stops the run with a validation (and its checkpoints). The first ``keep_steps`` planned
    steps (the warm-up) are never squeezed: a cut made inside them starts where they end, and the steps after
    carry the whole compression.
    Where the plan and its validations fit, nothing changes: the run is the same as without a budget.
    ``minutes: null`` turns it off. Kept in checkpoints, so a resumed run keeps its shortened plan.
    """

    WARM_STEPS = 2  # left out of the step time
    NEVER = 2**62  # as trainer.val_check_batch: Lightning validates where (batch + 1) % val_check_batch == 0

    def __init__(
        self, minutes: float | None = None, check_after_steps: int = 10, val_share: float = 0.1, keep_steps: int = 0
    ) -> None:
        if not 0 < val_share <= 1:
            raise ValueError(f"callbacks.time_budget.val_share={val_share}: a share of the time, in (0, 1]")
        self.minutes, self.check_after_steps, self.val_share = minutes, check_after_steps, val_share
        self.keep_steps = int(keep_steps or 0)
        self.cuts: list[tuple[int, float]] = []  # (step, how many schedule steps one step covers from there on)
        self.total_steps: int | None = None  # where training stops
        self.planned_steps: int | None = None  # the schedule's end, in the planned schedule's steps
        self._start = self._mark = 0.0
        self._first_step = self._mark_step = 0
        self._val_seconds, self._val_count, self._val_start = 0.0, 0, 0.0
        self._planned_val_every = 0  # the plan's validation interval in steps; 0: validations by epoch
        self.val_every: float | None = None  # the interval in planned steps now (widened where validations are slow)
        self.last_validation: float = 0.0  # the planned step of the last validation

    def schedule_step(self, step: int) -> float:
        """The step of the planned schedule that training step ``step`` runs at."""
        at, scheduled = 0, 0.0
        rate = 1.0
        for cut_step, cut_rate in self.cuts:
            if step <= cut_step:
                break
            scheduled += (cut_step - at) * rate
            at, rate = cut_step, cut_rate
        return scheduled + (step - at) * rate

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.minutes is None:
            return
        if not self.cuts:  # a fresh plan, also on a resume that changed it (more epochs); a cut plan is kept
            self.total_steps = self.planned_steps = int(trainer.estimated_stepping_batches)
        self._start = self._mark = time.monotonic()
        self._first_step = self._mark_step = trainer.global_step
        self._planned_val_every = self._steps_between_validations(trainer)  # before the callback drives them
        if not self.cuts:
            self.val_every, self.last_validation = None, float(trainer.global_step)
        for config in trainer.lr_scheduler_configs:  # LambdaLR: read the planned schedule through the cuts
            lambdas = getattr(config.scheduler, "lr_lambdas", None)
            if lambdas is not None:
                config.scheduler.lr_lambdas = [self._through_cuts(f) for f in lambdas]

    def _through_cuts(self, planned: Any) -> Any:
        return lambda step: planned(self.schedule_step(step))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.minutes is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._val_seconds += time.monotonic() - self._val_start
        self._val_count += 1
        self.last_validation = self.schedule_step(trainer.global_step)
        self._plan(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.minutes is None or self.total_steps is None:
            return
        step = trainer.global_step
        if step - self._first_step == self.WARM_STEPS:  # the first steps also create kernels and buffers
            self._mark, self._mark_step, self._val_seconds, self._val_count = time.monotonic(), step, 0.0, 0
        elif step - self._mark_step == self.check_after_steps and not self.cuts and not self._val_count:
            self._plan(trainer)
        if step >= self.total_steps:
            trainer.should_stop = True  # Lightning validates (and checkpoints) a run that stops this way
        if trainer.check_val_every_n_epoch is None and self._planned_val_every:  # validations by planned steps
            due = self.schedule_step(step) - self.last_validation >= (self.val_every or self._planned_val_every) - 1e-6
            trainer.val_check_batch = 1 if due else self.NEVER  # read by Lightning right after this hook

    @staticmethod
    def _steps_between_validations(trainer: L.Trainer) -> int:
        """Every epoch (``check_val_every_n_epoch``) or every ``val_check_interval`` steps across epochs (with
        ``check_val_every_n_epoch: null``, as the CPU recipes validate); 0 when unknown."""
        if trainer.check_val_every_n_epoch is None and isinstance(trainer.val_check_batch, int):
            return trainer.val_check_batch
        if trainer.num_training_batches == float("inf"):
            return 0
        return max(1, int(trainer.num_training_batches)) * (trainer.check_val_every_n_epoch or 1)

    def _plan(self, trainer: L.Trainer) -> None:
        now, step = time.monotonic(), trainer.global_step
        steps = step - self._mark_step
        if steps <= 0 or self.planned_steps is None or step >= self.total_steps:
            return
        step_seconds = (now - self._mark - self._val_seconds) / steps
        val_seconds = self._val_seconds / self._val_count if self._val_count else 0.0
        planned_left = self.planned_steps - self.schedule_step(step)  # in the planned schedule's steps
        every = self._planned_val_every  # per planned steps (by steps: every N ÷ rate trained steps, the same count)
        vals_left = math.ceil(planned_left / every) if every else 1
        by_steps = trainer.check_val_every_n_epoch is None and every
        if by_steps and val_seconds > 0:  # validations get at most val_share of the time left
            affordable = max(1, int(self.val_share * (self.minutes * 60 - (now - self._start)) / val_seconds))
            self.val_every = planned_left / affordable if vals_left > affordable else None
            vals_left = min(vals_left, affordable)
        left = self.minutes * 60 - (now - self._start) - vals_left * val_seconds
        fits = max(1, int(left / step_seconds)) if left > 0 else 1
        pending = [c for c in self.cuts if c[0] > step]  # a cut set for the warm-up's end: planned afresh
        self.cuts = [c for c in self.cuts if c[0] <= step]
        rate_now = self.cuts[-1][1] if self.cuts else 1.0
        # the warm-up's planned steps still ahead run as planned, where they fit: only the steps after are squeezed
        held = math.ceil(self.keep_steps - self.schedule_step(step) - 1e-9) if rate_now == 1.0 else 0
        held = held if 0 < held < min(fits, planned_left) else 0
        rate = max(1.0, (planned_left - held) / (fits - held))  # planned steps a step covers: never stretched
        if rate == rate_now:
            if pending:  # the plan that was to be cut fits after all
                self.total_steps = step + math.ceil(planned_left / rate - 1e-9)
            return
        total = step + held + math.ceil((planned_left - held) / rate - 1e-9)
        log.warning(
            "time budget %.3g min (callbacks.time_budget.minutes): %.2f s a step and %.1f s a validation "
            "here; training %d more steps (%d in all) for the %d planned ones left, the rest of the "
            "learning-rate schedule %s",
            self.minutes,
            step_seconds,
            val_seconds,
            total - step,
            total,
            round(planned_left),
            ("compressed onto them" if rate > 1 else "as planned")
            + (f" after the warm-up's {held} steps" if held and rate > 1 else ""),
        )
        self.cuts.append((step + held, rate))
        self.total_steps = total

    def state_dict(self) -> dict[str, Any]:
        return {
            "cuts": list(self.cuts),
            "total_steps": self.total_steps,
            "planned_steps": self.planned_steps,
            "val_every": self.val_every,
            "last_validation": self.last_validation,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cuts = [(int(s), float(r)) for s, r in state_dict["cuts"]]
        self.total_steps, self.planned_steps = state_dict["total_steps"], state_dict["planned_steps"]
        self.val_every = state_dict.get("val_every")  # absent from checkpoints before validations were capped
        self.last_validation = state_dict.get("last_validation", 0.0)


class ValidateAtTheEnd(L.Callback):
    """Every fit ends on a validation of its last weights, with the checkpoints a validation brings (best.ckpt,
    last.ckpt), however its loop ends: its plan (``max_steps``, ``max_epochs``), the user's
    ``limit_train_batches``, the time budget, an early stop. Lightning validates at its interval only, so a run
    that ends between two (a smoke test of 3 steps where the recipe validates every 256) would end unvalidated.

    At the last step this sets ``trainer.should_stop``, which Lightning answers with a validation in the loop, and
    clears ``trainer.check_val_every_n_epoch`` so that an epoch cadence cannot skip it (both read right after
    this hook). It records the step of the last validation and of the last checkpoint saved: ``train.py`` saves
    last.ckpt after the fit where the loop did not (a run without validation data)."""

    def __init__(self) -> None:
        self.validated_step: int | None = None
        self.saved_step: int | None = None

    @staticmethod
    def is_last_step(trainer: L.Trainer) -> bool:
        """Whether the fit loop ends after the step that just ran (its plan or a stop asked for)."""
        if trainer.should_stop:
            return True
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return last_epoch and trainer.fit_loop.epoch_loop.batch_idx + 1 >= trainer.num_training_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.enable_validation and self.is_last_step(trainer) and self.validated_step != trainer.global_step:
            trainer.should_stop = True
            trainer.check_val_every_n_epoch = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.validated_step = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step


def _first_loader(loaders: Any) -> Any:
    """The first of Lightning's val loaders (one loader, a list or a dict of them)."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _loggers_of(trainer: L.Trainer, kind: type) -> list[Any]:
    return [lg for lg in trainer.loggers if isinstance(lg, kind)]


class ValidationPredictions(L.Callback):
    """After each validation, the same ``num_images`` validation images (the val set's first ones) with their
    ground truth and the current predictions of score ≥ ``score_threshold`` (``best_f1``: this validation's
    threshold of the best mean F1, said in the picture; or a number):

    * always as a PNG grid in ``<dirpath>/predictions/epoch_<epoch>.png`` (``validate.png`` from
      ``trainer.validate``), ground truth left, predictions right, class names and scores on the boxes;
    * to W&B as ``wandb.Image`` s with ``predictions`` and ``ground_truth`` box overlays, to TensorBoard as
      the grid, under ``key``.

    Boxes are drawn in the network-input frame (the image the model saw, without the batch's padding).
    Runs in ``on_validation_end``, when the module's epoch-end hook has run, and on global rank 0 only."""

    def __init__(
        self,
        num_images: int = 8,
        score_threshold: float | str = "best_f1",
        dirpath: str | None = None,
        tile_size: int = 320,
        images_per_row: int = 2,
        key: str = "val/predictions",
    ) -> None:
        self.num_images, self.score_threshold = num_images, score_threshold
        self.dirpath, self.tile_size, self.images_per_row, self.key = dirpath, tile_size, images_per_row, key
        self._batch: DetectionBatch | None = None

    def threshold(self, pl_module: DetectionModule) -> tuple[float, str]:
        """The drawing threshold and how it was chosen: ``best_f1``, this validation's threshold of the best F1
        (``val/f1_score_thresh``: a detector's scores after minutes of training sit far below a fixed 0.3), or
        the number given."""
        if self.score_threshold != "best_f1":
            return float(self.score_threshold), ""
        best = pl_module.val_metrics.f1_score_thresh
        return (best, " (best F1)") if best is not None else (DEFAULT_DRAWING_THRESHOLD, "")

    def fixed_batch(self, trainer: L.Trainer) -> DetectionBatch | None:
        """The images shown, collated once as the val loader does (so padded as the model sees them)."""
        if self._batch is None:
            loader = _first_loader(trainer.val_dataloaders)
            if loader is None:
                return None
            dataset = loader.dataset
            if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
                self._batch = loader.collate_fn(samples) if samples else None
            else:  # an iterable data set: the first batch, cut to num_images
                batch = next(iter(loader))
                cut = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
                self._batch = DetectionBatch(  # the tensors cut; max_crowd stays a bound for the first images
                    **{k: v[: self.num_images] if isinstance(v, torch.Tensor) else v for k, v in cut.items()}
                )
        return self._batch

    def on_validation_end(self, trainer: L.Trainer, pl_module: DetectionModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        batch = self.fixed_batch(trainer)
        if batch is None:
            return
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            detections = pl_module.net.detect(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
        images, targets, predictions = [], [], []
        for i, det in enumerate(detections):
            h, w = batch.image_sizes[i].tolist()
            sy, sx = batch.scales[i].tolist()
            images.append(batch.images[i, :, :h, :w])
            keep = batch.valid[i]
            targets.append({"boxes": batch.boxes[i][keep], "labels": batch.labels[i][keep]})
            # detect() gives original-image pixels: back to the input frame the image and targets are in
            predictions.append(
                {
                    "boxes": det["boxes"].float().cpu() * torch.tensor([sx, sy, sx, sy]),
                    "scores": det["scores"].float().cpu(),
                    "labels": det["labels"].cpu(),
                }
            )
        names = list(pl_module.net.class_names)
        threshold, threshold_note = self.threshold(pl_module)
        grid = prediction_grid(
            images, targets, predictions, names, threshold, self.tile_size, self.images_per_row, threshold_note
        )
        fitting = trainer.state.fn == TrainerFn.FITTING
        filename = f"epoch_{trainer.current_epoch:03d}.png" if fitting else f"{trainer.state.fn.value}.png"
        save_png(grid, Path(self.dirpath or trainer.default_root_dir, "predictions", filename))

        for lg in _loggers_of(trainer, WandbLogger):
            overlays = []
            for target, pred in zip(targets, predictions):
                shown = pred["scores"] >= threshold
                overlays.append(
                    {
                        "predictions": wandb_boxes(
                            pred["boxes"][shown], pred["labels"][shown], names, pred["scores"][shown]
                        ),
                        "ground_truth": wandb_boxes(target["boxes"], target["labels"], names),
                    }
                )
            lg.log_image(
                self.key,
                [img.permute(1, 2, 0).numpy() for img in images],
                step=trainer.global_step,
                boxes=overlays,
                caption=[f"image {int(k)}" for k in batch.image_ids],
            )
        for lg in _loggers_of(trainer, TensorBoardLogger):
            lg.experiment.add_image(self.key, grid, trainer.global_step)


class PrecisionRecallCurves(L.Callback):
    """After each validation: per-class AP as a W&B table (class, COCO AP from ``val/ap/<class>`` where the
    module logs it, AP@0.5 from the curve) and the precision–recall curves at IoU 0.5 of
    ``pl_module.val_metrics.pr_curves`` (class name → (recall, precision)) as one plot, saved to
    ``<dirpath>/<filename>`` (overwritten each time) and logged to W&B / TensorBoard. Without ``pr_curves``
    there is no plot. Runs in ``on_validation_end`` (after the module computed its metrics), on rank 0 only."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "pr_curve.png",
        key: str = "val/pr_curve",
        table_key: str = "val/ap_per_class",
    ) -> None:
        self.dirpath, self.filename, self.key, self.table_key = dirpath, filename, key, table_key

    def on_validation_end(self, trainer: L.Trainer, pl_module: DetectionModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        curves = pl_module.val_metrics.pr_curves or {}
        step = trainer.global_step
        if curves:
            picture = plot_pr_curves(curves, Path(self.dirpath or trainer.default_root_dir, self.filename))
            for lg in _loggers_of(trainer, WandbLogger):
                lg.log_image(self.key, [picture], step=step)
            for lg in _loggers_of(trainer, TensorBoardLogger):
                lg.experiment.add_image(self.key, picture, step, dataformats="HWC")
        rows = []
        for name in pl_module.net.class_names:
            ap = trainer.callback_metrics.get(f"val/ap/{name}")
            curve = curves.get(name)
            # COCO's AP@0.5 is the mean precision over its 101 recall points; -1 marks a class without objects
            ap50 = float(curve[1].float().mean()) if curve is not None and bool((curve[1] >= 0).all()) else None
            if ap is not None or ap50 is not None:
                rows.append([name, None if ap is None else float(ap), ap50])
        if rows:
            for lg in _loggers_of(trainer, WandbLogger):
                lg.log_table(self.table_key, columns=["class", "AP", "AP50"], data=rows, step=step)
