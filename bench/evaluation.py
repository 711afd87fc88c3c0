"""Validation metrics over a COCO-sized set, ours against pycocotools' ``COCOeval`` on the same detections.

The fixture is the issue's: 5,000 images × 100 detections (80 classes, ~7 objects per image, some crowd).
Ours is the whole validation metrics path (``DetectionMetrics.update`` per batch of 16 + ``compute``: COCO
suite, VOC07/area AP, per-class AP, PR curves) with its default COCO backend, our tensor implementation of
COCOeval (``backend="faster_coco_eval"`` or ``"pycocotools"`` time those runs instead); pycocotools is
``loadRes`` + ``evaluate`` + ``accumulate`` + ``summarize`` on the same data as in-memory COCO dicts, whose
conversion is not timed.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert

from evaluation.detection_metrics import DetectionMetrics


@dataclass
class Fixture:
    detections: list[dict[str, Tensor]]
    targets: list[dict[str, Tensor]]
    num_classes: int


def make_fixture(
    num_images: int = 5000,
    detections: int = 100,
    num_classes: int = 80,
    objects: float = 7.0,
    crowd: float = 0.02,
    seed: int = 0,
) -> Fixture:
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((num_images,), objects), generator=g).long().clamp(max=detections // 2)
    dets, targets = [], []
    for n in counts.tolist():
        centre = torch.rand(n, 2, generator=g) * torch.tensor([640.0, 480.0])
        size = torch.exp(torch.empty(n, 2).uniform_(math.log(8.0), math.log(400.0), generator=g))
        boxes = torch.cat((centre - size / 2, centre + size / 2), 1).clamp(min=0)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append(
            {
                "boxes": boxes,
                "labels": labels,
                "iscrowd": (torch.rand(n, generator=g) < crowd).long(),
                "difficult": torch.zeros(n, dtype=torch.bool),
            }
        )
        # a detector's output: a few jittered copies of each object (some with the wrong class), the rest clutter
        copies = boxes.repeat(2, 1)
        copies = copies + torch.randn(copies.shape, generator=g) * (copies[:, 2:] - copies[:, :2]).repeat(1, 2) * 0.1
        copy_labels = labels.repeat(2)
        wrong = torch.rand(len(copy_labels), generator=g) < 0.1
        copy_labels[wrong] = torch.randint(0, num_classes, (int(wrong.sum()),), generator=g)
        m = detections - len(copies)
        clutter = torch.rand(m, 2, generator=g) * torch.tensor([640.0, 480.0])
        clutter = torch.cat((clutter, clutter + torch.rand(m, 2, generator=g) * 200 + 4), 1)
        dets.append(
            {
                "boxes": torch.cat((copies, clutter)),
                "scores": torch.cat(
                    (torch.rand(len(copies), generator=g) * 0.5 + 0.5, torch.rand(m, generator=g) * 0.6)
                ),
                "labels": torch.cat((copy_labels, torch.randint(0, num_classes, (m,), generator=g))),
            }
        )
    return Fixture(dets, targets, num_classes)


def coco_dicts(
    detections: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], category_ids: list[int]
) -> tuple[dict, list[dict]]:
    """The ground truth as a COCO dataset dict (image ids 0, 1, ...; annotation ids from 1; area = box area) and
    the detections as a COCO results list (xywh): what pycocotools is given in the bench and the tests."""
    images, annotations, results = [], [], []
    for image_id, (det, target) in enumerate(zip(detections, targets)):
        images.append({"id": image_id, "width": 640, "height": 480})
        gt_xywh = box_convert(target["boxes"].double(), "xyxy", "xywh").tolist()
        for b, c, crowd in zip(gt_xywh, target["labels"].tolist(), target["iscrowd"].tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": crowd,
                }
            )
        det_xywh = box_convert(det["boxes"].double(), "xyxy", "xywh").tolist()
        for b, c, s in zip(det_xywh, det["labels"].tolist(), det["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": c, "bbox": b, "score": s})
    categories = [{"id": c, "name": str(c)} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def cases(fx: Fixture, batch_size: int = 16, class_metrics: bool = True, backend: str = "tensors"):
    """pycocotools fn, ours fn; each returns (mAP, mAP@0.5) so the bench can show they agree."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = coco_dicts(fx.detections, fx.targets, list(range(fx.num_classes)))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
    names = [str(c) for c in range(fx.num_classes)]

    def run_pycocotools():
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(results), "bbox")  # loadRes only (re)sets derived fields
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return float(evaluator.stats[0]), float(evaluator.stats[1])

    def run_ours():
        metrics = DetectionMetrics(names, class_metrics=class_metrics, backend=backend)
        for i in range(0, len(fx.detections), batch_size):
            metrics.update(fx.detections[i : i + batch_size], fx.targets[i : i + batch_size])
        out = metrics.compute("val")
        return out["val/map"], out["val/map_50"]

    return run_pycocotools, run_ours
