"""Each resizing transform declares the largest image it makes (``max_output_size``), which the memory check
probes at (engine/memory.py): the declaration must bound what the transform really outputs, over its random draws
and over images of any size and shape, or the check would probe a smaller input than training meets."""

import pytest
import torch

from datamodules.transforms import (
    ResizeTo,
    ShortSideAugmentation,
    ShortSideResize,
    SSDAugmentation,
    YOLOAugmentation,
)

IMAGE_SIZES = [(50, 70), (81, 40), (64, 64), (30, 200), (333, 500)]
DRAWS = 6

RESIZING = {
    "resize_square": lambda: ResizeTo(72),
    "resize_hw": lambda: ResizeTo([48, 80]),
    "ssd": lambda: SSDAugmentation(size=96),
    "ssd_hw_torchvision": lambda: SSDAugmentation(size=[64, 80], photometric_variant="torchvision"),
    "yolo": lambda: YOLOAugmentation(size=96),
    "yolo_hw": lambda: YOLOAugmentation(size=[80, 48]),
    "short_side": lambda: ShortSideResize(64, 100),
    "short_side_uncapped": lambda: ShortSideResize(48, None),
    "short_side_jitter": lambda: ShortSideAugmentation([40, 52, 64], 100),
    "short_side_jitter_uncapped": lambda: ShortSideAugmentation([32, 48], None),
}


def sample(h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h], [0.5 * w, 0.1 * h, 0.9 * w, 0.5 * h]])
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1]), "image_id": torch.tensor(0)}


@pytest.mark.parametrize("name", list(RESIZING))
def test_declared_size_bounds_every_output(name):
    transform = RESIZING[name]()
    g = torch.Generator().manual_seed(0)
    for h, w in IMAGE_SIZES:
        declared = transform.max_output_size((h, w))
        assert isinstance(declared, tuple) and len(declared) == 2 and all(isinstance(s, int) for s in declared)
        reached = False
        for draw in range(DRAWS):
            torch.manual_seed(draw)
            image, _ = transform(*sample(h, w, g))
            out_h, out_w = image.shape[-2:]
            assert out_h <= declared[0] and out_w <= declared[1], (name, (h, w), (out_h, out_w), declared)
            reached |= (out_h, out_w) == declared
        assert reached, f"{name} never made its declared {declared} from {(h, w)} in {DRAWS} draws"


def test_short_side_declaration_is_the_largest_shorter_side_capped():
    """RetinaNet's: the largest of ``min_sizes`` on the shorter side, unless the longer would pass ``max_size``
    (Detectron's rule, truncated to whole pixels as ``v2.RandomShortestSize``)."""
    jitter = ShortSideAugmentation([640, 800], 1333)
    assert jitter.max_output_size((375, 500)) == (800, 1066)  # shorter side 800
    assert jitter.max_output_size((300, 1000)) == (399, 1333)  # the longer side capped at 1333
    assert ShortSideResize(800, 1333).max_output_size((500, 375)) == (1066, 800)
    assert ShortSideResize(800, None).max_output_size((300, 1000)) == (800, 2666)


@pytest.mark.parametrize("make", [lambda: SSDAugmentation(size=None), lambda: YOLOAugmentation(size=None)])
def test_a_transform_that_keeps_the_image_size_declares_none(make):
    """``size=None``: the output follows each image, so the data set bounds it (engine/memory.py falls back to
    the data set's image size) and no setting of the transform lowers it."""
    transform = make()
    assert transform.max_output_size((50, 70)) is None
    assert transform.size_settings == ()


def test_size_settings_name_the_arguments_that_set_the_output():
    assert ResizeTo(64).size_settings == ("size",)
    assert SSDAugmentation(size=300).size_settings == YOLOAugmentation(size=448).size_settings == ("size",)
    assert ShortSideResize().size_settings == ("min_size", "max_size")
    assert ShortSideAugmentation().size_settings == ("min_sizes", "max_size")
