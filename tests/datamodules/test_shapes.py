"""The built-in shapes data: deterministic, objects inside the image and within the size/overlap rules."""

import pytest
import torch

from datamodules.shapes import SHAPE_CLASSES, ShapesDataModule, _overlap_of_smaller
from datamodules.transforms import SSDAugmentation


def test_deterministic_and_val_differs_from_train():
    a, b = ShapesDataModule(num_train=8, num_val=8), ShapesDataModule(num_train=8, num_val=8)
    img_a, t_a = a.train_set[3]
    img_b, t_b = b.train_set[3]
    assert torch.equal(img_a, img_b) and torch.equal(t_a["boxes"], t_b["boxes"])
    assert not torch.equal(a.val_set[3][0], img_a)
    assert not torch.equal(ShapesDataModule(seed=1, num_train=8).train_set[3][0], img_a)


def test_objects_respect_size_bounds_overlap_and_image():
    dm = ShapesDataModule(image_size=128, num_val=64)
    counts, sides = [], []
    for i in range(64):
        image, target = dm.val_set[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
        boxes, labels = target["boxes"], target["labels"]
        assert ((boxes >= 0) & (boxes <= 128)).all() and (labels < len(SHAPE_CLASSES)).all()
        wh = boxes[:, 2:] - boxes[:, :2]
        sides.append((wh[:, 0] * wh[:, 1]).sqrt())
        counts.append(len(labels))
        for j in range(len(boxes)):
            for k in range(j):
                assert _overlap_of_smaller(boxes[j].tolist(), boxes[k].tolist()) <= 0.5 + 1e-6
    sides = torch.cat(sides)
    assert sides.min() >= 10 * 0.999 and sides.max() <= 0.8 * 128 * 1.001
    assert sides.min() < 16 and sides.max() > 64  # small and large objects both occur
    assert min(counts) >= 1 and max(counts) >= 4


def test_train_transform_flips_after_rendering_and_val_stays_plain():
    flip_only = SSDAugmentation(size=None, photometric=False, expand=False, crop=False)  # as data/transform=flip
    plain = ShapesDataModule(num_train=4).train_set
    data = ShapesDataModule(num_train=4, num_val=4, train_transform=flip_only)
    flipped = data.train_set
    assert torch.equal(data.val_set[0][0], ShapesDataModule(num_val=4).val_set[0][0])
    torch.manual_seed(0)
    for i in range(4):
        img, t = flipped[i]
        ref_img, ref_t = plain[i]
        if torch.equal(img, ref_img.flip(-1)):
            mirrored = torch.stack(
                (128 - ref_t["boxes"][:, 2], ref_t["boxes"][:, 1], 128 - ref_t["boxes"][:, 0], ref_t["boxes"][:, 3]), 1
            )
            assert torch.allclose(t["boxes"], mirrored)
        else:
            assert torch.equal(img, ref_img) and torch.equal(t["boxes"], ref_t["boxes"])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="min_object_size"):
        ShapesDataModule(min_object_size=200)
    with pytest.raises(ValueError, match="hexagon"):
        ShapesDataModule(classes=["hexagon"])


def test_cached_images_equal_fresh_ones_and_survive_in_place_transforms():
    def scribble(image, target):  # a transform that writes into what it is given
        image.zero_()
        target["boxes"].add_(1)
        return image, target

    cached = ShapesDataModule(num_train=4, num_val=4, cache=True)
    fresh = ShapesDataModule(num_train=4, num_val=4, cache=False)
    for _ in range(2):  # the second pass reads the cache
        for i in range(4):
            (a, ta), (b, tb) = cached.train_set[i], fresh.train_set[i]
            assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
            assert torch.equal(ta["labels"], tb["labels"])
    assert len(cached.train_set.cache) == 4 and fresh.train_set.cache is None
    cached.train_set.transform = scribble
    scribble_out = cached.train_set[0]
    cached.train_set.transform = None
    image, target = cached.train_set[0]
    assert scribble_out[0].sum() == 0 and image.sum() > 0
    assert torch.equal(target["boxes"], fresh.train_set[0][1]["boxes"])
