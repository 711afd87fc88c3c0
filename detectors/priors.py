"""The prior boxes (anchors, default boxes, grid cells) a dense detector predicts relative to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Priors:
    """``boxes``: (N, 4) xyxy in the network-input frame, ordered level by level; ``level_sizes``: how
    many of the N belong to each feature level (for per-level inference); ``ignored``: optional (N,) bool,
    priors that take part in neither training nor inference (SSD's boundary-box ablation)."""

    boxes: Tensor
    level_sizes: list[int]
    ignored: Tensor | None = None


class PriorGenerator:
    """Base of the prior generators: priors depend only on the input and feature sizes (docs/ARCHITECTURE.md §3), so
    they are made once per (sizes, device) by ``_generate`` and cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Priors] = {}

    def __call__(
        self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
    ) -> Priors:
        key = (tuple(image_size), tuple(map(tuple, feature_sizes)), str(device))
        if key not in self._cache:
            self._cache[key] = self._generate(tuple(image_size), [tuple(f) for f in feature_sizes], device)
        return self._cache[key]

    def _generate(
        self, image_size: tuple[int, int], feature_sizes: list[tuple[int, int]], device: torch.device | str
    ) -> Priors:
        raise NotImplementedError


def flatten_predictions(x: Tensor, channels: int) -> Tensor:
    """A head's (B, A·C, H, W) map → (B, H·W·A, C), the priors' order: location-major, then prior."""
    b, _, h, w = x.shape
    return x.view(b, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, channels)
