"""Validation metrics: the COCO AP suite (COCOeval of faster_coco_eval or pycocotools) and PASCAL VOC AP at
IoU 0.5 (VOC07 11-point and area-under-curve), under the metric names of DESIGN.md §1.

Both metrics keep each batch as flat tensors (one row per box, a count per image), so an update costs a
handful of tensor operations whatever the batch size, and the states gather across processes by "cat"."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from .batch import pad_per_image
from .boxes import batched_box_iou

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it prints the whole COCO table each epoch

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def coco_backend() -> str:
    """``faster_coco_eval`` where installed (several times faster), else pycocotools."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def _coco_tools(backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _flatten(items: Sequence[dict[str, Tensor]], keys: Sequence[str]) -> tuple[Tensor, ...]:
    """The images' boxes of each key concatenated, and the number per image."""
    counts = torch.tensor([len(item[keys[0]]) for item in items], dtype=torch.long)
    return (*(torch.cat([item[k] for item in items]) for k in keys), counts)


def voc_match(boxes: Tensor, scores: Tensor, labels: Tensor, det_counts: Tensor, gt_boxes: Tensor,
              gt_labels: Tensor, difficult: Tensor, gt_counts: Tensor, iou_thresh: float = 0.5) -> tuple[Tensor, ...]:
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
    as TP nor FP, a second match to an object is a FP; difficult objects are not counted in recall."""

    full_state_update = False

    def __init__(self, num_classes: int, iou_thresh: float = 0.5) -> None:
        super().__init__()
        self.num_classes, self.iou_thresh = num_classes, iou_thresh
        for name in ("scores", "labels", "tp", "fp"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_gt", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if not len(preds):
            return
        boxes, scores, labels, det_counts = _flatten(preds, ("boxes", "scores", "labels"))
        targets = [t if "difficult" in t else {**t, "difficult": torch.zeros_like(t["labels"], dtype=torch.bool)}
                   for t in targets]
        gt_boxes, gt_labels, difficult, gt_counts = _flatten(targets, ("boxes", "labels", "difficult"))
        difficult = difficult.bool()
        self.num_gt += torch.bincount(gt_labels[~difficult], minlength=self.num_classes).to(self.num_gt)
        scores, labels, tp, fp = voc_match(boxes, scores, labels, det_counts, gt_boxes, gt_labels, difficult,
                                           gt_counts, self.iou_thresh)
        self.scores.append(scores)
        self.labels.append(labels)
        self.tp.append(tp)
        self.fp.append(fp)

    def compute(self) -> dict[str, Tensor]:
        cat = lambda xs, dtype: torch.cat(xs) if len(xs) else torch.zeros(0, dtype=dtype)  # noqa: E731
        scores, labels = cat(self.scores, torch.float32), cat(self.labels, torch.long)
        tp, fp = cat(self.tp, torch.bool), cat(self.fp, torch.bool)
        ap07, ap_area = voc_ap_per_class(scores, labels, tp, fp, self.num_gt)
        ap07, ap_area = ap07.float().cpu(), ap_area.float().cpu()
        present = ap07 >= 0
        mean = lambda x: x[present].mean() if present.any() else torch.tensor(-1.0)  # noqa: E731
        return {"voc07_map_50": mean(ap07), "voc_map_50": mean(ap_area), "voc_ap_per_class": ap_area}


class COCOAveragePrecision(Metric):
    """The COCO AP suite from one ``COCOeval`` run (faster_coco_eval or pycocotools) over flat tensor states.

    As torchmetrics' ``MeanAveragePrecision`` (boxes xyxy, area = box area), but the COCO dicts are built
    from whole tensors at once and per-class AP is read from the one evaluation's precision array instead
    of re-evaluating each class: that took 20× pycocotools' own time on a COCO-sized set."""

    full_state_update = False

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend or coco_backend()
        for name in ("det_boxes", "det_scores", "det_labels", "det_counts", "gt_boxes", "gt_labels", "gt_crowd",
                     "gt_counts"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if not len(preds):
            return
        boxes, scores, labels, det_counts = _flatten(preds, ("boxes", "scores", "labels"))
        targets = [t if "iscrowd" in t else {**t, "iscrowd": torch.zeros_like(t["labels"])} for t in targets]
        gt_boxes, gt_labels, crowd, gt_counts = _flatten(targets, ("boxes", "labels", "iscrowd"))
        for name, value in (("det_boxes", boxes), ("det_scores", scores), ("det_labels", labels),
                            ("det_counts", det_counts), ("gt_boxes", gt_boxes), ("gt_labels", gt_labels),
                            ("gt_crowd", crowd), ("gt_counts", gt_counts)):
            getattr(self, name).append(value)

    def _state(self, name: str, dtype: torch.dtype, width: int = 0) -> Tensor:
        xs = getattr(self, name)
        return torch.cat(xs).cpu() if len(xs) else torch.zeros((0, width) if width else 0, dtype=dtype)

    def compute(self) -> dict[str, Tensor]:
        det_counts, gt_counts = self._state("det_counts", torch.long), self._state("gt_counts", torch.long)
        det_labels, gt_labels = self._state("det_labels", torch.long), self._state("gt_labels", torch.long)
        classes = torch.cat([det_labels, gt_labels]).unique()
        if len(det_counts) == 0:
            return {"stats": torch.full((12,), -1.0), "classes": classes,
                    "map_per_class": torch.full((len(classes),), -1.0)}
        images = [{"id": i} for i in range(len(det_counts))]
        categories = [{"id": c} for c in classes.tolist()]

        def columns(boxes: Tensor, counts: Tensor) -> tuple[list, list, list]:
            # xywh in float64 from the float values, as a json reader computes w = x1 − x0
            xyxy = boxes.double()
            xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
            image = torch.repeat_interleave(torch.arange(len(counts)), counts)
            return image.tolist(), xywh.tolist(), (xywh[:, 2] * xywh[:, 3]).tolist()

        # dict literals in one comprehension: the Python side of building ~10⁶ annotations dominates here
        image, bbox, area = columns(self._state("gt_boxes", torch.float32, 4), gt_counts)
        gt_annotations = [{"id": i, "image_id": m, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
                          for i, m, c, b, a, z in zip(range(1, len(image) + 1), image, gt_labels.tolist(), bbox, area,
                                                      self._state("gt_crowd", torch.long).tolist())]
        image, bbox, area = columns(self._state("det_boxes", torch.float32, 4), det_counts)
        det_annotations = [{"id": i, "image_id": m, "category_id": c, "bbox": b, "area": a, "score": s, "iscrowd": 0}
                           for i, m, c, b, a, s in zip(range(1, len(image) + 1), image, det_labels.tolist(), bbox, area,
                                                       self._state("det_scores", torch.float32).tolist())]
        COCO, COCOeval = _coco_tools(self.backend)
        with contextlib.redirect_stdout(io.StringIO()):
            gt, dt = COCO(), COCO()
            gt.dataset = {"images": images, "categories": categories, "annotations": gt_annotations}
            dt.dataset = {"images": images, "categories": categories, "annotations": det_annotations}
            gt.createIndex()
            dt.createIndex()
            evaluator = COCOeval(gt, dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # per class as COCOeval's summary restricted to one category: AP over IoUs and recalls, all areas, 100 dets
        precision = torch.as_tensor(evaluator.eval["precision"])[:, :, :, 0, -1]  # (T, R, K)
        valid = precision > -1
        per_class = torch.where(valid, precision, 0).sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)
        per_class = per_class.masked_fill(~valid.any(0).any(0), -1.0)
        return {"stats": torch.as_tensor(evaluator.stats, dtype=torch.float64), "classes": classes,
                "map_per_class": per_class}


class DetectionMetrics:
    """COCO suite + VOC AP, keyed ``{prefix}/map``, ``{prefix}/map_50``, ..., ``{prefix}/voc07_map_50``,
    ``{prefix}/voc_map_50`` and, with ``class_metrics``, per-class COCO AP as ``{prefix}/ap/<class name>``."""

    def __init__(self, class_names: Sequence[str], class_metrics: bool = True) -> None:
        self.class_names = list(class_names)
        self.class_metrics = class_metrics
        self.coco = COCOAveragePrecision()
        self.voc = VOCAveragePrecision(len(self.class_names))

    def to(self, device: torch.device) -> DetectionMetrics:
        self.coco.to(device)
        self.voc.to(device)
        return self

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        self.coco.update(preds, targets)
        self.voc.update(preds, targets)

    def compute(self, prefix: str) -> dict[str, float]:
        coco = self.coco.compute()
        voc = self.voc.compute()
        out = {f"{prefix}/{k}": float(v) for k, v in zip(COCO_KEYS, coco["stats"].tolist())}
        out[f"{prefix}/voc07_map_50"] = float(voc["voc07_map_50"])
        out[f"{prefix}/voc_map_50"] = float(voc["voc_map_50"])
        if self.class_metrics:
            # reshape: torchmetrics' compute squeezes one-element results to scalars
            for cls, ap in zip(coco["classes"].reshape(-1).tolist(), coco["map_per_class"].reshape(-1).tolist()):
                if 0 <= cls < len(self.class_names):
                    out[f"{prefix}/ap/{self.class_names[cls]}"] = float(ap)
        return out

    def reset(self) -> None:
        self.coco.reset()
        self.voc.reset()
