"""One-stage detectors (RetinaNet; SSD and YOLOv1 to come) as compositions of plain parts."""

from omegaconf import OmegaConf

from .detector import Detector

# ${len:${data.classes}} in configs: the number of classes follows the data set's class list
if not OmegaConf.has_resolver("len"):
    OmegaConf.register_new_resolver("len", lambda x: len(x))

__all__ = ["Detector"]
