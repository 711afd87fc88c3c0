"""The ResNet backbones' width setting and the learning-rate schedules the CPU recipes use."""

import pytest
import torch

from detectors.backbones import ResNetFPN, build_resnet, stage_channels
from engine.detection_module import warmup_multistep


@pytest.mark.parametrize("depth", [18, 50])
def test_width_scales_every_stage_and_the_fpn_reads_them(depth):
    full, half = build_resnet(depth), build_resnet(depth, width=0.5)
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        convs = (
            [m for m in getattr(full, name).modules() if isinstance(m, torch.nn.Conv2d)]
            if name != "conv1"
            else [full.conv1]
        )
        halves = (
            [m for m in getattr(half, name).modules() if isinstance(m, torch.nn.Conv2d)]
            if name != "conv1"
            else [half.conv1]
        )
        assert [c.out_channels // 2 for c in convs] == [c.out_channels for c in halves], name
    assert stage_channels(depth, 0.5) == tuple(c // 2 for c in stage_channels(depth))
    fpn = ResNetFPN(depth, out_channels=32, width=0.5)
    assert [tuple(f.shape[1:]) for f in fpn(torch.randn(1, 3, 64, 64))] == [
        (32, 8, 8),
        (32, 4, 4),
        (32, 2, 2),
        (32, 1, 1),
        (32, 1, 1),
    ]

    def convolution_weights(net):  # a quarter at half the widths (the ImageNet classifier fc aside)
        return sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc"))

    assert convolution_weights(half) < 0.3 * convolution_weights(full)


def test_width_needs_random_initialisation():
    with pytest.raises(ValueError, match="backbone.width=0.5"):
        build_resnet(18, weights="IMAGENET1K_V1", width=0.5)


def test_linear_decay_reaches_zero_at_its_step_after_the_warm_up():
    f = warmup_multistep(warmup_steps=10, warmup_factor=0.1, linear_decay_steps=110)
    assert [f(s) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0.1, 0.55, 1.0, 0.5, 0.0, 0.0])
    g = warmup_multistep(warmup_steps=10, warmup_factor=0.1, milestones=[60], gamma=0.1, linear_decay_steps=110)
    assert g(70) == pytest.approx(0.1 * (1 - 60 / 100))  # the milestones still apply on top
