"""DetectionMetrics: the metric names docs/ARCHITECTURE.md §1 promises, the per-class switch, the
precision-recall curves for the dashboards, the F1-best score threshold, and updates on the device."""

import pytest
import torch

from evaluation.detection_metrics import DetectionMetrics, best_f1_threshold, f1_by_threshold

from ..conftest import DEVICES
from .cases import box, pycocotools_eval, random_coco_set


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
