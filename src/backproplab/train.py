"""One ordinary training loop with three plug points: a *step*, *callbacks* and model *transforms*.

``fit(model, data, config)`` runs epochs of shuffled mini-batches (or a step budget), evaluates,
writes ``metrics.jsonl``, checkpoints atomically and resumes exactly. Under ``torchrun`` it runs
data-parallel (DDP; gloo on CPU, NCCL on GPUs): ``config.batch_size`` is the *global* batch, each
rank takes its share in exactly the order of ``torch.utils.data.DistributedSampler`` (see
:func:`epoch_order`), and only rank 0 writes files.

Plug points
  step       ``step(batch, state) -> loss``: one training iteration. The default,
             :func:`standard_step`, is ``zero_grad; loss(model(x), y).backward(); optimizer.step()``,
             accumulating over chunks when a batch is larger than ``config.chunk_size`` (full-batch GD).
  callbacks  objects with any of ``on_train_start, on_epoch_start, on_step_end, on_epoch_end,
             on_eval, on_train_end`` taking the :class:`TrainState`; a callback with ``state_dict`` /
             ``load_state_dict`` is checkpointed with the run. ``on_train_start`` also runs on resume.
  transforms functions ``nn.Module -> nn.Module`` registered in :data:`TRANSFORMS`, applied before training.

Determinism: the shuffling of epoch ``e`` is a function of ``(seed, e)`` alone (its own stream,
``streams.derive_seed(seed, "epoch-order") + e``: no two seeds share an epoch's order), and the checkpoint holds
the model, optimizer, RNG states, callback states, loss accumulators and the position inside the
epoch, so a resumed run ends with exactly the metrics of an uninterrupted one (timing fields aside).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import _io
from .data import Data
from .fields import option
from .dist import init_distributed, leave_distributed, rank_and_world, shutdown_distributed  # noqa: F401 (API)
from .streams import derive_seed

TIMING_KEYS = ("examples_per_s", "step_time", "wall_time")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or an evaluated loss) became NaN or infinite: the run diverged.

    ``step`` and ``epoch`` say where; ``last`` is the last metrics row whose values were all finite (or None).

    Example:
        Gradient descent on a least-squares fit diverges once the step passes 2 / (the loss's largest curvature):

        >>> import math
        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
        >>> data = Data("toy", x, x.sum(1, keepdim=True), x[:8], x[:8].sum(1, keepdim=True), 0)
        >>> try:
        ...     fit(nn.Linear(3, 1), data, TrainConfig(lr=10.0, batch_size=8, epochs=20, loss="mse"), progress=False)
        ... except NonFiniteLossError as diverged:
        ...     print(diverged.step > 0, math.isfinite(diverged.last["train_loss"]))
        True True
        >>> rows = fit(nn.Linear(3, 1), data, TrainConfig(lr=0.05, batch_size=8, epochs=20, loss="mse"), progress=False)
        >>> rows[-1]["train_loss"] < 1e-3                                      # a step below the limit converges
        True
    """

    def __init__(self, message: str, step: int = 0, epoch: int = 0, last: dict | None = None):
        super().__init__(message)
        self.step, self.epoch, self.last = step, epoch, last


def check_config(cfg: TrainConfig) -> None:
    """Reject values the loop cannot run with, before anything trains (ValueError naming the field).

    Example:
        >>> check_config(TrainConfig(lr=0.1))
        >>> check_config(TrainConfig(lr=float("nan")))
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.lr=nan: must be a finite number >= 0
    """
    for f in dataclasses.fields(cfg):  # each number within the bound its field declares (option's ge)
        value, ge = getattr(cfg, f.name), f.metadata.get("ge")
        if ge is None or isinstance(f.default, bool) or not isinstance(f.default, (int, float)):
            continue
        if isinstance(f.default, float):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= ge):
                raise ValueError(f"TrainConfig.{f.name}={value!r}: must be a finite number >= {ge:g}")
        elif value < ge:
            raise ValueError(f"TrainConfig.{f.name}={value!r}: must be >= {ge:g}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; available: {', '.join(LOSSES)}")


@dataclass
class TrainConfig:
    """What the loop needs; experiments embed these fields in their own config dataclasses. Each field carries
    its meaning and its lower bound (:func:`~backproplab.fields.option`), which :func:`check_config` enforces.

    Example:
        >>> cfg = TrainConfig(optimizer="adam", lr=1e-3, epochs=2)
        >>> cfg.batch_size, cfg.seed
        (64, 0)
    """

    optimizer: str = option("sgd", "sgd | adam | gd (full-batch SGD) | anything in OPTIMIZERS")
    lr: float = option(0.05, "learning rate")
    momentum: float = option(0.0, "SGD momentum")
    weight_decay: float = option(0.0, "L2 weight decay (the optimizer's)")
    batch_size: int = option(64, "global batch; <= 0 means the whole training set", ge=None)
    epochs: int = option(10, "passes over the training set")
    max_steps: int = option(0, "> 0: stop after this many steps (a step budget)")
    eval_every: int = option(0, "0: evaluate at each epoch's end; > 0: every N steps")
    eval_train: bool = option(False, "also evaluate loss/accuracy on the whole training set")
    checkpoint_every: int = option(0, "0: no periodic checkpoints")
    loss: str = option("cross_entropy", "cross_entropy | mse")
    chunk_size: int = option(2048, "larger batches are accumulated in chunks of this size", ge=1)
    eval_batch_size: int = option(2048, "examples per evaluation batch", ge=1)
    finite_check_every: int = option(1, "check the loss for NaN/inf every N steps (each is a host sync on GPUs)")
    seed: int = option(0, "the run's seed: the global generators, and every other stream derived from it",
                       ge=None)
    device: str = option("model", "model (wherever its parameters are) | cpu | cuda | cuda:N | auto")


class Batch(NamedTuple):
    """Batch.

    One training batch as a step receives it: inputs, targets and the examples' positions in the training set.

    Example:
        Over an epoch the positions are exactly :func:`epoch_order`'s permutation, batch after batch:

        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> data = Data("toy", torch.randn(10, 2), torch.zeros(10, dtype=torch.long), torch.randn(2, 2),
        ...             torch.zeros(2, dtype=torch.long), 2)
        >>> seen = []
        >>> def recording_step(batch, state):
        ...     seen.append(batch.index)
        ...     assert torch.equal(batch.x, data.x_train[batch.index])
        ...     return standard_step(batch, state)
        >>> _ = fit(nn.Linear(2, 2), data, TrainConfig(batch_size=4, epochs=1, seed=3), step=recording_step,
        ...         progress=False)
        >>> torch.equal(torch.cat(seen), epoch_order(10, epoch=0, seed=3)), [len(i) for i in seen]
        (True, [4, 4, 2])
    """
    x: Tensor
    y: Tensor
    index: Tensor  # positions of the examples in the training set (for per-example weighting)


@dataclass
class TrainState:
    """TrainState.

    What a step and the callbacks see of the run: the model, the optimizer, the counters and the history so far; a
    callback that sets ``stop`` ends training after the current step.

    Example:
        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> data = Data("toy", torch.randn(12, 2), torch.zeros(12, dtype=torch.long), torch.randn(2, 2),
        ...             torch.zeros(2, dtype=torch.long), 2)
        >>> class StopAtStep5:
        ...     def on_step_end(self, state):
        ...         state.stop = state.step == 5
        >>> rows = fit(nn.Linear(2, 2), data, TrainConfig(batch_size=4, epochs=10), callbacks=[StopAtStep5()],
        ...            progress=False)
        >>> rows[-1]["step"], round(rows[-1]["epoch"], 2)             # 3 steps per epoch: 5 steps are 1.67 epochs
        (5, 1.67)
    """
    model: nn.Module  # the bare model
    net: nn.Module  # what the step calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[..., Tensor]
    config: TrainConfig
    data: Data | Iterable  # in-memory Data, or the iterable of batches fit was given
    device: torch.device
    rank: int = 0
    world: int = 1
    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # a callback may set this to end training early
    extra: dict[str, Any] = field(default_factory=dict)


class Step(Protocol):
    """Step.

    The step plug point: ``step(batch, state) -> loss``, one training iteration, returning the detached loss.

    Example:
        A step written out by hand trains exactly as the default :func:`standard_step`:

        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> data = Data("toy", torch.randn(16, 3), torch.randint(0, 2, (16,)), torch.randn(4, 3),
        ...             torch.randint(0, 2, (4,)), 2)
        >>> def by_hand(batch, state):
        ...     state.optimizer.zero_grad()
        ...     loss = F.cross_entropy(state.net(batch.x), batch.y)
        ...     loss.backward()
        ...     state.optimizer.step()
        ...     return loss.detach()
        >>> weights = []
        >>> for step in (by_hand, None):                              # None: the loop's standard_step
        ...     model = nn.Linear(3, 2)
        ...     with torch.no_grad():
        ...         _ = model.weight.fill_(0.1), model.bias.zero_()
        ...     _ = fit(model, data, TrainConfig(batch_size=4, epochs=2), step=step, progress=False)
        ...     weights.append(model.weight.detach().clone())
        >>> torch.equal(*weights)
        True
    """
    def __call__(self, batch: Batch, state: TrainState) -> Tensor: ...


# ---------------------------------------------------------------- losses, optimizers, transforms


def cross_entropy(outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """The mean (or ``reduction``) over examples of -log softmax(outputs)[target].

    Example:
        >>> import torch
        >>> out, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> by_hand = -out.log_softmax(1)[torch.arange(2), y].mean()
        >>> torch.allclose(cross_entropy(out, y), by_hand)
        True
    """
    return F.cross_entropy(outputs, targets, reduction=reduction)


def mse(outputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error averaged over output dimensions, then reduced over examples. Outputs and targets must have
    the same shape: (B, 1) against (B,) would broadcast to (B, B), every output against every target.

    Example:
        >>> import torch
        >>> float(mse(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)))      # (1 + 9) / 2
        5.0
        >>> mse(torch.zeros(4, 1), torch.zeros(4))
        Traceback (most recent call last):
        ...
        ValueError: mse: outputs of shape (4, 1) and targets of shape (4,) differ ...
    """
    if outputs.shape != targets.shape:
        raise ValueError(f"mse: outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
                         "differ (broadcasting would compare every output with every target). Fix: give the targets "
                         "the outputs' shape, e.g. y.unsqueeze(1) for one output")
    per_example = (outputs - targets).pow(2).flatten(1).mean(1)
    return per_example if reduction == "none" else per_example.sum() if reduction == "sum" else per_example.mean()


LOSSES: dict[str, Callable[..., Tensor]] = {"cross_entropy": cross_entropy, "mse": mse}


def _sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# The registries, explicit (nothing registers itself by being imported); users may add entries. The methods'
# entries (CurveBall, linear backprop) are filled by backproplab.plugins, so this module never imports a method.
# name -> factory(model, config); optimizers whose step is not `optimizer.step()` name their step too
OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adam": _adam, "gd": _sgd}
OPTIMIZER_STEPS: dict[str, Step] = {}
FULL_BATCH_OPTIMIZERS = {"gd"}

TRANSFORMS: dict[str, Callable[[nn.Module], nn.Module]] = {}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, built by its entry in :data:`OPTIMIZERS`.

    Example:
        >>> from torch import nn
        >>> opt = make_optimizer(nn.Linear(2, 1), TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9))
        >>> type(opt).__name__, opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        ('SGD', 0.1, 0.9)
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[cfg.optimizer](model, cfg)


class EpochLR:
    """Callback: a ``torch.optim.lr_scheduler`` scheduler, built by ``make(optimizer)`` when training starts and
    stepped once per epoch at each epoch start, checkpointed with the run (resumed mid-epoch, the learning rate
    is the one the epoch ran with).

    Example:
        >>> from torch.optim.lr_scheduler import StepLR
        >>> decay = EpochLR(lambda opt: StepLR(opt, step_size=2, gamma=0.5))   # fit(..., callbacks=[decay])
    """

    def __init__(self, make: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]):
        self.make = make
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._saved: dict | None = None  # a checkpoint's state, loaded before the scheduler exists

    def on_train_start(self, state: TrainState) -> None:
        if self.scheduler is None or self.scheduler.optimizer is not state.optimizer:
            resumed = [g["lr"] for g in state.optimizer.param_groups]
            self.scheduler = self.make(state.optimizer)  # sets the groups' lr to the schedule's first value
            if self._saved is not None:
                self.scheduler.load_state_dict(self._saved)
                for g, lr in zip(state.optimizer.param_groups, resumed):
                    g["lr"] = lr
                self._saved = None

    def on_epoch_start(self, state: TrainState) -> None:
        while self.scheduler.last_epoch < state.epoch:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else dict(self._saved or {})

    def load_state_dict(self, sd: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd)
        else:
            self._saved = dict(sd)


class StepDecay(EpochLR):
    """Callback: lr = base_lr * factor^(epoch // every), by torch's ``StepLR``.

    Example:
        >>> import torch
        >>> from backproplab import build_model, load_dataset
        >>> data = load_dataset("digits", n_train=100)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(8,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.4)
        >>> _ = fit(model, data, TrainConfig(epochs=3, batch_size=50), optimizer=opt,
        ...         callbacks=[StepDecay(every=1, factor=0.5)])
        >>> opt.param_groups[0]["lr"]            # halved before the second and the third epoch: 0.4 * 0.5^2
        0.1
    """

    def __init__(self, every: int, factor: float = 0.2):
        self.every, self.factor = every, factor
        super().__init__(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=factor))


def apply_transforms(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Each name is looked up in :data:`TRANSFORMS` and applied in order; an unknown name raises, listing the
    registered ones.

    Example:
        >>> import backproplab, torch
        >>> from torch import nn
        >>> model = apply_transforms(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), ["linear_backprop"])
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> model(x).sum().backward()                    # tanh's derivative taken as 1: the gradient is W's column sums
        >>> torch.allclose(x.grad, model[0].weight.sum(0).expand(3, 2))
        True
    """
    for name in names:
        if name not in TRANSFORMS:
            raise ValueError(f"unknown model transform {name!r}; available: {', '.join(sorted(TRANSFORMS)) or 'none'}")
        model = TRANSFORMS[name](model)
    return model


# ---------------------------------------------------------------- seeding and distribution


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed`` (what builds the model).

    Example:
        >>> import torch
        >>> seed_everything(3); a = torch.rand(2)
        >>> seed_everything(3); torch.equal(a, torch.rand(2))
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with every generator (Python, NumPy, torch) seeded by ``seed``, then give the caller its
    own states back: work cached across runs (a pretrained model) leaves the run's random stream alone.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0); before = torch.get_rng_state()
        >>> with isolated_rng(5):
        ...     inside = torch.rand(1)
        >>> torch.equal(torch.get_rng_state(), before)          # the caller's stream is where it was
        True
        >>> seed_everything(5); torch.equal(torch.rand(1), inside)
        True
    """
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        seed_everything(seed)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; a CUDA device asked for without CUDA raises, naming the fix.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        if device == "cuda" and dist.is_initialized():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(device)


# ---------------------------------------------------------------- the step and evaluation


def loss_step(loss_of: Callable[[Any, TrainState], Tensor | tuple[Tensor, Tensor]], *,
              parts: Callable[[Batch, TrainState], Iterable[tuple[Any, float]]] | None = None,
              before_step: Callable[[TrainState], None] | None = None,
              after_step: Callable[[TrainState], None] | None = None) -> Step:
    """The one training-step body every method's step is made of::

        optimizer.zero_grad()
        for part, weight in parts(batch, state):          # default: the batch itself, weight 1
            (weight * loss_of(part, state)).backward()    # DDP syncs gradients on the last part only
        before_step(state)                                # e.g. GLD's noise, StoBatch's all-reduce
        optimizer.step()
        after_step(state)                                 # e.g. StoBatch's projection of W1

    ``loss_of`` returns the loss to differentiate, or ``(loss, reported)`` when what the curves show
    differs (a penalty left out, say). A loss without a graph (an empty Poisson batch) is not
    differentiated. Returns the sum of the parts' detached reported losses.

    Example:
        >>> import torch
        >>> from backproplab import build_model, load_dataset
        >>> data = load_dataset("digits", n_train=100)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(16,))
        >>> l1 = loss_step(lambda batch, state: state.loss_fn(state.net(batch.x), batch.y)
        ...                + 1e-4 * sum(p.abs().sum() for p in state.model.parameters()))
        >>> rows = fit(model, data, TrainConfig(lr=0.05, epochs=1, batch_size=50), step=l1)
        >>> rows[-1]["step"]
        2
    """

    def step(batch: Batch, state: TrainState) -> Tensor:
        opt, net = state.optimizer, state.net
        opt.zero_grad(set_to_none=True)
        pieces = list(parts(batch, state)) if parts is not None else [(batch, 1.0)]
        total = torch.zeros((), device=batch.x.device)
        for i, (part, weight) in enumerate(pieces):
            last = i == len(pieces) - 1
            with nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                out = loss_of(part, state)
                loss, reported = out if isinstance(out, tuple) else (out, out)
                if weight != 1.0:
                    loss, reported = loss * weight, reported * weight
                if loss.requires_grad:
                    loss.backward()
            total += reported.detach()
        if before_step is not None:
            before_step(state)
        opt.step()
        if after_step is not None:
            after_step(state)
        return total

    return step


def gradient_step(gradients_of: Callable[[Batch, TrainState], tuple[Tensor, Iterable[tuple[Tensor, Tensor]]]], *,
                  before_step: Callable[[TrainState], None] | None = None,
                  after_step: Callable[[TrainState], None] | None = None,
                  stepping: Callable[[], AbstractContextManager] | None = None) -> Step:
    """:func:`loss_step`'s one variant, for a step that owns its backward (DP-SGD's clipped and noised sum)::

        p.grad = None for every parameter of the optimizer   # freed before this step's activations exist
        loss, grads = gradients_of(batch, state)             # [(parameter, its gradient)]: the step's backward
        p.grad = g for each (p, g)
        before_step(state)
        with stepping():                                     # e.g. DP-SGD's licence to call optimizer.step()
            optimizer.step()
        after_step(state)                                    # e.g. DP-SGD's accountant

    Returns the detached ``loss``. A parameter ``gradients_of`` leaves out keeps ``grad = None``, so the
    optimizer does not move it, as after a backward that does not reach it.

    Example:
        >>> import torch
        >>> from backproplab import build_model, load_dataset
        >>> data = load_dataset("digits", n_train=100)
        >>> def autograd(batch, state):                      # what loss_step's backward would give
        ...     loss = state.loss_fn(state.net(batch.x), batch.y)
        ...     params = [p for p in state.model.parameters() if p.requires_grad]
        ...     return loss, zip(params, torch.autograd.grad(loss, params))
        >>> finals = []
        >>> for step in (standard_step, gradient_step(autograd)):
        ...     _ = torch.manual_seed(0)
        ...     model = build_model("mlp", data.input_shape, 10, widths=(16,))
        ...     _ = fit(model, data, TrainConfig(lr=0.05, epochs=1, batch_size=50), step=step)
        ...     finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        >>> torch.equal(*finals)
        True
    """

    def step(batch: Batch, state: TrainState) -> Tensor:
        opt = state.optimizer
        for group in opt.param_groups:  # zero_grad(set_to_none=True) without its per-step overhead
            for p in group["params"]:
                p.grad = None
        loss, grads = gradients_of(batch, state)
        for p, g in grads:
            p.grad = g
        if before_step is not None:
            before_step(state)
        with stepping() if stepping is not None else nullcontext():
            opt.step()
        if after_step is not None:
            after_step(state)
        return loss.detach()

    return step


def batch_chunks(batch: Batch, state: TrainState) -> Iterator[tuple[Batch, float]]:
    """``loss_step`` parts: a batch larger than ``config.chunk_size`` in chunks weighted by their share,
    so the gradients add up to the whole batch's mean-loss gradient (BatchNorm sees chunk statistics).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> batch = Batch(torch.arange(10.0).unsqueeze(1), torch.zeros(10), torch.arange(10))
        >>> state = SimpleNamespace(config=TrainConfig(chunk_size=4))
        >>> [(len(part.x), weight) for part, weight in batch_chunks(batch, state)]     # weights: each chunk's share
        [(4, 0.4), (4, 0.4), (2, 0.2)]
    """
    n, cs = len(batch.x), state.config.chunk_size
    if n <= cs:
        yield batch, 1.0
        return
    for s in range(0, n, cs):
        part = Batch(batch.x[s:s + cs], batch.y[s:s + cs], batch.index[s:s + cs])
        yield part, len(part.x) / n


def _model_loss(batch: Batch, state: TrainState) -> Tensor:
    return state.loss_fn(state.net(batch.x), batch.y)


standard_step: Step = loss_step(_model_loss, parts=batch_chunks)
standard_step.__doc__ = """``zero_grad; mean loss over the batch .backward(); optimizer.step()``, in chunks of
``config.chunk_size`` for large batches (full-batch GD), DDP's all-reduce only on the last chunk.

Example:
    A batch larger than ``chunk_size`` is accumulated in chunks, each weighted by its share: the step equals the
    whole batch's (full-batch GD on 10 examples in chunks of 4, 4 and 2):

    >>> from torch import nn
    >>> from backproplab.data import Data
    >>> data = Data("toy", torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)),
    ...             torch.randn(2, 3, dtype=torch.float64), torch.randint(0, 2, (2,)), 2)
    >>> weights = []
    >>> for chunk in (4, 2048):
    ...     model = nn.Linear(3, 2).double()
    ...     with torch.no_grad():
    ...         _ = model.weight.fill_(0.1), model.bias.zero_()
    ...     _ = fit(model, data, TrainConfig(optimizer="gd", lr=0.5, max_steps=3, chunk_size=chunk), progress=False)
    ...     weights.append(model.weight.detach().clone())
    >>> torch.allclose(*weights, rtol=1e-12, atol=0)
    True
"""


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[..., Tensor],
             batch_size: int = 2048, classification: bool = True) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` in eval mode over ``(x, y)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
        >>> res = evaluate(model, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), cross_entropy)
        >>> res["acc"]
        0.5
    """
    return evaluate_batches(model, ((x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(x), batch_size)),
                            loss_fn, classification)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable, loss_fn: Callable[..., Tensor],
                     classification: bool | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Mean loss (and accuracy) of ``model`` in eval mode over an iterable of ``(x, y)`` batches.

    ``classification=None``: accuracy is reported when the targets are integers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model, x, y = nn.Linear(2, 3), torch.randn(6, 2), torch.randint(0, 3, (6,))
        >>> res = evaluate_batches(model, [(x[:4], y[:4]), (x[4:], y[4:])], cross_entropy)
        >>> abs(res["loss"] - cross_entropy(model(x), y).item()) < 1e-6          # the mean over all 6 examples
        True
        >>> abs(res["acc"] - float((model(x).argmax(1) == y).float().mean())) < 1e-6
        True
    """
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for item in batches:
            x, y = _pair(item, device)
            out = model(x)
            total += float(loss_fn(out, y, reduction="sum"))
            if classification is None:
                classification = not y.is_floating_point()
            if classification:
                correct += int((out.argmax(1) == y).sum())
            count += len(x)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation data yielded no examples")
    metrics = {"loss": total / count}
    if classification:
        metrics["acc"] = correct / count
    return metrics


def _pair(item: Any, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from one item of a user's iterable: a tuple/list ``(x, y, ...)`` or a :class:`Batch`."""
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not all(torch.is_tensor(t) for t in item[:2]):
        raise TypeError(f"each batch must be a pair of tensors (x, y), as a DataLoader over a TensorDataset "
                        f"yields; got {type(item).__name__}")
    x, y = item[0], item[1]
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def fit_device(device: str, model: nn.Module) -> torch.device:
    """Where ``fit`` trains: ``"model"`` is the device of the model's parameters, anything else
    :func:`resolve_device`'s answer.

    Example:
        >>> from torch import nn
        >>> fit_device("model", nn.Linear(1, 1)), fit_device("cpu", nn.Linear(1, 1))
        (device(type='cpu'), device(type='cpu'))
    """
    return _model_device(model) if device == "model" else resolve_device(device)


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return first.device if first is not None else torch.device("cpu")


# ---------------------------------------------------------------- the loop


def fit(model: nn.Module, data: Data | Iterable, config: TrainConfig | None = None, *, step: Step | None = None,
        callbacks: Sequence[Any] = (), optimizer: torch.optim.Optimizer | None = None,
        out_dir: str | os.PathLike | None = None, resume: bool = True, write_final: bool = True,
        eval_data: Iterable | None = None, progress: bool | None = None) -> list[dict]:
    """Train ``model`` on ``data``; returns the metric records (also appended to ``out_dir/metrics.jsonl``).

    ``data``: an in-memory :class:`~backproplab.data.Data` (shuffled here, per epoch, from the seed), or
    any iterable of ``(x, y)`` batches such as a ``torch.utils.data.DataLoader`` (iterated once per epoch,
    in its own order; its sampler's ``set_epoch`` is called when it has one; ``config.batch_size`` is
    then the loader's business; an iterable without ``len()``, which may never end, needs
    ``config.max_steps``). ``eval_data``: batches to evaluate on (default: ``data``'s test split;
    an iterable ``data`` without ``eval_data`` reports the training loss only).

    The model must already be initialised (seed before building it); it stays on its device unless
    ``config.device`` names another. ``step`` defaults to the one the optimizer registered in
    ``OPTIMIZER_STEPS`` (CurveBall's), else :func:`standard_step`. With ``out_dir``, a checkpoint there is
    resumed when ``resume`` is true (mid-epoch for an iterable: the batches already seen are skipped, which
    is exact when the iterable repeats its order); the finished run leaves ``model.pt`` and (with
    ``write_final``) ``final.json``. ``progress``: print one line per evaluation to stderr (default: when
    stderr is a terminal).

    Example:
        >>> from backproplab import build_model, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=300)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(32,))
        >>> rows = fit(model, data, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, epochs=3, batch_size=50))
        >>> rows[-1]["epoch"], rows[-1]["test_acc"] > 0.8
        (3.0, True)
    """
    cfg = config if config is not None else TrainConfig()
    _check_fit_arguments(cfg, data, callbacks)
    state = _training_state(model, data, cfg, optimizer)
    step = step or OPTIMIZER_STEPS.get(cfg.optimizer, standard_step)
    plan = _EpochPlan.of(state)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    meter = _Meter(state, eval_data, out, progress)
    position = _resume(ckpt_path, state, callbacks, meter) if ckpt_path is not None and resume else 0
    if state.rank == 0 and out is not None:  # the rows up to the checkpoint (none when starting); appended from here
        _io.write_jsonl(out / "metrics.jsonl", state.history)
    _call(callbacks, "on_train_start", state)
    meter.start()

    model.train()
    while not _finished(state):
        if position == 0:
            _call(callbacks, "on_epoch_start", state)
        epoch_ended = True
        for batch in plan.batches(state, position):
            loss = step(batch, state)
            state.step += 1
            position += 1
            meter.add(loss, len(batch.x))
            if cfg.finite_check_every and state.step % cfg.finite_check_every == 0 and not math.isfinite(loss):
                raise NonFiniteLossError(_nan_message(state), state.step, state.epoch,
                                         state.history[-1] if state.history else None)
            _call(callbacks, "on_step_end", state)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                meter.record(position, callbacks)
            if ckpt_path is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt_path, state, callbacks, position, meter.loss_sum, meter.loss_count)
            if _finished(state):
                epoch_ended = bool(state.steps_per_epoch) and position >= state.steps_per_epoch
                break
        if epoch_ended:
            if position == 0:
                raise ValueError(f"fit: data yielded no batches in epoch {state.epoch}; nothing to train on")
            if not cfg.eval_every:
                meter.record(position, callbacks)
            _call(callbacks, "on_epoch_end", state)
            state.epoch += 1
            position = 0
    if not state.history or state.history[-1]["step"] != state.step:
        meter.record(position, callbacks)
    _call(callbacks, "on_train_end", state)
    if state.rank == 0 and out is not None:
        _io.torch_save(out / "model.pt", model.state_dict())
        if write_final:
            _io.write_json(out / "final.json", state.history[-1])
        if ckpt_path.exists():
            ckpt_path.unlink()
    return state.history


# ---------------------------------------------------------------- fit's parts, in the order fit uses them

_EVENTS = ("on_train_start", "on_epoch_start", "on_step_end", "on_eval", "on_epoch_end", "on_train_end")


def _check_fit_arguments(cfg: TrainConfig, data: Any, callbacks: Sequence[Any]) -> None:
    """Bad arguments fail here, before anything moves or trains."""
    check_config(cfg)
    for cb in callbacks:  # a callback has an event method, or state to checkpoint with the run (GLD's)
        if not any(callable(getattr(cb, e, None)) for e in (*_EVENTS, "state_dict")):
            raise TypeError(f"callbacks: {cb!r} is not a callback (it has none of {', '.join(_EVENTS)}, state_dict)")
    in_memory = isinstance(data, Data)
    if in_memory and len(data.x_train) == 0:
        raise ValueError(f"dataset {data.name!r} has no training examples; nothing to train on")
    if not in_memory and not isinstance(data, Iterable):
        raise TypeError(f"fit: data must be a backproplab Data or an iterable of (x, y) batches (a DataLoader), "
                        f"got {type(data).__name__}")
    if not in_memory and iter(data) is data:
        raise TypeError("fit: data is an iterator, which is used up after one epoch; pass a re-iterable object "
                        "such as a DataLoader or a list of batches")


def _training_state(model: nn.Module, data: Data | Iterable, cfg: TrainConfig,
                    optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Model and in-memory data on the training device, DDP's wrapper under torchrun, the optimizer."""
    rank, world = rank_and_world()
    device = fit_device(cfg.device, model)
    if isinstance(data, Data):
        data = data.to(device)
    model.to(device)
    net = model
    if world > 1 and not getattr(model, "no_ddp", False):  # DP-SGD averages its clipped gradients itself
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = optimizer or make_optimizer(model, cfg)
    return TrainState(model, net, optimizer, LOSSES[cfg.loss], cfg, data, device, rank, world)


@dataclass
class _EpochPlan:
    """How an epoch is cut into batches; sets ``state.steps_per_epoch`` and ``state.total_steps``.

    In memory: n examples, a seeded shuffle per epoch (none for full-batch optimizers), each rank taking
    ``local_batch`` of every global batch. An iterable: its own batches, in its own order."""

    in_memory: bool
    n: int = 0
    local_batch: int = 0
    shuffle: bool = True

    @classmethod
    def of(cls, state: TrainState) -> _EpochPlan:
        cfg, data, world = state.config, state.data, state.world
        if isinstance(data, Data):
            n = len(data.x_train)
            full_batch = cfg.optimizer in FULL_BATCH_OPTIMIZERS or cfg.batch_size <= 0 or cfg.batch_size >= n
            global_batch = n if full_batch else cfg.batch_size
            if global_batch % world:
                raise ValueError(f"batch_size={global_batch} must be divisible by the {world} processes")
            plan = cls(True, n, global_batch // world, shuffle=not full_batch)
            state.steps_per_epoch = math.ceil(math.ceil(n / world) / plan.local_batch)
        else:
            plan = cls(False)
            try:
                state.steps_per_epoch = len(data)  # type: ignore[arg-type]
            except TypeError:  # an iterable-style dataset: the length shows only when an epoch ends
                if cfg.max_steps <= 0:  # an endless stream would train (and hold the run) forever
                    raise ValueError(
                        f"fit: data ({type(data).__name__}) has no length, so fit cannot know where an epoch ends and "
                        "an endless stream would never stop; set max_steps (a step budget, e.g. epochs x batches per "
                        "epoch; a finite stream is then repeated until it is spent), or give the dataset a __len__"
                    ) from None
                state.steps_per_epoch = 0
        # 0 when neither a step budget nor the epoch length is known: then epochs end training
        state.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * state.steps_per_epoch
        return plan

    def batches(self, state: TrainState, start: int) -> Iterator[Batch]:
        """This epoch's batches from position ``start`` on."""
        data, device = state.data, state.device
        if self.in_memory:
            order = epoch_order(self.n, state.epoch, state.config.seed, state.rank, state.world,
                                shuffle=self.shuffle).to(device)
            for p in range(start, state.steps_per_epoch):
                idx = order[p * self.local_batch:(p + 1) * self.local_batch]
                yield Batch(data.x_train[idx], data.y_train[idx], idx)
            return
        sampler = getattr(data, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(state.epoch)
        offset = 0
        for p, item in enumerate(data):
            x, y = _pair(item, device)
            if p >= start:
                yield Batch(x, y, torch.arange(offset, offset + len(x), device=device))
            offset += len(x)


def _finished(state: TrainState) -> bool:
    return state.stop or (state.step >= state.total_steps if state.total_steps else
                          state.epoch >= state.config.epochs)


def _resume(ckpt_path: Path, state: TrainState, callbacks: Sequence[Any], meter: _Meter) -> int:
    """Load ``ckpt_path`` when there is one; returns the next batch's position in its epoch (0 when starting)."""
    if not ckpt_path.exists():
        return 0
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt: keep a copy, and start this run (only) over
        corrupt = ckpt_path.with_name(ckpt_path.name + ".corrupt")
        os.replace(ckpt_path, corrupt)
        warnings.warn(f"{ckpt_path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is kept as "
                      f"{corrupt.name} and this run starts over from its first step", stacklevel=3)
        return 0
    try:
        position, meter.loss_sum, meter.loss_count = _restore(ckpt, state, callbacks, state.device)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{ckpt_path} does not fit this model or optimizer ({str(e)[:300]}); it was written "
                         "by another configuration: move it away, or start over with --no-resume") from None
    return position


class _Meter:
    """The training loss, examples and time between two metric rows, and :meth:`record`, which writes a row:
    the mean training loss since the last row, the evaluation, throughput and wall time."""

    def __init__(self, state: TrainState, eval_data: Iterable | None, out: Path | None, progress: bool | None):
        self.state, self.eval_data, self.out = state, eval_data, out
        self.progress = state.rank == 0 and sys.stderr.isatty() if progress is None else progress
        self.in_memory = isinstance(state.data, Data)
        self.classification = state.data.num_classes > 0 if self.in_memory else None
        self.loss_sum, self.loss_count = torch.zeros((), device=state.device), 0
        self.examples, self.steps = 0, 0

    def start(self) -> None:
        """The clock starts (after resuming: wall time goes on from the checkpoint's last row)."""
        self.t_start = self.t_interval = time.perf_counter()
        self.wall_offset = self.state.history[-1]["wall_time"] if self.state.history else 0.0

    def add(self, loss: Tensor, examples: int) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        self.examples += examples
        self.steps += 1

    def record(self, position: int, callbacks: Sequence[Any]) -> None:
        state, cfg, device = self.state, self.state.config, self.state.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self.t_interval
        train_loss = self.loss_sum.clone()
        if state.world > 1:
            dist.all_reduce(train_loss)
            train_loss /= state.world
        fraction = position / state.steps_per_epoch if state.steps_per_epoch else 0.0
        row = {"step": state.step, "epoch": state.epoch + fraction}
        if self.loss_count:  # no step since the last row (fit with epochs=0): no training loss to report
            row["train_loss"] = float(train_loss) / self.loss_count
        row.update({f"test_{k}": v for k, v in self._evaluate_test().items()})
        if cfg.eval_train:
            data = state.data
            tr = (evaluate(state.model, data.x_train, data.y_train, state.loss_fn, cfg.eval_batch_size,
                           self.classification) if self.in_memory
                  else evaluate_batches(state.model, data, state.loss_fn, self.classification, device))
            row.update({f"train_full_{k}": v for k, v in tr.items()})
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(_nan_message(state, bad), state.step, state.epoch,
                                     state.history[-1] if state.history else None)
        row.update({"examples_per_s": self.examples * state.world / max(elapsed, 1e-12),
                    "step_time": elapsed / max(self.steps, 1),
                    "wall_time": self.wall_offset + time.perf_counter() - self.t_start})
        state.history.append(row)
        _call(callbacks, "on_eval", state)
        if state.rank == 0 and self.out is not None:
            _io.append_jsonl(self.out / "metrics.jsonl", row)
        if self.progress:  # above any progress bar (tqdm.write), naming the run: its arm and seed folders
            where = f"{self.out.parent.name} {self.out.name}: " if self.out is not None else ""
            tqdm.write(where + _progress_line(state, row), file=sys.stderr)
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0
        self.examples, self.steps = 0, 0
        self.t_interval = time.perf_counter()

    def _evaluate_test(self) -> dict[str, float]:
        state = self.state
        if self.eval_data is not None:
            return evaluate_batches(state.model, self.eval_data, state.loss_fn, self.classification, state.device)
        if self.in_memory:
            return evaluate(state.model, state.data.x_test, state.data.y_test, state.loss_fn,
                            state.config.eval_batch_size, self.classification)
        return {}


def _progress_line(state: TrainState, row: dict) -> str:
    total = f"/{state.total_steps}" if state.total_steps else ""
    shown = " ".join(f"{k} {v:.4g}" for k, v in row.items()
                     if k not in ("step", "epoch", *TIMING_KEYS) and isinstance(v, (int, float)))
    return f"epoch {row['epoch']:.2f} step {row['step']}{total} {shown} ({row['wall_time']:.1f} s)"


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> Tensor:
    """This rank's example order for ``epoch``: exactly ``torch.utils.data.DistributedSampler``'s with
    ``seed=derive_seed(seed, "epoch-order")`` (a permutation seeded by that plus the epoch, padded by wrapping to
    a multiple of ``world``, strided by rank), as a tensor. The run's seed is hashed first so that seed k's
    epoch e + 1 is not seed k + 1's epoch e, as ``seed + epoch`` would make it.

    Example:
        >>> from torch.utils.data import DistributedSampler
        >>> sampler = DistributedSampler(range(10), num_replicas=2, rank=1, seed=derive_seed(3, "epoch-order"))
        >>> sampler.set_epoch(4)
        >>> epoch_order(10, epoch=4, seed=3, rank=1, world=2).tolist() == list(sampler)
        True

    References:
        PyTorch's ``torch.utils.data.DistributedSampler`` (the order it reproduces).
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch-order") + epoch))
    else:
        order = torch.arange(n)
    total = math.ceil(n / world) * world
    if total > n:
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[:total - n]])
    return order[rank:total:world]


def _nan_message(state: TrainState, which: Sequence[str] = ("train_loss",)) -> str:
    return (f"{', '.join(which)} not finite at step {state.step} (epoch {state.epoch}, optimizer "
            f"{state.config.optimizer!r}, lr={state.config.lr}): the run diverged; lower the learning rate or check "
            "the data")


def _call(callbacks: Sequence[Any], event: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(state)


def _save_checkpoint(path: Path, state: TrainState, callbacks, position: int, loss_sum: Tensor,
                     loss_count: int) -> None:
    if state.rank != 0:
        return
    ckpt = {
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "step": state.step, "epoch": state.epoch, "position": position,
        "loss_sum": loss_sum.detach().cpu(), "loss_count": loss_count, "history": state.history,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
    }
    _io.torch_save(path, ckpt)


def _restore(ckpt: dict, state: TrainState, callbacks, device: torch.device) -> tuple[int, Tensor, int]:
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.step, state.epoch, state.history = ckpt["step"], ckpt["epoch"], list(ckpt["history"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    for cb, s in zip(callbacks, ckpt["callbacks"]):
        if s is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(s)
    return ckpt["position"], ckpt["loss_sum"].to(device), ckpt["loss_count"]

