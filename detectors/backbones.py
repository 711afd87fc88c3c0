"""Backbones: torchvision ResNet (+ FPN P3–P7 for RetinaNet).

Plain ``nn.Module``s returning a list of feature maps, finest first. Weights come from torchvision's
weights API (``weights: IMAGENET1K_V1``) or a local ``.pth`` file for machines without internet.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

RESNET_DEPTHS = (18, 34, 50, 101)
# channels of C3, C4, C5 (layer2..layer4): basic blocks for 18/34, bottlenecks (×4) for 50/101
_RESNET_STAGE_CHANNELS = {18: (128, 256, 512), 34: (128, 256, 512), 50: (512, 1024, 2048), 101: (512, 1024, 2048)}
_NORMS = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}


def build_resnet(depth: int, weights: str | None = None, norm: str = "bn") -> nn.Module:
    """A torchvision ResNet; ``weights`` is a torchvision weights name (e.g. ``IMAGENET1K_V1``), a local
    state-dict file, or None for random initialisation."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"backbone.depth={depth} is not a ResNet depth; choose one of {RESNET_DEPTHS}")
    if norm not in _NORMS:
        raise ValueError(f"backbone.norm={norm!r}: choose one of {sorted(_NORMS)}")
    name = f"resnet{depth}"
    tv_weights = None
    local_file = None
    if weights:
        if Path(str(weights)).suffix in {".pth", ".pt", ".ckpt", ".bin"} or Path(str(weights)).exists():
            local_file = Path(weights)
            if not local_file.is_file():
                raise FileNotFoundError(f"backbone.weights={weights}: no such file; give a state-dict file "
                                        f"saved from torchvision.models.{name}, a weights name such as "
                                        f"IMAGENET1K_V1, or null")
        else:
            available = [w.name for w in models.get_model_weights(name)]
            if weights not in available:
                raise ValueError(f"backbone.weights={weights!r} is not a torchvision weights name for {name}; "
                                 f"choose one of {available}, a local .pth file, or null")
            tv_weights = models.get_model_weights(name)[weights]
    net = models.get_model(name, weights=tv_weights, norm_layer=_NORMS[norm])
    if local_file is not None:
        state = torch.load(local_file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(f"{local_file}: not a {name} state dict (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    return net


def freeze_resnet_stages(net: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of (conv1, layer1..layer4), as torchvision does."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone.trainable_layers={trainable_layers}: must be in 0..5")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, param in net.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)


class ResNetFPN(nn.Module):
    """ResNet C3–C5 + FPN → P3–P7 (RetinaNet §4).

    ``p6_source='c5'`` follows the paper (P6 = 3×3 stride-2 conv on C5); ``'p5'`` computes it on P5 as
    torchvision's ``retinanet_resnet50_fpn`` does. P7 = 3×3 stride-2 conv on ReLU(P6) either way.
    Module names (``body``, ``fpn``) match torchvision's so its state dicts load directly.
    """

    def __init__(self, depth: int = 50, weights: str | None = None, out_channels: int = 256,
                 p6_source: str = "c5", norm: str = "bn", trainable_layers: int = 5) -> None:
        super().__init__()
        if p6_source not in {"c5", "p5"}:
            raise ValueError(f"backbone.p6_source={p6_source!r}: choose 'c5' (paper) or 'p5' (torchvision)")
        net = build_resnet(depth, weights, norm)
        freeze_resnet_stages(net, trainable_layers)
        c3, c4, c5 = _RESNET_STAGE_CHANNELS[depth]
        extra = LastLevelP6P7(c5 if p6_source == "c5" else out_channels, out_channels)
        extra.use_P5 = p6_source == "p5"  # set explicitly: torchvision infers it from channel equality
        fpn = BackboneWithFPN(net, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c3, c4, c5],
                              out_channels, extra_blocks=extra)
        self.body, self.fpn = fpn.body, fpn.fpn
        self.out_channels = out_channels
        self.strides = (8, 16, 32, 64, 128)

    def forward(self, images: Tensor) -> list[Tensor]:
        features: OrderedDict[str, Tensor] = self.fpn(self.body(images))
        return list(features.values())
