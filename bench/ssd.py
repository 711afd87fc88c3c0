"""SSD300's training targets + loss and its inference, ours against torchvision's on identical inputs.

The fixture is the issue's: 300×300 inputs (8,732 default boxes, torchvision's priors for both sides),
batch 32, 21 classes (20 + background), fixed head outputs, so only match + loss (+ backward) and the
postprocess are timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torchvision.models.detection import ssd300_vgg16

from detectors.batch import DetectionBatch
from detectors.priors import Priors
from detectors.ssd import BestMatchIoUAssigner, DefaultBoxGenerator, MultiBoxLoss, SSDPostprocess

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


@dataclass
class Fixture:
    priors: Priors
    batch: DetectionBatch
    logits: Tensor  # (B, N, K + 1), background first
    deltas: Tensor  # (B, N, 4)
    num_classes: int


def make_fixture(
    device: torch.device, batch_size: int = 32, num_classes: int = 20, objects: int = 6, seed: int = 0
) -> Fixture:
    g = torch.Generator().manual_seed(seed)
    priors = DefaultBoxGenerator(
        "ssd300", scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300], clip=True
    )((300, 300), SSD300_MAPS)
    centre = torch.rand(batch_size, objects, 2, generator=g) * 300
    size = torch.exp(
        torch.empty(batch_size, objects, 2).uniform_(
            torch.log(torch.tensor(16.0)).item(), torch.log(torch.tensor(280.0)).item(), generator=g
        )
    )
    boxes = torch.cat((centre - size / 2, centre + size / 2), -1).clamp(0, 300)
    labels = torch.randint(0, num_classes, (batch_size, objects), generator=g)
    flags = torch.zeros(batch_size, objects, dtype=torch.bool)
    batch = DetectionBatch(
        images=torch.zeros(batch_size, 3, 300, 300, dtype=torch.uint8),
        image_sizes=torch.full((batch_size, 2), 300),
        boxes=boxes,
        labels=labels,
        valid=~flags,
        difficult=flags,
        crowd=flags,
        scales=torch.ones(batch_size, 2),
        image_ids=torch.arange(batch_size),
    )
    # a trained SSD's scores: background confident almost everywhere, the boxes on an object confident in
    # its class, so NMS sees realistic clusters
    n = priors.boxes.shape[0]
    logits = torch.randn(batch_size, n, num_classes + 1, generator=g)
    logits[..., 0] += 8.0  # ~1% of (box, class) pairs pass 0.01
    assigned = BestMatchIoUAssigner(0.5)(priors, batch, num_classes)
    pos = assigned["labels"] < num_classes
    img, prior = pos.nonzero(as_tuple=True)
    logits[img, prior, assigned["labels"][pos] + 1] = torch.randn(len(img), generator=g) + 9.0
    deltas = torch.randn(batch_size, n, 4, generator=g) * 0.5
    batch = move_data_to_device(batch, device)
    priors = Priors(priors.boxes.to(device), priors.level_sizes)
    return Fixture(priors, batch, logits.to(device), deltas.to(device), num_classes)


def torchvision_model(fx: Fixture, device: torch.device):
    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=fx.num_classes + 1).to(device).eval()


def loss_cases(fx: Fixture, device: torch.device):
    """torchvision fn, ours fn, and the bytes the loss must move at the least, for match + loss + backward."""
    tv = torchvision_model(fx, device)
    targets = [{"boxes": fx.batch.boxes[i], "labels": fx.batch.labels[i] + 1} for i in range(len(fx.batch))]
    anchors = [fx.priors.boxes] * len(fx.batch)
    # torchvision's matching rule on both sides (bipartite matching costs ~25-35 % more of the assigner's time)
    assigner, loss = BestMatchIoUAssigner(0.5, bipartite=False), MultiBoxLoss(min_negatives=0)

    def run_torchvision():
        logits = fx.logits.detach().requires_grad_()
        deltas = fx.deltas.detach().requires_grad_()
        # SSD.forward's matching, then its loss
        from torchvision.ops import box_iou

        matched = [tv.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
        losses = tv.compute_loss(targets, {"cls_logits": logits, "bbox_regression": deltas}, anchors, matched)
        sum(losses.values()).backward()

    def run_ours():
        logits = fx.logits.detach().requires_grad_()
        deltas = fx.deltas.detach().requires_grad_()
        with torch.no_grad():
            assigned = assigner(fx.priors, fx.batch, fx.num_classes)
        losses = loss({"class_scores": logits, "box_deltas": deltas}, assigned, fx.priors)
        sum(losses.values()).backward()

    floor_bytes = 3 * fx.logits.numel() * fx.logits.element_size()
    return run_torchvision, run_ours, floor_bytes


def postprocess_cases(fx: Fixture, device: torch.device):
    tv = torchvision_model(fx, device)
    tv.topk_candidates = 200  # the paper's 200 per class on both sides
    anchors = [fx.priors.boxes] * len(fx.batch)
    shapes = [(300, 300)] * len(fx.batch)
    ours = SSDPostprocess(score_thresh=0.01, topk_per_class=200, nms_thresh=0.45, max_detections=200)

    @torch.no_grad()
    def run_torchvision():
        return tv.postprocess_detections({"cls_logits": fx.logits, "bbox_regression": fx.deltas}, anchors, shapes)

    def run_ours():
        return ours({"class_scores": fx.logits, "box_deltas": fx.deltas}, fx.priors, fx.batch.image_sizes)

    return run_torchvision, run_ours
