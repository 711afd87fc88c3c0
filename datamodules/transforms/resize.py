"""The validation and inference input: ``ResizeTo`` resizes to the network input and records the scale back to
the image's own pixels (``resize_sample``), which ``DetectionBatch.boxes_in_original_frame`` divides out;
``Preprocess`` makes one image into the network input as a checkpoint's validation transform did, for the tools."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .pipeline import input_size


def resize_sample(image: Tensor, target: dict[str, Tensor], new_h: int, new_w: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Resize image and boxes to (new_h, new_w) and record ``target["scale"] = (sy, sx)`` = new size ÷ original
    size, times any scale already there, which ``DetectionBatch.boxes_in_original_frame`` divides out."""
    h, w = image.shape[-2:]
    if (h, w) != (new_h, new_w):
        image = F.resize(image, [new_h, new_w], antialias=True)
    sy, sx = new_h / h, new_w / w
    boxes = target["boxes"].to(torch.float32)
    return image, {
        **target,
        "boxes": boxes * boxes.new_tensor([sx, sy, sx, sy]),
        "scale": target.get("scale", torch.ones(2)).float() * torch.tensor([sy, sx]),
    }


class ResizeTo:
    """Validation/test: resize to the network input (int or (h, w)), boxes with it; no box is dropped.
    Sets ``target["scale"]`` (``resize_sample``) to report detections in original pixels."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = input_size(size, "data.val_transform.size")
        self.size_settings = ("size",)  # the arguments that set max_output_size, for the memory check's messages

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return resize_sample(image, target, *self.size)

    def max_output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) it makes from any image: ``size``."""
        return self.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class Preprocess:
    """One image → (network input, target) as the model's validation transform makes it: ``target["scale"]``
    maps boxes back to the image's own pixels (``DetectionBatch.boxes_in_original_frame``)."""

    def __init__(self, val_transform: Mapping[str, Any] | None, size_divisible: int = 1) -> None:
        self.config = copy.deepcopy(dict(val_transform)) if val_transform else None
        self.transform = instantiate(self.config) if self.config else None
        self.size_divisible = int(size_divisible)

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        target = {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.long),
            "image_id": torch.tensor(index),
        }
        return (image, target) if self.transform is None else self.transform(image, target)

    def __repr__(self) -> str:
        return f"{self.transform!r} (size_divisible {self.size_divisible})"
