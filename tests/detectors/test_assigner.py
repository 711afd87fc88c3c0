import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

import pytest

from detectors.assigners import IGNORE
from detectors.retinanet import MaxIoUAssigner
from detectors.ssd import BestMatchIoUAssigner
from detectors.batch import DetectionBatch, collate_detection
from detectors.priors import Priors

from ..conftest import DEVICES

K = 4


def batch_of(*per_image):
    samples = [
        (
            torch.zeros(3, 64, 64, dtype=torch.uint8),
            {
                "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long),
                "image_id": torch.tensor(i),
                **extra,
            },
        )
        for i, (b, labels, extra) in enumerate(per_image)
    ]
    return collate_detection(samples)


def grid_priors():
    xs = torch.arange(0, 64, 4.0)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    small = torch.stack([xx, yy, xx + 8, yy + 8], -1).reshape(-1, 4)
    big = torch.stack([xx, yy, xx + 16, yy + 12], -1).reshape(-1, 4)
    boxes = torch.cat([small, big])
    return Priors(boxes, [len(boxes)])


def test_matches_torchvision_matcher_per_image():
    priors = grid_priors()
    batch = batch_of(([[3, 5, 15, 13], [30, 30, 50, 44], [31, 29, 49, 45]], [1, 2, 3], {}), ([[0, 0, 63, 63]], [0], {}))
    out = MaxIoUAssigner(0.5, 0.4, True)(priors, batch, K)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i in range(2):
        gt = batch.boxes[i][batch.valid[i]]
        idx = matcher(box_iou(gt, priors.boxes))
        expected = torch.where(idx >= 0, batch.labels[i][idx.clamp(min=0)], idx)
        expected = torch.where(idx == Matcher.BELOW_LOW_THRESHOLD, K, expected)
        expected = torch.where(idx == Matcher.BETWEEN_THRESHOLDS, IGNORE, expected)
        assert torch.equal(out["labels"][i], expected)
        pos = idx >= 0
        torch.testing.assert_close(out["boxes"][i][pos], gt[idx[pos]])


def test_thresholds_split_positive_ignored_background():
    priors = Priors(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 16], [0, 0, 10, 30], [40, 40, 50, 50.0]]), [4])
    batch = batch_of(([[0, 0, 10, 10]], [2], {}))
    labels = MaxIoUAssigner(0.5, 0.4, low_quality_matches=False)(priors, batch, K)["labels"][0]
    # IoUs: 1.0, 10/16=0.625, 1/3, 0
    assert labels.tolist() == [2, 2, K, K]
    priors = Priors(torch.tensor([[0, 0, 10, 22.0]]), [1])  # IoU 10/22 = 0.45: ignored
    assert MaxIoUAssigner(0.5, 0.4, False)(priors, batch, K)["labels"].tolist() == [[IGNORE]]


def test_low_quality_match_rescues_an_object_no_anchor_fits():
    priors = Priors(torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.0]]), [2])
    batch = batch_of(([[0, 0, 4, 4]], [1], {}))  # IoU 0.16 with its best anchor
    assert MaxIoUAssigner(0.5, 0.4, True)(priors, batch, K)["labels"].tolist() == [[1, K]]
    assert MaxIoUAssigner(0.5, 0.4, False)(priors, batch, K)["labels"].tolist() == [[K, K]]


def test_empty_image_and_crowd_give_no_positives():
    priors = grid_priors()
    batch = batch_of(([], [], {}), ([[0, 0, 16, 12]], [1], {"iscrowd": torch.tensor([1])}))
    labels = MaxIoUAssigner(crowd_ioa=None)(priors, batch, K)["labels"]
    assert (labels == K).all()
    labels = MaxIoUAssigner()(priors, batch, K)["labels"]  # by default, background inside the crowd is ignored
    assert ((labels == K) | (labels == IGNORE)).all() and (labels[1] == IGNORE).any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("crowd_ioa", [None, 0.7])
@pytest.mark.parametrize("bipartite", [True, False])
def test_best_match_assigner_equals_the_rule_as_written(seed, crowd_ioa, bipartite):
    g = torch.Generator().manual_seed(seed)
    priors = grid_priors()
    if seed % 2:
        priors = Priors(priors.boxes, priors.level_sizes, ignored=torch.rand(len(priors.boxes), generator=g) < 0.2)
    b, m = 6, 7
    xy = torch.rand(b, m, 2, generator=g) * 56
    boxes = torch.cat((xy, xy + 2 + torch.rand(b, m, 2, generator=g) * 30), -1)
    boxes[:, 1] = boxes[:, 0]  # duplicate objects: equal IoUs claim the same prior
    boxes[:, 2] = torch.tensor([100.0, 100, 120, 120])  # overlaps nothing: no claim
    boxes[0, 3] = boxes[0, 4] = priors.boxes[5]  # two exact fits of one prior
    valid = torch.rand(b, m, generator=g) < 0.8
    crowd = torch.rand(b, m, generator=g) < 0.1
    batch = DetectionBatch(
        images=torch.zeros(b, 3, 64, 64, dtype=torch.uint8),
        image_sizes=torch.full((b, 2), 64),
        boxes=boxes,
        labels=torch.randint(0, K, (b, m), generator=g),
        valid=valid,
        difficult=torch.zeros_like(valid),
        crowd=crowd,
        scales=torch.ones(b, 2),
        image_ids=torch.arange(b),
    )
    out = BestMatchIoUAssigner(0.5, crowd_ioa=crowd_ioa, bipartite=bipartite)(priors, batch, K)
    expected = BestMatchIoUAssigner(0.5, crowd_ioa=crowd_ioa, fast=False, bipartite=bipartite)(priors, batch, K)
    assert (out["labels"] < K).sum() > b  # positives from claims and from the threshold
    assert torch.equal(out["labels"], expected["labels"])
    assert torch.equal(out["boxes"], expected["boxes"])


def area_inside(prior, box):
    iw = max(0.0, min(prior[2], box[2]) - max(prior[0], box[0]))
    ih = max(0.0, min(prior[3], box[3]) - max(prior[1], box[1]))
    return iw * ih / ((prior[2] - prior[0]) * (prior[3] - prior[1]))


@pytest.mark.parametrize("assigner", [MaxIoUAssigner(0.5, 0.4, True, crowd_ioa=0.7), BestMatchIoUAssigner(0.5, 0.7)])
def test_background_inside_crowd_regions_is_ignored_and_positives_stay(assigner):
    priors = grid_priors()
    crowd_box, person = [0, 0, 40, 30], [8, 8, 24, 20]  # a person inside the crowd region keeps its positives
    batch = batch_of(
        ([person, crowd_box, [44, 44, 60, 60]], [1, 0, 2], {"iscrowd": torch.tensor([0, 1, 0])}),
        ([crowd_box], [3], {"iscrowd": torch.tensor([1])}),
        ([[44, 44, 60, 60]], [2], {}),
    )
    plain = type(assigner)(**{**vars(assigner), "crowd_ioa": None})(priors, batch, K)["labels"]
    out = assigner(priors, batch, K)["labels"]
    for i in range(3):
        crowd = batch.boxes[i][batch.valid[i] & batch.crowd[i]].tolist()
        for n, prior in enumerate(priors.boxes.tolist()):
            inside = any(area_inside(prior, c) > 0.7 for c in crowd)
            if plain[i, n] == K and inside:
                assert out[i, n] == IGNORE
            else:
                assert out[i, n] == plain[i, n]  # positives, the other background and ignored priors unchanged
    assert (out[1] == IGNORE).sum() > 20 and not (out[1] < K).logical_and(out[1] >= 0).any()  # crowd: no positive
    assert ((out[0] == 1).sum() > 0) and torch.equal(out[2], plain[2])


@pytest.mark.parametrize("low_quality", [True, False])
def test_blocks_of_priors_give_the_one_block_result(low_quality):
    """The CPU path computes the IoU in blocks of priors; any block size gives exactly the one-block result,
    ties between priors (a grid of equal anchors) and crowd and padding slots included."""
    priors = grid_priors()  # 512 priors, many with equal IoU to an object
    batch = batch_of(
        ([[3, 5, 15, 13], [30, 30, 50, 44], [31, 29, 49, 45]], [1, 2, 3], {}),
        ([[0, 0, 63, 63], [8, 8, 16, 16]], [0, 3], {"iscrowd": torch.tensor([0, 1])}),
        ([], [], {}),
    )
    whole = MaxIoUAssigner(0.5, 0.4, low_quality, cpu_block=None)(priors, batch, K)
    for block in (1, 7, 100, 511, 512, 4096):
        blocked = MaxIoUAssigner(0.5, 0.4, low_quality, cpu_block=block)(priors, batch, K)
        assert torch.equal(blocked["labels"], whole["labels"]), block
        assert torch.equal(blocked["boxes"], whole["boxes"]), block
    assert (whole["labels"][0] < K).sum() >= 3 and (whole["labels"] == IGNORE).any()
    if low_quality:  # the big object's best IoU is tied by priors spread over many blocks (156 of them)
        plain = MaxIoUAssigner(0.5, 0.4, False, cpu_block=None)(priors, batch, K)
        assert (plain["labels"] != whole["labels"]).sum() > 100


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bipartite", [True, False])
def test_best_match_assigner_on_its_docstrings_worked_example(monkeypatch, fast, bipartite):
    """BestMatchIoUAssigner's docstring: A keeps the d0 both claim, d1 (0.55) is A's too, d3 is background; d2
    is B's next best box (bipartite) or background."""
    import detectors.ssd

    table = torch.tensor([[[0.70, 0.55, 0.10, 0.00], [0.65, 0.20, 0.40, 0.00]]])  # (B, M, N): A, B × d0..d3
    monkeypatch.setattr(detectors.ssd, "batched_box_iou", lambda boxes, priors: table.clone())
    priors = Priors(torch.tensor([[0.0, 0, 8, 8]]).repeat(4, 1), [4])
    batch = DetectionBatch(
        images=torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        image_sizes=torch.full((1, 2), 8),
        boxes=torch.tensor([[[0.0, 0, 4, 4], [4.0, 4, 8, 8]]]),
        labels=torch.tensor([[0, 1]]),
        valid=torch.ones(1, 2, dtype=torch.bool),
        difficult=torch.zeros(1, 2, dtype=torch.bool),
        crowd=torch.zeros(1, 2, dtype=torch.bool),
        scales=torch.ones(1, 2),
        image_ids=torch.arange(1),
    )
    out = BestMatchIoUAssigner(0.5, crowd_ioa=None, fast=fast, bipartite=bipartite)(priors, batch, num_classes=2)
    assert out["labels"].tolist() == ([[0, 0, 1, 2]] if bipartite else [[0, 0, 2, 2]])  # A: 0, B: 1, background: 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_bipartite_rounds_equal_the_greedy_loop_under_heavy_contention(seed, device):
    """Twenty objects on thirty boxes, all overlapping: the rounds must resolve cascades of lost claims exactly
    as the loop does, and match every object to its own box (at most once each way). On CUDA too: the ties
    rely on ``max(dim)`` giving the first of equal values there as well."""
    g = torch.Generator().manual_seed(seed)
    iou = torch.rand(4, 20, 30, generator=g, dtype=torch.float64).to(device)
    iou[1, 5:] = -1.0  # padding rows (15 objects absent)
    iou[2, :, ::3] = -1.0  # ignored boxes
    iou[3] = iou[3].round(decimals=1)  # many equal IoUs: the ties follow the loop's (object, box) order
    fast = BestMatchIoUAssigner.match_bipartite(iou)
    plain = BestMatchIoUAssigner.match_bipartite_plain(iou)
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])
    matched_gt, m = fast[1], iou.shape[1]
    for b, objects in enumerate([20, 5, 20, 20]):
        got = matched_gt[b][matched_gt[b] < m]
        assert sorted(got.tolist()) == list(range(objects))  # every present object once, each box at most once
    # the greedy loop's first pick is the table's highest IoU
    first = divmod(int(iou[0].argmax()), 30)
    assert matched_gt[0, first[1]] == first[0]
