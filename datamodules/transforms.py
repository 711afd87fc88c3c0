"""Sample transforms shared by every data set: the SSD paper's training augmentation and the eval resize.

A transform is a callable ``(image uint8 (3, h, w), target) -> (image uint8 (3, H, W), target)``; the target
dict holds ``boxes`` (n, 4) float xyxy in absolute pixels, ``labels`` (n,) long, ``image_id`` and optionally
``difficult`` (n,) bool / ``iscrowd`` (n,) long, which are filtered together with the boxes (PER_OBJECT_FIELDS).
Images stay uint8: the detector normalises on the device (docs/ARCHITECTURE.md §2).

``SSDAugmentation`` is Liu et al. 2016, §2.2 "Data augmentation" and §3.6, in the order of the original Caffe
pipeline: photometric distortion → zoom out (expansion) → sampled patch (``MinIoURandomCrop``) → horizontal
flip → resize to the network input → drop boxes under 1 px (``drop_small_boxes``). Each step has a switch, for
the paper's Table 2 ablation. ``YOLOAugmentation`` is Redmon et al. 2016, §2.2: random scaling and translation
up to 20 % of the image size, exposure and saturation up to a factor 1.5 in HSV (``RandomHSVScale``).
``ShortSideAugmentation`` / ``ShortSideResize`` are RetinaNet's (§4.1, §5.1): shorter side 800 (or jittered),
longer side ≤ 1333, aspect ratio kept, flip. It is built from ``torchvision.transforms.v2`` on ``tv_tensors`` except
the patch
sampler: torchvision's ``RandomIoUCrop`` never crops an image without objects (each trial needs a box centre
inside) and, when its trials fail, redraws another IoU option instead of keeping the image, which skews the
options' frequencies. ``ResizeTo`` is the matching validation transform.

Randomness comes from torch's global generator, as in torchvision's own transforms; in training each sample is
made with that generator seeded from (seed, epoch, index) (``datamodules/sampling.py``), so its augmentation is the
same in any worker, after any resume.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# target fields with one entry per object: kept or dropped together with their box
PER_OBJECT_FIELDS = ("labels", "difficult", "iscrowd")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # in [0, 1], like model.pixel_mean
EXPAND_PROBABILITY = 0.5  # §3.6 / Caffe's ssd_pascal.py expand_param prob
FLIP_PROBABILITY = 0.5  # §2.2: "horizontally flipped with probability of 0.5"
MIN_BOX_SIZE = 1.0  # px in the network input: narrower or lower boxes are dropped after augmentation
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)

cv2.setNumThreads(1)  # one thread per loader worker, as torch's in workers: OpenCV's pool would oversubscribe


def input_size(size: int | Sequence[int], key: str) -> tuple[int, int]:
    """``300`` or ``[h, w]`` as (h, w); a clear error for anything else."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"{key}={size}: give one positive int (square input) or [height, width]")
    return int(hw[0]), int(hw[1])


def drop_small_boxes(
    target: dict[str, Tensor], canvas_size: tuple[int, int], min_size: float = MIN_BOX_SIZE
) -> dict[str, Tensor]:
    """Clamp ``boxes`` to the (h, w) canvas in place and drop those under ``min_size`` px wide or high, with their
    per-object fields: ``v2.ClampBoundingBoxes`` + ``v2.SanitizeBoundingBoxes`` at a tenth of their cost
    (0.01 vs 0.1 ms an image, which the flip-only shapes recipe would pay for nothing)."""
    boxes = target["boxes"]
    for k in PER_OBJECT_FIELDS:
        if k in target and len(target[k]) != len(boxes):
            raise ValueError(f"target[{k!r}] has {len(target[k])} entries for {len(boxes)} boxes")
    h, w = canvas_size
    boxes[:, 0::2].clamp_(0, w)  # a box on the right edge may sit a float ulp outside after resizing
    boxes[:, 1::2].clamp_(0, h)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= min_size).all(dim=1)
    if keep.all():
        return target
    return {k: v[keep] if k == "boxes" or k in PER_OBJECT_FIELDS else v for k, v in target.items()}


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


class BoxPipeline:
    """Runs ``self.pipeline`` (a ``v2.Compose`` or None) on a uint8 image and its target's boxes as ``tv_tensors``,
    then drops boxes under 1 px with their per-object fields. Subclasses build the pipeline from their switches."""

    pipeline: v2.Compose | None = None

    def compose(self, steps: list[v2.Transform], flip: bool, size: tuple[int, int] | None) -> None:
        """``steps``, then the flip and resize every pipeline ends with, as ``self.pipeline``."""
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=FLIP_PROBABILITY))
        if size is not None:
            steps.append(v2.Resize(size, antialias=True))
        self.pipeline = v2.Compose(steps) if steps else None

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if image.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__} expects uint8 images (the model normalises), got {image.dtype}")
        # a copy: some v2 kernels and the clamp below write in place, and a data set may cache its targets
        boxes = target["boxes"].to(torch.float32, copy=True)
        if self.pipeline is not None:
            boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, target = self.pipeline(tv_tensors.Image(image), {**target, "boxes": boxes})
            image, boxes = image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor)
        return image, drop_small_boxes({**target, "boxes": boxes}, tuple(image.shape[-2:]))


# data.train_transform.photometric_variant: the released Caffe code's distortion or torchvision's (p=0.5 each)
PHOTOMETRIC_VARIANTS = {"caffe": CaffePhotometricDistort, "torchvision": lambda: PhotometricDistort(p=0.5)}


def canvas_fill(mean: Sequence[float], key: str) -> tuple[int, ...]:
    """``mean`` in [0, 1] (like model.pixel_mean) as the uint8 colour of new canvas, 0 once normalised."""
    mean = tuple(float(m) for m in mean)
    if len(mean) != 3 or not all(0 <= m <= 1 for m in mean):
        raise ValueError(f"{key}={list(mean)}: give 3 channel means in [0, 1], like model.pixel_mean")
    return tuple(round(m * 255) for m in mean)


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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, photometric={self.photometric}, "
            f"photometric_variant={self.photometric_variant}, expand={self.expand}, "
            f"crop={self.crop}, flip={self.flip}, max_expand_ratio={self.max_expand_ratio}, fill={self.fill}, "
            f"min_ious={self.cropper.min_ious}, min_scale={self.cropper.min_scale})"
        )


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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, jitter={self.jitter}, hsv={self.hsv}, flip={self.flip}, "
            f"scale={self.scale}, translate={self.translate}, fill={self.fill})"
        )


def resize_sample(image: Tensor, target: dict[str, Tensor], new_h: int, new_w: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Resize image and boxes to (new_h, new_w) and record ``target["scale"] = (sy, sx)`` = new size ÷ original
    size, times any scale already there, which ``DetectionBatch.boxes_in_original_frame`` divides out."""
    h, w = image.shape[-2:]
    if (h, w) != (new_h, new_w):
        image = F.resize(image, [new_h, new_w], antialias=True)
    sy, sx = new_h / h, new_w / w
    boxes = target["boxes"].to(torch.float32)
    return image, {
        **target,
        "boxes": boxes * boxes.new_tensor([sx, sy, sx, sy]),
        "scale": target.get("scale", torch.ones(2)).float() * torch.tensor([sy, sx]),
    }


def short_side_size(h: int, w: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) scaled so the shorter side is ``min_size`` unless the longer would pass ``max_size`` (then the longer
    is ``max_size``); truncated to whole pixels as ``v2.RandomShortestSize`` does, so training and validation agree."""
    r = min_size / min(h, w)
    if max_size is not None:
        r = min(r, max_size / max(h, w))
    return max(1, int(h * r)), max(1, int(w * r))


class ResizeTo:
    """Validation/test: resize to the network input (int or (h, w)), boxes with it; no box is dropped.
    Sets ``target["scale"]`` (``resize_sample``) to report detections in original pixels."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = input_size(size, "data.val_transform.size")

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return resize_sample(image, target, *self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


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

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return resize_sample(image, target, *short_side_size(*image.shape[-2:], self.min_size, self.max_size))

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_sizes={self.min_sizes}, max_size={self.max_size}, flip={self.flip})"


class Preprocess:
    """One image → (network input, target) as the model's validation transform makes it: ``target["scale"]``
    maps boxes back to the image's own pixels (``DetectionBatch.boxes_in_original_frame``)."""

    def __init__(self, val_transform: Mapping[str, Any] | None, size_divisible: int = 1) -> None:
        self.config = copy.deepcopy(dict(val_transform)) if val_transform else None
        self.transform = instantiate(self.config) if self.config else None
        self.size_divisible = int(size_divisible)

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        target = {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.long),
            "image_id": torch.tensor(index),
        }
        return (image, target) if self.transform is None else self.transform(image, target)

    def __repr__(self) -> str:
        return f"{self.transform!r} (size_divisible {self.size_divisible})"
