"""The metrics' states as flat tensors, what the COCO (coco.py) and VOC (voc.py) families share: each batch is kept
as one row per box and a count per image, so an update costs a handful of tensor operations whatever the batch
size, and the states gather across processes by "cat"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def flatten_images(items: Sequence[dict[str, Tensor]], keys: Sequence[str]) -> tuple[Tensor, ...]:
    """The images' boxes of each key concatenated, and the number per image, on the boxes' device (a state list
    of CPU counts beside GPU boxes would be split by the next ``.to(device)``: torchmetrics moves the elements
    appended before, not the one appended after)."""
    counts = torch.tensor([len(item[keys[0]]) for item in items], dtype=torch.long, device=items[0][keys[0]].device)
    return (*(torch.cat([item[k] for item in items]) for k in keys), counts)


def cat_or_empty(xs: list[Tensor], dtype: torch.dtype, width: int = 0) -> Tensor:
    """A state list as one tensor: ``xs`` concatenated, or an empty one of ``dtype`` (and ``width`` columns)."""
    return torch.cat(xs) if len(xs) else torch.zeros((0, width) if width else 0, dtype=dtype)
