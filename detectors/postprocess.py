"""Inference primitives the three papers share: segmented top-k, batched NMS per image, clipping.
Each paper's postprocess that composes them is in its own module."""

from __future__ import annotations

import math

import torch
from torch import Tensor
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms, used by grouped_nms)

from .batch import pad_per_image


def topk_per_group(scores: Tensor, group: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores within each group (a segmented top-k, no loop over groups):
    order by score, then stably by group, and rank within each group's run."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    counts = torch.bincount(group)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=scores.device) - first.repeat_interleave(counts)
    return order[rank < k]


def nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_idx: Tensor,
    image_sizes: Tensor,
    nms_thresh: float,
    max_detections: int,
) -> list[dict[str, Tensor]]:
    """Clip to each image, class-wise NMS, keep the ``max_detections`` best per image (by decreasing
    score), for flat candidates (S, 4), (S,), (S,) of images ``image_idx``."""
    boxes = clip_to_images(boxes, image_idx, image_sizes)
    num_classes = int(labels.max()) + 1 if labels.numel() else 1
    kept = grouped_nms(boxes, scores, image_idx * num_classes + labels, nms_thresh)
    return best_per_image(kept, boxes, scores, labels, image_idx, len(image_sizes), max_detections)


def capped_nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_idx: Tensor,
    image_sizes: Tensor,
    nms_thresh: float,
    max_detections: int,
    candidates_per_image: int,
) -> list[dict[str, Tensor]]:
    """``nms_per_image`` with the same detections, faster when images have many more candidates than
    ``max_detections``: NMS runs first on each image's ``candidates_per_image`` best (ties included), and
    again on all of an image's candidates only if fewer than ``max_detections`` survive.

    Exact because greedy NMS keeps or drops a box by the better boxes of its class alone, all of which are
    in the prefix; so a prefix that keeps ``max_detections`` holds the best ``max_detections`` of the whole.
    """
    boxes = clip_to_images(boxes, image_idx, image_sizes)
    num_images = len(image_sizes)
    num_classes = int(labels.max()) + 1 if labels.numel() else 1
    groups = image_idx * num_classes + labels
    prefix = torch.nonzero(
        scores >= nth_best_per_image(scores, image_idx, num_images, candidates_per_image)[image_idx]
    )[:, 0]
    kept = prefix[grouped_nms(boxes[prefix], scores[prefix], groups[prefix], nms_thresh)]
    short = torch.bincount(image_idx[kept], minlength=num_images) < max_detections
    short &= torch.bincount(image_idx, minlength=num_images) > torch.bincount(image_idx[prefix], minlength=num_images)
    if bool(short.any()):  # images whose prefix kept too few: NMS on all their candidates
        kept = kept[~short[image_idx[kept]]]
        rest = torch.nonzero(short[image_idx])[:, 0]
        kept = torch.cat((kept, rest[grouped_nms(boxes[rest], scores[rest], groups[rest], nms_thresh)]))
    # grouped_nms's order, for equal scores: by group, then by index
    kept = kept.sort().values
    kept = kept[torch.argsort(groups[kept], stable=True)]
    return best_per_image(kept, boxes, scores, labels, image_idx, num_images, max_detections)


def nth_best_per_image(scores: Tensor, image_idx: Tensor, num_images: int, n: int) -> Tensor:
    """(num_images,): the ``n``-th highest score of each image, −inf for an image with fewer candidates."""
    nth = torch.full((num_images,), -math.inf, device=scores.device, dtype=scores.dtype)
    counts = torch.bincount(image_idx, minlength=num_images)
    if not len(scores) or int(counts.max()) < n:
        return nth
    if not bool((image_idx[1:] >= image_idx[:-1]).all()):  # postprocesses give candidates image by image
        order = torch.argsort(image_idx, stable=True)
        scores, image_idx = scores[order], image_idx[order]
    # one row per image, padded: a top-k per row finds the n-th values without sorting all candidates
    padded = pad_per_image(scores, counts, -math.inf)
    full = counts >= n
    nth[full] = padded[full].topk(n, dim=1).values[:, -1]
    return nth


def clip_to_images(boxes: Tensor, image_idx: Tensor, image_sizes: Tensor) -> Tensor:
    hw = image_sizes.to(boxes)[image_idx]
    limits = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1)  # w h w h of each box's image
    return torch.minimum(boxes.clamp(min=0), limits)


def best_per_image(
    kept: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor, image_idx: Tensor, num_images: int, max_detections: int
) -> list[dict[str, Tensor]]:
    """The ``max_detections`` best of the NMS survivors ``kept`` of each image, by decreasing score."""
    kept = kept[torch.argsort(scores[kept], descending=True, stable=True)]
    kept = kept[torch.argsort(image_idx[kept], stable=True)]  # by image, by decreasing score within
    counts = torch.bincount(image_idx[kept], minlength=num_images)
    rank = torch.arange(len(kept), device=kept.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    kept = kept[rank < max_detections]  # already ranked: the first max_detections of each image's run
    per_image = counts.clamp(max=max_detections).tolist()
    return [
        {"boxes": bx, "scores": sc, "labels": lb}
        for bx, sc, lb in zip(
            boxes[kept].split(per_image), scores[kept].split(per_image), labels[kept].split(per_image)
        )
    ]


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float, chunk_size: int = 128) -> Tensor:
    """Indices of the boxes NMS keeps when each value of ``groups`` (e.g. image × class) is its own problem.

    Same result as ``torchvision.ops.batched_nms``, faster when there are many small groups: whole groups
    are packed into chunks of about ``chunk_size`` boxes, kept apart inside a chunk by offsetting their
    coordinates, one ``nms`` call per chunk. NMS is quadratic in the boxes of a call, so small chunks do
    little wasted work, while there are far fewer calls than groups (bench: SSD300 and RetinaNet fixtures).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(groups, stable=True)
    _, group_sizes = torch.unique_consecutive(groups[order], return_counts=True)
    group_chunk = (torch.cumsum(group_sizes, 0) - group_sizes) // chunk_size  # a group joins the chunk it starts in
    _, group_chunk, chunk_groups = torch.unique_consecutive(group_chunk, return_inverse=True, return_counts=True)
    first_group = torch.cumsum(chunk_groups, 0) - chunk_groups
    slot = torch.arange(len(group_sizes), device=boxes.device) - first_group.repeat_interleave(chunk_groups)
    offsets = (slot.repeat_interleave(group_sizes).to(boxes) * (boxes.max() + 1))[:, None]
    shifted, ordered_scores = boxes[order] + offsets, scores[order]
    chunk_boxes = torch.zeros(len(chunk_groups), dtype=torch.long, device=boxes.device).index_add_(
        0, group_chunk, group_sizes
    )
    kept = [
        torch.ops.torchvision.nms(b, sc, iou_thresh)  # views of the sorted arrays: no copies per chunk
        for b, sc in zip(shifted.split(chunk_boxes.tolist()), ordered_scores.split(chunk_boxes.tolist()))
    ]
    chunk_start = torch.cumsum(chunk_boxes, 0) - chunk_boxes
    counts = torch.tensor([len(k) for k in kept], device=boxes.device)
    return order[torch.cat(kept) + chunk_start.repeat_interleave(counts)]
