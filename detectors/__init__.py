"""One-stage detectors (RetinaNet, SSD, YOLOv1) as compositions of plain parts (docs/ARCHITECTURE.md)."""

from .detector import Detector

__all__ = ["Detector"]
