"""RetinaNet's own parts (Lin et al., Focal Loss for Dense Object Detection, 2017), in the paper's order: the
anchors (§4), the head (§4, Fig. 3), the anchor assignment (§4), the loss (§3.3, §4) and the inference (§4).
``conf/model/retinanet.yaml`` composes them with the ResNet-FPN backbone (``backbones.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assigners import CROWD_IOA, IGNORE, ignore_crowd_regions, matched_boxes, positives
from .batch import DetectionBatch
from .boxes import BoxCoder, batched_box_iou
from .device_paths import takes_gpu_path
from .losses import box_regression_loss, focal_loss_dense, focal_loss_sparse
from .postprocess import nms_per_image, topk_per_group
from .priors import PriorGenerator, Priors, flatten_predictions
from .protocols import HeadOutputs


class AnchorGenerator(PriorGenerator):
    """Anchors on P3..P7: per level one base size × ``scales`` × ``aspect_ratios`` (h/w), at every cell.

    Paper §4: areas 32²..512² on P3..P7, scales {2^0, 2^(1/3), 2^(2/3)}, ratios {1:2, 1:1, 2:1} → A=9.
    ``size_factor`` shrinks every size for small inputs. ``integer_sizes`` truncates sizes and rounds the
    base boxes to integers, as torchvision's ``AnchorGenerator`` does (for weight-for-weight equality).
    Order within a cell: ratio-major, then scale (torchvision's order). Cached per (image, feature) sizes.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        size_factor: float = 1.0,
        integer_sizes: bool = False,
        offset: float = 0.0,
    ) -> None:
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

    ``sparse_box_training``: in training the box loss reads only the positive anchors' deltas, a few hundred of
    ~100k, so ``box_deltas_where`` runs the box subnet only on the small tiles holding them (with the halo its
    five 3×3 convolutions read); the same values and gradients, for a fraction of the box subnet's work. Only
    with ``norm="none"``: GroupNorm mixes every location of a level, so with it the subnet always runs whole.
    """

    #: side of the output tiles ``box_deltas_where`` computes; 4 did the least work on the bench (bench/)
    BOX_TILE = 4

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_anchors: int | Sequence[int],
        num_convs: int = 4,
        prior_probability: float = 0.01,
        norm: str = "none",
        sparse_box_training: bool = True,
    ) -> None:
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"head.norm={norm!r}: choose 'none' (paper) or 'gn' (GroupNorm)")
        if not isinstance(num_anchors, int):
            if len(set(num_anchors)) != 1:
                raise ValueError(
                    f"RetinaNet's head is shared across levels: needs one anchor count, got {list(num_anchors)}"
                )
            num_anchors = int(num_anchors[0])
        self.num_classes, self.num_anchors, self.num_convs = num_classes, num_anchors, num_convs
        # a location's box deltas depend only on the features around it, unless GroupNorm mixes the level
        self.sparse_box_training = sparse_box_training and norm == "none"
        self._tile_layouts: dict[tuple, _TileLayout] = {}  # box_deltas_where's tables, per input size

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

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        return {"class_scores": self.classify(features), "box_deltas": self.box_deltas(features)}

    def classify(self, features: list[Tensor]) -> Tensor:
        """Class logits (B, N, K) of every anchor."""
        return torch.cat(
            [flatten_predictions(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features], dim=1
        )

    def box_deltas(self, features: list[Tensor]) -> Tensor:
        """Box deltas (B, N, 4) of every anchor."""
        return torch.cat([flatten_predictions(self.box_pred(self.box_subnet(f)), 4) for f in features], dim=1)

    def box_deltas_where(self, features: list[Tensor], needed: Tensor) -> Tensor:
        """Box deltas (B, N, 4), exact (values and gradients) at the anchors marked in ``needed`` (B, N) and at
        every anchor of the ``BOX_TILE``² output tiles holding one; zero elsewhere.

        Each active tile is cut from the zero-padded level with a halo of one pixel per 3×3 convolution, the
        tiles of every level and image go through the subnet together as one batch with unpadded convolutions,
        and after each layer the pixels outside the level are zeroed, as the full map's zero padding would
        have them. When the tiles would cost more than the whole maps (crowded images), the maps run whole.
        The number of active tiles is the one value read on the host (a GPU sync): it sizes the work. The
        levels' sizes and offsets come from tables made once per input size (``_TileLayout``).
        """
        tile, halo = self.BOX_TILE, self.num_convs + 1
        size = tile + 2 * halo  # an input patch's side
        pad = halo + tile - 1
        batch, sizes = needed.shape[0], tuple(tuple(f.shape[-2:]) for f in features)
        key = (sizes, batch, str(needed.device))
        if key not in self._tile_layouts:
            self._tile_layouts[key] = _TileLayout.make(sizes, batch, tile, pad, needed.device)
        layout = self._tile_layouts[key]
        locations = layout.locations
        needed = needed.view(batch, locations, self.num_anchors).any(-1)
        tiles = _active_tiles(needed, layout)  # (T, 4): level, image, tile row, tile column
        if len(tiles) * sum((size - 2 * k) ** 2 for k in range(1, halo + 1)) >= batch * locations * halo:
            return self.box_deltas(features)
        if len(tiles) == 0:  # no positives: one tile all the same, so every box parameter stays in the graph
            tiles = torch.zeros(1, 4, dtype=torch.long, device=needed.device)
        level, image, ty, tx = tiles.unbind(1)
        h, w = layout.height[level], layout.width[level]  # (T,) each tile's level size
        steps = torch.arange(size, device=needed.device)
        ys, xs = (ty * tile - halo)[:, None] + steps, (tx * tile - halo)[:, None] + steps  # (T, size) patch pixels
        inside_y, inside_x = (ys >= 0) & (ys < h[:, None]), (xs >= 0) & (xs < w[:, None])

        x = _gather_patches(features, level, image, ys, xs, pad, layout)
        for i in range(self.num_convs):
            conv, relu = self.box_subnet[2 * i], self.box_subnet[2 * i + 1]
            x = relu(F.conv2d(x, conv.weight, conv.bias))
            # zero outside the level: the padding the next convolution reads there on the whole map
            keep = inside_y[:, i + 1 : size - i - 1, None] & inside_x[:, None, i + 1 : size - i - 1]
            x = x * keep[:, None].to(x.dtype)
        out = F.conv2d(x, self.box_pred.weight, self.box_pred.bias)  # (T, 4A, tile, tile)

        # into ``box_deltas``' (B·locations, 4A) rows; the tile pixels beyond the level go to a spare last row,
        # dropped (a scatter in place of boolean-mask indexing, which would read a count on the host)
        oy, ox = ys[:, halo : halo + tile], xs[:, halo : halo + tile]
        first = image * locations + layout.level_start[level]
        rows = first[:, None, None] + oy[:, :, None] * w[:, None, None] + ox[:, None, :]
        valid = inside_y[:, halo : halo + tile, None] & inside_x[:, None, halo : halo + tile]
        rows = torch.where(valid, rows, batch * locations).reshape(-1)
        values = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        dense = values.new_zeros(batch * locations + 1, out.shape[1]).index_put((rows,), values)
        return dense[:-1].view(batch, -1, 4)


@dataclass(frozen=True)
class _TileLayout:
    """Where each level's locations, tiles and padded pixel rows lie, as small device tensors made once per
    (feature sizes, batch, device): read by index on the device, never built from Python lists every step (each
    such tensor is a copy from the host, a GPU sync)."""

    sizes: tuple[tuple[int, int], ...]  # each level's (H, W)
    tile: int  # a tile's side
    tile_grids: tuple[tuple[int, int], ...]  # each level's tiles down and across
    locations: int  # Σ H·W
    height: Tensor  # (L,) each level's H
    width: Tensor  # (L,) each level's W
    level_start: Tensor  # (L,) a level's first location among an image's
    padded_start: Tensor  # (L,) a level's first pixel row among all levels' padded rows (B images each)
    tile_level: Tensor  # (Σ tiles,) each tile's level, tiles ordered level by level, row-major
    tile_y: Tensor  # (Σ tiles,) its tile row
    tile_x: Tensor  # (Σ tiles,) its tile column

    @staticmethod
    def make(sizes: tuple[tuple[int, int], ...], batch: int, tile: int, pad: int, device: torch.device) -> _TileLayout:
        grids = tuple((-(-h // tile), -(-w // tile)) for h, w in sizes)
        level, ty, tx = [], [], []
        for i, (th, tw) in enumerate(grids):
            level += [i] * (th * tw)
            ty += [r for r in range(th) for _ in range(tw)]
            tx += list(range(tw)) * th
        padded = [(h + 2 * pad) * (w + 2 * pad) * batch for h, w in sizes]

        def table(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return _TileLayout(
            sizes=sizes,
            tile=tile,
            tile_grids=grids,
            locations=sum(h * w for h, w in sizes),
            height=table([h for h, _ in sizes]),
            width=table([w for _, w in sizes]),
            level_start=table([sum(h * w for h, w in sizes[:i]) for i in range(len(sizes))]),
            padded_start=table([sum(padded[:i]) for i in range(len(sizes))]),
            tile_level=table(level),
            tile_y=table(ty),
            tile_x=table(tx),
        )


def _gather_patches(
    features: list[Tensor], level: Tensor, image: Tensor, ys: Tensor, xs: Tensor, pad: int, layout: _TileLayout
) -> Tensor:
    """(T, C, S, S) patches (NHWC memory): patch t holds pixels ``ys[t]`` × ``xs[t]`` (level coordinates, −pad..
    size+pad−1, zero outside) of image ``image[t]``'s map at ``level[t]``. One gather over all levels' pixel rows."""
    # each level zero-padded and flattened to (B·(H+2·pad)·(W+2·pad), C) pixel rows
    rows = [F.pad(f, (pad, pad, pad, pad)).permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features]
    heights, widths = layout.height[level] + 2 * pad, layout.width[level] + 2 * pad
    first = layout.padded_start[level] + image * heights * widths
    index = first[:, None, None] + (ys + pad)[:, :, None] * widths[:, None, None] + (xs + pad)[:, None, :]
    patches = torch.cat(rows).index_select(0, index.reshape(-1))
    return patches.view(*index.shape, -1).permute(0, 3, 1, 2)


def _active_tiles(needed: Tensor, layout: _TileLayout) -> Tensor:
    """(T, 4) rows (level, image, tile row, tile column) of the tiles of each level holding a location marked in
    ``needed`` (B, Σ H·W): every level's tile marks side by side, then one ``nonzero`` (the one host read)."""
    batch, marks, start, tile = needed.shape[0], [], 0, layout.tile
    for (h, w), (th, tw) in zip(layout.sizes, layout.tile_grids):
        level = needed[:, start : start + h * w].view(batch, h, w)
        start += h * w
        level = F.pad(level, (0, tw * tile - w, 0, th * tile - h))
        marks.append(level.view(batch, th, tile, tw, tile).any(4).any(2).reshape(batch, -1))
    image, index = torch.cat(marks, 1).nonzero(as_tuple=True)
    return torch.stack((layout.tile_level[index], image, layout.tile_y[index], layout.tile_x[index]), 1)


class MaxIoUAssigner:
    """Max-IoU matching over the whole batch at once (RetinaNet §4).

    A prior is positive when its best IoU with a ground truth is ≥ ``pos_iou``, background when < ``neg_iou``
    and ignored in between. With ``low_quality_matches`` every ground truth also claims the prior(s) it
    overlaps most, so no object is left without a positive (the prior keeps its own best ground truth, as in
    torchvision/detectron2). Crowd boxes never make positives, and background priors more than ``crowd_ioa``
    inside one are ignored (None: they stay background).

    Returns ``labels`` (B, N): class for positives, ``num_classes`` for background, ``IGNORE`` (−1) for
    ignored; and ``boxes`` (B, N, 4): the matched ground-truth box of every prior (meaningful for positives).
    """

    uses_predictions = False

    def __init__(
        self,
        pos_iou: float = 0.5,
        neg_iou: float = 0.4,
        low_quality_matches: bool = True,
        crowd_ioa: float | None = CROWD_IOA,
        cpu_block: int | None = 4096,
    ) -> None:
        if neg_iou > pos_iou:
            raise ValueError(f"assigner.neg_iou={neg_iou} must not exceed assigner.pos_iou={pos_iou}")
        self.pos_iou, self.neg_iou, self.low_quality_matches = pos_iou, neg_iou, low_quality_matches
        self.crowd_ioa = crowd_ioa
        # on CPU the (B, M, N) IoU is computed in blocks of this many priors, which stay in cache (RetinaNet at
        # 800 px, batch 8: 66 → ~20 ms); None, or a GPU: one block
        self.cpu_block = cpu_block

    @torch.no_grad()
    def __call__(
        self, priors: Priors, targets: DetectionBatch, num_classes: int, outputs: HeadOutputs | None = None
    ) -> dict[str, Tensor]:
        gt_ok = targets.valid & ~targets.crowd  # (B, M)
        n = priors.boxes.shape[0]
        block = n if self.cpu_block is None or takes_gpu_path(priors.boxes) else self.cpu_block
        starts = range(0, n, block)

        # padding and crowd never win a match (on the CPU the check is free: skip the fill when there are none)
        excluded = ~gt_ok[..., None] if block == n or not bool(gt_ok.all()) else None

        def iou_block(start: int) -> Tensor:  # (B, M, block)
            iou = batched_box_iou(targets.boxes, priors.boxes[start : start + block])
            return iou if excluded is None else iou.masked_fill_(excluded, -1.0)

        best_iou = targets.boxes.new_empty(len(targets), n)
        best_gt = torch.empty(len(targets), n, dtype=torch.long, device=best_iou.device)
        block_best = targets.boxes.new_empty(len(starts), *gt_ok.shape)  # each object's best IoU in each block
        for j, start in enumerate(starts):
            iou = iou_block(start)
            torch.max(iou, dim=1, out=(best_iou[:, start : start + block], best_gt[:, start : start + block]))
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
                        ties = batched_box_iou(targets.boxes[img, obj][None], priors.boxes[start : start + block])[0]
                        ties = ties == claim[img, obj][:, None]  # (objects, block)
                        hits = torch.zeros(len(targets), ties.shape[1], dtype=torch.int32, device=img.device)
                        low_quality[:, start : start + block] = hits.index_add_(0, img, ties.int()) > 0
            labels = torch.where(low_quality, gt_labels, labels)
        labels = ignore_crowd_regions(labels, priors.boxes, targets, num_classes, self.crowd_ioa)
        if priors.ignored is not None:
            labels = labels.masked_fill(priors.ignored[None, :], IGNORE)
        return {"labels": labels, "boxes": matched_boxes(targets.boxes, best_gt)}


class RetinaNetLoss:
    """Focal loss over all non-ignored anchors + box loss over positives, both ÷ #positive anchors in the
    batch (paper §3.3/§4: "normalized by the number of anchors assigned to a ground-truth box")."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 0.25,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        box_coder: BoxCoder | None = None,
        fused: bool = True,
    ) -> None:
        self.gamma, self.alpha = gamma, alpha
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.box_coder = box_coder or BoxCoder()
        self.fused = fused
        box_regression_loss(torch.zeros(1), torch.zeros(1), box_loss, smooth_l1_beta)  # validate early

    def __call__(self, outputs: HeadOutputs, assigned: dict[str, Tensor], priors: Priors) -> dict[str, Tensor]:
        logits, deltas = outputs["class_scores"], outputs["box_deltas"]
        labels = assigned["labels"]
        positive = self.box_deltas_used(assigned, logits.shape[-1])
        num_pos = positive.sum().clamp(min=1).float()
        if self.fused:  # the division inside, so the gradient comes out of the forward pass finished
            loss_cls = focal_loss_sparse(logits, labels, self.gamma, self.alpha, num_pos)
        else:
            loss_cls = focal_loss_dense(logits, labels, self.gamma, self.alpha) / num_pos
        # the box loss over every anchor, kept on the positives: no count read on the host (a GPU sync); the other
        # anchors' targets (unmatched, possibly log 0) are replaced, not read
        box_targets = torch.where(positive[..., None], self.box_coder.encode(assigned["boxes"], priors.boxes), 0.0)
        per_anchor = box_regression_loss(deltas.float(), box_targets, self.box_loss, self.smooth_l1_beta)
        loss_box = torch.where(positive, per_anchor.sum(-1), 0.0).sum() / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    @staticmethod
    def box_deltas_used(assigned: dict[str, Tensor], num_classes: int) -> Tensor:
        """(B, N) the anchors whose box deltas the loss reads: the positives (labelled with a class)."""
        return positives(assigned["labels"], num_classes)


class RetinaNetPostprocess:
    """Sigmoid scores > ``score_thresh``, top ``topk_per_level`` (prior, class) pairs per level, decode,
    clip, class-wise NMS at ``nms_thresh``, keep the ``max_detections`` best per image
    (RetinaNet §4 "Inference": 0.05, 1k, 0.5, and 100 detections as in Detectron).

    Batched over images with no per-image loop: the threshold comes first (in a trained detector almost no
    (prior, class) pair passes 0.05), found by one max over classes per prior, so the B·N·K logits are read
    once; the per-(image, level) top-k is a segmented rank over the few survivors; one NMS call covers all.
    """

    def __init__(
        self,
        score_thresh: float = 0.05,
        topk_per_level: int = 1000,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        box_coder: BoxCoder | None = None,
    ) -> None:
        self.score_thresh, self.topk_per_level = score_thresh, topk_per_level
        self.nms_thresh, self.max_detections = nms_thresh, max_detections
        self.box_coder = box_coder or BoxCoder()

    @torch.no_grad()
    def __call__(self, outputs: HeadOutputs, priors: Priors, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, deltas = outputs["class_scores"], outputs["box_deltas"]
        b, n, num_classes = logits.shape
        # sigmoid(x) > t ⇔ x > logit(t); a hair lower here, the exact test on the survivors' sigmoid below
        t = min(max(self.score_thresh, 1e-12), 1 - 1e-12)
        cut = math.log(t / (1 - t)) - 1e-3
        img, anchor = torch.nonzero(logits.amax(dim=2) > cut, as_tuple=True)
        rows = logits[img, anchor].float()  # (S, K): the priors with any class above the cut
        r, label = torch.nonzero(rows > cut, as_tuple=True)
        scores = torch.sigmoid(rows[r, label])
        ok = scores > self.score_thresh
        img, anchor, label, scores = img[r][ok], anchor[r][ok], label[ok], scores[ok]
        # the top-k of each (image, level)
        starts = torch.tensor(priors.level_sizes, device=logits.device).cumsum(0)
        group = img * len(priors.level_sizes) + torch.bucketize(anchor, starts, right=True)
        keep = topk_per_group(scores, group, self.topk_per_level)
        img, anchor, label, scores = img[keep], anchor[keep], label[keep], scores[keep]
        boxes = self.box_coder.decode(deltas[img, anchor].float(), priors.boxes[anchor])
        return nms_per_image(boxes, scores, label, img, image_sizes, self.nms_thresh, self.max_detections)


def _torchvision_head_key(key: str) -> str:
    """torchvision's ``RetinaNetHead`` key → ours: ``classification_head.conv.{i}.0.weight`` (its
    Conv2dNormActivation) is our ``cls_subnet.{2i}.weight`` (conv, ReLU pairs)."""
    for tv, ours in (("classification_head.conv.", "cls_subnet."), ("regression_head.conv.", "box_subnet.")):
        if key.startswith(tv):
            i, _, param = key[len(tv) :].split(".")
            return f"{ours}{2 * int(i)}.{param}"
    key = key.replace("classification_head.cls_logits.", "cls_score.")
    return key.replace("regression_head.bbox_reg.", "box_pred.")


def torchvision_retinanet_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a ``torchvision.models.detection.retinanet_resnet50_fpn`` state dict onto our ``DenseDetector``.

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
            out["head." + _torchvision_head_key(key[len("head.") :])] = value
    return out
