"""Tangent replay: Jacobian-vector products J v on one recorded forward, one registered rule per layer type.

Forward-mode AD recomputes the whole forward (the primal) alongside every tangent. For a network that is a
chain of layers (``nn.Sequential``-like: each layer's input is the previous layer's output), J v needs only
what each layer kept of the recorded forward, so the tangent alone is propagated, layer by layer::

    t_0 = 0,    t_k = (d f_k / d x) t_{k-1} + (d f_k / d theta_k) v_k,    J v = t_K

with v_k the tangent of layer k's own parameters. Each layer type contributes a rule in two halves, kept in
``TANGENT_RULES`` (as Opacus keeps its per-layer grad samplers):

- ``record(module, x, output) -> kept``: at the forward, what the replay will need (the input, the output,
  statistics or argmax indices read from the forward's own autograd node, or nothing); raising
  :class:`NoReplay` refuses the whole record, with the message as the reason.
- ``replay(module, kept, t, tangents) -> output tangent``: ``t`` the input tangent, ``tangents``
  {id(parameter): its tangent}. A rule without parameters is never called with ``t = None`` (zero in, zero
  out).

Adding a layer type is one decorated function::

    @register_tangent_rule(MyScale, record=keep_input, has_params=True)
    def _my_scale(module, x, t, tangents):       # y = s * x  ->  t_y = s t + t_s x
        ...

What the shipped rules keep (layer inputs, activation outputs, BatchNorm's batch statistics and max pooling's
argmax) is what autograd saves for the reverse pass anyway, so memory stays near SGD's. Anything the engine
cannot follow (a residual connection, an op between modules, dropout in train mode, a hook, a layer without a
rule, a parameter used outside a layer) makes the record invalid, and ``TangentTape.reason`` says why.

References:
    Henriques, Ehrhardt, Albanie and Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for deep
    learning", ICCV 2019 (arXiv:1805.08095), Sec. 3 (forward-mode products); Pearlmutter, "Fast exact
    multiplication by the Hessian", Neural Computation 1994 (the R-operator these rules are instances of);
    Opacus's ``register_grad_sampler`` (the registry's shape).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models import PairwiseMaxPool1d


_UNSET = object()  # a layer without a forward of its own in its __dict__ (the usual case)


class NoReplay(Exception):
    """Raised by a rule's ``record``: this call cannot be replayed; the message says why.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 1))      # train mode: a random mask
        >>> tape = TangentTape(list(model.parameters()))
        >>> with tape.recording(model):
        ...     out = model(torch.randn(4, 2))
        >>> tape.check(out); tape.reason
        'Dropout is in train mode (its mask is not recorded)'
    """


@dataclass(frozen=True)
class TangentRule:
    """One layer type's tangent rule: ``record(module, x, output) -> kept`` at the forward and
    ``replay(module, kept, t, tangents) -> output tangent`` afterwards (see the module docstring).
    ``has_params``: the rule reads parameter tangents, so it runs even when the input tangent is zero.

    Example:
        >>> from torch import nn
        >>> rule = TANGENT_RULES[nn.Tanh]
        >>> rule.record is keep_output, rule.has_params, TANGENT_RULES[nn.Linear].has_params
        (True, False, True)
    """

    record: Callable[[nn.Module, Tensor, Tensor], Any]
    replay: Callable[[nn.Module, Any, Tensor | None, dict[int, Tensor]], Tensor | None]
    has_params: bool


TANGENT_RULES: dict[type[nn.Module], TangentRule] = {}


def keep_input(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    """``record`` for a rule that needs the layer's input (refused when the layer overwrote it in place: its own
    ``inplace`` attribute, as torch's layers set it in ``__init__``, is true).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x = torch.randn(2)
        >>> keep_input(nn.GELU(), x, None) is x
        True
        >>> keep_input(nn.ELU(inplace=True), x, None)
        Traceback (most recent call last):
        ...
        backproplab.methods.curveball.tangent_replay.NoReplay: ELU(inplace=True) overwrote the input ...
    """
    if vars(module).get("inplace", False):  # set by the layer's __init__ (vars: no nn.Module.__getattr__ miss)
        raise NoReplay(f"{type(module).__name__}(inplace=True) overwrote the input its tangent rule needs")
    return x


def keep_output(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    """``record`` for an elementwise activation whose derivative is a function of its output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> y = torch.tanh(torch.randn(3))
        >>> keep_output(nn.Tanh(), None, y) is y          # tanh' = 1 - y^2: the output is all the rule needs
        True
    """
    return output


def keep_nothing(module: nn.Module, x: Tensor, output: Tensor) -> None:
    """``record`` for a linear parameter-free layer: its tangent is the layer applied to the tangent.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> keep_nothing(nn.Flatten(), torch.randn(2, 3), None) is None
        True
        >>> TANGENT_RULES[nn.Flatten].record is keep_nothing
        True
    """
    return None


def register_tangent_rule(*layer_types: type[nn.Module],
                          record: Callable[[nn.Module, Tensor, Tensor], Any] = keep_input,
                          has_params: bool = False) -> Callable:
    """Registers the decorated ``replay(module, kept, t, tangents)`` for ``layer_types`` (matched exactly, not by
    subclass: a subclass may change the forward). ``record`` says what the forward keeps for it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Square(nn.Module):                       # y = x^2, so t_y = 2 x t
        ...     def forward(self, x):
        ...         return x * x
        >>> @register_tangent_rule(Square)                 # keeps the input (the default record)
        ... def _square(module, x, t, tangents):
        ...     return 2 * x * t
        >>> model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 2))
        >>> x, v = torch.randn(5, 3), [torch.randn_like(p) for p in model.parameters()]
        >>> tape = TangentTape(list(model.parameters()))
        >>> with tape.recording(model):
        ...     out = model(x)
        >>> tape.check(out); tape.reason is None
        True
        >>> names = [n for n, _ in model.named_parameters()]
        >>> _, exact = torch.func.jvp(lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
        ...                           tuple(p.detach() for p in model.parameters()), tuple(v))
        >>> torch.allclose(tape.jvp({id(p): t for p, t in zip(model.parameters(), v)}), exact, atol=1e-5)
        True
        >>> del TANGENT_RULES[Square]
    """

    def decorator(replay: Callable) -> Callable:
        for kind in layer_types:
            TANGENT_RULES[kind] = TangentRule(record, replay, has_params)
        return replay

    return decorator


def param_tangents(module: nn.Module, tangents: dict[int, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """The tangents of ``module.weight`` and ``module.bias`` (None where absent or not being moved).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(2, 3)
        >>> tw = torch.ones(3, 2)
        >>> param_tangents(layer, {id(layer.weight): tw})[0] is tw, param_tangents(layer, {})
        (True, (None, None))
    """
    params = module._parameters  # read directly: nn.Module.__getattr__ is slow, and tangents are per parameter
    weight, bias = params.get("weight"), params.get("bias")
    return (tangents.get(id(weight)) if weight is not None else None,
            tangents.get(id(bias)) if bias is not None else None)


class _ArgMax:
    """Max pooling's argmax per output, flat over the spatial dims (saved by the forward's node), and its output."""

    __slots__ = ("index", "pooled", "pooled_version")

    def __init__(self, index: Tensor, pooled: Tensor):
        self.index = index
        self.pooled = pooled
        self.pooled_version = pooled._version


def _leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` without children, each once, in ``model.modules()`` order (read from ``_modules``
    directly: ``modules()`` builds every name, which costs more than the forward of a small network)."""
    leaves: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = [child for child in module._modules.values() if child is not None]
        if children:
            stack.extend(reversed(children))
        else:
            leaves.append(module)
    return leaves


def _kept_tensor(kept: Any) -> Tensor | None:
    """The tensor whose in-place modification after the forward would invalidate ``kept``."""
    if isinstance(kept, _ArgMax):
        return kept.index
    return kept[0] if isinstance(kept, tuple) else kept


class TangentTape:
    """Records one forward through a chain of layers so that J v can be replayed.

    ``with tape.recording(model):`` records the forward run inside it (``hook``, a global module forward hook,
    records the same); ``check(outputs)`` closes the record; ``reason`` is None when it can be replayed, else
    why not; ``jvp(tangents)`` returns J v for {id(parameter): tangent} (None when zero).

    ``gram=True`` (the step will need J dz, single process): for a Linear layer with 2-D input called
    once, the second product reuses the reverse pass. There dz = G + lambda z with G_W = delta^T x and
    G_b = 1^T delta (delta: the cotangent at the layer's output), so the layer's own term is
    x dz_W^T + dz_b = (x x^T) delta + 1 (1^T delta) + lambda (x z_W^T + z_b), the last bracket kept from
    the first product. That costs B^2 (d_in + d_out) instead of B d_in d_out multiply-adds, so it is
    used where B (d_in + d_out) < d_in d_out (batch smaller than the layer).

    A ReLU followed by max pooling (``masked_after_pooling``): the replay skips the ReLU and applies its mask
    after the pooling's gather, on the pooled values, since relu'(y) at each window's argmax is [pooled > 0].
    Exact, and a quarter of the elements for 2x2 pooling. Not when the pooled output was changed in place
    later in the forward (an in-place ReLU after the pooling, say): then the ReLU replays as usual.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> tape = TangentTape(list(model.parameters()))
        >>> x = torch.randn(5, 3)
        >>> with tape.recording(model):
        ...     out = model(x)
        >>> tape.check(out)
        >>> v = [torch.randn_like(p) for p in model.parameters()]
        >>> names = [n for n, _ in model.named_parameters()]
        >>> _, exact = torch.func.jvp(lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
        ...                           tuple(p.detach() for p in model.parameters()), tuple(v))
        >>> torch.allclose(tape.jvp({id(p): t for p, t in zip(model.parameters(), v)}), exact, atol=1e-6)
        True

    References:
        Henriques et al., ICCV 2019 (arXiv:1805.08095), Sec. 3; Pearlmutter, Neural Computation 1994.
    """

    def __init__(self, params: list[Tensor], gram: bool = False, model: nn.Module | None = None):
        self.param_ids = {id(p) for p in params}
        self.module_ids = None if model is None else {id(m) for m in model.modules()}
        self.gram = gram
        self.gram_calls: set[int] = set()  # calls whose second product uses the Gram form
        self._deltas: dict[int, Tensor] = {}  # cotangents at those layers' outputs, from the reverse pass
        self._own: dict[int, Tensor] = {}  # their first product's own term x z_W^T + z_b
        self.calls: list[tuple[nn.Module, TangentRule, Any]] = []  # (layer, its rule, what the rule kept)
        self.masked_after_pooling: set[int] = set()  # ReLU calls whose mask the next max pooling applies
        self.reason: str | None = None
        self._last_output: weakref.ref | None = None
        self._first = True
        self._versions: list[tuple[Tensor, int, str]] = []  # what each rule keeps must not change after

    def _invalid(self, why: str) -> None:
        if self.reason is None:
            self.reason = why

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The record as a global module forward hook: containers are skipped, their leaf layers recorded."""
        if self.reason is not None or next(module.children(), None) is not None:
            return  # containers: their leaves are recorded
        if self.module_ids is not None and id(module) not in self.module_ids:
            return  # not the model's (a loss module inside a step closure, say)
        self._record(module, args, output)

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Records the forward of ``model`` that runs inside the block (the same record as ``hook``).

        Each leaf layer's ``forward`` is wrapped for the block's duration. A global forward hook would send
        every module call through ``nn.Module``'s hook path, which on a small network costs as much as
        recording itself; the wrappers leave that path alone."""
        wrapped: list[tuple[nn.Module, Any]] = []
        try:
            for module in _leaf_modules(model):
                wrapped.append((module, module.__dict__.get("forward", _UNSET)))
                module.__dict__["forward"] = self._recorder(module)
            yield
        finally:
            for module, previous in wrapped:
                if previous is _UNSET:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = previous

    def _recorder(self, module: nn.Module) -> Callable:
        forward = module.forward

        def recorded_forward(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            if kwargs:
                self._invalid(f"{type(module).__name__} is called with keyword arguments")
            elif self.reason is None:
                self._record(module, args, output)
            return output

        return recorded_forward

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        name = type(module).__name__
        if module._forward_pre_hooks or (module._forward_hooks and any(
                not getattr(h, "_curveball_catch", False) for h in module._forward_hooks.values())):
            return self._invalid(f"{name} has forward hooks of its own")
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return self._invalid(f"{name} is not called with one tensor in and one tensor out")
        x = args[0]
        if torch.is_autocast_enabled(x.device.type):  # the replay would mix the autocast dtypes
            return self._invalid(f"autocast is on ({name} ran in reduced precision)")
        if self._first:
            self._first = False
            if x.requires_grad:
                return self._invalid(f"the first layer ({name})'s input requires grad")
        elif self._last_output is None or self._last_output() is not x:
            return self._invalid(f"{name}'s input is not the previous layer's output (not a plain chain)")
        rule = TANGENT_RULES.get(type(module))
        if rule is None:
            return self._invalid(f"{name} has no tangent rule")
        try:
            kept = rule.record(module, x, output)
        except NoReplay as refusal:
            return self._invalid(str(refusal))
        if self.gram and type(module) is nn.Linear:
            self._use_gram_form(module, x, output)
        self.calls.append((module, rule, kept))
        kept_tensor = _kept_tensor(kept)
        if kept_tensor is not None:
            self._versions.append((kept_tensor, kept_tensor._version, name))
        self._last_output = weakref.ref(output)

    def _use_gram_form(self, module: nn.Linear, x: Tensor, output: Tensor) -> None:
        """Marks this Linear call for the Gram form of J dz where that is cheaper; keeps its output's cotangent."""
        weight = module._parameters.get("weight")
        if weight is not None and x.dim() == 2 and id(weight) in self.param_ids:
            d_out, d_in = weight.shape
            if x.shape[0] * (d_in + d_out) < d_in * d_out and output.requires_grad:
                self.gram_calls.add(len(self.calls))
                output.register_hook(functools.partial(self._deltas.__setitem__, len(self.calls)))

    def check(self, outputs: Tensor) -> None:
        """Valid only if the model's output is the last layer's and every parameter sits in a layer."""
        if self.reason is None and (self._last_output is None or self._last_output() is not outputs):
            self._invalid("the model's output is not the last layer's output")
        if self.reason is None:
            covered = {id(p) for m, _, _ in self.calls for p in m._parameters.values() if p is not None}
            if not self.param_ids <= covered:
                self._invalid("a parameter is used outside the recorded layers")
        for kept, version, name in self._versions:
            if self.reason is None and kept._version != version:
                self._invalid(f"what {name} keeps for its tangent rule was modified in place later in the forward")
        self._versions = []
        self.masked_after_pooling = {
            i for i, ((relu, _, _), (_, _, pool)) in enumerate(zip(self.calls, self.calls[1:]))
            if type(relu) is nn.ReLU and isinstance(pool, _ArgMax) and pool.pooled._version == pool.pooled_version}
        once = [m for m, _, _ in self.calls]
        self.gram_calls = {i for i in self.gram_calls if once.count(self.calls[i][0]) == 1}  # shared: G sums calls
        if self.reason is not None:
            self.calls, self.gram_calls, self.masked_after_pooling = [], set(), set()

    @torch.no_grad()
    def jvp(self, tangents: dict[int, Tensor], lambd: Tensor | None = None) -> Tensor | None:
        """J v for the parameter tangents ``tangents`` (id(param) -> tensor); None when it is zero.

        The first call is J z. Passing ``lambd`` marks the second, J dz with dz = G + lambd z, after
        the reverse pass: the Gram-form layers then use their cotangents instead of dz's weights."""
        t: Tensor | None = None
        for i, (module, rule, kept) in enumerate(self.calls):
            if i in self.gram_calls:
                if lambd is None:
                    own = rule.replay(module, kept, None, tangents)
                    self._own[i] = own
                    t = own.clone() if t is None else torch.addmm(own, t, module.weight.t())
                    continue
                if i in self._deltas and i in self._own:
                    delta, own = self._deltas.pop(i), self._own.pop(i).mul_(lambd)
                    if module.bias is not None and id(module.bias) in tangents:
                        own.add_(delta.sum(0))
                    own.addmm_(kept @ kept.t(), delta)
                    t = own if t is None else own.addmm_(t, module.weight.t())
                    continue
            if i in self.masked_after_pooling:
                continue
            if t is not None or rule.has_params:
                t = rule.replay(module, kept, t, tangents)
                if i - 1 in self.masked_after_pooling:  # relu'(y) at the argmax is [pooled > 0]
                    t = torch.ops.aten.threshold_backward.grad_input(t, kept.pooled, 0, grad_input=t)
        return t


# ---------------------------------------------------------------- the rules
# Every rule below overwrites the input tangent where it can: t is always the replay's own temporary.


@register_tangent_rule(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, has_params=True)
def _affine(m: nn.Module, x: Tensor, t: Tensor | None, tangents: dict[int, Tensor]) -> Tensor | None:
    """Linear / convolution y = W x + b:  t_y = W t + t_W x + t_b."""
    tw, tb = param_tangents(m, tangents)
    if type(m) is nn.Linear and x.dim() == 2 and tw is not None:  # one allocation, products accumulated
        out = torch.addmm(tb, x, tw.t()) if tb is not None else x @ tw.t()
        return out if t is None else out.addmm_(t, m.weight.t())
    apply = F.linear if type(m) is nn.Linear else m._conv_forward
    out = apply(t, m.weight, None) if t is not None else None
    if tw is not None or tb is not None:  # a frozen weight with a trained bias is rare: no shortcut
        own = apply(x, torch.zeros_like(m.weight) if tw is None else tw, tb)
        out = own if out is None else out.add_(own)
    return out


def _batchnorm_statistics(m: nn.Module, x: Tensor, output: Tensor) -> tuple:
    """The input with the batch mean and 1/std, from the forward's own node when it has them (else None: recomputed)."""
    node = output.grad_fn
    saved = node is not None and type(node).__name__ == "NativeBatchNormBackward0" and node._saved_training
    return (x, node._saved_result1, node._saved_result2) if saved else (x, None, None)


@register_tangent_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, record=_batchnorm_statistics, has_params=True)
def _batchnorm(m: nn.Module, kept: tuple, t: Tensor | None, tangents: dict[int, Tensor]) -> Tensor | None:
    return _batchnorm_tangent(m, kept, t, *param_tangents(m, tangents))


def _batchnorm_tangent(m: nn.Module, kept: tuple, t: Tensor | None, tw: Tensor | None,
                       tb: Tensor | None) -> Tensor | None:
    """JVP of batch normalisation y = gamma xhat + beta, xhat = (x - mean) / s.

    With batch statistics (train mode) mean and s depend on the whole batch, and the input part is
    t_xhat = (t - mean(t) - xhat mean(xhat t)) / s. That map is symmetric within a channel, so
    gamma t_xhat is exactly the batch-norm VJP of t, one fused ``native_batch_norm_backward``.
    The parameter part t_gamma xhat + t_beta is a per-channel affine map of x."""
    if t is None and tw is None and tb is None:
        return None
    x, mean, invstd = kept
    shape = (1, -1, *[1] * (x.dim() - 2))
    batch_stats = m.training or m.running_mean is None
    if not batch_stats:
        mean, invstd = m.running_mean, torch.rsqrt(m.running_var + m.eps)
    elif mean is None:
        var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
        invstd = torch.rsqrt(var + m.eps)
    out = None
    if t is not None:
        if batch_stats:
            out = torch.ops.aten.native_batch_norm_backward(
                t, x, m.weight, None, None, mean, invstd, True, m.eps, [True, False, False])[0]
        else:
            scale = invstd if m.weight is None else invstd * m.weight
            out = t * scale.view(shape)
    if tw is not None or tb is not None:
        coef = invstd * tw if tw is not None else torch.zeros_like(invstd)
        shift = -mean * coef if tb is None else tb - mean * coef
        out = (x * coef.view(shape) if out is None else out.addcmul_(x, coef.view(shape))).add_(shift.view(shape))
    return out


@register_tangent_rule(nn.ReLU, record=keep_output)
def _relu(m: nn.Module, y: Tensor, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """t_y = [y > 0] t (from the output, which autograd keeps too)."""
    return torch.ops.aten.threshold_backward.grad_input(t, y, 0, grad_input=t)


@register_tangent_rule(nn.Tanh, record=keep_output)
def _tanh(m: nn.Module, y: Tensor, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """t_y = (1 - y^2) t."""
    return torch.ops.aten.tanh_backward.grad_input(t, y, grad_input=t)


@register_tangent_rule(nn.Sigmoid, record=keep_output)
def _sigmoid(m: nn.Module, y: Tensor, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """t_y = y (1 - y) t."""
    return torch.ops.aten.sigmoid_backward.grad_input(t, y, grad_input=t)


def _eval_mode_dropout(m: nn.Module, x: Tensor, output: Tensor) -> None:
    if m.training and m.p > 0:
        raise NoReplay(f"{type(m).__name__} is in train mode (its mask is not recorded)")
    return None


@register_tangent_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                       record=_eval_mode_dropout)
def _identity(m: nn.Module, kept: None, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """Dropout in eval mode (or p = 0) is the identity."""
    return t


@register_tangent_rule(nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample, nn.ZeroPad1d,
                       nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle, record=keep_nothing)
def _linear_map(m: nn.Module, kept: None, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """A linear parameter-free layer: t_y = m(t) (its forward alone: the record refused layers with hooks)."""
    return m.forward(t)


@register_tangent_rule(nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus,
                       nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
                       nn.Softmax, nn.LogSoftmax, nn.ConstantPad1d, nn.ConstantPad2d)
def _func_jvp(m: nn.Module, x: Tensor, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """Any other parameter-free layer whose output is a deterministic function of its one input: its JVP at the
    recorded input, by torch.func."""
    return torch.func.jvp(m, (x,), (t,))[1]


# autograd nodes whose saved result1 is the argmax index of each output (flat over the spatial dims)
_POOL_NODES = ("MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0",
               "AdaptiveMaxPool3DBackward0")


def _pool_node(node: Any) -> Any:
    """The max-pooling autograd node holding the argmax indices (1-d pooling runs as 2-d, then squeezes)."""
    if node is not None and type(node).__name__ == "SqueezeBackward1":
        node = node.next_functions[0][0]
    return node if node is not None and type(node).__name__ in _POOL_NODES else None


def _max_pool_argmax(m: nn.Module, x: Tensor, output: Tensor) -> _ArgMax | Tensor:
    """The argmax of each window from the forward's own node; the input where the node does not hold it."""
    node = output.grad_fn
    if type(m) is PairwiseMaxPool1d:
        if node is not None and type(node).__name__ == "MaxBackward0":
            # the argmax within each pair (0 or 1) as a flat input position
            pairs = torch.arange(output.shape[-1], device=output.device) * 2
            return _ArgMax(node._saved_indices + pairs, output)
    elif (pool_node := _pool_node(node)) is not None:
        return _ArgMax(pool_node._saved_result1.view(output.shape), output)
    return keep_input(m, x, output)


@register_tangent_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                       nn.AdaptiveMaxPool3d, PairwiseMaxPool1d, record=_max_pool_argmax)
def _max_pool(m: nn.Module, kept: _ArgMax | Tensor, t: Tensor, tangents: dict[int, Tensor]) -> Tensor:
    """Max pooling: the tangent at each window's argmax."""
    if isinstance(kept, _ArgMax):
        return t.flatten(2).gather(2, kept.index.flatten(2)).view(kept.index.shape)
    return _func_jvp(m, kept, t, tangents)
