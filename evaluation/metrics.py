"""Validation metrics: the COCO AP suite (our tensor implementation of pycocotools' COCOeval, or a COCOeval
run of faster_coco_eval or pycocotools) and PASCAL VOC AP at IoU 0.5 (VOC07 11-point and area-under-curve),
under the metric names of docs/ARCHITECTURE.md §1.

Both metrics keep each batch as flat tensors (one row per box, a count per image), so an update costs a
handful of tensor operations whatever the batch size, and the states gather across processes by "cat"."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from detectors.batch import pad_per_image
from detectors.boxes import batched_box_iou

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it prints the whole COCO table each epoch

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


# "tensors": coco_evaluate below, pycocotools' numbers bit for bit at several times faster_coco_eval's speed;
# the COCOeval runs stay as references and fallbacks
COCO_BACKENDS = ("tensors", "faster_coco_eval", "pycocotools")


def _coco_tools(backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _flatten(items: Sequence[dict[str, Tensor]], keys: Sequence[str]) -> tuple[Tensor, ...]:
    """The images' boxes of each key concatenated, and the number per image, on the boxes' device (a state list
    of CPU counts beside GPU boxes would be split by the next ``.to(device)``: torchmetrics moves the elements
    appended before, not the one appended after)."""
    counts = torch.tensor([len(item[keys[0]]) for item in items], dtype=torch.long, device=items[0][keys[0]].device)
    return (*(torch.cat([item[k] for item in items]) for k in keys), counts)


def _cat(xs: list[Tensor], dtype: torch.dtype, width: int = 0) -> Tensor:
    return torch.cat(xs) if len(xs) else torch.zeros((0, width) if width else 0, dtype=dtype)


def voc_match(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    det_counts: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    difficult: Tensor,
    gt_counts: Tensor,
    iou_thresh: float = 0.5,
) -> tuple[Tensor, ...]:
    """The devkit's greedy matching for a batch of images at once (flat detections and ground truth, a count per
    image). Returns the detections sorted by image then decreasing score (ties: input order), with TP and FP
    flags: each detection takes its same-class ground truth of highest IoU; above ``iou_thresh`` the first
    detection (in that order) to take a non-difficult object is a TP, later ones FP; one taking a difficult
    object is neither; below it is a FP."""
    device = boxes.device
    image = torch.repeat_interleave(torch.arange(len(det_counts), device=device), det_counts.to(device))
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    boxes, scores, labels, image = boxes[order].float(), scores[order], labels[order], image[order]
    gt = pad_per_image(gt_boxes.to(boxes), gt_counts, 0.0)[image]  # (D, M, 4): the objects of each detection's image
    gt_label = pad_per_image(gt_labels.to(labels), gt_counts, -1)[image]  # -1 pads: never the detection's class
    iou = batched_box_iou(boxes[:, None], gt).squeeze(1)
    iou.masked_fill_(gt_label != labels[:, None], -1.0)
    if iou.shape[1]:
        best_iou, best_gt = iou.max(dim=1)
    else:  # no object in any image of the batch
        best_iou, best_gt = iou.new_full((len(boxes),), -1.0), torch.zeros(len(boxes), dtype=torch.long, device=device)
    hit = best_iou > iou_thresh
    on_difficult = pad_per_image(difficult.to(device=device, dtype=torch.bool), gt_counts, False)[image, best_gt] & hit
    claim = hit & ~on_difficult
    # the first claim (in sorted order) of each object is the TP, as the devkit's "detected" flags make it
    key = image * iou.shape[1] + best_gt
    position = torch.arange(len(boxes), device=device)
    first = torch.full((len(gt_counts) * iou.shape[1] + 1,), len(boxes), dtype=torch.long, device=device)
    first.scatter_reduce_(0, key[claim], position[claim], "amin")
    tp = claim & (first[key] == position)
    fp = ~hit | (claim & ~tp)
    return scores, labels, tp, fp


def voc_ap_per_class(scores: Tensor, labels: Tensor, tp: Tensor, fp: Tensor, num_gt: Tensor) -> tuple[Tensor, Tensor]:
    """VOC07 11-point AP and area AP of every class at once (-1 where a class has no countable object), from
    the detections of the whole set in update order; each class's detections are ranked by decreasing score,
    ties kept in update order (a stable sort, as the devkit's MATLAB ``sort``)."""
    num_classes, device = len(num_gt), scores.device
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by class, then by decreasing score
    labels, tp, fp = labels[order], tp[order].double(), fp[order].double()
    n = len(labels)
    counts = torch.bincount(labels, minlength=num_classes)
    start = (torch.cumsum(counts, 0) - counts)[labels]  # index of each class's first detection
    tp_cum, fp_cum = torch.cumsum(tp, 0), torch.cumsum(fp, 0)
    tp_cum, fp_cum = tp_cum - (tp_cum - tp)[start], fp_cum - (fp_cum - fp)[start]  # cumulative within the class
    recall = tp_cum / num_gt.to(device=device, dtype=torch.float64)[labels]
    precision = tp_cum / (tp_cum + fp_cum).clamp(min=torch.finfo(torch.float64).eps)
    # precision envelope (max over the class's later points), exactly: a reversed running max of integer keys
    # that rank the precisions inside class blocks that never mix
    sorted_precision, by_precision = torch.sort(precision)
    rank = torch.empty_like(by_precision)
    rank[by_precision] = torch.arange(n, device=device)
    block = (num_classes - labels) * n  # later classes (met first in reverse) get the lower blocks
    running = torch.flip(torch.cummax(torch.flip(rank + block, [0]), 0).values, [0])
    envelope = sorted_precision[running - block]
    # area: Σ (r_j − r_{j−1}) · envelope_j over the class's points, r_{−1} = 0
    previous = torch.cat([recall.new_zeros(1), recall[:-1]])
    previous[start[start == torch.arange(n, device=device)]] = 0.0  # also 0 before each class's first point
    ap_area = torch.zeros(num_classes, dtype=torch.float64, device=device)
    ap_area.index_add_(0, labels, (recall - previous) * envelope)
    # 11-point: the envelope at the first point reaching each recall level (0 when none does)
    levels = torch.linspace(0, 1, 11, dtype=torch.float64, device=device)
    position = torch.where(recall[:, None] >= levels, torch.arange(n, device=device)[:, None], n)
    first = torch.full((num_classes, 11), n, dtype=torch.long, device=device)
    first.scatter_reduce_(0, labels[:, None].expand(-1, 11), position, "amin")
    ap07 = torch.cat([envelope, envelope.new_zeros(1)])[first].sum(1) / 11
    absent = num_gt.to(device) == 0  # a class absent from the ground truth has no AP (left out of the mean)
    return ap07.masked_fill(absent, -1.0), ap_area.masked_fill(absent, -1.0)


class VOCAveragePrecision(Metric):
    """Per-class AP at IoU > 0.5 with the VOC devkit's rules: detections sorted by score over the whole
    set, each matched to its highest-IoU ground truth; a match to a ``difficult`` object counts neither
    as TP nor FP, a second match to an object is a FP; difficult objects are not counted in recall."""

    full_state_update = False

    def __init__(self, num_classes: int, iou_thresh: float = 0.5) -> None:
        # no torchmetrics sync: DetectionMetrics gathers both metrics' states in one collective
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.num_classes, self.iou_thresh = num_classes, iou_thresh
        for name in ("scores", "labels", "tp", "fp"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_gt", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if not len(preds):
            return
        boxes, scores, labels, det_counts = _flatten(preds, ("boxes", "scores", "labels"))
        targets = [
            t if "difficult" in t else {**t, "difficult": torch.zeros_like(t["labels"], dtype=torch.bool)}
            for t in targets
        ]
        gt_boxes, gt_labels, difficult, gt_counts = _flatten(targets, ("boxes", "labels", "difficult"))
        difficult = difficult.bool()
        self.num_gt += torch.bincount(gt_labels[~difficult], minlength=self.num_classes).to(self.num_gt)
        scores, labels, tp, fp = voc_match(
            boxes, scores, labels, det_counts, gt_boxes, gt_labels, difficult, gt_counts, self.iou_thresh
        )
        self.scores.append(scores)
        self.labels.append(labels)
        self.tp.append(tp)
        self.fp.append(fp)

    def flat_state(self) -> dict[str, Tensor]:
        """The states as one tensor each (what ``evaluate`` takes; concatenate several, sum ``num_gt``, to merge)."""
        return {
            "scores": _cat(self.scores, torch.float32),
            "labels": _cat(self.labels, torch.long),
            "tp": _cat(self.tp, torch.bool),
            "fp": _cat(self.fp, torch.bool),
            "num_gt": self.num_gt,
        }

    def compute(self) -> dict[str, Tensor]:
        return self.evaluate(self.flat_state())

    @staticmethod
    def evaluate(state: dict[str, Tensor]) -> dict[str, Tensor]:
        ap07, ap_area = voc_ap_per_class(state["scores"], state["labels"], state["tp"], state["fp"], state["num_gt"])
        ap07, ap_area = ap07.float().cpu(), ap_area.float().cpu()
        present = ap07 >= 0
        mean = lambda x: x[present].mean() if present.any() else torch.tensor(-1.0)  # noqa: E731
        return {"voc07_map_50": mean(ap07), "voc_map_50": mean(ap_area), "voc_ap_per_class": ap_area}


def f1_by_threshold(
    scores: Tensor, labels: Tensor, tp: Tensor, fp: Tensor, num_gt: Tensor, thresholds: Tensor
) -> Tensor:
    """(K, T) F1 of each class when only detections of score ≥ each threshold are kept: 2·TP ÷ (TP + FP + GT), from
    the VOC matching at IoU 0.5 (detections of "difficult" objects, neither TP nor FP, left out); NaN for a class
    without objects."""
    f1 = torch.full((len(num_gt), len(thresholds)), float("nan"), dtype=torch.float64)
    for k in range(len(num_gt)):
        if int(num_gt[k]) == 0:
            continue
        mine = (labels == k) & (tp | fp)
        kept = scores[mine].double()[:, None] >= thresholds.double()[None, :]  # (detections, T)
        true_kept = (kept & tp[mine][:, None]).sum(0).double()
        f1[k] = 2 * true_kept / (kept.sum(0).double() + int(num_gt[k]))
    return f1


def best_f1_threshold(state: dict[str, Tensor], steps: int = 101) -> tuple[float, float]:
    """(the score threshold of the highest F1 averaged over the classes with objects, that F1), on the grid
    0, 0.01, …, 1 (as ultralytics reports confidence at best F1); (0.0, 0.0) without objects."""
    thresholds = torch.linspace(0, 1, steps, dtype=torch.float64)
    f1 = f1_by_threshold(*(state[k].cpu() for k in ("scores", "labels", "tp", "fp", "num_gt")), thresholds)
    present = ~f1[:, 0].isnan()
    if not present.any():
        return 0.0, 0.0
    mean = f1[present].mean(0)
    best = len(mean) - 1 - int(mean.flip(0).argmax())  # of equal F1s the highest threshold: fewer boxes shown
    return float(thresholds[best]), float(mean[best])


# --- the COCO protocol on flat tensors --------------------------------------------------------------------
# pycocotools' Params for "bbox", built with its own numpy expressions so the thresholds are the same doubles
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = ((0**2, 1e5**2), (0**2, 32**2), (32**2, 96**2), (96**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETECTIONS = (1, 10, 100)
_MATCH_BUDGET = 1 << 23  # elements of a (pairs, areas, thresholds, objects + detections) block: 8 MB of bools


def _segment_starts(keys: Tensor) -> Tensor:
    """For sorted ``keys``: the index of the first row of each row's run of equal keys."""
    first = torch.ones(len(keys), dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return torch.nonzero(first).squeeze(1)[torch.cumsum(first, 0) - 1]


def _xywh(boxes: Tensor) -> Tensor:
    # float64 from the float values, w = x1 − x0: what a COCO json of these boxes holds
    xyxy = boxes.double()
    return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)


def _coco_box_iou(det: Tensor, gt: Tensor, crowd: Tensor) -> Tensor:
    """pycocotools' ``bbIou`` on xywh float64 boxes (..., D, 4) × (..., G, 4) → (..., D, G), operation for
    operation (so bit for bit): a crowd object's union is the detection's own area."""
    dx, dy, dw, dh = (c[..., :, None] for c in det.unbind(-1))
    gx, gy, gw, gh = (c[..., None, :] for c in gt.unbind(-1))
    w = torch.minimum(dw + dx, gw + gx) - torch.maximum(dx, gx)
    h = torch.minimum(dh + dy, gh + gy) - torch.maximum(dy, gy)
    inter = w * h
    det_area = dw * dh
    union = torch.where(crowd[..., None, :], det_area, det_area + gw * gh - inter)
    return torch.where((w > 0) & (h > 0), inter / union, 0.0)


def _match_pairs(iou: Tensor, det_counts: Tensor, ignore: Tensor, crowd: Tensor) -> tuple[Tensor, Tensor]:
    """COCOeval's greedy matching for many (image, class) pairs at once, every area range and IoU threshold
    together; one step per detection rank. ``iou`` (P, D, G) with detections by decreasing score (padding
    objects at −1), ``det_counts`` (P,) non-increasing, ``ignore`` (P, A, G) and ``crowd`` (P, G) of the
    objects. Returns ``matched`` and ``on_ignored`` (P, D, A, T): whether each detection took an object,
    and whether that object is an ignored one.

    pycocotools walks the objects regular-first (stable sort on the ignore flag), skips the taken non-crowd
    ones, keeps the last of the highest IoUs ≥ the threshold (its test is ``iou < best: continue``), and stops
    at the first ignored object once it holds a regular one: so a regular object wins if any qualifies,
    else an ignored one, each the last of its best in the objects' order."""
    num_pairs, num_dets, num_objects = iou.shape
    thresholds = torch.from_numpy(np.minimum(IOU_THRESHOLDS, 1 - 1e-10))[:, None]  # its min([t, 1-1e-10])
    shape = (num_pairs, ignore.shape[1], len(thresholds))
    taken = torch.zeros(*shape, num_objects, dtype=torch.bool)
    matched = torch.zeros(num_pairs, num_dets, *shape[1:], dtype=torch.bool)
    on_ignored = torch.zeros_like(matched)
    slots = torch.arange(num_objects)
    regular_object = ~ignore[:, :, None, :]
    for d in range(num_dets):
        n = int((det_counts > d).sum())  # pairs with a d-th detection: a prefix
        current = iou[:n, d, None, None, :]
        candidate = (current >= thresholds) & (~taken[:n] | crowd[:n, None, None, :])
        regular = candidate & regular_object[:n]
        has_regular = regular.any(-1)
        pool = torch.where(has_regular[..., None], regular, candidate)
        # the last of the best: argmax gives the first maximum, so search the objects in reverse
        best = num_objects - 1 - torch.where(pool, current, -1.0).flip(-1).argmax(-1)
        hit = pool.any(-1)
        matched[:n, d] = hit
        on_ignored[:n, d] = hit & ~has_regular
        taken[:n] |= (slots == best[..., None]) & hit[..., None]
    return matched, on_ignored


def _by_group_then_score(groups: Tensor, scores: Tensor) -> Tensor:
    """The row order by increasing group (int64 ≥ 0, < 2³¹), then decreasing score, then row."""
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # float32 would merge float64 scores
        order = torch.argsort(scores, descending=True, stable=True)
        return order[torch.argsort(groups[order], stable=True)]
    # one integer sort (several times faster than a float one): the group in the high 32 bits, below it the
    # float32 bits mapped to an order-reversing key (IEEE order: negatives by reversed magnitude)
    bits = (scores.float() + 0.0).view(torch.int32).long()  # + 0.0: −0.0 becomes 0.0, which it equals
    ascending = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    return torch.argsort((groups << 32) | ((1 << 32) - 1 - ascending), stable=True)


def coco_evaluate(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_counts: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_crowd: Tensor,
    gt_counts: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """pycocotools' ``COCOeval`` ("bbox", default parameters; ``evaluate`` + ``accumulate``) on flat CPU
    tensors: boxes xyxy, one count per image, image ids 0, 1, ... in row order; an object's area is its box
    area. Returns ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) float64, equal to its
    ``eval["precision"]`` and ``eval["recall"]`` bit for bit, for ``classes`` (K,), the labels present in
    detections or ground truth."""
    classes = torch.cat([det_labels, gt_labels]).unique()
    num_classes, num_areas, num_thresholds = len(classes), len(AREA_RANGES), len(IOU_THRESHOLDS)
    det_xywh, gt_xywh = _xywh(det_boxes), _xywh(gt_boxes)
    low = torch.tensor([lo for lo, _ in AREA_RANGES], dtype=torch.float64)
    high = torch.tensor([hi for _, hi in AREA_RANGES], dtype=torch.float64)
    det_area, gt_area = det_xywh[:, 2] * det_xywh[:, 3], gt_xywh[:, 2] * gt_xywh[:, 3]
    crowd = gt_crowd.bool()
    gt_ignore = crowd[:, None] | (gt_area[:, None] < low) | (gt_area[:, None] > high)  # (G, A)
    det_class, gt_class = torch.searchsorted(classes, det_labels), torch.searchsorted(classes, gt_labels)
    regular_objects = torch.zeros(num_classes, num_areas, dtype=torch.long).index_add_(0, gt_class, (~gt_ignore).long())

    # detections grouped by (image, class), each group by decreasing score (ties in row order), its first 100 kept
    det_key = torch.repeat_interleave(torch.arange(len(det_counts)), det_counts) * num_classes + det_class
    order = _by_group_then_score(det_key, det_scores)
    rank = torch.arange(len(order)) - _segment_starts(det_key[order])
    keep = rank < MAX_DETECTIONS[-1]
    order, rank = order[keep], rank[keep]
    det_class, det_scores, det_xywh, det_area = det_class[order], det_scores[order], det_xywh[order], det_area[order]
    gt_key = torch.repeat_interleave(torch.arange(len(gt_counts)), gt_counts) * num_classes + gt_class
    gt_order = torch.argsort(gt_key, stable=True)  # each pair's objects in row order, as COCO's index lists them

    # greedy matching in the pairs that hold both detections and objects (elsewhere nothing matches), kept as
    # the matched (detection, area, threshold) entries and whether each took an ignored object
    entries = [torch.zeros(0, 3, dtype=torch.long)]
    entry_ignored = [torch.zeros(0, dtype=torch.bool)]
    det_pairs, det_n = torch.unique_consecutive(det_key[order], return_counts=True)
    gt_pairs, gt_n = torch.unique_consecutive(gt_key[gt_order], return_counts=True)
    if len(det_pairs) and len(gt_pairs):
        det_start, gt_start = torch.cumsum(det_n, 0) - det_n, torch.cumsum(gt_n, 0) - gt_n
        at = torch.searchsorted(gt_pairs, det_pairs).clamp(max=len(gt_pairs) - 1)
        both = gt_pairs[at] == det_pairs
        det_start, det_n, at = det_start[both], det_n[both], at[both]
        gt_start, gt_n = gt_start[at], gt_n[at]
        # blocks of pairs with similar object counts (powers of two), each by decreasing detection count
        size_class = torch.ceil(torch.log2(gt_n.double())).long()
        blocks = torch.argsort(size_class * (MAX_DETECTIONS[-1] + 1) - det_n, stable=True)
        bounds = torch.cumsum(torch.bincount(size_class[blocks]), 0).tolist()
        start = 0
        for end in bounds:
            width = int(gt_n[blocks[start:end]].max()) if end > start else 0
            while start < end:
                # as many pairs as keep the matcher's (pairs, areas, thresholds, objects or detections) blocks
                # within the budget, the first pair having the most detections
                step = max(1, _MATCH_BUDGET // (num_areas * num_thresholds * (width + int(det_n[blocks[start]]))))
                pairs = blocks[start : min(start + step, end)]
                start += len(pairs)
                n_det, n_gt = det_n[pairs], gt_n[pairs]
                rows = det_start[pairs, None] + torch.arange(int(n_det[0]))
                rows = torch.where(rows < (det_start[pairs] + n_det)[:, None], rows, 0)  # padding: never read
                cols = gt_start[pairs, None] + torch.arange(width)
                real = cols < (gt_start[pairs] + n_gt)[:, None]
                objects = gt_order[torch.where(real, cols, 0)]
                iou = _coco_box_iou(det_xywh[rows], gt_xywh[objects], crowd[objects])
                iou.masked_fill_(~real[:, None, :], -1.0)
                matched, on_ignored = _match_pairs(
                    iou, n_det, gt_ignore[objects].transpose(1, 2), crowd[objects] & real
                )
                p, d, a, t = torch.nonzero(matched, as_tuple=True)
                entries.append(torch.stack([rows[p, d], a, t], 1))
                entry_ignored.append(on_ignored[p, d, a, t])
    det, area, threshold = torch.cat(entries).unbind(1)
    entry_ignored = torch.cat(entry_ignored)

    # accumulate: each class's detections over all images by decreasing score (ties: image, then rank). Only
    # matched detections need per-threshold work: precision rises only at a true positive and recall moves
    # only there, so the envelope at each recall threshold (the best precision at any recall ≥ it) is the
    # best over true positives, and a false positive count is what the other rows leave (below)
    by_score = _by_group_then_score(det_class, det_scores)
    position = torch.empty_like(by_score)
    position[by_score] = torch.arange(len(by_score))
    # the entries by (area, threshold, score order): by class within each (area, threshold)
    sorted_entries = torch.argsort((area * num_thresholds + threshold) * len(by_score) + position[det])
    det, area, threshold = det[sorted_entries], area[sorted_entries], threshold[sorted_entries]
    entry_ignored = entry_ignored[sorted_entries]
    det_outside = (det_area[:, None] < low) | (det_area[:, None] > high)  # (D, A): ignored unless matched
    num_recalls, num_limits = len(RECALL_THRESHOLDS), len(MAX_DETECTIONS)
    precision = torch.empty(num_thresholds, num_recalls, num_classes, num_areas, num_limits, dtype=torch.float64)
    recall = torch.empty(num_thresholds, num_classes, num_areas, num_limits, dtype=torch.float64)
    recall_thresholds = torch.from_numpy(RECALL_THRESHOLDS)
    objects = regular_objects.clamp(min=1).double()  # (K, A); classes without any are set to −1 below
    done = {}
    for m, max_dets in reversed(list(enumerate(MAX_DETECTIONS))):
        within = rank < max_dets
        count = int(within.sum())
        if count in done:  # no pair has more detections than this: the same detections as the larger limit
            precision[..., m], recall[..., m] = precision[..., done[count]], recall[..., done[count]]
            continue
        done[count] = m
        rows = by_score[within[by_score]]
        cls = det_class[rows]
        per_class = torch.bincount(cls, minlength=num_classes)
        begin = torch.cumsum(per_class, 0) - per_class
        row_of = torch.full((len(by_score),), -1, dtype=torch.long)
        row_of[rows] = torch.arange(len(rows))
        seen = torch.arange(1, len(rows) + 1) - begin[cls]  # the class's rows so far, this one included
        outside = det_outside[rows]
        outside_seen = torch.cumsum(outside, 0)
        outside_seen -= torch.cat([outside_seen.new_zeros(1, num_areas), outside_seen])[begin][cls]
        r = row_of[det]
        use = r >= 0
        r, a, t, ignored = r[use], area[use], threshold[use], entry_ignored[use]
        group = (a * num_thresholds + t) * num_classes + cls[r]
        base = _segment_starts(group)

        def running(x: Tensor) -> Tensor:  # inclusive running sum within each group
            total = torch.cumsum(x, 0)
            return total - (total - x)[base]

        hits = running((~ignored).long())
        # ignored rows so far: the unmatched outside the area range plus the matched on ignored objects, i.e.
        # every row outside the range, corrected by (on ignored − outside) at each matched row
        ignored_seen = outside_seen[r, a] + running(ignored.long() - outside[r, a].long())
        tp = ~ignored
        hits, a, group, r = hits[tp], a[tp], group[tp], r[tp]
        false_pos = seen[r] - ignored_seen[tp] - hits
        rc = hits.double() / objects[cls[r], a]
        pr = hits.double() / ((false_pos + hits).double() + np.spacing(1))
        level = torch.searchsorted(recall_thresholds, rc, right=True) - 1  # the last recall threshold reached
        table = torch.zeros(num_areas * num_thresholds * num_classes * num_recalls, dtype=torch.float64)
        table.scatter_reduce_(0, group * num_recalls + level, pr, "amax")
        table = table.view(num_areas, num_thresholds, num_classes, num_recalls).flip(-1).cummax(-1).values.flip(-1)
        precision[..., m] = table.permute(1, 3, 2, 0)
        found = torch.bincount(group, minlength=num_areas * num_thresholds * num_classes)
        recall[..., m] = (found.view(num_areas, num_thresholds, num_classes) / objects.T[:, None]).permute(1, 2, 0)
    absent = (regular_objects == 0)[:, :, None]  # (K, A, 1): no object to recall, COCOeval's −1
    precision.masked_fill_(absent, -1.0)
    recall.masked_fill_(absent, -1.0)
    return precision, recall, classes


def coco_summary(precision: Tensor | np.ndarray, recall: Tensor | np.ndarray) -> Tensor:
    """The 12 numbers of COCOeval's ``summarize`` (AP, AP50, AP75, AP S/M/L, AR 1/10/100, AR S/M/L) from
    its precision and recall arrays, with its numpy means (pairwise sums) so they match to the bit."""
    precision, recall = np.asarray(precision), np.asarray(recall)

    def mean(ap: bool, iou: float | None = None, area: str = "all", max_dets: int = 100) -> float:
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        a, m = [AREA_LABELS.index(area)], [MAX_DETECTIONS.index(max_dets)]
        s = s[:, :, :, a, m] if ap else s[:, :, a, m]
        return -1.0 if not (s > -1).any() else float(np.mean(s[s > -1]))

    stats = [
        mean(True),
        mean(True, 0.5),
        mean(True, 0.75),
        *(mean(True, area=a) for a in AREA_LABELS[1:]),
        *(mean(False, max_dets=m) for m in MAX_DETECTIONS),
        *(mean(False, area=a) for a in AREA_LABELS[1:]),
    ]
    return torch.tensor(stats, dtype=torch.float64)


class COCOAveragePrecision(Metric):
    """The COCO AP suite over flat tensor states: by default ``coco_evaluate`` (pycocotools' numbers from
    whole-tensor operations), or a ``COCOeval`` run of faster_coco_eval or pycocotools on COCO dicts built
    from the states (``backend=``). Boxes xyxy, area = box area, as torchmetrics' ``MeanAveragePrecision``.

    Per-class AP is read from the one evaluation's precision array instead of re-evaluating each class: that
    took 20× pycocotools' own time on a COCO-sized set."""

    full_state_update = False
    STATES = {
        "det_boxes": (torch.float32, 4),
        "det_scores": (torch.float32, 0),
        "det_labels": (torch.long, 0),
        "det_counts": (torch.long, 0),
        "gt_boxes": (torch.float32, 4),
        "gt_labels": (torch.long, 0),
        "gt_crowd": (torch.long, 0),
        "gt_counts": (torch.long, 0),
    }

    def __init__(self, backend: str | None = None) -> None:
        # no torchmetrics sync: DetectionMetrics gathers both metrics' states in one collective
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        backend = backend or COCO_BACKENDS[0]
        if backend not in COCO_BACKENDS:
            raise ValueError(f"COCO backend {backend!r}: one of {COCO_BACKENDS}")
        self.backend = backend
        for name in self.STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if not len(preds):
            return
        boxes, scores, labels, det_counts = _flatten(preds, ("boxes", "scores", "labels"))
        targets = [t if "iscrowd" in t else {**t, "iscrowd": torch.zeros_like(t["labels"])} for t in targets]
        gt_boxes, gt_labels, crowd, gt_counts = _flatten(targets, ("boxes", "labels", "iscrowd"))
        for name, value in zip(self.STATES, (boxes, scores, labels, det_counts, gt_boxes, gt_labels, crowd, gt_counts)):
            getattr(self, name).append(value)

    def flat_state(self) -> dict[str, Tensor]:
        """The states as one CPU tensor each (what ``evaluate`` takes; concatenate several to merge)."""
        return {name: _cat(getattr(self, name), dtype, width).cpu() for name, (dtype, width) in self.STATES.items()}

    def compute(self) -> dict[str, Tensor]:
        return self.evaluate(self.flat_state())

    def evaluate(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``stats`` (COCOeval's 12), ``classes``, ``map_per_class``, and ``precision`` (T, R, K, A, M) /
        ``recall`` (T, K, A, M) as COCOeval's arrays over ``classes``."""
        classes = torch.cat([state["det_labels"], state["gt_labels"]]).unique()
        if len(state["det_counts"]) == 0:
            return {
                "stats": torch.full((12,), -1.0, dtype=torch.float64),
                "classes": classes,
                "map_per_class": torch.full((len(classes),), -1.0),
                "precision": torch.full((10, 101, len(classes), 4, 3), -1.0, dtype=torch.float64),
                "recall": torch.full((10, len(classes), 4, 3), -1.0, dtype=torch.float64),
            }
        if self.backend == "tensors":
            precision, recall, classes = coco_evaluate(*(state[name] for name in self.STATES))
            stats = coco_summary(precision, recall)
        else:
            precision, recall, stats = _cocoeval(state, classes, self.backend)
        # per class as COCOeval's summary restricted to one category: AP over IoUs and recalls, all areas, 100 dets
        p = precision[:, :, :, 0, -1]  # (T, R, K)
        valid = p > -1
        per_class = torch.where(valid, p, 0).sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)
        per_class = per_class.masked_fill(~valid.any(0).any(0), -1.0)
        return {
            "stats": stats,
            "classes": classes,
            "map_per_class": per_class,
            "precision": precision,
            "recall": recall,
        }


def _cocoeval(state: dict[str, Tensor], classes: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """A ``COCOeval`` run of ``backend`` on COCO dicts of the flat states: precision, recall, stats."""
    det_counts, gt_counts = state["det_counts"], state["gt_counts"]
    images = [{"id": i} for i in range(len(det_counts))]
    categories = [{"id": c} for c in classes.tolist()]

    def columns(boxes: Tensor, counts: Tensor) -> tuple[list, list, list]:
        xywh = _xywh(boxes)
        image = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return image.tolist(), xywh.tolist(), (xywh[:, 2] * xywh[:, 3]).tolist()

    # dict literals in one comprehension: the Python side of building ~10⁶ annotations dominates here
    image, bbox, area = columns(state["gt_boxes"], gt_counts)
    gt_annotations = [
        {"id": i, "image_id": m, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
        for i, m, c, b, a, z in zip(
            range(1, len(image) + 1), image, state["gt_labels"].tolist(), bbox, area, state["gt_crowd"].tolist()
        )
    ]
    image, bbox, area = columns(state["det_boxes"], det_counts)
    det_annotations = [
        {"id": i, "image_id": m, "category_id": c, "bbox": b, "area": a, "score": s, "iscrowd": 0}
        for i, m, c, b, a, s in zip(
            range(1, len(image) + 1), image, state["det_labels"].tolist(), bbox, area, state["det_scores"].tolist()
        )
    ]
    COCO, COCOeval = _coco_tools(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "categories": categories, "annotations": gt_annotations}
        dt.dataset = {"images": images, "categories": categories, "annotations": det_annotations}
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return (
        torch.as_tensor(evaluator.eval["precision"]),
        torch.as_tensor(evaluator.eval["recall"]),
        torch.as_tensor(evaluator.stats[:12], dtype=torch.float64),
    )


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to one inside. The ops are small (a batch; at most ~10⁶ elements), and on a
    busy CPU (loader workers; under DDP every rank computes at once) each parallel op waits for a descheduled
    thread. 5k-image bench, 2-core machine, 2 threads → 1: loaded, update 11.8 → 0.43 s, compute 5.3 → 0.9 s;
    idle, update 0.43 → 0.46 s, compute 0.64 → 1.05 s."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DetectionMetrics:
    """COCO suite + VOC AP, keyed ``{prefix}/map``, ``{prefix}/map_50``, ..., ``{prefix}/voc07_map_50``,
    ``{prefix}/voc_map_50`` and, with ``class_metrics``, per-class COCO AP as ``{prefix}/ap/<class name>``.

    Under ``torch.distributed`` each process updates with its own images and ``compute`` gathers all states
    of both metrics in one ``all_gather_object``, so every process returns the numbers of the whole set.
    After ``compute``, ``pr_curves`` holds class name → (recall (101,), precision (101,)): COCOeval's curve at
    IoU 0.5, all areas, 100 detections, for the classes with objects (kept through ``reset``), and
    ``f1_score_thresh`` the score threshold of the best F1 averaged over classes (``{prefix}/best_f1``: that F1)."""

    def __init__(self, class_names: Sequence[str], class_metrics: bool = True, backend: str | None = None) -> None:
        self.class_names = list(class_names)
        self.class_metrics = class_metrics
        self.coco = COCOAveragePrecision(backend)
        self.voc = VOCAveragePrecision(len(self.class_names))
        self.pr_curves: dict[str, tuple[Tensor, Tensor]] = {}
        self.f1_score_thresh: float | None = None  # after compute: the score threshold of the best mean F1

    def to(self, device: torch.device) -> DetectionMetrics:
        self.coco.to(device)
        self.voc.to(device)
        return self

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        with _one_thread():
            self.coco.update(preds, targets)
            self.voc.update(preds, targets)

    def _gathered_states(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        coco, voc = self.coco.flat_state(), self.voc.flat_state()
        world = _world_size()
        if world > 1:
            # one collective for everything (torchmetrics would sync state by state, tensor by tensor); CPU
            # tensors, as a pickled CUDA tensor would unpickle onto the sender's device
            states = [None] * world
            torch.distributed.all_gather_object(states, {"coco": coco, "voc": {k: v.cpu() for k, v in voc.items()}})
            coco = {k: torch.cat([s["coco"][k] for s in states]) for k in coco}
            voc = {
                k: (sum if k == "num_gt" else torch.cat)([s["voc"][k] for s in states]).to(self.voc.device) for k in voc
            }
        return coco, voc

    def compute(self, prefix: str) -> dict[str, float]:
        coco_state, voc_state = self._gathered_states()
        with _one_thread():
            coco = self.coco.evaluate(coco_state)
            voc = self.voc.evaluate(voc_state)
        out = {f"{prefix}/{k}": float(v) for k, v in zip(COCO_KEYS, coco["stats"].tolist())}
        out[f"{prefix}/voc07_map_50"] = float(voc["voc07_map_50"])
        out[f"{prefix}/voc_map_50"] = float(voc["voc_map_50"])
        self.f1_score_thresh, out[f"{prefix}/best_f1"] = best_f1_threshold(voc_state)
        out[f"{prefix}/f1_score_thresh"] = self.f1_score_thresh
        classes = coco["classes"].tolist()
        if self.class_metrics:
            for cls, ap in zip(classes, coco["map_per_class"].tolist()):
                if 0 <= cls < len(self.class_names):
                    out[f"{prefix}/ap/{self.class_names[cls]}"] = float(ap)
        recall = torch.from_numpy(RECALL_THRESHOLDS).float()
        curves = coco["precision"][0, :, :, 0, -1].float()  # IoU 0.5, all areas, 100 detections: (R, K)
        self.pr_curves = {
            self.class_names[cls]: (recall.clone(), curves[:, k].clone())
            for k, cls in enumerate(classes)
            if 0 <= cls < len(self.class_names) and bool((curves[:, k] >= 0).all())
        }
        return out

    def reset(self) -> None:
        self.coco.reset()
        self.voc.reset()
