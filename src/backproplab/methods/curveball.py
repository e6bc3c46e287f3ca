"""CurveBall: a minimal Newton solver interleaved with the weight updates.

Henriques, Ehrhardt, Albanie, Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for Deep
Learning", ICCV 2019 (arXiv 1805.08095), Algorithm 1 and Sections 3-4. Implemented from the equations.

Curvature: the damped generalised Gauss-Newton matrix H = J^T H_L J + lambda I, with J = d outputs / d w
and H_L the Hessian of the loss w.r.t. the outputs. One buffer z (like momentum). Each step::

    dz  = J^T (H_L J z + J_L) + lambda z          (J_L = dL/d outputs; dz = H z + g)
    z   <- rho z - beta dz
    w   <- w + z

J z is one forward-mode product, H_L (J z) is closed-form in output space, and ONE reverse pass with
cotangent H_L J z + J_L yields gradient and GGN product together. The step sizes come from minimising
the quadratic model M(dw) = g^T dw + 1/2 dw^T H dw over dw = rho z - beta dz (paper eq. 13-14)::

    [beta, -rho] = A^-1 b,  A = [[dz^T H dz, z^T H dz], [z^T H dz, z^T H z]],  b = [g^T dz, g^T z]

evaluated in output space from a second forward-mode product J dz (a11 = lambda|dz|^2 + (J dz)^T H_L (J dz),
a12 = lambda dz.z + (J z)^T H_L (J dz), a22 = lambda|z|^2 + (J z)^T H_L (J z), b1 = J_L.(J dz), b2 = J_L.(J z)).
With z = 0 (the first step) A is singular and the solution reduces to the exact line search along -g:
rho = 0, beta = g^T g / g^T H g. The predicted change is M = -1/2 x^T b.

Levenberg-Marquardt damping (paper Sec. 4, defaults from the paper): every ``lambda_interval`` steps the
loss is re-evaluated on the same batch; gamma = (L(w + z) - L(w)) / M; gamma < ``lambda_low`` gives
lambda <- lambda / factor^interval, gamma > ``lambda_high`` gives lambda <- lambda * factor^interval.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..train import OPTIMIZER_STEPS, OPTIMIZERS

ModelFn = Callable[[], Tensor]
LossFn = Callable[[Tensor], Tensor]


class NonFiniteCurveBallError(FloatingPointError):
    """The loss or the 2x2 solve was not finite; the weights were left unchanged."""


# ---------------------------------------------------------------- losses with closed-form output Hessians


class CrossEntropy:
    """Mean softmax cross-entropy with closed-form output gradient and Hessian-vector product:
    J_L = (p - onehot(y)) / B,  H_L v = (p * v - p (p . v)) / B per example."""

    def __init__(self, targets: Tensor):
        self.targets = targets

    def __call__(self, outputs: Tensor) -> Tensor:
        return F.cross_entropy(outputs, self.targets)

    def output_grad_and_hvp(self, outputs: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        p = outputs.detach().softmax(-1)
        b = outputs.shape[0]
        grad = (p - F.one_hot(self.targets, p.shape[-1]).to(p.dtype)) / b
        return (lambda v: (p * v - p * (p * v).sum(-1, keepdim=True)) / b), grad


class MeanSquaredError:
    """Mean over all elements of (outputs - targets)^2: J_L = 2 (y - t) / N, H_L v = 2 v / N (N elements)."""

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


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class _Call(nn.Module):
    """Lets functional_call substitute the parameters of ``model`` while an arbitrary closure runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.fn: ModelFn | None = None

    def forward(self) -> Tensor:
        return self.fn()


# ---------------------------------------------------------------- the optimizer


class CurveBall(torch.optim.Optimizer):
    """CurveBall (Henriques et al. 2019) as a ``torch.optim.Optimizer``.

    ``loss, outputs = opt.step(model_fn, loss_fn)``: ``model_fn()`` returns the outputs for the current
    batch and must be re-callable (same batch); ``loss_fn(outputs)`` returns the scalar loss. Pass
    :class:`CrossEntropy` / :class:`MeanSquaredError` objects for closed-form H_L; any other callable is
    differentiated twice by autograd in output space.

    Args:
        model: the module owning the parameters. With it, J v is true forward-mode AD
            (``torch.autograd.forward_ad`` over ``torch.func.functional_call``; BatchNorm in train mode
            works and its running statistics move once per step). Without it, J v uses the slower
            double-backward trick (J v = d/du <J^T u, v>), which keeps the plain optimizer contract.
        lr, momentum: fixed beta and rho; ``None`` (default) solves for them each step. A fixed value
            is never overwritten; with one fixed, the other is the 1-D minimiser.
        lambd: initial damping lambda (paper: 1.0). auto_lambda: the Levenberg-Marquardt rule.
        on_nonfinite: "raise" (default; one host sync per step to check) or "skip" (no sync: a
            non-finite step leaves weights and z unchanged, counted in ``state['skipped']``).
        low_memory: compute J z in a pass of its own, without a reverse graph, then run a plain
            forward for the reverse pass. Otherwise J z rides on the forward that builds the reverse
            graph, which saves a forward but lets autograd record the tangent computation too; for
            normalisation layers that history is several activation-sized tensors per layer.
            ``None`` (default): on when ``model`` has a normalisation layer (BatchNorm, GroupNorm,
            LayerNorm, InstanceNorm), keeping memory near momentum SGD's. Measured on the small BN
            CNN of ``benchmarks/bench_curveball.py``: peak memory 2.8x SGD -> 1.2x, step time
            2.2x -> 2.3x (fixed lr/momentum). Same result either way.

    Parameter groups: allowed (for example to leave some parameters out), but rho and beta are solved
    jointly over all parameters, so every group must share lr, momentum and lambda settings.
    Under torch.distributed the product dz and the 2x2 system are averaged over ranks (mean loss).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], *, model: nn.Module | None = None,
                 lr: float | None = None, momentum: float | None = None, lambd: float = 1.0,
                 auto_lambda: bool = True, lambda_factor: float = 0.999, lambda_low: float = 0.5,
                 lambda_high: float = 1.5, lambda_interval: int = 5, on_nonfinite: str = "raise",
                 low_memory: bool | None = None):
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0, got {lambd}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        defaults = dict(lr=lr, momentum=momentum, lambd=lambd, auto_lambda=auto_lambda, lambda_factor=lambda_factor,
                        lambda_low=lambda_low, lambda_high=lambda_high, lambda_interval=lambda_interval)
        super().__init__(params, defaults)
        shared = ("lr", "momentum", "auto_lambda", "lambda_factor", "lambda_low", "lambda_high", "lambda_interval")
        for g in self.param_groups[1:]:
            for k in shared + ("lambd",):
                if g[k] != self.param_groups[0][k]:
                    raise ValueError(f"CurveBall solves rho/beta jointly over all parameters, so every parameter "
                                     f"group must have the same {k!r} (got {self.param_groups[0][k]} and {g[k]})")
        self.model = model
        if low_memory is None:
            low_memory = model is not None and any(isinstance(m, _NORM_LAYERS) for m in model.modules())
        self.low_memory = bool(low_memory)
        self.on_nonfinite = on_nonfinite
        self._names: dict[int, str] = {}
        if model is not None:
            self._names = {id(p): n for n, p in model.named_parameters()}
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
        self.curveball_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in glob.items()}

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # -- Jacobian-vector products
    @contextmanager
    def _same_batch_pass(self) -> Iterator[None]:
        """An extra pass over the same batch: same dropout masks, BatchNorm statistics left untouched."""
        buffers = [b.detach().clone() for b in self.model.buffers()] if self.model is not None else []
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
            if self.model is not None:
                with torch.no_grad():
                    for b, saved in zip(self.model.buffers(), buffers):
                        b.copy_(saved)

    def _forward_jvp(self, model_fn: ModelFn, params: list[Tensor], tangents: list[Tensor]) -> tuple[Tensor, Tensor]:
        with fwAD.dual_level():
            duals = {"model." + self._names[id(p)]: fwAD.make_dual(p, t) for p, t in zip(params, tangents)}
            self._call.fn = model_fn
            try:
                out = functional_call(self._call, duals, (), strict=False)
            finally:
                self._call.fn = None
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            tangent = torch.zeros_like(primal)
        # the tangent's own autograd history is never differentiated: drop it so its saved tensors go now
        return primal, tangent.detach()

    @staticmethod
    def _double_backward_jvp(outputs: Tensor, params: list[Tensor], tangents: list[Tensor]) -> Tensor:
        u = torch.zeros_like(outputs, requires_grad=True)
        vjp = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(vjp, tangents) if g is not None]
        dot = sum((g * t).sum() for g, t in pairs)
        (jv,) = torch.autograd.grad(dot, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(outputs) if jv is None else jv

    # -- the step
    @torch.no_grad()
    def step(self, model_fn: ModelFn | None = None, loss_fn: LossFn | None = None):  # type: ignore[override]
        """One CurveBall step on the batch that ``model_fn`` evaluates; returns ``(loss, outputs)``."""
        if model_fn is None or loss_fn is None:
            raise TypeError("CurveBall.step needs model_fn and loss_fn: opt.step(lambda: model(x), "
                            "CrossEntropy(y)); a single closure cannot give the forward-mode products")
        group = self.param_groups[0]
        glob = self.curveball_state
        params = self._params()
        for p in params:
            if "z" not in self.state[p]:
                self.state[p]["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        zs = [self.state[p]["z"] for p in params]
        lambd = glob["lambd"].to(params[0].device)
        first = glob["step"] == 0
        world = dist.get_world_size() if dist.is_initialized() else 1

        self._rng_at_step_start = torch.get_rng_state()
        self._cuda_rng_at_step_start = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        # pass 1: outputs with reverse graph, and J z by forward mode (or double backward)
        if self.model is not None and self.low_memory:  # J z first, in a pass without a reverse graph
            with self._same_batch_pass():
                _, jz = self._forward_jvp(model_fn, params, zs)
        with torch.enable_grad():
            if self.model is None:
                outputs = model_fn()
                jz = self._double_backward_jvp(outputs, params, zs)
            elif self.low_memory:
                outputs = model_fn()
            else:
                outputs, jz = self._forward_jvp(model_fn, params, zs)
        if hasattr(loss_fn, "output_grad_and_hvp"):
            loss = loss_fn(outputs.detach())
            hvp, jl = loss_fn.output_grad_and_hvp(outputs)
        else:
            loss, hvp, jl = _autograd_output_products(loss_fn, outputs)
        hl_jz = hvp(jz)
        # ONE reverse pass: J^T (H_L J z + J_L) = GGN z + gradient
        with torch.enable_grad():
            jt = torch.autograd.grad(outputs, params, hl_jz + jl, retain_graph=self.model is None, allow_unused=True)
        dzs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, jt)]
        if world > 1:
            flat = torch.cat([d.reshape(-1) for d in dzs])
            dist.all_reduce(flat)
            flat /= world
            dzs = list(torch.split(flat, [d.numel() for d in dzs]))
            dzs = [d.view_as(p) for d, p in zip(dzs, params)]
        for d, z in zip(dzs, zs):  # in place, no temporaries: dz = GGN z + g + lambda z
            d.addcmul_(z, lambd)

        # pass 2: J dz, then the 2x2 system in output space
        need_system = group["lr"] is None or group["momentum"] is None or self._lambda_due(glob["step"], group)
        lr_fixed = None if group["lr"] is None else torch.tensor(float(group["lr"]), device=lambd.device)
        mom_fixed = None if group["momentum"] is None else torch.tensor(float(group["momentum"]), device=lambd.device)
        if need_system:
            with self._same_batch_pass(), torch.enable_grad() if self.model is None else torch.no_grad():
                if self.model is not None:
                    _, jdz = self._forward_jvp(model_fn, params, dzs)
                else:
                    jdz = self._double_backward_jvp(outputs, params, dzs)
            hl_jdz = hvp(jdz)
            out_terms = torch.stack([(jdz * hl_jdz).sum(), (jz * hl_jdz).sum(), (jz * hl_jz).sum(),
                                     (jl * jdz).sum(), (jl * jz).sum()])
            if world > 1:
                dist.all_reduce(out_terms)
                out_terms /= world
            dot = lambda a, b: sum(torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b))  # noqa: E731
            a11 = lambd * dot(dzs, dzs) + out_terms[0]
            a12 = lambd * dot(dzs, zs) + out_terms[1]
            a22 = lambd * dot(zs, zs) + out_terms[2]
            b1, b2 = out_terms[3], out_terms[4]
            beta, rho = self.solve(a11, a12, a22, b1, b2, lr_fixed, mom_fixed, first)
            x1, x2 = beta, -rho
            predicted = -0.5 * (x1 * b1 + x2 * b2)
        else:
            beta, rho, predicted = lr_fixed, mom_fixed, None

        ok = torch.isfinite(loss) & torch.isfinite(beta) & torch.isfinite(rho)
        if self.on_nonfinite == "raise":
            if not bool(ok):
                raise NonFiniteCurveBallError(
                    f"CurveBall step {glob['step']}: loss={float(loss):.4g}, beta={float(beta):.4g}, "
                    f"rho={float(rho):.4g} is not finite; the weights were not changed. Check the data and the "
                    "model, raise lambd, or pass on_nonfinite='skip'")
            for p, z, dz in zip(params, zs, dzs):  # z <- rho z - beta dz; w <- w + z, in place
                z.mul_(rho).addcmul_(dz, beta, value=-1)
                p.add_(z)
        else:  # without a host sync: a non-finite step leaves z and w as they were (rho 1, beta 0)
            rho = torch.where(ok, rho, torch.ones_like(rho))
            beta = torch.where(ok, beta, torch.zeros_like(beta))
            keep = ok.to(params[0].dtype)
            for p, z, dz in zip(params, zs, dzs):
                z.mul_(rho).addcmul_(dz.nan_to_num_(0.0, 0.0, 0.0), beta, value=-1)
                p.addcmul_(z, keep)
            glob["skipped"] = glob["skipped"] + (~ok).to(torch.int64)
        glob["rho"], glob["beta"] = rho.detach(), beta.detach()

        if group["auto_lambda"] and self._lambda_due(glob["step"], group):
            with self._same_batch_pass():
                new_loss = loss_fn(model_fn())
            if world > 1:
                pair = torch.stack([new_loss.detach(), loss.detach()])
                dist.all_reduce(pair)
                new_loss, loss_avg = pair / world
            else:
                loss_avg = loss
            gamma = (new_loss - loss_avg) / predicted
            glob["gamma"] = gamma.detach()
            glob["lambd"] = self.lambda_update(lambd, gamma, group).detach()
        glob["step"] += 1
        return loss.detach(), outputs.detach()

    @staticmethod
    def _lambda_due(step: int, group: dict) -> bool:
        return group["auto_lambda"] and (step + 1) % group["lambda_interval"] == 0

    @staticmethod
    def solve(a11: Tensor, a12: Tensor, a22: Tensor, b1: Tensor, b2: Tensor, lr: Tensor | None = None,
              momentum: Tensor | None = None, first: bool = False) -> tuple[Tensor, Tensor]:
        """(beta, rho) minimising -b^T x + 1/2 x^T A x over x = [beta, -rho], with fixed entries kept.

        z = 0 (``first``, or a22 = 0) reduces to the exact line search: rho = 0, beta = b1 / a11.
        """
        line = b1 / a11
        if lr is not None and momentum is not None:
            return lr, momentum
        if lr is not None:  # beta fixed: rho = (a12 beta - b2) / a22
            rho = torch.where(a22 > 0, (a12 * lr - b2) / a22, torch.zeros_like(a22))
            return lr, (torch.zeros_like(rho) if first else rho)
        if momentum is not None:  # rho fixed: beta = (b1 + a12 rho) / a11
            return (b1 + a12 * momentum) / a11, momentum
        if first:
            return line, torch.zeros_like(line)
        det = a11 * a22 - a12 * a12
        regular = det > 1e-12 * (a11 * a22).abs()
        beta = torch.where(regular, (a22 * b1 - a12 * b2) / det, line)
        neg_rho = torch.where(regular, (a11 * b2 - a12 * b1) / det, torch.zeros_like(det))
        return beta, -neg_rho

    @staticmethod
    def lambda_update(lambd: Tensor, gamma: Tensor, group: dict) -> Tensor:
        """Levenberg-Marquardt: gamma < low -> lambda / factor^k; gamma > high -> lambda * factor^k."""
        scale = group["lambda_factor"] ** group["lambda_interval"]
        return torch.where(gamma < group["lambda_low"], lambd / scale,
                           torch.where(gamma > group["lambda_high"], lambd * scale, lambd))


def curveball_step(batch, state) -> Tensor:
    """The training loop's step for ``optimizer=curveball``."""
    net, y = state.net, batch.y
    loss_obj = CrossEntropy(y) if state.config.loss == "cross_entropy" else MeanSquaredError(y)
    if state.config.loss == "mse" and y.dim() == 1:
        raise ValueError("mse loss with curveball needs float targets of shape (N, outputs)")
    loss, _ = state.optimizer.step(lambda: net(batch.x), loss_obj)
    return loss


def _make(model: nn.Module, cfg) -> CurveBall:
    """``optimizer=curveball``: lr <= 0 and momentum <= 0 mean automatic beta and rho."""
    lr = cfg.lr if cfg.lr > 0 else None
    momentum = cfg.momentum if cfg.momentum > 0 else None
    return CurveBall(model.parameters(), model=model, lr=lr, momentum=momentum)


OPTIMIZERS["curveball"] = _make
OPTIMIZER_STEPS["curveball"] = curveball_step
