"""The COCO suite against pycocotools' COCOeval bit for bit: the whole evaluation, its match stage against
``evaluateImg``'s per-image results, the other backends, empty and degenerate sets."""

import pytest
import torch

from evaluation.coco import COCOAveragePrecision, coco_match_images
from evaluation.detection_metrics import DetectionMetrics

from .cases import box, pycocotools_eval, random_coco_set


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


@pytest.mark.parametrize("seed", [0, 1])
def test_the_match_stage_equals_pycocotools_evaluate_img(seed):
    """``coco_match_images`` against ``COCOeval.evaluate``'s per-image results (``evalImgs``), detection by
    detection: the detections each (image, class) pair keeps and their ranks, the object each matches at every
    area range and IoU threshold and whether that object is ignored, and the unmatched ones it ignores."""
    detections, targets = random_coco_set(seed)
    reference = pycocotools_eval(detections, targets)
    num_thresholds = len(reference.params.iouThrs)
    ranks, matched, ignored_unmatched = {}, {}, set()
    for result in filter(None, reference.evalImgs):
        area = reference.params.areaRng.index(result["aRng"])
        for j, det_id in enumerate(result["dtIds"]):
            row = det_id - 1  # results get ids 1, 2, ... in input order: the flat state's rows
            ranks[row] = j
            for t in range(num_thresholds):
                if result["dtMatches"][t, j] > 0:
                    matched[row, area, t] = bool(result["dtIgnore"][t, j])
                elif result["dtIgnore"][t, j]:
                    ignored_unmatched.add((row, area, t))

    metric = COCOAveragePrecision()
    metric.update(detections, targets)
    state = metric.flat_state()
    matches = coco_match_images(*(state[name] for name in COCOAveragePrecision.STATES))
    rows = matches.det_rows.tolist()
    assert dict(zip(rows, matches.det_rank.tolist())) == ranks
    entries = zip(matches.match_det.tolist(), matches.match_area.tolist(), matches.match_threshold.tolist())
    ours = {(rows[d], a, t): on_ignored for (d, a, t), on_ignored in zip(entries, matches.match_on_ignored.tolist())}
    assert ours == matched
    outside = {
        (rows[d], a, t)
        for d, a in matches.det_outside.nonzero().tolist()
        for t in range(num_thresholds)
        if (rows[d], a, t) not in ours
    }
    assert outside == ignored_unmatched
    # the set exercises what it claims: the 100 cut, matches on ignored objects, unmatched detections ignored
    assert len(rows) < len(state["det_scores"]) and any(matched.values()) and ignored_unmatched


def test_coco_tensors_in_small_blocks_and_with_float64_scores(monkeypatch):
    from evaluation import coco

    detections, targets = random_coco_set(5)
    expected = pycocotools_eval(detections, targets).eval["precision"]
    monkeypatch.setattr(coco, "_MATCH_BUDGET", 3000)  # a few pairs per matcher block
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
