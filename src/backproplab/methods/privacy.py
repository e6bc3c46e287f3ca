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

What voids the guarantee is refused with a :class:`PrivacyError` naming the layer and the fix, never run
quietly (the list, with each message, is in the README's "DP-SGD refuses" table):

- at construction (:func:`check_private`, a registry of per-layer rules): any layer that mixes the examples
  of a batch, with or without trainable parameters (BatchNorm of every kind, InstanceNorm with running
  statistics, ``Embedding(max_norm=...)``), and weight normalisation or parametrizations;
- at the first step, on a few training examples (a number unlike any other dimension of the input): one
  per-example norm per example, each equal to that example's gradient norm computed alone (a model that
  moves the batch off dimension 0, a sequence-first LSTM say, or mixes examples in any other way fails it);
- at every step: a buffer changed by the private forward (un-noised statistics of the data saved with the
  model); a trainable parameter the engine does not know (unfrozen or replaced after ``DPSGD(...)``); an
  optimizer step taken outside :meth:`DPSGD.step` (the user's own ``loss.backward(); optimizer.step()``, or
  ``fit`` without ``step=dp.step()``), which would be plain SGD reported as private; ``fit`` stepping another
  optimizer than ``dp.optimizer`` (one it built from the TrainConfig, say).

The un-noised training loss of the private batches is not written into the run's records
(``train_loss_withheld``), and every evaluation row says where the noise came from: the run's seed
(reproducible, not for release) or, in ``secure_mode``, the operating system's CSPRNG.
:func:`prepare_model` replaces every BatchNorm by GroupNorm (with a message); any other layer Opacus cannot
handle raises Opacus's own explanation.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import _io
from ..dist import rank_and_world
from ..streams import derive, derive_seed
from .._log import logger
from ..train import TrainConfig, TrainState, gradient_step, loss_step
from .ghost_clipping import GhostClipping


@dataclass
class DPConfig:
    """DP-SGD's settings: the noise multiplier sigma (or ``target_epsilon``, from which the accountant derives
    it), the clip C, delta, the accountant, the noise source and the clipping engine.

    Example:
        >>> cfg = DPConfig(noise_multiplier=None, target_epsilon=4.0, delta=1e-5)
        >>> cfg.max_grad_norm, cfg.accountant, cfg.engine
        (1.0, 'rdp', 'ghost')
    """
    noise_multiplier: float | None = 1.0  # None: derived from target_epsilon
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"  # which accountant picks the noise multiplier for target_epsilon
    secure_mode: bool = False  # Opacus's secure_mode: noise from a CSPRNG, not from the (public) run seed
    engine: str = "ghost"  # "ghost": our clipping engine; "opacus": Opacus's per-example gradients (for comparison)


class PrivacyError(ValueError):
    """A model, loop or setting that would void DP-SGD's guarantee; the message names it and the fix.

    Example:
        >>> from torch import nn
        >>> check_private(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        backproplab.methods.privacy.PrivacyError: ...BatchNorm mixes the examples of a batch...
    """


def prepare_model(model: nn.Module, quiet: bool = False) -> nn.Module:
    """Opacus-compatible model: every BatchNorm -> GroupNorm (reported; affine or not, frozen or not), other
    problems raise Opacus's error.

    Opacus's ``ModuleValidator.fix`` replaces only the BatchNorm layers its validator flags, which are those
    with trainable parameters: ``BatchNorm(affine=False)`` or a frozen one would stay and mix examples. Each
    BatchNorm becomes ``GroupNorm(min(32, C), C)`` as Opacus's fix makes it, keeping ``affine`` and frozen
    parameters frozen.

    Example:
        >>> from torch import nn
        >>> model = prepare_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), quiet=True)
        >>> [type(m).__name__ for m in model]
        ['Conv2d', 'GroupNorm', 'ReLU']

    References:
        Opacus's ``ModuleValidator.fix`` (the replacement it makes); Wu and He, "Group normalization", ECCV 2018.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    replaced = _replace_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        model, replaced = _group_norm_for(model), 1
    if replaced and not quiet:
        logger.info(f"backproplab: DP-SGD cannot use BatchNorm (it mixes examples); replacing {replaced} BatchNorm "
                    "layer(s) by GroupNorm")
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=True)  # raises UnsupportedModuleError with Opacus's explanation
    GradSampleModule.validate(model, strict=True)  # trainable layers with buffers: NotImplementedError
    return model


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    gn = nn.GroupNorm(min(32, bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    like = next((t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()), None)
    return gn if like is None else gn.to(like.device, like.dtype)


def _replace_batchnorm(model: nn.Module) -> int:
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _group_norm_for(child))
            count += 1
        else:
            count += _replace_batchnorm(child)
    return count


# ---------------------------------------------------------------- what DP-SGD refuses, layer by layer

# One rule per kind of layer that voids the guarantee: rule(module) -> the reason and the fix, or None.
# Registered as Opacus registers its validators, so a new kind is one decorated function.
REFUSAL_RULES: list[Callable[[nn.Module], str | None]] = []


def register_refusal(rule: Callable[[nn.Module], str | None]) -> Callable[[nn.Module], str | None]:
    """Add a per-layer rule to :func:`check_private`: ``rule(module)`` returns why DP-SGD cannot train a model
    holding that module, with the fix, or None.

    Example:
        >>> from torch import nn
        >>> @register_refusal
        ... def _no_embeddings(module):
        ...     if isinstance(module, nn.Embedding):
        ...         return "this lab has no per-example rule for Embedding; use a Linear layer on one-hot inputs"
        >>> try:
        ...     check_private(nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2)))
        ... except PrivacyError as e:
        ...     print(str(e).splitlines()[1].strip()[:35])
        layer '0' (Embedding): this lab has
        >>> REFUSAL_RULES.remove(_no_embeddings)
    """
    REFUSAL_RULES.append(rule)
    return rule


@register_refusal
def _batchnorm(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return ("BatchNorm mixes the examples of a batch (each output depends on the whole batch, so clipping "
                "one example's gradient does not bound its influence) and saves un-noised batch means as running "
                "statistics, with or without trainable parameters, in train or eval mode. Fix: "
                "privacy.prepare_model(model) replaces it by GroupNorm, or remove it")
    return None


@register_refusal
def _instance_norm_with_running_stats(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
        return ("InstanceNorm with track_running_stats=True keeps running means of the private batches (un-noised) "
                "and uses them in eval mode. Fix: track_running_stats=False")
    return None


@register_refusal
def _embedding_max_norm(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
        return (f"{type(m).__name__}(max_norm={m.max_norm}) renormalises, in place, exactly the rows that the private "
                "batch looks up (which rows changed reveals the batch's tokens). Fix: max_norm=None")
    return None


@register_refusal
def _weight_normalisation(m: nn.Module) -> str | None:
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(m) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
        return ("weight normalisation / parametrizations compute the weight outside the layer's forward, where "
                "neither engine's per-example gradients follow it. Fix: remove it "
                "(torch.nn.utils.parametrize.remove_parametrizations, or remove_weight_norm)")
    return None


def check_private(model: nn.Module) -> None:
    """Raise :class:`PrivacyError` listing every layer of ``model`` that a rule of :data:`REFUSAL_RULES` refuses
    (one line each: the layer's name and type, why, and the fix). The checks that need data (examples mixed
    by the forward, buffers it changes) run in :meth:`DPSGD.step`.

    Example:
        >>> from torch import nn
        >>> check_private(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)))      # nothing refused
        >>> try:
        ...     check_private(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        ... except PrivacyError as e:
        ...     print("BatchNorm1d" in str(e))
        True
    """
    problems = [f"layer {name or '(the model itself)'!r} ({type(m).__name__}): {why}"
                for name, m in model.named_modules() for rule in REFUSAL_RULES if (why := rule(m)) is not None]
    if problems:
        raise PrivacyError("DP-SGD cannot train this model privately:\n  " + "\n  ".join(problems))


ENGINES = ("ghost", "opacus")


# the operating system's CSPRNG (getrandom on Linux); a module attribute so a test can substitute known bytes
_random_bytes: Callable[[int], bytes] = os.urandom


def csprng_normal(shape: Sequence[int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Tensor:
    """Standard normal draws from the operating system's CSPRNG, made robust to floating-point attacks.

    Uniforms u = (k + 1/2) / 2^53 from 53 random bits each (never 0 or 1), Box-Muller
    z = sqrt(-2 ln u1) cos(2 pi u2), sqrt(-2 ln u1) sin(2 pi u2) in float64, then Opacus's secure-mode defence
    (Holohan & Braghin, 2021, Section 5.1; Opacus's ``_generate_noise``): each value is the sum of 4 such draws
    halved, a standard normal whose low-order bits no longer reveal the draw. No state exists to save or leak.

    Example:
        >>> z = csprng_normal((3, 2))
        >>> z.shape, z.dtype
        (torch.Size([3, 2]), torch.float32)

    References:
        Holohan & Braghin, "Secure random sampling in differential privacy", ESORICS 2021.
    """
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pairs = 2 * count  # 4 normals per value, 2 per Box-Muller pair
    bits = torch.frombuffer(bytearray(_random_bytes(16 * pairs)), dtype=torch.int64).view(2, pairs)
    u = ((bits >> 11) & (2**53 - 1)).double().add_(0.5).div_(2.0**53)  # (2, pairs) in (0, 1)
    radius, angle = torch.sqrt(-2.0 * torch.log(u[0])), (2.0 * math.pi) * u[1]
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:4 * count]
    return normals.view(4, count).sum(0).mul_(0.5).view(*shape).to(device=device, dtype=dtype)


class GaussianNoise:
    """The noise N(0, std^2 I) of each DP-SGD step, one draw per parameter in parameter order.

    Default: a stream of its own seeded from the run's seed, so a run is reproducible and its noise does not
    depend on the data order or on dropout. Whoever knows the seed can subtract the noise: such a run is for
    research, not for release (every evaluation row says so in ``noise_source``). ``secure=True``: every draw
    comes from the operating system's CSPRNG through :func:`csprng_normal`; nothing about it is seeded, saved
    in a checkpoint or reproducible. Both engines draw from it, in Opacus's order, so the same seed gives the
    same noise on either.

    Example:
        >>> import torch
        >>> params = [torch.zeros(3), torch.zeros(2, 2)]
        >>> a, b = GaussianNoise(std=1.0, seed=7), GaussianNoise(std=1.0, seed=7)
        >>> all(torch.equal(u, v) for u, v in zip(a.draw(params), b.draw(params)))    # seeded: reproducible
        True

    References:
        Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang, "Deep learning with differential privacy",
        CCS 2016.
    """

    def __init__(self, std: float, seed: int, secure: bool = False):
        self.std, self.secure = std, secure
        self.seed = None if secure else seed
        self.generator: torch.Generator | None = None
        self._state: Tensor | None = None  # from load_state_dict, before the generator exists

    @property
    def source(self) -> str:
        return ("operating-system CSPRNG (secure_mode)" if self.secure
                else "the run's seed: reproducible, not for release")

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.secure:
            raise PrivacyError("secure-mode noise comes from the operating system's CSPRNG, not from a seeded "
                               "torch.Generator")
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
        if self.secure:
            return csprng_normal(like.shape, like.dtype, like.device).mul_(self.std * scale)
        # Opacus's non-secure draw (without the zeros it does not use), its scale folded into the deviation
        g = self.generator_on(like.device)
        return torch.normal(0, self.std * scale, size=like.shape, generator=g, dtype=like.dtype, device=like.device)

    def in_order(self, params: list[Tensor], scale: float = 1.0) -> NoiseInOrder:
        """This step's noise for ``params`` as a mapping that draws on first access, in ``params``' order."""
        return NoiseInOrder(params, lambda t: self.draw_one(t, scale))

    def state_dict(self) -> dict:
        if self.secure:  # nothing to resume, and nothing secret written to disk
            return {"secure": True}
        state = self.generator.get_state() if self.generator is not None else self._state
        return {"seed": self.seed, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        if self.secure or sd.get("secure"):
            return
        self.seed, self._state = sd["seed"], sd["state"]
        if self.generator is not None and self._state is not None:
            self.generator.set_state(self._state)


class NoiseInOrder(Mapping):
    """``{parameter: its noise}``, each drawn when first read, every earlier one first: the stream (and so the
    values) is that of drawing them all in order up front, but a consumer that reads them in order (the ghost
    engine, layer by layer, freeing each layer's kept tensors as it goes) never holds all the noise beside all
    the kept tensors.

    Example:
        >>> import torch
        >>> params = [torch.zeros(2), torch.zeros(3)]
        >>> g = torch.Generator().manual_seed(0)
        >>> lazy = NoiseInOrder(params, lambda p: torch.randn(p.shape, generator=g))
        >>> late = lazy[params[1]]                       # reading the second draws the first before it
        >>> g2 = torch.Generator().manual_seed(0)
        >>> upfront = [torch.randn(p.shape, generator=g2) for p in params]
        >>> torch.equal(late, upfront[1]), torch.equal(lazy[params[0]], upfront[0])
        (True, True)
    """

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


OUTSIDE_STEP = (
    "an optimizer step was taken outside DPSGD's private step: the gradients it would apply are the plain batch "
    "gradient (unclipped, un-noised, not from a Poisson sample) and no privacy would be accounted, so the model "
    "would be reported private while it is not. Train with fit(dp.model, data, cfg, optimizer=dp.optimizer, "
    "step=dp.step(), callbacks=[dp]) (your own loop: call step = dp.step() once, then step(batch, state) as fit "
    "does); dp.detach() ends private training and frees the optimizer for other use")


class DPSGD:
    """Wraps a model and optimizer for DP-SGD and supplies the loop's step and accounting callback.

    ``dp = DPSGD(model, optimizer, n=len(train), batch_size=B, steps=S, config=DPConfig(...))``;
    train ``dp.model`` with ``fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])``.
    ``dp.model._module`` is the trained model; ``dp.model.remove_hooks()`` returns it to plain gradients.
    An Opacus ``GradSampleModule`` (from ``make_private``) is trained as it is, on the Opacus engine.

    The step contract: each call of ``dp.step()``'s step draws a Poisson sample of the training set (rate
    q = batch_size / n), clips each example's gradient to ``max_grad_norm``, adds N(0, (sigma C)^2) to the sum,
    divides by the expected batch size, calls ``optimizer.step()`` and accounts one step. ``optimizer.step()``
    anywhere else raises :class:`PrivacyError`, as does every model or change of it listed in the module's
    docstring. ``per_example_args``: for layers the ghost engine differentiates by ``torch.func`` (no rule of
    their own), which positional arguments carry the batch along dimension 0, by module or module type
    (default: the first argument only; every other argument is shared by the examples).

    ``seed``: the run's seed. The noise is drawn from its stream ``streams.derive(seed, "dp-noise")`` and
    rank r's Poisson sampling from ``streams.derive(seed, "dp-sampling", r)``; None takes
    ``torch.initial_seed()``, the seed given to ``torch.manual_seed`` (``secure_mode`` draws the noise from the
    operating system's CSPRNG instead, and the seed then only decides the sampling).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> from backproplab.train import TrainConfig, fit
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=32, batch_size=8, steps=4,
        ...            config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
        >>> rows = fit(dp.model, Data("toy", x, y, x, y, 2), TrainConfig(batch_size=8, max_steps=4),
        ...            optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
        >>> rows[-1]["epsilon_rdp"] > 0, "train_loss" in rows[-1]
        (True, False)

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (Algorithm 1).
        Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int, steps: int,
                 config: DPConfig, per_example_args: Mapping[nn.Module | type, Sequence[int]] | None = None,
                 seed: int | None = None):
        _io.require("opacus", "dp", "DP-SGD (its accountant and per-example gradients)")
        import torch.distributed as dist
        from opacus import GradSampleModule
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

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
        _check_settings(n, batch_size, steps, config)
        self._bare = model._module if isinstance(model, GradSampleModule) else model
        check_private(self._bare)
        # under torchrun: rank r holds the examples r, r + W, ...; each rank Poisson-samples its own share at
        # the global rate q (so every example still joins a step with probability q, independently), clips
        # per example, and Opacus's DistributedDPOptimizer adds the noise once (rank 0) before averaging
        self.rank, self.world = rank_and_world()
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
            self.model = GhostClipping(model, per_example_args=per_example_args)
            self.optimizer = optimizer  # the noise and the scaling happen in our step, before optimizer.step()
        else:
            if per_example_args:
                raise ValueError("per_example_args applies to the ghost engine's torch.func layers; Opacus's engine "
                                 "takes the batch along dimension 0 of every layer's input")
            self.model = model if isinstance(model, GradSampleModule) else GradSampleModule(model)
        self.model.no_ddp = True  # the loop must not wrap it in DDP: gradients are clipped before they are averaged
        if self.world > 1:
            with torch.no_grad():  # every rank starts from rank 0's weights
                for p in self.model.parameters():
                    dist.broadcast(p, 0)
        # the noise stream (drawn on rank 0 only), shared by both engines: the same seed gives the same noise
        self.seed = torch.initial_seed() if seed is None else seed
        self.noise = GaussianNoise(self.noise_multiplier * config.max_grad_norm, derive_seed(self.seed, "dp-noise"),
                                   secure=config.secure_mode)
        if self.engine == "opacus":  # Opacus's clipping and scaling; its noise drawn from our stream (a CSPRNG in
            # secure mode: Opacus's own secure mode draws from torch's Mersenne Twister)
            single, distributed = _stream_optimizers()
            self.optimizer = (distributed if self.world > 1 else single)(
                optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=config.max_grad_norm,
                expected_batch_size=batch_size / self.world if self.world > 1 else batch_size)
            self.optimizer.noise_stream = self.noise
        # this rank's sampling stream: its own, so that two ranks' inclusions are independent
        self.sampler = derive(self.seed, "dp-sampling", self.rank)
        self.accountants = {"rdp": RDPAccountant(), "prv": PRVAccountant()}
        # what the engine knows: a parameter made trainable, or a layer replaced, after this point is refused
        self._known = {id(p) for p in self._bare.parameters() if p.requires_grad}
        # a model without buffers is checked for new ones in its first step; one with buffers in every step
        self._has_buffers = next(self._bare.buffers(), None) is not None
        self._inside_step = False  # an optimizer step is allowed only inside ours
        self._examples_checked = False
        self._steps_checked = False
        if self.engine == "opacus":  # DPOptimizer keeps a single step hook: the guard, then both accountants
            self.optimizer.attach_step_hook(self._opacus_step_hook)
            self._guard = None
        else:
            self._guard = self.optimizer.register_step_pre_hook(self._refuse_outside_step)

    def _refuse_outside_step(self, *_) -> None:
        if not self._inside_step:
            raise PrivacyError(OUTSIDE_STEP)

    def _opacus_step_hook(self, optim) -> None:
        self._refuse_outside_step()  # raised before the parameters move and before anything is accounted
        self._account()

    def detach(self) -> nn.Module:
        """End private training: the optimizer steps freely again (the ghost engine's) and the model's hooks are
        removed; returns the trained model."""
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        self.model.remove_hooks()
        return self._bare

    def _account(self) -> None:
        for acc in self.accountants.values():
            acc.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, kind: str = "rdp", delta: float | None = None) -> float:
        """epsilon spent so far by accountant ``kind`` at ``delta`` (default: the config's)."""
        acc = self.accountants[kind]
        if not acc.history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # no noise: no privacy (the accountants cannot represent it)
        with warnings.catch_warnings():  # Opacus warns when the optimal RDP order is at the grid's edge
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(self.config.delta if delta is None else delta))

    # -- the loop's callback: report epsilon, checkpoint the accountants
    def on_eval(self, state: TrainState) -> None:
        row = state.history[-1]
        accounted = sum(h[2] for h in self.accountants["rdp"].history)
        if state.step > 0 and accounted < state.step:
            raise PrivacyError(f"the model took {state.step} steps but only {accounted} were private and accounted: "
                               f"fit needs step=dp.step() as well as callbacks=[dp]")
        # the loss and accuracy on the private batches are computed without noise: not released
        for key in [k for k in row if k.startswith("train_")]:
            del row[key]
        row["train_metrics"] = "withheld (computed on private data without noise)"
        row["epsilon_rdp"] = self.epsilon("rdp")
        row["epsilon_prv"] = self.epsilon("prv")
        row["noise_multiplier"] = self.noise_multiplier
        row["secure_mode"] = self.config.secure_mode
        row["noise_source"] = self.noise.source
        row["accountant_for_target"] = self.config.accountant if self.config.target_epsilon is not None else None

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

    # -- the checks that need the model running
    def _check_trainable(self) -> None:
        """Every trainable parameter is one the engine set up for (none unfrozen or added since)."""
        unknown = [name for name, p in self._bare.named_parameters() if p.requires_grad and id(p) not in self._known]
        if unknown:
            raise PrivacyError(f"parameter(s) {', '.join(unknown[:5])} became trainable or were added after DPSGD(...) "
                               "was built: the engine never computes their per-example gradients. Fix: unfreeze or "
                               "replace layers before building DPSGD (or build a new DPSGD)")

    def _buffer_state(self) -> list[tuple[str, int, int]]:
        return [(name, id(b), b._version) for name, b in self._bare.named_buffers()]

    def _check_buffers(self, before: list[tuple[str, int, int]]) -> None:
        after = self._buffer_state()
        if after != before:
            changed = sorted({name for name, *_ in set(after) ^ set(before)})
            raise PrivacyError(f"the private forward changed buffer(s) {', '.join(changed)}: a buffer written from the "
                               "private batch (running statistics, counts) is saved with the model without noise. "
                               "Fix: a layer that does not update buffers in training (e.g. "
                               "track_running_stats=False), or register the value as a constant")

    def _check_examples(self, state: TrainState) -> None:
        """Before the first step: on k training examples, k unlike any other dimension of the input, the engine
        gives k per-example gradient norms, each equal to that example's gradient norm computed alone. A model
        that moves the batch off dimension 0 or mixes examples fails it. Dropout is off during the check (its
        masks differ between the two computations); the random state is restored after."""
        x_all, y_all = state.data.x_train, state.data.y_train
        k = self._examples_to_check(x_all.shape, y_all.shape)
        if k < 2:
            return
        idx = torch.linspace(0, len(x_all) - 1, k).round().long().to(x_all.device)
        self._check_examples_on(x_all[idx], y_all[idx], state.loss_fn)

    @staticmethod
    def _examples_to_check(x_shape: Sequence[int], y_shape: Sequence[int]) -> int:
        """The number k of examples :meth:`_check_examples_on` takes: unlike any other dimension of the data."""
        dims = {*x_shape[1:], *y_shape[1:]}
        return min(next(k for k in range(3, 10**6) if k not in dims), x_shape[0])

    def _check_examples_on(self, x: Tensor, y: Tensor, loss_fn: Callable) -> None:
        k = len(x)
        params = [p for p in self._bare.parameters() if p.requires_grad]
        dropouts = [m for m in self._bare.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for m in dropouts:
                m.eval()
            try:
                before = self._buffer_state()
                together = self._engine_norms(x, y, loss_fn, params)
                self._check_buffers(before)
                self.model.disable_hooks()
                alone = []
                for i in range(k):
                    grads = torch.autograd.grad(loss_fn(self._bare(x[i:i + 1]), y[i:i + 1]), params,
                                                allow_unused=True)
                    alone.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))
            finally:
                self.model.enable_hooks()
                for m in dropouts:
                    m.train()
        if together.shape != (k,):
            raise PrivacyError(f"the engine found {together.numel()} per-example gradients in a batch of {k} examples: "
                               "the model does not keep the examples along dimension 0 (a sequence-first layer such "
                               "as nn.LSTM or nn.Transformer without batch_first=True, a transpose of the batch). "
                               "Fix: keep the batch first")
        alone = torch.stack(alone).to(together.dtype)
        if not torch.allclose(together, alone, rtol=1e-3, atol=1e-6 * (1 + float(alone.max()))):
            raise PrivacyError(f"per-example gradient norms computed in a batch of {k} examples "
                               f"({[round(float(v), 5) for v in together]}) differ from those computed one example at "
                               f"a time ({[round(float(v), 5) for v in alone]}): the forward mixes the examples of a "
                               "batch (the batch off dimension 0, a statistic over the batch, randomness other than "
                               "dropout). Fix: keep the batch first and make each example's output its own")
        self._examples_checked = True

    def _engine_norms(self, x: Tensor, y: Tensor, loss_fn: Callable, params: list[Tensor]) -> Tensor:
        """The per-example gradient norms of ``loss_fn(model(x), y)`` as the engine computes them in a batch."""
        if self.engine == "ghost":
            with self.model.recording():
                loss = loss_fn(self.model(x), y)
            try:
                return self.model.clipped_sum(loss, math.inf, check=False, scale=len(x), batch_size=len(x))[1].detach()
            except ValueError as e:  # a layer saw another number of examples
                raise PrivacyError(str(e)) from None
        self.optimizer.zero_grad(set_to_none=True)
        loss_fn(self.model(x), y).backward()
        samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        norms = torch.stack([s.reshape(len(s), -1).norm(dim=1) for s in samples]).norm(dim=0) \
            if samples and len({len(s) for s in samples}) == 1 else torch.zeros(sum(len(s) for s in samples))
        self.optimizer.zero_grad(set_to_none=True)
        return norms.detach()

    def step(self, loss_terms: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> Callable:
        """The loop's step: Poisson batch, per-example clipped gradients of the mean loss, noise, update.

        ``loss_terms(model, x, y)`` replaces the plain loss (e.g. benign + adversarial); it must be a mean of
        per-example terms so that Opacus's per-example gradients are those of each example's term.
        """

        def poisson(batch, state: TrainState):
            if not isinstance(getattr(state.data, "x_train", None), Tensor):
                raise PrivacyError(f"DPSGD's step draws Poisson samples from an in-memory Data (data.x_train); fit was "
                                   f"given a {type(state.data).__name__}. Fix: pass a backproplab Data, e.g. "
                                   "Data(name, x_train, y_train, x_test, y_test, num_classes)")
            if not self._examples_checked:
                self._check_examples(state)
            idx = self.poisson_batch(state.data.x_train.device)
            yield (state.data.x_train.index_select(0, idx), state.data.y_train.index_select(0, idx)), 1.0

        def private_loss(part, state: TrainState) -> Tensor:
            x, y = part
            if len(x) == 0:  # probability (1 - q)^n: Opacus's convention, a noise-only step
                for p in self.model.parameters() if self.engine == "opacus" else ():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                return torch.zeros((), device=x.device)
            watch = self._has_buffers or not self._steps_checked
            before = self._buffer_state() if watch else None
            loss = loss_terms(self.model, x, y) if loss_terms else state.loss_fn(self.model(x), y)
            if watch:
                self._check_buffers(before)
                self._steps_checked = True
            return loss

        if self.engine == "ghost":
            return self._ghost_step(poisson, private_loss)
        sizes: list[int] = []

        def sampled(batch, state: TrainState):
            for (x, y), weight in poisson(batch, state):
                sizes[:] = [len(x)]
                yield (x, y), weight

        def check_samples(state: TrainState) -> None:
            wrong = {len(p.grad_sample) for p in self.model.parameters()
                     if getattr(p, "grad_sample", None) is not None and len(p.grad_sample) != sizes[0]}
            if wrong:
                raise PrivacyError(f"Opacus found {sorted(wrong)} per-example gradients for a batch of {sizes[0]}: the "
                                   "model does not keep the examples along dimension 0. Fix: keep the batch first")

        inner = loss_step(private_loss, parts=sampled, before_step=check_samples)

        def step(batch, state: TrainState) -> Tensor:
            self._check_optimizer(state)
            self._check_trainable()
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                with self._licensed_step():
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
        """The step on the ghost engine, in :func:`train.gradient_step`'s shape: the gradients are the noise /
        expected batch size (rank 0; Opacus's draws, in its order) plus the clipped sum / expected batch size,
        summed over ranks; then optimizer.step() (licensed) and the accountant."""
        import torch.distributed as dist

        clip = self.config.max_grad_norm

        def clipped_noised_gradients(batch, state: TrainState) -> tuple[Tensor, Iterable[tuple[Tensor, Tensor]]]:
            self._check_optimizer(state)
            self._check_trainable()
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
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
                                                    scale=len(x), batch_size=len(x))[0].values())
            else:
                grads = list(noise().values())
            if self.world > 1:
                with torch.no_grad():
                    for g in grads:
                        dist.all_reduce(g)
            return loss, zip(params, grads)

        return gradient_step(clipped_noised_gradients, stepping=self._licensed_step,
                             after_step=lambda state: self._account())

    @contextmanager
    def _licensed_step(self) -> Iterator[None]:
        """optimizer.step() is allowed inside (the guard raises PrivacyError anywhere else)."""
        self._inside_step = True
        try:
            yield
        finally:
            self._inside_step = False

    def _check_optimizer(self, state: TrainState) -> None:
        if state.optimizer is not self.optimizer:
            raise PrivacyError("fit was given another optimizer than dp.optimizer (or built its own from the "
                               "TrainConfig): its learning rate and schedule would not be the ones that step, and "
                               "on the Opacus engine its step would skip the clipping and the noise. Fix: "
                               "fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])")


NOT_FROM_THE_LOADER = (
    "optimizer.step() must follow exactly one batch drawn from the DataLoader that make_private returned, one "
    "backward of it, and optimizer.zero_grad() before the next backward: only then is each step one Poisson "
    "sample, clipped once per example and accounted. Fix: iterate over the returned loader (not the original), "
    "and per batch call optimizer.zero_grad(); loss.backward(); optimizer.step()")


class _ProbeLoss:
    """A per-example scalar of the model's output that does not need the user's criterion (the examples check
    at make_private): each example's term is sum_j (w_j out_ij + out_ij^2 / 2), w a fixed ramp."""

    def __call__(self, out: Tensor, _target: Tensor) -> Tensor:
        w = torch.linspace(-1, 1, out[0].numel(), dtype=out.dtype, device=out.device).view(out.shape[1:])
        return (out * w + 0.5 * out * out).flatten(1).sum(1).mean()


class _EmptyAwareCollate:
    """The loader's collate function, and for a Poisson sample with no example (probability (1 - q)^n) the
    collation of one example cut to zero rows, so the loop sees tensors of the right shape and dtype."""

    def __init__(self, collate: Callable, dataset):
        self.collate, self.dataset = collate, dataset

    def __call__(self, items: list):
        if items:
            return self.collate(items)
        return _cut_to_zero_rows(self.collate([self.dataset[0]]))


def _cut_to_zero_rows(batch):
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut_to_zero_rows(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _cut_to_zero_rows(v) for k, v in batch.items()}
    return batch


def _first_tensor(batch) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


class PrivacyEngine:
    """DP-SGD in the user's own loop over a DataLoader, in Opacus's three calls; the loop stays as it was.

    ``make_private_with_epsilon`` (or ``make_private`` with a noise multiplier) returns the model, the optimizer
    and a DataLoader to use in place of the originals; ``for x, y in loader: optimizer.zero_grad();
    criterion(model(x), y).backward(); optimizer.step()`` is then a DP-SGD step (Abadi et al. 2016, Algorithm 1):

    - the loader draws each batch by Poisson sampling of its dataset: every example independently with rate
      q = B / n (B the original loader's ``batch_size``, n = ``len(dataset)``), ceil(n / B) batches per epoch;
      its sampler, shuffle and drop_last are replaced, its collate function and workers kept;
    - the backward keeps each example's gradient g_i (Opacus's ``GradSampleModule``);
    - ``optimizer.step()`` sets the gradient to (sum_i g_i min(1, C / (||g_i|| + 1e-6)) + N(0, sigma^2 C^2 I)) / B,
      the noise drawn from the run's stream (the operating system's CSPRNG with ``secure_mode=True``), steps the
      wrapped optimizer, and accounts one step of the subsampled Gaussian mechanism (q, sigma).

    It is :class:`DPSGD` (the mechanism ``fit`` runs with ``step=dp.step()``) with the loop's three calls in
    place of ``fit``: for the same n, B, epochs and target epsilon, sigma and every epsilon are fit's, and with
    the same seed fit (``engine="opacus"``) and this loop train the same weights. The accountant is RDP unless
    ``accountant="prv"`` (Opacus's default is PRV, which gives a slightly smaller sigma for the same target; both
    epsilons are reported by :meth:`get_epsilon`). Refused with :class:`PrivacyError`, never run quietly:
    every layer :func:`check_private` refuses, and a forward that mixes examples (checked at ``make_private`` on
    a few examples of the dataset); in the loop, a step after no batch or several batches of the returned loader,
    after a backward of anything else or two backwards, the wrapped optimizer stepped directly, a parameter made
    trainable later, a buffer written by the forward. Single process: under torchrun train with ``fit``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=16)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> engine = PrivacyEngine()
        >>> model, optimizer, loader = engine.make_private_with_epsilon(
        ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        ...     target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
        >>> for epoch in range(2):
        ...     for x, y in loader:
        ...         optimizer.zero_grad()
        ...         nn.functional.cross_entropy(model(x), y).backward()
        ...         optimizer.step()
        >>> round(engine.get_epsilon(1e-5), 1)
        3.0

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (Algorithm 1).
        Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021.
    """

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False):
        self.accountant, self.secure_mode = accountant, secure_mode
        self.dp: DPSGD | None = None
        self._drawn: list[int] = []  # sizes of the batches the returned loader gave since the last step
        self._permit = False  # the wrapped optimizer may step once, inside a checked private step

    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: torch.utils.data.DataLoader, noise_multiplier: float, max_grad_norm: float,
                     epochs: int = 1, delta: float = 1e-5) -> tuple[nn.Module, torch.optim.Optimizer,
                                                                     torch.utils.data.DataLoader]:
        """The three objects for the user's loop, with noise multiplier sigma given (``epochs`` only checks the
        plan; the accountant counts the steps taken)."""
        return self._make(module, optimizer, data_loader, epochs,
                          DPConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta,
                                   accountant=self.accountant, secure_mode=self.secure_mode, engine="opacus"))

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  data_loader: torch.utils.data.DataLoader, target_epsilon: float,
                                  target_delta: float, epochs: int, max_grad_norm: float
                                  ) -> tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader]:
        """The three objects, with sigma the smallest that keeps epsilon <= ``target_epsilon`` at
        ``target_delta`` after ``epochs * ceil(n / B)`` steps (Opacus's ``get_noise_multiplier``)."""
        return self._make(module, optimizer, data_loader, epochs,
                          DPConfig(noise_multiplier=None, target_epsilon=target_epsilon, delta=target_delta,
                                   max_grad_norm=max_grad_norm, accountant=self.accountant,
                                   secure_mode=self.secure_mode, engine="opacus"))

    def _make(self, module, optimizer, data_loader, epochs, config):
        import torch.distributed as dist
        from torch.utils.data import DataLoader, IterableDataset

        if self.dp is not None:
            raise RuntimeError("this PrivacyEngine already made a model private (its accountant counts that "
                               "model's steps): make a new PrivacyEngine() for another")
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise PrivacyError("PrivacyEngine's loop is single-process; under torchrun train with "
                               "fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp]), "
                               "which samples each rank's share and adds the noise once")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        dataset = data_loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise PrivacyError("Poisson sampling draws the examples of a map-style dataset by index; "
                               f"{type(dataset).__name__} is iterable-only. Fix: a Dataset with __len__ and "
                               "__getitem__ (e.g. TensorDataset)")
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError("the DataLoader has no batch_size (a custom batch_sampler): the expected size B of "
                             "the Poisson batches is its batch_size. Fix: DataLoader(dataset, batch_size=B)")
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs={epochs!r}: the planned number of epochs must be an integer >= 1")
        n = len(dataset)
        steps_per_epoch = math.ceil(n / batch_size) if n else 1
        dp = DPSGD(module, optimizer, n=n, batch_size=batch_size, steps=epochs * steps_per_epoch, config=config)
        # Opacus's hooks on the first layer, whose input needs no gradient, make torch warn at every backward of
        # the user's loop; harmless (the per-example gradients are complete), so silenced, by its exact words
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients")
        self._check_examples(dp, dataset, data_loader.collate_fn)
        dp.optimizer.attach_step_hook(self._step_hook)  # replaces DPSGD's fit-loop guard
        optimizer.register_step_pre_hook(self._refuse_direct_step)
        self._buffers = dp._buffer_state()
        self.dp = dp
        loader = _PoissonDataLoader(dataset, _PoissonBatches(dp, steps_per_epoch), self._drawn.append, data_loader)
        return dp.model, dp.optimizer, loader

    @staticmethod
    def _check_examples(dp: DPSGD, dataset, collate: Callable) -> None:
        """DPSGD's examples check on k examples of the dataset, with a probe loss in place of the criterion."""
        first = collate([dataset[0]])
        if not (isinstance(first, (tuple, list)) and first and isinstance(first[0], Tensor)):
            raise TypeError("make_private needs batches (inputs, targets, ...) whose first element is the model's "
                            f"input tensor; this loader gives {type(first).__name__}")
        target = first[1] if len(first) > 1 and isinstance(first[1], Tensor) else first[0]
        n = len(dataset)
        k = DPSGD._examples_to_check((n, *first[0].shape[1:]), (n, *target.shape[1:]))
        if k < 2:
            return
        batch = collate([dataset[int(i)] for i in torch.linspace(0, n - 1, k).round().long()])
        device = next(iter(dp.model.parameters()), torch.empty(0)).device
        dp._check_examples_on(batch[0].to(device), batch[0][:0], _ProbeLoss())

    def _refuse_direct_step(self, *_) -> None:
        if not self._permit:
            raise PrivacyError("the optimizer given to make_private was stepped directly: its gradients are the "
                               "plain batch gradient (unclipped, un-noised) and nothing is accounted. Fix: call "
                               "step() on the optimizer make_private returned")
        self._permit = False

    def _step_hook(self, optim) -> None:
        """Runs inside the returned optimizer's step after clipping, noise and scaling, before the parameters
        move: the checks of the loop, then one accounted step."""
        dp = self.dp
        drawn = list(self._drawn)
        self._drawn.clear()
        if len(drawn) != 1:
            raise PrivacyError(f"{len(drawn)} batches were drawn from the private loader since the last step. "
                               + NOT_FROM_THE_LOADER)
        if optim.accumulated_iterations != 1:
            raise PrivacyError(f"{optim.accumulated_iterations} backward passes were kept since the last step. "
                               + NOT_FROM_THE_LOADER)
        found = len(optim.grad_samples[0]) if optim.grad_samples else drawn[0]
        if found != drawn[0]:
            raise PrivacyError(f"the backward saw {found} examples but the private loader's batch had {drawn[0]}: "
                               "the loss was of data the loader did not draw. " + NOT_FROM_THE_LOADER)
        dp._check_trainable()
        dp._check_buffers(self._buffers)
        dp._account()
        self._permit = True

    def get_epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """epsilon spent so far at ``delta`` (default: the one given to make_private), by the engine's
        accountant (``"rdp"`` unless set) or the one named."""
        return 0.0 if self.dp is None else self.dp.epsilon(accountant or self.accountant, delta)

    @property
    def noise_multiplier(self) -> float:
        return self.dp.noise_multiplier if self.dp is not None else math.nan

    def state_dict(self) -> dict:
        """The accountants, the Poisson sampler's and the noise's state (none in secure mode): save it with the
        model's and optimizer's to resume with the right epsilon."""
        return self.dp.state_dict() if self.dp is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        self.dp.load_state_dict(sd)


class _PoissonBatches(torch.utils.data.Sampler):
    """ceil(n / B) Poisson samples per epoch, drawn by :meth:`DPSGD.poisson_batch` (the stream fit draws from)."""

    def __init__(self, dp: DPSGD, steps_per_epoch: int):
        self.dp, self.steps_per_epoch = dp, steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            yield self.dp.poisson_batch("cpu").tolist()


class _PoissonDataLoader(torch.utils.data.DataLoader):
    """The user's DataLoader with Poisson batches; it tells the engine the size of each batch it hands out."""

    def __init__(self, dataset, batches: _PoissonBatches, on_batch: Callable[[int], None],
                 like: torch.utils.data.DataLoader):
        super().__init__(dataset, batch_sampler=batches, collate_fn=_EmptyAwareCollate(like.collate_fn, dataset),
                         num_workers=like.num_workers, pin_memory=like.pin_memory, timeout=like.timeout,
                         worker_init_fn=like.worker_init_fn, multiprocessing_context=like.multiprocessing_context,
                         generator=like.generator, persistent_workers=like.persistent_workers,
                         prefetch_factor=like.prefetch_factor if like.num_workers > 0 else None)
        self._on_batch = on_batch

    def __iter__(self):
        for batch in super().__iter__():
            first = _first_tensor(batch)
            self._on_batch(len(first) if first is not None else 0)
            yield batch


def _check_settings(n: int, batch_size: int, steps: int, config: DPConfig) -> None:
    """Refuse settings the accountant or the sampler cannot honour, naming the value (before anything runs)."""
    def bad(what: str, value, need: str) -> ValueError:
        return ValueError(f"DPSGD: {what}={value!r}: {need}")

    if not (isinstance(n, int) and n >= 1):
        raise bad("n", n, "the number of training examples must be an integer >= 1")
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n):
        raise bad("batch_size", batch_size, f"the expected Poisson batch must be an integer from 1 to n={n}; "
                  "lower batch_size or use more training examples")
    if not (isinstance(steps, int) and steps >= 1):
        raise bad("steps", steps, "the planned number of steps must be an integer >= 1")
    c = config
    if not (math.isfinite(c.max_grad_norm) and c.max_grad_norm > 0):
        raise bad("max_grad_norm", c.max_grad_norm, "must be a finite number > 0")
    if not (0 < c.delta < 1):
        raise bad("delta", c.delta, "must lie in (0, 1), typically below 1/n")
    if c.noise_multiplier is not None and not (math.isfinite(c.noise_multiplier) and c.noise_multiplier >= 0):
        raise bad("noise_multiplier", c.noise_multiplier, "must be a finite number >= 0")
    if c.target_epsilon is not None and not (math.isfinite(c.target_epsilon) and c.target_epsilon > 0):
        raise bad("target_epsilon", c.target_epsilon, "must be a finite number > 0")
    if c.accountant not in ("rdp", "prv"):
        raise bad("accountant", c.accountant, "must be 'rdp' or 'prv'")


def planned_steps(cfg: TrainConfig, n: int) -> int:
    """The number of steps a TrainConfig plans on n examples: ``max_steps`` if set, else epochs * ceil(n / B)
    (what the accountant is calibrated for).

    Example:
        >>> planned_steps(TrainConfig(epochs=3, batch_size=64), n=1000), planned_steps(TrainConfig(max_steps=7), n=1000)
        (48, 7)
    """
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n / cfg.batch_size)


_STREAM_OPTIMIZERS: tuple[type, type] | None = None


def _stream_optimizers() -> tuple[type, type]:
    """Opacus's ``DPOptimizer`` and ``DistributedDPOptimizer`` with the noise drawn from a :class:`GaussianNoise`
    (``optimizer.noise_stream``): the same draws as Opacus's non-secure noise from a seeded generator, and the
    operating system's CSPRNG in secure mode. Made on first use: Opacus is the ``dp`` extra, imported late."""
    global _STREAM_OPTIMIZERS
    if _STREAM_OPTIMIZERS is None:
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        class StreamDPOptimizer(DPOptimizer):
            noise_stream: GaussianNoise

            def add_noise(self) -> None:  # Opacus's add_noise, one draw per parameter in order, from our stream
                for p in self.params:
                    _check_processed_flag(p.summed_grad)
                    p.grad = (p.summed_grad + self.noise_stream.draw_one(p.summed_grad)).view_as(p)
                    _mark_as_processed(p.summed_grad)

        class StreamDistributedDPOptimizer(DistributedDPOptimizer, StreamDPOptimizer):
            """Rank 0 adds the stream's noise (DistributedDPOptimizer.add_noise calls StreamDPOptimizer's)."""

        _STREAM_OPTIMIZERS = (StreamDPOptimizer, StreamDistributedDPOptimizer)
    return _STREAM_OPTIMIZERS
