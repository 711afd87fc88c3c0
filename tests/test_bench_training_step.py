"""The training-step bench compares like with like: same weights, trainable set, images and targets, and
(one image per batch, where the two libraries' loss normalisations coincide) the same losses step after step."""

import torch

from bench.training_step import retinanet_case, ssd_case


def _assert_same_steps(case, steps: int = 2) -> None:
    assert case.mismatches() == []
    for _ in range(steps):  # equal totals at every step: equal losses, gradients and SGD updates
        torch.testing.assert_close(case.ours_step(), case.their_step(), rtol=1e-3, atol=1e-4)


def test_retinanet_step_matches_torchvision():
    case = retinanet_case(torch.device("cpu"), image_size=128, batch_size=1, num_classes=80, objects=3)
    assert case.batch.images.shape == (1, 3, 128, 128)
    assert not case.theirs.backbone.body.conv1.weight.requires_grad  # fine-tuning build: 3 trainable stages
    _assert_same_steps(case)


def test_ssd_step_matches_torchvision():
    case = ssd_case(torch.device("cpu"), batch_size=1, objects=3)
    assert case.targets[0]["labels"].min() >= 1  # torchvision's background is class 0
    _assert_same_steps(case)
