"""Image files → uint8 RGB tensors, and the box clean-up every reader of real annotations needs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)


class ImageReadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB whatever the file holds (grayscale, palette, RGBA, CMYK, 16-bit), EXIF rotation applied
    (torchvision's libjpeg-turbo/libpng decoders: several times faster than PIL for VOC/COCO JPEGs)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read the image file ({e.strerror or e})") from e
    if not raw:
        raise ImageReadError(f"{path}: the image file is empty (0 bytes); restore it or remove it from the split")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        raise ImageReadError(f"{path}: cannot decode the image ({e}); the file may be truncated or not an image") from e
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def clip_boxes(boxes: Tensor, height: int, width: int, where: str, per_object: dict[str, Tensor]
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip xyxy ``boxes`` to the image and drop those left with zero width or height, together with their
    ``per_object`` fields; the drop is logged once with ``where`` (the file) and the count."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if keep.all():
        return boxes, per_object
    log.warning("%s: dropped %d box(es) of zero width or height inside the %dx%d image", where,
                int((~keep).sum()), width, height)
    return boxes[keep], {k: v[keep] for k, v in per_object.items()}
