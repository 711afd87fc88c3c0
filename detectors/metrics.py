"""Validation metrics: the COCO AP suite (torchmetrics) and PASCAL VOC AP at IoU 0.5 (VOC07 11-point
and area-under-curve), under the metric names of DESIGN.md §1."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

from .boxes import batched_box_iou

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it prints the whole COCO table each epoch

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def coco_backend() -> str:
    """``faster_coco_eval`` where installed (several times faster), else pycocotools."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def voc_ap(recall: Tensor, precision: Tensor, eleven_point: bool) -> float:
    """AP from a precision/recall curve as the VOC devkit computes it (VOC2007: 11-point; 2010+: area)."""
    if eleven_point:
        points = torch.linspace(0, 1, 11, dtype=recall.dtype)
        return float(sum(precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in points) / 11)
    r = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    p = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    p = torch.flip(torch.cummax(torch.flip(p, [0]), 0).values, [0])  # precision envelope
    changed = torch.nonzero(r[1:] != r[:-1]).squeeze(1)
    return float(((r[changed + 1] - r[changed]) * p[changed + 1]).sum())


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
        for pred, target in zip(preds, targets):
            difficult = target.get("difficult", torch.zeros_like(target["labels"], dtype=torch.bool)).bool()
            self.num_gt += torch.bincount(target["labels"][~difficult], minlength=self.num_classes)
            order = torch.argsort(pred["scores"], descending=True, stable=True)
            boxes, labels = pred["boxes"][order].float(), pred["labels"][order]
            tp = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
            fp = torch.zeros_like(tp)
            if len(order) and len(target["labels"]):
                iou = batched_box_iou(boxes, target["boxes"].to(boxes))
                iou[labels[:, None] != target["labels"][None, :]] = -1
                best_iou, best_gt = iou.max(dim=1)
                matched = torch.zeros(len(target["labels"]), dtype=torch.bool, device=boxes.device)
                # within one image, score order decides which duplicate is the false positive
                for i in torch.nonzero(best_iou > self.iou_thresh).squeeze(1).tolist():
                    g = int(best_gt[i])
                    if difficult[g]:
                        continue
                    if matched[g]:
                        fp[i] = True
                    else:
                        tp[i] = matched[g] = True
                fp |= best_iou <= self.iou_thresh
            else:
                fp[:] = True
            self.scores.append(pred["scores"][order])
            self.labels.append(labels)
            self.tp.append(tp)
            self.fp.append(fp)

    def compute(self) -> dict[str, Tensor]:
        cat = lambda xs, dtype: torch.cat(xs) if len(xs) else torch.zeros(0, dtype=dtype)  # noqa: E731
        scores, labels = cat(self.scores, torch.float32), cat(self.labels, torch.long)
        tp, fp = cat(self.tp, torch.bool), cat(self.fp, torch.bool)
        ap07, ap_area = torch.full((self.num_classes,), -1.0), torch.full((self.num_classes,), -1.0)
        for c in range(self.num_classes):
            if self.num_gt[c] == 0:
                continue  # a class absent from the ground truth has no AP (and is left out of the mean)
            sel = labels == c
            order = torch.argsort(scores[sel], descending=True, stable=True)
            tpc = torch.cumsum(tp[sel][order].double(), 0).cpu()
            fpc = torch.cumsum(fp[sel][order].double(), 0).cpu()
            recall = tpc / float(self.num_gt[c])
            precision = tpc / (tpc + fpc).clamp(min=torch.finfo(torch.float64).eps)
            ap07[c] = voc_ap(recall, precision, eleven_point=True)
            ap_area[c] = voc_ap(recall, precision, eleven_point=False)
        present = ap07 >= 0
        mean = lambda x: x[present].mean() if present.any() else torch.tensor(-1.0)  # noqa: E731
        return {"voc07_map_50": mean(ap07), "voc_map_50": mean(ap_area), "voc_ap_per_class": ap_area}


class DetectionMetrics:
    """COCO suite + VOC AP, keyed ``{prefix}/map``, ``{prefix}/map_50``, ..., ``{prefix}/voc07_map_50``,
    ``{prefix}/voc_map_50`` and per-class COCO AP as ``{prefix}/ap/<class name>``."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                         backend=coco_backend())
        self.voc = VOCAveragePrecision(len(self.class_names))

    def to(self, device: torch.device) -> DetectionMetrics:
        self.coco.to(device)
        self.voc.to(device)
        return self

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        self.coco.update(preds, [{k: t[k] for k in ("boxes", "labels", "iscrowd")} for t in targets])
        self.voc.update(preds, targets)

    def compute(self, prefix: str) -> dict[str, float]:
        coco = self.coco.compute()
        voc = self.voc.compute()
        out = {f"{prefix}/{k}": float(coco[k]) for k in COCO_KEYS}
        out[f"{prefix}/voc07_map_50"] = float(voc["voc07_map_50"])
        out[f"{prefix}/voc_map_50"] = float(voc["voc_map_50"])
        classes = coco["classes"].reshape(-1).tolist()
        for cls, ap in zip(classes, coco["map_per_class"].reshape(-1).tolist()):
            if 0 <= cls < len(self.class_names):
                out[f"{prefix}/ap/{self.class_names[cls]}"] = float(ap)
        return out

    def reset(self) -> None:
        self.coco.reset()
        self.voc.reset()
