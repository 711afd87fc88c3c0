"""The batch every detector consumes (docs/ARCHITECTURE.md §2): uint8 images and padded per-image targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DetectionBatch:
    """Images and targets of B images, targets padded to M objects with ``valid`` marking real ones.

    images: (B, 3, H, W) uint8, zero-padded bottom/right; image_sizes: (B, 2) (h, w) of each image in it.
    boxes: (B, M, 4) xyxy pixels in the network-input frame; labels: (B, M) long in 0..K-1.
    difficult / crowd: (B, M) bool flags (VOC ``difficult``, COCO ``iscrowd``).
    scales: (B, 2) input size ÷ original size as (sy, sx), to map boxes back to the original image.
    image_ids: (B,) long.
    max_crowd: at least as many crowd boxes as any one image holds (0: none), counted on the host by
    ``collate_detection``, so the assigners size their crowd tables without reading the device (a GPU sync);
    None: unknown, read from ``crowd`` when needed.
    """

    images: Tensor
    image_sizes: Tensor
    boxes: Tensor
    labels: Tensor
    valid: Tensor
    difficult: Tensor
    crowd: Tensor
    scales: Tensor
    image_ids: Tensor
    max_crowd: int | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def crowd_bound(self) -> int:
        """At least as many crowd boxes as any one image holds: ``max_crowd``, or (None) counted on the device."""
        return self.max_crowd if self.max_crowd is not None else int(self.crowd.sum(1).max())

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def boxes_in_original_frame(self, boxes: Tensor, index: int) -> Tensor:
        sy, sx = self.scales[index].tolist()
        return boxes / boxes.new_tensor([sx, sy, sx, sy])

    def targets_in_original_frame(self) -> list[dict[str, Tensor]]:
        """Per-image targets for metrics: boxes in original pixels, labels, and crowd/difficult flags."""
        out = []
        for i in range(len(self)):
            keep = self.valid[i]
            out.append(
                {
                    "boxes": self.boxes_in_original_frame(self.boxes[i][keep], i),
                    "labels": self.labels[i][keep],
                    "iscrowd": self.crowd[i][keep].long(),
                    "difficult": self.difficult[i][keep],
                }
            )
        return out


def pad_per_image(values: Tensor, counts: Tensor, fill: float) -> Tensor:
    """Rows of consecutive images (``counts[i]`` rows for image i, in image order) → (images, max count, ...),
    padded with ``fill``: one scatter, no loop over images."""
    width = int(counts.max()) if len(counts) else 0
    out = values.new_full((len(counts), width, *values.shape[1:]), fill)
    counts = counts.to(values.device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
    slot = torch.arange(len(values), device=values.device) - (torch.cumsum(counts, 0) - counts)[image]
    out[image, slot] = values
    return out


def collate_detection(samples: list[tuple[Tensor, dict[str, Tensor]]], size_divisible: int = 1) -> DetectionBatch:
    """Stack (image uint8 (3,h,w), target dict) pairs: pad images to the largest h, w (rounded up to a multiple of
    ``size_divisible``) and targets to M."""
    images = [img for img, _ in samples]
    targets = [t for _, t in samples]
    b = len(samples)
    h = -(-max(img.shape[-2] for img in images) // size_divisible) * size_divisible
    w = -(-max(img.shape[-1] for img in images) // size_divisible) * size_divisible
    batch_images = torch.zeros((b, 3, h, w), dtype=torch.uint8)
    for i, img in enumerate(images):
        batch_images[i, :, : img.shape[-2], : img.shape[-1]] = img
    m = max(1, max(len(t["labels"]) for t in targets))
    boxes = torch.zeros((b, m, 4))
    labels = torch.zeros((b, m), dtype=torch.long)
    valid = torch.zeros((b, m), dtype=torch.bool)
    difficult = torch.zeros((b, m), dtype=torch.bool)
    crowd = torch.zeros((b, m), dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"]
        labels[i, :n] = t["labels"]
        valid[i, :n] = True
        if "difficult" in t:
            difficult[i, :n] = t["difficult"]
        if "iscrowd" in t:
            crowd[i, :n] = t["iscrowd"].bool()
    return DetectionBatch(
        images=batch_images,
        image_sizes=torch.tensor([img.shape[-2:] for img in images], dtype=torch.long),
        boxes=boxes,
        labels=labels,
        valid=valid,
        difficult=difficult,
        crowd=crowd,
        scales=torch.stack([t.get("scale", torch.ones(2)) for t in targets]).float(),
        image_ids=torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.long),
        max_crowd=int(crowd.sum(1).max()),
    )
