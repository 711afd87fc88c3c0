"""The detection sets the evaluation tests share: random COCO-style sets with what COCOeval's rules must handle,
and pycocotools' own evaluation of them (the reference)."""

import math

import torch

from bench.evaluation import coco_dicts


def box(x0, y0, size=10.0):
    return [x0, y0, x0 + size, y0 + size]


def random_coco_set(seed, num_images=60, num_classes=7):
    """Detections and ground truth with what COCOeval's rules must handle: crowd objects (several detections
    on one), objects of every area range and on the range bounds (32², 96²), duplicate objects (IoU ties),
    tied scores, images with neither, only objects or only detections, a class only in detections (the last),
    one whose objects are all crowd (the one before), a pair with over 100 detections (COCOeval keeps 100),
    an IoU of exactly 0.5 and unmatched detections of areas on the range bounds."""
    g = torch.Generator().manual_seed(seed)
    detections, targets = [], []
    for i in range(num_images):
        n = int(torch.randint(0, 9, (), generator=g)) if i % 10 else 0
        xy = torch.rand(n, 2, generator=g) * 300
        size = torch.exp(torch.empty(n, 2).uniform_(math.log(4.0), math.log(200.0), generator=g))
        exact = torch.rand(n, generator=g) < 0.15  # 32×32 and 96×96 boxes: areas on the range bounds
        size[exact] = torch.tensor([32.0, 96.0])[torch.randint(0, 2, (int(exact.sum()),), generator=g)][:, None]
        boxes = torch.cat((xy, xy + size), 1)
        if n > 1 and torch.rand((), generator=g) < 0.3:
            boxes[1] = boxes[0]
        labels = torch.randint(0, num_classes - 2, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.1] = num_classes - 2
        crowd = (torch.rand(n, generator=g) < 0.1) | (labels == num_classes - 2)
        if i % 10 == 5:  # detections only
            boxes, labels, crowd = boxes[:0], labels[:0], crowd[:0]
        targets.append(
            {
                "boxes": boxes,
                "labels": labels,
                "iscrowd": crowd.long(),
                "difficult": torch.zeros(len(labels), dtype=torch.bool),
            }
        )
        copies = boxes.repeat(3, 1)
        copies = copies + torch.randn(copies.shape, generator=g) * (copies[:, 2:] - copies[:, :2]).repeat(1, 2) * 0.1
        copy_labels = labels.repeat(3)
        copy_labels[torch.rand(len(copy_labels), generator=g) < 0.1] = num_classes - 1
        m = int(torch.randint(0, 6, (), generator=g)) if i % 10 != 3 else 0  # i % 10 == 3: objects only
        xy = torch.rand(m, 2, generator=g) * 300
        det_boxes = torch.cat((copies, torch.cat((xy, xy + 10 + torch.rand(m, 2, generator=g) * 100), 1)))
        det_labels = torch.cat((copy_labels, torch.randint(0, num_classes, (m,), generator=g)))
        if i % 10 == 3:
            det_boxes, det_labels = det_boxes[:0], det_labels[:0]
        scores = torch.randint(1, 21, (len(det_boxes),), generator=g) / 20  # few values: many ties
        detections.append({"boxes": det_boxes, "scores": scores, "labels": det_labels})
    # one image with 130 detections of one class around its objects: the 100-per-class cut and maxDets 10
    xy = torch.rand(4, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + 50), 1)
    det_boxes = boxes.repeat(33, 1)[:130] + torch.randn(130, 4, generator=g) * 5
    zeros = torch.zeros(4, dtype=torch.long)
    targets.append({"boxes": boxes, "labels": zeros, "iscrowd": zeros, "difficult": zeros.bool()})
    detections.append(
        {"boxes": det_boxes, "scores": torch.rand(130, generator=g), "labels": torch.zeros(130, dtype=torch.long)}
    )
    # IoU exactly 0.5 (a match at the first threshold), unmatched detections of areas 32², 96² and 0
    targets.append(
        {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
            "labels": torch.tensor([1]),
            "iscrowd": torch.tensor([0]),
            "difficult": torch.tensor([False]),
        }
    )
    detections.append(
        {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 5.0], box(100, 100, 32), box(200, 100, 96), box(50, 50, 0)]),
            "scores": torch.tensor([0.3, 0.9, 0.8, 0.7]),
            "labels": torch.tensor([1, 1, 1, 1]),
        }
    )
    return detections, targets


def pycocotools_eval(detections, targets):
    """pycocotools' COCOeval on the same data as COCO dicts (ids from 1, area = box area, image ids 0, 1, ...)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = torch.cat([t["labels"] for t in targets] + [d["labels"] for d in detections]).unique().tolist()
    dataset, results = coco_dicts(detections, targets, labels)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator
