import pytest
import torch
from torchvision.ops import batched_nms
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detectors.postprocess import capped_nms_per_image, grouped_nms, nms_per_image
from detectors.retinanet import RetinaNetPostprocess
from detectors.retinanet import AnchorGenerator

from ..conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torchvision_postprocess_detections(device):
    k, b = 6, 3
    image_size = (128, 160)
    feature_sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    priors = AnchorGenerator(size_factor=0.25)(image_size, feature_sizes, device)
    n = priors.boxes.shape[0]
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(b, n, k, generator=g) * 2 - 4).to(device)
    deltas = (torch.randn(b, n, 4, generator=g) * 0.3).to(device)
    ours = RetinaNetPostprocess(0.05, 300, 0.5, 50)(
        {"class_scores": logits, "box_deltas": deltas}, priors, torch.tensor([image_size] * b, device=device)
    )

    model = RetinaNet(
        resnet_fpn_backbone(backbone_name="resnet18", weights=None),
        num_classes=k,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=50,
        topk_candidates=300,
    )
    split = lambda x: list(x.split(priors.level_sizes, 1))  # noqa: E731
    anchors = [list(priors.boxes.split(priors.level_sizes))] * b
    theirs = model.postprocess_detections(
        {"cls_logits": split(logits), "bbox_regression": split(deltas)}, anchors, [image_size] * b
    )
    for o, t in zip(ours, theirs):
        assert len(o["scores"]) == len(t["scores"]) > 0 and o["boxes"].device == logits.device
        torch.testing.assert_close(o["scores"], t["scores"])
        torch.testing.assert_close(o["boxes"], t["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(o["labels"], t["labels"])


@pytest.mark.parametrize("device", DEVICES)
def test_caps_detections_per_image_and_handles_nothing_above_threshold(device):
    priors = AnchorGenerator(sizes=[8], scales_per_octave=1, aspect_ratios=[1.0])((32, 32), [(8, 8)], device)
    n = priors.boxes.shape[0]
    logits = torch.full((2, n, 3), -10.0)
    logits[0] = torch.randn(n, 3) + 3  # image 0: everything confident
    outputs = {"class_scores": logits.to(device), "box_deltas": torch.zeros(2, n, 4, device=device)}
    out = RetinaNetPostprocess(0.05, 1000, 0.5, 7)(outputs, priors, torch.tensor([[32, 32], [32, 32]], device=device))
    assert len(out[0]["boxes"]) == 7 and len(out[1]["boxes"]) == 0
    assert (out[0]["scores"][:-1] >= out[0]["scores"][1:]).all()
    assert (out[0]["boxes"] >= 0).all() and (out[0]["boxes"] <= 32).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 7, 128, 100_000])
def test_grouped_nms_equals_torchvision_batched_nms(chunk_size, device):
    g = torch.Generator().manual_seed(1)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat((xy, xy + 5 + torch.rand(n, 2, generator=g) * 60), 1).to(device)
    scores = torch.rand(n, generator=g).to(device)
    groups = (torch.randint(0, 150, (n,), generator=g) ** 2 % 97).to(device)  # uneven group sizes, missing ids
    ours = grouped_nms(boxes, scores, groups, 0.5, chunk_size=chunk_size)
    theirs = batched_nms(boxes, scores, groups, 0.5)
    assert torch.equal(ours.sort().values, theirs.sort().values)
    assert len(grouped_nms(boxes[:0], scores[:0], groups[:0], 0.5)) == 0


def assert_equal_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(o[key], t[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cap", [3, 10, 40, 1000])
def test_capped_nms_per_image_equals_nms_per_image(seed, cap, device):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[60, 80], [60, 80], [40, 40], [60, 80], [50, 50]])
    per_image = [120, 5, 300, 0, 80]  # image 3 has no candidates
    image_idx = torch.repeat_interleave(torch.arange(len(per_image)), torch.tensor(per_image))
    n = len(image_idx)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat((xy, xy + 3 + torch.rand(n, 2, generator=g) * 25), 1)
    boxes[image_idx == 2] = torch.tensor([5.0, 5, 30, 30]) + torch.randn(300, 4, generator=g)  # one cluster: NMS
    # keeps few, so the capped prefix falls short and the image is redone in full
    scores = (torch.rand(n, generator=g) * 8).round() / 8 + 0.01  # many equal scores
    labels = torch.randint(0, 3, (n,), generator=g)
    boxes, scores, labels, image_idx, sizes = (t.to(device) for t in (boxes, scores, labels, image_idx, sizes))
    plain = nms_per_image(boxes, scores, labels, image_idx, sizes, 0.5, 8)
    assert_equal_detections(capped_nms_per_image(boxes, scores, labels, image_idx, sizes, 0.5, 8, cap), plain)
    empty = capped_nms_per_image(boxes[:0], scores[:0], labels[:0], image_idx[:0], sizes, 0.5, 8, cap)
    assert [len(d["scores"]) for d in empty] == [0] * len(sizes)
