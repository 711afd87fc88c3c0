"""One-stage detectors (RetinaNet, SSD, YOLOv1) as compositions of plain parts (docs/ARCHITECTURE.md).

``DenseDetector`` wires a paper's parts into one ``nn.Module``; the parts' contracts are in ``protocols``. Nothing
here imports Lightning: ``engine.detection_module.DetectionModule`` wraps the network for training.
"""

from .detector import DenseDetector

__all__ = ["DenseDetector"]
