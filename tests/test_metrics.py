"""VOC AP with the devkit's rules on hand-computed cases, and the metric names DESIGN.md promises."""

import pytest
import torch

from detectors.metrics import DetectionMetrics, VOCAveragePrecision, voc_ap


def box(x0, y0, size=10.0):
    return [x0, y0, x0 + size, y0 + size]


def test_voc_ap_on_a_hand_computed_curve():
    # 2 objects; detections by score: TP, FP, TP → precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    recall = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    precision = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    assert voc_ap(recall, precision, eleven_point=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_devkit_rules_duplicates_difficult_and_unmatched():
    metric = VOCAveragePrecision(num_classes=2)
    target = {"boxes": torch.tensor([box(0, 0), box(50, 50), box(100, 100)]), "labels": torch.tensor([0, 0, 0]),
              "difficult": torch.tensor([False, False, True])}
    pred = {"boxes": torch.tensor([box(0, 0), box(1, 0), box(100, 100), box(200, 200), box(50, 51)]),
            "scores": torch.tensor([0.9, 0.8, 0.75, 0.7, 0.6]), "labels": torch.tensor([0, 0, 0, 0, 0])}
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
    target = {"boxes": torch.tensor([box(0, 0, 40), box(50, 50, 36)]), "labels": torch.tensor([0, 1]),
              "iscrowd": torch.tensor([0, 0]), "difficult": torch.tensor([False, False])}
    pred = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    metrics.update([pred], [target])
    out = metrics.compute("val")
    for key in ("val/map", "val/map_50", "val/map_75", "val/mar_100", "val/voc07_map_50", "val/voc_map_50",
                "val/ap/a", "val/ap/b"):
        assert out[key] == pytest.approx(1.0), key
    assert out["val/map_small"] == -1  # both boxes > 32² px: no small objects, COCO's "absent" value
