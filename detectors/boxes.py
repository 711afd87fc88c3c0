"""Box arithmetic on batched tensors: pairwise IoU and the (dx, dy, dw, dh) box coding.

Boxes are absolute-pixel ``xyxy`` in the network-input frame (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torchvision's clamp on dw/dh before exp: a 1000/16 size ratio is the largest any sane prediction needs.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding boxes, broadcast: (..., 4) × (..., 4) → (...): intersection ÷ union, as written.
    ``aligned_box_iou(a[..., :, None, :], b[..., None, :, :])`` is every pair's, what ``batched_box_iou`` computes
    faster."""
    wh = (torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])).clamp(
        min=0
    )
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).eps)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU between every pair, broadcast over leading dims: (..., M, 4) × (..., N, 4) → (..., M, N).

    ``torchvision.ops.box_iou`` takes 2-D inputs only; this is the same formula over a batch so an
    assigner can match all images at once. The fast twin of ``aligned_box_iou`` over all pairs (equal in float64,
    tests/detectors/test_boxes.py): coordinates unbound once, the (..., M, N) temporaries reused in place.
    """
    # at least float32: under autocast, bf16 would round a 300 px box's area to steps of 512 px²
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    area1, area2 = box_area(boxes1)[..., :, None], box_area(boxes2)[..., None, :]
    # contiguous coordinates, so the (…, M, N) passes broadcast without strides; in place, as the
    # (…, M, N) temporaries cost more than the arithmetic
    x0a, y0a, x1a, y1a = (c[..., :, None] for c in boxes1.unbind(-1))
    x0b, y0b, x1b, y1b = (c.contiguous()[..., None, :] for c in boxes2.unbind(-1))
    inter = torch.minimum(x1a, x1b)
    scratch = torch.maximum(x0a, x0b)
    inter.sub_(scratch).clamp_(min=0)
    height = torch.minimum(y1a, y1b)
    height.sub_(torch.maximum(y0a, y0b, out=scratch)).clamp_(min=0)
    inter.mul_(height)
    union = torch.add(area1, area2, out=scratch).sub_(inter)
    return inter.div_(union.clamp_(min=torch.finfo(inter.dtype).eps))


class BoxCoder:
    """Encodes boxes relative to priors as (dx, dy, dw, dh) / weights, and decodes them back.

    The R-CNN parameterisation used by RetinaNet (weights 1,1,1,1) and SSD (variances 0.1, 0.1, 0.2, 0.2,
    i.e. weights 10, 10, 5, 5). Works on any leading shape; priors broadcast against boxes.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: Tensor, priors: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = self._centre_size(priors.to(boxes.dtype))
        gx, gy, gw, gh = self._centre_size(boxes)
        return torch.stack(
            (wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)), dim=-1
        )

    def decode(self, deltas: Tensor, priors: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        priors = priors.to(deltas.dtype)
        px, py, pw, ph = self._centre_size(priors)
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        # the clamp keeps exp() finite for wild predictions early in training (as torchvision does)
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * pw + px, dy * ph + py
        w, h = torch.exp(dw) * pw, torch.exp(dh) * ph
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
