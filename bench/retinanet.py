"""RetinaNet's training targets + loss and its inference, ours against torchvision's on identical inputs.

The fixture is the issue's: an 800×800 input (P3–P7 → 120,087 anchors), batch 8, 80 classes, 10 objects
per image, and fixed head outputs, so only the assign + loss (+ backward) and the postprocess are timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torchvision.models.detection import retinanet_resnet50_fpn

from detectors.batch import DetectionBatch
from detectors.retinanet import MaxIoUAssigner, RetinaNetLoss, RetinaNetPostprocess
from detectors.priors import Priors
from detectors.retinanet import AnchorGenerator


@dataclass
class Fixture:
    priors: Priors
    batch: DetectionBatch
    logits: Tensor  # (B, N, K)
    deltas: Tensor  # (B, N, 4)
    image_size: int
    num_classes: int


def make_fixture(
    device: torch.device,
    batch_size: int = 8,
    image_size: int = 800,
    num_classes: int = 80,
    objects: int = 10,
    seed: int = 0,
) -> Fixture:
    g = torch.Generator().manual_seed(seed)
    feature_sizes = [(-(-image_size // s),) * 2 for s in (8, 16, 32, 64, 128)]  # ceil, as the strided convs give
    priors = AnchorGenerator(integer_sizes=True)((image_size, image_size), feature_sizes, device)
    centre = torch.rand(batch_size, objects, 2, generator=g) * image_size
    size = torch.exp(
        torch.empty(batch_size, objects, 2).uniform_(
            torch.log(torch.tensor(24.0)).item(), torch.log(torch.tensor(500.0)).item(), generator=g
        )
    )
    boxes = torch.cat((centre - size / 2, centre + size / 2), -1).clamp(0, image_size)
    labels = torch.randint(0, num_classes, (batch_size, objects), generator=g)
    flags = torch.zeros(batch_size, objects, dtype=torch.bool)
    batch = DetectionBatch(
        images=torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8),
        image_sizes=torch.full((batch_size, 2), image_size),
        boxes=boxes,
        labels=labels,
        valid=~flags,
        difficult=flags,
        crowd=flags,
        scales=torch.ones(batch_size, 2),
        image_ids=torch.arange(batch_size),
    )
    batch = move_data_to_device(batch, device)
    # a trained detector's score distribution: nearly every (anchor, class) far below 0.05, the anchors
    # overlapping an object confident in its class, so NMS sees realistic clusters of overlapping boxes
    n = priors.boxes.shape[0]
    logits = torch.randn(batch_size, n, num_classes, generator=g).mul_(1.0).sub_(7.0)
    assigned = MaxIoUAssigner(0.5, 0.4)(priors, batch, num_classes)
    pos = (assigned["labels"] >= 0) & (assigned["labels"] < num_classes)
    img, anchor = pos.nonzero(as_tuple=True)
    logits[img.cpu(), anchor.cpu(), assigned["labels"][pos].cpu()] = torch.randn(len(img), generator=g) + 1.0
    deltas = torch.randn(batch_size, n, 4, generator=g) * 0.1
    return Fixture(priors, batch, logits.to(device), deltas.to(device), image_size, num_classes)


def torchvision_model(fx: Fixture, device: torch.device):
    model = retinanet_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=fx.num_classes,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
        topk_candidates=1000,
    )
    return model.to(device).eval()


def torchvision_targets(fx: Fixture) -> list[dict[str, Tensor]]:
    return [{"boxes": fx.batch.boxes[i], "labels": fx.batch.labels[i]} for i in range(len(fx.batch))]


def loss_cases(fx: Fixture, device: torch.device):
    """(name, torchvision fn, ours fn, bytes the fused loss must move) for match + loss + backward."""
    tv = torchvision_model(fx, device)
    targets = torchvision_targets(fx)
    anchors = [fx.priors.boxes] * len(fx.batch)
    assigner, loss = MaxIoUAssigner(0.5, 0.4), RetinaNetLoss(box_loss="l1")

    def run_torchvision():
        logits = fx.logits.detach().requires_grad_()
        deltas = fx.deltas.detach().requires_grad_()
        losses = tv.compute_loss(targets, {"cls_logits": logits, "bbox_regression": deltas}, anchors)
        sum(losses.values()).backward()

    def run_ours():
        logits = fx.logits.detach().requires_grad_()
        deltas = fx.deltas.detach().requires_grad_()
        with torch.no_grad():
            assigned = assigner(fx.priors, fx.batch, fx.num_classes)
        losses = loss({"class_scores": logits, "box_deltas": deltas}, assigned, fx.priors)
        sum(losses.values()).backward()

    # the floor: read the logits twice (forward, backward) and write their gradient once
    floor_bytes = 3 * fx.logits.numel() * fx.logits.element_size()
    return run_torchvision, run_ours, floor_bytes


def postprocess_cases(fx: Fixture, device: torch.device):
    tv = torchvision_model(fx, device)
    sizes = fx.priors.level_sizes
    split_outputs = {"cls_logits": list(fx.logits.split(sizes, 1)), "bbox_regression": list(fx.deltas.split(sizes, 1))}
    split_anchors = [list(fx.priors.boxes.split(sizes))] * len(fx.batch)
    image_shapes = [(fx.image_size, fx.image_size)] * len(fx.batch)
    ours = RetinaNetPostprocess(score_thresh=0.05, topk_per_level=1000, nms_thresh=0.5, max_detections=100)
    outputs = {"class_scores": fx.logits, "box_deltas": fx.deltas}

    @torch.no_grad()
    def run_torchvision():
        return tv.postprocess_detections(split_outputs, split_anchors, image_shapes)

    def run_ours():
        return ours(outputs, fx.priors, fx.batch.image_sizes)

    return run_torchvision, run_ours
