"""VOC AP with the devkit's rules: hand-computed cases, and a transcription of the devkit's evaluation on random
sets."""

import pytest
import torch

from evaluation.voc import VOCAveragePrecision

from .cases import box


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
