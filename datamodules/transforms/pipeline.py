"""What every paper's training augmentation shares: ``BoxPipeline`` (``torchvision.transforms.v2`` steps on
``tv_tensors``, then the flip and resize every pipeline ends with) and the box bookkeeping after it
(``drop_small_boxes``: boxes under 1 px dropped with their per-object fields), with the settings' checks."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

# target fields with one entry per object: kept or dropped together with their box
PER_OBJECT_FIELDS = ("labels", "difficult", "iscrowd")
FLIP_PROBABILITY = 0.5  # §2.2: "horizontally flipped with probability of 0.5"
MIN_BOX_SIZE = 1.0  # px in the network input: narrower or lower boxes are dropped after augmentation

cv2.setNumThreads(1)  # one thread per loader worker, as torch's in workers: OpenCV's pool would oversubscribe


def input_size(size: int | Sequence[int], key: str) -> tuple[int, int]:
    """``300`` or ``[h, w]`` as (h, w); a clear error for anything else."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"{key}={size}: give one positive int (square input) or [height, width]")
    return int(hw[0]), int(hw[1])


def drop_small_boxes(
    target: dict[str, Tensor], canvas_size: tuple[int, int], min_size: float = MIN_BOX_SIZE
) -> dict[str, Tensor]:
    """Clamp ``boxes`` to the (h, w) canvas in place and drop those under ``min_size`` px wide or high, with their
    per-object fields: ``v2.ClampBoundingBoxes`` + ``v2.SanitizeBoundingBoxes`` at a tenth of their cost
    (0.01 vs 0.1 ms an image, which the flip-only shapes recipe would pay for nothing)."""
    boxes = target["boxes"]
    for k in PER_OBJECT_FIELDS:
        if k in target and len(target[k]) != len(boxes):
            raise ValueError(f"target[{k!r}] has {len(target[k])} entries for {len(boxes)} boxes")
    h, w = canvas_size
    boxes[:, 0::2].clamp_(0, w)  # a box on the right edge may sit a float ulp outside after resizing
    boxes[:, 1::2].clamp_(0, h)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= min_size).all(dim=1)
    if keep.all():
        return target
    return {k: v[keep] if k == "boxes" or k in PER_OBJECT_FIELDS else v for k, v in target.items()}


class BoxPipeline:
    """Runs ``self.pipeline`` (a ``v2.Compose`` or None) on a uint8 image and its target's boxes as ``tv_tensors``,
    then drops boxes under 1 px with their per-object fields. Subclasses build the pipeline from their switches."""

    pipeline: v2.Compose | None = None

    def compose(self, steps: list[v2.Transform], flip: bool, size: tuple[int, int] | None) -> None:
        """``steps``, then the flip and resize every pipeline ends with, as ``self.pipeline``."""
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=FLIP_PROBABILITY))
        if size is not None:
            steps.append(v2.Resize(size, antialias=True))
        self.pipeline = v2.Compose(steps) if steps else None

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if image.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__} expects uint8 images (the model normalises), got {image.dtype}")
        # a copy: some v2 kernels and the clamp below write in place, and a data set may cache its targets
        boxes = target["boxes"].to(torch.float32, copy=True)
        if self.pipeline is not None:
            boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, target = self.pipeline(tv_tensors.Image(image), {**target, "boxes": boxes})
            image, boxes = image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor)
        return image, drop_small_boxes({**target, "boxes": boxes}, tuple(image.shape[-2:]))


def canvas_fill(mean: Sequence[float], key: str) -> tuple[int, ...]:
    """``mean`` in [0, 1] (like model.pixel_mean) as the uint8 colour of new canvas, 0 once normalised."""
    mean = tuple(float(m) for m in mean)
    if len(mean) != 3 or not all(0 <= m <= 1 for m in mean):
        raise ValueError(f"{key}={list(mean)}: give 3 channel means in [0, 1], like model.pixel_mean")
    return tuple(round(m * 255) for m in mean)
