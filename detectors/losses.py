"""Loss kernels any head can use: the α-balanced sigmoid focal loss (plain and fused) and box regression.
RetinaNet's loss, which sums them, is in ``retinanet.py``; SSD's and YOLO's in theirs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from .device_paths import takes_gpu_path


def focal_loss_dense(logits: Tensor, labels: Tensor, gamma: float, alpha: float) -> Tensor:
    """Reference formulation: one-hot targets + ``torchvision.ops.sigmoid_focal_loss``, summed.

    logits (B, N, K); labels (B, N): class, K for background, −1 ignored (no loss).
    """
    num_classes = logits.shape[-1]
    keep = labels >= 0
    targets = F.one_hot(labels[keep], num_classes + 1)[:, :num_classes].to(logits.dtype)
    return sigmoid_focal_loss(logits[keep], targets, alpha=alpha, gamma=gamma, reduction="sum")


class _SparseFocalLoss(torch.autograd.Function):
    """Σ focal loss ÷ ``normalizer`` with the one-hot target treated analytically: every (prior, class) entry is
    a negative, FL⁻(x) = (1−α)·p^γ·softplus(x), except the single target class of each positive prior, where
    FL⁺(x) = α·(1−p)^γ·softplus(−x). So the dense pass needs no target tensor, and the positives are
    corrected by a gather. The gradient is written in closed form:
      dFL⁻/dx = (1−α)·p^γ·(γ(1−p)·softplus(x) + p),   dFL⁺/dx = −α·(1−p)^γ·(γ·p·softplus(−x) + 1 − p).
    When a backward pass will follow (grad enabled), the forward pass writes that gradient too, from the same
    sigmoid and softplus (half the transcendental work of recomputing them), already ÷ ``normalizer`` (the
    number the sum is divided by; RetinaNet: #positives); backward then only scales it by the upstream
    gradient, and on the CPU not at all when that is 1 (a plain ``loss.backward()``).
    It works through the logits in chunks small enough to stay in cache (memory traffic is the cost here).
    """

    # elements per chunk. CPU: 512 KiB of float32, a few temporaries fit in L2, and each op still splits
    # across threads (ATen's grain is 32k elements; 2^16 was 10 % slower, 2^19 as slow, bench/). GPU: few launches
    CHUNK = {"cpu": 1 << 17, "cuda": 1 << 24}

    @staticmethod
    def forward(
        ctx, logits: Tensor, labels: Tensor, gamma: float, alpha: float, normalizer: Tensor, with_grad: bool
    ) -> Tensor:
        inverse = torch.ones_like(normalizer) / normalizer
        total, grad = _focal_sum_and_grad(logits, labels, gamma, alpha, inverse, with_grad)
        ctx.save_for_backward(logits, labels, inverse)
        ctx.gamma, ctx.alpha, ctx.grad = gamma, alpha, grad
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, labels, inverse = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # forward ran without grad, or a second backward (retain_graph): recompute
            _, grad = _focal_sum_and_grad(logits, labels, ctx.gamma, ctx.alpha, inverse, True)
        # ×1 is exact: skipped where checking is free (no host-device sync); elsewhere one pass over the buffer
        if takes_gpu_path(grad_out) or float(grad_out) != 1.0:
            grad.mul_(grad_out.to(grad.dtype))
        return grad.view(logits.shape), None, None, None, None, None


def _focal_sum_and_grad(
    logits: Tensor, labels: Tensor, gamma: float, alpha: float, inverse: Tensor, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Σ focal loss × ``inverse`` (float32, whatever the logits' dtype: it sums 10⁷ terms) and, if ``with_grad``,
    its gradient × ``inverse``, both from one pass over the logits in chunks (see _SparseFocalLoss)."""
    num_classes = logits.shape[-1]
    x = logits.reshape(-1, num_classes)
    lab = labels.reshape(-1)
    w_neg, w_pos = (1.0 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)  # α < 0: no balancing (torchvision)
    row_weight = (lab >= 0).to(torch.float32).mul_(inverse * w_neg)[:, None]  # (1−α)/n, 0 where ignored
    grad = torch.empty_like(x) if with_grad else None
    rows = max(1, _SparseFocalLoss.CHUNK.get(x.device.type, 1 << 24) // num_classes)
    starts = range(0, x.shape[0], rows)
    sums = x.new_empty(len(starts), dtype=torch.float32)  # one per chunk, added pairwise at the end
    for i, start in enumerate(starts):
        xc = x[start : start + rows].float()
        p, sp = torch.sigmoid(xc), F.softplus(xc)
        weight = p.pow(gamma).mul_(row_weight[start : start + rows])  # (1−α)·p^γ / n
        torch.dot(weight.view(-1), sp.view(-1), out=sums[i])
        if grad is not None:  # weight·(γ(1−p)·softplus(x) + p), as p + γ·softplus(x) − γ·softplus(x)·p
            g = torch.add(p, sp, alpha=gamma).addcmul_(sp, p, value=-gamma)
            out = grad[start : start + rows]
            if out.dtype == g.dtype:
                torch.mul(g, weight, out=out)
            else:
                out.copy_(g.mul_(weight))
    # the positives: their target class is FL⁺, not the FL⁻ counted above. Every row's label column is read
    # and the correction kept where the row is positive: no count of positives read on the host (a GPU sync)
    positive = (lab >= 0) & (lab < num_classes)
    cols = lab.clamp(0, num_classes - 1)[:, None]
    xp = x.gather(1, cols)[:, 0].float()
    pp = torch.sigmoid(xp)
    qp = 1 - pp
    correction = w_pos * qp.pow(gamma) * F.softplus(-xp) - w_neg * pp.pow(gamma) * F.softplus(xp)
    correction = torch.where(positive, correction, 0.0).sum()
    if grad is not None:
        grad_pos = (-w_pos * qp.pow(gamma) * (gamma * pp * F.softplus(-xp) + qp)).mul_(inverse).to(grad.dtype)
        grad.scatter_(1, cols, torch.where(positive, grad_pos, grad.gather(1, cols)[:, 0])[:, None])
    return sums.sum() + correction * inverse, grad


def focal_loss_sparse(
    logits: Tensor, labels: Tensor, gamma: float, alpha: float, normalizer: Tensor | None = None
) -> Tensor:
    """Same value and gradient as ``focal_loss_dense`` (÷ ``normalizer`` when given), without materialising
    targets (see _SparseFocalLoss)."""
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    if normalizer is None:
        normalizer = torch.ones((), device=logits.device)
    return _SparseFocalLoss.apply(logits, labels, float(gamma), float(alpha), normalizer.float(), with_grad)


def box_regression_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Smooth-L1 (``beta`` is the L2→L1 switch point) or plain L1 (beta 0), per element (the caller masks and
    sums)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    raise ValueError(f"loss.box_loss={kind!r}: choose 'smooth_l1' or 'l1'")
