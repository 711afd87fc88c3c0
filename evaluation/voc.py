"""PASCAL VOC AP at IoU 0.5 with the devkit's rules, VOC07 11-point and area under the curve
(``val/voc07_map_50``, ``val/voc_map_50`` of docs/ARCHITECTURE.md §1): the devkit's greedy matching and its
precision envelope as whole-batch tensor operations over the flat states of flat_states.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from detectors.batch import pad_per_image
from detectors.boxes import batched_box_iou

from .flat_states import cat_or_empty, flatten_images


def voc_match(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    det_counts: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    difficult: Tensor,
    gt_counts: Tensor,
    iou_thresh: float = 0.5,
) -> tuple[Tensor, ...]:
    """The devkit's greedy matching for a batch of images at once (flat detections and ground truth, a count per
    image). Returns the detections sorted by image then decreasing score (ties: input order), with TP and FP
    flags: each detection takes its same-class ground truth of highest IoU; above ``iou_thresh`` the first
    detection (in that order) to take a non-difficult object is a TP, later ones FP; one taking a difficult
    object is neither; below it is a FP."""
    device = boxes.device
    image = torch.repeat_interleave(torch.arange(len(det_counts), device=device), det_counts.to(device))
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    boxes, scores, labels, image = boxes[order].float(), scores[order], labels[order], image[order]
    gt = pad_per_image(gt_boxes.to(boxes), gt_counts, 0.0)[image]  # (D, M, 4): the objects of each detection's image
    gt_label = pad_per_image(gt_labels.to(labels), gt_counts, -1)[image]  # -1 pads: never the detection's class
    iou = batched_box_iou(boxes[:, None], gt).squeeze(1)
    iou.masked_fill_(gt_label != labels[:, None], -1.0)
    if iou.shape[1]:
        best_iou, best_gt = iou.max(dim=1)
    else:  # no object in any image of the batch
        best_iou, best_gt = iou.new_full((len(boxes),), -1.0), torch.zeros(len(boxes), dtype=torch.long, device=device)
    hit = best_iou > iou_thresh
    on_difficult = pad_per_image(difficult.to(device=device, dtype=torch.bool), gt_counts, False)[image, best_gt] & hit
    claim = hit & ~on_difficult
    # the first claim (in sorted order) of each object is the TP, as the devkit's "detected" flags make it
    key = image * iou.shape[1] + best_gt
    position = torch.arange(len(boxes), device=device)
    first = torch.full((len(gt_counts) * iou.shape[1] + 1,), len(boxes), dtype=torch.long, device=device)
    first.scatter_reduce_(0, key[claim], position[claim], "amin")
    tp = claim & (first[key] == position)
    fp = ~hit | (claim & ~tp)
    return scores, labels, tp, fp


def voc_ap_per_class(scores: Tensor, labels: Tensor, tp: Tensor, fp: Tensor, num_gt: Tensor) -> tuple[Tensor, Tensor]:
    """VOC07 11-point AP and area AP of every class at once (-1 where a class has no countable object), from
    the detections of the whole set in update order; each class's detections are ranked by decreasing score,
    ties kept in update order (a stable sort, as the devkit's MATLAB ``sort``)."""
    num_classes, device = len(num_gt), scores.device
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by class, then by decreasing score
    labels, tp, fp = labels[order], tp[order].double(), fp[order].double()
    n = len(labels)
    counts = torch.bincount(labels, minlength=num_classes)
    start = (torch.cumsum(counts, 0) - counts)[labels]  # index of each class's first detection
    tp_cum, fp_cum = torch.cumsum(tp, 0), torch.cumsum(fp, 0)
    tp_cum, fp_cum = tp_cum - (tp_cum - tp)[start], fp_cum - (fp_cum - fp)[start]  # cumulative within the class
    recall = tp_cum / num_gt.to(device=device, dtype=torch.float64)[labels]
    precision = tp_cum / (tp_cum + fp_cum).clamp(min=torch.finfo(torch.float64).eps)
    # precision envelope (max over the class's later points), exactly: a reversed running max of integer keys
    # that rank the precisions inside class blocks that never mix
    sorted_precision, by_precision = torch.sort(precision)
    rank = torch.empty_like(by_precision)
    rank[by_precision] = torch.arange(n, device=device)
    block = (num_classes - labels) * n  # later classes (met first in reverse) get the lower blocks
    running = torch.flip(torch.cummax(torch.flip(rank + block, [0]), 0).values, [0])
    envelope = sorted_precision[running - block]
    # area: Σ (r_j − r_{j−1}) · envelope_j over the class's points, r_{−1} = 0
    previous = torch.cat([recall.new_zeros(1), recall[:-1]])
    previous[start[start == torch.arange(n, device=device)]] = 0.0  # also 0 before each class's first point
    ap_area = torch.zeros(num_classes, dtype=torch.float64, device=device)
    ap_area.index_add_(0, labels, (recall - previous) * envelope)
    # 11-point: the envelope at the first point reaching each recall level (0 when none does)
    levels = torch.linspace(0, 1, 11, dtype=torch.float64, device=device)
    position = torch.where(recall[:, None] >= levels, torch.arange(n, device=device)[:, None], n)
    first = torch.full((num_classes, 11), n, dtype=torch.long, device=device)
    first.scatter_reduce_(0, labels[:, None].expand(-1, 11), position, "amin")
    ap07 = torch.cat([envelope, envelope.new_zeros(1)])[first].sum(1) / 11
    absent = num_gt.to(device) == 0  # a class absent from the ground truth has no AP (left out of the mean)
    return ap07.masked_fill(absent, -1.0), ap_area.masked_fill(absent, -1.0)


class VOCAveragePrecision(Metric):
    """Per-class AP at IoU > 0.5 with the VOC devkit's rules: detections sorted by score over the whole
    set, each matched to its highest-IoU ground truth; a match to a ``difficult`` object counts neither
    as TP nor FP, a second match to an object is a FP; difficult objects are not counted in recall.

    Args:
        num_classes: K; labels are 0..K-1.
        iou_thresh: the IoU a match must exceed (the devkit's ``ovmax > 0.5``).

    Example:
        >>> metric = VOCAveragePrecision(num_classes=1)
        >>> boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> metric.update(
        ...     [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}],
        ...     [{"boxes": boxes, "labels": torch.tensor([0])}],
        ... )
        >>> float(metric.compute()["voc_map_50"])
        1.0
    """

    full_state_update = False

    def __init__(self, num_classes: int, iou_thresh: float = 0.5) -> None:
        # no torchmetrics sync: DetectionMetrics gathers both metrics' states in one collective
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.num_classes, self.iou_thresh = num_classes, iou_thresh
        for name in ("scores", "labels", "tp", "fp"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_gt", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if not len(preds):
            return
        boxes, scores, labels, det_counts = flatten_images(preds, ("boxes", "scores", "labels"))
        targets = [
            t if "difficult" in t else {**t, "difficult": torch.zeros_like(t["labels"], dtype=torch.bool)}
            for t in targets
        ]
        gt_boxes, gt_labels, difficult, gt_counts = flatten_images(targets, ("boxes", "labels", "difficult"))
        difficult = difficult.bool()
        self.num_gt += torch.bincount(gt_labels[~difficult], minlength=self.num_classes).to(self.num_gt)
        scores, labels, tp, fp = voc_match(
            boxes, scores, labels, det_counts, gt_boxes, gt_labels, difficult, gt_counts, self.iou_thresh
        )
        self.scores.append(scores)
        self.labels.append(labels)
        self.tp.append(tp)
        self.fp.append(fp)

    def flat_state(self) -> dict[str, Tensor]:
        """The states as one tensor each (what ``evaluate`` takes; concatenate several, sum ``num_gt``, to merge)."""
        return {
            "scores": cat_or_empty(self.scores, torch.float32),
            "labels": cat_or_empty(self.labels, torch.long),
            "tp": cat_or_empty(self.tp, torch.bool),
            "fp": cat_or_empty(self.fp, torch.bool),
            "num_gt": self.num_gt,
        }

    def compute(self) -> dict[str, Tensor]:
        return self.evaluate(self.flat_state())

    @staticmethod
    def evaluate(state: dict[str, Tensor]) -> dict[str, Tensor]:
        ap07, ap_area = voc_ap_per_class(state["scores"], state["labels"], state["tp"], state["fp"], state["num_gt"])
        ap07, ap_area = ap07.float().cpu(), ap_area.float().cpu()
        present = ap07 >= 0
        mean = lambda x: x[present].mean() if present.any() else torch.tensor(-1.0)  # noqa: E731
        return {"voc07_map_50": mean(ap07), "voc_map_50": mean(ap_area), "voc_ap_per_class": ap_area}
