"""The network of every paper: a dense one-stage detector as a composition of parts, with no trainer code.

``DenseDetector`` normalises uint8 images, runs backbone → head, computes the training losses (priors → assigner
→ loss) and the detections (postprocess); ``engine.detection_module.DetectionModule`` wraps it for Lightning, and
the tools (eval.py, predict.py, export.py) use it directly. The parts' contracts: ``detectors.protocols``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batch import DetectionBatch
from .priors import PriorGenerator, Priors
from .protocols import Assigner, Backbone, Head, HeadOutputs, Loss, Postprocess, SparseBoxHead


class DenseDetector(nn.Module):
    """A dense one-stage detector (docs/ARCHITECTURE.md §2): the paper's parts, wired.

    backbone(normalised images) → feature maps; head(features) → ``HeadOutputs``; priors(input size, feature
    sizes) → ``Priors``; assigner(priors, batch, K, outputs) → per-prior targets; loss(outputs, targets, priors)
    → named terms; postprocess(outputs, priors, image sizes) → detections.

    Args:
        backbone: a ``protocols.Backbone``.
        head: a ``protocols.Head``, or a factory completed here with ``in_channels`` (the backbone's
            ``out_channels``) and ``num_anchors`` (the priors' per location), so those widths are given once.
        priors, assigner, loss, postprocess: the paper's parts (``protocols``).
        class_names: the K class names; labels are positions in this list.
        pixel_mean, pixel_std: per channel, for images in [0, 1] (torchvision's convention).
        channels_last: NHWC activations and weights from the first convolution on (``use_channels_last``).

    Example:
        >>> from hydra import compose, initialize
        >>> from hydra.utils import instantiate
        >>> with initialize(config_path="../conf", version_base="1.3"):
        ...     cfg = compose("train", overrides=["experiment=retinanet_shapes"])
        >>> detector = instantiate(cfg.model).net  # the LightningModule's network
        >>> outputs, priors = detector(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
        >>> sorted(outputs), outputs["box_deltas"].shape[1] == len(priors.boxes)
        (['box_deltas', 'class_scores'], True)
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
        channels_last: bool = False,
    ) -> None:
        super().__init__()
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
        self.use_channels_last(channels_last)

    def forward(self, images: Tensor) -> tuple[HeadOutputs, Priors]:
        """uint8 (B,3,H,W) → the head's raw outputs and the priors they are relative to (the exported network)."""
        features, priors = self.features(images)
        return self.head(features), priors

    def features(self, images: Tensor) -> tuple[list[Tensor], Priors]:
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
        """Whether training runs the box branch only where the loss reads it: the head declares it can
        (``protocols.SparseBoxHead``) and the assignment, which then comes first, needs no predictions (YOLO's
        does: ``Assigner.uses_predictions``)."""
        return self.head.sparse_box_training and not self.assigner.uses_predictions

    def compute_losses(self, batch: DetectionBatch) -> dict[str, Tensor]:
        """The loss terms on a training batch, by name (``loss_cls``, ``loss_box``, ...); their sum is trained."""
        features, priors = self.features(batch.images)
        if not self.sparse_box_training:
            outputs = self.head(features)
            with torch.no_grad():  # YOLO's assignment depends on the current predictions
                assigned = self.assigner(priors, batch, self.num_classes, outputs)
            return self.loss(outputs, assigned, priors)
        # the assignment first (it needs no predictions), the box deltas only where the loss reads them
        head: SparseBoxHead = self.head  # type: ignore[assignment]  (it declared sparse_box_training)
        outputs: HeadOutputs = {"class_scores": head.classify(features)}
        with torch.no_grad():
            assigned = self.assigner(priors, batch, self.num_classes, outputs)
        used = self.loss.box_deltas_used(assigned, self.num_classes)
        outputs["box_deltas"] = head.box_deltas_where(features, used)
        return self.loss(outputs, assigned, priors)

    @torch.no_grad()
    def detect(self, batch: DetectionBatch) -> list[dict[str, Tensor]]:
        """Detections per image, boxes in the original image's pixels."""
        outputs, priors = self(batch.images)
        detections = self.postprocess(outputs, priors, batch.image_sizes)
        for i, det in enumerate(detections):
            det["boxes"] = batch.boxes_in_original_frame(det["boxes"], i)
        return detections
