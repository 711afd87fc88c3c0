"""What every assigner shares: the ignore label, crowd regions, gathering matched boxes. The assigners
themselves (which ground truth each prior must predict, under ``no_grad``) live with their papers:
``retinanet.MaxIoUAssigner``, ``ssd.BestMatchIoUAssigner``, ``yolo.ResponsiblePredictorAssigner``."""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import DetectionBatch

IGNORE = -1  # label of priors that get no loss at all
CROWD_IOA = 0.7  # Detectron's TRAIN.CROWD_FILTER_THRESH: anchors this much inside a crowd region get no label


def positives(labels: Tensor, num_classes: int) -> Tensor:
    """The priors labelled with a class: neither background (``num_classes``) nor ``IGNORE``."""
    return (labels >= 0) & (labels < num_classes)


def crowd_overlap(priors: Tensor, targets: DetectionBatch, max_crowd: int) -> Tensor:
    """(B, N): the largest fraction of each prior's area that lies inside one of its image's crowd boxes, of which
    no image holds more than ``max_crowd``."""
    b, m = len(targets), max_crowd
    # the crowd boxes of each image, packed to (B, m) by a scatter (the other objects go to a spare slot m,
    # dropped); padding slots are empty boxes
    slot = torch.where(targets.crowd, torch.cumsum(targets.crowd.long(), 1) - 1, m)
    crowd = targets.boxes.new_zeros(b, m + 1, 4).scatter_(1, slot[..., None].expand(-1, -1, 4), targets.boxes)
    crowd = crowd[:, :m]
    wh = (
        torch.minimum(crowd[:, :, None, 2:], priors[None, None, :, 2:])
        - torch.maximum(crowd[:, :, None, :2], priors[None, None, :, :2])
    ).clamp(min=0)  # (B, m, N, 2)
    area = ((priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])).clamp(min=1e-6)
    return (wh[..., 0] * wh[..., 1] / area).amax(dim=1)


def ignore_crowd_regions(
    labels: Tensor, priors: Tensor, targets: DetectionBatch, num_classes: int, crowd_ioa: float | None
) -> Tensor:
    """Background priors mostly inside a crowd region (COCO ``iscrowd``) become ``IGNORE``: the region holds
    objects nobody boxed, so it must not be taught as background. Positives keep their label."""
    max_crowd = targets.crowd_bound() if crowd_ioa is not None else 0
    if max_crowd == 0:
        return labels
    inside = crowd_overlap(priors, targets, max_crowd) > crowd_ioa
    return labels.masked_fill(inside & (labels == num_classes), IGNORE)


def matched_boxes(boxes: Tensor, best_gt: Tensor) -> Tensor:
    """(B, N, 4): each prior's matched box, ``boxes`` (B, M, 4) at ``best_gt`` (B, N). Rows of the flattened
    (B·M, 4) boxes: an index_select, much cheaper than a gather on an expanded index."""
    m = boxes.shape[1]
    flat = best_gt + torch.arange(0, best_gt.shape[0] * m, m, device=best_gt.device)[:, None]
    return boxes.reshape(-1, 4).index_select(0, flat.reshape(-1)).reshape(*best_gt.shape, 4)
