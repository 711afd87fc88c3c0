"""The SSD and YOLO papers' augmentations (datamodules/transforms/), their config wiring and the browse command.

Every check recomputes what a step should do independently (IoU in float64 from the box corners, the expected
pixels under a box, the flip/resize formulas), since a silently unapplied IoU constraint (ssd.pytorch's
RandomSampleCrop) or a box that drifts off its object trains without any error.
"""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datamodules.browse import main as browse_main
from datamodules.base import AspectRatioGroupedBatchSampler
from datamodules.transforms import (
    CaffePhotometricDistort,
    MinIoURandomCrop,
    PhotometricDistort,
    RandomHSVScale,
    ResizeTo,
    ShortSideAugmentation,
    ShortSideResize,
    SSDAugmentation,
    YOLOAugmentation,
)
from datamodules.transforms.yolo import scale_saturation_value, scale_saturation_value_hwc
from detectors.batch import collate_detection

from ..conftest import compose

ALL_OFF = dict(photometric=False, expand=False, crop=False, flip=False)


def random_sample(g: torch.Generator, h: int, w: int, n: int) -> tuple[torch.Tensor, dict]:
    """A noise image and n boxes from tiny (under 1 px, some exactly 0 wide) to the whole image, with per-object
    fields that encode the object's index, so misalignment shows."""
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    side = torch.exp(torch.empty(n, 2).uniform_(-2, 0, generator=g)) * torch.tensor([w, h])  # 0.14..1 of the side
    side[: n // 4] *= 0.01  # some well under a pixel
    x0 = torch.rand(n, generator=g) * (w - side[:, 0])
    y0 = torch.rand(n, generator=g) * (h - side[:, 1])
    boxes = torch.stack((x0, y0, x0 + side[:, 0], y0 + side[:, 1]), 1)
    boxes[n // 4 : n // 4 + 1, 2] = boxes[n // 4 : n // 4 + 1, 0]  # one zero-width box
    labels = torch.arange(n)
    return image, {
        "boxes": boxes,
        "labels": labels,
        "difficult": labels % 2 == 0,
        "iscrowd": (labels % 3 == 0).long(),
        "image_id": torch.tensor(7),
    }


def empty_target() -> dict:
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "difficult": torch.zeros(0, dtype=torch.bool),
        "iscrowd": torch.zeros(0, dtype=torch.long),
        "image_id": torch.tensor(3),
    }


def iou64(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def centre_in(box: list[float], patch: list[float]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return patch[0] < cx < patch[2] and patch[1] < cy < patch[3]


@pytest.mark.parametrize(("min_iou", "min_found"), [(0.3, 400), (0.7, 100), (0.9, 10)])
def test_sampled_patch_meets_its_min_iou_with_an_object_it_keeps(min_iou, min_found):
    crop = MinIoURandomCrop()
    g = torch.Generator().manual_seed(1)
    found = 0
    for trial in range(1000):
        h, w = int(torch.randint(40, 200, (1,), generator=g)), int(torch.randint(40, 200, (1,), generator=g))
        _, target = random_sample(g, h, w, n=int(torch.randint(1, 5, (1,), generator=g)))
        torch.manual_seed(trial)
        patch = crop.sample_patch(target["boxes"], h, w, min_iou)
        if patch is None:
            continue
        found += 1
        p = patch.tolist()
        assert all(v == int(v) for v in p) and 0 <= p[0] < p[2] <= w and 0 <= p[1] < p[3] <= h
        # side ≥ 0.1 of the image's and aspect within [1/2, 2] relative to the image's, up to the pixel rounding
        sx, sy = (p[2] - p[0]) / w, (p[3] - p[1]) / h
        assert (sx * sy) ** 0.5 >= 0.1 - 1 / min(h, w)
        assert 0.5 * (1 - 2 / min(h, w)) <= sx / sy <= 2 * (1 + 2 / min(h, w))
        assert any(iou64(b, p) >= min_iou - 1e-6 and centre_in(b, p) for b in target["boxes"].tolist())
    assert found >= min_found  # the constraint is met often enough to have been tested


def test_patch_options_without_objects_sample_any_patch():
    crop = MinIoURandomCrop()
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        patch = crop.sample_patch(torch.zeros(0, 4), 100, 80, min_iou=0.9)
        assert patch is not None and 0 <= patch[0] < patch[2] <= 80 and 0 <= patch[1] < patch[3] <= 100
        sizes.add(tuple(patch.tolist()))
    assert len(sizes) > 10


def test_crop_keeps_boxes_whose_centres_lie_in_the_patch_clipped_to_it():
    augment = SSDAugmentation(size=None, **{**ALL_OFF, "crop": True})
    patches = []
    sample_patch = augment.cropper.sample_patch
    augment.cropper.sample_patch = lambda *a: patches.append(sample_patch(*a)) or patches[-1]
    g = torch.Generator().manual_seed(2)
    cropped = 0
    for seed in range(60):
        image, target = random_sample(g, 90, 120, n=8)
        torch.manual_seed(seed)
        patches.clear()
        out_image, out = augment(image, target)
        if not patches or patches[-1] is None:  # the whole image: nothing moves
            assert torch.equal(out_image, image)
            continue
        cropped += 1
        x0, y0, x1, y1 = (int(v) for v in patches[-1])
        assert torch.equal(out_image, image[:, y0:y1, x0:x1])
        expected = []
        for i, b in enumerate(target["boxes"].tolist()):
            if centre_in(b, [x0, y0, x1, y1]):
                c = [
                    min(max(b[0], x0), x1) - x0,
                    min(max(b[1], y0), y1) - y0,
                    min(max(b[2], x0), x1) - x0,
                    min(max(b[3], y0), y1) - y0,
                ]
                if c[2] - c[0] >= 1 and c[3] - c[1] >= 1:
                    expected.append((i, c))
        assert out["labels"].tolist() == [i for i, _ in expected]
        torch.testing.assert_close(out["boxes"], torch.tensor([c for _, c in expected]).reshape(-1, 4))
    assert cropped >= 20


def test_no_degenerate_box_survives_and_fields_stay_aligned():
    augment = SSDAugmentation(size=(64, 96))
    g = torch.Generator().manual_seed(3)
    dropped = 0
    for seed in range(150):
        image, target = random_sample(g, int(torch.randint(30, 150, (1,), generator=g)), 100, n=12)
        before = target["boxes"].clone()
        torch.manual_seed(seed)
        out_image, out = augment(image, target)
        assert torch.equal(target["boxes"], before)  # the data set's own target is not written to
        assert out_image.dtype == torch.uint8 and out_image.shape == (3, 64, 96)
        b = out["boxes"]
        assert b.dtype == torch.float32 and b.shape == (len(out["labels"]), 4)
        assert ((b[:, 2:] - b[:, :2]) >= 1).all()
        assert (b >= 0).all() and (b[:, 0::2] <= 96).all() and (b[:, 1::2] <= 64).all()
        labels = out["labels"]
        assert torch.equal(out["difficult"], labels % 2 == 0) and torch.equal(out["iscrowd"], (labels % 3 == 0).long())
        assert len(set(labels.tolist())) == len(labels) and out["image_id"] == 7
        dropped += 12 - len(labels)
    assert dropped > 150  # the tiny boxes (3 per image) and cropped-away objects were there to drop


@pytest.mark.parametrize(
    "switches",
    [
        {},
        ALL_OFF,
        {"crop": False},
        {"expand": False},
        {"photometric": False},
        {**ALL_OFF, "expand": True},
        {**ALL_OFF, "crop": True},
    ],
)
def test_images_without_objects_pass_every_step(switches):
    augment = SSDAugmentation(size=(48, 40), **switches)
    for seed in range(40):
        torch.manual_seed(seed)
        image, out = augment(torch.full((3, 30, 50), 90, dtype=torch.uint8), empty_target())
        assert image.shape == (3, 48, 40) and image.dtype == torch.uint8
        assert out["boxes"].shape == (0, 4) and len(out["labels"]) == len(out["difficult"]) == 0


def square_sample(h: int = 40, w: int = 60) -> tuple[torch.Tensor, dict]:
    """A green image with one red square at x 10..20, y 5..15 (its box)."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[1] = 200
    image[:, 5:15, 10:20] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    return image, {
        "boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0]]),
        "labels": torch.tensor([2]),
        "image_id": torch.tensor(0),
    }


def is_red(image: torch.Tensor) -> torch.Tensor:
    return (image[0] == 255) & (image[1] == 0) & (image[2] == 0)


def test_expansion_keeps_boxes_on_their_pixels():
    augment = SSDAugmentation(size=None, **{**ALL_OFF, "expand": True}, max_expand_ratio=3.0, mean=(0.2, 0.4, 0.6))
    expanded = 0
    for seed in range(30):
        torch.manual_seed(seed)
        image, out = augment(*square_sample())
        h, w = image.shape[-2:]
        if (h, w) == (40, 60):
            continue
        expanded += 1
        assert 40 <= h <= 120 and 60 <= w <= 180
        x0, y0, x1, y1 = (int(v) for v in out["boxes"][0])
        assert out["boxes"][0].tolist() == [x0, y0, x1, y1] and (x1 - x0, y1 - y0) == (10, 10)
        assert is_red(image[:, y0:y1, x0:x1]).all() and is_red(image).sum() == 100  # the square moved with its box
        fill = torch.tensor([51, 102, 153], dtype=torch.uint8)
        assert ((image == fill[:, None, None]).all(0)).sum() == h * w - 40 * 60  # the rest of the canvas: the mean
    assert expanded >= 8


def test_flip_mirrors_boxes_and_pixels():
    augment = SSDAugmentation(size=None, **{**ALL_OFF, "flip": True})
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, out = augment(*square_sample())
        flipped = out["boxes"][0].tolist() == [60 - 20, 5, 60 - 10, 15]
        assert flipped or out["boxes"][0].tolist() == [10, 5, 20, 15]
        assert is_red(image[:, 5:15, 40:50] if flipped else image[:, 5:15, 10:20]).all() and is_red(image).sum() == 100
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_all_steps_off_is_a_pure_resize_and_draws_no_random_numbers():
    g = torch.Generator().manual_seed(4)
    image, target = random_sample(g, 50, 70, n=6)
    target["boxes"] = target["boxes"][2:]  # sub-pixel boxes (the first n//4) and the zero-width one would be dropped
    for k in ("labels", "difficult", "iscrowd"):
        target[k] = target[k][2:]
    augment = SSDAugmentation(size=(100, 35), **ALL_OFF)
    torch.manual_seed(0)
    out_image, out = augment(image, target)
    after = torch.rand(())
    torch.manual_seed(0)
    assert after == torch.rand(())  # the global generator was not advanced
    assert torch.equal(out_image, F.resize(image, [100, 35], antialias=True))
    torch.testing.assert_close(out["boxes"], target["boxes"] * torch.tensor([0.5, 2.0, 0.5, 2.0]), rtol=0, atol=1e-4)
    assert torch.equal(out["labels"], target["labels"])


def test_each_switch_disables_its_step():
    g = torch.Generator().manual_seed(5)
    image, target = random_sample(g, 50, 70, n=5)
    image = image // 64 * 64 + 10  # 4 grey levels, none the canvas fill: new values can only come from distortion
    seen = {"pixels_changed": False, "larger": False, "smaller": False, "mirrored": False}
    for name in ("photometric", "expand", "crop", "flip"):
        on = SSDAugmentation(size=None, **{**ALL_OFF, name: True})
        everything_but = SSDAugmentation(size=None, **{name: False})
        for seed in range(40):
            torch.manual_seed(seed)
            out_image, out = on(image, target)
            torch.manual_seed(seed)
            other_image, _ = everything_but(image, target)
            h, w = other_image.shape[-2:]
            if name == "photometric":  # only distortion changes pixel values; crop/expand/flip only move them
                seen["pixels_changed"] |= not torch.equal(out_image, image)
                values = set(image.flatten().tolist()) | set(everything_but.fill)
                assert set(other_image.unique().tolist()) <= values
            if name == "expand":
                seen["larger"] |= out_image.shape[-1] > 70
                assert h <= 50 and w <= 70
            if name == "crop":
                seen["smaller"] |= out_image.shape[-1] < 70
                assert h >= 50 and w >= 70 and h / 50 == pytest.approx(w / 70, abs=0.05)  # expanded at most
            if name == "flip":
                seen["mirrored"] |= torch.equal(out_image, image.flip(-1))
                assert not torch.equal(other_image, image.flip(-1))
    assert all(seen.values()), seen


def test_same_seed_same_sample():
    augment = SSDAugmentation(size=64)
    image, target = random_sample(torch.Generator().manual_seed(6), 80, 80, n=5)
    torch.manual_seed(11)
    a = augment(image, target)
    torch.manual_seed(11)
    b = augment(image, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_eval_resize_maps_back_to_the_original_frame():
    image, target = random_sample(torch.Generator().manual_seed(7), 60, 80, n=4)
    original = target["boxes"].clone()
    once = ResizeTo(100)(image, target)  # e.g. a reader that already resized: scales compose
    image2, out = ResizeTo((96, 128))(*once)
    assert image2.shape == (3, 96, 128) and image2.dtype == torch.uint8 and len(out["boxes"]) == 4
    torch.testing.assert_close(out["scale"], torch.tensor([96 / 60, 128 / 80]))
    batch = collate_detection([(image2, out), ResizeTo((96, 128))(image, target)])
    for i in range(2):
        torch.testing.assert_close(
            batch.boxes_in_original_frame(batch.boxes[i][batch.valid[i]], i), original, rtol=0, atol=1e-3
        )
    assert torch.equal(target["boxes"], original)  # the input target is untouched


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"max_expand_ratio=0.5: must be ≥ 1"):
        SSDAugmentation(max_expand_ratio=0.5)
    with pytest.raises(ValueError, match=r"min_ious=\[1.5\]"):
        SSDAugmentation(min_ious=[1.5])
    with pytest.raises(ValueError, match=r"size=0"):
        SSDAugmentation(size=0)
    with pytest.raises(ValueError, match=r"size=\[300, 300, 3\]"):
        ResizeTo([300, 300, 3])
    with pytest.raises(ValueError, match=r"mean=.*in \[0, 1\]"):
        SSDAugmentation(mean=[123.7, 116.3, 103.5])
    with pytest.raises(ValueError, match=r"aspect_ratio_range"):
        SSDAugmentation(aspect_ratio_range=[2.0, 0.5])


def test_config_group_wires_both_splits():
    cfg = compose("data/transform=ssd", "data.train_transform.size=[48,64]", "data.num_train=4", "data.num_val=4")
    data = instantiate(cfg.data)
    assert isinstance(data.train_transform, SSDAugmentation) and data.train_transform.size == (48, 64)
    assert data.train_transform.fill == tuple(round(255 * m) for m in cfg.model.pixel_mean)
    image, _ = data.train_set[0]
    assert image.shape == (3, 48, 64)
    image, target = data.val_set[0]
    assert image.shape == (3, 48, 64) and torch.allclose(target["scale"], torch.tensor([48 / 128, 64 / 128]))


def test_ssd_augmentation_holds_the_papers_constants():
    t = compose("model=ssd").data.train_transform
    assert list(t.min_ious) == [0.1, 0.3, 0.5, 0.7, 0.9] and t.min_scale == 0.1  # §2.2 patch sampling
    assert list(t.aspect_ratio_range) == [0.5, 2.0] and t.flip  # §2.2: ratio ½..2, flip with p = 0.5
    assert t.expand and t.max_expand_ratio == 4.0  # §3.6: a 16× canvas = 4× the side
    assert t.photometric and t.photometric_variant == "caffe" and t.size == 300  # released distort_param; SSD300


def test_shapes_recipe_keeps_flip_only_at_its_own_size():
    cfg = compose("experiment=retinanet_shapes", "data.num_train=4", "data.num_val=4")
    data = instantiate(cfg.data)
    t = data.train_transform
    assert (t.size, t.photometric, t.expand, t.crop, t.flip) == (None, False, False, False, True)
    assert data.val_transform is None
    assert data.train_set[0][0].shape == (3, 128, 128) and "scale" not in data.val_set[0][1]
    plain = compose("data/transform=none", "data.num_train=4")
    assert instantiate(plain.data).train_transform is None


def test_browse_writes_a_png_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid" / "browse.png"
    path = browse_main(
        [
            "data=shapes",
            "data/transform=ssd",
            "data.train_transform.size=48",
            "data.num_train=8",
            "split=train",
            "n=5",
            f"out={out}",
            "zoom=2",
            "seed=3",
        ]
    )
    assert path == out and out.is_file() and str(out.resolve()) in capsys.readouterr().out
    # 5 images of 96 px (48 × zoom 2) in rows of 3: 2 rows, 2 px padding around each
    assert Image.open(out).size == (3 * 96 + 4 * 2, 2 * 96 + 3 * 2)
    path = browse_main(
        ["data.image_size=64", "data/transform=none", "data.num_val=4", "split=val", "n=4", f"out={out}", "zoom=1"]
    )
    assert Image.open(path).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)


# --- YOLOv1 (§2.2): scaling/translation up to 20 %, exposure and saturation up to ×1.5 in HSV -----------------
YOLO_OFF = dict(jitter=False, hsv=False, flip=False)


def hsv_reference(image: torch.Tensor, saturation: float, value: float) -> torch.Tensor:
    """matplotlib's RGB → HSV, scale S and V (clamped to 1), back to RGB: the definition, in float64."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(image.permute(1, 2, 0).double().numpy() / 255)
    hsv[..., 1] = (hsv[..., 1] * saturation).clip(0, 1)
    hsv[..., 2] = (hsv[..., 2] * value).clip(0, 1)
    return torch.from_numpy(hsv_to_rgb(hsv) * 255).permute(2, 0, 1)


def photo_like(seed: int = 0) -> torch.Tensor:
    """A smooth colour image (gradients and blobs, as photos have) plus some noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, 60), torch.linspace(0, 1, 80), indexing="ij")
    base = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, 1, 1, generator=g) * 50
    return (base + torch.randn(3, 60, 80, generator=g) * 10).clamp(0, 255).to(torch.uint8)


NO_STEP = dict(
    brightness_factor=None,
    contrast_factor=None,
    saturation_factor=None,
    hue_factor=None,
    channel_permutation=None,
    contrast_before=True,
)


@pytest.mark.parametrize(
    ("step", "factor", "max_diff"),
    [
        ("brightness_factor", 1.125, 1),
        ("brightness_factor", 0.875, 1),
        ("contrast_factor", 1.5, 1),
        ("contrast_factor", 0.5, 1),
        ("saturation_factor", 1.5, 1),
        ("saturation_factor", 0.5, 1),
        ("hue_factor", 0.05, 8),
        ("hue_factor", -0.04, 8),
        ("channel_permutation", torch.tensor([2, 0, 1]), 0),
    ],
)
def test_opencv_photometric_kernels_match_torchvisions(step, factor, max_diff):
    image = tv_tensors.Image(photo_like())
    params = {**NO_STEP, step: factor}
    ours = PhotometricDistort().transform(image, params).int()
    reference = v2.RandomPhotometricDistort().transform(image, params).int()
    assert ours.shape == reference.shape and isinstance(ours, torch.Tensor)
    diff = (ours - reference).abs()
    assert diff.max() <= max_diff  # rounding; hue: OpenCV's 8-bit HSV holds 256 hues
    assert diff.float().mean() <= (0.6 if step == "hue_factor" else 1.0)


def test_photometric_distort_draws_as_torchvision_and_falls_back_for_float():
    image = tv_tensors.Image(photo_like(1))
    for seed in range(8):
        torch.manual_seed(seed)
        ours = PhotometricDistort(p=0.5)(image)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        reference = v2.RandomPhotometricDistort(p=0.5)(image)
        assert torch.rand(1) == after_ours  # the same random draws, so the same distribution of distortions
        assert (ours.float() - reference.float()).abs().mean() < 2.5  # roundings of up to five steps
    floats = image.float() / 255
    torch.manual_seed(0)
    ours = PhotometricDistort(p=1.0)(floats)
    torch.manual_seed(0)
    assert torch.equal(ours, v2.RandomPhotometricDistort(p=1.0)(floats))  # only uint8 takes the OpenCV path


# --- SSD's photometric distortion as the released code (Caffe ApplyDistort, ssd_pascal.py distort_param) ----------
CAFFE_NO_STEP = dict(contrast_last=False, brightness=None, contrast=None, saturation=None, hue=None)


def test_caffe_distortion_draws_the_released_ranges():
    image = tv_tensors.Image(photo_like())
    distort = CaffePhotometricDistort()
    draws = []
    for seed in range(400):
        torch.manual_seed(seed)
        draws.append(distort.make_params([image]))
    assert all(set(d) == set(CAFFE_NO_STEP) for d in draws)  # no channel permutation among the steps
    ranges = {"brightness": (-32, 32), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5), "hue": (-18, 18)}
    for step, (low, high) in ranges.items():
        values = [d[step] for d in draws if d[step] is not None]
        assert 150 <= len(values) <= 250  # p = 0.5 each: 200 ± 5 standard deviations (10) of 400 draws
        assert low <= min(values) < low + 0.05 * (high - low) and high - 0.05 * (high - low) < max(values) <= high
    assert 150 <= sum(d["contrast_last"] for d in draws) <= 250  # either order, p = 0.5


def test_caffe_brightness_is_additive_within_32_levels():
    levels = torch.arange(256, dtype=torch.uint8)
    image = tv_tensors.Image(torch.stack((levels, levels.flip(0), levels.roll(100))).reshape(3, 16, 16))
    distort = CaffePhotometricDistort()
    for delta in (20.4, -31.6, 32.0, -7.5):
        out = distort.transform(image, {**CAFFE_NO_STEP, "brightness": delta})
        assert out.dtype == torch.uint8 and isinstance(out, tv_tensors.Image)
        # every level moves by δ in every channel (×1.125 would move 255 by 32 and 8 by 1), rounded as OpenCV's
        # convertTo (float32, half to even: 9 − 7.5 → 2, 10 − 7.5 → 2) and saturated
        assert torch.equal(out, (image.float() + delta).round().clamp(0, 255).to(torch.uint8))
    unclipped = (image >= 32) & (image <= 223)
    shifts = set()
    for seed in range(50):  # the whole distortion with only brightness on: one shift of every level, within ±32
        torch.manual_seed(seed)
        out = CaffePhotometricDistort(contrast_prob=0, saturation_prob=0, hue_prob=0)(image)
        shift = (out.int() - image.int())[unclipped].unique()
        assert len(shift) == 1 and abs(int(shift)) <= 32
        shifts.add(int(shift))
    assert min(shifts) < -20 and max(shifts) > 20 and 0 in shifts  # both ways, up to ±32; unchanged when not drawn


def hsv_image(seed: int) -> torch.Tensor:
    """A uint8 RGB image with hues in 72°–288° (away from red, where Caffe's hue clamps) and varied S and V."""
    from matplotlib.colors import hsv_to_rgb

    g = torch.Generator().manual_seed(seed)
    hsv = torch.stack(
        (
            0.2 + 0.6 * torch.rand(40, 50, generator=g),
            0.2 + 0.8 * torch.rand(40, 50, generator=g),
            0.3 + 0.7 * torch.rand(40, 50, generator=g),
        ),
        -1,
    )
    return torch.from_numpy(hsv_to_rgb(hsv.double().numpy()) * 255).round().permute(2, 0, 1).to(torch.uint8)


@pytest.mark.parametrize(("step", "value"), [("saturation", 0.5), ("saturation", 1.5), ("hue", -18.0), ("hue", 11.3)])
def test_caffe_saturation_and_hue_are_the_released_hsv_operations(step, value):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    image = hsv_image(3)
    hsv = rgb_to_hsv(image.permute(1, 2, 0).double().numpy() / 255)
    if step == "saturation":
        hsv[..., 1] = (hsv[..., 1] * value).clip(0, 1)  # S·α, clamped
    else:
        hsv[..., 0] = hsv[..., 0] + 2 * value / 360  # δ units of 2° (OpenCV's 8-bit hue), no wrap needed here
    reference = torch.from_numpy(hsv_to_rgb(hsv) * 255).permute(2, 0, 1)
    out = CaffePhotometricDistort().transform(tv_tensors.Image(image), {**CAFFE_NO_STEP, step: value})
    diff = (out.double() - reference).abs()
    # 8-bit HSV holds hue in 2° steps: rounding it moves a channel by up to (max − min)·1°/60° ≤ 4.25 levels, twice
    # (forward and back), plus S's and the output's roundings
    assert diff.max() <= 9 and diff.mean() <= 0.6


def test_caffe_contrast_scales_every_channel_and_hue_saturates_at_red():
    image = hsv_image(4)
    out = CaffePhotometricDistort().transform(tv_tensors.Image(image), {**CAFFE_NO_STEP, "contrast": 1.3})
    # x·α in float32, rounded half to even (OpenCV's convertTo: 95·1.3f = 123.49999 → 123): no blend with the mean
    assert torch.equal(out, (image.float() * 1.3).round().clamp(0, 255).to(torch.uint8))
    red = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 2, 2).contiguous())
    distort = CaffePhotometricDistort()
    assert torch.equal(distort.transform(red, {**CAFFE_NO_STEP, "hue": -18.0}), red)  # H = 0 − 18 saturates to 0
    orange = distort.transform(red, {**CAFFE_NO_STEP, "hue": 18.0})  # 36°: G = 255·36/60 = 153
    assert orange[:, 0, 0].tolist() == [255, 153, 0]


def test_caffe_distortion_never_reorders_channels():
    # pure red, green and blue patches: every Caffe step keeps each patch's largest channel (additive or scaled
    # levels, S ≥ half, hue within ±36° of 0°, 120°, 240°), while a channel reorder moves at least two of them
    image = torch.zeros(3, 8, 24, dtype=torch.uint8)
    for c in range(3):
        image[c, :, 8 * c : 8 * c + 8] = 200
    image = tv_tensors.Image(image)

    def reorders(distort) -> bool:
        return not torch.equal(distort(image)[:, 4, 4::8].argmax(0), torch.arange(3))

    for seed in range(100):
        torch.manual_seed(seed)
        assert not reorders(CaffePhotometricDistort())
    torch.manual_seed(0)
    assert any(reorders(PhotometricDistort(p=0.5)) for _ in range(100))  # the check sees torchvision's reorder


@pytest.mark.parametrize(
    ("overrides", "variant"),
    [
        (("model=ssd",), "caffe"),  # the released code's, the data/transform=ssd default
        (("model=ssd512",), "caffe"),
        (("model=ssd_torchvision",), "torchvision"),
        (("experiment=ssd_cpu", "data=voc", "data.root=/x"), "torchvision"),  # the CPU recipe as it was tuned
    ],
)
def test_ssd_photometric_variant_setting(overrides, variant):
    cfg = compose(*overrides)
    assert cfg.data.train_transform.photometric_variant == variant
    augment = instantiate(cfg.data.train_transform)
    distortion = augment.pipeline.transforms[0]
    assert type(distortion) is {"caffe": CaffePhotometricDistort, "torchvision": PhotometricDistort}[variant]
    with pytest.raises(ValueError, match=r"photometric_variant='opencv': choose one of \['caffe', 'torchvision'\]"):
        SSDAugmentation(photometric_variant="opencv")
    with pytest.raises(TypeError, match="uint8"):
        CaffePhotometricDistort().transform(tv_tensors.Image(torch.zeros(3, 4, 4)), {**CAFFE_NO_STEP, "hue": 3.0})


@pytest.mark.parametrize(("saturation", "value"), [(1.5, 1.5), (1 / 1.5, 1 / 1.5), (1.5, 0.7), (0.8, 1.3), (1, 1)])
def test_hsv_scaling_equals_the_hsv_round_trip(saturation, value):
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    image[:, :4] = 90  # grey pixels: no hue, saturation 0
    image[:, 4:8, :10] = 0  # black
    ours = scale_saturation_value(image, torch.tensor(saturation), torch.tensor(value))
    assert ours.dtype == torch.uint8
    assert (ours.double() - hsv_reference(image, saturation, value)).abs().max() <= 0.5 + 1e-6  # rounding only


@pytest.mark.parametrize(("saturation", "value"), [(1.5, 1.5), (1 / 1.5, 1 / 1.5), (1.5, 0.7), (0.8, 1.3), (1, 1)])
def test_hsv_scaling_through_opencv_is_within_a_level_of_the_definition(saturation, value):
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    image[:, :4] = 90  # grey pixels: no hue, saturation 0
    image[:, 4:8, :10] = 0  # black
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    ours = torch.from_numpy(scale_saturation_value_hwc(hwc, saturation, value)).permute(2, 0, 1)
    # float32 HSV and back: the exact value to ~1e-4 of a level, so its rounding is off by at most one level
    assert ours.dtype == torch.uint8 and (ours.double() - hsv_reference(image, saturation, value)).abs().max() <= 1


def test_hsv_factors_lie_within_the_papers_range_and_boxes_pass():
    from matplotlib.colors import rgb_to_hsv

    image = torch.randint(40, 160, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    v_before = rgb_to_hsv(image.permute(1, 2, 0).numpy() / 255)[..., 2]
    hsv = RandomHSVScale(saturation=1.5, exposure=1.5)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 12.0]])
    ratios = []
    for seed in range(60):
        torch.manual_seed(seed)
        out, out_boxes = hsv(image, boxes)
        assert torch.equal(out_boxes, boxes)
        v_after = rgb_to_hsv(out.permute(1, 2, 0).numpy() / 255)[..., 2]
        ratios.append(float((v_after / v_before).mean()))  # V < 160/255·1.5 < 1: never clipped here
    assert 1 / 1.5 - 0.02 <= min(ratios) < 0.8 and 1.3 < max(ratios) <= 1.5 + 0.02
    assert sum(r < 1 for r in ratios) >= 15 and sum(r > 1 for r in ratios) >= 15  # darker and brighter both drawn
    with pytest.raises(ValueError, match=r"exposure=0.5: must be ≥ 1"):
        RandomHSVScale(exposure=0.5)


def test_yolo_jitter_scales_and_translates_boxes_with_their_pixels():
    augment = YOLOAugmentation(size=None, **{**YOLO_OFF, "jitter": True}, mean=(0.2, 0.4, 0.6))
    moved = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = square_sample(80, 80)
        target["boxes"] = torch.tensor([[30.0, 25.0, 50.0, 45.0]])
        image[:] = torch.tensor([0, 200, 0], dtype=torch.uint8)[:, None, None]
        image[:, 25:45, 30:50] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
        out_image, out = augment(image, target)
        assert out_image.shape == (3, 80, 80)
        x0, y0, x1, y1 = out["boxes"][0].tolist()
        side = x1 - x0
        assert 0.8 * 20 - 1e-3 <= side <= 1.2 * 20 + 1e-3 and y1 - y0 == pytest.approx(side, abs=1e-3)
        # the square's centre moves by the translation plus its scaling about the image centre (40, 40)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        s = side / 20
        assert abs(cx - (40 + s * (40 - 40))) <= 0.2 * 80 + 1 and abs(cy - (40 + s * (35 - 40))) <= 0.2 * 80 + 1
        red = (out_image[0] > 127) & (out_image[1] < 100)
        ys, xs = red.any(1).nonzero(), red.any(0).nonzero()
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1 and abs(ys.min() - y0) <= 1
        assert abs(ys.max() + 1 - y1) <= 1
        fill = (out_image == torch.tensor([51, 102, 153], dtype=torch.uint8)[:, None, None]).all(0)
        if abs(cx - 40) > 1 or s < 0.99:  # a shift or a shrink uncovers canvas, filled with the mean
            assert fill.any()
        moved += abs(cx - 40) > 1
    assert moved >= 20


@pytest.mark.parametrize("out", [(448, 448), (160, 160), (200, 120)])
def test_yolo_one_pass_equals_its_v2_twin(out):
    """The same draws (the generator left in the same state), boxes within 1 px (the paste's offset and the resized
    size are whole pixels: ≤ ½ px each), pixels within 2 levels away from the pasted edges: on a linear ramp both
    the bilinear warp and the antialiased resize sample the same plane, ≤ 0.4 level per px apart here, plus the
    twin's two uint8 roundings."""
    h, w = 480, 640
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = torch.stack((40 + 0.2 * x, 30 + 0.3 * y, 20 + 0.1 * x + 0.15 * y)).round().to(torch.uint8)
    boxes = torch.tensor([[0.3 * w, 0.3 * h, 0.5 * w, 0.6 * h], [0.45 * w, 0.35 * h, 0.7 * w, 0.7 * h]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": torch.tensor(0)}
    geometry = YOLOAugmentation(size=out, hsv=False, mean=(0.2, 0.4, 0.6))
    full = YOLOAugmentation(size=out, mean=(0.2, 0.4, 0.6))
    for seed in range(12):
        torch.manual_seed(seed)
        fast_image, fast = geometry(ramp, target)
        after_fast = torch.rand(1)
        torch.manual_seed(seed)
        plain_image, plain = geometry.plain(ramp, target)
        assert torch.rand(1) == after_fast
        assert fast_image.shape == plain_image.shape == (3, *out)
        torch.testing.assert_close(fast["boxes"], plain["boxes"], atol=1.0, rtol=0)
        # away from the pasted image's edges (the fill and the resize's border taps): the ramp in both
        inside = (plain_image.int() - fast_image.int()).abs().amax(0)
        fill = (fast_image == torch.tensor([51, 102, 153], dtype=torch.uint8)[:, None, None]).all(0)
        interior = ~torch.nn.functional.max_pool2d(fill[None, None].float(), 7, 1, 3)[0, 0].bool()
        interior[:3], interior[-3:], interior[:, :3], interior[:, -3:] = False, False, False, False
        assert interior.float().mean() > 0.3 and inside[interior].max() <= 2
        torch.manual_seed(seed)
        _, with_hsv = full(ramp, target)
        torch.manual_seed(seed)
        _, with_hsv_plain = full.plain(ramp, target)
        torch.testing.assert_close(with_hsv["boxes"], with_hsv_plain["boxes"], atol=1.0, rtol=0)


def test_yolo_augmentation_drops_degenerate_boxes_and_passes_empty_images():
    augment = YOLOAugmentation(size=(56, 72))
    g = torch.Generator().manual_seed(10)
    for seed in range(60):
        image, target = random_sample(g, 60, 90, n=10)
        torch.manual_seed(seed)
        out_image, out = augment(image, target)
        assert out_image.shape == (3, 56, 72) and out_image.dtype == torch.uint8
        b = out["boxes"]
        assert ((b[:, 2:] - b[:, :2]) >= 1).all() and (b >= 0).all() and (b[:, 0::2] <= 72).all()
        assert torch.equal(out["difficult"], out["labels"] % 2 == 0)
        empty_image, empty = augment(torch.full((3, 30, 50), 90, dtype=torch.uint8), empty_target())
        assert empty_image.shape == (3, 56, 72) and empty["boxes"].shape == (0, 4)


def test_yolo_steps_off_is_a_pure_resize():
    image, target = random_sample(torch.Generator().manual_seed(11), 50, 70, n=4)
    out_image, _ = YOLOAugmentation(size=(100, 35), **YOLO_OFF)(image, target)
    assert torch.equal(out_image, F.resize(image, [100, 35], antialias=True))
    with pytest.raises(ValueError, match=r"scale=1.5"):
        YOLOAugmentation(scale=1.5)


def test_yolo_transform_group_wires_both_splits():
    cfg = compose("model=yolo", "data/transform=yolo", "data.num_train=4", "data.num_val=4")
    data = instantiate(cfg.data)
    assert isinstance(data.train_transform, YOLOAugmentation) and data.train_transform.size == (448, 448)
    t = cfg.data.train_transform
    assert (t.scale, t.translate, t.exposure, t.saturation) == (0.2, 0.2, 1.5, 1.5)
    assert data.train_set[0][0].shape == data.val_set[0][0].shape == (3, 448, 448)


# --- RetinaNet: shorter side 800 (jittered in training), longer ≤ 1333, aspect-ratio batches padded to 128 -------
@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [(375, 500, (800, 1066)), (500, 375, (1066, 800)), (300, 1000, (399, 1333)), (800, 800, (800, 800))],
)
def test_short_side_resize_keeps_the_aspect_ratio_and_maps_back(h, w, expected):
    image, target = random_sample(torch.Generator().manual_seed(12), h, w, n=3)
    out_image, out = ShortSideResize(800, 1333)(image, target)
    assert tuple(out_image.shape[-2:]) == expected
    # the same size as torchvision's RandomShortestSize with one choice, which training uses
    from torchvision.transforms import v2

    assert tuple(v2.RandomShortestSize([800], 1333)(image).shape[-2:]) == expected
    batch = collate_detection([(out_image, out)])
    torch.testing.assert_close(batch.boxes_in_original_frame(batch.boxes[0], 0), target["boxes"], rtol=0, atol=1e-3)


def test_short_side_augmentation_draws_its_sizes_and_flips():
    augment = ShortSideAugmentation(min_sizes=[40, 48, 56], max_size=100, flip=True)
    shorts, flipped = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = square_sample(40, 60)
        out_image, out = augment(image, target)
        h, w = out_image.shape[-2:]
        shorts.add(h)
        assert w == int(60 * h / 40) and w <= 100
        s = h / 40
        x0, y0, x1, y1 = out["boxes"][0].tolist()
        assert y0 == pytest.approx(5 * s, abs=0.1) and x1 - x0 == pytest.approx(10 * w / 60, abs=0.1)
        flipped.add(x0 > w / 2)
    assert shorts == {40, 48, 56} and flipped == {True, False}
    with pytest.raises(ValueError, match="max_size"):
        ShortSideAugmentation(min_sizes=[800], max_size=600)


def test_collate_pads_to_a_multiple():
    samples = [
        (torch.ones(3, 130, 200, dtype=torch.uint8), empty_target()),
        (torch.ones(3, 90, 257, dtype=torch.uint8), empty_target()),
    ]
    batch = collate_detection(samples, size_divisible=128)
    assert batch.images.shape == (2, 3, 256, 384) and batch.image_sizes.tolist() == [[130, 200], [90, 257]]
    assert batch.images[0, :, :130, :200].all() and not batch.images[0, :, 130:].any()


def test_aspect_ratio_batches_hold_one_orientation_and_every_index_once():
    ratios = [1.5, 0.7, 1.0, 0.5, 1.33, 0.75, 2.0, 0.8, 1.2, 0.6, 1.1]
    sampler = AspectRatioGroupedBatchSampler(list(range(len(ratios)))[::-1], ratios, batch_size=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert sorted(k.index for b in batches for k in b) == list(range(len(ratios)))
    for b in batches:
        assert len({ratios[k.index] >= 1 for k in b}) == 1
    dropped = AspectRatioGroupedBatchSampler(range(len(ratios)), ratios, batch_size=2, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 5 and all(len(b) == 2 for b in dropped)


@pytest.mark.parametrize(
    ("model", "transform", "size"),
    [
        ("retinanet", ShortSideAugmentation, None),
        ("retinanet_torchvision", ShortSideAugmentation, None),
        ("ssd", SSDAugmentation, (300, 300)),
        ("ssd512", SSDAugmentation, (512, 512)),
        ("ssd_torchvision", SSDAugmentation, (300, 300)),
        ("yolo", YOLOAugmentation, (448, 448)),
        ("yolo_fast", YOLOAugmentation, (448, 448)),
    ],
)
def test_each_model_brings_its_papers_augmentation_and_input_size(model, transform, size):
    cfg = compose(f"model={model}", "data.num_train=2", "data.num_val=2")
    data = instantiate(cfg.data)
    assert type(data.train_transform) is transform
    if size:
        assert data.train_transform.size == size and data.val_transform.size == size
    else:
        assert data.train_transform.min_sizes[-1] == 800 and data.val_transform.min_size == 800
        assert data.size_divisible == 128 and data.aspect_ratio_grouping
        loader = data.train_dataloader()
        assert isinstance(loader.batch_sampler, AspectRatioGroupedBatchSampler)


def test_lightning_injects_its_distributed_sampler_into_the_grouped_batches():
    """What the Trainer does under DDP: the loader is built inside Lightning's init-capture, then re-made with a
    DistributedSampler; each rank then gets half of the batches, still grouped."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
    from torch.utils.data import BatchSampler, DistributedSampler

    data = instantiate(compose("data.num_train=40", "data.batch_size=4").data)
    with _replace_dunder_methods(BatchSampler, "__pl_saved_args"):
        loader = data.train_dataloader()
    assert _is_dataloader_shuffled(loader)  # so Lightning's DistributedSampler shuffles too
    seen = []
    for rank in (0, 1):
        ranked = _update_dataloader(loader, DistributedSampler(data.train_set, num_replicas=2, rank=rank, seed=0))
        assert isinstance(ranked.batch_sampler, AspectRatioGroupedBatchSampler) and len(ranked) == 5
        seen += [k.index for b in ranked.batch_sampler for k in b]
    assert sorted(seen) == list(range(40))
