"""The contracts between a detector's parts (docs/ARCHITECTURE.md §2): what each part takes and gives.

``DenseDetector`` composes one of each; every paper's parts keep these signatures, so any part may be swapped in
the config (``conf/model/<name>.yaml``) for another that keeps them. The head's outputs have one set of names for
all three papers (``HeadOutputs``); the sparse box path of training is chosen from attributes every part declares
(``Head.sparse_box_training``, ``Assigner.uses_predictions``), never by probing for methods. The priors'
contract is the base class ``priors.PriorGenerator``.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

from torch import Tensor

from .batch import DetectionBatch
from .priors import Priors


class HeadOutputs(TypedDict, total=False):
    """A head's raw outputs, flattened over levels and locations in the priors' order (B: batch, N: priors).

    * ``class_scores``: the class outputs before any sigmoid or softmax: (B, N, K) sigmoid logits (RetinaNet),
      (B, N, K + 1) softmax logits with background at index 0 (SSD), (B, S·S, K) class probabilities per grid
      cell (YOLOv1, trained by squared error, one set per cell rather than per prior).
    * ``box_deltas``: (B, N, 4), each prior's box relative to it: encoded offsets (RetinaNet, SSD) or
      (x, y, √w, √h) within the cell (YOLOv1).
    * ``objectness``: (B, N), YOLOv1's confidence per predicted box; absent for the other two.
    """

    class_scores: Tensor
    box_deltas: Tensor
    objectness: Tensor


class Backbone(Protocol):
    """Normalised images (B, 3, H, W) → feature maps, finest first; ``out_channels``: their channels, one int
    or one per map, as the head's ``in_channels`` takes them."""

    @property  # read-only: an `int` (ResNetFPN) or `list[int]` (VGG16Atrous) attribute keeps it, a settable one not
    def out_channels(self) -> int | list[int]: ...

    def __call__(self, images: Tensor) -> list[Tensor]: ...


class Head(Protocol):
    """Feature maps → ``HeadOutputs``. ``sparse_box_training``: whether training may ask for the box deltas only
    where the loss reads them; a head that declares it True is a ``SparseBoxHead``, the others declare False."""

    sparse_box_training: bool

    def __call__(self, features: list[Tensor]) -> HeadOutputs: ...


class SparseBoxHead(Head, Protocol):
    """A head whose box branch can run apart (RetinaNet's): ``classify`` gives the class scores alone,
    ``box_deltas_where`` the box deltas at the priors a (B, N) mask marks, as (B, N, 4) with zeros elsewhere."""

    def classify(self, features: list[Tensor]) -> Tensor: ...

    def box_deltas_where(self, features: list[Tensor], needed: Tensor) -> Tensor: ...


class Assigner(Protocol):
    """(priors, batch, K, outputs) → per-prior targets: ``labels`` (B, N) with K for background (and the ignore
    label where the paper ignores), ``boxes`` (B, N, 4) and what the loss needs besides. Runs under ``no_grad``.
    ``uses_predictions``: whether it reads the current outputs (YOLOv1's responsible predictor), which then have
    to be computed in full before it."""

    uses_predictions: bool

    def __call__(
        self, priors: Priors, targets: DetectionBatch, num_classes: int, outputs: HeadOutputs | None = None
    ) -> dict[str, Tensor]: ...


class Loss(Protocol):
    """(outputs, assigned targets, priors) → named loss terms (``loss_cls``, ``loss_box``, ...), each a scalar;
    the detector sums them. ``box_deltas_used``: the (B, N) mask of priors whose box deltas the loss reads
    (for a head's sparse box path)."""

    def __call__(self, outputs: HeadOutputs, assigned: dict[str, Tensor], priors: Priors) -> dict[str, Tensor]: ...

    def box_deltas_used(self, assigned: dict[str, Tensor], num_classes: int) -> Tensor: ...


class Postprocess(Protocol):
    """(outputs, priors, each image's (h, w) in the input frame) → per image ``boxes`` (xyxy, input frame),
    ``scores``, ``labels``."""

    def __call__(self, outputs: HeadOutputs, priors: Priors, image_sizes: Tensor) -> list[dict[str, Tensor]]: ...
