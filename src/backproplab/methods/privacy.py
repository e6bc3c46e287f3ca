"""DP-SGD (Abadi et al. 2016) through the training loop: our clipping engine, Opacus's accountants.

Each example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to the sum, which is divided by the expected batch size.
Two engines compute the clipped sum:

- ``engine="ghost"`` (the default): :mod:`.ghost_clipping`, per-example norms from each layer's kept
  activations and output gradients, the clipped sum by book-keeping, no per-example gradient
  materialised where a cheaper form exists (Li et al. 2022; Bu et al. 2023). Same clip factor
  ``min(1, C / (||g_i|| + 1e-6))``, same noise draws (Opacus's ``_generate_noise``, in the same order)
  as Opacus.
- ``engine="opacus"``: Opacus's ``GradSampleModule`` per-example gradients and its ``DPOptimizer``.

The privacy spent comes from Opacus's accountants (RDP, Mironov 2017; PRV, Gopi et al. 2021), both kept and reported as
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
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..train import TrainConfig, TrainState, loss_step
from .ghost_clipping import GhostClipping


@dataclass
class DPConfig:
    noise_multiplier: float | None = 1.0  # None: derived from target_epsilon
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"  # which accountant picks the noise multiplier for target_epsilon
    secure_mode: bool = False  # Opacus's secure_mode: noise from a CSPRNG, not from the (public) run seed
    engine: str = "ghost"  # "ghost": our clipping engine; "opacus": Opacus's per-example gradients (for comparison)


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


ENGINES = ("ghost", "opacus")


class GaussianNoise:
    """The noise N(0, std^2 I) of each DP-SGD step, one draw per parameter in parameter order, from a stream
    of its own: seeded from the run's seed (so a run is reproducible and its noise does not depend on the data
    order or on dropout), or, in secure mode, from the operating system's CSPRNG, with Opacus's defence against
    floating-point attacks (the scaled sum of 4 draws: Holohan et al. 2021). Both engines draw from it, in
    Opacus's order, so the same seed gives the same noise on either.
    """

    def __init__(self, std: float, seed: int, secure: bool = False):
        import secrets

        self.std, self.secure = std, secure
        self.seed = secrets.randbits(63) if secure else seed
        self.generator: torch.Generator | None = None
        self._state: Tensor | None = None  # from load_state_dict, before the generator exists

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            state = self._state if self.generator is None else self.generator.get_state()
            self.generator = torch.Generator(device).manual_seed(self.seed)
            if state is not None:
                self.generator.set_state(state)
        return self.generator

    def add_to(self, tensors: list[Tensor]) -> None:
        """Add this step's noise to ``tensors`` (one per parameter, in order), in place, one draw at a time."""
        if self.std == 0:
            return
        for t, z in zip(tensors, self.draw(tensors)):
            t.add_(z)

    def draw(self, like: list[Tensor], scale: float = 1.0) -> list[Tensor]:
        """This step's noise times ``scale``: new tensors shaped as ``like``, drawn one at a time, in order."""
        return [self.draw_one(t, scale) for t in like]

    def draw_one(self, like: Tensor, scale: float = 1.0) -> Tensor:
        """The next tensor of the stream, shaped as ``like``, times ``scale``."""
        if self.std == 0:
            return torch.zeros_like(like)
        g = self.generator_on(like.device)
        if self.secure:  # Opacus's draw, its defence against floating-point attacks included
            from opacus.optimizers.optimizer import _generate_noise

            return _generate_noise(self.std, like, generator=g, secure_mode=True).mul_(scale)
        # Opacus's non-secure draw (without the zeros it does not use), its scale folded into the deviation
        return torch.normal(0, self.std * scale, size=like.shape, generator=g, dtype=like.dtype, device=like.device)

    def in_order(self, params: list[Tensor], scale: float = 1.0) -> NoiseInOrder:
        """This step's noise for ``params`` as a mapping that draws on first access, in ``params``' order."""
        return NoiseInOrder(params, lambda t: self.draw_one(t, scale))

    def state_dict(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._state
        return {"seed": self.seed, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self._state = sd["seed"], sd["state"]
        if self.generator is not None and self._state is not None:
            self.generator.set_state(self._state)


class NoiseInOrder(Mapping):
    """``{parameter: its noise}``, each drawn when first read, every earlier one first: the stream (and so the
    values) is that of drawing them all in order up front, but a consumer that reads them in order (the ghost
    engine, layer by layer, freeing each layer's kept tensors as it goes) never holds all the noise beside all
    the kept tensors."""

    def __init__(self, params: list[Tensor], draw: Callable[[Tensor], Tensor]):
        self._params, self._draw = params, draw
        self._index = {p: i for i, p in enumerate(params)}
        self._drawn: list[Tensor] = []

    def __getitem__(self, p: Tensor) -> Tensor:
        i = self._index[p]
        while len(self._drawn) <= i:
            self._drawn.append(self._draw(self._params[len(self._drawn)]))
        return self._drawn[i]

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


class DPSGD:
    """Wraps a model and optimizer for DP-SGD and supplies the loop's step and accounting callback.

    ``dp = DPSGD(model, optimizer, n=len(train), batch_size=B, steps=S, config=DPConfig(...))``;
    train ``dp.model`` with ``fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])``.
    ``dp.model._module`` is the trained model; ``dp.model.remove_hooks()`` returns it to plain gradients.
    An Opacus ``GradSampleModule`` (from ``make_private``) is trained as it is, on the Opacus engine.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int, steps: int,
                 config: DPConfig):
        import torch.distributed as dist
        from opacus import GradSampleModule
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        if isinstance(optimizer, DPOptimizer):
            raise TypeError(
                "DPSGD got an optimizer that is already an Opacus DPOptimizer (what PrivacyEngine.make_private "
                "returns). DPSGD does make_private's work itself (per-example clipping, noise, Poisson sampling "
                "and accounting), and a second wrapper would clip and noise twice and account wrongly: pass the "
                "model and the plain optimizer from before make_private, e.g. DPSGD(model, "
                "torch.optim.SGD(model.parameters(), lr), ...). Or train make_private's outputs in your own "
                "loop and read epsilon from the PrivacyEngine.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DPSGD needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # under torchrun: rank r holds the examples r, r + W, ...; each rank Poisson-samples its own share at
        # the global rate q (so every example still joins a step with probability q, independently), clips
        # per example, and Opacus's DistributedDPOptimizer adds the noise once (rank 0) before averaging
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
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
        self.engine = "opacus" if isinstance(model, GradSampleModule) else config.engine
        if self.engine not in ENGINES:
            raise ValueError(f"DPConfig.engine must be one of {ENGINES}, got {config.engine!r}")
        if self.engine == "ghost":
            self.model = GhostClipping(model)
            self.optimizer = optimizer  # the noise and the scaling happen in our step, before optimizer.step()
        else:
            self.model = model if isinstance(model, GradSampleModule) else GradSampleModule(model)
        self.model.no_ddp = True  # the loop must not wrap it in DDP: gradients are clipped before they are averaged
        if self.world > 1:
            with torch.no_grad():  # every rank starts from rank 0's weights
                for p in self.model.parameters():
                    dist.broadcast(p, 0)
        if self.engine == "ghost":
            pass
        elif self.world > 1:
            self.optimizer = DistributedDPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                                    max_grad_norm=config.max_grad_norm,
                                                    expected_batch_size=batch_size / self.world,
                                                    secure_mode=config.secure_mode)
        else:
            self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                         max_grad_norm=config.max_grad_norm, expected_batch_size=batch_size,
                                         secure_mode=config.secure_mode)
        # this rank's sampling stream: its own, so that two ranks' inclusions are independent
        self.sampler = torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + self.rank) % 2**63)
        # the noise stream (drawn on rank 0 only), shared by both engines: the same seed gives the same noise
        self.noise = GaussianNoise(self.noise_multiplier * config.max_grad_norm,
                                   (torch.initial_seed() * 1_000_003 + 999_983) % 2**63, secure=config.secure_mode)
        self.accountants = {"rdp": RDPAccountant(), "prv": PRVAccountant()}
        if self.engine == "opacus":  # DPOptimizer keeps a single step hook: feed both accountants
            self.optimizer.attach_step_hook(lambda optim: self._account())

    def _account(self) -> None:
        for acc in self.accountants.values():
            acc.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, kind: str = "rdp") -> float:
        acc = self.accountants[kind]
        if not acc.history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # no noise: no privacy (the accountants cannot represent it)
        with warnings.catch_warnings():  # Opacus warns when the optimal RDP order is at the grid's edge
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(self.config.delta))

    # -- the loop's callback: report epsilon, checkpoint the accountants
    def on_eval(self, state: TrainState) -> None:
        state.history[-1]["epsilon_rdp"] = self.epsilon("rdp")
        state.history[-1]["epsilon_prv"] = self.epsilon("prv")
        state.history[-1]["noise_multiplier"] = self.noise_multiplier
        state.history[-1]["secure_mode"] = self.config.secure_mode

    def state_dict(self) -> dict:
        return {**{k: [list(h) for h in a.history] for k, a in self.accountants.items()},
                "sampler": self.sampler.get_state(), "noise": self.noise.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        for k, a in self.accountants.items():
            a.history = [tuple(h) for h in sd[k]]
        if "sampler" in sd:
            self.sampler.set_state(sd["sampler"])
        if "noise" in sd:
            self.noise.load_state_dict(sd["noise"])

    def poisson_batch(self, device: torch.device | str) -> Tensor:
        """Indices of a Poisson sample: each training example independently with probability q (in secure mode
        from the operating system's CSPRNG, so the public run seed does not reveal the batches)."""
        share = torch.arange(self.rank, self.n, self.world)
        if self.config.secure_mode:
            import secrets

            u = torch.tensor([secrets.randbits(53) for _ in range(len(share))], dtype=torch.float64) / 2**53
        else:
            u = torch.rand(len(share), generator=self.sampler, dtype=torch.float64)
        return share[u < self.sample_rate].to(device)

    def step(self, loss_terms: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> Callable:
        """The loop's step: Poisson batch, per-example clipped gradients of the mean loss, noise, update.

        ``loss_terms(model, x, y)`` replaces the plain loss (e.g. benign + adversarial); it must be a mean of
        per-example terms so that Opacus's per-example gradients are those of each example's term.
        """

        def poisson(batch, state: TrainState):
            idx = self.poisson_batch(state.data.x_train.device)
            yield (state.data.x_train.index_select(0, idx), state.data.y_train.index_select(0, idx)), 1.0

        def private_loss(part, state: TrainState) -> Tensor:
            x, y = part
            if len(x) == 0:  # probability (1 - q)^n: Opacus's convention, a noise-only step
                for p in self.model.parameters() if self.engine == "opacus" else ():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                return torch.zeros((), device=x.device)
            return loss_terms(self.model, x, y) if loss_terms else state.loss_fn(self.model(x), y)

        if self.engine == "ghost":
            return self._ghost_step(poisson, private_loss)
        inner = loss_step(private_loss, parts=poisson)

        def step(batch, state: TrainState) -> Tensor:
            device = next(self.model.parameters()).device
            if self.rank == 0:  # Opacus draws from our noise stream (it adds noise on rank 0 only)
                self.optimizer.generator = self.noise.generator_on(device)
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return inner(batch, state)

        return step

    def _verify(self, x: Tensor, y: Tensor, state: TrainState, private_loss: Callable) -> None:
        """The engine's check (per-example gradients add up to the batch gradient) on two examples, before
        the first step; the random state is restored after, so the run is the same with or without it."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with self.model.recording():
                loss = private_loss((x, y), state) * len(x)
            self.model.verify(loss)

    def _ghost_step(self, poisson: Callable, private_loss: Callable) -> Callable:
        """zero_grad; loss of a Poisson batch; noise / expected batch size on rank 0 + clipped sum (ghost
        engine) / expected batch size; sum over ranks; optimizer.step(); account. The noise draws are
        Opacus's, in its order."""
        import torch.distributed as dist

        clip = self.config.max_grad_norm

        def step(batch, state: TrainState) -> Tensor:
            opt = self.optimizer
            # zero_grad(set_to_none=True) without its per-step overhead: the last step's gradients are freed
            # before this step's activations exist, and a frozen parameter does not step on a stale one
            params = []
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None
                    if p.requires_grad:
                        params.append(p)
            scale = 1.0 / self.batch_size
            ((x, y), _), = poisson(batch, state)
            if not self.model._checked and len(x):
                self._verify(x[:2], y[:2], state, private_loss)
            with self.model.recording():
                loss = private_loss((x, y), state)

            def noise() -> Mapping[nn.Parameter, Tensor]:
                """The noise / expected batch size, one draw per parameter in Opacus's order, on rank 0: each drawn
                when the engine reaches its layer, after the backward (so never beside the activations that
                the backward frees, nor beside the kept tensors of the layers already summed)."""
                if self.rank == 0:
                    return self.noise.in_order(params, scale)
                return NoiseInOrder(params, torch.zeros_like)

            if len(x):  # + the clipped sum / expected batch size, in place
                grads = list(self.model.clipped_sum(loss, clip, check=False, into=noise, alpha=scale,
                                                    scale=len(x))[0].values())
            else:
                grads = list(noise().values())
            if self.world > 1:
                with torch.no_grad():
                    for g in grads:
                        dist.all_reduce(g)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            self._account()
            return loss.detach()

        return step


def planned_steps(cfg: TrainConfig, n: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n / cfg.batch_size)
