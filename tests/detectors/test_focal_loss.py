import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from detectors.losses import focal_loss_dense, focal_loss_sparse
from detectors.retinanet import RetinaNetLoss
from detectors.priors import Priors

from ..conftest import DEVICES


def random_case(b=3, n=500, k=7, scale=4.0, device="cpu"):
    """Float32 logits (B, N, K) and labels (B, N), drawn on the CPU (the same case on every device), on ``device``."""
    logits = torch.randn(b, n, k) * scale
    labels = torch.randint(0, k + 1, (b, n))  # K = background
    labels[torch.rand(b, n) < 0.1] = -1  # ignored
    labels[torch.rand(b, n) < 0.6] = k
    return logits.to(device).requires_grad_(), labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.25), (0.5, 0.75), (5.0, -1.0), (1.0, 0.5)])
def test_sparse_equals_torchvision_value_and_gradient(gamma, alpha, device):
    logits, labels = random_case(device=device)
    # the reference: torchvision's formula in float64 on the CPU, where its own rounding (~1e-16) is nothing to ours
    exact = logits.detach().cpu().double().requires_grad_()
    k, keep = logits.shape[-1], labels.cpu() >= 0
    target = F.one_hot(labels.cpu()[keep], k + 1)[:, :k].double()
    reference = sigmoid_focal_loss(exact[keep], target, alpha=alpha, gamma=gamma, reduction="sum")
    (grad_ref,) = torch.autograd.grad(reference, exact)
    ours = focal_loss_sparse(logits, labels, gamma, alpha)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    assert ours.dtype == grad_ours.dtype == torch.float32 and grad_ours.device == logits.device
    # ~10⁴ terms ≥ 0, each a few float32 roundings (2^-24) off, summed in float32: ≲ √10⁴·2^-24 ≈ 6e-6 relative
    torch.testing.assert_close(ours.double().cpu(), reference, rtol=1e-5, atol=0)
    plain = focal_loss_dense(logits, labels, gamma, alpha)
    torch.testing.assert_close(plain.double().cpu(), reference, rtol=1e-5, atol=0)
    # the closed form takes γ·softplus(x)·(1−p) as γ·softplus(x) − γ·softplus(x)·p: a few float32 roundings of γ·|x|
    # apart, the rest of O(1) (torchvision in float32 does worse: NaN through (1−p)^γ for γ < 1 where p rounds to 1)
    atol = 8 * (1 + gamma * float(exact.detach().abs().max())) * 2.0**-24
    torch.testing.assert_close(grad_ours.double().cpu(), grad_ref, rtol=0, atol=atol)
    assert (grad_ours[labels < 0] == 0).all()  # ignored anchors get no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_handles_chunk_boundaries_and_extreme_logits(monkeypatch, device):
    from detectors import losses

    monkeypatch.setattr(losses._SparseFocalLoss, "CHUNK", {device: 37})  # many ragged chunks
    logits, labels = random_case(b=2, n=50, k=5, scale=40.0, device=device)
    ours = focal_loss_sparse(logits, labels, 2.0, 0.25)
    reference = focal_loss_dense(logits, labels, 2.0, 0.25)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_gamma_zero_alpha_minus_one_is_binary_cross_entropy():
    logits, labels = random_case()
    k = logits.shape[-1]
    keep = labels >= 0
    target = F.one_hot(labels[keep], k + 1)[:, :k].float()
    bce = F.binary_cross_entropy_with_logits(logits[keep], target, reduction="sum")
    torch.testing.assert_close(focal_loss_sparse(logits, labels, 0.0, -1.0), bce, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_retinanet_loss_normalises_by_positives_and_ignores_ignored(device):
    b, n, k = 2, 40, 3
    logits = torch.randn(b, n, k).to(device).requires_grad_()
    deltas = torch.randn(b, n, 4).to(device).requires_grad_()
    anchors = torch.tensor([[0.0, 0, 10, 10]]).repeat(n, 1) + torch.arange(n)[:, None] * 5.0
    priors = Priors(anchors.to(device), [n])
    labels = torch.full((b, n), k)
    labels[0, :3] = torch.tensor([0, 1, 2])
    labels[1, 5] = 1
    labels[1, 10:20] = -1
    labels = labels.to(device)
    boxes = priors.boxes[None].repeat(b, 1, 1) + 1.0
    outputs, assigned = {"class_scores": logits, "box_deltas": deltas}, {"labels": labels, "boxes": boxes}
    losses = RetinaNetLoss(fused=True)(outputs, assigned, Priors(priors.boxes, [n]))
    plain = RetinaNetLoss(fused=False)(outputs, assigned, Priors(priors.boxes, [n]))
    torch.testing.assert_close(losses["loss_cls"], plain["loss_cls"])
    expected = focal_loss_dense(logits, labels, 2.0, 0.25) / 4  # 4 positive anchors in the batch
    torch.testing.assert_close(losses["loss_cls"], expected)
    (grad,) = torch.autograd.grad(losses["loss_cls"] + losses["loss_box"], logits)
    assert (grad[1, 10:20] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_written_in_forward_equals_the_recomputed_one_and_survives_retain_graph(device):
    logits, labels = random_case(b=2, n=300, k=6, device=device)
    with torch.no_grad():  # no backward will follow: the forward writes no gradient, the value is the same
        plain = focal_loss_sparse(logits, labels, 2.0, 0.25)
    loss = focal_loss_sparse(logits, labels, 2.0, 0.25)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    scaled = loss * 0.37  # an upstream factor (RetinaNetLoss: 1 / #positives)
    (first,) = torch.autograd.grad(scaled, logits, retain_graph=True)  # the gradient from the forward pass
    (second,) = torch.autograd.grad(scaled, logits)  # recomputed from the saved logits
    (reference,) = torch.autograd.grad(focal_loss_dense(logits, labels, 2.0, 0.25) * 0.37, logits)
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-7)
    assert torch.equal(second, first)  # the same pass over the logits as the forward's


@pytest.mark.parametrize("device", DEVICES)
def test_normalizer_inside_gives_the_gradient_of_dividing_outside(device):
    """RetinaNetLoss divides inside the fused loss (its gradient leaves the forward pass finished): the same
    value and gradient as dividing the sum afterwards, also when the upstream gradient is not 1."""
    logits, labels = random_case(b=2, n=400, k=5, device=device)
    n = torch.tensor(7.0, device=device)
    inside = focal_loss_sparse(logits, labels, 2.0, 0.25, n)
    outside = focal_loss_sparse(logits, labels, 2.0, 0.25) / n
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)  # Σ × (1/n) against Σ / n: an ulp apart
    for upstream in (1.0, 0.5, 3.0):
        (g_in,) = torch.autograd.grad(focal_loss_sparse(logits, labels, 2.0, 0.25, n) * upstream, logits)
        (g_out,) = torch.autograd.grad(focal_loss_sparse(logits, labels, 2.0, 0.25) / n * upstream, logits)
        torch.testing.assert_close(g_in, g_out, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_sum_stays_float32_under_autocast(device):
    """Under bf16 autocast (Lightning's bf16-mixed) the chunk sums must not run as bf16 matrix products."""
    logits, labels = random_case(b=2, n=2000, k=20, device=device)
    plain = focal_loss_sparse(logits, labels, 2.0, 0.25)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        mixed = focal_loss_sparse(logits, labels, 2.0, 0.25)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=0)
