"""``shapes``: a procedural detection data set that needs no files.

Coloured ellipses, rectangles, triangles, crosses and diamonds (any aspect ratio 1:2..2:1, sizes from
``min_size`` px to most of the image) on textured backgrounds, several per image, partly occluding each
other. Image ``i`` of a split is a pure function of (seed, split, i), so runs are reproducible and the
set costs no disk; the box of each object is the tight box of its full (unoccluded) shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DetectionDataModule, SampleTransform

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


def _shape_mask(kind: str, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test on normalised box coordinates u, v ∈ [−1, 1] (the shape fills its box)."""
    if kind == "ellipse":
        return u * u + v * v <= 1
    if kind == "rectangle":
        return torch.ones_like(u, dtype=torch.bool)
    if kind == "triangle":  # apex at top centre, base along the bottom
        return u.abs() <= (v + 1) / 2
    if kind == "cross":
        return (u.abs() <= 1 / 3) | (v.abs() <= 1 / 3)
    if kind == "diamond":
        return u.abs() + v.abs() <= 1
    raise ValueError(f"data.classes: unknown shape {kind!r}; the shapes data set draws {list(SHAPE_CLASSES)}")


def _background(size: int, g: torch.Generator) -> Tensor:
    """Smooth colour noise + faint stripes: texture to ignore, not a flat colour to subtract."""
    coarse = torch.rand((1, 3, 4, 4), generator=g) * 0.6 + 0.2
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    angle = float(torch.rand((), generator=g)) * math.pi
    period = 4 + float(torch.rand((), generator=g)) * 12
    stripes = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    img = img + 0.08 * stripes[None] + 0.04 * torch.randn((3, size, size), generator=g)
    return img.clamp(0, 1)


def render_shapes_image(
    seed: int,
    size: int,
    classes: Sequence[str],
    min_objects: int,
    max_objects: int,
    min_size: float,
    max_size_fraction: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One image (3, size, size) uint8 with its boxes (n, 4) xyxy and labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    img = _background(size, g)
    n_target = int(torch.randint(min_objects, max_objects + 1, (1,), generator=g))
    max_size = max_size_fraction * size
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(n_target * 10):  # rejection sampling: limit how much objects hide each other
        if len(boxes) == n_target:
            break
        # log-uniform side length: as many small objects as large ones
        side = math.exp(math.log(min_size) + float(torch.rand((), generator=g)) * math.log(max_size / min_size))
        aspect = math.exp((float(torch.rand((), generator=g)) * 2 - 1) * math.log(2))
        w, h = min(side * math.sqrt(aspect), size - 1), min(side / math.sqrt(aspect), size - 1)
        x0 = float(torch.rand((), generator=g)) * (size - w)
        y0 = float(torch.rand((), generator=g)) * (size - h)
        box = [x0, y0, x0 + w, y0 + h]
        if any(_overlap_of_smaller(box, other) > 0.5 for other in boxes):
            continue
        label = int(torch.randint(len(classes), (1,), generator=g))
        _paint(img, box, classes[label], g)
        boxes.append(box)
        labels.append(label)
    image = (img * 255).round().to(torch.uint8)
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long)


def _overlap_of_smaller(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _paint(img: Tensor, box: list[float], kind: str, g: torch.Generator) -> None:
    x0, y0, x1, y1 = box
    c0, r0 = int(math.floor(x0)), int(math.floor(y0))
    c1, r1 = int(math.ceil(x1)), int(math.ceil(y1))
    ys = torch.arange(r0, r1, dtype=torch.float32) + 0.5  # pixel centres
    xs = torch.arange(c0, c1, dtype=torch.float32) + 0.5
    v = (ys[:, None] - (y0 + y1) / 2) / ((y1 - y0) / 2)
    u = (xs[None, :] - (x0 + x1) / 2) / ((x1 - x0) / 2)
    inside = _shape_mask(kind, u.expand(len(ys), -1), v.expand(-1, len(xs))) & (u.abs() <= 1) & (v.abs() <= 1)
    region = img[:, r0:r1, c0:c1]
    # a colour that stands out from what is under it
    under = region.mean(dim=(1, 2))
    colour = torch.rand(3, generator=g)
    if (colour - under).abs().max() < 0.35:
        colour = torch.where(under > 0.5, under - 0.45, under + 0.45).clamp(0, 1)
    shade = colour[:, None, None] * (0.9 + 0.2 * torch.rand((1, len(ys), len(xs)), generator=g))
    region[:] = torch.where(inside[None], shade.clamp(0, 1), region)


class ShapesDataset(Dataset):
    """``size`` shapes images; with ``cache``, each is drawn once and kept (before the transform, which still
    draws anew every epoch): drawing costs a few ms an image in Python, a sizeable part of a small model's step."""

    def __init__(
        self,
        size: int,
        seed: int,
        image_size: int,
        classes: Sequence[str],
        min_objects: int,
        max_objects: int,
        min_object_size: float,
        max_object_fraction: float,
        transform: SampleTransform | None = None,
        cache: bool = False,
    ) -> None:
        self.size, self.seed, self.image_size = size, seed, image_size
        self.classes = list(classes)
        for c in self.classes:
            _shape_mask(c, torch.zeros(1), torch.zeros(1))  # unknown names fail here, not mid-epoch
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_object_size, self.max_object_fraction = min_object_size, max_object_fraction
        self.transform = transform
        self.cache: dict[int, tuple[Tensor, Tensor, Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def aspect_ratios(self) -> list[float]:
        return [1.0] * self.size  # square images

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        drawn = self.cache.get(index) if self.cache is not None else None
        if drawn is None:
            drawn = render_shapes_image(
                self.seed * 1_000_003 + index,
                self.image_size,
                self.classes,
                self.min_objects,
                self.max_objects,
                self.min_object_size,
                self.max_object_fraction,
            )
            if self.cache is not None:
                self.cache[index] = drawn
        image, boxes, labels = (t.clone() for t in drawn)  # transforms may write into what they are given
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(index)}
        return (image, target) if self.transform is None else self.transform(image, target)


class ShapesDataModule(DetectionDataModule):
    """Train and val splits of ``shapes`` (disjoint seeds), generated on the fly, then transformed
    (conf/data/shapes.yaml: horizontal flip for training, ``data/transform=ssd`` for the SSD paper's augmentation).
    ``cache`` keeps every drawn image in memory (3·S² bytes each; each loader worker holds its own copy)."""

    def __init__(
        self,
        classes: Sequence[str] = SHAPE_CLASSES,
        image_size: int = 128,
        num_train: int = 4096,
        num_val: int = 256,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        min_object_size: float = 10.0,
        max_object_fraction: float = 0.8,
        batch_size: int = 16,
        cache: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(classes, batch_size, **loader)  # loader and transform settings: DetectionDataModule
        if min_object_size >= max_object_fraction * image_size:
            raise ValueError(
                f"data.min_object_size={min_object_size} must be below "
                f"data.max_object_fraction × data.image_size = {max_object_fraction * image_size}"
            )
        common = dict(
            image_size=image_size,
            classes=self.classes,
            min_objects=min_objects,
            max_objects=max_objects,
            min_object_size=min_object_size,
            max_object_fraction=max_object_fraction,
            cache=cache,
        )
        self.train_set = ShapesDataset(num_train, seed=2 * seed, transform=self.train_transform, **common)
        self.val_set = ShapesDataset(num_val, seed=2 * seed + 1, transform=self.val_transform, **common)
