"""The prior boxes (anchors, default boxes, grid cells) a dense detector predicts relative to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Priors:
    """``boxes``: (N, 4) xyxy in the network-input frame, ordered level by level; ``level_sizes``: how
    many of the N belong to each feature level (for per-level inference); ``ignored``: optional (N,) bool,
    priors that take part in neither training nor inference (SSD's boundary-box ablation)."""

    boxes: Tensor
    level_sizes: list[int]
    ignored: Tensor | None = None
