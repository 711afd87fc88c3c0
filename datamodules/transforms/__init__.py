"""Sample transforms, by paper as ``detectors/`` is: each paper's training augmentation in its module (``ssd``,
``yolo``, ``retinanet``), what they share in ``pipeline`` (``BoxPipeline``, the box bookkeeping) and ``resize``
(``ResizeTo``, the validation resize; ``Preprocess``, for the tools).

A transform is a callable ``(image uint8 (3, h, w), target) -> (image uint8 (3, H, W), target)``; the target
dict holds ``boxes`` (n, 4) float xyxy in absolute pixels, ``labels`` (n,) long, ``image_id`` and optionally
``difficult`` (n,) bool / ``iscrowd`` (n,) long, which are filtered together with the boxes (PER_OBJECT_FIELDS).
Images stay uint8: the detector normalises on the device (docs/ARCHITECTURE.md §2). A transform that resizes
declares the largest image it makes from an (h, w) image, ``max_output_size((h, w))``, and the arguments that set
it, ``size_settings``: the memory check (engine/memory.py) probes at that size and names those settings.

Randomness comes from torch's global generator, as in torchvision's own transforms; in training each sample is
made with that generator seeded from (seed, epoch, index) (``datamodules/sampling.py``), so its augmentation is the
same in any worker, after any resume.

The configs name the transforms by this package (``_target_: datamodules.transforms.SSDAugmentation``), as do the
checkpoints' recorded configs, which the tools rebuild their validation transform from.
"""

from .resize import Preprocess, ResizeTo
from .retinanet import ShortSideAugmentation, ShortSideResize
from .ssd import CaffePhotometricDistort, MinIoURandomCrop, PhotometricDistort, SSDAugmentation
from .yolo import RandomHSVScale, YOLOAugmentation

__all__ = [
    "CaffePhotometricDistort",
    "MinIoURandomCrop",
    "PhotometricDistort",
    "Preprocess",
    "RandomHSVScale",
    "ResizeTo",
    "SSDAugmentation",
    "ShortSideAugmentation",
    "ShortSideResize",
    "YOLOAugmentation",
]
