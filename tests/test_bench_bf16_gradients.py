"""bench/bf16_gradients.py: the comparison's plumbing on a small network (the R50 rows take minutes)."""

import torch
from torch import nn

from bench.bf16_gradients import compare


def test_float32_agrees_with_float64_and_bf16_is_measured_per_part():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    images = torch.rand(2, 3, 16, 16)

    def loss_of(model, dtype):
        return model(images.to(dtype)).square().mean()

    rows = compare("small", net, loss_of, {"first": "0.", "last": "3."}, torch.device("cpu"))
    assert [r["precision"] for r in rows] == ["float32", "bf16"]
    for part in ("first", "last"):
        cosine, ratio = rows[0][part]
        # float32's rounding (2^-24 relative) through two convolutions: far inside 1e-5
        assert abs(cosine - 1) < 1e-5 and abs(ratio - 1) < 1e-5
        assert -1 <= rows[1][part][0] <= 1 and rows[1][part][1] > 0
    assert all(p.grad is None for p in net.parameters())  # each precision ran on its own copy
