"""YOLOv1's training augmentation (Redmon et al. 2016, §2.2): random scaling and translation up to 20 % of the
image size, exposure and saturation up to a factor 1.5 in HSV (``RandomHSVScale``), flip. ``YOLOAugmentation``
runs it in one pass; ``YOLOAugmentation.plain`` is its ``v2`` twin. Validation: ``ResizeTo``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .pipeline import FLIP_PROBABILITY, BoxPipeline, canvas_fill, drop_small_boxes, input_size


def scale_saturation_value(image: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Multiply S and V of HSV by per-image factors (shapes broadcastable to (..., 1, 1, 1)), clamped to [0, 1],
    hue unchanged; uint8 RGB in and out. In HSV each channel is c = V·(1 − S·f_c) with f_c = (max − c) ÷
    (max − min) fixed by the hue, so the new channels are V'·(1 − S'·f_c): no round trip through hue."""
    rgb = image.float()
    hi, lo = rgb.amax(dim=-3, keepdim=True), rgb.amin(dim=-3, keepdim=True)
    chroma = hi - lo
    f = (hi - rgb) / chroma.clamp(min=1e-6)  # 0 for grey pixels, where chroma is 0
    s = (chroma / hi.clamp(min=1e-6) * saturation).clamp(max=1)
    v = (hi * value).clamp(max=255)
    return (v * (1 - s * f)).round_().clamp_(0, 255).to(torch.uint8)


class RandomHSVScale(v2.Transform):
    """YOLOv1 §2.2: "randomly adjust the exposure and saturation of the image by up to a factor of 1.5 in the HSV
    color space". Each factor is drawn uniformly in [1, max] and inverted with p=0.5, so it lies in [1/max, max]
    (Darknet's ``random_distort_image``). Images only; boxes pass through."""

    def __init__(self, saturation: float = 1.5, exposure: float = 1.5) -> None:
        super().__init__()
        for key, v in (("saturation", saturation), ("exposure", exposure)):
            if v < 1:
                raise ValueError(f"data.train_transform.{key}={v}: must be ≥ 1 (the factor lies in [1/{key}, {key}])")
        self.saturation, self.exposure = float(saturation), float(exposure)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def factor(limit: float) -> float:
            f = 1 + (limit - 1) * float(torch.rand(()))
            return f if torch.rand(()) < 0.5 else 1 / f

        return {"saturation": factor(self.saturation), "value": factor(self.exposure)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image) and type(inpt) is not Tensor:
            return inpt
        out = scale_saturation_value(
            inpt.as_subclass(Tensor), torch.tensor(params["saturation"]), torch.tensor(params["value"])
        )
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def scale_saturation_value_hwc(x: np.ndarray, saturation: float, value: float) -> np.ndarray:
    """``scale_saturation_value`` on uint8 (H, W, 3) through OpenCV's float32 HSV, 6× faster at 448² on one core:
    the same real numbers, rounded in another order, so within 1 level of it."""
    hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees, S in [0, 1], V in [0, 255]
    cv2.multiply(hsv, (1.0, saturation, value, 0.0), dst=hsv)
    cv2.min(hsv, (360.0, 1.0, 255.0, 0.0), dst=hsv)
    return cv2.convertScaleAbs(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))  # rounded half to even, saturated to uint8


class YOLOAugmentation(BoxPipeline):
    """YOLOv1's training augmentation (§2.2); each step can be switched off.

    jitter: ``v2.RandomAffine`` scaling by a factor in [1 − scale, 1 + scale] and translating by up to
    ``translate`` of the image's side, the uncovered canvas filled with ``mean`` (in [0, 1], like
    model.pixel_mean). hsv: ``RandomHSVScale`` (exposure and saturation up to ×``exposure``/``saturation``).
    flip: horizontal, p=0.5 (not in the paper's text; Darknet's YOLOv1 loader flips). size: the network input
    (int or (h, w)); ``None`` keeps the size. Last, boxes under 1 px in width or height are dropped.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = 448,
        jitter: bool = True,
        hsv: bool = True,
        flip: bool = True,
        scale: float = 0.2,
        translate: float = 0.2,
        exposure: float = 1.5,
        saturation: float = 1.5,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.size = None if size is None else input_size(size, "data.train_transform.size")
        if not 0 <= scale < 1:
            raise ValueError(f"data.train_transform.scale={scale}: must be in [0, 1) (factor 1 ± scale)")
        if not 0 <= translate <= 1:
            raise ValueError(f"data.train_transform.translate={translate}: must be in [0, 1] (fraction of the side)")
        self.fill = canvas_fill(mean, "data.train_transform.mean")
        self.jitter, self.hsv, self.flip = jitter, hsv, flip
        self.scale, self.translate = float(scale), float(translate)
        # the steps' random draws, which __call__ makes through these same objects
        self.affine = (
            v2.RandomAffine(
                degrees=0,
                translate=(translate, translate),
                scale=(1 - scale, 1 + scale),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=self.fill,
            )
            if jitter
            else None
        )
        self.hsv_scale = RandomHSVScale(saturation, exposure) if hsv else None
        self.compose([t for t in (self.affine, self.hsv_scale) if t is not None], flip, self.size)
        self.size_settings = ("size",) if self.size else ()  # the arguments that set max_output_size

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The pipeline in one pass, 5× faster than ``plain`` (its twin, the ``v2`` pipeline) on one core: the same
        random draws in the same order, the jitter and the resize as one resize of the whole image pasted at its
        offset (a scale and a shift need no warp), the HSV scaling in OpenCV's float HSV on the network input.
        Boxes move with the pixels as in ``plain`` up to the paste's whole-pixel offset (≤ 1 px of the input)."""
        if image.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__} expects uint8 images (the model normalises), got {image.dtype}")
        h, w = image.shape[-2:]
        out_h, out_w = self.size or (h, w)
        scale, tx, ty = 1.0, 0, 0
        if self.affine is not None:  # v2.RandomAffine's own draws: angle (0), translation in source pixels, scale
            affine = self.affine.make_params([tv_tensors.Image(image)])
            scale, (tx, ty) = affine["scale"], affine["translate"]
        hsv = self.hsv_scale.make_params([]) if self.hsv_scale is not None else None
        flip = self.flip and not bool(torch.rand(1) >= FLIP_PROBABILITY)  # RandomHorizontalFlip's draw
        # a source point x (continuous pixels) lands at (w/2 + tx + scale·(x − w/2))·out_w/w: resize, then shift
        new_h, new_w = max(1, round(h * scale * out_h / h)), max(1, round(w * scale * out_w / w))
        top = round((h / 2 + ty - scale * h / 2) * out_h / h)
        left = round((w / 2 + tx - scale * w / 2) * out_w / w)
        resized = F.resize(image, [new_h, new_w], antialias=True) if (new_h, new_w) != (h, w) else image
        if (top, left, new_h, new_w) == (0, 0, out_h, out_w):
            canvas = resized
        else:
            canvas = torch.tensor(self.fill, dtype=torch.uint8)[:, None, None].expand(3, out_h, out_w).clone()
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + new_h, out_h), min(left + new_w, out_w)
            if y1 > y0 and x1 > x0:
                canvas[:, y0:y1, x0:x1] = resized[:, y0 - top : y1 - top, x0 - left : x1 - left]
        if hsv is not None:
            hwc = canvas.permute(1, 2, 0).contiguous().numpy()
            out = scale_saturation_value_hwc(hwc, hsv["saturation"], hsv["value"])
            canvas = torch.from_numpy(out).permute(2, 0, 1)
        boxes = target["boxes"].to(torch.float32, copy=True)
        boxes[:, 0::2] = boxes[:, 0::2] * (new_w / w) + left
        boxes[:, 1::2] = boxes[:, 1::2] * (new_h / h) + top
        if flip:
            canvas = canvas.flip(-1)
            boxes[:, 0::2] = out_w - boxes[:, [2, 0]]
        return canvas.contiguous(), drop_small_boxes({**target, "boxes": boxes}, (out_h, out_w))

    def plain(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``v2`` pipeline step by step (RandomAffine → RandomHSVScale → flip → Resize): ``__call__``'s twin."""
        return BoxPipeline.__call__(self, image, target)

    def max_output_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (h, w) it makes from any image: ``size``; ``None`` with ``size=None``, where the output is the image's
        own size (the jitter keeps the canvas), so the data set bounds it, not the transform."""
        return self.size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, jitter={self.jitter}, hsv={self.hsv}, flip={self.flip}, "
            f"scale={self.scale}, translate={self.translate}, fill={self.fill})"
        )
