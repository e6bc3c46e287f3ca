"""Linear Backprop: nonlinear forward, linear backward.

Yazdani, "Linear Backprop in non-linear networks", NeurIPS 2018 workshop on Compact Deep Neural
Networks (OpenReview ByfPDyrYim). The forward pass is unchanged, h_l = f(z_l), but the backward pass
takes every activation's derivative as 1, so the error signal is

    delta_l = W_{l+1}^T delta_{l+1}        (instead of  f'(z_l) * W_{l+1}^T delta_{l+1}),

the identity straight-through estimator (Bengio, Leonard, Courville 2013) applied to every activation,
smooth ones included. Parameter gradients are dL/dW_l = delta_l h_{l-1}^T with the *nonlinear* h.

:func:`linear_backprop` switches, in place, each activation module to a subclass of its own class
(``nn.Tanh`` becomes ``LinearBackwardTanh``, still an ``nn.Tanh`` with the same attributes and hooks)
whose forward gives bit-identical outputs, in any dtype, and whose derivative is the identity.
:func:`standard_backprop` switches it back. In plain reverse mode no Python runs in the backward
pass (see :class:`LinearBackward`); under ``torch.func`` (vmap, grad, jvp) and
``torch.autograd.forward_ad`` it is a ``torch.autograd.Function`` with ``setup_context``, a generated
vmap rule and a ``jvp`` (the tangent passes through unchanged, the forward-mode twin of the identity
backward), so it composes with forward-mode optimizers such as CurveBall.
``x + (f(x) - x).detach()`` is deliberately not used: in low precision it changes the forward.
"""

from __future__ import annotations

import warnings

from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Sign

KNOWN_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, Sign)


def _original_forward(module: nn.Module, x: Tensor) -> Tensor:
    if getattr(module, "inplace", False):
        x = x.clone()  # ReLU(inplace=True) and kin must not modify the input of an autograd.Function
    return module._original_class.forward(module, x)


class _IdentityBackward(torch.autograd.Function):
    """y = f(x) forward; dy/dx taken as the identity in both reverse and forward mode.

    This is the form torch.func (vmap, grad, jvp) requires: a separate ``setup_context``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, module: nn.Module) -> Tensor:
        return _original_forward(module, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, module_tangent) -> Tensor:
        return x_tangent


class _IdentityBackwardEager(torch.autograd.Function):
    """The same function for ordinary autograd and ``torch.autograd.forward_ad``.

    ``Function.apply`` binds the arguments of a ``setup_context``-style function with
    ``inspect.signature`` on every call, which costs more than the activation derivative linear
    backprop saves (about 25 us a call on CPU); the combined ``forward(ctx, ...)`` form skips it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        return _original_forward(module, x)

    backward = _IdentityBackward.backward
    jvp = _IdentityBackward.jvp


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _forward_ad_active() -> bool:
    return getattr(fwAD, "_current_level", 0) >= 0


# In-place twins of the activations (the same ATen kernels as the out-of-place calls: bit-identical).
_INPLACE: dict[type[nn.Module], Callable[[nn.Module, Tensor], Tensor]] = {
    nn.ReLU: lambda m, t: t.relu_(),
    nn.Tanh: lambda m, t: t.tanh_(),
    nn.Sigmoid: lambda m, t: t.sigmoid_(),
    nn.LeakyReLU: lambda m, t: F.leaky_relu_(t, m.negative_slope),
    nn.ELU: lambda m, t: F.elu_(t, m.alpha),
    nn.Hardtanh: lambda m, t: F.hardtanh_(t, m.min_val, m.max_val),
    nn.SiLU: lambda m, t: F.silu(t, inplace=True),
}


_recorded_forwards = [0]  # forwards of switched activations that autograd recorded (see linear_backprop_scope)


class LinearBackward(nn.Module):
    """Put in front of an activation's class: same forward, identity derivative.

    ``isinstance(m, LinearBackward)`` tells a switched module; ``m._original_class`` is its class before.
    The forward takes one of three paths, all with the activation's own forward values:

    - no autograd recording (``torch.no_grad`` and no forward-mode AD): the activation itself;
    - plain reverse mode, an activation with an in-place twin (ReLU, LeakyReLU, ELU, Hardtanh, SiLU,
      Sigmoid, Tanh): ``out = x.clone()``, then the in-place activation on ``out`` outside the graph.
      The graph holds only ``clone``, whose derivative is the identity, so no Python runs in the
      backward pass and nothing is saved for it: the step costs what skipping f' should cost;
    - otherwise (torch.func transforms, ``forward_ad``, GELU, Softplus, Sign, opted-in activations):
      a custom ``autograd.Function`` with identity ``backward`` and ``jvp``.

    Forward hooks on the activation run as before, since the module itself is still what is called.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> act = linear_backprop(nn.Sequential(nn.Tanh()))[0]
        >>> isinstance(act, LinearBackward), act._original_class is nn.Tanh
        (True, True)
        >>> x = torch.tensor([0.5, 3.0], requires_grad=True)
        >>> y = act(x)
        >>> y.sum().backward()
        >>> torch.allclose(y, torch.tanh(x)), x.grad.tolist()          # tanh forward, derivative 1 backward
        (True, [1.0, 1.0])

    References:
        Yazdani, "Linear Backprop in non-linear networks", NeurIPS 2018 workshop.
    """

    _original_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        if _transforms_active() or _forward_ad_active():
            _recorded_forwards[0] += 1
            return _IdentityBackward.apply(x, self)
        if not torch.is_grad_enabled():
            return self._original_class.forward(self, x)
        _recorded_forwards[0] += 1
        inplace = _INPLACE.get(self._original_class)
        if inplace is None:
            return _IdentityBackwardEager.apply(x, self)
        out = x.clone()
        with torch.no_grad():
            inplace(self, out)
        return out

    def extra_repr(self) -> str:
        inner = self._original_class.extra_repr(self)
        return (inner + ", " if inner else "") + "derivative taken as 1"


_SWITCHED: dict[type[nn.Module], type[nn.Module]] = {}


def _switched_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``LinearBackward<Name>``, kept as a module global so that pickling finds it by name."""
    if cls not in _SWITCHED:
        name = f"LinearBackward{cls.__name__}"
        while name in globals() and globals()[name]._original_class is not cls:
            name += "_"
        new = type(name, (LinearBackward, cls), {"__module__": __name__, "__qualname__": name,
                                                 "_original_class": cls})
        _SWITCHED[cls] = globals()[name] = new
    return _SWITCHED[cls]


def _activation_like(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation" or isinstance(module, Sign)


def linear_backprop(model: nn.Module, activations: Sequence[type[nn.Module]] = KNOWN_ACTIVATIONS, *,
                    ignore: Sequence[type[nn.Module]] = ()) -> nn.Module:
    """Switch ``model`` to linear backprop **in place** and return it.

    Every module that is an instance of one of ``activations`` is switched to :class:`LinearBackward`
    (its class changes; the object, its attributes and hooks stay).
    Any other ``torch.nn`` activation module found (PReLU, Mish, Softmax, ...) raises ``ValueError``
    naming it, unless listed in ``ignore`` (kept with its true derivative) or in ``activations``
    (treated as elementwise with derivative 1). Undo with :func:`standard_backprop`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = linear_backprop(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> model(x).sum().backward()                  # the ReLU's derivative is taken as 1
        >>> torch.allclose(x.grad, model[0].weight.sum(0).expand(4, 3))
        True
        >>> is_linear_backprop(standard_backprop(model))
        False

    References:
        Yazdani, "Linear backprop in non-linear networks", NeurIPS 2018 workshop (Compact Deep Neural Networks
        with industrial applications).
    """
    activations, ignore = tuple(activations), tuple(ignore)
    unknown = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
               if _activation_like(m) and not isinstance(m, activations + ignore)]
    if unknown:
        raise ValueError(f"linear_backprop does not know the activation(s) {', '.join(unknown)}; pass "
                         "activations=KNOWN_ACTIVATIONS + (TheClass,) to give them derivative 1, or "
                         "ignore=(TheClass,) to keep their true derivative")
    switched = 0
    for module in model.modules():
        if isinstance(module, activations):
            switched += 1
            if not isinstance(module, LinearBackward):
                module.__class__ = _switched_class(type(module))
    if not switched:
        warnings.warn(f"linear_backprop switched nothing in {type(model).__name__}: it has no activation module "
                      "(functional calls such as F.relu or torch.relu are not seen); use activation modules "
                      "(nn.ReLU, ...) or pass activations=KNOWN_ACTIVATIONS + (YourModule,)", stacklevel=2)
    return model


def standard_backprop(model: nn.Module) -> nn.Module:
    """Undo :func:`linear_backprop` in place: every switched activation gets its own class back.

    Example:
        >>> from torch import nn
        >>> model = linear_backprop(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
        >>> type(standard_backprop(model)[1]) is nn.Tanh
        True
    """
    for module in model.modules():
        if isinstance(module, LinearBackward):
            module.__class__ = module._original_class
    return model


@contextmanager
def linear_backprop_scope(model: nn.Module, **kwargs) -> Iterator[nn.Module]:
    """Linear backprop for the forward passes run inside the block, ordinary backprop after it::

        with linear_backprop_scope(model):
            F.cross_entropy(model(x), y).backward()

    The derivative is chosen when autograd records the forward, so the forward must run inside the
    scope; a block in which no switched activation ran a recorded forward (``loss.backward()`` alone,
    on a loss computed before) raises ``RuntimeError`` on exit, since its gradients were ordinary ones.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with linear_backprop_scope(model):
        ...     model(torch.randn(3, 2)).sum().backward()
        >>> type(model[1]) is nn.ReLU                   # ordinary backprop again after the block
        True
    """
    linear_backprop(model, **kwargs)
    before = _recorded_forwards[0]
    failed = False
    try:
        yield model
    except BaseException:
        failed = True
        raise
    finally:
        standard_backprop(model)
        if not failed and _recorded_forwards[0] == before and is_switchable(model, **kwargs):
            raise RuntimeError("linear_backprop_scope: no forward pass ran inside the scope, so any backward in "
                               "it gave ordinary gradients (the derivative is fixed when the forward is "
                               "recorded). Run the forward inside: with linear_backprop_scope(model): "
                               "loss_fn(model(x), y).backward()")


def is_switchable(model: nn.Module, activations: Sequence[type[nn.Module]] = KNOWN_ACTIVATIONS,
                  **kwargs) -> bool:
    """Whether :func:`linear_backprop` would switch any module of ``model``.

    Example:
        >>> from torch import nn
        >>> is_switchable(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), is_switchable(nn.Linear(2, 2))
        (True, False)
    """
    return any(isinstance(m, tuple(activations)) for m in model.modules())


def is_linear_backprop(model: nn.Module) -> bool:
    """True when any activation of ``model`` is switched to :class:`LinearBackward`.

    Example:
        >>> from torch import nn
        >>> is_linear_backprop(nn.ReLU()), is_linear_backprop(linear_backprop(nn.Sequential(nn.ReLU())))
        (False, True)
    """
    return any(isinstance(m, LinearBackward) for m in model.modules())



for _cls in KNOWN_ACTIVATIONS:  # made at import, so a pickled switched model loads in a fresh process
    _switched_class(_cls)
