"""RetinaNet's transforms (Lin et al. 2017, §4.1, §5.1): shorter side 800 (or jittered for training), longer
side ≤ 1333, aspect ratio kept; flip for training (``ShortSideAugmentation``), the resize alone for validation
(``ShortSideResize``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.transforms import v2

from .pipeline import BoxPipeline
from .resize import resize_sample


def short_side_size(h: int, w: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) scaled so the shorter side is ``min_size`` unless the longer would pass ``max_size`` (then the longer
    is ``max_size``); truncated to whole pixels as ``v2.RandomShortestSize`` does, so training and validation agree."""
    r = min_size / min(h, w)
    if max_size is not None:
        r = min(r, max_size / max(h, w))
    return max(1, int(h * r)), max(1, int(w * r))


class ShortSideResize:
    """Validation/test for RetinaNet (§4: "resized such that their scale (shorter edge) is 800 pixels", Detectron's
    1333 cap on the longer side): the aspect ratio is kept; sets ``target["scale"]`` like ``ResizeTo``."""

    def __init__(self, min_size: int = 800, max_size: int | None = 1333) -> None:
        if min_size < 1 or (max_size is not None and max_size < min_size):
            raise ValueError(
                f"data.val_transform: min_size={min_size}, max_size={max_size}: need 1 ≤ min_size ≤ "
                f"max_size (or max_size null)"
            )
        self.min_size, self.max_size = int(min_size), max_size
        self.size_settings = ("min_size", "max_size")  # the arguments that set max_output_size

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return resize_sample(image, target, *short_side_size(*image.shape[-2:], self.min_size, self.max_size))

    def max_output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) it makes from an image of ``image_size`` (h, w)."""
        return short_side_size(*image_size, self.min_size, self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class ShortSideAugmentation(BoxPipeline):
    """RetinaNet's training augmentation: horizontal flip (§4.1: "the only form of data augmentation") and, with
    several ``min_sizes``, scale jitter (§5.1; one shorter side drawn per image, ``v2.RandomShortestSize``), the
    longer side capped at ``max_size``; the aspect ratio is kept."""

    def __init__(self, min_sizes: Sequence[int] = (800,), max_size: int | None = 1333, flip: bool = True) -> None:
        self.min_sizes, self.max_size, self.flip = [int(m) for m in min_sizes], max_size, flip
        if not self.min_sizes or min(self.min_sizes) < 1 or (max_size is not None and max_size < max(self.min_sizes)):
            raise ValueError(
                f"data.train_transform: min_sizes={list(min_sizes)}, max_size={max_size}: need sizes "
                f"≥ 1 and ≤ max_size (or max_size null)"
            )
        self.compose([v2.RandomShortestSize(self.min_sizes, max_size, antialias=True)], flip, None)
        self.size_settings = ("min_sizes", "max_size")  # the arguments that set max_output_size

    def max_output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The largest (h, w) it makes from an image of ``image_size`` (h, w): at the largest of ``min_sizes``."""
        return short_side_size(*image_size, max(self.min_sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_sizes={self.min_sizes}, max_size={self.max_size}, flip={self.flip})"
