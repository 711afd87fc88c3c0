"""One whole training step, ours against torchvision's model with the same weights, images and targets.

A step is forward (normalise, backbone, head) + target assignment + loss + backward + an SGD step
(momentum 0.9, the config's lr and weight decay on both sides; SSD's lr lowered to 1e-4, see ``ssd_case``), in
train mode, the two models' steps timed in turn (median after two warm-up steps each):

* RetinaNet ResNet-50-FPN, 640×640, batch 2, 80 classes: ours from ``conf/model/retinanet_torchvision.yaml``
  (FrozenBatchNorm2d, conv1 + layer1 frozen, P6 from P5, integer anchors, L1 box loss); torchvision's built
  as ``retinanet_resnet50_fpn`` builds it for fine-tuning (FrozenBatchNorm2d, 3 trainable stages), since
  with no weights at all it would switch to plain BatchNorm and train every stage.
* SSD300 VGG16, batch 8, 20 classes + background: ours from ``conf/model/ssd_torchvision.yaml``,
  torchvision's ``ssd300_vgg16`` (every layer trainable on both sides when starting from random weights).

Both models hold the same weights (torchvision's, mapped by ``torchvision_retinanet_state_dict`` /
``torchvision_ssd_state_dict``) and see the same pixels: ours the uint8 batch (normalised in its forward),
torchvision's the same images as float [0, 1] (converted before the step, as its data loader would) at the
size its transform keeps (min/max size 640 for RetinaNet, its fixed 300×300 for SSD), so neither resizes.

Ours runs with its defaults: the faster activation layout on this machine (``model.channels_last=auto``, timed
on the case's batch as train.py times it before training: ``engine/layout.py``), each frozen BatchNorm folded
into the convolution before it (``backbone.fold_frozen_bn``) and RetinaNet's box subnet run only on tiles around
the positive anchors (``head.sparse_box_training``); torchvision's model as it comes (NCHW, BN apart, the box
subnet over every anchor).
On a GPU a third row times RetinaNet at 800 px, batch 16, under bf16 autocast with both models' weights
channels-last (torchvision's convolutions then return NHWC activations too).

What still differs, by design of the two libraries: torchvision's transform runs a (no-op) bilinear resize
and normalises per image, and its anchors are regenerated every step (ours are cached); torchvision's
RetinaNet normalises each image's loss by that image's positives and averages over images (ours: batch
sum ÷ batch positives), and its SSD matcher takes IoU ≥ 0.5 as positive (ours > 0.5, the paper's rule).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from hydra.utils import instantiate
from torch import Tensor, nn

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from detectors.batch import DetectionBatch, collate_detection
from engine import layout
from engine.detection_module import DetectionModule


@dataclass
class StepCase:
    """The two models and one training step each, on identical weights and inputs."""

    ours: nn.Module
    theirs: nn.Module
    batch: DetectionBatch  # ours: uint8 images, padded targets
    images: list[Tensor]  # torchvision's: the same images as float [0, 1]
    targets: list[dict[str, Tensor]]  # torchvision's: the same boxes, labels in its convention
    ours_optimizer: torch.optim.Optimizer
    their_optimizer: torch.optim.Optimizer
    to_ours: Callable[[dict[str, Tensor]], dict[str, Tensor]]  # torchvision's state-dict keys → ours
    label_offset: int  # torchvision's label = ours + this (1 where it counts background as class 0)
    autocast: torch.dtype | None = None  # mixed precision for both sides' forward and loss (None: float32)

    def mismatches(self) -> list[str]:
        """What differs between the two sides' weights, trainable parameters and inputs (empty: nothing)."""
        ours, theirs = self.ours.state_dict(), self.to_ours(self.theirs.state_dict())
        bad = sorted(set(ours) ^ set(theirs))
        bad += [k for k in sorted(set(ours) & set(theirs)) if not torch.equal(ours[k], theirs[k])]
        grads = {k for k, p in self.ours.named_parameters() if p.requires_grad}
        their_grads = set(self.to_ours({k: p for k, p in self.theirs.named_parameters() if p.requires_grad}))
        bad += [f"requires_grad {k}" for k in sorted(grads ^ their_grads)]
        for i, (image, target) in enumerate(zip(self.images, self.targets)):
            h, w = image.shape[-2:]
            if not torch.equal(self.batch.images[i, :, :h, :w].float() / 255, image):
                bad.append(f"image {i}")
            n = int(self.batch.valid[i].sum())
            if not torch.equal(self.batch.boxes[i, :n], target["boxes"]):
                bad.append(f"boxes {i}")
            if not torch.equal(self.batch.labels[i, :n] + self.label_offset, target["labels"]):
                bad.append(f"labels {i}")
        return bad

    def ours_losses(self) -> dict[str, Tensor]:
        with self._precision():
            return self.ours.compute_losses(self.batch)

    def their_losses(self) -> dict[str, Tensor]:
        with self._precision():
            return self.theirs(self.images, self.targets)

    def _precision(self):
        """Lightning's ``precision=bf16-mixed`` (or 16-mixed): autocast around forward and loss, not backward."""
        return torch.autocast(self.batch.images.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def ours_step(self) -> Tensor:
        return _step(self.ours_losses, self.ours_optimizer)

    def their_step(self) -> Tensor:
        return _step(self.their_losses, self.their_optimizer)


def _step(losses_fn: Callable[[], dict[str, Tensor]], optimizer: torch.optim.Optimizer) -> Tensor:
    losses = losses_fn()
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return total.detach()


def train_config(*overrides: str):
    """The config ``python train.py <overrides>`` would compose."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def model_config(*overrides: str):
    """Our model's config as ``python train.py <overrides>`` would compose it."""
    return train_config(*overrides).model


def random_samples(
    batch_size: int, image_size: int, num_classes: int, objects: int, min_box: float, max_box: float, seed: int
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """(uint8 image, target) pairs: noise images, ``objects`` boxes per image with log-uniform sides."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch_size):
        image = torch.randint(0, 256, (3, image_size, image_size), generator=g, dtype=torch.uint8)
        centre = torch.rand(objects, 2, generator=g) * image_size
        side = torch.empty(objects, 2).uniform_(math.log(min_box), math.log(max_box), generator=g).exp()
        boxes = torch.cat((centre - side / 2, centre + side / 2), 1).clamp(0, image_size)
        labels = torch.randint(0, num_classes, (objects,), generator=g)
        samples.append((image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(i)}))
    return samples


def _sgd_like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """An SGD over ``params`` with ``optimizer``'s hyper-parameters (ours comes from the config)."""
    group = optimizer.param_groups[0]
    return torch.optim.SGD(params, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _make_case(
    module: DetectionModule,
    theirs: nn.Module,
    to_ours: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    samples: list[tuple[Tensor, dict[str, Tensor]]],
    label_offset: int,
    size_divisible: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> StepCase:
    """``channels_last``: None runs ours in its config's layout (``auto``: the faster one, timed here first); True
    makes both sides NHWC, False both NCHW."""
    ours = module.net
    ours.load_state_dict(to_ours(theirs.state_dict()), strict=True)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    if channels_last is not None:
        ours.use_channels_last(channels_last)
    if channels_last:  # both networks' weights NHWC: torchvision's convolutions then return NHWC activations too
        theirs = theirs.to(memory_format=torch.channels_last)
    batch = collate_detection(samples, size_divisible)
    batch = move_data_to_device(batch, device)
    if channels_last is None and module.channels_last_auto:  # the config's `auto`, resolved here as train.py does
        amp = partial(torch.autocast, device.type, dtype=autocast) if autocast else nullcontext
        seconds = layout.time_layouts(ours, batch, ours.use_channels_last, amp)
        ours.use_channels_last(seconds[True] < seconds[False])
        print(
            f"  model.channels_last=auto: {ours.channels_last} (a forward and backward took {seconds[True]:.3f} s "
            f"channels-last, {seconds[False]:.3f} s NCHW)",
            flush=True,
        )
    images = [img.to(device).float().div_(255) for img, _ in samples]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device) + label_offset} for _, t in samples]
    ours_opt = module.optimizer_factory(_trainable(ours))
    return StepCase(
        ours,
        theirs,
        batch,
        images,
        targets,
        ours_opt,
        _sgd_like(ours_opt, _trainable(theirs)),
        to_ours,
        label_offset,
        autocast,
    )


def retinanet_case(
    device: torch.device,
    image_size: int = 640,
    batch_size: int = 2,
    num_classes: int = 80,
    objects: int = 5,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> StepCase:
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from detectors.retinanet import torchvision_retinanet_state_dict

    torch.manual_seed(seed)
    # retinanet_resnet50_fpn's fine-tuning build (its path when given weights), without the weights
    body = _resnet_fpn_extractor(
        resnet50(weights=None, norm_layer=FrozenBatchNorm2d),
        3,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    theirs = RetinaNet(body, num_classes, min_size=image_size, max_size=image_size)
    classes = ",".join(f"c{i}" for i in range(num_classes))
    ours = instantiate(
        model_config("model=retinanet_torchvision", f"data.classes=[{classes}]", f"data.image_size={image_size}")
    )
    samples = random_samples(batch_size, image_size, num_classes, objects, 24.0, 0.75 * image_size, seed)
    return _make_case(ours, theirs, torchvision_retinanet_state_dict, samples, 0, 32, device, autocast, channels_last)


def ssd_case(
    device: torch.device,
    batch_size: int = 8,
    num_classes: int = 20,
    objects: int = 5,
    seed: int = 0,
    lr: float = 1e-4,
    autocast: torch.dtype | None = None,
    channels_last: bool | None = None,
) -> StepCase:
    from torchvision.models.detection import ssd300_vgg16

    from detectors.ssd import torchvision_ssd_state_dict

    torch.manual_seed(seed)
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    classes = ",".join(f"c{i}" for i in range(num_classes))
    # lr 1e-4, not the paper's 1e-3: from random weights and 0–255-scaled inputs SSD diverges to inf within
    # three steps at 1e-3 (the lr changes none of a step's work)
    ours = instantiate(model_config("model=ssd_torchvision", f"data.classes=[{classes}]", f"model.optimizer.lr={lr}"))
    samples = random_samples(batch_size, 300, num_classes, objects, 16.0, 280.0, seed)
    # torchvision's SSD counts background as class 0
    return _make_case(ours, theirs, torchvision_ssd_state_dict, samples, 1, 1, device, autocast, channels_last)


def alternating_times(
    theirs: Callable[[], object], ours: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Seconds of each run, the two run in turn (a load spike from the machine's other users then hits both
    sides, not one), after ``warmup`` untimed runs of each (the first allocates momentum and grads)."""
    from .timing import synchronize

    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for fn, out in zip((theirs, ours), times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return times


def cases(device: torch.device) -> list[tuple[str, Callable[[], StepCase]]]:
    """The rows: RetinaNet and SSD300 at the issue's settings; on a GPU also RetinaNet's 800 px, batch 16,
    bf16-mixed, channels-last training rate (both sides' weights and activations NHWC)."""
    rows = [
        ("RetinaNet R50-FPN training step, 640×640, batch 2", partial(retinanet_case, device)),
        ("SSD300 VGG16 training step, batch 8", partial(ssd_case, device)),
    ]
    if device.type == "cuda":
        rows.append(
            (
                "RetinaNet R50-FPN training step, 800×800, batch 16, bf16-mixed, channels-last",
                partial(
                    retinanet_case, device, image_size=800, batch_size=16, autocast=torch.bfloat16, channels_last=True
                ),
            )
        )
    return rows


def training_step_rows(device: torch.device, repeats: int, record, matmul_flops_per_s: float) -> dict[str, float]:
    """Time each case's step on both sides; the floor is our step's matmul/conv FLOPs ÷ the measured matmul rate.
    Returns our training images/s per row (the loader rows compare against it)."""
    from .timing import step_flops

    rates = {}
    for what, make in cases(device):
        case = make()
        bad = case.mismatches()
        if bad:
            raise RuntimeError(f"{what}: the two models differ in {bad[:5]}")
        with torch.no_grad():  # the same start: equal losses (RetinaNet: up to its per-image normalisation)
            ours, theirs = case.ours_losses(), case.their_losses()
        print(
            f"{what}: identical weights, trainable set and inputs; first losses ours "
            f"{float(sum(ours.values())):.4f}, torchvision {float(sum(theirs.values())):.4f}",
            flush=True,
        )
        # one step each under the counter (it doubles as a warm-up): the same convolutions on both sides
        their_flops, our_flops = step_flops(case.their_step), step_flops(case.ours_step)
        print(
            f"  matmul/conv work per step: torchvision {their_flops / 1e9:.0f} GFLOP, ours {our_flops / 1e9:.0f} GFLOP",
            flush=True,
        )
        theirs_s, ours_s = alternating_times(case.their_step, case.ours_step, device, repeats)
        print(f"  steps (s): torchvision {[round(t, 3) for t in theirs_s]}, ours {[round(t, 3) for t in ours_s]}")
        images = len(case.batch)
        peer, mine = statistics.median(theirs_s), statistics.median(ours_s)
        rates[what] = images / mine
        record(
            f"{what} (torchvision {images / peer:.1f} img/s, ours {images / mine:.1f} img/s)",
            peer,
            mine,
            our_flops / matmul_flops_per_s,
            floor_kind="FLOPs",
        )
        del case
    return rates
