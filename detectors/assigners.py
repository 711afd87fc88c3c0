"""Target assignment: which ground truth (if any) each prior must predict. Runs under ``no_grad``."""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import DetectionBatch
from .boxes import batched_box_iou
from .priors import Priors

IGNORE = -1  # label of priors that get no loss at all
CROWD_IOA = 0.7  # Detectron's TRAIN.CROWD_FILTER_THRESH: anchors this much inside a crowd region get no label


def crowd_overlap(priors: Tensor, targets: DetectionBatch) -> Tensor:
    """(B, N): the largest fraction of each prior's area that lies inside one of its image's crowd boxes."""
    b = len(targets)
    counts = targets.crowd.sum(1)
    m = int(counts.max())
    # the crowd boxes of each image, packed to (B, m); padding slots are empty boxes
    slot = torch.cumsum(targets.crowd.long(), 1) - 1
    crowd = targets.boxes.new_zeros(b, m, 4)
    img, obj = torch.nonzero(targets.crowd, as_tuple=True)
    crowd[img, slot[img, obj]] = targets.boxes[img, obj]
    wh = (torch.minimum(crowd[:, :, None, 2:], priors[None, None, :, 2:])
          - torch.maximum(crowd[:, :, None, :2], priors[None, None, :, :2])).clamp(min=0)  # (B, m, N, 2)
    area = ((priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])).clamp(min=1e-6)
    return (wh[..., 0] * wh[..., 1] / area).amax(dim=1)


def ignore_crowd_regions(labels: Tensor, priors: Tensor, targets: DetectionBatch, num_classes: int,
                         crowd_ioa: float | None) -> Tensor:
    """Background priors mostly inside a crowd region (COCO ``iscrowd``) become ``IGNORE``: the region holds
    objects nobody boxed, so it must not be taught as background. Positives keep their label."""
    if crowd_ioa is None or not bool(targets.crowd.any()):
        return labels
    inside = crowd_overlap(priors, targets) > crowd_ioa
    return labels.masked_fill(inside & (labels == num_classes), IGNORE)


def matched_boxes(boxes: Tensor, best_gt: Tensor) -> Tensor:
    """(B, N, 4): each prior's matched box, ``boxes`` (B, M, 4) at ``best_gt`` (B, N). Rows of the flattened
    (B·M, 4) boxes: an index_select, much cheaper than a gather on an expanded index."""
    m = boxes.shape[1]
    flat = best_gt + torch.arange(0, best_gt.shape[0] * m, m, device=best_gt.device)[:, None]
    return boxes.reshape(-1, 4).index_select(0, flat.reshape(-1)).reshape(*best_gt.shape, 4)


class MaxIoUAssigner:
    """Max-IoU matching over the whole batch at once (RetinaNet §4, SSD §2.2).

    A prior is positive when its best IoU with a ground truth is ≥ ``pos_iou``, background when < ``neg_iou``
    and ignored in between. With ``low_quality_matches`` every ground truth also claims the prior(s) it
    overlaps most, so no object is left without a positive (the prior keeps its own best ground truth, as in
    torchvision/detectron2). Crowd boxes never make positives, and background priors more than ``crowd_ioa``
    inside one are ignored (None: they stay background).

    Returns ``labels`` (B, N): class for positives, ``num_classes`` for background, ``IGNORE`` (−1) for
    ignored; and ``boxes`` (B, N, 4): the matched ground-truth box of every prior (meaningful for positives).
    """

    def __init__(self, pos_iou: float = 0.5, neg_iou: float = 0.4, low_quality_matches: bool = True,
                 crowd_ioa: float | None = CROWD_IOA, cpu_block: int | None = 4096) -> None:
        if neg_iou > pos_iou:
            raise ValueError(f"assigner.neg_iou={neg_iou} must not exceed assigner.pos_iou={pos_iou}")
        self.pos_iou, self.neg_iou, self.low_quality_matches = pos_iou, neg_iou, low_quality_matches
        self.crowd_ioa = crowd_ioa
        # on CPU the (B, M, N) IoU is computed in blocks of this many priors, which stay in cache (RetinaNet at
        # 800 px, batch 8: 66 → ~20 ms); None, or a GPU: one block
        self.cpu_block = cpu_block

    @torch.no_grad()
    def __call__(self, priors: Priors, targets: DetectionBatch, num_classes: int,
                 outputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        gt_ok = targets.valid & ~targets.crowd  # (B, M)
        n = priors.boxes.shape[0]
        block = n if self.cpu_block is None or priors.boxes.device.type != "cpu" else self.cpu_block
        starts = range(0, n, block)

        # padding and crowd never win a match (on the CPU the check is free: skip the fill when there are none)
        excluded = ~gt_ok[..., None] if block == n or not bool(gt_ok.all()) else None

        def iou_block(start: int) -> Tensor:  # (B, M, block)
            iou = batched_box_iou(targets.boxes, priors.boxes[start:start + block])
            return iou if excluded is None else iou.masked_fill_(excluded, -1.0)

        best_iou = targets.boxes.new_empty(len(targets), n)
        best_gt = torch.empty(len(targets), n, dtype=torch.long, device=best_iou.device)
        block_best = targets.boxes.new_empty(len(starts), *gt_ok.shape)  # each object's best IoU in each block
        for j, start in enumerate(starts):
            iou = iou_block(start)
            torch.max(iou, dim=1, out=(best_iou[:, start:start + block], best_gt[:, start:start + block]))
            torch.amax(iou, dim=2, out=block_best[j])
        best_per_gt = block_best.amax(dim=0)  # (B, M): each object's best IoU over all priors

        gt_labels = torch.gather(targets.labels, 1, best_gt)
        labels = torch.where(best_iou >= self.pos_iou, gt_labels, IGNORE)
        labels = torch.where(best_iou < self.neg_iou, num_classes, labels)
        if self.low_quality_matches:
            # every prior that ties an object's best IoU; objects that claim nothing (padding, crowd, no overlap)
            # get an IoU no prior reaches
            claim = best_per_gt.masked_fill(~((best_per_gt > 0) & gt_ok), 2.0)
            if len(starts) == 1:  # the whole IoU is at hand
                low_quality = (iou == claim[..., None]).any(dim=1)
            else:  # recompute, in each block, only the objects whose best IoU lies there (same floats)
                low_quality = torch.zeros_like(best_iou, dtype=torch.bool)
                for j, start in enumerate(starts):
                    img, obj = torch.nonzero(block_best[j] == claim, as_tuple=True)
                    if len(img):
                        ties = batched_box_iou(targets.boxes[img, obj][None], priors.boxes[start:start + block])[0]
                        ties = ties == claim[img, obj][:, None]  # (objects, block)
                        hits = torch.zeros(len(targets), ties.shape[1], dtype=torch.int32, device=img.device)
                        low_quality[:, start:start + block] = hits.index_add_(0, img, ties.int()) > 0
            labels = torch.where(low_quality, gt_labels, labels)
        labels = ignore_crowd_regions(labels, priors.boxes, targets, num_classes, self.crowd_ioa)
        if priors.ignored is not None:
            labels = labels.masked_fill(priors.ignored[None, :], IGNORE)
        return {"labels": labels, "boxes": matched_boxes(targets.boxes, best_gt)}


class BestMatchIoUAssigner:
    """SSD's matching (§2.2 "Matching strategy"): each ground truth first takes the prior it overlaps most
    (as in MultiBox), then every prior whose best IoU with any ground truth is > ``pos_iou`` (0.5) is a
    positive of that ground truth; all others are background. No ignored band.

    When two objects claim the same best prior, the one overlapping it more keeps it (the other still gets
    every prior above the threshold). A claim needs IoU > 0. Crowd boxes never make positives, and background
    priors more than ``crowd_ioa`` inside one are ignored (no hard negatives there); priors marked ``ignored``
    (boundary boxes, when dropped) get ``IGNORE``. Same outputs as ``MaxIoUAssigner``.
    """

    def __init__(self, pos_iou: float = 0.5, crowd_ioa: float | None = CROWD_IOA) -> None:
        self.pos_iou, self.crowd_ioa = pos_iou, crowd_ioa

    @torch.no_grad()
    def __call__(self, priors: Priors, targets: DetectionBatch, num_classes: int,
                 outputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        gt_ok = targets.valid & ~targets.crowd  # (B, M)
        iou = batched_box_iou(targets.boxes, priors.boxes)  # (B, M, N)
        if priors.ignored is not None:
            iou.masked_fill_(priors.ignored[None, None, :], -1.0)  # ignored priors are nobody's best match
        iou.masked_fill_(~gt_ok[..., None], -1.0)
        best_iou, best_gt = iou.max(dim=1)  # (B, N)

        # each object's best prior; among several claimants of one prior the higher IoU (then the lower index)
        # wins. Claims are B·M points, so they are resolved by scatters on (B, N), not a (B, M, N) mask
        best_prior = iou.argmax(dim=2)  # (B, M)
        claim = torch.gather(iou, 2, best_prior[..., None])[..., 0]  # (B, M)
        claim = claim.masked_fill(~((claim > 0) & gt_ok), -1.0)
        claim_iou = torch.full_like(best_iou, -1.0).scatter_reduce_(1, best_prior, claim, "amax")
        wins = (claim > 0) & (claim == torch.gather(claim_iou, 1, best_prior))
        gt_index = torch.arange(iou.shape[1], device=iou.device).expand_as(best_prior)
        claim_gt = torch.full_like(best_gt, iou.shape[1]).scatter_reduce_(
            1, best_prior, gt_index.masked_fill(~wins, iou.shape[1]), "amin")
        claimed = claim_iou > 0
        best_gt = torch.where(claimed, claim_gt, best_gt)

        positive = claimed | (best_iou > self.pos_iou)
        labels = torch.where(positive, torch.gather(targets.labels, 1, best_gt), num_classes)
        labels = ignore_crowd_regions(labels, priors.boxes, targets, num_classes, self.crowd_ioa)
        if priors.ignored is not None:
            labels = labels.masked_fill(priors.ignored[None, :], IGNORE)
        return {"labels": labels, "boxes": matched_boxes(targets.boxes, best_gt)}
