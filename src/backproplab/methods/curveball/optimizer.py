"""The CurveBall optimizer: a ``torch.optim.Optimizer`` whose step solves a 2x2 Newton system each iteration.

The math is in the package's docstring (``backproplab.methods.curveball``); the output-space losses are in
``output_hessians`` and the Jacobian-vector products on a recorded forward in ``tangent_replay``.

References:
    Henriques, Ehrhardt, Albanie and Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for deep
    learning", ICCV 2019 (arXiv:1805.08095), Algorithm 1 and Sections 3-4.
"""

from __future__ import annotations

import collections
import math
from contextlib import contextmanager
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from ...dist import world_size
from .output_hessians import CrossEntropy, LossFn, MeanSquaredError, _autograd_output_products
from .tangent_replay import TangentTape


ModelFn = Callable[[], Tensor]


class NonFiniteCurveBallError(FloatingPointError):
    """The loss or the 2x2 solve was not finite; the weights were left unchanged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> opt = CurveBall(model.parameters(), model=model)
        >>> before = model.weight.detach().clone()
        >>> x, y = torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1])
        >>> try:
        ...     opt.step(lambda: model(x), CrossEntropy(y))
        ... except NonFiniteCurveBallError:
        ...     print(torch.equal(model.weight, before))
        True
    """


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

Scalar = Tensor | np.float64  # a 0-d tensor (the 2x2 system on the device) or a numpy scalar (on the host)


def _where(condition: Any, a: Scalar, b: Scalar) -> Scalar:
    """``torch.where`` for device scalars, the plain choice for host ones."""
    return torch.where(condition, a, b) if isinstance(condition, Tensor) else (a if condition else b)


def _zero(like: Scalar) -> Scalar:
    return torch.zeros_like(like) if isinstance(like, Tensor) else np.float64(0.0)


class _Call(nn.Module):
    """Lets functional_call substitute the parameters of ``model`` while an arbitrary closure runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.fn: ModelFn | None = None

    def forward(self) -> Tensor:
        return self.fn()



class CurveBall(torch.optim.Optimizer):
    """CurveBall (Henriques et al. 2019) as a ``torch.optim.Optimizer``.

    Two ways to call ``step``:

    * ``opt.step(model_fn, loss_fn) -> (loss, outputs)`` (detached): ``model_fn()`` returns the outputs for
      the current batch and must
      be re-callable (same batch); ``loss_fn(outputs)`` returns the scalar loss. Pass
      :class:`CrossEntropy` / :class:`MeanSquaredError` objects for closed-form H_L; any other callable is
      differentiated twice by autograd in output space.
    * ``opt.step(closure) -> loss`` (detached), the torch.optim form (needs ``model=``): ``closure()`` runs
      ``model`` on the
      batch and returns the loss of its output, e.g. ``lambda: F.cross_entropy(model(x), y)``. The
      model's output is taken from its forward call, and H_L by autograd from the loss the closure built.
      The closure must not call ``backward()``: the step computes the products itself. It is re-called
      on the same batch (same dropout masks) for the extra passes.

    torch.optim habits that do not carry over: the update is the solved direction ``z``, not ``p.grad``, so
    ``torch.nn.utils.clip_grad_norm_`` (on the gradients ``fill_grad`` writes) does not change the step; the
    step's size is governed by the Levenberg-Marquardt lambda and, when fixed, ``lr``. Every parameter group
    must share ``lr`` and ``momentum`` (beta and rho are solved jointly over all parameters). A closure must
    not call ``backward()``.

    ``lr`` (beta) and ``momentum`` (rho) are numbers in the parameter group, so ``torch.optim.lr_scheduler``
    works; ``auto_lr`` / ``auto_momentum`` (default: on when the value is not given) solve for them each
    step instead and then ignore the group's value. The values solved last are ``curveball_state['beta']``
    and ``['rho']``.

    Args:
        model: the module owning the parameters. With it, J v is forward-mode differentiation: tangent
            replay on the recorded forward or ``torch.autograd.forward_ad`` over
            ``torch.func.functional_call`` (see ``jvp``); BatchNorm in train mode works and its running
            statistics move once per step. Without it, J v uses the slower double-backward trick
            (J v = d/du <J^T u, v>), which keeps the plain optimizer contract; then a BatchNorm's
            statistics also move on the Levenberg-Marquardt re-evaluation (its buffers are unknown).
        lr, momentum: beta and rho when not automatic. A fixed value is never overwritten; with one
            fixed, the other is the 1-D minimiser of the quadratic model.
        auto_lr, auto_momentum: solve for beta / rho each step (default: ``lr is None`` /
            ``momentum is None``, the paper's setting when neither is given).
        fill_grad: also write the loss gradient g = J^T J_L into each ``p.grad`` (for clipping statistics
            and logging; the step itself never reads ``.grad``). The step's reverse pass yields
            GGN z + g together, so g costs a reverse pass of its own (see benchmarks/bench_curveball.py).
        lambd: initial damping lambda (paper: 1.0). auto_lambda: the Levenberg-Marquardt rule.
        on_nonfinite: "raise" (default; one host sync per step to check, which also carries the 2x2 system's
            entries to the host, where it is solved in double precision) or "skip" (no sync: the system is
            solved on the device in the parameters' precision, and a non-finite step leaves weights and z
            unchanged, counted in ``state['skipped']``).
        jvp: how J z and J dz are computed with ``model``. "replay": record the one forward that builds
            the reverse graph and propagate tangents alone through the recorded layers (see
            :class:`TangentTape`); needs a plain chain of layers with a registered tangent rule
            (``tangent_replay.TANGENT_RULES``: Linear, Conv, BatchNorm, activations, pooling, Flatten,
            eval-mode dropout; ``register_tangent_rule`` adds one) and raises naming what is not.
            "forward_ad": a forward-mode AD pass per product, which recomputes the forward; any model.
            "auto" (default): replay when the model allows it, else forward AD (``replay_refused`` says
            why). Replay saves the primal recomputation and needs no extra memory.
        low_memory: (forward AD only) compute J z in a pass of its own, without a reverse graph, then
            run a plain forward for the reverse pass. Otherwise J z rides on the forward that builds the reverse
            graph, which saves a forward but lets autograd record the tangent computation too; for
            normalisation layers that history is several activation-sized tensors per layer.
            ``None`` (default): on when ``model`` has a normalisation layer (BatchNorm, GroupNorm,
            LayerNorm, InstanceNorm), keeping memory near momentum SGD's. Measured on the small BN
            CNN of ``benchmarks/bench_curveball.py``: peak memory 2.8x SGD -> 1.2x, step time
            2.2x -> 2.3x (fixed lr/momentum). Same result either way.

    Parameter groups: allowed (for example to leave some parameters out), but rho and beta are solved
    jointly over all parameters, so every group must share lr, momentum and lambda settings.
    Under torch.distributed the product dz and the 2x2 system are averaged over ranks (mean loss).

    The update (the paper's Eq. 7-8; J the Jacobian of the outputs, H_L the loss's Hessian in output space,
    J_L its gradient there): dz = (J^T H_L J + lambda I) z + J^T J_L, one GGN-vector product by a forward-mode
    and a reverse-mode pass; z <- rho z - beta dz; w <- w + z. rho and beta minimise the quadratic model over
    the span of (z, dz) each step; lambda follows the Levenberg-Marquardt rule (ratio of actual to predicted
    loss change every ``lambda_interval`` steps). State per parameter: z alone, as momentum SGD keeps a buffer.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> opt = CurveBall(model.parameters(), model=model)      # automatic rho, beta and lambda
        >>> first = opt.step(lambda: F.cross_entropy(model(x), y)).item()
        >>> for _ in range(30):
        ...     loss = opt.step(lambda: F.cross_entropy(model(x), y))
        >>> loss.item() < 0.9 * first
        True
        >>> sorted(opt.state_dict()["param_groups"][0])[:3]
        ['auto_lambda', 'auto_lr', 'auto_momentum']

    References:
        Henriques, Ehrhardt, Albanie and Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for deep
        learning", ICCV 2019 (arXiv:1805.08095); Schraudolph, "Fast curvature matrix-vector products for
        second-order gradient descent", Neural Computation 2002 (the GGN product).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], *, model: nn.Module | None = None,
                 lr: float | None = None, momentum: float | None = None, lambd: float = 1.0,
                 auto_lr: bool | None = None, auto_momentum: bool | None = None,
                 auto_lambda: bool = True, lambda_factor: float = 0.999, lambda_low: float = 0.5,
                 lambda_high: float = 1.5, lambda_interval: int = 5, on_nonfinite: str = "raise",
                 jvp: str = "auto", low_memory: bool | None = None, fill_grad: bool = False):
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0, got {lambd}")
        auto_lr = lr is None if auto_lr is None else bool(auto_lr)
        auto_momentum = momentum is None if auto_momentum is None else bool(auto_momentum)
        for name, value, auto in (("lr", lr, auto_lr), ("momentum", momentum, auto_momentum)):
            if value is None and not auto:
                raise ValueError(f"auto_{name}=False needs a number for {name}=")
            if value is not None and not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if int(lambda_interval) < 1:
            raise ValueError(f"lambda_interval must be >= 1, got {lambda_interval}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if jvp not in ("auto", "replay", "forward_ad"):
            raise ValueError(f"jvp must be 'auto', 'replay' or 'forward_ad', got {jvp!r}")
        if jvp == "replay" and model is None:
            raise ValueError("jvp='replay' records the layers of `model`: pass model=")
        # a number even when automatic (then unused), so that learning-rate schedulers can run
        defaults = dict(lr=0.0 if lr is None else float(lr), momentum=0.0 if momentum is None else float(momentum),
                        auto_lr=auto_lr, auto_momentum=auto_momentum, lambd=lambd, auto_lambda=auto_lambda,
                        lambda_factor=lambda_factor, lambda_low=lambda_low, lambda_high=lambda_high,
                        lambda_interval=int(lambda_interval))
        super().__init__(params, defaults)
        shared = ("lr", "momentum", "auto_lr", "auto_momentum", "auto_lambda", "lambda_factor", "lambda_low",
                  "lambda_high", "lambda_interval")
        for g in self.param_groups[1:]:
            for k in shared + ("lambd",):
                if g[k] != self.param_groups[0][k]:
                    raise ValueError(f"CurveBall solves rho/beta jointly over all parameters, so every parameter "
                                     f"group must have the same {k!r} (got {self.param_groups[0][k]} and {g[k]})")
        self.model = model
        if low_memory is None:
            low_memory = model is not None and any(isinstance(m, _NORM_LAYERS) for m in model.modules())
        self.low_memory = bool(low_memory)
        self.jvp = jvp
        # why the last step could not replay tangents (None: it did); once set, "auto" stops trying
        self.replay_refused: str | None = ("no model= given" if model is None else
                                           "jvp='forward_ad'" if jvp == "forward_ad" else None)
        self.on_nonfinite = on_nonfinite
        self.fill_grad = bool(fill_grad)
        self._names: dict[int, str] = {}
        self._tied: list[tuple[nn.Module, str, Tensor]] = []
        if model is not None:
            self._names = {id(p): n for n, p in model.named_parameters()}
            # functional_call (torch 2.13) does not put back a parameter of a layer registered twice: we do
            every_name = list(model.named_parameters(remove_duplicate=False))
            uses = collections.Counter(id(p) for _, p in every_name)
            self._tied = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], p)
                          for n, p in every_name if uses[id(p)] > 1]
            missing = [i for g in self.param_groups for i, p in enumerate(g["params"]) if id(p) not in self._names]
            if missing:
                raise ValueError("some parameters given to CurveBall do not belong to `model`; pass the module "
                                 "that owns all of them, or model=None for the slower double-backward path")
            self._call = _Call(model)
        # optimizer-wide state: step count, lambda, last rho/beta/gamma, skipped steps
        self.curveball_state: dict[str, Any] = {"step": 0, "lambd": torch.tensor(float(lambd)), "skipped": 0}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curveball"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.curveball_state.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        glob = state_dict.pop("curveball")
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # saved before auto_lr / auto_momentum existed: None meant automatic
            for name in ("lr", "momentum"):
                if g.get(name) is None:
                    g[name], g[f"auto_{name}"] = 0.0, True
                g.setdefault(f"auto_{name}", False)
        self.curveball_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in glob.items()}

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # -- Jacobian-vector products
    @contextmanager
    def _same_batch_pass(self) -> Iterator[None]:
        """An extra pass over the same batch: same dropout masks, BatchNorm statistics left untouched.

        The pass runs on copies of the buffers and the originals are put back afterwards as they were: writing
        the saved values back in place would bump the version of tensors that the step's reverse graph saved
        (a BatchNorm in eval mode saves its running statistics), and backward would refuse them."""
        swapped = []
        if self.model is not None:
            for module in self.model.modules():
                for name, b in module._buffers.items():
                    if b is not None:
                        swapped.append((module, name, b))
                        module._buffers[name] = b.detach().clone()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.set_rng_state(self._rng_at_step_start)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng_at_step_start)
        try:
            yield
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            for module, name, original in swapped:
                module._buffers[name] = original

    def _forward_jvp(self, model_fn: ModelFn, params: list[Tensor], tangents: list[Tensor]) -> tuple[Tensor, Tensor]:
        with fwAD.dual_level():
            duals = {"model." + self._names[id(p)]: fwAD.make_dual(p, t) for p, t in zip(params, tangents)}
            self._call.fn = model_fn
            try:
                out = functional_call(self._call, duals, (), strict=False)
            finally:
                self._call.fn = None
                for module, name, param in self._tied:
                    module._parameters[name] = param
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            tangent = torch.zeros_like(primal)
        # the tangent's own autograd history is never differentiated: drop it so its saved tensors go now
        return primal, tangent.detach()

    def _recorded_forward(self, model_fn: ModelFn, params: list[Tensor],
                          gram: bool) -> tuple[Tensor, TangentTape | None]:
        """The step's one forward with reverse graph, recorded for tangent replay (None if it cannot be)."""
        from torch.nn.modules import module as module_globals

        tape = TangentTape(params, gram=gram)
        if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
            tape._invalid("a global module forward hook is registered")
        with tape.recording(self.model), torch.enable_grad():
            outputs = model_fn()
        tape.check(outputs)
        if tape.reason is None:
            self.replay_refused = None
            return outputs, tape
        if self.jvp == "replay":
            raise ValueError(f"CurveBall(jvp='replay') cannot replay tangents through this model: {tape.reason}. "
                             "Use jvp='auto' (falls back to forward-mode AD) or jvp='forward_ad'")
        self.replay_refused = tape.reason
        return outputs, None

    @staticmethod
    def _double_backward_jvp(outputs: Tensor, params: list[Tensor], tangents: list[Tensor]) -> Tensor:
        u = torch.zeros_like(outputs, requires_grad=True)
        vjp = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(vjp, tangents) if g is not None]
        dot = sum((g * t).sum() for g, t in pairs)
        (jv,) = torch.autograd.grad(dot, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(outputs) if jv is None else jv

    # -- the step
    def _closure_as_model_and_loss(self, closure: Callable[[], Tensor]) -> tuple[ModelFn, LossFn]:
        """``step(closure)``: the model's output is caught from its forward call; the loss is the closure's."""
        if self.model is None:
            raise TypeError("CurveBall.step(closure) takes the outputs from model's forward call: construct "
                            "CurveBall(params, model=model), or call opt.step(model_fn, loss_fn)")
        pairs: list[tuple[Tensor, Tensor]] = []  # (outputs, loss) of each call this step
        last: list[Tensor] = []

        def catch(module: nn.Module, args: tuple, output: Tensor) -> None:
            last.append(output)

        catch._curveball_catch = True  # type: ignore[attr-defined]  # the tangent tape ignores this hook

        def model_fn() -> Tensor:
            last.clear()
            handle = self.model.register_forward_hook(catch)
            try:
                loss = closure()
            finally:
                handle.remove()
            if not last:
                raise ValueError("CurveBall.step(closure): the closure did not call the model given as model=")
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise TypeError(f"CurveBall.step(closure): the closure must return the scalar loss, got {loss!r}")
            pairs.append((last[-1], loss))
            return last[-1]

        def loss_fn(outputs: Tensor) -> Tensor:
            return next(loss for out, loss in pairs if out is outputs)

        return model_fn, loss_fn

    @staticmethod
    def _closure_output_products(loss_of: LossFn,
                                 outputs: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Tensor]:
        """J_L and H_L v by autograd through the loss graph the closure built on ``outputs``."""
        loss = loss_of(outputs)
        if loss.grad_fn is None:
            raise ValueError("CurveBall.step(closure): the loss does not depend on the model's output "
                             "(was it computed under torch.no_grad, or detached?)")
        with torch.enable_grad():
            try:
                (grad,) = torch.autograd.grad(loss.reshape(()), outputs, create_graph=True)
            except RuntimeError as e:
                raise RuntimeError("CurveBall.step(closure): the closure must return the loss without calling "
                                   f"backward() on it (CurveBall computes the products itself): {e}") from e

        def hvp(v: Tensor) -> Tensor:
            if not grad.requires_grad:  # the loss is linear in the outputs
                return torch.zeros_like(v)
            (h,) = torch.autograd.grad(grad, outputs, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if h is None else h

        return loss.detach().reshape(()), hvp, grad.detach()

    @torch.no_grad()
    def step(self, model_fn: ModelFn | Callable[[], Tensor] | None = None,  # type: ignore[override]
             loss_fn: LossFn | None = None) -> tuple[Tensor, Tensor] | Tensor:
        """One CurveBall step on the batch that ``model_fn`` evaluates; returns ``(loss, outputs)``.

        ``step(closure)`` with one argument is the torch.optim closure form (see the class docstring); it
        returns the loss, as torch.optim's ``step(closure)`` does."""
        if model_fn is None:
            raise TypeError("CurveBall.step needs model_fn and loss_fn: opt.step(lambda: model(x), "
                            "CrossEntropy(y)), or a closure returning the loss: opt.step(lambda: "
                            "F.cross_entropy(model(x), y)) with CurveBall(..., model=model)")
        closure_form = loss_fn is None
        if closure_form:
            model_fn, loss_fn = self._closure_as_model_and_loss(model_fn)
        group = self.param_groups[0]
        glob = self.curveball_state
        params = self._params()
        for p in params:
            if "z" not in self.state[p]:
                self.state[p]["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        zs = [self.state[p]["z"] for p in params]
        lambd = glob["lambd"].to(params[0].device)
        first = glob["step"] == 0
        world = world_size()

        self._rng_at_step_start = torch.get_rng_state()
        self._cuda_rng_at_step_start = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        lambda_due = self._lambda_due(glob["step"], group)
        need_system = group["auto_lr"] or group["auto_momentum"] or lambda_due
        # pass 1: outputs with reverse graph, and J z by tangent replay, forward mode or double backward
        tape = None
        if self.model is not None and self.jvp != "forward_ad" and (self.jvp == "replay" or not self.replay_refused):
            # the Gram form needs dz = G + lambda z with this process's own G: not under DDP averaging
            outputs, tape = self._recorded_forward(model_fn, params, gram=need_system and world == 1)
            if tape is not None:
                jz = tape.jvp({id(p): z for p, z in zip(params, zs)})
                jz = torch.zeros_like(outputs) if jz is None else jz
            else:  # the forward has run: J z in a pass of its own
                with self._same_batch_pass():
                    _, jz = self._forward_jvp(model_fn, params, zs)
        else:
            # the closure form needs the plain forward's own output: J z in a pass of its own
            low_memory = self.low_memory or closure_form
            if self.model is not None and low_memory:  # J z first, in a pass without a reverse graph
                with self._same_batch_pass():
                    _, jz = self._forward_jvp(model_fn, params, zs)
            with torch.enable_grad():
                if self.model is None:
                    outputs = model_fn()
                    jz = self._double_backward_jvp(outputs, params, zs)
                elif low_memory:
                    outputs = model_fn()
                else:
                    outputs, jz = self._forward_jvp(model_fn, params, zs)
        if closure_form:
            loss, hvp, jl = self._closure_output_products(loss_fn, outputs)
        elif hasattr(loss_fn, "output_grad_and_hvp"):
            loss = loss_fn(outputs.detach())
            hvp, jl = loss_fn.output_grad_and_hvp(outputs)
        else:
            loss, hvp, jl = _autograd_output_products(loss_fn, outputs)
        hl_jz = hvp(jz)
        # ONE reverse pass: J^T (H_L J z + J_L) = GGN z + gradient (and J^T J_L = g beside it if asked)
        with torch.enable_grad():
            if self.fill_grad:  # a reverse pass of its own (less memory than one batched pass of both)
                grads = torch.autograd.grad(outputs, params, jl, retain_graph=True, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
            jt = torch.autograd.grad(outputs, params, hl_jz + jl, retain_graph=self.model is None, allow_unused=True)
        dzs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, jt)]
        if world > 1:
            flat = torch.cat([d.reshape(-1) for d in dzs])
            dist.all_reduce(flat)
            flat /= world
            dzs = list(torch.split(flat, [d.numel() for d in dzs]))
            dzs = [d.view_as(p) for d, p in zip(dzs, params)]
        torch._foreach_addcmul_(dzs, zs, [lambd] * len(zs))  # in place, no temporaries: dz = GGN z + g + lambda z

        # pass 2: J dz, then the 2x2 system in output space. With on_nonfinite="raise" the finiteness check
        # syncs with the host anyway, so the scalars cross once and the system is solved there, in double
        # precision (numpy scalars: IEEE division, no exceptions); "skip" keeps it on the device, without a sync.
        host = self.on_nonfinite == "raise"
        scalar = np.float64 if host else (lambda v: torch.tensor(float(v), device=lambd.device))
        lr_fixed = None if group["auto_lr"] else scalar(group["lr"])
        mom_fixed = None if group["auto_momentum"] else scalar(group["momentum"])
        # dz.dz (also the finiteness check of dz: a non-finite dz must not reach z), dz.z and z.z per parameter
        param_dots = _param_dots(dzs, zs, cross=need_system)
        if need_system:
            if tape is not None:
                jdz = tape.jvp({id(p): d for p, d in zip(params, dzs)}, lambd=lambd)
                jdz = torch.zeros_like(outputs) if jdz is None else jdz
            elif self.model is not None:
                with self._same_batch_pass():
                    _, jdz = self._forward_jvp(model_fn, params, dzs)
            else:
                with torch.enable_grad():
                    jdz = self._double_backward_jvp(outputs, params, dzs)
            hl_jdz = hvp(jdz)
            # the output-space products in one matrix product: rows J dz, J z; columns H_L J dz, H_L J z, J_L
            out_terms = (torch.stack([jdz, jz]).flatten(1) @ torch.stack([hl_jdz, hl_jz, jl]).flatten(1).t()).view(-1)
            if world > 1:
                dist.all_reduce(out_terms)
                out_terms /= world
            dtype = out_terms.dtype
            if host:  # one transfer; the per-parameter dots summed in double precision
                values = torch.cat([out_terms, param_dots.view(-1).to(dtype), lambd.view(1).to(dtype),
                                    loss.view(1).to(dtype)]).tolist()
                o11, _, b1, o12, o22, b2 = map(np.float64, values[:6])
                n = len(params)
                dd, dz_z, zz = (np.float64(sum(values[6 + k * n:6 + (k + 1) * n])) for k in range(3))
                lam, loss_value = np.float64(values[-2]), np.float64(values[-1])
            else:
                o11, _, b1, o12, o22, b2 = out_terms.unbind()
                dd, dz_z, zz = param_dots.sum(1).to(dtype).unbind()
                lam, loss_value = lambd.to(dtype), loss.to(dtype)
            a11, a12, a22 = lam * dd + o11, lam * dz_z + o12, lam * zz + o22
            beta, rho = self.solve(a11, a12, a22, b1, b2, lr_fixed, mom_fixed, first)
            x1, x2 = beta, -rho  # the quadratic model's change for the step taken (not only at its minimiser)
            with np.errstate(all="ignore"):  # a non-finite system is caught below, as on the device
                predicted = -(x1 * b1 + x2 * b2) + 0.5 * (x1 * x1 * a11 + 2 * x1 * x2 * a12 + x2 * x2 * a22)
        else:
            beta, rho, predicted = lr_fixed, mom_fixed, None
            if host:
                values = torch.cat([param_dots.view(-1), loss.view(1).to(param_dots.dtype)]).tolist()
                dd, loss_value = np.float64(sum(values[:-1])), np.float64(values[-1])
            else:
                dd, loss_value = param_dots.sum(), loss

        if host:
            if not all(math.isfinite(v) for v in (loss_value, beta, rho, dd)):
                raise NonFiniteCurveBallError(
                    f"CurveBall step {glob['step']}: loss={float(loss_value):.4g}, beta={float(beta):.4g}, "
                    f"rho={float(rho):.4g}, |dz|^2={float(dd):.4g}: not finite; the weights were not changed. "
                    "Check the data and the model, raise lambd, or pass on_nonfinite='skip'")
            rho, beta = torch.tensor([rho, beta], dtype=zs[0].dtype, device=zs[0].device).unbind()
            torch._foreach_mul_(zs, rho)  # z <- rho z - beta dz; w <- w + z, in place
            torch._foreach_addcmul_(zs, dzs, [beta] * len(zs), value=-1)
            torch._foreach_add_(params, zs)
        else:  # without a host sync: a non-finite step leaves z and w as they were (rho 1, beta 0)
            ok = torch.isfinite(loss_value) & torch.isfinite(beta) & torch.isfinite(rho) & torch.isfinite(dd)
            rho = torch.where(ok, rho, torch.ones_like(rho))
            beta = torch.where(ok, beta, torch.zeros_like(beta))
            keep = ok.to(params[0].dtype)
            for p, z, dz in zip(params, zs, dzs):
                z.mul_(rho).addcmul_(dz.nan_to_num_(0.0, 0.0, 0.0), beta, value=-1)
                p.addcmul_(z, keep)
            glob["skipped"] = glob["skipped"] + (~ok).to(torch.int64)
        glob["rho"], glob["beta"] = rho.detach(), beta.detach()

        if lambda_due:
            with self._same_batch_pass():
                new_loss = loss_fn(model_fn())
            if world > 1:
                pair = torch.stack([new_loss.detach(), loss.detach()])
                dist.all_reduce(pair)
                new_loss, loss_avg = pair / world
            else:
                loss_avg = loss
            if host:
                with np.errstate(all="ignore"):
                    gamma = (np.float64(new_loss) - np.float64(loss_avg)) / predicted
                    new_lambd = self.lambda_update(np.float64(lambd), gamma, group)
                glob["gamma"], glob["lambd"] = torch.tensor(gamma), torch.tensor(new_lambd, dtype=lambd.dtype)
            else:
                gamma = (new_loss - loss_avg) / predicted
                glob["gamma"] = gamma.detach()
                glob["lambd"] = self.lambda_update(lambd, gamma, group).detach()
        glob["step"] += 1
        if closure_form:  # torch.optim's contract: step(closure) returns the closure's loss
            return loss.detach()
        return loss.detach(), outputs.detach()

    @staticmethod
    def _lambda_due(step: int, group: dict) -> bool:
        return group["auto_lambda"] and step % group["lambda_interval"] == 0  # steps 0, k, 2k, ... (authors)

    @staticmethod
    def solve(a11: Scalar, a12: Scalar, a22: Scalar, b1: Scalar, b2: Scalar, lr: Scalar | None = None,
              momentum: Scalar | None = None, first: bool = False) -> tuple[Scalar, Scalar]:
        """(beta, rho) minimising -b^T x + 1/2 x^T A x over x = [beta, -rho], with fixed entries kept.

        z = 0 (``first``, or a22 = 0) reduces to the exact line search: rho = 0, beta = b1 / a11. The
        entries are 0-d tensors (solved on the device) or numpy float64 scalars (solved on the host).

        Example:
            >>> import numpy as np
            >>> beta, rho = CurveBall.solve(*map(np.float64, (2.0, 0.5, 1.0, 1.0, 0.25)))
            >>> a, b = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([1.0, 0.25])
            >>> np.allclose([beta, -rho], np.linalg.solve(a, b))
            True
        """
        with np.errstate(all="ignore"):  # on the host as on the device: x / 0 is inf or nan, checked by the step
            return CurveBall._solve(a11, a12, a22, b1, b2, lr, momentum, first)

    @staticmethod
    def _solve(a11: Scalar, a12: Scalar, a22: Scalar, b1: Scalar, b2: Scalar, lr: Scalar | None,
               momentum: Scalar | None, first: bool) -> tuple[Scalar, Scalar]:
        line = b1 / a11
        if lr is not None and momentum is not None:
            return lr, momentum
        if lr is not None:  # beta fixed: rho = (a12 beta - b2) / a22
            rho = _where(a22 > 0, (a12 * lr - b2) / a22, _zero(a22))
            return lr, (_zero(rho) if first else rho)
        if momentum is not None:  # rho fixed: beta = (b1 + a12 rho) / a11
            return (b1 + a12 * momentum) / a11, momentum
        if first:
            return line, _zero(line)
        det = a11 * a22 - a12 * a12
        regular = det > 1e-12 * abs(a11 * a22)
        beta = _where(regular, (a22 * b1 - a12 * b2) / det, line)
        neg_rho = _where(regular, (a11 * b2 - a12 * b1) / det, _zero(det))
        return beta, -neg_rho

    @staticmethod
    def lambda_update(lambd: Scalar, gamma: Scalar, group: dict) -> Scalar:
        """Levenberg-Marquardt: gamma < low -> lambda / factor^k; gamma > high -> lambda * factor^k."""
        scale = group["lambda_factor"] ** group["lambda_interval"]
        return _where(gamma < group["lambda_low"], lambd / scale,
                      _where(gamma > group["lambda_high"], lambd * scale, lambd))


def _param_dots(dzs: list[Tensor], zs: list[Tensor], cross: bool) -> Tensor:
    """Per parameter dz.dz, and with ``cross`` dz.z and z.z too: a (1 or 3, n) tensor, one stack for all."""
    dz_flat = [d.reshape(-1) for d in dzs]
    dots = [torch.dot(d, d) for d in dz_flat]
    if cross:
        z_flat = [z.reshape(-1) for z in zs]
        dots += [torch.dot(d, z) for d, z in zip(dz_flat, z_flat)] + [torch.dot(z, z) for z in z_flat]
    return torch.stack(dots).view(-1, len(dzs))


def curveball_step(batch, state) -> Tensor:
    """The training loop's step for ``optimizer=curveball``.

    The step ``fit`` uses for ``optimizer="curveball"``: ``opt.step(lambda: net(x), CrossEntropy(y))`` (or
    :class:`MeanSquaredError` for ``loss="mse"``), returning the detached loss.

    Example:
        >>> from backproplab import build_model, load_dataset
        >>> from backproplab.train import TrainConfig, fit
        >>> data = load_dataset("digits", n_train=128)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(16,))
        >>> rows = fit(model, data, TrainConfig(optimizer="curveball", lr=0, momentum=0, epochs=2, batch_size=64))
        >>> rows[-1]["train_loss"] < rows[0]["train_loss"]
        True
    """
    net, y = state.net, batch.y
    loss_obj = CrossEntropy(y) if state.config.loss == "cross_entropy" else MeanSquaredError(y)
    if state.config.loss == "mse" and y.dim() == 1:
        raise ValueError("mse loss with curveball needs float targets of shape (N, outputs)")
    loss, _ = state.optimizer.step(lambda: net(batch.x), loss_obj)
    return loss


def curveball_from_config(model: nn.Module, cfg) -> CurveBall:
    """``optimizer=curveball``: lr <= 0 and momentum <= 0 mean automatic beta and rho.

    Example:
        >>> from torch import nn
        >>> from backproplab.train import TrainConfig
        >>> opt = curveball_from_config(nn.Linear(2, 2), TrainConfig(optimizer="curveball", lr=0, momentum=0.9))
        >>> opt.param_groups[0]["auto_lr"], opt.param_groups[0]["auto_momentum"], opt.param_groups[0]["momentum"]
        (True, False, 0.9)
    """
    return CurveBall(model.parameters(), model=model, lr=max(cfg.lr, 0.0), momentum=max(cfg.momentum, 0.0),
                     auto_lr=cfg.lr <= 0, auto_momentum=cfg.momentum <= 0)

