"""SSD's own parts (Liu et al., SSD: Single Shot MultiBox Detector, 2016): the atrous VGG16 base with its
extra layers, the default boxes, the 3×3 predictors, the matching rule, the MultiBox loss with hard
negative mining, and the per-class inference. ``conf/model/ssd.yaml`` / ``ssd512.yaml`` compose them.

Class index 0 of SSD's softmax is background (as in the paper and torchvision); object labels 0..K−1 of
the rest of the code are logits 1..K here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from .assigners import CROWD_IOA, IGNORE, ignore_crowd_regions, matched_boxes, positives
from .batch import DetectionBatch
from .boxes import BoxCoder, batched_box_iou
from .device_paths import takes_gpu_path
from .postprocess import capped_nms_per_image, nms_per_image, topk_per_group
from .priors import PriorGenerator, Priors, flatten_predictions
from .protocols import HeadOutputs

# Source layers in the order the paper lists them (Fig. 2); SSD512 adds conv12_2.
SSD300_LAYERS = ("conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2")
SSD512_LAYERS = SSD300_LAYERS + ("conv12_2",)
# The paper's Table 3 keeps the first n layers, except that its one-layer row predicts from conv7 alone.
_ONE_LAYER = "conv7"
# VGG16 ("D") conv widths up to conv5_3; "M" is a 2×2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def source_layers(num_layers: int, all_layers: Sequence[str]) -> tuple[str, ...]:
    """The layers SSD predicts from when only ``num_layers`` of them are used (paper Table 3)."""
    if not 1 <= num_layers <= len(all_layers):
        raise ValueError(
            f"model.num_prediction_layers={num_layers}: must be in 1..{len(all_layers)} ({', '.join(all_layers)})"
        )
    return (_ONE_LAYER,) if num_layers == 1 else tuple(all_layers[:num_layers])


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet; SSD §3.1: conv4_3 has a
    different feature scale from the later layers, initialised to 20)."""

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


def _conv(cin: int, cout: int, norm: bool = False, **kw) -> list[nn.Module]:
    """conv → ReLU, or conv → BatchNorm → ReLU (as torchvision's vgg16_bn)."""
    return [nn.Conv2d(cin, cout, **kw), *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU(inplace=True)]


class VGG16Atrous(nn.Module):
    """SSD's base network (§3, Fig. 2): VGG16 through conv5_3 with pool3 in ceil mode, pool5 as 3×3 stride 1,
    fc6/fc7 as convolutions (conv6: 3×3 with dilation 6 and 1024 filters; conv7: 1×1), L2Norm on conv4_3,
    then the extra layers conv8_2 … conv11_2 (SSD300: maps 38, 19, 10, 5, 3, 1) or … conv12_2 (SSD512:
    64, 32, 16, 8, 4, 2, 1).

    Module layout follows torchvision's ``SSDFeatureExtractorVGG`` (``features`` = VGG16 up to conv4_3,
    ``extra.0`` = pool4 … conv7, ``extra.1…`` the extra layers), so its SSD300 state dict loads directly.
    ``width`` scales every channel count and ``norm='bn'`` puts BatchNorm after every convolution (both for
    CPU-sized training from scratch; the paper is 1.0 and none). Only the layers up to the last source
    layer are built, so fewer prediction layers also cost less.
    """

    def __init__(
        self,
        variant: str = "ssd300",
        num_prediction_layers: int | None = None,
        width: float = 1.0,
        weights: str | None = None,
        l2norm_scale: float = 20.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if variant not in ("ssd300", "ssd512"):
            raise ValueError(f"backbone.variant={variant!r}: choose 'ssd300' or 'ssd512'")
        all_layers = SSD300_LAYERS if variant == "ssd300" else SSD512_LAYERS
        self.layers = source_layers(num_prediction_layers or len(all_layers), all_layers)
        if norm not in ("none", "bn"):
            raise ValueError(f"backbone.norm={norm!r}: choose 'none' (paper) or 'bn' (BatchNorm after each conv)")
        if weights and (width != 1.0 or norm != "none"):
            raise ValueError(
                f"backbone.weights={weights!r} needs backbone.width=1.0 and backbone.norm=none "
                f"(got {width}, {norm}): pretrained VGG16 weights have the paper's layers"
            )
        bn = norm == "bn"
        c = lambda n: max(8, int(round(n * width)))  # noqa: E731

        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if v == "M":
                # pool3 rounds up so that 300 px gives a 38×38 conv4_3 (the paper's Caffe model)
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=sum(isinstance(m, nn.MaxPool2d) for m in layers) == 2))
            else:
                layers += _conv(cin, c(v), bn, kernel_size=3, padding=1)
                cin = c(v)
        # features end with conv4_3's ReLU, before pool4 (index 23 without BatchNorm, as torchvision's vgg16)
        cut = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)][3]
        self.features = nn.Sequential(*layers[:cut])
        self.l2norm = L2Norm(c(512), l2norm_scale)
        fc = nn.Sequential(
            nn.MaxPool2d(3, 1, padding=1),  # pool5: 3×3 stride 1 keeps the 19×19 map
            *_conv(c(512), c(1024), bn, kernel_size=3, padding=6, dilation=6),  # conv6 (atrous fc6)
            *_conv(c(1024), c(1024), bn, kernel_size=1),
        )  # conv7 (fc7)
        extra = [nn.Sequential(*layers[cut:], fc)]
        # conv8_2 … : (1×1 channels, 3×3 channels, stride, padding) per the paper's Fig. 2 / released model
        specs = [(256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)]
        if variant == "ssd512":
            specs = [(256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 2, 1), (128, 256, 2, 1), (128, 256, 1, 1)]
        cin = c(1024)
        for i, (mid, out, stride, pad) in enumerate(specs):
            k = 4 if variant == "ssd512" and i == len(specs) - 1 else 3  # conv12_2 is 4×4 (1×1 map at 512 px)
            extra.append(
                nn.Sequential(
                    *_conv(cin, c(mid), bn, kernel_size=1),
                    *_conv(c(mid), c(out), bn, kernel_size=k, stride=stride, padding=pad),
                )
            )
            cin = c(out)
        last = all_layers.index(self.layers[-1])  # build nothing beyond the last source layer
        self.extra = nn.ModuleList(extra[:last])
        self._all_layers = all_layers
        channels = [c(512), c(1024)] + [c(out) for _, out, _, _ in specs]
        self.out_channels = [channels[all_layers.index(name)] for name in self.layers]
        self._init(weights)

    def _init(self, weights: str | None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as the released model and torchvision: xavier, zero bias
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if weights:
            load_vgg16_weights(self, weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.features(images)
        maps = {"conv4_3": self.l2norm(x)}
        for name, block in zip(self._all_layers[1:], self.extra):
            x = block(x)
            maps[name] = x
        return [maps[name] for name in self.layers]


def load_vgg16_weights(backbone: VGG16Atrous, weights: str) -> None:
    """ImageNet VGG16 into conv1_1 … conv5_3, and fc6/fc7 subsampled into conv6/conv7 as the paper does
    ("we convert fc6 and fc7 to convolutional layers, subsample parameters from fc6 and fc7", §3):
    every 4th filter, and fc6's 7×7 taps at stride 3 (hence the dilation 6 after pool5's change)."""
    if Path(str(weights)).suffix in {".pth", ".pt", ".bin"} or Path(str(weights)).exists():
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"backbone.weights={weights}: no such file; give a torchvision vgg16 "
                f"state-dict file, a weights name such as IMAGENET1K_V1, or null"
            )
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        available = [w.name for w in models.VGG16_Weights]
        if weights not in available:
            raise ValueError(f"backbone.weights={weights!r}: choose one of {available}, a local file, or null")
        state = models.vgg16(weights=models.VGG16_Weights[weights]).state_dict()
    mapped = {}
    for key, value in state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            param = key.split(".")[2]
            mapped[f"features.{index}.{param}" if index < 23 else f"extra.0.{index - 23}.{param}"] = value
    if "classifier.0.weight" in state:  # IMAGENET1K_V1 carries fc6/fc7; IMAGENET1K_FEATURES does not
        mapped["extra.0.7.1.weight"] = state["classifier.0.weight"].view(4096, 512, 7, 7)[::4, :, ::3, ::3]
        mapped["extra.0.7.1.bias"] = state["classifier.0.bias"][::4]
        mapped["extra.0.7.3.weight"] = state["classifier.3.weight"][::4, ::4, None, None]
        mapped["extra.0.7.3.bias"] = state["classifier.3.bias"][::4]
    own = backbone.state_dict()
    unknown = [k for k in mapped if k not in own]
    if unknown or not any(k.startswith("features.") for k in mapped):
        raise ValueError(f"backbone.weights={weights}: not a VGG16 state dict (unexpected keys {unknown[:5]})")
    backbone.load_state_dict(mapped, strict=False)


def default_box_scales(
    num_layers: int, s_min: float = 0.2, s_max: float = 0.9, first_scale: float | None = None
) -> list[float]:
    """Paper eq. (4): s_k = s_min + (s_max − s_min)(k − 1)/(m − 1), k = 1..m, plus s_{m+1} (one step further)
    for the last layer's extra square box √(s_m·s_{m+1}). With ``first_scale`` the first layer (conv4_3) takes
    it and the formula spans the other m − 1 layers: the paper's SSD300 ("We set default box with scale 0.1 on
    conv4_3", §3.1), so s = 0.1, 0.2, 0.375, 0.55, 0.725, 0.9 (and 1.075 for the last extra square)."""
    m = num_layers if first_scale is None else num_layers - 1
    if m < 1:
        raise ValueError(f"default boxes need at least {1 if first_scale is None else 2} layers")
    step = (s_max - s_min) / (m - 1) if m > 1 else s_max - s_min
    scales = [s_min + step * k for k in range(m + 1)]
    return scales if first_scale is None else [float(first_scale)] + scales


class DefaultBoxGenerator(PriorGenerator):
    """SSD's default boxes (§2.2 "Choosing scales and aspect ratios for default boxes").

    Layer k has scale s_k (``default_box_scales``) and boxes of aspect ratio 1, an extra square of scale
    √(s_k·s_{k+1}), and each ratio r of its list as (s_k√r, s_k/√r) and its transpose: 4 boxes for ratios
    [2], 6 for [2, 3] (SSD300: 38²·4 + 19²·6 + 10²·6 + 5²·6 + 3²·4 + 1·4 = 8,732). Centres at
    ((i + 0.5)/|f_k|) of the image (paper), or at (i + 0.5)·step px when ``steps`` are given (released
    model, torchvision). Order at a location: s_k, s′_k, r, 1/r, … (torchvision's).

    Fewer prediction layers (``num_prediction_layers``, Table 3): the box groups of the dropped layers are
    stacked on the nearest kept layer, and stacked groups shed ratio pairs, then the extra square, until the
    total is within ``tolerance`` of the full model's count. The paper keeps the total "similar to the original
    (8732)" by "stacking more scales of boxes on remaining layers and adjusting scales of boxes if needed" and
    gives only the counts: its "# Boxes" for n = 6..1 are 8732, 8764, 8942, 9864, 9025, 8664; ours are 8732,
    8764, 8892, 9142, 9386, 8664. No one tiling rule gives all six. n = 5's 8764 puts 8 boxes a location on
    conv10_2 (2 scales × ratios 1, 2, ½ plus the extra square), but n = 2's 9025 = 38²·a + 19²·b needs
    4a + b = 25 with a on conv4_3 and b on conv7: an odd b (e.g. 9 = 3 scales × ratios 1, 2, ½, no extra
    square), which scales of 4 or 6 boxes never give. Spreading the 6 scales at 4 boxes each over the kept layers
    (1+1+2+2 for n = 4, 1+2+3 for n = 3, 6 on conv7 for n = 1) matches every row but n = 2 (12,996). Ours keeps
    each kept layer's own boxes and every dropped layer's square s_k, so n = 2 stays 7.5 % over (10 on conv7).
    ``boundary_boxes='ignore'`` marks boxes crossing the image border as ignored in training and inference
    (the Faster R-CNN strategy of Table 3's "use boundary boxes? no" column).
    """

    def __init__(
        self,
        variant: str = "ssd300",
        num_prediction_layers: int | None = None,
        s_min: float = 0.2,
        s_max: float = 0.9,
        first_scale: float | None = 0.1,
        scales: Sequence[float] | None = None,
        aspect_ratios: Sequence[Sequence[float]] | None = None,
        steps: Sequence[float] | None = None,
        clip: bool = False,
        boundary_boxes: str = "keep",
        tolerance: float = 0.05,
    ) -> None:
        super().__init__()
        all_layers = SSD300_LAYERS if variant == "ssd300" else SSD512_LAYERS
        m = len(all_layers)
        self.layers = source_layers(num_prediction_layers or m, all_layers)
        if boundary_boxes not in ("keep", "ignore"):
            raise ValueError(f"priors.boundary_boxes={boundary_boxes!r}: choose 'keep' or 'ignore'")
        scales = list(scales) if scales is not None else default_box_scales(m, s_min, s_max, first_scale)
        if len(scales) != m + 1:
            raise ValueError(
                f"priors.scales: {variant} needs {m + 1} scales (one per layer and one beyond the "
                f"last for its extra square box), got {len(scales)}"
            )
        ratios = [list(r) for r in (aspect_ratios or [[2]] + [[2, 3]] * (m - 3) + [[2], [2]])]
        if len(ratios) != m or (steps is not None and len(steps) != m):
            raise ValueError(f"priors.aspect_ratios and priors.steps need one entry per layer of {variant} ({m})")
        self.scales, self.clip, self.boundary_boxes = scales, clip, boundary_boxes
        # one group per original layer: its (w, h) pairs relative to the image, in torchvision's order
        groups = []
        for k in range(m):
            s, s_extra = scales[k], math.sqrt(scales[k] * scales[k + 1])
            wh = [(s, s), (s_extra, s_extra)]
            for r in ratios[k]:
                wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
            groups.append(wh)
        self._steps = None if steps is None else [float(steps[all_layers.index(n)]) for n in self.layers]
        self.wh = self._stack_groups(groups, all_layers, variant, tolerance)

    def _stack_groups(
        self, groups: list[list[tuple[float, float]]], all_layers: Sequence[str], variant: str, tolerance: float
    ) -> list[list[tuple[float, float]]]:
        kept = [all_layers.index(n) for n in self.layers]
        # the feature-map side of each layer at the paper's input size (for the box budget only)
        sides = {"ssd300": (38, 19, 10, 5, 3, 1), "ssd512": (64, 32, 16, 8, 4, 2, 1)}[variant]
        own = {k: list(groups[k]) for k in kept}
        stacked: dict[int, list[list[tuple[float, float]]]] = {k: [] for k in kept}
        for k in range(len(groups)):
            if k not in own:
                nearest = min(kept, key=lambda j: (abs(j - k), -j))
                stacked[nearest].append(list(groups[k]))
        budget = (1 + tolerance) * sum(side * side * len(g) for side, g in zip(sides, groups))

        def total() -> int:
            return sum(sides[k] ** 2 * (len(own[k]) + sum(len(g) for g in stacked[k])) for k in kept)

        while total() > budget:
            candidates = [(len(g), sides[k], k, i) for k in kept for i, g in enumerate(stacked[k]) if len(g) > 1]
            if not candidates:
                break
            _, _, k, i = max(candidates)
            g = stacked[k][i]
            del g[-2 if len(g) > 2 else -1 :]  # a ratio pair (r, 1/r) together, then the extra square
        return [own[k] + [wh for g in stacked[k] for wh in g] for k in kept]

    @property
    def num_anchors_per_location(self) -> list[int]:
        return [len(wh) for wh in self.wh]

    def _generate(self, image_size, feature_sizes, device) -> Priors:
        if len(feature_sizes) != len(self.wh):
            raise ValueError(f"{len(feature_sizes)} feature maps for {len(self.wh)} default-box layers")
        h, w = image_size
        boxes = []
        for k, ((fh, fw), wh) in enumerate(zip(feature_sizes, self.wh)):
            # centres as fractions of the image: (i + 0.5)/|f_k| (paper) or (i + 0.5)·step/size
            sy, sx = (1 / fh, 1 / fw) if self._steps is None else (self._steps[k] / h, self._steps[k] / w)
            cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * sy
            cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * sx
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), -1)[:, None, :]  # (HW, 1, 2)
            size = torch.tensor(wh, dtype=torch.float64)
            size = size.clamp(0, 1) if self.clip else size  # torchvision clips (w, h), not the boxes
            box = torch.cat((centres - size / 2, centres + size / 2), -1).reshape(-1, 4)
            boxes.append(box * torch.tensor([w, h, w, h], dtype=torch.float64))
        boxes = torch.cat(boxes).to(device=device, dtype=torch.float32)
        ignored = None
        if self.boundary_boxes == "ignore":
            eps = 1e-3
            ignored = (boxes[:, 0] < -eps) | (boxes[:, 1] < -eps) | (boxes[:, 2] > w + eps) | (boxes[:, 3] > h + eps)
        level_sizes = [fh * fw * len(wh) for (fh, fw), wh in zip(feature_sizes, self.wh)]
        return Priors(boxes, level_sizes, ignored)


class SSDHead(nn.Module):
    """One 3×3 convolution per source layer for the K+1 class scores and one for the 4 offsets of each of
    its default boxes (§2.1 "Convolutional predictors"); background is class 0."""

    sparse_box_training = False  # training computes every default box's offsets (a cheap 3×3 conv per layer)

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes + 1
        self.cls = nn.ModuleList(
            nn.Conv2d(c, a * self.num_classes, 3, padding=1) for c, a in zip(in_channels, num_anchors)
        )
        self.box = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(in_channels, num_anchors))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        cls = [flatten_predictions(conv(f), self.num_classes) for conv, f in zip(self.cls, features)]
        box = [flatten_predictions(conv(f), 4) for conv, f in zip(self.box, features)]
        return {"class_scores": torch.cat(cls, 1), "box_deltas": torch.cat(box, 1)}


class BestMatchIoUAssigner:
    """SSD's matching (§2.2 "Matching strategy"): each ground truth first takes the prior it overlaps most
    (as in MultiBox), then every prior whose best IoU with any ground truth is > ``pos_iou`` (0.5) is a
    positive of that ground truth; all others are background. No ignored band.

    When two objects' best prior is the same, ``bipartite`` (default) matches as MultiBox does and the released
    code's ``MatchBBox`` writes it: greedily, the highest IoU among the free (object, prior) pairs first, each
    object and prior taken once, so the object that lost its best prior takes its next best free one.
    ``bipartite=False`` is torchvision's rule (``Matcher(allow_low_quality_matches=True)``): the object
    overlapping the contested prior more keeps it, and the other gets only the priors above the threshold.
    A claim needs IoU > 0. Crowd boxes never make positives, and background priors more than ``crowd_ioa``
    inside one are ignored (no hard negatives there); priors marked ``ignored`` (boundary boxes, when dropped)
    get ``IGNORE``. Same outputs as ``retinanet.MaxIoUAssigner``.

    A worked example: objects A and B, default boxes d0..d3, IoUs::

             d0    d1    d2    d3
        A   0.70  0.55  0.10  0.00
        B   0.65  0.20  0.40  0.00

    Both objects' best box is d0; A overlaps it more and keeps it (0.70 is the highest pair). Bipartite: A and
    d0 are taken, and the highest free pair left is B's d2 (0.40), so B takes d2. Then d1 (best IoU 0.55 > 0.5,
    with A) is A's too, and d3 is background. With ``bipartite=False`` B's claim on d0 simply fails: d2 is
    background too, and B is left without a positive.

    ``fast=False`` runs each rule as written: the greedy loop per image (``match_bipartite_plain``), or the claims
    on a dense (B, M, N) mask (``resolve_claims_plain``). The default runs the greedy loop in rounds over the
    batch (``match_bipartite``), or resolves the claims by scatters onto (B, N) (``resolve_claims``); each pair
    gives equal labels and boxes (``tests/detectors/test_assigner.py``).
    """

    uses_predictions = False

    def __init__(
        self, pos_iou: float = 0.5, crowd_ioa: float | None = CROWD_IOA, fast: bool = True, bipartite: bool = True
    ) -> None:
        self.pos_iou, self.crowd_ioa, self.fast, self.bipartite = pos_iou, crowd_ioa, fast, bipartite

    @torch.no_grad()
    def __call__(
        self, priors: Priors, targets: DetectionBatch, num_classes: int, outputs: HeadOutputs | None = None
    ) -> dict[str, Tensor]:
        gt_ok = targets.valid & ~targets.crowd  # (B, M)
        iou = batched_box_iou(targets.boxes, priors.boxes)  # (B, M, N)
        if priors.ignored is not None:
            iou.masked_fill_(priors.ignored[None, None, :], -1.0)  # ignored priors are nobody's best match
        iou.masked_fill_(~gt_ok[..., None], -1.0)
        # 1. each object claims the box it overlaps most (a claim needs IoU > 0); of several claims on one box
        # the highest IoU wins, then the lower object index; bipartite: a loser claims its next best free box
        if self.bipartite:
            claim_iou, claim_gt = (self.match_bipartite if self.fast else self.match_bipartite_plain)(iou)
        else:
            claim_iou, claim_gt = (self.resolve_claims if self.fast else self.resolve_claims_plain)(iou, gt_ok)
        # 2. every other box is positive for the object it overlaps most, when that IoU is > pos_iou
        best_iou, best_gt = iou.max(dim=1)  # (B, N)
        claimed = claim_iou > 0
        best_gt = torch.where(claimed, claim_gt, best_gt)
        positive = claimed | (best_iou > self.pos_iou)
        labels = torch.where(positive, torch.gather(targets.labels, 1, best_gt), num_classes)
        labels = ignore_crowd_regions(labels, priors.boxes, targets, num_classes, self.crowd_ioa)
        if priors.ignored is not None:
            labels = labels.masked_fill(priors.ignored[None, :], IGNORE)
        return {"labels": labels, "boxes": matched_boxes(targets.boxes, best_gt)}

    @staticmethod
    def match_bipartite_plain(iou: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) each box's bipartite match's IoU (−1: none) and its object (M: none), by the released code's
        greedy loop (``MatchBBox``), image by image: the free (object, box) pair of highest IoU (the first in
        (object, box) order of equals) is matched and both leave the pool, until no free pair overlaps. Objects
        that may not match (padding, crowd) and ignored boxes come as rows and columns of −1."""
        batch, num_gt, num_boxes = iou.shape
        claim_iou = iou.new_full((batch, num_boxes), -1.0)
        claim_gt = torch.full((batch, num_boxes), num_gt, dtype=torch.long, device=iou.device)
        for b in range(batch):
            free = iou[b].clone()
            while free.max() > 0:
                gt, box = divmod(int(free.argmax()), num_boxes)
                claim_iou[b, box], claim_gt[b, box] = free[gt, box], gt
                free[gt, :] = -1.0
                free[:, box] = -1.0
        return claim_iou, claim_gt

    @staticmethod
    def match_bipartite(iou: Tensor) -> tuple[Tensor, Tensor]:
        """``match_bipartite_plain`` in rounds over the batch. A round matches every object to its best free box
        (the first of equals) where it is also that box's best free object (the first of equals): the loop takes
        such a pair before every pair that shares its object or its box, so no pair taken earlier can get in its
        way, and a round settles what many loop steps would. The loop's own first pick is always such a pair, so
        each round matches one at the least; one to three rounds are usual. A round reads the (B, M, N) table
        once (each object's best free box); the boxes' best objects are read only on the M boxes in question.

        Whether a free pair is left is read on the host (a GPU sync) after every second round on a GPU, so one or
        two rounds cost one sync; a round with no pair left changes nothing."""
        batch, num_gt, num_boxes = iou.shape
        free = iou.clone()  # taken boxes' columns become -1
        matched = torch.zeros(batch, num_gt, dtype=torch.bool, device=iou.device)
        claim_iou = iou.new_full((batch, num_boxes), -1.0)
        claim_gt = torch.full((batch, num_boxes), num_gt, dtype=torch.long, device=iou.device)
        gt_index = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
        rounds_per_check = 2 if takes_gpu_path(iou) else 1
        row_iou, row_box = free.max(dim=2)  # (B, M) each object's best free box, the first of equals
        for done in itertools.count(1):
            row_iou = row_iou.masked_fill(matched, -1.0)
            columns = row_box[:, None, :].expand(batch, num_gt, num_gt)
            on_box = torch.gather(free, 2, columns).masked_fill(matched[..., None], -1.0)  # (B, h, g): h on g's box
            won = (row_iou > 0) & (on_box.max(dim=1).indices == gt_index)  # at most one object a box
            claim_iou.scatter_reduce_(1, row_box, row_iou.masked_fill(~won, -1.0), "amax")
            claim_gt.scatter_reduce_(1, row_box, gt_index.masked_fill(~won, num_gt), "amin")
            # the won boxes' columns to -1 (amin: other objects' writes to the same box keep their values)
            free.scatter_reduce_(2, columns, on_box.masked_fill(won[:, None, :], -1.0), "amin")
            matched |= won
            row_iou, row_box = free.max(dim=2)
            if done % rounds_per_check == 0 and not bool(((row_iou > 0) & ~matched).any()):  # the loop's end
                return claim_iou, claim_gt

    @staticmethod
    def resolve_claims_plain(iou: Tensor, gt_ok: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) the winning claim's IoU on each box (−1: unclaimed) and its object, from a dense (B, M, N) mask
        of the objects' claims: the rule as written, the reference for ``resolve_claims``."""
        claims = torch.zeros_like(iou, dtype=torch.bool).scatter_(2, iou.argmax(dim=2, keepdim=True), True)
        claims &= (iou > 0) & gt_ok[..., None]
        return iou.masked_fill(~claims, -1.0).max(dim=1)  # max: the first (lowest) object of equal claims

    @staticmethod
    def resolve_claims(iou: Tensor, gt_ok: Tensor) -> tuple[Tensor, Tensor]:
        """``resolve_claims_plain`` without the (B, M, N) mask: the claims are B·M points, resolved by scatters on
        (B, N). Where no claim wins, the object index is M (unused: such boxes are not claimed)."""
        best_prior = iou.argmax(dim=2)  # (B, M)
        claim = torch.gather(iou, 2, best_prior[..., None])[..., 0]  # (B, M)
        claim = claim.masked_fill(~((claim > 0) & gt_ok), -1.0)
        num_gt = iou.shape[1]
        claim_iou = iou.new_full((iou.shape[0], iou.shape[2]), -1.0).scatter_reduce_(1, best_prior, claim, "amax")
        wins = (claim > 0) & (claim == torch.gather(claim_iou, 1, best_prior))
        gt_index = torch.arange(num_gt, device=iou.device).expand_as(best_prior)
        claim_gt = torch.full_like(claim_iou, num_gt, dtype=torch.long).scatter_reduce_(
            1, best_prior, gt_index.masked_fill(~wins, num_gt), "amin"
        )
        return claim_iou, claim_gt


class MultiBoxLoss:
    """SSD's objective (eq. 1–3): L = (L_conf + α·L_loc) / N over the N matched default boxes of the batch.

    L_loc: smooth L1 on the encoded offsets of positives (variances 0.1, 0.1, 0.2, 0.2). L_conf: softmax
    cross-entropy over positives and hard negatives: per image, the background boxes with the highest
    confidence loss, at most ``neg_pos_ratio``:1 to its positives (§2.2 "Hard negative mining": 3:1). Two
    details the paper leaves open: an image without positives still contributes ``min_negatives`` hard
    negatives (else background-only images teach nothing), and a box is a negative only if it is not a
    positive or ignored, so none is counted twice. Vectorised over the batch: one sort ranks every image's
    background boxes, and the sums run over masks, with no count read on the host.
    """

    def __init__(
        self,
        neg_pos_ratio: float = 3.0,
        min_negatives: int = 3,
        alpha: float = 1.0,
        smooth_l1_beta: float = 1.0,
        variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        self.neg_pos_ratio, self.min_negatives, self.alpha = neg_pos_ratio, int(min_negatives), alpha
        self.smooth_l1_beta = smooth_l1_beta
        self.box_coder = BoxCoder(tuple(1.0 / v for v in variances))

    def __call__(self, outputs: HeadOutputs, assigned: dict[str, Tensor], priors: Priors) -> dict[str, Tensor]:
        logits, deltas = outputs["class_scores"], outputs["box_deltas"]
        labels = assigned["labels"]
        num_classes = logits.shape[-1] - 1
        positive = positives(labels, num_classes)
        background = labels == num_classes
        num_pos = positive.sum(1)
        wanted = torch.clamp((num_pos * self.neg_pos_ratio).long(), min=self.min_negatives)
        num_neg = torch.minimum(wanted, background.sum(1))  # (B,)
        # every box's cross-entropy against its target (background: class 0), then summed over the boxes that
        # count: dense, as torchvision's SSD loss, so no step reads a count on the host (a GPU sync)
        target = torch.where(positive, labels + 1, 0)
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(labels)
        with torch.no_grad():  # mining: the background boxes of highest confidence loss −log softmax(x)₀
            order = ce.masked_fill(~background, -math.inf).argsort(dim=1, descending=True)
            positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, order[b, j]] = j
            hard_negative = background & (rank < num_neg[:, None])
        ce_sum = torch.where(positive | hard_negative, ce, 0.0).sum()
        n = num_pos.sum().clamp(min=1).to(ce_sum.dtype)
        loss_cls = ce_sum / n
        # L_loc on the positives; the other boxes' targets (unmatched, possibly log 0) are replaced, not read
        box_targets = torch.where(positive[..., None], self.box_coder.encode(assigned["boxes"], priors.boxes), 0.0)
        box_loss = F.smooth_l1_loss(deltas.float(), box_targets, beta=self.smooth_l1_beta, reduction="none").sum(-1)
        loss_box = torch.where(positive, box_loss, 0.0).sum() / n
        return {"loss_cls": loss_cls, "loss_box": self.alpha * loss_box}

    @staticmethod
    def box_deltas_used(assigned: dict[str, Tensor], num_classes: int) -> Tensor:
        """(B, N) the default boxes whose offsets L_loc reads: the positives."""
        return positives(assigned["labels"], num_classes)


class SSDPostprocess:
    """SSD inference (§3.7; released ssd_pascal.py's DetectionOutput): softmax scores per class, score >
    ``score_thresh`` (0.01), the ``topk_per_class`` (400: nms_param top_k) best boxes of each class, class-wise
    NMS at ``nms_thresh`` (0.45), ``max_detections`` (200: keep_top_k) per image. One top-k over (image, class)
    rows and one batched NMS.

    ``fast`` (same detections): the softmax normaliser only for boxes where some class can pass, and NMS
    first on each image's ``2 · max_detections`` best candidates (``capped_nms_per_image``); false = the
    plain formulation, softmax of every box and NMS on every candidate.
    """

    def __init__(
        self,
        score_thresh: float = 0.01,
        topk_per_class: int = 400,
        nms_thresh: float = 0.45,
        max_detections: int = 200,
        variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        fast: bool = True,
    ) -> None:
        self.score_thresh, self.topk_per_class = score_thresh, topk_per_class
        self.nms_thresh, self.max_detections = nms_thresh, max_detections
        self.box_coder = BoxCoder(tuple(1.0 / v for v in variances))
        self.fast = fast

    @torch.no_grad()
    def __call__(self, outputs: HeadOutputs, priors: Priors, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, deltas = outputs["class_scores"].float(), outputs["box_deltas"]
        img, prior, label, score = (self.candidates_fast if self.fast else self.candidates)(logits, priors)
        ok = score > self.score_thresh  # the exact test (the candidates' cut is a hair lower)
        img, prior, label, score = img[ok], prior[ok], label[ok], score[ok]
        # the top-k of each (image, class) among the survivors (fast: only when some class has more than k)
        group = img * (logits.shape[-1] - 1) + label
        if not self.fast or (len(group) and int(torch.bincount(group).max()) > self.topk_per_class):
            keep = topk_per_group(score, group, self.topk_per_class)
            img, prior, label, score = img[keep], prior[keep], label[keep], score[keep]
        if not self.fast:
            boxes = self.box_coder.decode(deltas[img, prior].float(), priors.boxes[prior])
            return nms_per_image(boxes, score, label, img, image_sizes, self.nms_thresh, self.max_detections)
        # rows of the flattened tensors: index_select is cheaper than indexing with two index tensors
        boxes = self.box_coder.decode(
            deltas.reshape(-1, 4).index_select(0, img * deltas.shape[1] + prior).float(),
            priors.boxes.index_select(0, prior),
        )
        return capped_nms_per_image(
            boxes, score, label, img, image_sizes, self.nms_thresh, self.max_detections, 2 * self.max_detections
        )

    def candidates(self, logits: Tensor, priors: Priors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image, prior, label, score) of every class score above about ``score_thresh``, the softmax of every
        box computed: softmax(x)_c > t ⇔ x_c > log t + logsumexp(x), so only the survivors are exponentiated."""
        log_norm = torch.logsumexp(logits, dim=-1)  # (B, N)
        if priors.ignored is not None:
            log_norm = log_norm.masked_fill(priors.ignored[None, :], math.inf)  # no score passes
        cut = (log_norm + math.log(max(self.score_thresh, 1e-30)) - 1e-4)[..., None]
        img, prior, label = torch.nonzero(logits[..., 1:] > cut, as_tuple=True)  # labels without background
        return img, prior, label, torch.exp(logits[img, prior, label + 1] - log_norm[img, prior])

    def candidates_fast(self, logits: Tensor, priors: Priors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``candidates``, the softmax normaliser computed only for the boxes where some class can pass:
        p_c ≤ e^x_c / (e^x_0 + e^x_c), so p_c > t needs x_c − x_0 > logit t, which nearly all boxes miss."""
        t = min(max(self.score_thresh, 1e-30), 1 - 1e-7)
        margin = logits[..., 1:].amax(dim=-1) - logits[..., 0]
        may_pass = margin > math.log(t / (1 - t)) - 1e-3
        if priors.ignored is not None:
            may_pass &= ~priors.ignored[None, :]
        box_img, box = torch.nonzero(may_pass, as_tuple=True)
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, box_img * logits.shape[1] + box)  # (S, K + 1)
        log_norm = torch.logsumexp(rows, dim=-1)
        cut = (log_norm + math.log(max(self.score_thresh, 1e-30)) - 1e-4)[:, None]
        r, label = torch.nonzero(rows[:, 1:] > cut, as_tuple=True)
        return box_img[r], box[r], label, torch.exp(rows[r, label + 1] - log_norm[r])


def torchvision_ssd_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a ``torchvision.models.detection.ssd300_vgg16`` state dict onto our SSD300 ``DenseDetector``::

        tv = torchvision.models.detection.ssd300_vgg16(weights="COCO_V1")
        detector.load_state_dict(torchvision_ssd_state_dict(tv.state_dict()))

    with our model configured as torchvision's priors and inference (``conf/model/ssd_torchvision.yaml``).
    """
    out = {}
    for key, value in tv_state.items():
        if key == "backbone.scale_weight":
            out["backbone.l2norm.weight"] = value
        elif key.startswith("backbone."):
            out[key] = value
        elif key.startswith("head.classification_head.module_list."):
            out["head.cls." + key.split("module_list.")[1]] = value
        elif key.startswith("head.regression_head.module_list."):
            out["head.box." + key.split("module_list.")[1]] = value
    return out
