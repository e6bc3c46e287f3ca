"""Per-example gradient clipping without per-example gradients: ghost norms and book-keeping.

DP-SGD (Abadi et al., CCS 2016) needs, for a batch of B examples with losses l_i, the clipped sum

    S = sum_i c_i g_i,    g_i = dl_i/dtheta,    c_i = min(1, C / (||g_i|| + 1e-6))

(Opacus's clip factor, to the same 1e-6). Opacus materialises every g_i: B copies of every weight.
Here one forward keeps each layer's input a, and one backward gives the gradient of sum_i l_i with respect
to each layer's output, g = dL/ds. That backward computes activation gradients only: no parameter is an
input of it, so autograd skips every weight-gradient product. Per layer, from (a, g):

- **The per-example norm of the layer's parameter gradient.** For a Linear layer with T positions per
  example (T = 1 for an MLP), s_i = a_i W^T + b, dW_i = g_i^T a_i:
  ``||dW_i||^2 = <a_i a_i^T, g_i g_i^T>`` from two T x T Gram matrices (ghost clipping: Goodfellow 2015 for
  T = 1, Li et al., ICLR 2022 for sequences), or ``||g_i^T a_i||^2`` with dW_i materialised: whichever costs
  fewer flops, chosen per layer and per call (mixed ghost clipping, Bu et al., AAAI 2023). Convolutions are
  Linear layers over the unfolded input (positions = output pixels). Embeddings: a_i is one-hot, so
  ``||dE_i||^2 = sum_{t,s} [id_t = id_s] g_t . g_s``. LayerNorm and GroupNorm: the per-example gradients
  of their affine parameters are as small as the parameters, so they are formed directly: LayerNorm's from
  the normalised input, GroupNorm's from the mean and 1/std its forward saved,
  ``rstd * (sum_s x_s g_s - mean * sum_s g_s)`` per channel, without normalising the input again.
- **The clipped sum, by book-keeping** (Bu et al., ICML 2023): ``S_W = (c * g)^T a``, one product of the
  kept tensors, the cost of the weight gradient in an ordinary backward (or, where dW_i was materialised,
  ``sum_i c_i dW_i``, cheaper still), returned or added in place into given tensors (DP-SGD's noise). A
  second, weighted backward (Lee & Kifer 2021) would spend the same weight-gradient products plus all the
  activation gradients again, so book-keeping is used for every layer.

Each layer type's rule is registered in ``GHOST_RULES`` (``@register_ghost_rule(nn.Linear)``, as Opacus registers
its grad samplers): a function building the layer's norms and clipped sum from its calls' kept inputs and output
gradients. Adding a layer type is one decorated function.
Any other layer that holds trainable parameters falls back to ``torch.func`` per-example gradients of that
layer alone (vmap of the layer's own vector-Jacobian product at each example's input and output gradient),
not of the whole model. A layer called several times in one forward (clean and adversarial inputs, say)
contributes the sum over its calls: positions of all calls are concatenated, which keeps the norms exact.

The first step checks the unclipped sum of the per-example gradients against autograd's batch gradient,
so a parameter used outside its module's forward (tied weights, ``F.linear(x, other.weight)``) or an output
modified in place is an error, not a silent privacy leak.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

# the most elements a convolution's unfolded input may take when formed in one piece (faster for small
# layers); larger ones are read offset by offset, in place
STACK_LIMIT = 2**22


class _Call:
    """One recorded call of a layer: its arguments, its output's gradient edge and what its rule captured."""

    __slots__ = ("args", "kwargs", "edge", "version", "stats")

    def __init__(self, args: tuple, kwargs: dict, output: Tensor, rule: GhostRule | None = None):
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"a layer with trainable parameters was called without a tensor as its first argument "
                            f"({len(args)} positional arguments); the ghost clipping engine reads its input there")
        self.args, self.kwargs = args, kwargs
        self.edge = get_gradient_edge(output)
        self.version = args[0]._version
        self.stats = None if rule is None or rule.capture is None else rule.capture(output)


class _Recording:
    def __init__(self, clipper: GhostClipping):
        self.clipper = clipper

    def __enter__(self) -> None:
        self.clipper._calls.clear()
        self.clipper._state[0] = True

    def __exit__(self, *exc) -> None:
        self.clipper._state[0] = False


class GhostClipping(nn.Module):
    """Wraps a model; ``clipped_sum`` gives DP-SGD's per-example clipped gradient sum of the last recorded loss.

    ``clipper = GhostClipping(model)``, then for each batch::

        with clipper.recording():
            loss = F.cross_entropy(clipper(x), y, reduction="sum")   # a sum of per-example losses
        sums, norms = clipper.clipped_sum(loss, max_grad_norm=C)      # {parameter: sum_i c_i g_i}, (B,) norms

    The model must not mix examples (no BatchNorm: ``privacy.prepare_model`` replaces it). A layer without a rule
    of its own is differentiated per example by ``torch.func``; ``per_example_args`` ({module or module type:
    positional indices}) says which of its arguments carry the batch along dimension 0 (default: the first
    only; the others are shared by all examples, whatever their shape). ``_module`` is the
    wrapped model, and ``hooks_enabled`` / ``enable_hooks`` / ``disable_hooks`` / ``remove_hooks`` behave as
    Opacus's ``GradSampleModule``'s, so code written for one works with the other.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> clipper = GhostClipping(model)
        >>> with clipper.recording():
        ...     loss = F.cross_entropy(clipper(x), y, reduction="sum")
        >>> sums, norms = clipper.clipped_sum(loss, max_grad_norm=1.0)
        >>> per_example = [torch.cat([g.flatten() for g in torch.autograd.grad(
        ...     F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))]).norm() for i in range(5)]
        >>> torch.allclose(norms, torch.stack(per_example), atol=1e-5)       # the norms without per-example gradients
        True

    References:
        Li, Tramer, Liang and Hashimoto, "Large language models can be strong differentially private learners",
        ICLR 2022 (ghost clipping); Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799.
    """

    def __init__(self, module: nn.Module,
                 per_example_args: Mapping[nn.Module | type, Sequence[int]] | None = None):
        super().__init__()
        self._module = module
        # which positional arguments of a torch.func layer carry the batch (default: the first only)
        self._per_example_args = dict(per_example_args or {})
        self.no_ddp = True  # clipping happens before gradients are summed across ranks
        self.hooks_enabled = True
        self._state = [False]  # recording? (a list: nn.Module's __setattr__ is slow for a per-step flag)
        self._checked = False
        self._calls: list[tuple[nn.Module, _Call]] = []
        self._layers: list[tuple[nn.Module, list[nn.Parameter]]] = []
        owner: dict[int, str] = {}
        for name, m in module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            for p in own:
                if id(p) in owner:
                    raise ValueError(f"parameter shared by modules {owner[id(p)]!r} and {name!r}: the ghost "
                                     "clipping engine needs each parameter in one module; use engine='opacus'")
                owner[id(p)] = name
            if own:
                self._layers.append((m, own))
        self._kinds = {m: _kind(m) for m, _ in self._layers}  # the registered type whose rule applies
        self._rank = {m: i for i, (m, _) in enumerate(self._layers)}  # the order of model.parameters()
        self._params = {m: list(m.parameters(recurse=False)) for m, _ in self._layers}
        self._handles = [m.register_forward_hook(self._tap, with_kwargs=True) for m, _ in self._layers]

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    # -- the Opacus GradSampleModule switches, used by the attacks to run without recording
    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.hooks_enabled = False

    def recording(self) -> _Recording:
        """Forward passes inside (with grad enabled and hooks enabled) are kept for ``clipped_sum``."""
        return _Recording(self)

    def _tap(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not (self._state[0] and self.hooks_enabled and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; the ghost clipping engine "
                            "needs layers with trainable parameters to return one tensor (use engine='opacus')")
        if output.requires_grad:
            self._calls.append((module, _Call(args, kwargs, output, GHOST_RULES.get(self._kinds[module]))))

    # -- the engine
    def clipped_sum(self, loss: Tensor, max_grad_norm: float, check: bool | None = None,
                    into: Mapping[nn.Parameter, Tensor] | Callable[[], Mapping[nn.Parameter, Tensor]] | None = None,
                    alpha: float = 1.0, scale: float = 1.0,
                    batch_size: int | None = None) -> tuple[Mapping[nn.Parameter, Tensor], Tensor]:
        """``({p: sum_i c_i dl_i/dp}, per-example norms)`` for ``loss * scale = sum_i l_i`` recorded under
        ``recording()`` (a mean over B examples: ``scale=B``; the backward starts from ``scale``, so no graph
        node multiplies the loss).

        ``into`` ({parameter: tensor of its shape}, or a function returning one, called after the backward):
        add ``alpha * sum_i c_i dl_i/dp`` to those tensors in place instead (the DP-SGD step passes its noise,
        already divided by the batch size) and return them; a parameter the loss does not reach keeps its
        tensor unchanged, and a parameter not in ``into`` still counts in the norms. Layers are summed in
        parameter order, each read from ``into`` when reached and its kept tensors freed after, so a mapping
        that makes its tensors on first read (``privacy.NoiseInOrder``) never holds them all beside every
        layer's kept tensors.
        ``check`` (default: on the first call only) first runs :meth:`verify` on the same loss.
        ``batch_size``: the number of examples; a layer whose output does not have that many along dimension 0
        raises (one norm per example, or the clipping bounds nothing).
        """
        if (not self._checked) if check is None else check:
            self.verify(loss * scale if scale != 1 else loss, retain_graph=True)
        rules = self._rules(loss, retain_graph=False, scale=scale, batch_size=batch_size)
        if callable(into):
            into = into()
        if not rules:  # nothing reached the loss: every gradient is zero
            return ({} if into is None else into), torch.zeros(0)
        with torch.no_grad():
            # Opacus's form: the norm of the stacked per-parameter norms
            norms = torch.linalg.vector_norm(torch.stack([n for _, rule in rules for n in rule.norms]), dim=0)
            factor = (norms + 1e-6).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)  # C / (norm + 1e-6)
            sums = {} if into is None else into
            for m, rule in rules:
                own = self._own(m)
                if into is None:
                    sums.update(zip(own, rule.weighted(factor)))
                else:
                    outs = [into.get(p) for p in own]
                    if all(out is not None for out in outs):
                        rule.accumulate(factor, outs, alpha)
                    else:  # a parameter left out (an optimizer holding only some of them): add the others'
                        for out, w in zip(outs, rule.weighted(factor)):
                            if out is not None:
                                out.add_(w, alpha=alpha)
                rule.release()
        return sums, norms

    def _rules(self, loss: Tensor, retain_graph: bool, scale: float = 1.0,
               batch_size: int | None = None) -> list[tuple[nn.Module, _Rule]]:
        # the rules keep only what their clipped sums need (emptied in place: nn.Module's __setattr__ costs
        # microseconds a step)
        calls = self._calls.copy()
        self._calls.clear()
        if not calls:
            raise RuntimeError("clipped_sum found no recorded forward: run the model inside `with "
                               "clipper.recording():` with gradients enabled")
        for m, c in calls:
            if c.args[0]._version != c.version:
                raise RuntimeError(f"the input of {type(m).__name__} was modified in place after its forward; "
                                   "the per-example gradients need it as it was (use an out-of-place operation)")
        start = None if scale == 1 else torch.full_like(loss, scale)
        grads = torch.autograd.grad(loss, [c.edge for _, c in calls], start, retain_graph=retain_graph,
                                    allow_unused=True)
        by_module: dict[nn.Module, list[tuple[_Call, Tensor]]] = {}
        # a gradient that shares memory with no other kept tensor (the output gradients of two branches that
        # are added share one) may be scaled in place by its layer's clipped sum
        shared = Counter(t.untyped_storage().data_ptr() for (_, c), g in zip(calls, grads)
                         for t in (c.args[0], g) if t is not None)
        for (m, c), g in zip(calls, grads):
            if g is not None:
                by_module.setdefault(m, []).append((c, g))
        del calls, grads
        sizes = {g.shape[0] for pairs in by_module.values() for _, g in pairs}
        if len(sizes) > 1 or (batch_size is not None and sizes and sizes != {batch_size}):
            raise ValueError(f"layers saw {sorted(sizes)} examples along dimension 0 in a batch of {batch_size}: every "
                             "layer must take the batch's examples along dimension 0 (a sequence-first layer, "
                             "e.g. nn.LSTM or nn.Transformer without batch_first=True, or a transpose of the batch "
                             "breaks this); keep the batch first")
        with torch.no_grad():  # in parameter order: the DP-SGD step draws each layer's noise as it reaches it
            return [(m, _rule(m, by_module.pop(m), self._kinds.get(m), shared, self._batched_args(m)))
                    for m in sorted(by_module, key=self._rank.__getitem__)]

    def _batched_args(self, m: nn.Module) -> tuple[int, ...]:
        given = self._per_example_args.get(m, self._per_example_args.get(type(m)))
        return (0,) if given is None else tuple(given)

    def _own(self, m: nn.Module) -> list[nn.Parameter]:
        """The module's parameters that take gradients now, in the order its rule returns them."""
        return [p for p in self._params[m] if p.requires_grad]

    def verify(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Check that the per-example gradients of ``loss = sum_i l_i`` (recorded under ``recording()``) add up
        to autograd's gradient of ``loss``; raises naming the first parameter whose gradient is not accounted
        for (tied weights, a parameter used outside its module's forward, an output modified in place)."""
        calls = list(self._calls)
        rules = self._rules(loss, retain_graph=True)
        if retain_graph:
            self._calls.extend(calls)
        names = {id(p): n for n, p in self._module.named_parameters()}
        ruled = dict(rules)
        for m, _ in self._layers:  # one layer at a time: the check costs one layer's gradients in memory
            with torch.no_grad():
                mine = (ruled[m].weighted(torch.ones_like(ruled[m].norms[0])) if m in ruled
                        else [None] * len(self._own(m)))
            for p, got in zip(self._own(m), mine):
                (ref,) = torch.autograd.grad(loss, p, allow_unused=True, retain_graph=True)
                ref = torch.zeros_like(p) if ref is None else ref
                got = torch.zeros_like(p) if got is None else got
                if not _close(got, ref, rtol=1e-3, atol=1e-5 * (1 + float(torch.linalg.vector_norm(ref, math.inf)))):
                    raise RuntimeError(
                        f"the per-example gradients of {names.get(id(p), '?')!r} do not add up to its batch "
                        "gradient: the parameter is used outside its module's forward (tied weights, F.linear(x, "
                        "m.weight)), a layer's output is modified in place, or the loss is not a sum over "
                        "examples. Use engine='opacus', or call the module itself.")
        self._checked = True


class _Rule:
    """One layer's per-example gradient norms and its clipped sum ``weighted(c)``.

    ``norms``: (B,) tensors, each the per-example norm of a part of the layer's gradient (a parameter, or a
    factor of one: ||dW_i|| = ||a_i|| ||g_i||); the layer's norm is the norm of their stack."""

    norms: list[Tensor]

    def weighted(self, c: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        """``out += alpha * weighted(c)`` for each of the layer's parameters, in place."""
        for out, w in zip(outs, self.weighted(c)):
            out.add_(w, alpha=alpha)

    def release(self) -> None:
        """Drop the kept activations and gradients (after the last ``weighted``)."""
        self.__dict__.clear()


Calls = list[tuple[_Call, Tensor]]  # a layer's recorded calls, each with the gradient at its output


@dataclass(frozen=True)
class GhostRule:
    """A layer type's rule: ``build(module, calls, owned) -> _Rule`` (None: use torch.func for this layer), with
    ``calls`` the layer's recorded calls and their output gradients and ``owned`` whether the one output
    gradient is the rule's alone to overwrite; ``capture(output)``, if given, runs at the forward and keeps in
    ``_Call.stats`` what the backward would free (GroupNorm's statistics).

    Example:
        >>> rule = GHOST_RULES[nn.GroupNorm]
        >>> rule.capture is not None, GHOST_RULES[nn.Linear].capture is None     # GroupNorm keeps its statistics
        (True, True)
    """

    build: Callable[[nn.Module, Calls, bool], _Rule | None]
    capture: Callable[[Tensor], Any] | None = None


GHOST_RULES: dict[type[nn.Module], GhostRule] = {}


def register_ghost_rule(*layer_types: type[nn.Module], capture: Callable[[Tensor], Any] | None = None) -> Callable:
    """Registers the decorated ``build(module, calls, owned) -> _Rule | None`` for ``layer_types``. It applies to
    an instance of a registered type, or of a subclass that keeps the type's own ``forward``.

    Example:
        >>> sorted(k.__name__ for k in GHOST_RULES)
        ['Conv1d', 'Conv2d', 'Embedding', 'GroupNorm', 'LayerNorm', 'Linear']
        >>> class Scale(nn.Module):                      # y = w * x: dW_i = sum over positions of g_i * x_i
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> class ScaleRule(_Rule):
        ...     def __init__(self, m, calls, owned):
        ...         self.per = sum(c.args[0] * g for c, g in calls)     # (B, d) per-example gradients
        ...         self.norms = [self.per.norm(dim=1)]
        ...     def weighted(self, c):
        ...         return [c @ self.per]
        >>> _ = register_ghost_rule(Scale)(ScaleRule)
        >>> model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 2))
        >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
        >>> clipper = GhostClipping(model)
        >>> with clipper.recording():
        ...     loss = F.cross_entropy(clipper(x), y, reduction="sum")
        >>> sums, norms = clipper.clipped_sum(loss, max_grad_norm=0.5)    # checked against autograd on first use
        >>> per_example = [torch.cat([g.flatten() for g in torch.autograd.grad(
        ...     F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))]).norm() for i in range(6)]
        >>> torch.allclose(norms, torch.stack(per_example), atol=1e-5)
        True
        >>> del GHOST_RULES[Scale]
    """

    def decorator(build: Callable[[nn.Module, Calls, bool], _Rule | None]) -> Callable:
        for kind in layer_types:
            GHOST_RULES[kind] = GhostRule(build, capture)
        return build

    return decorator


def _kind(m: nn.Module) -> type | None:
    """The registered layer type whose rule applies: an instance that keeps that type's own forward."""
    return next((k for k in GHOST_RULES if isinstance(m, k) and type(m).forward is k.forward), None)


def _rule(m: nn.Module, pairs: Calls, kind: type | None = None,
          shared: Counter | None = None, batched_args: tuple[int, ...] = (0,)) -> _Rule:
    """The layer's registered rule, or per-example gradients by torch.func where it has none."""
    grads = [g for _, g in pairs]
    kind = _kind(m) if kind is None else kind
    # the output gradient may be overwritten once read if no other kept tensor shares its memory
    owned = (shared is not None and len(grads) == 1 and grads[0].is_contiguous()
             and shared[grads[0].untyped_storage().data_ptr()] == 1)
    registered = GHOST_RULES.get(kind)
    rule = registered.build(m, pairs, owned) if registered is not None else None
    return _FuncRule(m, pairs, batched_args) if rule is None else rule


def _inputs_and_grads(pairs: Calls) -> tuple[list[Tensor], list[Tensor]]:
    return [c.args[0] for c, _ in pairs], [g for _, g in pairs]


def _materialise_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    """dW_i costs T*i*o flops (and i*o memory) per example, the two Gram matrices T^2*(i+o)."""
    return positions * (fan_in + fan_out) >= fan_in * fan_out


def _close(got: Tensor, ref: Tensor, rtol: float, atol: float, chunk: int = 2**14) -> bool:
    """``torch.allclose`` a chunk at a time: no temporaries the size of a weight (the check runs in the first
    step, whose peak memory is the run's)."""
    with torch.no_grad():
        return all(torch.allclose(g, r, rtol=rtol, atol=atol)
                   for g, r in zip(got.reshape(-1).split(chunk), ref.reshape(-1).split(chunk)))


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _addmv(out: Tensor, per: Tensor, c: Tensor, alpha: float) -> None:
    """out += alpha * sum_i c_i per_i, for per (B, *out.shape): one matrix-vector product."""
    if out.is_contiguous():
        out.view(-1).addmv_(per.reshape(len(per), -1).T, c, alpha=alpha)
    else:
        out.add_(torch.einsum("b,b...->...", c, per), alpha=alpha)


def _norm(t: Tensor) -> Tensor:
    """Per-example norm of a (B, ...) tensor (one reduction, no temporary)."""
    return torch.linalg.vector_norm(t.reshape(len(t), -1), dim=1)


def _root(sq: Tensor) -> Tensor:
    """The norm from a squared norm summed from Gram matrices (whose rounding can leave it just below 0)."""
    return sq.clamp_(min=0).sqrt_()


class _LinearRule(_Rule):
    def __init__(self, m: nn.Linear, inputs: list[Tensor], grads: list[Tensor], owned: bool = False):
        self.bias = m.bias is not None and m.bias.requires_grad
        self.weight = m.weight.requires_grad
        self.per = None
        if len(inputs) == 1 and inputs[0].dim() == 2:  # one call, no positions: ||g_i a_i^T|| = ||a_i|| ||g_i||
            self.a, self.g = inputs[0], grads[0]
            self.owned = owned  # g may be scaled in place by the clipped sum
            gn = torch.linalg.vector_norm(self.g, dim=1)  # one reduction each, no (B, o) temporary
            self.norms = ([gn * torch.linalg.vector_norm(self.a, dim=1)] if self.weight else []) + \
                ([gn] if self.bias else [])
            return
        B = grads[0].shape[0]
        self.a = _cat([a.reshape(B, -1, a.shape[-1]) for a in inputs], 1)  # (B, T, i)
        self.g = _cat([g.reshape(B, -1, g.shape[-1]) for g in grads], 1)  # (B, T, o)
        T, i, o = self.a.shape[1], self.a.shape[2], self.g.shape[2]
        self.norms = []
        if self.weight:
            if _materialise_cheaper(T, i, o):
                self.per = torch.bmm(self.g.transpose(1, 2), self.a)  # (B, o, i)
                self.norms.append(_norm(self.per))
            else:
                gram = torch.bmm(self.a, self.a.transpose(1, 2)).mul_(torch.bmm(self.g, self.g.transpose(1, 2)))
                self.norms.append(_root(gram.sum((1, 2))))
        if self.bias:
            self.gb = self.g.sum(1)
            self.norms.append(_norm(self.gb))
        if self.per is not None:
            self.a = self.g = None  # the clipped sum needs only dW_i

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        bias = outs[-1] if self.bias else None
        if self.g is not None and self.g.dim() == 2:  # (c * g)^T a, the weight folded into g in place if it is
            if bias is not None:  # ours alone, else into the smaller of a and g
                bias.addmv_(self.g.T, c, alpha=alpha)
            if self.weight:
                c = c.unsqueeze(1)
                if self.owned:
                    outs[0].addmm_(self.g.mul_(c).T, self.a, alpha=alpha)
                elif self.a.shape[1] < self.g.shape[1]:
                    outs[0].addmm_(self.g.T, self.a * c, alpha=alpha)
                else:
                    outs[0].addmm_((self.g * c).T, self.a, alpha=alpha)
            return
        if self.per is not None:
            _addmv(outs[0], self.per, c, alpha)
        elif self.weight:  # sum_i c_i g_i^T a_i over every position: one product, into the output
            o, i = self.g.shape[-1], self.a.shape[-1]
            cg = self.g * c.view(-1, *[1] * (self.g.dim() - 1))
            outs[0].addmm_(cg.reshape(-1, o).T, self.a.reshape(-1, i), alpha=alpha)
        if bias is not None:
            bias.addmv_(self.gb.T, c, alpha=alpha)

    def weighted(self, c: Tensor) -> list[Tensor]:
        if self.per is not None:
            return [torch.einsum("b,boi->oi", c, self.per)] + ([c @ self.gb] if self.bias else [])
        if self.g.dim() == 2:
            cg = self.g * c.unsqueeze(1)
            return ([cg.T @ self.a] if self.weight else []) + ([cg.sum(0)] if self.bias else [])
        cg = self.g * c.view(-1, *[1] * (self.g.dim() - 1))  # each example's output gradient, weighted
        o, i = self.g.shape[-1], self.a.shape[-1]
        out = [cg.reshape(-1, o).T @ self.a.reshape(-1, i)] if self.weight else []
        if self.bias:
            out.append(cg.reshape(-1, o).sum(0))
        return out


@register_ghost_rule(nn.Linear)
def _linear(m: nn.Linear, pairs: Calls, owned: bool) -> _Rule:
    return _LinearRule(m, *_inputs_and_grads(pairs), owned)


def _symmetric_padding(m: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """The padding F.unfold can express, or None (padding modes and uneven 'same' go to torch.func)."""
    if m.padding_mode != "zeros":
        return None
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(m.padding)


# the most entries a convolution's position maps may have (built once per geometry, then kept)
GRAM_MAP_LIMIT = 2**16  # (N * N) x (L * L)
UNFOLD_MAP_LIMIT = 2**16  # N x (K * L)


def _reads(in_size: tuple[int, int], out_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int], pad: tuple[int, int]) -> list[tuple[int, Tensor, Tensor]]:
    """For each kernel offset s (row-major): (s, p, l), the output positions l whose patch reads input position p
    (not padding) at that offset; positions are flattened row-major."""
    r, c = torch.meshgrid(torch.arange(out_size[0]), torch.arange(out_size[1]), indexing="ij")
    r, c, out_index = r.reshape(-1), c.reshape(-1), torch.arange(out_size[0] * out_size[1])
    reads = []
    for y in range(kernel[0]):
        for x in range(kernel[1]):
            pr, pc = r * stride[0] + y * dilation[0] - pad[0], c * stride[1] + x * dilation[1] - pad[1]
            inside = (pr >= 0) & (pr < in_size[0]) & (pc >= 0) & (pc < in_size[1])
            reads.append((y * kernel[1] + x, (pr * in_size[1] + pc)[inside], out_index[inside]))
    return reads


def _position_map(kind: str, geometry: tuple, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A convolution's positions as a 0/1 matrix, for ``geometry = (in_size, out_size, kernel, stride, dilation,
    pad)`` with N input positions, L output positions and K kernel offsets; None if it would exceed its limit.

    - ``"unfold"``, (N, K * L): ``a @ M`` is the unfolded input, ``[.., s * L + l]`` the input read by output
      position l at offset s (F.unfold's layout), from one product instead of padding and strided copies.
    - ``"gram"``, (N * N, L * L): the Gram of the unfolded input, ``<patch_l, patch_m> = sum_s <a_{p_s(l)},
      a_{p_s(m)}>`` over the offsets where both are inside, is a fixed linear function of the input's Gram
      ``<a_p, a_q>``: M[(p, q), (l, m)] = 1 if an offset s has p_s(l) = p and p_s(m) = q (distinct offsets read
      distinct positions, so at most one does). One product replaces unfolding and the per-offset sums.

    Any stride, dilation and padding. Built once per geometry (the last 64 kept)."""
    in_size, out_size, kernel = geometry[:3]
    N, L, K = in_size[0] * in_size[1], out_size[0] * out_size[1], kernel[0] * kernel[1]
    if (N * N * L * L if kind == "gram" else N * K * L) > (GRAM_MAP_LIMIT if kind == "gram" else UNFOLD_MAP_LIMIT):
        return None
    return _build_map(kind, geometry, dtype, device)


@functools.lru_cache(maxsize=64)
def _build_map(kind: str, geometry: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    in_size, out_size, kernel = geometry[:3]
    N, L, K = in_size[0] * in_size[1], out_size[0] * out_size[1], kernel[0] * kernel[1]
    if kind == "gram":
        m = torch.zeros(N * N, L * L, dtype=dtype)
        for _, p, out in _reads(*geometry):
            m[(p[:, None] * N + p[None, :]).reshape(-1), (out[:, None] * L + out[None, :]).reshape(-1)] = 1
    else:
        m = torch.zeros(N, K * L, dtype=dtype)
        for s, p, out in _reads(*geometry):
            m[p, s * L + out] = 1
    return m.to(device)


class _Padded:
    """One call's input, zero-padded and flattened row by row to (BG, cg, N), with a tail so that every
    kernel offset's slice fits; the output position (r, c) sits at r * wp + c."""

    def __init__(self, a: Tensor, B: int, G: int, pad: tuple[int, int], tail: int, ho: int, wo: int, start: int):
        C, H, W = a.shape[1], a.shape[2], a.shape[3]
        self.hp, self.wp, self.ho, self.wo, self.start = H + 2 * pad[0], W + 2 * pad[1], ho, wo, start
        self.flat = a.new_zeros(B * G, C // G, self.hp * self.wp + tail)
        self.flat[:, :, :self.hp * self.wp].view(B, C, self.hp, self.wp)[:, :, pad[0]:pad[0] + H,
                                                                          pad[1]:pad[1] + W] = a

    def windows(self, kernel: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        """(BG, cg, kh, kw, ho, wo) view: [:, :, y, x] is the input under kernel offset (y, x)."""
        f = self.flat
        return f.as_strided((f.shape[0], f.shape[1], kernel[0], kernel[1], self.ho, self.wo),
                            (f.stride(0), f.stride(1), dilation[0] * self.wp, dilation[1], self.wp, 1))


class _ConvRule(_Rule):
    """A convolution is a Linear layer applied at every output position to the input patch there.

    One call with few positions (a late layer of a small network): the unfolded input, or for the ghost norm
    its Gram, by one product with a fixed 0/1 position map (``_position_map``). Otherwise:
    Stride 1 (and 1x1 kernels at any stride) avoids unfolding: in the zero-padded input flattened row by
    row, the patch entries at kernel offset (y, x) for all output positions form one contiguous slice, if
    each output row is taken as wide as the padded input (the extra columns get a zero output gradient).
    Then per kernel offset, dW_i[:, :, y, x] = g_i A_{i,yx}^T (materialised) or the patch Gram is the sum over
    offsets of A_{i,yx}^T A_{i,yx} (ghost). Other strides unfold (F.unfold). The clipped sum is the
    convolution's own weight gradient of the weighted output gradient (``torch.nn.grad.conv*d_weight``).
    """

    def __init__(self, m: nn.Conv1d | nn.Conv2d, padding: tuple[int, ...], inputs: list[Tensor],
                 grads: list[Tensor]):
        self.m, self.padding = m, padding
        self.inputs, self.grads = inputs, grads
        self.one_d = isinstance(m, nn.Conv1d)
        B, o = grads[0].shape[0], m.out_channels
        self.weight = m.weight.requires_grad
        self.bias = m.bias is not None and m.bias.requires_grad
        self.per = None  # (B, *weight.shape) per-example weight gradients, where they are formed
        self.norms = []
        if self.weight:
            self.per, norm = self._weight_norms(inputs, grads)
            self.norms.append(norm)
        if self.bias:
            sums = [g.reshape(B, o, -1).sum(2) for g in grads]
            self.gb = sum(sums[1:], sums[0])  # no extra 0 + t
            self.norms.append(_norm(self.gb))
        if self.per is not None or not self.weight:
            self.inputs = self.grads = None  # the clipped sum needs only dW_i

    def _weight_norms(self, inputs: list[Tensor], grads: list[Tensor]) -> tuple[Tensor | None, Tensor]:
        """``(dW_i or None, ||dW_i||)`` by one of three algorithms: a position map (one call, few positions),
        the padded input's shifted slices (stride 1, or a 1x1 kernel without padding), or F.unfold."""
        m = self.m
        G = m.groups
        kernel, stride, dilation, pad = self._two(m.kernel_size, 1), self._two(m.stride, 1), \
            self._two(m.dilation, 1), self._two(self.padding, 0)
        K, cg, og = kernel[0] * kernel[1], m.in_channels // G, m.out_channels // G
        geometry = (self._two(inputs[0].shape[2:], 1), self._two(grads[0].shape[2:], 1), kernel, stride, dilation, pad)
        L = geometry[1][0] * geometry[1][1]
        materialise = _materialise_cheaper(L, K * cg, og)
        a = inputs[0]
        maps = _position_map("unfold" if materialise else "gram", geometry, a.dtype, a.device) \
            if len(inputs) == 1 else None
        if maps is not None:
            return self._by_position_map(a, grads[0], maps, materialise, geometry)
        if stride == (1, 1) or (kernel == (1, 1) and pad == (0, 0)):
            return self._by_shifted_slices(inputs, grads, kernel, stride, dilation, pad)
        return self._by_unfolding(inputs, grads, kernel, stride, dilation, pad)

    def _by_position_map(self, a: Tensor, g: Tensor, maps: Tensor, materialise: bool,
                         geometry: tuple) -> tuple[Tensor | None, Tensor]:
        """One call with few positions: the unfolded input, or for the ghost norm its Gram, by one product with
        the fixed 0/1 position map."""
        m = self.m
        B, G = g.shape[0], m.groups
        K, cg, og = geometry[2][0] * geometry[2][1], m.in_channels // G, m.out_channels // G
        L = geometry[1][0] * geometry[1][1]
        if materialise:
            unfolded = (a.reshape(-1, geometry[0][0] * geometry[0][1]) @ maps).view(B * G, cg * K, L)
            per = torch.bmm(g.reshape(B * G, og, L), unfolded.transpose(1, 2))  # (BG, og, cg * K)
            per = per.reshape(B, *m.weight.shape)
            return per, _norm(per)
        a = a.reshape(B * G, cg, -1)
        g = g.reshape(B * G, og, L)
        patches = torch.bmm(a.transpose(1, 2), a).view(B * G, -1) @ maps  # (BG, L * L)
        g_gram = torch.bmm(g.transpose(1, 2), g).view(B * G, -1)
        return None, _root(torch.linalg.vecdot(patches, g_gram).view(B, G).sum(1))

    def _by_shifted_slices(self, inputs: list[Tensor], grads: list[Tensor], kernel: tuple, stride: tuple,
                           dilation: tuple, pad: tuple) -> tuple[Tensor | None, Tensor]:
        """Stride 1 (or a 1x1 kernel): per kernel offset, the patch entries of all output positions are one slice
        of the padded input flattened row by row; dW_i per offset, or the patch Gram from the input's own Gram."""
        m = self.m
        B, G = grads[0].shape[0], m.groups
        K, cg, og = kernel[0] * kernel[1], m.in_channels // G, m.out_channels // G
        flats = self._padded(inputs, grads, kernel, stride, dilation, pad, B, G)
        g_all = _cat([g.reshape(B * G, og, -1) for g in grads], 2)  # (BG, og, L)
        L = g_all.shape[2]
        same_width = len({f.wp for f in flats}) == 1  # the Gram form needs one row layout
        if _materialise_cheaper(L, K * cg, og) or not same_width:
            windows = [f.windows(kernel, dilation) for f in flats]  # (BG, cg, kh, kw, ho, wo) views
            if windows[0].numel() <= STACK_LIMIT:  # small layers: one strided copy, then one product
                unfolded = _cat([w.reshape(B * G, cg * K, -1) for w in windows], 2)
                per = torch.bmm(g_all, unfolded.transpose(1, 2))
            else:  # large ones: offset by offset, one window copied at a time
                per = torch.stack([torch.bmm(g_all, _cat([w[:, :, y, x].reshape(B * G, cg, -1)
                                                          for w in windows], 2).transpose(1, 2))
                                   for y in range(kernel[0]) for x in range(kernel[1])], -1)
            per = per.reshape(B, *m.weight.shape)  # (BG, og, cg, K) -> (B, o, cg, kh, kw)
            return per, _norm(per)
        # the patch Gram from the padded input's own Gram: <patch_l, patch_m> = sum over kernel offsets s of
        # <a_{l+s}, a_{m+s}>, so one (N x N) product and K shifted blocks summed in place (offset (y, x) moves
        # both indices by y * dh * wp + x * dw), no unfolding. A block's rows and columns are output positions
        # in rows as wide as the padded input: viewed as (rows, wp) and cut to the real columns, they are the
        # real output positions.
        wp = flats[0].wp
        flat = _cat([f.flat for f in flats], 2)
        gram = torch.bmm(flat.transpose(1, 2), flat)  # (BG, N, N), N = all calls' padded positions
        offsets = [y * dilation[0] * wp + x * dilation[1] for y in range(kernel[0]) for x in range(kernel[1])]

        def block(f: _Padded, h: _Padded) -> Tensor:
            def wide(s: int) -> Tensor:
                return gram[:, f.start + s:f.start + s + f.ho * wp, h.start + s:h.start + s + h.ho * wp]

            total = wide(0).clone()
            for s in offsets[1:]:  # one strided sum over the offsets is ten times slower on CPU
                total.add_(wide(s))
            return total.view(B * G, f.ho, wp, h.ho, wp)[:, :, :f.wo, :, :h.wo].reshape(
                B * G, f.ho * f.wo, h.ho * h.wo)

        patches = _cat([_cat([block(f, h) for h in flats], 2) for f in flats], 1)  # (BG, L, L)
        g_gram = torch.bmm(g_all.transpose(1, 2), g_all)
        sq = torch.linalg.vecdot(patches.flatten(1), g_gram.flatten(1)).view(B, G).sum(1)
        return None, _root(sq)

    def _by_unfolding(self, inputs: list[Tensor], grads: list[Tensor], kernel: tuple, stride: tuple,
                      dilation: tuple, pad: tuple) -> tuple[Tensor | None, Tensor]:
        """Any other stride: F.unfold, then dW_i or the two Gram matrices, whichever costs fewer flops."""
        m = self.m
        B, G = grads[0].shape[0], m.groups
        K, cg, og = kernel[0] * kernel[1], m.in_channels // G, m.out_channels // G
        u = _cat([F.unfold(a.unsqueeze(-2) if self.one_d else a, kernel, dilation=dilation, padding=pad,
                           stride=stride).reshape(B * G, cg * K, -1) for a in inputs], 2)
        gu = _cat([g.reshape(B * G, og, -1) for g in grads], 2)
        if _materialise_cheaper(gu.shape[2], K * cg, og):
            per = torch.bmm(gu, u.transpose(1, 2)).reshape(B, *m.weight.shape)
            return per, _norm(per)
        sq = (torch.bmm(u.transpose(1, 2), u) * torch.bmm(gu.transpose(1, 2), gu)).reshape(B, -1).sum(1)
        return None, _root(sq)

    def _two(self, t: tuple, fill: int) -> tuple:  # a 1-d convolution as a 2-d one of height 1
        return (fill, *t) if self.one_d else tuple(t)

    def _padded(self, inputs, grads, kernel, stride, dilation, pad, B, G) -> list[_Padded]:
        out, start = [], 0
        for a, g in zip(inputs, grads):
            if self.one_d:
                a, g = a.unsqueeze(-2), g.unsqueeze(-2)
            if stride != (1, 1):  # a 1x1 kernel: the strided positions are the whole input
                a = a[:, :, ::stride[0], ::stride[1]]
            f = _Padded(a, B, G, pad, dilation[1] * (kernel[1] - 1), g.shape[2], g.shape[3], start)
            start += f.flat.shape[2]
            out.append(f)
        return out

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        if self.weight:
            if self.per is not None:
                _addmv(outs[0], self.per, c, alpha)
            else:
                outs[0].add_(self._weight_sum(c), alpha=alpha)
        if self.bias:
            outs[-1].addmv_(self.gb.T, c, alpha=alpha)

    def weighted(self, c: Tensor) -> list[Tensor]:
        out = []
        if self.weight:
            out.append(torch.einsum("b,b...->...", c, self.per) if self.per is not None else self._weight_sum(c))
        if self.bias:
            out.append(c @ self.gb)
        return out

    def _weight_sum(self, c: Tensor) -> Tensor:
        """sum_i c_i dW_i as the convolution's own weight gradient of the weighted output gradient."""
        m = self.m
        wgrad = torch.nn.grad.conv1d_weight if self.one_d else torch.nn.grad.conv2d_weight
        return sum(wgrad(a, m.weight.shape, g * c.view(-1, *[1] * (g.dim() - 1)), stride=m.stride,
                         padding=self.padding, dilation=m.dilation, groups=m.groups)
                   for a, g in zip(self.inputs, self.grads))


@register_ghost_rule(nn.Conv1d, nn.Conv2d)
def _conv(m: nn.Conv1d | nn.Conv2d, pairs: Calls, owned: bool) -> _Rule | None:
    """Zero padding that F.unfold can express; other padding modes and uneven 'same' go to torch.func."""
    padding = _symmetric_padding(m)
    return None if padding is None else _ConvRule(m, padding, *_inputs_and_grads(pairs))


class _EmbeddingRule(_Rule):
    def __init__(self, m: nn.Embedding, inputs: list[Tensor], grads: list[Tensor]):
        if m.scale_grad_by_freq:
            raise ValueError("Embedding(scale_grad_by_freq=True) scales by counts over the whole batch, which mixes "
                             "examples: it has no per-example gradient")
        B, d = grads[0].shape[0], m.embedding_dim
        self.ids = _cat([i.reshape(B, -1) for i in inputs], 1)  # (B, T)
        self.g = _cat([g.reshape(B, -1, d) for g in grads], 1)  # (B, T, d)
        if m.padding_idx is not None:  # the padding row gets no gradient
            self.g = self.g * (self.ids != m.padding_idx).unsqueeze(-1)
        self.num = m.num_embeddings
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.g.dtype)
        self.norms = [_root((same * torch.bmm(self.g, self.g.transpose(1, 2))).sum((1, 2)))]

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        d = self.g.shape[2]
        outs[0].index_add_(0, self.ids.reshape(-1), (self.g * c[:, None, None]).reshape(-1, d), alpha=alpha)

    def weighted(self, c: Tensor) -> list[Tensor]:
        d = self.g.shape[2]
        out = torch.zeros(self.num, d, dtype=self.g.dtype, device=self.g.device)
        return [out.index_add_(0, self.ids.reshape(-1), (self.g * c[:, None, None]).reshape(-1, d))]


@register_ghost_rule(nn.Embedding)
def _embedding(m: nn.Embedding, pairs: Calls, owned: bool) -> _Rule:
    return _EmbeddingRule(m, *_inputs_and_grads(pairs))


class _NormRule(_Rule):
    """LayerNorm / GroupNorm: per-example gradients of the affine weight and bias, formed directly."""

    def __init__(self, m: nn.Module, pairs: list[tuple[_Call, Tensor]], normalise, own_dims: int | None,
                 owned: bool = False):
        per_w = per_b = None

        def plus(total: Tensor | None, t: Tensor) -> Tensor:
            return t if total is None else total + t

        for c, g in pairs:
            a = c.args[0]
            # sum over every dimension but the batch and the parameter's own: GroupNorm (B, C, *spatial) ->
            # (B, C); LayerNorm (B, *, *normalized_shape) -> (B, *normalized_shape)
            dims = tuple(range(2, g.dim())) if own_dims is None else tuple(range(1, g.dim() - own_dims))

            def total(t: Tensor, dims: tuple = dims) -> Tensor:
                return t.sum(dims) if dims else t  # sum(()) would sum over everything

            weight = m.weight is not None and m.weight.requires_grad
            group_norm = c.stats is not None and g.dim() > 2
            if group_norm:  # sums over positions as products with ones
                B, C = g.shape[0], g.shape[1]
                rows = g.reshape(B * C, -1)
                ones = g.new_ones(rows.shape[1])
                g_sum = (rows @ ones).view(B, C)
            else:
                g_sum = total(g)
            if weight:
                if group_norm:
                    # GroupNorm's saved mean and 1/std per (example, group): sum_s xhat_s g_s =
                    # rstd * (sum_s x_s g_s - mean * sum_s g_s), without normalising the input again; x_s g_s
                    # in place of g when g is ours alone (a new temporary the size of the activations cost
                    # several times in the step what it costs alone)
                    mean, rstd = c.stats
                    G = mean.shape[1]
                    products = rows.mul_(a.reshape(B * C, -1)) if owned else a.reshape(B * C, -1) * rows
                    xg = (products @ ones).view(B, G, C // G)
                    xg.addcmul_(mean.unsqueeze(-1), g_sum.view(B, G, C // G), value=-1).mul_(rstd.unsqueeze(-1))
                    per_w = plus(per_w, xg.view(B, C))
                elif own_dims is None and g.dim() > 2:  # trailing spatial dimensions: one fused product
                    per_w = plus(per_w, torch.linalg.vecdot(normalise(a).flatten(2), g.flatten(2)))
                else:
                    per_w = plus(per_w, total(normalise(a) * g))
            if m.bias is not None and m.bias.requires_grad:
                per_b = plus(per_b, g_sum)
        self.per = [t for t, p in ((per_w, m.weight), (per_b, m.bias)) if p is not None and p.requires_grad]
        self.norms = [_norm(t) for t in self.per]

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        for out, t in zip(outs, self.per):
            _addmv(out, t, c, alpha)

    def weighted(self, c: Tensor) -> list[Tensor]:
        return [torch.einsum("b,b...->...", c, t) for t in self.per]


@register_ghost_rule(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm, pairs: Calls, owned: bool) -> _Rule:
    return _NormRule(m, pairs, lambda a: F.layer_norm(a, m.normalized_shape, eps=m.eps),
                     own_dims=len(m.normalized_shape))


def _group_norm_statistics(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The per-(example, group) mean and 1/std GroupNorm saved for its backward (freed by that backward, so
    taken at the forward)."""
    if type(output.grad_fn).__name__ == "NativeGroupNormBackward0":
        return output.grad_fn._saved_result1, output.grad_fn._saved_result2
    return None


@register_ghost_rule(nn.GroupNorm, capture=_group_norm_statistics)
def _group_norm(m: nn.GroupNorm, pairs: Calls, owned: bool) -> _Rule:
    return _NormRule(m, pairs, lambda a: F.group_norm(a, m.num_groups, eps=m.eps), own_dims=None, owned=owned)


class _FuncRule(_Rule):
    """Any other layer: per-example gradients of its own parameters by torch.func (vmap of the layer's VJP).

    The positional arguments in ``batched_args`` carry the batch along dimension 0; every other argument is
    passed whole to each example's call (declared, never guessed from a shape: a shared (T, d) argument
    would be misread whenever the batch size happens to equal T)."""

    def __init__(self, m: nn.Module, pairs: list[tuple[_Call, Tensor]], batched_args: tuple[int, ...] = (0,)):
        from torch.func import grad, vmap

        names = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        params = {n: getattr(m, n).detach() for n in names}
        B = pairs[0][1].shape[0]
        self.per = None
        for c, g in pairs:
            batched = [i in batched_args for i in range(len(c.args))]
            for i, (a, b) in enumerate(zip(c.args, batched)):
                if b and not (isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == B):
                    raise ValueError(f"{type(m).__name__}: argument {i} is declared per-example but is "
                                     f"{type(a).__name__ if not isinstance(a, Tensor) else tuple(a.shape)}, not a "
                                     f"tensor with the batch's {B} examples along dimension 0")
            args = [a.detach() if isinstance(a, Tensor) else a for a in c.args]
            vjp = _example_vjp(m, args, batched, c.kwargs)
            ins = [a for a, b in zip(args, batched) if b]
            with torch.enable_grad():
                per = vmap(grad(vjp), in_dims=(None, 0, *[0] * len(ins)))(params, g, *ins)
            self.per = per if self.per is None else {n: self.per[n] + per[n] for n in names}
        self.names = names
        self.norms = [_norm(self.per[n]) for n in names]

    def accumulate(self, c: Tensor, outs: list[Tensor], alpha: float) -> None:
        for out, n in zip(outs, self.names):
            _addmv(out, self.per[n], c, alpha)

    def weighted(self, c: Tensor) -> list[Tensor]:
        return [torch.einsum("b,b...->...", c, self.per[n]) for n in self.names]


def _example_vjp(m: nn.Module, args: list, batched: list[bool], kwargs: dict):
    """(params, g_i, *example's batched args) -> <layer(args), g_i>: its gradient is the example's."""
    from torch.func import functional_call

    def vjp(params, g_i, *inputs):
        it = iter(inputs)
        full = tuple(next(it).unsqueeze(0) if b else a for a, b in zip(args, batched))
        return (functional_call(m, params, full, kwargs) * g_i.unsqueeze(0)).sum()

    return vjp
