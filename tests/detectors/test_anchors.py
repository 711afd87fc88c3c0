import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detectors.retinanet import AnchorGenerator

SIZES = [32, 64, 128, 256, 512]


def torchvision_anchors(image_size, feature_sizes, integer_scales=True):
    scale = (lambda x: int(x)) if integer_scales else (lambda x: x)
    tv = TVAnchorGenerator(
        tuple((s, scale(s * 2 ** (1 / 3)), scale(s * 2 ** (2 / 3))) for s in SIZES), ((0.5, 1.0, 2.0),) * 5
    )
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    feats = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    return tv(images, feats)[0]


def test_count_and_shapes_match_torchvision_at_512():
    feature_sizes = [(512 // s, 512 // s) for s in (8, 16, 32, 64, 128)]
    ours = AnchorGenerator(SIZES)((512, 512), feature_sizes)
    theirs = torchvision_anchors((512, 512), feature_sizes)
    assert ours.boxes.shape == theirs.shape == (9 * sum(h * w for h, w in feature_sizes), 4)
    assert ours.level_sizes == [9 * h * w for h, w in feature_sizes]
    # paper sizes are exact 2^(k/3) multiples; torchvision truncates and rounds them: within a pixel or two
    assert (ours.boxes - theirs).abs().max() <= 2.0
    wh = ours.boxes[:, 2:] - ours.boxes[:, :2]
    first_level = wh[: ours.level_sizes[0]][:9]
    areas = (first_level[:, 0] * first_level[:, 1]).reshape(3, 3)
    for ratio_row in areas:  # per ratio: areas (32·2^(k/3))², k = 0, 1, 2
        torch.testing.assert_close(
            ratio_row.double(),
            torch.tensor([(32 * 2 ** (k / 3)) ** 2 for k in range(3)], dtype=torch.float64),
            rtol=1e-5,
            atol=1e-3,
        )


def test_integer_sizes_reproduce_torchvision_exactly():
    feature_sizes = [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]
    ours = AnchorGenerator(SIZES, integer_sizes=True)((512, 640), feature_sizes)
    torch.testing.assert_close(ours.boxes, torchvision_anchors((512, 640), feature_sizes))


def test_aspect_ratio_is_height_over_width_and_cache_reused():
    gen = AnchorGenerator([32], aspect_ratios=[2.0], scales_per_octave=1)
    priors = gen((64, 64), [(8, 8)])
    w, h = priors.boxes[0, 2] - priors.boxes[0, 0], priors.boxes[0, 3] - priors.boxes[0, 1]
    assert math.isclose(float(h / w), 2.0, rel_tol=1e-5)
    assert gen((64, 64), [(8, 8)]) is priors
