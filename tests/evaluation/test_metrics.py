"""VOC AP with the devkit's rules on hand-computed cases, the metric names docs/ARCHITECTURE.md §1 promises, the
COCO suite against pycocotools' COCOeval bit for bit, and the precision-recall curves for the dashboards."""

import math

import pytest
import torch

from bench.evaluation import coco_dicts
from evaluation.metrics import COCOAveragePrecision, DetectionMetrics, VOCAveragePrecision, _flatten

from ..conftest import DEVICES


def box(x0, y0, size=10.0):
    return [x0, y0, x0 + size, y0 + size]


def test_voc_ap_on_a_hand_computed_curve():
    # 2 objects; detections by score: TP, FP, TP → precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    metric = VOCAveragePrecision(num_classes=1)
    target = {"boxes": torch.tensor([box(0, 0), box(50, 50)]), "labels": torch.tensor([0, 0])}
    pred = {
        "boxes": torch.tensor([box(0, 0), box(200, 200), box(50, 50)]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([0, 0, 0]),
    }
    metric.update([pred], [target])
    out = metric.compute()
    assert out["voc_map_50"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert out["voc07_map_50"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_devkit_rules_duplicates_difficult_and_unmatched():
    metric = VOCAveragePrecision(num_classes=2)
    target = {
        "boxes": torch.tensor([box(0, 0), box(50, 50), box(100, 100)]),
        "labels": torch.tensor([0, 0, 0]),
        "difficult": torch.tensor([False, False, True]),
    }
    pred = {
        "boxes": torch.tensor([box(0, 0), box(1, 0), box(100, 100), box(200, 200), box(50, 51)]),
        "scores": torch.tensor([0.9, 0.8, 0.75, 0.7, 0.6]),
        "labels": torch.tensor([0, 0, 0, 0, 0]),
    }
    metric.update([pred], [target])
    out = metric.compute()
    # 0.9 TP; 0.8 duplicate → FP; 0.75 on a difficult object → ignored; 0.7 matches nothing → FP; 0.6 TP.
    # two countable objects: precision 1, 1/2, 1/3, 1/2 at recall 1/2, 1/2, 1/2, 1
    expected_area = 0.5 * 1 + 0.5 * 0.5
    expected_07 = (6 * 1 + 5 * 0.5) / 11
    assert out["voc_map_50"] == pytest.approx(expected_area)  # class 1 has no objects: left out of the mean
    assert out["voc07_map_50"] == pytest.approx(expected_07)
    assert out["voc_ap_per_class"][1] == -1


def test_wrong_class_is_a_false_positive_and_missing_class_scores_zero():
    metric = VOCAveragePrecision(num_classes=2)
    target = {"boxes": torch.tensor([box(0, 0), box(50, 50)]), "labels": torch.tensor([0, 1])}
    pred = {"boxes": torch.tensor([box(0, 0)]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    metric.update([pred], [target])
    out = metric.compute()
    assert out["voc_ap_per_class"].tolist() == [0.0, 0.0]


def test_detection_metrics_names_and_perfect_score():
    metrics = DetectionMetrics(["a", "b"])
    target = {
        "boxes": torch.tensor([box(0, 0, 40), box(50, 50, 36)]),
        "labels": torch.tensor([0, 1]),
        "iscrowd": torch.tensor([0, 0]),
        "difficult": torch.tensor([False, False]),
    }
    pred = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    metrics.update([pred], [target])
    out = metrics.compute("val")
    for key in (
        "val/map",
        "val/map_50",
        "val/map_75",
        "val/mar_100",
        "val/voc07_map_50",
        "val/voc_map_50",
        "val/ap/a",
        "val/ap/b",
    ):
        assert out[key] == pytest.approx(1.0), key
    assert out["val/map_small"] == -1  # both boxes > 32² px: no small objects, COCO's "absent" value


def test_detection_metrics_class_metrics_switch():
    target = {"boxes": torch.tensor([box(0, 0, 40)]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([0])}
    pred = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    outs = {}
    for on in (True, False):
        metrics = DetectionMetrics(["a", "b"], class_metrics=on)
        metrics.update([pred], [target])
        outs[on] = metrics.compute("val")
    assert outs[True]["val/ap/b"] == pytest.approx(1.0) and "val/ap/a" not in outs[True]  # "a" is in neither
    assert not any(k.startswith("val/ap/") for k in outs[False])
    assert {k: v for k, v in outs[True].items() if not k.startswith("val/ap/")} == outs[False]


def test_model_class_metrics_setting_reaches_the_detector():
    from hydra.utils import instantiate

    from ..conftest import TINY, compose

    assert instantiate(compose(*TINY).model).val_metrics.class_metrics is True
    assert instantiate(compose(*TINY, "model.class_metrics=false").model).val_metrics.class_metrics is False


# --- the PASCAL VOC devkit's evaluation, transcribed ------------------------------------------------------
# VOCevaldet.m (VOC2007 devkit; voc_eval.py is its Python port), class by class over a results "file" that
# lists each image's detections in update order. Deliberate choices, each matching what our metric does:
# - boxes are continuous 0-based pixels, so plain areas (the devkit's +1 widths are for 1-based inclusive ones);
# - ranking is MATLAB's `sort(-confidence)`, which is stable: tied scores keep file order (voc_eval.py's
#   np.argsort is an unstable quicksort, so its tie order is arbitrary);
# - the 11 recall levels are MATLAB's `0:0.1:1`, whose colon operator builds the upper half down from 1
#   (0.6, 0.7 exact; 0.3 is 0.30000000000000004), unlike voc_eval.py's np.arange (0.6000000000000001, ...);
# - precision where tp + fp = 0 is 0 (voc_eval.py's eps; MATLAB's 0/0 = NaN, which its max() skips).
MATLAB_LEVELS = [k * 0.1 if k <= 5 else 1 - (10 - k) * 0.1 for k in range(11)]


def devkit_ap(detections, ground_truth, cls, levels=MATLAB_LEVELS):
    import numpy as np

    gt = [
        (g["boxes"][g["labels"] == cls].double().numpy(), g["difficult"][g["labels"] == cls].numpy())
        for g in ground_truth
    ]
    npos = sum(int((~d).sum()) for _, d in gt)
    ids, confidence, bb = [], [], []
    for i, det in enumerate(detections):
        keep = det["labels"] == cls
        ids += [i] * int(keep.sum())
        confidence += det["scores"][keep].tolist()
        bb += det["boxes"][keep].double().tolist()
    si = np.argsort(-np.array(confidence, dtype=np.float32), kind="stable")
    detected = [np.zeros(len(d), dtype=bool) for _, d in gt]
    tp, fp = np.zeros(len(si)), np.zeros(len(si))
    for d, k in enumerate(si):
        b, (boxes, difficult) = bb[k], gt[ids[k]]
        ovmax, jmax = -np.inf, -1
        if len(boxes):
            iw = np.maximum(np.minimum(boxes[:, 2], b[2]) - np.maximum(boxes[:, 0], b[0]), 0)
            ih = np.maximum(np.minimum(boxes[:, 3], b[3]) - np.maximum(boxes[:, 1], b[1]), 0)
            inters = iw * ih
            uni = (b[2] - b[0]) * (b[3] - b[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inters
            ov = inters / uni
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > 0.5:
            if difficult[jmax]:
                continue
            if not detected[ids[k]][jmax]:
                tp[d], detected[ids[k]][jmax] = 1, True
            else:
                fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap07 = sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in levels) / 11
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return ap07, float(((mrec[i] - mrec[i - 1]) * mpre[i]).sum())


def random_voc_set(seed, num_images=120, num_classes=6):
    """Detections and ground truth with what the devkit's rules must handle: tied scores, duplicate
    detections and duplicate objects, difficult objects, images without detections or without objects,
    a class with detections but no object (the last) and a class whose objects are all difficult (the one before)."""
    g = torch.Generator().manual_seed(seed)
    detections, ground_truth = [], []
    for _ in range(num_images):
        n = int(torch.randint(0, 7, (), generator=g)) if torch.rand((), generator=g) > 0.1 else 0
        xy = torch.rand(n, 2, generator=g) * 200
        boxes = torch.cat((xy, xy + 8 + torch.rand(n, 2, generator=g) * 60), 1)
        if n > 1 and torch.rand((), generator=g) < 0.3:
            boxes[1] = boxes[0]  # the same object annotated twice: max-IoU ties go to the first
        labels = torch.randint(0, num_classes - 2, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.1] = num_classes - 2
        difficult = (torch.rand(n, generator=g) < 0.2) | (labels == num_classes - 2)
        ground_truth.append(
            {"boxes": boxes, "labels": labels, "difficult": difficult, "iscrowd": torch.zeros(n, dtype=torch.long)}
        )
        copies = boxes.repeat(3, 1)
        copies = copies + torch.randn(copies.shape, generator=g) * (copies[:, 2:] - copies[:, :2]).repeat(1, 2) * 0.1
        copy_labels = labels.repeat(3)
        copy_labels[torch.rand(len(copy_labels), generator=g) < 0.15] = num_classes - 1
        m = int(torch.randint(0, 5, (), generator=g))
        xy = torch.rand(m, 2, generator=g) * 200
        det_boxes = torch.cat((copies, torch.cat((xy, xy + 20), 1)))
        det_labels = torch.cat((copy_labels, torch.randint(0, num_classes, (m,), generator=g)))
        scores = torch.randint(1, 11, (len(det_boxes),), generator=g) / 10  # few values: many ties
        dup = torch.rand(len(det_boxes), generator=g) < 0.15  # exact duplicates (same box, same score)
        det = {
            "boxes": torch.cat((det_boxes, det_boxes[dup])),
            "scores": torch.cat((scores, scores[dup])),
            "labels": torch.cat((det_labels, det_labels[dup])),
        }
        if torch.rand((), generator=g) < 0.1:
            det = {k: v[:0] for k, v in det.items()}
        detections.append(det)
    return detections, ground_truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_ap_equals_the_devkit_transcription(seed):
    num_classes = 6
    detections, ground_truth = random_voc_set(seed, num_classes=num_classes)
    metric = VOCAveragePrecision(num_classes)
    g = torch.Generator().manual_seed(seed)
    i = 0
    while i < len(detections):  # uneven batches, as a last partial batch gives
        n = int(torch.randint(1, 20, (), generator=g))
        metric.update(detections[i : i + n], ground_truth[i : i + n])
        i += n
    out = metric.compute()
    reference = [devkit_ap(detections, ground_truth, c) for c in range(num_classes - 2)]
    ours = out["voc_ap_per_class"].tolist()
    for c, (_, area) in enumerate(reference):
        assert ours[c] == pytest.approx(area, abs=1e-6), c
    assert ours[num_classes - 2 :] == [-1, -1]  # only-difficult and no-object classes: no AP, out of the mean
    assert float(out["voc_map_50"]) == pytest.approx(sum(a for _, a in reference) / len(reference), abs=1e-6)
    assert float(out["voc07_map_50"]) == pytest.approx(sum(a for a, _ in reference) / len(reference), abs=1e-6)
    assert 0.2 < float(out["voc_map_50"]) < 0.95  # a set that tells numbers apart


def test_tie_order_and_recall_levels_change_ap_as_the_reference_says():
    # the reference's two choices are not neutral: another tie order or voc_eval.py's np.arange levels
    # give other numbers on this set, so the test above checks them
    import numpy as np

    detections, ground_truth = random_voc_set(0)
    flipped = [{k: v.flip(0) for k, v in d.items()} for d in reversed(detections)]
    arange = np.arange(0.0, 1.1, 0.1)
    base = [devkit_ap(detections, ground_truth, c) for c in range(4)]
    assert base != [devkit_ap(flipped, list(reversed(ground_truth)), c) for c in range(4)]
    assert [a for a, _ in base] != [devkit_ap(detections, ground_truth, c, arange)[0] for c in range(4)]


def test_voc07_levels_count_a_recall_of_exactly_six_tenths():
    # 5 objects: three hits (recall 0.6 at precision 1), then a miss and a late hit. MATLAB's 0:0.1:1 has
    # 0.6 exactly, so the level 0.6 sees precision 1; voc_eval.py's np.arange (0.6000000000000001) does not
    metric = VOCAveragePrecision(num_classes=1)
    objects = torch.tensor([box(60 * i, 0) for i in range(5)])
    preds = torch.tensor([box(0, 0), box(60, 0), box(120, 0), box(500, 500), box(180, 0)])
    labels = torch.zeros(5, dtype=torch.long)
    metric.update(
        [{"boxes": preds, "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), "labels": labels}],
        [{"boxes": objects, "labels": labels}],
    )
    assert float(metric.compute()["voc07_map_50"]) == pytest.approx((7 * 1 + 2 * 0.8) / 11)


# --- COCO suite: our tensor evaluation against pycocotools' COCOeval, bit for bit -------------------------
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


def update_in_uneven_batches(metric, detections, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = 0
    while i < len(detections):
        n = int(torch.randint(1, 12, (), generator=g))
        metric.update(detections[i : i + n], targets[i : i + n])
        i += n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_tensors_equal_pycocotools_bit_for_bit(seed):
    import numpy as np

    detections, targets = random_coco_set(seed)
    reference = pycocotools_eval(detections, targets)
    metric = COCOAveragePrecision()  # the default, "tensors"
    update_in_uneven_batches(metric, detections, targets, seed)
    out = metric.compute()
    assert out["classes"].tolist() == reference.params.catIds
    assert np.array_equal(out["precision"].numpy(), reference.eval["precision"])
    assert np.array_equal(out["recall"].numpy(), reference.eval["recall"])
    assert out["stats"].tolist() == list(reference.stats)
    # the set exercises what it claims: crowd matches, a class without countable objects, the 100 cut
    assert (reference.eval["precision"][:, :, -2] == -1).all() and (reference.eval["precision"][:, :, -1] == -1).all()
    assert 0.2 < reference.stats[0] < 0.9 and (reference.stats[3:6] > 0).all()
    assert reference.eval["recall"][:, 0, 0, 1].tolist() != reference.eval["recall"][:, 0, 0, 2].tolist()


def test_coco_tensors_in_small_blocks_and_with_float64_scores(monkeypatch):
    from evaluation import metrics

    detections, targets = random_coco_set(5)
    expected = pycocotools_eval(detections, targets).eval["precision"]
    monkeypatch.setattr(metrics, "_MATCH_BUDGET", 3000)  # a few pairs per matcher block
    metric = COCOAveragePrecision()
    metric.update([{**d, "scores": d["scores"].double()} for d in detections], targets)
    assert (metric.compute()["precision"].numpy() == expected).all()
    # float64 scores apart by less than float32 resolves: sorted as float32 they would tie again and give
    # the numbers above; the float64 sort breaks the set's many ties otherwise
    metric = COCOAveragePrecision()
    metric.update(
        [
            {**d, "scores": d["scores"].double() + 1e-12 * torch.rand(len(d["scores"]), dtype=torch.float64)}
            for d in detections
        ],
        targets,
    )
    assert (metric.compute()["precision"].numpy() != expected).any()


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_coco_backends_agree(backend):
    pytest.importorskip(backend)
    detections, targets = random_coco_set(3, num_images=30)
    outs = {}
    for name in ("tensors", backend):
        metrics = DetectionMetrics([str(c) for c in range(7)], backend=name)
        metrics.update(detections, targets)
        outs[name] = metrics.compute("val"), metrics.pr_curves
    for key, value in outs["tensors"][0].items():
        assert outs[backend][0][key] == pytest.approx(value, abs=1e-12), key
    assert outs[backend][1].keys() == outs["tensors"][1].keys()
    for name, (recall, precision) in outs["tensors"][1].items():
        assert torch.equal(outs[backend][1][name][1], precision)


def test_coco_tensors_on_empty_and_degenerate_sets():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    no_objects = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    metric = COCOAveragePrecision()
    metric.update([empty, empty], [no_objects, no_objects])
    assert metric.compute()["stats"].tolist() == [-1.0] * 12
    # detections but no object at all, and objects without any detection
    det = {"boxes": torch.tensor([box(0, 0)]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    one_object = {"boxes": torch.tensor([box(0, 0, 40)]), "labels": torch.tensor([0])}
    for preds, targets, expected in (([det], [no_objects], -1.0), ([empty], [one_object], 0.0)):
        metric = COCOAveragePrecision()
        metric.update(preds, targets)
        assert metric.compute()["stats"][0] == expected


def test_pr_curves_of_a_perfect_detector_and_against_pycocotools():
    names = [f"c{k}" for k in range(9)]
    metrics = DetectionMetrics(names)
    target = {
        "boxes": torch.tensor([box(0, 0, 40), box(50, 50, 36), box(100, 0, 20)]),
        "labels": torch.tensor([0, 2, 2]),
        "iscrowd": torch.tensor([0, 0, 0]),
    }
    pred = {
        "boxes": torch.cat([target["boxes"], torch.tensor([box(200, 200)])]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 2, 2, 5]),
    }
    metrics.update([pred], [target])
    metrics.compute("val")
    assert list(metrics.pr_curves) == ["c0", "c2"]  # c5 has detections but no object: left out
    for recall, precision in metrics.pr_curves.values():
        assert recall.shape == precision.shape == (101,)
        assert torch.allclose(recall, torch.linspace(0, 1, 101))
        assert (precision == 1).all()
    metrics.reset()
    assert list(metrics.pr_curves) == ["c0", "c2"]  # kept for the callbacks that run after the module's reset

    detections, targets = random_coco_set(1)
    reference = pycocotools_eval(detections, targets)
    metrics = DetectionMetrics([f"c{k}" for k in range(7)])
    metrics.update(detections, targets)
    metrics.compute("val")
    expected = {
        f"c{c}": torch.from_numpy(reference.eval["precision"][0, :, k, 0, 2]).float()
        for k, c in enumerate(reference.params.catIds)
        if reference.eval["precision"][0, 0, k, 0, 2] > -1
    }
    assert metrics.pr_curves.keys() == expected.keys() and len(expected) == 5
    for name, (recall, precision) in metrics.pr_curves.items():
        assert torch.equal(precision, expected[name]), name
        assert torch.equal(recall, torch.from_numpy(reference.params.recThrs).float())


def test_f1_by_threshold_counts_the_detections_kept_at_each_threshold():
    from evaluation.metrics import best_f1_threshold, f1_by_threshold

    # class 0: 2 objects; detections 0.9 (a hit), 0.8 (a miss), 0.4 (a hit) and 0.95 on a "difficult" object
    # (neither); class 1: no objects
    state = {
        "scores": torch.tensor([0.9, 0.8, 0.4, 0.95, 0.7]),
        "labels": torch.tensor([0, 0, 0, 0, 1]),
        "tp": torch.tensor([True, False, True, False, False]),
        "fp": torch.tensor([False, True, False, False, True]),
        "num_gt": torch.tensor([2, 0]),
    }
    f1 = f1_by_threshold(*state.values(), torch.tensor([0.0, 0.5, 0.85, 1.0]))
    # kept 3 (2 hits), 2 (1), 1 (1), 0: F1 = 2·TP ÷ (kept + objects)
    torch.testing.assert_close(f1[0], torch.tensor([4 / 5, 2 / 4, 2 / 3, 0.0], dtype=torch.float64))
    assert f1[1].isnan().all()
    assert best_f1_threshold(state) == (pytest.approx(0.4), pytest.approx(0.8))  # the highest of the equal best


def test_the_best_f1_threshold_is_reported_with_the_metrics():
    from evaluation.metrics import DetectionMetrics

    metrics = DetectionMetrics(["a", "b"])
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])}
    pred = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]),
        "scores": torch.tensor([0.9, 0.6, 0.3]),
        "labels": torch.tensor([0, 1, 1]),
    }
    metrics.update([pred], [target])
    out = metrics.compute("val")
    # a: F1 1 up to 0.9; b: 2/3 up to 0.3, 1 from there to 0.6: the mean is 1 on (0.3, 0.6]
    assert out["val/f1_score_thresh"] == pytest.approx(0.6) and out["val/best_f1"] == pytest.approx(1.0)
    assert metrics.f1_score_thresh == pytest.approx(0.6)


def test_every_state_lies_on_the_device_of_the_boxes_it_came_from():
    """Checked on the meta device, which any machine has: the counts too (CPU counts beside GPU boxes were split
    across devices by the validation step's ``.to(device)`` and failed ``torch.cat`` at the first epoch's end)."""
    items = [{"boxes": torch.zeros(n, 4, device="meta"), "labels": torch.zeros(n, device="meta")} for n in (2, 0, 3)]
    *flat, counts = _flatten(items, ("boxes", "labels"))
    assert all(t.device.type == "meta" for t in (*flat, counts)) and counts.shape == (3,)


@pytest.mark.parametrize("device", DEVICES)
def test_updates_on_the_device_between_moves_give_the_cpu_numbers(device):
    """As DetectionModule.validation_step does: ``.to(device)`` before every update; the COCO numbers equal a CPU
    run's."""
    detections, targets = random_coco_set(3, num_images=30)
    on_cpu, moved = DetectionMetrics([str(c) for c in range(7)]), DetectionMetrics([str(c) for c in range(7)])
    for start in range(0, 30, 10):
        on_cpu.update(detections[start : start + 10], targets[start : start + 10])
        batch = [{k: v.to(device) for k, v in d.items()} for d in detections[start : start + 10]]
        moved.to(torch.device(device)).update(
            batch, [{k: v.to(device) for k, v in t.items()} for t in targets[start : start + 10]]
        )
    got, want = moved.compute("val"), on_cpu.compute("val")
    assert set(got) == set(want)
    # the COCO suite is computed on the CPU from the same boxes: equal; VOC matches on the device, where an IoU of
    # exactly 0.5 (the set has some) may round to either side, so it is left to VOC's own tests
    coco = [k for k in want if "voc" not in k and k not in ("val/best_f1", "val/f1_score_thresh")]
    assert {k: got[k] for k in coco} == {k: want[k] for k in coco}
