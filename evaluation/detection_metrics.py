"""The validation metrics as one object, ``DetectionMetrics``: the COCO suite (coco.py) and VOC AP (voc.py) under
the metric names of docs/ARCHITECTURE.md §1, their states gathered across processes in one collective, the
per-class precision-recall curves, and the F1-best score threshold (from the VOC matching)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .coco import RECALL_THRESHOLDS, COCOAveragePrecision
from .voc import VOCAveragePrecision

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


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
    ``f1_score_thresh`` the score threshold of the best F1 averaged over classes (``{prefix}/best_f1``: that F1).

    Args:
        class_names: the K class names; labels are positions in this list.
        class_metrics: per-class COCO AP in ``compute``'s result.
        backend: the COCO suite's (``COCOAveragePrecision``).

    Example:
        >>> metrics = DetectionMetrics(["cell"])
        >>> boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
        >>> metrics.update(
        ...     [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}],
        ...     [{"boxes": boxes, "labels": torch.tensor([0])}],
        ... )
        >>> out = metrics.compute("val")
        >>> [round(out[key], 6) for key in ("val/map", "val/voc_map_50", "val/ap/cell")]
        [1.0, 1.0, 1.0]
    """

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
