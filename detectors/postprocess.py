"""Inference for dense detectors: raw outputs → per-image detections, batched over images."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .boxes import BoxCoder
from .priors import Priors


class DensePostprocess:
    """Sigmoid scores > ``score_thresh``, top ``topk_per_level`` (prior, class) pairs per level, decode,
    clip, class-wise NMS at ``nms_thresh``, keep the ``max_detections`` best per image
    (RetinaNet §4 "Inference": 0.05, 1k, 0.5, and 100 detections as in Detectron).

    One top-k per level for the whole batch and a single NMS call over all images (each (image, class)
    pair is its own NMS group), so there is no per-image Python loop until the final split.
    """

    def __init__(self, score_thresh: float = 0.05, topk_per_level: int = 1000, nms_thresh: float = 0.5,
                 max_detections: int = 100, box_coder: BoxCoder | None = None) -> None:
        self.score_thresh, self.topk_per_level = score_thresh, topk_per_level
        self.nms_thresh, self.max_detections = nms_thresh, max_detections
        self.box_coder = box_coder or BoxCoder()

    @torch.no_grad()
    def __call__(self, outputs: dict[str, Tensor], priors: Priors, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, deltas = outputs["cls_logits"], outputs["box_deltas"]
        b, _, num_classes = logits.shape
        boxes, scores, labels = [], [], []
        for level_logits, level_deltas, level_priors in zip(
                logits.split(priors.level_sizes, 1), deltas.split(priors.level_sizes, 1),
                priors.boxes.split(priors.level_sizes, 0)):
            flat = level_logits.reshape(b, -1)
            # top-k on logits (sigmoid is monotone), then sigmoid on the k survivors only
            top_logits, top_idx = flat.topk(min(self.topk_per_level, flat.shape[1]), dim=1)
            anchor_idx = top_idx // num_classes
            d = torch.gather(level_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(d.float(), level_priors[anchor_idx]))
            scores.append(torch.sigmoid(top_logits.float()))
            labels.append(top_idx % num_classes)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)
        return select_detections(boxes, scores, labels, image_sizes, self.score_thresh, self.nms_thresh,
                                 self.max_detections)


def select_detections(boxes: Tensor, scores: Tensor, labels: Tensor, image_sizes: Tensor, score_thresh: float,
                      nms_thresh: float, max_detections: int) -> list[dict[str, Tensor]]:
    """Threshold, clip, class-wise NMS per image and cap, for candidates (B, C, 4), (B, C), (B, C)."""
    b, c = scores.shape
    hw = image_sizes.to(boxes)
    limits = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1)[:, None, :]  # (B, 1, 4): w h w h
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    image_idx = torch.arange(b, device=scores.device)[:, None].expand(b, c)
    keep = scores > score_thresh
    boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
    num_classes = int(labels.max()) + 1 if labels.numel() else 1
    kept = batched_nms(boxes, scores, image_idx * num_classes + labels, nms_thresh)  # by decreasing score
    # the max_detections best per image: stable-sort kept by image, rank within each image's run
    kept = kept[torch.sort(image_idx[kept], stable=True).indices]
    counts = torch.bincount(image_idx[kept], minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=kept.device) - starts.repeat_interleave(counts)
    kept = kept[rank < max_detections]
    per_image = torch.bincount(image_idx[kept], minlength=b).tolist()
    return [{"boxes": bx, "scores": sc, "labels": lb} for bx, sc, lb in
            zip(boxes[kept].split(per_image), scores[kept].split(per_image), labels[kept].split(per_image))]
