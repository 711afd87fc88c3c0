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


class WidthScaledResNet(models.ResNet):
    """torchvision's ResNet with every width × ``width``, the stem's and the four stages': for inputs and data far
    smaller than ImageNet's, on machines where the full widths cost minutes a step. Same modules and names."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: float, **kwargs) -> None:
        self.width = width
        super().__init__(block, layers, **kwargs)

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        if not hasattr(self, "layer1"):  # the first stage: torchvision built the stem at 64 just before it
            self.inplanes = max(1, round(64 * self.width))
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(self.inplanes)  # initialised with the rest after the stages are built
        return super()._make_layer(block, max(1, round(planes * self.width)), blocks, stride, dilate)


def stage_channels(depth: int, width: float = 1.0) -> tuple[int, int, int]:
    """Channels of C3, C4, C5 (layer2..layer4) of a ResNet of this depth and width."""
    return tuple(
        max(1, round(c // (4 if depth >= 50 else 1) * width)) * (4 if depth >= 50 else 1)
        for c in _RESNET_STAGE_CHANNELS[depth]
    )


def build_resnet(
    depth: int, weights: str | None = None, norm: str = "bn", fold_frozen_bn: bool = True, width: float = 1.0
) -> nn.Module:
    """A torchvision ResNet; ``weights`` is a torchvision weights name (e.g. ``IMAGENET1K_V1``), a local
    state-dict file, or None for random initialisation. With ``norm='frozen_bn'`` and ``fold_frozen_bn``, each
    frozen BatchNorm is computed inside the convolution before it (``fold_frozen_batchnorm``). ``width`` scales
    the stages' channels (``WidthScaledResNet``; random initialisation only)."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"backbone.depth={depth} is not a ResNet depth; choose one of {RESNET_DEPTHS}")
    if norm not in _NORMS:
        raise ValueError(f"backbone.norm={norm!r}: choose one of {sorted(_NORMS)}")
    if width != 1.0 and (width <= 0 or weights):
        raise ValueError(
            f"backbone.width={width}: must be > 0, and 1.0 with backbone.weights={weights!r} "
            f"(pretrained weights have the full widths)"
        )
    name = f"resnet{depth}"
    tv_weights = None
    local_file = None
    if weights:
        if Path(str(weights)).suffix in {".pth", ".pt", ".ckpt", ".bin"} or Path(str(weights)).exists():
            local_file = Path(weights)
            if not local_file.is_file():
                raise FileNotFoundError(
                    f"backbone.weights={weights}: no such file; give a state-dict file "
                    f"saved from torchvision.models.{name}, a weights name such as "
                    f"IMAGENET1K_V1, or null"
                )
        else:
            available = [w.name for w in models.get_model_weights(name)]
            if weights not in available:
                raise ValueError(
                    f"backbone.weights={weights!r} is not a torchvision weights name for {name}; "
                    f"choose one of {available}, a local .pth file, or null"
                )
            tv_weights = models.get_model_weights(name)[weights]
    if width == 1.0:
        net = models.get_model(name, weights=tv_weights, norm_layer=_NORMS[norm])
    else:
        block = models.resnet.BasicBlock if depth < 50 else models.resnet.Bottleneck
        layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
        net = WidthScaledResNet(block, layers, width, norm_layer=_NORMS[norm])
    if local_file is not None:
        state = torch.load(local_file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(
                f"{local_file}: not a {name} state dict (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    if norm == "frozen_bn" and fold_frozen_bn:
        fold_frozen_batchnorm(net)
    return net


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine map the convolution before it applies (``ConvFrozenBN2d``): the
    identity here. It keeps its buffers and place, so state dicts keep their keys."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConvFrozenBN2d(nn.Conv2d):
    """conv → FrozenBatchNorm2d as one convolution: y = conv(x, W·s) + (b − μ·s), s = γ/√(σ² + ε).

    Frozen statistics make BN an affine map per output channel, which folds into the weight, so the
    activations are not read and written once more forward and once more backward. The fold is redone every
    call from the convolution's own weight (the one that trains and is saved) and the BN's buffers (which
    load_state_dict updates in place), so training, saving and loading see the unfolded parameters.
    """

    _frozen_bn: FoldedFrozenBatchNorm2d

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
        """Turn ``conv`` and ``bn`` in place into the folded pair (same objects, parameters and buffers)."""
        conv.__class__, bn.__class__ = cls, FoldedFrozenBatchNorm2d
        # not a submodule: the BN stays registered at its own place in the network (and in the state dict)
        conv.__dict__["_frozen_bn"] = bn

    def forward(self, x: Tensor) -> Tensor:
        bn = self._frozen_bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # as FrozenBatchNorm2d computes it
        shift = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), shift)


def fold_frozen_batchnorm(net: nn.Module) -> None:
    """Fold every FrozenBatchNorm2d that directly follows a convolution in a torchvision ResNet (stem, block
    convs, downsample) into that convolution (``ConvFrozenBN2d``)."""
    pairs = [(net, "conv1", "bn1")]
    for module in net.modules():
        if isinstance(module, (models.resnet.BasicBlock, models.resnet.Bottleneck)):
            pairs += [(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(module, f"conv{i}")]
            if module.downsample is not None:
                pairs.append((module.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d:
            ConvFrozenBN2d.fold(conv, bn)


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

    def __init__(
        self,
        depth: int = 50,
        weights: str | None = None,
        out_channels: int = 256,
        p6_source: str = "c5",
        norm: str = "bn",
        trainable_layers: int = 5,
        fold_frozen_bn: bool = True,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if p6_source not in {"c5", "p5"}:
            raise ValueError(f"backbone.p6_source={p6_source!r}: choose 'c5' (paper) or 'p5' (torchvision)")
        net = build_resnet(depth, weights, norm, fold_frozen_bn, width)
        freeze_resnet_stages(net, trainable_layers)
        c3, c4, c5 = stage_channels(depth, width)
        extra = LastLevelP6P7(c5 if p6_source == "c5" else out_channels, out_channels)
        extra.use_P5 = p6_source == "p5"  # set explicitly: torchvision infers it from channel equality
        fpn = BackboneWithFPN(
            net, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c3, c4, c5], out_channels, extra_blocks=extra
        )
        self.body, self.fpn = fpn.body, fpn.fpn
        self.out_channels = out_channels
        self.strides = (8, 16, 32, 64, 128)

    def forward(self, images: Tensor) -> list[Tensor]:
        features: OrderedDict[str, Tensor] = self.fpn(self.body(images))
        return list(features.values())
