"""SSD's training augmentation (Liu et al. 2016, §2.2 "Data augmentation" and §3.6) and its steps.

``SSDAugmentation`` runs them in the order of the original Caffe pipeline: photometric distortion
(``CaffePhotometricDistort``, or torchvision's as ``PhotometricDistort``) → zoom out (expansion) → sampled patch
(``MinIoURandomCrop``) → horizontal flip → resize to the network input → drop boxes under 1 px
(``drop_small_boxes``). Each step has a switch, for the paper's Table 2 ablation. It is built from
``torchvision.transforms.v2`` on ``tv_tensors`` except the patch sampler: torchvision's ``RandomIoUCrop`` never
crops an image without objects (each trial needs a box centre inside) and, when its trials fail, redraws another
IoU option instead of keeping the image, which skews the options' frequencies. Validation: ``ResizeTo``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .pipeline import BoxPipeline, canvas_fill, input_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # in [0, 1], like model.pixel_mean
EXPAND_PROBABILITY = 0.5  # §3.6 / Caffe's ssd_pascal.py expand_param prob
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def centres_inside(boxes: Tensor, patches: Tensor) -> Tensor:
    """(T, n): whether the centre of box j lies strictly inside patch t (the paper's rule for keeping a box)."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    return (
        (c[None, :, 0] > patches[:, None, 0])
        & (c[None, :, 0] < patches[:, None, 2])
        & (c[None, :, 1] > patches[:, None, 1])
        & (c[None, :, 1] < patches[:, None, 3])
    )


class MinIoURandomCrop(v2.Transform):
    """The paper's sampled patch (§2.2) as a ``v2.Transform``.

    Each call picks, with equal probability, one of: the whole image; a patch whose IoU with some object is at
    least one of ``min_ious``; any patch. A patch has side ``scale`` ∈ [min_scale, 1] of the image's and aspect
    ratio ``a`` ∈ ``aspect_ratio_range`` relative to the image's (width ``scale·√a·W``, height ``scale/√a·H``,
    ``a`` clamped so the patch fits: Caffe's SampleBBox), rounded to whole pixels. ``max_trials`` candidates are
    drawn at once; the first that meets the constraint wins, and if none does the image is kept whole. The object
    that meets the constraint must also have its centre in the patch (stricter than Caffe, which could accept a
    patch and then drop that very object). Boxes whose centres fall outside are zeroed, so the
    ``drop_small_boxes`` (or ``v2.SanitizeBoundingBoxes``) that must follow drops them with their labels.
    Without objects, every option but the whole image samples any patch.
    """

    def __init__(
        self,
        min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        min_scale: float = 0.1,
        aspect_ratio_range: Sequence[float] = (0.5, 2.0),
        max_trials: int = 50,
    ) -> None:
        super().__init__()
        self.min_ious = tuple(float(m) for m in min_ious)
        if not all(0 <= m <= 1 for m in self.min_ious):
            raise ValueError(f"data.train_transform.min_ious={list(min_ious)}: each must be in [0, 1]")
        if not 0 < min_scale <= 1:
            raise ValueError(f"data.train_transform.min_scale={min_scale}: must be in (0, 1] (patch side ÷ image side)")
        lo, hi = (float(a) for a in aspect_ratio_range)
        if not 0 < lo <= hi:
            raise ValueError(
                f"data.train_transform.aspect_ratio_range={list(aspect_ratio_range)}: "
                f"need 0 < low ≤ high, e.g. [0.5, 2.0]"
            )
        if max_trials < 1:
            raise ValueError(f"data.train_transform.max_trials={max_trials}: must be ≥ 1")
        self.min_scale, self.aspect_ratio_range, self.max_trials = float(min_scale), (lo, hi), int(max_trials)

    def sample_patch(self, boxes: Tensor, height: int, width: int, min_iou: float | None) -> Tensor | None:
        """A patch (4,) xyxy in whole pixels inside the (height, width) image with IoU ≥ ``min_iou`` with a box
        whose centre it contains (``None``: any patch), or ``None`` when no trial qualifies."""
        t = self.max_trials
        scale = self.min_scale + (1 - self.min_scale) * torch.rand(t)
        lo, hi = self.aspect_ratio_range
        aspect = torch.minimum(torch.maximum(lo + (hi - lo) * torch.rand(t), scale**2), 1 / scale**2)
        pw = (width * scale * aspect.sqrt()).round().clamp(1, width)
        ph = (height * scale / aspect.sqrt()).round().clamp(1, height)
        x0 = (torch.rand(t) * (width - pw + 1)).floor()  # rand < 1: x0 ≤ width − pw, the patch stays inside
        y0 = (torch.rand(t) * (height - ph + 1)).floor()
        patches = torch.stack((x0, y0, x0 + pw, y0 + ph), dim=1)
        if min_iou is None or len(boxes) == 0:
            return patches[0]
        ok = ((box_iou(patches, boxes.float()) >= min_iou) & centres_inside(boxes.float(), patches)).any(dim=1)
        first = ok.nonzero()
        return patches[first[0, 0]] if len(first) else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        boxes = v2.get_bounding_boxes(flat_inputs)
        boxes = F.convert_bounding_box_format(
            boxes.as_subclass(Tensor), old_format=boxes.format, new_format=tv_tensors.BoundingBoxFormat.XYXY
        )
        option = int(torch.randint(len(self.min_ious) + 2, ()))  # 0: whole image, last: any patch
        if option == 0:
            return {}
        min_iou = self.min_ious[option - 1] if option <= len(self.min_ious) else None
        patch = self.sample_patch(boxes, height, width, min_iou)
        if patch is None:
            return {}
        return {"patch": [int(v) for v in patch.tolist()], "keep": centres_inside(boxes, patch[None])[0]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params:
            return inpt
        x0, y0, x1, y1 = params["patch"]
        out = self._call_kernel(F.crop, inpt, top=y0, left=x0, height=y1 - y0, width=x1 - x0)
        if isinstance(out, tv_tensors.BoundingBoxes):
            out[~params["keep"]] = 0  # degenerate: dropped later with their per-object fields
        return out


class PhotometricDistort(v2.RandomPhotometricDistort):
    """SSD's photometric distortion: torchvision's ``RandomPhotometricDistort`` (same settings, same random draws
    from torch's generator) with its kernels run by OpenCV on uint8 HWC pixels, as the original Caffe SSD did.

    torchvision's tensor kernels spend ~15 ms per 500×375 image on the hue step alone (float HSV round trip);
    OpenCV's uint8 HSV conversion does it in under 1 ms. Results match torchvision's to rounding: brightness,
    contrast and saturation round where torchvision truncates (≤ 1 level), and hue moves in steps of 360°/256 on
    OpenCV's 8-bit HSV (a few levels; ``tests/datamodules/test_transforms.py`` bounds both). Anything but a uint8
    ``Image`` goes to torchvision's kernels.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not (
            isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8 and inpt.shape[-3] == 3 and inpt.ndim == 3
        ):
            return super().transform(inpt, params)
        steps = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor", "channel_permutation")
        if all(params[k] is None for k in steps):
            return inpt
        x = np.ascontiguousarray(inpt.permute(1, 2, 0).numpy())  # OpenCV works on (H, W, 3)
        if params["brightness_factor"] is not None:
            x = cv2.convertScaleAbs(x, alpha=params["brightness_factor"])  # alpha ≥ 0: abs is a no-op
        if params["contrast_factor"] is not None and params["contrast_before"]:
            x = adjust_contrast_hwc(x, params["contrast_factor"])
        if params["saturation_factor"] is not None:
            gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            factor = params["saturation_factor"]
            x = cv2.addWeighted(x, factor, gray, 1.0 - factor, 0.0)  # saturating, like torchvision's clamp
        if params["hue_factor"] is not None:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)  # hue in 0..255 for the full circle
            hue = hsv[..., 0]
            hue += np.uint8(round(params["hue_factor"] * 256) % 256)  # uint8 addition wraps around the circle
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        if params["contrast_factor"] is not None and not params["contrast_before"]:
            x = adjust_contrast_hwc(x, params["contrast_factor"])
        if params["channel_permutation"] is not None:
            x = x[..., params["channel_permutation"].numpy()]
        return tv_tensors.wrap(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous(), like=inpt)


class CaffePhotometricDistort(v2.Transform):
    """SSD's photometric distortion as the released code does it: weiliu89/caffe ``ApplyDistort``
    (src/caffe/util/im_transforms.cpp) with ssd_pascal.py's ``distort_param`` (the defaults here), on uint8 pixels
    with the same OpenCV operations. Each step applies with its probability (0.5 each), in the order brightness,
    contrast, saturation, hue or, with probability 0.5, brightness, saturation, hue, contrast:

    - brightness: x + δ, δ ∈ U(−``brightness_delta``, +``brightness_delta``) = ±32 levels, additive;
    - contrast: x·α, α ∈ U(``contrast``) = [0.5, 1.5], every channel scaled (no blend with the mean grey);
    - saturation: S·α in OpenCV's 8-bit HSV, α ∈ U(``saturation``) = [0.5, 1.5];
    - hue: H + δ in OpenCV's 8-bit HSV (H in 0..179, 2° a unit), δ ∈ U(−``hue_delta``, +``hue_delta``) = ±18
      units = ±36°; H saturates at 0 (no wrap below red), as in Caffe;
    - channel order: never reordered (``random_order_prob: 0.0``).

    Every step rounds (half to even) and saturates to 0..255, as OpenCV's ``convertTo``. torchvision's
    ``ColorJitter`` defines contrast and saturation as blends with the grey image and turns hue in float HSV, so
    it cannot reproduce these; the steps are Caffe's OpenCV calls, the draws come from torch's generator. Images
    only (uint8 ``Image`` or plain tensor, (3, H, W) RGB); boxes pass through.
    """

    def __init__(
        self,
        brightness_prob: float = 0.5,
        brightness_delta: float = 32.0,
        contrast_prob: float = 0.5,
        contrast: Sequence[float] = (0.5, 1.5),
        saturation_prob: float = 0.5,
        saturation: Sequence[float] = (0.5, 1.5),
        hue_prob: float = 0.5,
        hue_delta: float = 18.0,
    ) -> None:
        super().__init__()
        self.ranges = {
            "brightness": (float(brightness_prob), (-float(brightness_delta), float(brightness_delta))),
            "contrast": (float(contrast_prob), tuple(float(c) for c in contrast)),
            "saturation": (float(saturation_prob), tuple(float(c) for c in saturation)),
            "hue": (float(hue_prob), (-float(hue_delta), float(hue_delta))),
        }

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params: dict[str, Any] = {"contrast_last": float(torch.rand(())) < 0.5}  # Caffe: prob > 0.5 → second
        for step, (prob, (low, high)) in self.ranges.items():
            params[step] = float(torch.empty(()).uniform_(low, high)) if float(torch.rand(())) < prob else None
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image) and type(inpt) is not Tensor:
            return inpt
        if inpt.dtype != torch.uint8 or inpt.ndim != 3 or inpt.shape[-3] != 3:
            raise TypeError(
                f"CaffePhotometricDistort takes uint8 (3, H, W) images, got {inpt.dtype} {tuple(inpt.shape)}"
            )
        steps = ("brightness", "contrast", "saturation", "hue")
        if all(params[k] is None for k in steps):
            return inpt
        x = np.ascontiguousarray(inpt.permute(1, 2, 0).numpy())  # OpenCV works on (H, W, 3)
        if params["brightness"] is not None:
            x = cv2.addWeighted(x, 1.0, x, 0.0, params["brightness"])  # x + δ, rounded and saturated
        if params["contrast"] is not None and not params["contrast_last"]:
            x = cv2.convertScaleAbs(x, alpha=params["contrast"])  # x·α; α > 0, so the abs is a no-op
        if params["saturation"] is not None:
            x = _scale_hsv_channel(x, 1, params["saturation"], 0.0)
        if params["hue"]:  # Caffe skips δ = 0
            x = _scale_hsv_channel(x, 0, 1.0, params["hue"])
        if params["contrast"] is not None and params["contrast_last"]:
            x = cv2.convertScaleAbs(x, alpha=params["contrast"])
        out = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def _scale_hsv_channel(x: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    """Caffe's AdjustSaturation / AdjustHue: one channel of OpenCV's 8-bit HSV set to saturate(α·c + β)."""
    planes = list(cv2.split(cv2.cvtColor(x, cv2.COLOR_RGB2HSV)))
    planes[channel] = cv2.addWeighted(planes[channel], alpha, planes[channel], 0.0, beta)
    return cv2.cvtColor(cv2.merge(planes), cv2.COLOR_HSV2RGB)


def adjust_contrast_hwc(x: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's adjust_contrast on uint8 (H, W, 3): blend with the mean of the grayscale image."""
    mean = sum(w * m for w, m in zip(GRAY_WEIGHTS, cv2.mean(x)[:3]))
    return cv2.addWeighted(x, factor, x, 0.0, (1.0 - factor) * mean)


# data.train_transform.photometric_variant: the released Caffe code's distortion or torchvision's (p=0.5 each)
PHOTOMETRIC_VARIANTS = {"caffe": CaffePhotometricDistort, "torchvision": lambda: PhotometricDistort(p=0.5)}


class SSDAugmentation(BoxPipeline):
    """SSD's training augmentation (§2.2, §3.6); each step can be switched off (the paper's Table 2).

    photometric: the distortion ``photometric_variant`` names: ``caffe`` (``CaffePhotometricDistort``, the released
    code's: additive brightness ±32, contrast, saturation, hue ±36°, each p=0.5, channels never reordered) or
    ``torchvision`` (``PhotometricDistort``, ``RandomPhotometricDistort`` on OpenCV's uint8 kernels: multiplicative
    brightness, hue ±18°, and a random channel order, each p=0.5). expand: with p=0.5, the image on a canvas up
    to ``max_expand_ratio``× its side filled with ``mean``
    (in [0, 1], like model.pixel_mean, so the canvas is zero after normalisation). crop: ``MinIoURandomCrop``.
    flip: horizontal, p=0.5. size: the network input (int or (h, w)); ``None`` keeps the size. Last, boxes under
    1 px in width or height are dropped with their per-object fields.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = 300,
        photometric: bool = True,
        photometric_variant: str = "caffe",
        expand: bool = True,
        crop: bool = True,
        flip: bool = True,
        max_expand_ratio: float = 4.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        min_scale: float = 0.1,
        aspect_ratio_range: Sequence[float] = (0.5, 2.0),
        max_trials: int = 50,
    ) -> None:
        self.size = None if size is None else input_size(size, "data.train_transform.size")
        if max_expand_ratio < 1:
            raise ValueError(
                f"data.train_transform.max_expand_ratio={max_expand_ratio}: must be ≥ 1 "
                f"(the canvas side is up to this many times the image side)"
            )
        self.fill = canvas_fill(mean, "data.train_transform.mean")
        if photometric_variant not in PHOTOMETRIC_VARIANTS:
            raise ValueError(
                f"data.train_transform.photometric_variant={photometric_variant!r}: choose one of "
                f"{list(PHOTOMETRIC_VARIANTS)}"
            )
        self.photometric, self.expand, self.crop, self.flip = photometric, expand, crop, flip
        self.photometric_variant = photometric_variant
        self.max_expand_ratio = float(max_expand_ratio)
        self.cropper = MinIoURandomCrop(min_ious, min_scale, aspect_ratio_range, max_trials)  # validates its settings
        steps: list[v2.Transform] = []
        if photometric:
            steps.append(PHOTOMETRIC_VARIANTS[photometric_variant]())
        if expand:
            steps.append(
                v2.RandomZoomOut(fill=self.fill, side_range=(1.0, self.max_expand_ratio), p=EXPAND_PROBABILITY)
            )
        if crop:
            steps.append(self.cropper)
        self.compose(steps, flip, self.size)
        self.size_settings = ("size",) if self.size else ()  # the arguments that set max_output_size

    def max_output_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (h, w) it makes from any image: ``size``; ``None`` with ``size=None``, where the output follows the
        image's own size (up to ``max_expand_ratio``× with ``expand``), so the data set bounds it, not the transform."""
        return self.size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, photometric={self.photometric}, "
            f"photometric_variant={self.photometric_variant}, expand={self.expand}, "
            f"crop={self.crop}, flip={self.flip}, max_expand_ratio={self.max_expand_ratio}, fill={self.fill}, "
            f"min_ious={self.cropper.min_ious}, min_scale={self.cropper.min_scale})"
        )
