import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import box_iou

from detectors.boxes import BoxCoder, aligned_box_iou, batched_box_iou


def random_boxes(n, size=100.0):
    xy = torch.rand(n, 2) * size
    wh = torch.rand(n, 2) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_batched_iou_matches_torchvision_per_image():
    a = torch.stack([random_boxes(7) for _ in range(3)])
    b = torch.stack([random_boxes(11) for _ in range(3)])
    ours = batched_box_iou(a, b)
    assert ours.shape == (3, 7, 11)
    for i in range(3):
        torch.testing.assert_close(ours[i], box_iou(a[i], b[i]))


def test_batched_iou_equals_the_plain_formula_in_float64():
    """The in-place kernel against intersection ÷ union written out, on overlapping, disjoint, nested, touching
    and zero-area boxes."""
    a = torch.stack([random_boxes(40) for _ in range(2)]).double()
    b = torch.cat([random_boxes(30), torch.tensor([[10.0, 10, 10, 30], [0, 0, 5, 5], [5, 0, 9, 5]])]).double()
    a[0, :3] = torch.tensor([[0.0, 0, 5, 5], [1, 1, 2, 2], [200, 200, 300, 300]])  # touching, nested, disjoint
    plain = aligned_box_iou(a[..., :, None, :], b[None, None, :, :])
    torch.testing.assert_close(batched_box_iou(a, b), plain, rtol=0, atol=1e-15)
    assert plain[0, 0, -2] == 1 and plain[0, 0, -1] == 0 and plain[0, 1, -2] == 1 / 25 and (plain[0, 2] == 0).all()


def test_iou_broadcasts_priors_over_batch():
    a = torch.stack([random_boxes(4) for _ in range(2)])
    priors = random_boxes(9)
    torch.testing.assert_close(batched_box_iou(a, priors)[1], box_iou(a[1], priors))


def test_encode_matches_torchvision_and_decode_inverts_it():
    boxes, priors = random_boxes(50), random_boxes(50)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ours = BoxCoder(weights)
        theirs = TVBoxCoder(weights)
        deltas = ours.encode(boxes, priors)
        torch.testing.assert_close(deltas, theirs.encode_single(boxes, priors))
        torch.testing.assert_close(ours.decode(deltas, priors), boxes, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(
            ours.decode(deltas, priors), theirs.decode_single(deltas, priors), atol=1e-3, rtol=1e-5
        )


def test_decode_clamps_huge_sizes_like_torchvision():
    priors = random_boxes(4)
    deltas = torch.tensor([[0, 0, 50.0, 80.0]]).expand(4, 4)
    ours = BoxCoder().decode(deltas, priors)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, TVBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, priors))
