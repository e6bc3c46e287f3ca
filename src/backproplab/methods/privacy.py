"""DP-SGD (Abadi et al. 2016) through the training loop, built on Opacus.

Per-example gradients come from Opacus's ``GradSampleModule``; clipping to ``max_grad_norm`` and Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` from its ``DPOptimizer``; the privacy
spent from its accountants (RDP, Mironov 2017; PRV, Gopi et al. 2021), both kept and reported as
``epsilon_rdp`` / ``epsilon_prv`` at every evaluation. Batches are drawn by Poisson sampling with rate
q = batch_size / n (each example independently), which is what the accountants assume: the loop's own
fixed-size batches are not used. ``target_epsilon`` picks the noise multiplier with Opacus's
``get_noise_multiplier`` for the planned number of steps.

Models are checked with Opacus's ``ModuleValidator`` and ``GradSampleModule.validate`` before training:
BatchNorm is replaced by GroupNorm (with a message saying so); any other unsupported layer (a trainable
layer holding buffers) raises Opacus's own explanation.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..train import TrainConfig, TrainState, loss_step


@dataclass
class DPConfig:
    noise_multiplier: float | None = 1.0  # None: derived from target_epsilon
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"  # which accountant picks the noise multiplier for target_epsilon


def prepare_model(model: nn.Module, quiet: bool = False) -> nn.Module:
    """Opacus-compatible model: BatchNorm -> GroupNorm (reported), other problems raise Opacus's error."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        bn = [e for e in errors if "BatchNorm" in str(e)]
        if bn and not quiet:
            print(f"backproplab: DP-SGD cannot use BatchNorm (it mixes examples); replacing {len(bn)} BatchNorm "
                  "layer(s) by GroupNorm", file=sys.stderr)
        model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=True)  # raises UnsupportedModuleError with Opacus's explanation
    GradSampleModule.validate(model, strict=True)  # trainable layers with buffers: NotImplementedError
    return model


class DPSGD:
    """Wraps a model and optimizer for DP-SGD and supplies the loop's step and accounting callback.

    ``dp = DPSGD(model, optimizer, n=len(train), batch_size=B, steps=S, config=DPConfig(...))``;
    train ``dp.model`` with ``fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int, steps: int,
                 config: DPConfig):
        from opacus import GradSampleModule
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise NotImplementedError("DP-SGD here runs in one process: under torchrun every rank would add its own "
                                      "noise and the accounting would not hold. Run DP-SGD without torchrun (for the "
                                      "stobatch experiment: --set dp_baselines=false under torchrun)")
        self.n, self.batch_size, self.config = n, batch_size, config
        self.sample_rate = batch_size / n
        noise = config.noise_multiplier
        if config.target_epsilon is not None:
            with warnings.catch_warnings():  # the search visits noise levels whose optimal order is at the edge
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                noise = get_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=config.delta,
                                             sample_rate=self.sample_rate, steps=steps, accountant=config.accountant)
        if noise is None:
            raise ValueError("DP-SGD needs noise_multiplier or target_epsilon")
        self.noise_multiplier = float(noise)
        self.model = model if isinstance(model, GradSampleModule) else GradSampleModule(model)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=config.max_grad_norm, expected_batch_size=batch_size)
        self.accountants = {"rdp": RDPAccountant(), "prv": PRVAccountant()}
        hooks = [acc.get_optimizer_hook_fn(sample_rate=self.sample_rate) for acc in self.accountants.values()]

        def account(optim) -> None:  # DPOptimizer keeps a single step hook: feed both accountants
            for hook in hooks:
                hook(optim)

        self.optimizer.attach_step_hook(account)

    def epsilon(self, kind: str = "rdp") -> float:
        acc = self.accountants[kind]
        if not acc.history:
            return 0.0
        with warnings.catch_warnings():  # Opacus warns when the optimal RDP order is at the grid's edge
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(self.config.delta))

    # -- the loop's callback: report epsilon, checkpoint the accountants
    def on_eval(self, state: TrainState) -> None:
        state.history[-1]["epsilon_rdp"] = self.epsilon("rdp")
        state.history[-1]["epsilon_prv"] = self.epsilon("prv")
        state.history[-1]["noise_multiplier"] = self.noise_multiplier

    def state_dict(self) -> dict:
        return {k: [list(h) for h in a.history] for k, a in self.accountants.items()}

    def load_state_dict(self, sd: dict) -> None:
        for k, a in self.accountants.items():
            a.history = [tuple(h) for h in sd[k]]

    def poisson_batch(self, device: torch.device | str) -> Tensor:
        """Indices of a Poisson sample: each training example independently with probability q."""
        return torch.nonzero(torch.rand(self.n) < self.sample_rate).flatten().to(device)

    def step(self, loss_terms: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> Callable:
        """The loop's step: Poisson batch, per-example clipped gradients of the mean loss, noise, update.

        ``loss_terms(model, x, y)`` replaces the plain loss (e.g. benign + adversarial); it must be a mean of
        per-example terms so that Opacus's per-example gradients are those of each example's term.
        """

        def poisson(batch, state: TrainState):
            idx = self.poisson_batch(state.data.x_train.device)
            yield (state.data.x_train[idx], state.data.y_train[idx]), 1.0

        def private_loss(part, state: TrainState) -> Tensor:
            x, y = part
            if len(x) == 0:  # probability (1 - q)^n: Opacus's convention, a noise-only step
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                return torch.zeros((), device=x.device)
            return loss_terms(self.model, x, y) if loss_terms else state.loss_fn(self.model(x), y)

        inner = loss_step(private_loss, parts=poisson)

        def step(batch, state: TrainState) -> Tensor:
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return inner(batch, state)

        return step


def planned_steps(cfg: TrainConfig, n: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n / cfg.batch_size)
