"""Losses whose gradient and Hessian-vector product in output space are closed-form, for CurveBall's step.

CurveBall's curvature is the generalised Gauss-Newton matrix J^T H_L J (Schraudolph 2002), with H_L the loss's
Hessian with respect to the network's outputs. The step needs J_L = dL/d outputs and products H_L v; for the
two usual losses both are cheap closed forms in output space, and any other loss gets them by autograd
(a double backward over the outputs alone).

References:
    Henriques, Ehrhardt, Albanie and Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for deep
    learning", ICCV 2019 (arXiv:1805.08095), Sec. 3; Schraudolph, "Fast curvature matrix-vector products for
    second-order gradient descent", Neural Computation 2002.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]


class CrossEntropy:
    """Mean softmax cross-entropy with closed-form output gradient and Hessian-vector product:
    J_L = (p - onehot(y)) / B,  H_L v = (p * v - p (p . v)) / B per example.

    Example:
        >>> import torch
        >>> logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
        >>> ce = CrossEntropy(y)
        >>> torch.allclose(ce(logits), torch.nn.functional.cross_entropy(logits, y))
        True
        >>> hvp, grad = ce.output_grad_and_hvp(logits)
        >>> v = torch.randn(5, 3)
        >>> exact = torch.autograd.functional.hvp(ce, logits, v)[1]     # autograd's H_L v, for comparison
        >>> torch.allclose(hvp(v), exact, atol=1e-6)
        True
    """

    def __init__(self, targets: Tensor):
        self.targets = targets

    def __call__(self, outputs: Tensor) -> Tensor:
        return F.cross_entropy(outputs, self.targets)

    def output_grad_and_hvp(self, outputs: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        b = outputs.shape[0]
        q = outputs.detach().softmax(-1).div_(b)  # p / B: the fewest operations per product (a step makes two)
        grad = torch.sub(q, F.one_hot(self.targets, q.shape[-1]), alpha=1 / b)  # (p - onehot(y)) / B

        def hvp(v: Tensor) -> Tensor:  # (p v - p (p . v)) / B = q v - B q (q . v)
            qv = q * v
            return qv.addcmul_(q, qv.sum(-1, keepdim=True), value=-b)

        return hvp, grad


class MeanSquaredError:
    """Mean over all elements of (outputs - targets)^2: J_L = 2 (y - t) / N, H_L v = 2 v / N (N elements).

    Example:
        >>> import torch
        >>> out, t = torch.randn(4, 2), torch.randn(4, 2)
        >>> mse = MeanSquaredError(t)
        >>> hvp, grad = mse.output_grad_and_hvp(out)
        >>> torch.allclose(grad, 2 * (out - t) / 8), torch.allclose(hvp(torch.ones(4, 2)), torch.full((4, 2), 0.25))
        (True, True)
    """

    def __init__(self, targets: Tensor):
        self.targets = targets

    def __call__(self, outputs: Tensor) -> Tensor:
        return F.mse_loss(outputs, self.targets)

    def output_grad_and_hvp(self, outputs: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        n = outputs.numel()
        return (lambda v: 2 * v / n), 2 * (outputs.detach() - self.targets) / n


def _autograd_output_products(loss_fn: LossFn, outputs: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Tensor]:
    """Any loss: J_L by autograd, H_L v by double backward in output space."""
    y = outputs.detach().requires_grad_()
    with torch.enable_grad():
        loss = loss_fn(y)
        (grad,) = torch.autograd.grad(loss, y, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        (h,) = torch.autograd.grad(grad, y, v, retain_graph=True)
        return h

    return loss.detach(), hvp, grad.detach()

