"""Linear Backprop: nonlinear forward, linear backward.

Yazdani, "Linear Backprop in non-linear networks", NeurIPS 2018 workshop on Compact Deep Neural
Networks (OpenReview ByfPDyrYim). The forward pass is unchanged, h_l = f(z_l), but the backward pass
takes every activation's derivative as 1, so the error signal is

    delta_l = W_{l+1}^T delta_{l+1}        (instead of  f'(z_l) * W_{l+1}^T delta_{l+1}),

the identity straight-through estimator (Bengio, Leonard, Courville 2013) applied to every activation,
smooth ones included. Parameter gradients are dL/dW_l = delta_l h_{l-1}^T with the *nonlinear* h.

:func:`linear_backprop` swaps, in place, each activation module for a :class:`LinearBackward` wrapper
whose forward calls the original module (bit-identical outputs, any dtype) and whose backward returns
the incoming gradient unchanged. It is a ``torch.autograd.Function`` with ``setup_context``, a generated
vmap rule and a ``jvp`` (the tangent passes through unchanged, the forward-mode twin of the identity
backward), so it composes with ``torch.func.vmap / grad / jvp`` and forward-mode optimizers such as
CurveBall. ``x + (f(x) - x).detach()`` is deliberately not used: in low precision it changes the forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..models import Sign
from ..train import TRANSFORMS

KNOWN_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, Sign)


class _IdentityBackward(torch.autograd.Function):
    """y = f(x) forward; dy/dx taken as the identity in both reverse and forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, fn: nn.Module) -> Tensor:
        return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, fn_tangent) -> Tensor:
        return x_tangent


class LinearBackward(nn.Module):
    """Wraps an elementwise activation: same forward, identity derivative."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return _IdentityBackward.apply(x, self.activation)

    def extra_repr(self) -> str:
        return "derivative taken as 1"


def _activation_like(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation" or isinstance(module, Sign)


def linear_backprop(model: nn.Module, activations: Sequence[type[nn.Module]] = KNOWN_ACTIVATIONS, *,
                    ignore: Sequence[type[nn.Module]] = ()) -> nn.Module:
    """Switch ``model`` to linear backprop **in place** and return it.

    Every module that is an instance of one of ``activations`` is wrapped in :class:`LinearBackward`.
    Any other ``torch.nn`` activation module found (PReLU, Mish, Softmax, ...) raises ``ValueError``
    naming it, unless listed in ``ignore`` (kept with its true derivative) or in ``activations``
    (treated as elementwise with derivative 1). Undo with :func:`standard_backprop`.
    """
    activations, ignore = tuple(activations), tuple(ignore)
    unknown = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
               if _activation_like(m) and not isinstance(m, activations + ignore)]
    if unknown:
        raise ValueError(f"linear_backprop does not know the activation(s) {', '.join(unknown)}; pass "
                         "activations=KNOWN_ACTIVATIONS + (TheClass,) to give them derivative 1, or "
                         "ignore=(TheClass,) to keep their true derivative")
    for parent in list(model.modules()):
        if isinstance(parent, LinearBackward):
            continue
        for name, child in parent.named_children():
            if isinstance(child, activations) and not isinstance(parent, LinearBackward):
                setattr(parent, name, LinearBackward(child))
    if isinstance(model, activations):
        return LinearBackward(model)
    return model


def standard_backprop(model: nn.Module) -> nn.Module:
    """Undo :func:`linear_backprop` in place: every wrapper is replaced by the activation it holds."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LinearBackward):
                setattr(parent, name, child.activation)
    return model.activation if isinstance(model, LinearBackward) else model


@contextmanager
def linear_backprop_scope(model: nn.Module, **kwargs) -> Iterator[nn.Module]:
    """``with linear_backprop_scope(model): loss.backward()`` — linear backprop inside, ordinary after."""
    linear_backprop(model, **kwargs)
    try:
        yield model
    finally:
        standard_backprop(model)


def is_linear_backprop(model: nn.Module) -> bool:
    return any(isinstance(m, LinearBackward) for m in model.modules())


TRANSFORMS["linear_backprop"] = linear_backprop
