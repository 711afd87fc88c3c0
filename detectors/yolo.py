"""YOLOv1's parts (Redmon et al., You Only Look Once: Unified, Real-Time Object Detection, 2016): the
24-layer network (9 for Fast YOLO), the fully connected head giving an S×S×(B·5 + C) tensor, the grid, the
prediction-dependent "responsible predictor" assignment, the sum-squared loss and the inference.
``conf/model/yolo.yaml`` / ``yolo_fast.yaml`` compose them.

Per cell the head predicts B boxes (x, y, √w, √h, confidence) and one set of C class probabilities:
x, y are offsets of the box centre within its cell, w, h are relative to the image (paper §2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .backbones import build_resnet, freeze_resnet_stages
from .batch import DetectionBatch
from .boxes import aligned_box_iou
from .postprocess import nms_per_image
from .priors import PriorGenerator, Priors
from .protocols import HeadOutputs

# Paper Fig. 3: (kernel, filters, stride) per conv, "M" = 2×2 max-pool stride 2; 24 convolutional layers
YOLO_LAYERS = (
    (7, 64, 2),
    "M",
    (3, 192, 1),
    "M",
    (1, 128, 1),
    (3, 256, 1),
    (1, 256, 1),
    (3, 512, 1),
    "M",
    *((1, 256, 1), (3, 512, 1)) * 4,
    (1, 512, 1),
    (3, 1024, 1),
    "M",
    *((1, 512, 1), (3, 1024, 1)) * 2,
    (3, 1024, 1),
    (3, 1024, 2),
    (3, 1024, 1),
    (3, 1024, 1),
)
# Fast YOLO: the paper says only "9 instead of 24 convolutional layers and fewer filters"; this is Darknet's
# tiny YOLOv1 layout as we read it: 3×3 convs 16 → 1024 with six max-pools, then 1024 and 256 filters.
FAST_YOLO_LAYERS = (
    (3, 16, 1),
    "M",
    (3, 32, 1),
    "M",
    (3, 64, 1),
    "M",
    (3, 128, 1),
    "M",
    (3, 256, 1),
    "M",
    (3, 512, 1),
    "M",
    (3, 1024, 1),
    (3, 1024, 1),
    (3, 256, 1),
)


class YOLOv1Network(nn.Module):
    """The convolutional part of YOLO (paper Fig. 3) with leaky ReLU (0.1) after every layer: at 448 px
    its last map is 7×7×1024 (Fast YOLO: 7×7×256). ``width`` scales the filters (1.0 is the paper);
    ``norm='bn'`` adds BatchNorm after each convolution (as YOLOv2 did; not in YOLOv1)."""

    def __init__(self, variant: str = "full", width: float = 1.0, norm: str = "none") -> None:
        super().__init__()
        if variant not in ("full", "fast"):
            raise ValueError(f"backbone.variant={variant!r}: choose 'full' (24 conv layers) or 'fast' (9)")
        if norm not in ("none", "bn"):
            raise ValueError(f"backbone.norm={norm!r}: choose 'none' (paper) or 'bn'")
        layers: list[nn.Module] = []
        cin = 3
        for spec in YOLO_LAYERS if variant == "full" else FAST_YOLO_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            k, filters, stride = spec
            cout = max(8, int(round(filters * width)))
            layers.append(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=norm == "none"))
            if norm == "bn":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.1, inplace=True))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.layers(images)]


class ResNetC5(nn.Module):
    """A torchvision ResNet's last stage (C5, stride 32) as YOLO's convolutional part, for users without a
    Darknet-pretrained network and for CPU-sized runs (ImageNet weights by name or a local file).
    ``last_stage=4`` ends at C4 (stride 16, half C5's channels): a grid twice as fine at the same input."""

    def __init__(
        self,
        depth: int = 18,
        weights: str | None = None,
        norm: str = "bn",
        trainable_layers: int = 5,
        fold_frozen_bn: bool = True,
        last_stage: int = 5,
    ) -> None:
        super().__init__()
        if last_stage not in (4, 5):
            raise ValueError(f"model.backbone.last_stage={last_stage}: 5 (C5, stride 32) or 4 (C4, stride 16)")
        net = build_resnet(depth, weights, norm, fold_frozen_bn)
        freeze_resnet_stages(net, trainable_layers)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4][: last_stage - 1]
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages)
        self.out_channels = net.fc.in_features // 2 ** (5 - last_stage)  # each stage doubles its channels

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.body(images)]


class GridCells(PriorGenerator):
    """The S×S grid with B predictors per cell: prior i is predictor i % B of cell i // B (row-major); its
    box is the cell. YOLO has no anchors; the cell is what its x, y are relative to."""

    def __init__(self, grid_size: int = 7, boxes_per_cell: int = 2) -> None:
        super().__init__()
        self.grid_size, self.boxes_per_cell = grid_size, boxes_per_cell

    @property
    def num_anchors_per_location(self) -> int:
        return self.boxes_per_cell

    def _generate(self, image_size, feature_sizes, device) -> Priors:
        h, w = image_size
        s = self.grid_size
        ys, xs = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        cells = torch.stack((xs * w / s, ys * h / s, (xs + 1) * w / s, (ys + 1) * h / s), -1).reshape(-1, 4)
        boxes = cells.repeat_interleave(self.boxes_per_cell, 0).to(device)
        return Priors(boxes, [len(boxes)])


class YOLOv1Head(nn.Module):
    """Paper §2.2: two fully connected layers on the last S×S map (leaky ReLU, dropout 0.5 after the first),
    the last linear, giving S×S×(B·5 + C). Feature maps of another size (a ResNet at stride 32) are
    average-pooled to S×S first. Outputs: ``box_deltas`` (batch, S·S·B, 4) as (x, y, √w, √h), ``objectness``
    (batch, S·S·B), the confidence of each box, and ``class_scores`` (batch, S·S, C), the class probabilities.

    ``fully_connected=False`` makes both layers convolutions (3×3 then 1×1, each cell predicted from its own
    neighbourhood, as YOLOv2 later did): not the paper, but it learns much faster from scratch (CPU recipe).
    """

    sparse_box_training = False  # boxes, confidences and classes come out of one layer

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        grid_size: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
        fully_connected: bool = True,
    ) -> None:
        super().__init__()
        self.grid_size, self.boxes_per_cell, self.num_classes = grid_size, num_anchors, num_classes
        self.fully_connected = fully_connected
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        per_cell = num_anchors * 5 + num_classes
        if fully_connected:
            self.fc = nn.Sequential(
                nn.Flatten(),
                nn.Linear(in_channels * grid_size * grid_size, hidden),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, grid_size * grid_size * per_cell),
            )
        else:
            self.fc = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, per_cell, 1),
            )

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        out = self.fc(self.pool(features[-1]))
        b, s, nb = out.shape[0], self.grid_size, self.boxes_per_cell
        if not self.fully_connected:  # (batch, per_cell, S, S) → cells row-major
            out = out.flatten(2).transpose(1, 2)
        out = out.reshape(b, s * s, nb * 5 + self.num_classes)
        boxes = out[..., : nb * 5].reshape(b, s * s * nb, 5)
        return {"box_deltas": boxes[..., :4], "objectness": boxes[..., 4], "class_scores": out[..., nb * 5 :]}


def decode_boxes(box: Tensor, priors: Priors, image_size: tuple[int, int], grid_size: int) -> Tensor:
    """(x, y, √w, √h) → xyxy pixels: the centre is offset within its cell, the size relative to the image.
    A negative √w predicts no width (clamped), so no square root of a negative number is ever taken."""
    h, w = image_size
    cell = priors.boxes
    cx = cell[:, 0] + box[..., 0] * (w / grid_size)
    cy = cell[:, 1] + box[..., 1] * (h / grid_size)
    # √w is predicted: squared without a cap, 1e20 would be inf; 4 = 16 image widths, beyond any real box
    bw = box[..., 2].clamp(0, 4.0) ** 2 * w
    bh = box[..., 3].clamp(0, 4.0) ** 2 * h
    return torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), -1)


def responsible_objects(boxes: Tensor, ok: Tensor, image_size: tuple[int, int], grid_size: int) -> Tensor:
    """Paper §2: the cell holding an object's centre is responsible for it, one object a cell (one set of class
    probabilities, §2.4): where several centres share a cell, the largest object takes it (ties: the first listed).

    Example: S = 2 on a 100×100 image, objects A (0, 0, 40, 40) and B (10, 10, 30, 30), both centred in cell 0,
    and C (60, 60, 90, 90) in cell 3: cell 0 takes A (the larger), B gets no cell, cell 3 takes C → [0, -1, -1, 2].

    Args:
        boxes: (batch, M, 4) xyxy pixels of ``image_size``; ok: (batch, M) the objects to place (valid, not crowd).
    Returns: (batch, S·S) the index of the object each cell is responsible for, -1 where none (cells row-major).
    """
    s, (h, w) = grid_size, image_size
    batch, m = ok.shape
    cx = ((boxes[..., 0] + boxes[..., 2]) / 2).clamp(0, w - 1e-3)
    cy = ((boxes[..., 1] + boxes[..., 3]) / 2).clamp(0, h - 1e-3)
    cell = (cy * s / h).long().clamp(0, s - 1) * s + (cx * s / w).long().clamp(0, s - 1)  # (batch, M)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).double()
    key = torch.where(ok, area * (m + 1) + (m - torch.arange(m, device=boxes.device)), -1.0)  # unique per image
    best_key = torch.full((batch, s * s), -1.0, dtype=torch.float64, device=boxes.device)
    best_key.scatter_reduce_(1, cell, key, reduce="amax")
    winner = ok & (key == torch.gather(best_key, 1, cell))
    # each cell's winning object, -1 where none: a scatter, no host read (a GPU sync)
    index = torch.where(winner, torch.arange(m, device=boxes.device), -1)
    cell_gt = torch.full((batch, s * s), -1, dtype=torch.long, device=boxes.device)
    return cell_gt.scatter_reduce_(1, cell, index, reduce="amax")


class ResponsiblePredictorAssigner:
    """Paper §2.2: the cell containing an object's centre is responsible for it, and of its B predictors the
    one whose current prediction has the highest IoU with the object is "responsible" (so predictors
    specialise). Computed from the detached predictions, for the whole batch at once.

    When no predictor of the cell overlaps its object (every IoU 0: most cells early in training), the paper
    does not say; ``no_overlap='nearest'`` (default) takes the predictor whose box is nearest the object, the
    lowest root-mean-square difference of centre, width and height in image fractions, as darknet's detection
    layer does (``box_rmse``), so both predictors start to learn; ``'first'`` takes predictor 0, which then
    learns every object while predictor 1 waits for an overlap.

    A cell can hold one object only (one set of class probabilities per cell, paper §2.4): when several
    centres fall in one cell, the largest object takes it (ties: the first listed) and the others get no
    predictor in this image. (Darknet keeps the last one listed; "largest" does not depend on file order.)
    Crowd boxes are not assigned.

    Returns ``labels`` (batch, S·S·B): the class for responsible predictors, ``num_classes`` otherwise;
    ``boxes`` (batch, S·S·B, 4): the object of each predictor's cell; ``iou`` (batch, S·S·B): IoU of each
    prediction with that object; ``cell_labels`` (batch, S·S): the class of each cell's object or
    ``num_classes``.
    """

    uses_predictions = True  # the responsible predictor is the one whose box overlaps the object most

    def __init__(self, grid_size: int = 7, no_overlap: str = "nearest") -> None:
        if no_overlap not in {"nearest", "first"}:
            raise ValueError(f"assigner.no_overlap={no_overlap!r}: choose 'nearest' (darknet) or 'first'")
        self.grid_size, self.no_overlap = grid_size, no_overlap

    @torch.no_grad()
    def __call__(
        self, priors: Priors, targets: DetectionBatch, num_classes: int, outputs: HeadOutputs | None = None
    ) -> dict[str, Tensor]:
        if outputs is None:
            raise ValueError("ResponsiblePredictorAssigner needs the current predictions (outputs)")
        s = self.grid_size
        batch = targets.labels.shape[0]
        h, w = targets.input_size
        boxes = targets.boxes
        cell_gt = responsible_objects(boxes, targets.valid & ~targets.crowd, (h, w), s)

        has_obj = cell_gt >= 0  # (batch, S·S)
        gt_of_cell = torch.gather(boxes, 1, cell_gt.clamp(min=0)[..., None].expand(-1, -1, 4))
        cell_labels = torch.where(has_obj, torch.gather(targets.labels, 1, cell_gt.clamp(min=0)), num_classes)

        nb = priors.boxes.shape[0] // (s * s)
        pred = decode_boxes(outputs["box_deltas"].detach().float(), priors, (h, w), s).view(batch, s * s, nb, 4)
        iou = aligned_box_iou(pred, gt_of_cell[:, :, None, :])  # (batch, S·S, B)
        choice = iou
        if self.no_overlap == "nearest":  # no overlap in the cell: the lowest RMSE (negated) is the highest score
            diff = box_convert(pred, "xyxy", "cxcywh") - box_convert(gt_of_cell[:, :, None, :], "xyxy", "cxcywh")
            scaled = torch.stack((diff[..., 0] / w, diff[..., 1] / h, diff[..., 2] / w, diff[..., 3] / h), -1)
            rmse = scaled.square().sum(-1).sqrt()  # image fractions (a tensor of the sizes would be a host copy)
            choice = torch.where(iou.amax(dim=2, keepdim=True) > 0, iou, -rmse)
        responsible = torch.zeros_like(iou, dtype=torch.bool)
        responsible.scatter_(2, choice.argmax(dim=2, keepdim=True), True)  # ties: the first predictor
        responsible &= has_obj[..., None]
        labels = torch.where(responsible, cell_labels[..., None], num_classes).view(batch, -1)
        return {
            "labels": labels,
            "boxes": gt_of_cell.repeat_interleave(nb, 1),
            "iou": iou.view(batch, -1),
            "cell_labels": cell_labels,
        }


class YOLOv1Loss:
    """Paper eq. 3, sum-squared error summed over the grid and averaged over the batch:

      λ_coord Σ 1ᵒᵇʲ_ij [(x−x̂)² + (y−ŷ)² + (√w−√ŵ)² + (√h−√ĥ)²]      responsible predictors
      + Σ 1ᵒᵇʲ_ij (C−Ĉ)²  +  λ_noobj Σ 1ⁿᵒᵒᵇʲ_ij (C−Ĉ)²                 all other predictors, in object cells too
      + Σ 1ᵒᵇʲ_i Σ_c (p(c)−p̂(c))²                                      cells that contain an object

    The confidence target of a responsible predictor is the IoU of its prediction with the object
    (``confidence_target='iou'``, paper §2) or 1 (``'one'``). Terms are logged as ``loss_box``,
    ``loss_obj``, ``loss_noobj`` and ``loss_cls``.
    """

    def __init__(
        self, lambda_coord: float = 5.0, lambda_noobj: float = 0.5, confidence_target: str = "iou", grid_size: int = 7
    ) -> None:
        if confidence_target not in ("iou", "one"):
            raise ValueError(f"loss.confidence_target={confidence_target!r}: choose 'iou' (paper) or 'one'")
        self.lambda_coord, self.lambda_noobj = lambda_coord, lambda_noobj
        self.confidence_target, self.grid_size = confidence_target, grid_size

    def __call__(self, outputs: HeadOutputs, assigned: dict[str, Tensor], priors: Priors) -> dict[str, Tensor]:
        box, conf, probs = outputs["box_deltas"].float(), outputs["objectness"].float(), outputs["class_scores"].float()
        batch, _, num_classes = probs.shape
        s = self.grid_size
        responsible = assigned["labels"] < num_classes  # (batch, N)
        gt = assigned["boxes"]
        cell = priors.boxes  # (N, 4): each predictor's cell
        cell_w, cell_h = (cell[:, 2] - cell[:, 0]), (cell[:, 3] - cell[:, 1])
        image_w, image_h = cell_w * s, cell_h * s
        target = torch.stack(
            (
                ((gt[..., 0] + gt[..., 2]) / 2 - cell[:, 0]) / cell_w,
                ((gt[..., 1] + gt[..., 3]) / 2 - cell[:, 1]) / cell_h,
                ((gt[..., 2] - gt[..., 0]) / image_w).clamp(min=0).sqrt(),
                ((gt[..., 3] - gt[..., 1]) / image_h).clamp(min=0).sqrt(),
            ),
            -1,
        )
        # masked sums as torch.where, not boolean-mask indexing: the same terms with no host read (a GPU sync)
        loss_box = self.lambda_coord * torch.where(responsible, ((box - target) ** 2).sum(-1), 0.0).sum()
        conf_target = assigned["iou"] if self.confidence_target == "iou" else torch.ones_like(conf)
        loss_obj = torch.where(responsible, (conf - conf_target) ** 2, 0.0).sum()
        loss_noobj = self.lambda_noobj * torch.where(responsible, 0.0, conf**2).sum()
        has_obj = assigned["cell_labels"] < num_classes  # (batch, S·S)
        classes = torch.arange(num_classes, device=probs.device)
        onehot = (assigned["cell_labels"][..., None] == classes).to(probs)  # one_hot checks its input on the host
        loss_cls = torch.where(has_obj, ((probs - onehot) ** 2).sum(-1), 0.0).sum()
        return {
            "loss_box": loss_box / batch,
            "loss_obj": loss_obj / batch,
            "loss_noobj": loss_noobj / batch,
            "loss_cls": loss_cls / batch,
        }

    @staticmethod
    def box_deltas_used(assigned: dict[str, Tensor], num_classes: int) -> Tensor:
        """(B, N) the predictors whose box the loss reads: the responsible ones (the confidence is read everywhere,
        so YOLOv1's head, one layer for both, has no sparse path)."""
        return assigned["labels"] < num_classes


class YOLOv1Postprocess:
    """Paper §2 "at test time": class-specific confidence Pr(class | object) · confidence per box, above
    ``score_thresh``, class-wise NMS at ``nms_thresh``, at most ``max_detections`` per image; boxes
    clipped to the image. Batched: one threshold over (image, box, class), one grouped NMS."""

    def __init__(
        self, score_thresh: float = 0.001, nms_thresh: float = 0.5, max_detections: int = 100, grid_size: int = 7
    ) -> None:
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.max_detections, self.grid_size = max_detections, grid_size

    @torch.no_grad()
    def __call__(self, outputs: HeadOutputs, priors: Priors, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        box, conf, probs = outputs["box_deltas"].float(), outputs["objectness"].float(), outputs["class_scores"].float()
        batch, cells, _ = probs.shape
        nb = conf.shape[1] // cells
        # the network input frame is the padded batch; every image of a YOLO batch has the model's input size
        size = tuple(int(v) for v in image_sizes.max(0).values.tolist())
        boxes = decode_boxes(box, priors, size, self.grid_size)  # (batch, N, 4)
        # the paper's factors are probabilities; the raw regressed outputs are not (two negatives multiply to a
        # positive score, darknet's flaw): clamped to [0, 1] first
        scores = probs.clamp(0, 1).repeat_interleave(nb, 1) * conf.clamp(0, 1)[..., None]  # (batch, N, C)
        img, prior, label = torch.nonzero(scores > self.score_thresh, as_tuple=True)
        return nms_per_image(
            boxes[img, prior], scores[img, prior, label], label, img, image_sizes, self.nms_thresh, self.max_detections
        )
