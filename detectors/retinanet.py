"""RetinaNet's own parts (Lin et al., Focal Loss for Dense Object Detection, 2017): anchors and head.

The assigner (``MaxIoUAssigner``), the loss (``RetinaNetLoss``) and the postprocess (``DensePostprocess``)
are generic and live in their own files; ``conf/model/retinanet.yaml`` composes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .priors import PriorGenerator, Priors, flatten_predictions


class AnchorGenerator(PriorGenerator):
    """Anchors on P3..P7: per level one base size × ``scales`` × ``aspect_ratios`` (h/w), at every cell.

    Paper §4: areas 32²..512² on P3..P7, scales {2^0, 2^(1/3), 2^(2/3)}, ratios {1:2, 1:1, 2:1} → A=9.
    ``size_factor`` shrinks every size for small inputs. ``integer_sizes`` truncates sizes and rounds the
    base boxes to integers, as torchvision's ``AnchorGenerator`` does (for weight-for-weight equality).
    Order within a cell: ratio-major, then scale (torchvision's order). Cached per (image, feature) sizes.
    """

    def __init__(self, sizes: Sequence[float] = (32, 64, 128, 256, 512), scales_per_octave: int = 3,
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), size_factor: float = 1.0,
                 integer_sizes: bool = False, offset: float = 0.0) -> None:
        super().__init__()
        self.sizes = [float(s) * size_factor for s in sizes]
        self.scales = [2.0 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.integer_sizes = integer_sizes
        self.offset = offset

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def base_anchors(self, size: float) -> Tensor:
        """(A, 4) boxes centred on 0 for one level."""
        sizes = torch.tensor([size * s for s in self.scales], dtype=torch.float64)
        if self.integer_sizes:
            sizes = sizes.trunc()
        h_ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64).sqrt()
        ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
        base = torch.stack((-ws, -hs, ws, hs), dim=1) / 2
        return base.round() if self.integer_sizes else base

    def _generate(self, image_size, feature_sizes, device) -> Priors:
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature levels but {len(self.sizes)} anchor sizes")
        per_level = []
        for size, (fh, fw) in zip(self.sizes, feature_sizes):
            stride_y, stride_x = image_size[0] // fh, image_size[1] // fw
            ys = (torch.arange(fh, dtype=torch.float64) + self.offset) * stride_y
            xs = (torch.arange(fw, dtype=torch.float64) + self.offset) * stride_x
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
            per_level.append((shifts + self.base_anchors(size)[None]).reshape(-1, 4))
        boxes = torch.cat(per_level).to(device=device, dtype=torch.float32)
        return Priors(boxes, [len(p) for p in per_level])


class RetinaNetHead(nn.Module):
    """Classification and box subnets (paper §4), shared across pyramid levels, not with each other.

    Each subnet: ``num_convs`` × (3×3 conv, C filters, ReLU) then a 3×3 conv to K·A (cls) or 4·A (box).
    Init: N(0, σ=0.01), bias 0; the final cls bias is −log((1−π)/π) so every anchor starts at
    foreground probability π, which keeps the loss of the ~100k easy negatives from swamping the start.
    ``norm="gn"`` puts GroupNorm(32) after each subnet conv (detectron2's ``norm`` option, torchvision's
    RetinaNet v2): not in the paper, but it trains much faster from scratch.
    Returns logits (B, N, K) and box deltas (B, N, 4), anchors ordered (level, y, x, a) as the priors.
    """

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int | Sequence[int],
                 num_convs: int = 4, prior_probability: float = 0.01, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"head.norm={norm!r}: choose 'none' (paper) or 'gn' (GroupNorm)")
        if not isinstance(num_anchors, int):
            if len(set(num_anchors)) != 1:
                raise ValueError(f"RetinaNet's head is shared across levels: needs one anchor count, "
                                 f"got {list(num_anchors)}")
            num_anchors = int(num_anchors[0])
        self.num_classes, self.num_anchors = num_classes, num_anchors

        def subnet() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1))
                if norm == "gn":
                    layers.append(nn.GroupNorm(min(32, in_channels), in_channels))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.cls_subnet, self.box_subnet = subnet(), subnet()
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        cls = [flatten_predictions(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features]
        box = [flatten_predictions(self.box_pred(self.box_subnet(f)), 4) for f in features]
        return {"cls_logits": torch.cat(cls, dim=1), "box_deltas": torch.cat(box, dim=1)}


def _torchvision_head_key(key: str) -> str:
    """torchvision's ``RetinaNetHead`` key → ours: ``classification_head.conv.{i}.0.weight`` (its
    Conv2dNormActivation) is our ``cls_subnet.{2i}.weight`` (conv, ReLU pairs)."""
    for tv, ours in (("classification_head.conv.", "cls_subnet."), ("regression_head.conv.", "box_subnet.")):
        if key.startswith(tv):
            i, _, param = key[len(tv):].split(".")
            return f"{ours}{2 * int(i)}.{param}"
    return key.replace("classification_head.cls_logits.", "cls_score.").replace("regression_head.bbox_reg.", "box_pred.")


def torchvision_retinanet_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a ``torchvision.models.detection.retinanet_resnet50_fpn`` state dict onto our ``Detector``.

    Fine-tune from torchvision's COCO weights with::

        tv = torchvision.models.detection.retinanet_resnet50_fpn(weights="COCO_V1")
        detector.load_state_dict(torchvision_retinanet_state_dict(tv.state_dict()), strict=False)

    Our model must be configured as torchvision's to give its detections: ``backbone.p6_source=p5``,
    ``backbone.norm=frozen_bn``, ``priors.integer_sizes=true`` (``conf/model/retinanet_torchvision.yaml``).
    """
    out = {}
    for key, value in tv_state.items():
        if key.startswith("backbone."):
            out[key] = value
        elif key.startswith("head."):
            out["head." + _torchvision_head_key(key[len("head."):])] = value
    return out
