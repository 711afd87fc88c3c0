"""How far a bf16-mixed training step's gradient is from the exact one: ``python -m bench.bf16_gradients``.

One RetinaNet R50-FPN training step from random weights, on the same images and boxes, in float64 (the reference),
float32 and under bf16 autocast; for each part (ResNet body, FPN, the two subnets) the cosine between that
precision's gradient and float64's, and its norm ÷ float64's. Rows: ours with trainable BatchNorm (``model=retinanet``),
ours with frozen BatchNorm (the paper's fine-tuning setting, here from random weights), and torchvision's
``retinanet_resnet50_fpn`` (trainable BatchNorm without its ImageNet weights) as the peer.

Why: on a GPU, ``model=retinanet`` diverged in bf16-mixed where float32 trained (docs/BENCHMARKS.md, "On a GPU").
With trainable BatchNorm the body's bf16 gradient is mostly rounding: the focal loss pushes every anchor's logits
down alike, BatchNorm's backward subtracts that common part, and what is left is smaller than bf16's rounding of
the gradient arriving at it. ``--device cuda`` measures CUDA's autocast; ``--size``/``--batch`` the input.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .training_step import random_samples, train_config

PARTS = {
    "ours": {"body": "backbone.body.", "fpn": "backbone.fpn.", "cls subnet": "head.cls_", "box subnet": "head.box_"},
    "torchvision": {
        "body": "backbone.body.",
        "fpn": "backbone.fpn.",
        "cls subnet": "head.classification_head.",
        "box subnet": "head.regression_head.",
    },
}


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def step_gradients(
    model: nn.Module, loss_of: Callable[[nn.Module, torch.dtype], Tensor], precision: str, device: torch.device
) -> dict[str, Tensor]:
    """Each parameter's gradient (float64, flattened) after one backward of ``loss_of`` at ``precision``."""
    model = copy.deepcopy(model).to(device)
    dtype = torch.float64 if precision == "float64" else torch.float32
    model.to(dtype)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_of(model, dtype)
    loss.backward()
    return {n: p.grad.detach().double().flatten().cpu() for n, p in model.named_parameters() if p.grad is not None}


def compare(name: str, model: nn.Module, loss_of: Callable, parts: dict[str, str], device: torch.device) -> list[dict]:
    exact = step_gradients(model, loss_of, "float64", device)
    rows = []
    for precision in ("float32", "bf16"):
        grads = step_gradients(model, loss_of, precision, device)
        row = {"model": name, "precision": precision}
        for part, prefix in parts.items():
            names = [n for n in exact if n.startswith(prefix)]
            a, b = torch.cat([exact[n] for n in names]), torch.cat([grads[n] for n in names])
            row[part] = (cosine(b, a), float(b.norm() / a.norm()))
        rows.append(row)
    return rows


def ours(norm: str, samples: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[nn.Module, Callable]:
    from hydra.utils import instantiate
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from detectors.batch import collate_detection

    overrides = [f"model.backbone.norm={norm}"] + (["model.backbone.trainable_layers=3"] if norm == "frozen_bn" else [])
    net = instantiate(train_config("model=retinanet", "data=shapes", *overrides).model).net.train()
    batch = collate_detection(samples)

    def loss_of(model: nn.Module, dtype: torch.dtype) -> Tensor:
        moved = move_data_to_device(batch, next(model.parameters()).device)
        if dtype == torch.float64:
            moved = type(moved)(**{k: v.double() if v.is_floating_point() else v for k, v in vars(moved).items()})
        return sum(model.compute_losses(moved).values())

    return net, loss_of


def torchvision_retinanet(samples: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[nn.Module, Callable]:
    from torchvision.models.detection import retinanet_resnet50_fpn

    size = samples[0][0].shape[-1]
    net = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=size, max_size=size)

    def loss_of(model: nn.Module, dtype: torch.dtype) -> Tensor:
        device = next(model.parameters()).device
        ims = [(im.to(device, dtype) / 255) for im, _ in samples]
        tgs = [{"boxes": t["boxes"].to(device, dtype), "labels": t["labels"].to(device) + 1} for _, t in samples]
        return sum(model(ims, tgs).values())

    return net.train(), loss_of


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.bf16_gradients", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=320, help="square input side (default 320)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # noise images, three boxes each of sides 0.1–0.4 of the input, three classes
    samples = random_samples(args.batch, args.size, 3, 3, 0.1 * args.size, 0.4 * args.size, seed=0)
    rows = []
    for norm in ("bn", "frozen_bn"):
        net, loss_of = ours(norm, samples)
        rows += compare(f"ours, {norm}", net, loss_of, PARTS["ours"], device)
    net, loss_of = torchvision_retinanet(samples)
    rows += compare("torchvision, bn", net, loss_of, PARTS["torchvision"], device)
    parts = list(PARTS["ours"])
    print(
        f"\nRetinaNet R50-FPN, random weights, {args.batch}×{args.size}² on {device}: cosine with the float64 "
        "gradient (norm ÷ float64's)\n"
    )
    print("| model | precision | " + " | ".join(parts) + " |")
    print("|---|---|" + "---:|" * len(parts))
    for row in rows:
        cells = " | ".join(f"{row[p][0]:.3f} ({row[p][1]:.2f})" for p in parts)
        print(f"| {row['model']} | {row['precision']} | {cells} |")
    return rows


if __name__ == "__main__":
    main()
