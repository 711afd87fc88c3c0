"""The LightningModule every paper trains with: a thin wrapper of ``detectors.DenseDetector`` for the trainer.

The network (``self.net``) does the math; this module runs the steps, logs, guards against non-finite losses
(together on every rank), builds the optimiser and the learning-rate schedule, keeps the validation metrics and
writes the config that built it into each checkpoint, so the tools can rebuild the network
(``engine.checkpoint_loading``). ``conf/model/<name>.yaml`` targets ``DetectionModule.from_config_keys``: its keys
are this constructor's arguments, the parts among them passed on to the network, and ``CONFIG_ONLY_KEYS``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor

from datamodules.sampling import derived_seed
from detectors.batch import DetectionBatch
from detectors.detector import DenseDetector
from detectors.priors import PriorGenerator, Priors
from detectors.protocols import Assigner, Backbone, Head, HeadOutputs, Loss, Postprocess
from evaluation.detection_metrics import DetectionMetrics

log = logging.getLogger(__name__)
NONFINITE_LOSS = ("error", "skip")
NET_PREFIX = "net."  # the network's state-dict keys in this module's; checkpoints before it had none
# model config keys that are not the module's arguments: its parts interpolate them (SSD's Table 3 sweep key,
# `model.num_prediction_layers`, read by the backbone and the priors), so one override sets them all
CONFIG_ONLY_KEYS = ("num_prediction_layers",)


def warmup_multistep(
    warmup_steps: int,
    warmup_factor: float,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    linear_decay_steps: int | None = None,
) -> Callable[[int], float]:
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


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """An older train.py checkpoint brought up to date, in place: its state dict under ``net.`` (``with_net_prefix``)
    and the checkpoint callbacks' states under ``ModelCheckpoint``'s key (they were saved by a subclass named
    ``AtomicModelCheckpoint``; Lightning finds a callback's state by its class name), so a resumed run keeps its
    best score."""
    checkpoint["state_dict"] = with_net_prefix(checkpoint.get("state_dict") or {})
    old = "AtomicModelCheckpoint{"
    if isinstance(checkpoint.get("callbacks"), dict):
        checkpoint["callbacks"] = {
            ("ModelCheckpoint{" + k[len(old) :] if k.startswith(old) else k): v
            for k, v in checkpoint["callbacks"].items()
        }
    return checkpoint


def with_net_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state dict with the network's keys under ``net.``: checkpoints written before the network
    was its own module (``backbone.…``, ``head.…``) load as they are."""
    if not state_dict or any(k.startswith(NET_PREFIX) for k in state_dict):
        return dict(state_dict)
    return {NET_PREFIX + k: v for k, v in state_dict.items()}


class DetectionModule(L.LightningModule):
    """Training, validation and prediction steps around a ``DenseDetector`` (docs/ARCHITECTURE.md §2).

    Args:
        backbone, head, priors, assigner, loss, postprocess, class_names, pixel_mean, pixel_std: the network's
            (``detectors.DenseDetector``).
        channels_last: true (NHWC), false (NCHW) or ``auto``: NCHW until ``engine.layout.ChannelsLastAuto``
            measures both at setup.
        optimizer: a factory of the optimiser from the trainable parameters (Hydra ``_partial_``).
        scheduler: ``warmup_multistep``'s arguments, stepped every optimiser step; empty: a constant rate.
        class_metrics: per-class AP logged as ``val/ap/<class>``.
        nonfinite_loss: ``error`` stops the run at a NaN/Inf loss naming step, term and images; ``skip`` leaves
            such a batch out (on every rank), counted as ``train/skipped_batches``.
        finetune_from: a train.py checkpoint that train.py loads before training (``engine.checkpoint_loading.
            finetune_from``), here so the config records it.

    Example:
        >>> module = DetectionModule.from_config(model_config)  # the resolved Hydra `model` config, a dict
        >>> detections = module.net.detect(batch)
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Head | Callable[..., Head],
        priors: PriorGenerator,
        assigner: Assigner,
        loss: Loss,
        postprocess: Postprocess,
        class_names: Sequence[str],
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        channels_last: bool | str = True,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        class_metrics: bool = True,
        nonfinite_loss: str = "error",
        finetune_from: str | None = None,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(
                f"model.nonfinite_loss={nonfinite_loss!r}: choose 'error' (stop the run) or 'skip' "
                f"(skip the batch, counted as train/skipped_batches)"
            )
        # NHWC activations from the first convolution on: faster convolutions on most GPUs (cuDNN) and AVX-512 CPUs
        # (oneDNN), slower on some AVX2 CPUs; `auto`: train.py measures both (engine/layout.py), NCHW until then
        if channels_last not in (True, False, "auto"):
            raise ValueError(
                f"model.channels_last={channels_last!r}: choose true (NHWC), false (NCHW) or auto "
                f"(the faster of the two, measured on this machine before training)"
            )
        self.net = DenseDetector(
            backbone,
            head,
            priors,
            assigner,
            loss,
            postprocess,
            class_names,
            pixel_mean,
            pixel_std,
            channels_last=channels_last is True,
        )
        self.channels_last_auto = channels_last == "auto"
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler or {})
        self.nonfinite_loss, self.skipped_batches = nonfinite_loss, 0
        self.finetune_from = finetune_from
        self.val_metrics = DetectionMetrics(self.net.class_names, class_metrics=class_metrics)
        # the resolved Hydra configs of this module (from_config records it) and of its training data (train.py,
        # once data.batch_size=auto is settled), written into every checkpoint: the tools rebuild the network
        # from the first and feed it images as its validation did from the second
        self.model_config: dict[str, Any] | None = None
        self.data_config: dict[str, Any] | None = None

    @classmethod
    def from_config_keys(cls, **keys: Any) -> DetectionModule:
        """The module a model config's keys build (the ``_target_`` of ``conf/model/*.yaml``): the constructor's
        arguments, ``CONFIG_ONLY_KEYS`` left out."""
        return cls(**{name: value for name, value in keys.items() if name not in CONFIG_ONLY_KEYS})

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any], pretrained: bool = True) -> DetectionModule:
        """The module a resolved ``model`` config (a plain dict) builds, recording it for its checkpoints.
        ``pretrained=False`` leaves out the backbone's pretrained weights (no download, no
        file), for a module whose weights are loaded next."""
        built = copy.deepcopy(dict(model_config))
        if not pretrained and isinstance(built.get("backbone"), dict) and built["backbone"].get("weights"):
            built["backbone"]["weights"] = None
        module = instantiate(built)
        if not isinstance(module, cls):
            raise TypeError(
                f"model._target_={built.get('_target_')!r} builds a {type(module).__name__}, not a "
                f"{cls.__name__}; use one of conf/model/*.yaml as the base"
            )
        module.model_config = copy.deepcopy(dict(model_config))
        return module

    def use_optimizer(self, optimizer_config: Mapping[str, Any]) -> None:
        """Another optimiser config (train.py's linear lr scaling), recorded in ``model_config`` too."""
        self.optimizer_factory = instantiate(dict(optimizer_config))
        if self.model_config is not None:
            self.model_config["optimizer"] = copy.deepcopy(dict(optimizer_config))

    def forward(self, images: Tensor) -> tuple[HeadOutputs, Priors]:
        return self.net(images)

    # --- steps -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: DetectionBatch, batch_idx: int) -> None:
        """The step's random numbers (YOLO's dropout) from (seed, rank, step), on the CPU and every CUDA device: a
        resumed run draws what the uninterrupted one drew on every rank. A checkpoint's generator states are rank
        0's process's, in which the generator of GPU r > 0 was seeded but never drawn from."""
        torch.manual_seed(derived_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank, self.global_step))

    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor | None:
        losses = self.net.compute_losses(batch)
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
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # not attached to a trainer (a step run by hand: tests, bench/): no other rank
            return bad
        return strategy.reduce_boolean_decision(bad, all=False)

    def _handle_nonfinite(self, losses: dict[str, Tensor], batch: DetectionBatch) -> None:
        terms = ", ".join(f"{k}={v.item():g}" for k, v in losses.items())
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()))]
        where = (
            f"step {self.global_step}: non-finite {'/'.join(bad)} ({terms}) on the batch of image ids "
            f"{batch.image_ids.tolist()}"
            if bad
            else f"step {self.global_step}: a non-finite training loss on another rank (here: {terms})"
        )
        if self.nonfinite_loss == "error":
            raise FloatingPointError(
                f"{where}. Check those images' boxes (data.<set>[id]), lower model.optimizer.lr or set "
                f"trainer.gradient_clip_val; model.nonfinite_loss=skip leaves such batches out instead"
            )
        # returning None skips backward and the optimizer step in Lightning's automatic optimisation
        self.skipped_batches += 1
        log.warning("%s: batch skipped (model.nonfinite_loss=skip), %d skipped so far", where, self.skipped_batches)
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=len(batch))
        return None

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Tensor]]:
        """The batch's detections, into the metrics and returned (callbacks see them in on_validation_batch_end)."""
        detections = self.net.detect(batch)
        self.val_metrics.to(self.device).update(detections, batch.targets_in_original_frame())
        return detections

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute("val")
        self.val_metrics.reset()
        shown = {"val/map", "val/map_50"}
        self.log_dict({k: v for k, v in metrics.items() if k not in shown})
        self.log_dict({k: metrics[k] for k in shown}, prog_bar=True)

    def test_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Tensor]]:
        return self.net.detect(batch)

    # --- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> OptimizerLRScheduler:
        if self.optimizer_factory is None:
            raise ValueError(
                "model.optimizer is not set: give e.g. {_target_: torch.optim.SGD, _partial_: true, lr: 0.01}"
            )
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if not self.scheduler_config:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_multistep(**self.scheduler_config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.model_config
        checkpoint["class_names"] = self.net.class_names
        checkpoint["data_config"] = self.data_config
        # the score threshold of the best F1 at the last validation: predict.py draws boxes from it by default
        checkpoint["f1_score_thresh"] = self.val_metrics.f1_score_thresh

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before it restores the weights and the callbacks: an older checkpoint's keys are
        # brought up to date first
        upgrade_checkpoint(checkpoint)
