"""The COCO AP suite (``val/map``, ``val/map_50``, ... of docs/ARCHITECTURE.md §1): our tensor implementation of
pycocotools' ``COCOeval`` in its two stages (``coco_match_images``: ``evaluate``/``evaluateImg``;
``coco_accumulate``: ``accumulate``) and its ``summarize`` (``coco_summary``), or a ``COCOeval`` run of
faster_coco_eval or pycocotools, over the flat states of flat_states.py."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_convert

from .flat_states import cat_or_empty, flatten_images

logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it prints the whole COCO table each epoch


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
    return box_convert(boxes.double(), "xyxy", "xywh")


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


@dataclass
class COCOMatches:
    """What the match stage (``coco_match_images``) hands the accumulate stage (``coco_accumulate``), as COCOeval's
    ``evalImgs`` does between its ``evaluate`` and ``accumulate``: the detections kept (each (image, class) pair's
    first 100 by decreasing score, pairs in (image, class) order) and the matched (detection, area range, IoU
    threshold) entries. K classes, A area ranges, D kept detections, E entries.

    Args:
        classes: (K,) the labels present in detections or ground truth, increasing.
        det_rows: (D,) each kept detection's row in the flat input.
        det_class: (D,) its class, an index into ``classes``.
        det_scores: (D,) its score.
        det_rank: (D,) its rank in its pair (0: the highest score).
        det_outside: (D, A) whether its area is outside each range (COCOeval ignores it there unless matched).
        regular_objects: (K, A) how many of each class's objects count in each range (not crowd, area inside).
        match_det: (E,) the matched detection, an index into the kept detections.
        match_area, match_threshold: (E,) the area range and IoU threshold of the match.
        match_on_ignored: (E,) whether the object taken is an ignored one (COCOeval's ``dtIgnore`` of a match).

    Example:
        >>> boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
        >>> one, label = torch.tensor([1]), torch.tensor([0])
        >>> matches = coco_match_images(boxes, torch.tensor([0.9]), label, one, boxes, label, label, one)
        >>> # matched in the 4 area ranges at the 10 IoU thresholds; the 40×40 object is outside "small" and "large",
        >>> # an ignored object there
        >>> len(matches.match_det), int(matches.match_on_ignored.sum())
        (40, 20)
    """

    classes: Tensor
    det_rows: Tensor
    det_class: Tensor
    det_scores: Tensor
    det_rank: Tensor
    det_outside: Tensor
    regular_objects: Tensor
    match_det: Tensor
    match_area: Tensor
    match_threshold: Tensor
    match_on_ignored: Tensor


def coco_match_images(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_counts: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_crowd: Tensor,
    gt_counts: Tensor,
) -> COCOMatches:
    """The match stage: pycocotools' ``COCOeval.evaluate`` ("bbox", default parameters), i.e. its ``evaluateImg``
    for every image, class and area range at every IoU threshold, on flat CPU tensors: boxes xyxy, one count per
    image, image ids 0, 1, ... in row order; an object's area is its box area. Each (image, class) pair's
    detections are ranked by decreasing score (ties in row order), the first 100 kept, and matched greedily to
    the pair's objects (``_match_pairs``)."""
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
    return COCOMatches(
        classes=classes,
        det_rows=order,
        det_class=det_class,
        det_scores=det_scores,
        det_rank=rank,
        det_outside=(det_area[:, None] < low) | (det_area[:, None] > high),
        regular_objects=regular_objects,
        match_det=det,
        match_area=area,
        match_threshold=threshold,
        match_on_ignored=torch.cat(entry_ignored),
    )


def coco_accumulate(matches: COCOMatches) -> tuple[Tensor, Tensor]:
    """The accumulate stage: pycocotools' ``COCOeval.accumulate`` (default parameters) on the match stage's
    entries. Returns ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) float64, equal to its
    ``eval["precision"]`` and ``eval["recall"]`` bit for bit, over ``matches.classes``.

    Each class's detections over all images by decreasing score (ties: image, then rank). Only matched detections
    need per-threshold work: precision rises only at a true positive and recall moves only there, so the envelope
    at each recall threshold (the best precision at any recall ≥ it) is the best over true positives, and a false
    positive count is what the other rows leave (below)."""
    det_class, det_scores, rank = matches.det_class, matches.det_scores, matches.det_rank
    det_outside, regular_objects = matches.det_outside, matches.regular_objects
    det, area, threshold = matches.match_det, matches.match_area, matches.match_threshold
    entry_ignored = matches.match_on_ignored
    num_classes, num_areas, num_thresholds = len(matches.classes), len(AREA_RANGES), len(IOU_THRESHOLDS)
    by_score = _by_group_then_score(det_class, det_scores)
    position = torch.empty_like(by_score)
    position[by_score] = torch.arange(len(by_score))
    # the entries by (area, threshold, score order): by class within each (area, threshold)
    sorted_entries = torch.argsort((area * num_thresholds + threshold) * len(by_score) + position[det])
    det, area, threshold = det[sorted_entries], area[sorted_entries], threshold[sorted_entries]
    entry_ignored = entry_ignored[sorted_entries]
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
    return precision, recall


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
    matches = coco_match_images(det_boxes, det_scores, det_labels, det_counts, gt_boxes, gt_labels, gt_crowd, gt_counts)
    precision, recall = coco_accumulate(matches)
    return precision, recall, matches.classes


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
    took 20× pycocotools' own time on a COCO-sized set.

    Args:
        backend: one of ``COCO_BACKENDS``; None: the first, "tensors".

    Example:
        >>> metric = COCOAveragePrecision()
        >>> boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
        >>> metric.update(
        ...     [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}],
        ...     [{"boxes": boxes, "labels": torch.tensor([0])}],
        ... )
        >>> [round(ap, 6) for ap in metric.compute()["stats"][:3].tolist()]  # AP, AP50, AP75
        [1.0, 1.0, 1.0]
    """

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
        boxes, scores, labels, det_counts = flatten_images(preds, ("boxes", "scores", "labels"))
        targets = [t if "iscrowd" in t else {**t, "iscrowd": torch.zeros_like(t["labels"])} for t in targets]
        gt_boxes, gt_labels, crowd, gt_counts = flatten_images(targets, ("boxes", "labels", "iscrowd"))
        for name, value in zip(self.STATES, (boxes, scores, labels, det_counts, gt_boxes, gt_labels, crowd, gt_counts)):
            getattr(self, name).append(value)

    def flat_state(self) -> dict[str, Tensor]:
        """The states as one CPU tensor each (what ``evaluate`` takes; concatenate several to merge)."""
        return {
            name: cat_or_empty(getattr(self, name), dtype, width).cpu() for name, (dtype, width) in self.STATES.items()
        }

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
