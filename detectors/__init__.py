"""One-stage detectors (RetinaNet, SSD, YOLOv1) as compositions of plain parts (docs/ARCHITECTURE.md).

``detectors.Detector`` (the LightningModule) is imported on first use, so that importing a part
(``detectors.boxes``, ``detectors.retinanet``) loads neither Lightning nor the metrics it brings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .detector import Detector


def __getattr__(name: str):
    if name == "Detector":
        from .detector import Detector

        return Detector
    raise AttributeError(f"module 'detectors' has no attribute {name!r}")


__all__ = ["Detector"]
