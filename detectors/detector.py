"""The one LightningModule for every paper: it wires the parts and runs the steps; the math is in them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .batch import DetectionBatch
from evaluation.metrics import DetectionMetrics

log = logging.getLogger(__name__)
NONFINITE_LOSS = ("error", "skip")


def warmup_multistep(warmup_steps: int, warmup_factor: float, milestones: Sequence[int] = (),
                     gamma: float = 0.1, linear_decay_steps: int | None = None) -> Callable[[int], float]:
    """LR multiplier per step: linear ramp from ``warmup_factor`` over ``warmup_steps``, then ×``gamma``
    at each milestone (the Detectron schedule used by the RetinaNet paper). With ``linear_decay_steps``, the
    multiplier also falls linearly from 1 at the end of the warm-up to 0 at that step (for short budgets, where
    a linear decay to zero beats step decays: Li et al., "Budgeted Training", ICLR 2020)."""
    milestones = sorted(int(m) for m in milestones)

    def factor(step: float) -> float:
        ramp = 1.0
        if step < warmup_steps:
            ramp = warmup_factor + (1 - warmup_factor) * step / warmup_steps
        elif linear_decay_steps:
            ramp = max(0.0, 1 - (step - warmup_steps) / max(1, linear_decay_steps - warmup_steps))
        return ramp * gamma ** sum(step >= m for m in milestones)

    return factor


class Detector(L.LightningModule):
    """A dense one-stage detector as a composition of parts (docs/ARCHITECTURE.md §2).

    backbone(images) → features; head(features) → {cls_logits (B,N,K), box_deltas (B,N,4)};
    priors(image size, feature sizes) → Priors; assigner(priors, batch, K, outputs) → per-prior targets;
    loss(outputs, targets, priors) → named terms; postprocess(outputs, priors, image sizes) → detections.
    ``head`` is a factory completed here with ``in_channels`` from the backbone and ``num_anchors`` from the
    priors, so those settings are given once. Images arrive as uint8 and are normalised here, on the device.
    """

    def __init__(self, backbone: nn.Module, head: Callable[..., nn.Module], priors: Any, assigner: Any,
                 loss: Any, postprocess: Any, class_names: Sequence[str],
                 pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: dict[str, Any] | None = None, num_prediction_layers: int | None = None,
                 class_metrics: bool = True, nonfinite_loss: str = "error", finetune_from: str | None = None,
                 channels_last: bool | str = True) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(f"model.nonfinite_loss={nonfinite_loss!r}: choose 'error' (stop the run) or 'skip' "
                             f"(skip the batch, counted as train/skipped_batches)")
        # a NaN/Inf loss stops the run naming the step, term and images (error), or its batch is left out (skip)
        self.nonfinite_loss, self.skipped_batches = nonfinite_loss, 0
        # SSD's Table 3 sweep key: its backbone and priors read it from the config; kept for the record
        self.num_prediction_layers = num_prediction_layers
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.backbone = backbone
        self.priors = priors
        if not isinstance(head, nn.Module):  # a factory: the head's widths come from the parts it joins
            head = head(in_channels=backbone.out_channels, num_anchors=priors.num_anchors_per_location)
        self.head = head
        self.assigner, self.loss, self.postprocess = assigner, loss, postprocess
        # mean/std are given for [0, 1] images (torchvision's convention); stored ×255 for uint8 input
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1) * 255, persistent=False)
        # NHWC activations from the first convolution on: faster convolutions on most GPUs (cuDNN) and AVX-512 CPUs
        # (oneDNN), slower on some AVX2 CPUs; `auto`: train.py measures both (engine/layout.py), NCHW until then
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"model.channels_last={channels_last!r}: choose true (NHWC), false (NCHW) or auto "
                             f"(the faster of the two, measured on this machine before training)")
        self.channels_last_auto = channels_last == "auto"
        self.use_channels_last(channels_last is True)
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {})
        # class_metrics: per-class AP as val/ap/<class>; false keeps logs short with many classes
        self.val_metrics = DetectionMetrics(self.class_names, class_metrics=class_metrics)
        self.model_config: dict | None = None  # the Hydra config that built this module, saved in checkpoints
        # the data config it was trained with (eval.py/predict.py/export.py read its val_transform), saved too
        self.data_config: dict | None = None
        # model.finetune_from: train.py loads that checkpoint (engine/checkpoint_loading.py); kept for the record
        self.finetune_from = finetune_from

    # --- the model -------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], Any]:
        """uint8 (B,3,H,W) → raw head outputs and the priors they are relative to."""
        features, priors = self.features(images)
        return self.head(features), priors

    def features(self, images: Tensor) -> tuple[list[Tensor], Any]:
        """uint8 (B,3,H,W) → the backbone's feature maps and the priors on them."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        if self.channels_last:  # convolutions keep the layout of their input, so every feature map follows
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        priors = self.priors(tuple(images.shape[-2:]), [tuple(f.shape[-2:]) for f in features], images.device)
        return features, priors

    def use_channels_last(self, enabled: bool) -> None:
        """NHWC (True) or NCHW (False) from here on: the activations from the first convolution on, and the weights
        too, so that no convolution reorders its weight (and its weight's gradient) every call."""
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def compile_parts(self, **options: Any) -> None:
        """``torch.compile`` the backbone and each part of the head, in place (``options`` go to torch.compile).

        Not this module's forward: training reaches the parts without it (RetinaNet's sparse box path calls the
        head's branches apart), so a compiled forward would leave training eager. State-dict keys stay as they are.
        """
        for part in (self.backbone, *self.head.children()):
            part.compile(**options)

    @property
    def sparse_box_training(self) -> bool:
        """Whether training runs the box branch only where the loss reads it: the head can
        (``RetinaNetHead.box_deltas_where``), the loss says where it reads (``box_deltas_used``) and the
        assignment, which then comes first, needs no predicted boxes (unlike YOLO's)."""
        return (getattr(self.head, "sparse_box_training", False) and hasattr(self.loss, "box_deltas_used")
                and not getattr(self.assigner, "uses_predictions", False))

    def compute_losses(self, batch: DetectionBatch) -> dict[str, Tensor]:
        features, priors = self.features(batch.images)
        # sparse: the assignment first (RetinaNet's needs no predictions), box deltas only where the loss reads them
        sparse = self.sparse_box_training
        outputs = {"cls_logits": self.head.classify(features)} if sparse else self.head(features)
        with torch.no_grad():  # YOLO's assignment depends on the current predictions
            assigned = self.assigner(priors, batch, self.num_classes, outputs)
        if sparse:
            used = self.loss.box_deltas_used(assigned, self.num_classes)
            outputs["box_deltas"] = self.head.box_deltas_where(features, used)
        return self.loss(outputs, assigned, priors)

    @torch.no_grad()
    def detect(self, batch: DetectionBatch) -> list[dict[str, Tensor]]:
        """Detections per image, boxes in the original image's pixels."""
        outputs, priors = self(batch.images)
        detections = self.postprocess(outputs, priors, batch.image_sizes)
        for i, det in enumerate(detections):
            det["boxes"] = batch.boxes_in_original_frame(det["boxes"], i)
        return detections

    # --- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor | None:
        losses = self.compute_losses(batch)
        total = sum(losses.values())
        if self._nonfinite(total):
            return self._handle_nonfinite(losses, batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch))
        self.log("train/loss", total, prog_bar=True, batch_size=len(batch))
        return total

    def _nonfinite(self, total: Tensor) -> bool:
        """Whether the loss is NaN/Inf on any rank: all ranks must skip or stop together (one rank leaving out its
        backward pass would leave the others waiting in DDP's gradient all-reduce)."""
        bad = not bool(torch.isfinite(total.detach()))
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(bad, all=False) if trainer is not None else bad

    def _handle_nonfinite(self, losses: dict[str, Tensor], batch: DetectionBatch) -> None:
        terms = ", ".join(f"{k}={v.item():g}" for k, v in losses.items())
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()))]
        where = (f"step {self.global_step}: non-finite {'/'.join(bad)} ({terms}) on the batch of image ids "
                 f"{batch.image_ids.tolist()}" if bad else
                 f"step {self.global_step}: a non-finite training loss on another rank (here: {terms})")
        if self.nonfinite_loss == "error":
            raise FloatingPointError(
                f"{where}. Check those images' boxes (data.<set>[id]), lower model.optimizer.lr or set "
                f"trainer.gradient_clip_val; model.nonfinite_loss=skip leaves such batches out instead")
        # returning None skips backward and the optimizer step in Lightning's automatic optimisation
        self.skipped_batches += 1
        log.warning("%s: batch skipped (model.nonfinite_loss=skip), %d skipped so far", where, self.skipped_batches)
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=len(batch))
        return None

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self.val_metrics.to(self.device).update(self.detect(batch), batch.targets_in_original_frame())

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute("val")
        self.val_metrics.reset()
        shown = {"val/map", "val/map_50"}
        self.log_dict({k: v for k, v in metrics.items() if k not in shown})
        self.log_dict({k: metrics[k] for k in shown}, prog_bar=True)

    def test_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self.detect(batch)

    # --- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("model.optimizer is not set: give e.g. "
                             "{_target_: torch.optim.SGD, _partial_: true, lr: 0.01}")
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if not self.scheduler_cfg:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_multistep(**self.scheduler_cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.model_config
        checkpoint["class_names"] = self.class_names
        checkpoint["data_config"] = self.data_config
