"""RIFLE and the transfer-learning regularizers and baselines it is compared with.

Li, Xiong, et al., "RIFLE: Backpropagation in Depth for Deep Transfer Learning through Re-Initializing
the Fully-connected LayEr", ICML 2020 (arXiv 2007.03349). While fine-tuning, the classification head is
re-initialised K times at evenly spaced epochs, so that larger gradients reach the deep layers; unlike the
authors' code, never after the last period, so the returned model has a trained head.

Regularizers (loss terms, added by :func:`penalized_step`):
  * L2: (alpha/2) |w|^2 over all weights (or the optimizer's ``weight_decay``).
  * L2-SP (Li, Grandvalet, Davoine, ICML 2018): (alpha/2) |w_S - w_S^0|^2 on the pretrained part plus
    (beta/2) |w_new|^2 on the new head. Defaults alpha = 0.1, beta = 0.01 (the L2-SP authors' code; the
    RIFLE code uses alpha = 0.01, beta = 1e-4).
Baselines: dropout on the head input, DropConnect on the head (Wan et al. 2013), stochastic depth on
ResNet blocks (Huang et al. 2016), DisturbLabel (Xie et al. 2016), cyclic (cosine, restarting) learning
rate with the same period as RIFLE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import BasicBlock
from ..train import EpochLR, loss_step


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, with an error listing the module names when the path is wrong.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> get_submodule(model, "0").out_features
        3
        >>> get_submodule(model, "head")
        Traceback (most recent call last):
        ...
        ValueError: model has no submodule 'head'; available: 0, 1
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"model has no submodule {path!r}; available: {', '.join(names[:30])}") from None


def reset_module(module: nn.Module, initializer: Callable[[nn.Module], None] | None = None) -> None:
    """Re-draw every parameter of ``module``: ``initializer(m)`` or each submodule's ``reset_parameters``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> head = nn.Linear(4, 2)
        >>> before = head.weight.detach().clone()
        >>> reset_module(head)
        >>> torch.equal(head.weight, before)
        False
        >>> reset_module(nn.ReLU())
        Traceback (most recent call last):
        ...
        ValueError: ReLU has nothing to re-initialise (no reset_parameters)

    References:
        Li, Xiong, Wang, Huan and Dou, "RIFLE: Backpropagation in depth for deep transfer learning through
        re-initializing the fully-connected layer", ICML 2020.
    """
    found = False
    for m in module.modules():
        if initializer is not None and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            initializer(m)
            found = True
        elif initializer is None and hasattr(m, "reset_parameters"):
            m.reset_parameters()
            found = True
    if not found:
        raise ValueError(f"{type(module).__name__} has nothing to re-initialise (no reset_parameters)")


def reset_epochs(epochs: int, times: int, every: int | None = None) -> list[int]:
    """Epochs at whose start the head is re-initialised: K evenly spaced, or every ``every`` epochs,
    never inside the last period (after the last reset a full period of training remains).

    Example:
        >>> reset_epochs(10, 3), reset_epochs(10, 0, every=3)
        ([2, 5, 8], [3, 6])
    """
    if every:
        return [e for e in range(every, epochs, every) if e + every <= epochs]
    marks = {round(k * epochs / (times + 1)) for k in range(1, times + 1)}
    return sorted(e for e in marks if 0 < e < epochs)


def reinit_head(model_or_head: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                head: str | None = None, initializer: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """RIFLE's one move, for any training loop: re-draw the head's parameters in place and clear the
    optimizer state (momentum, Adam moments) of exactly those parameters; the backbone's stays.

    ``model_or_head``: the head itself, or the model with ``head=`` naming the head's attribute path
    (e.g. ``"fc"``). The parameters are the same objects, so the optimizer keeps training them.
    Returns the head.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> before = model[1].weight.detach().clone()
        >>> head = reinit_head(model, opt, head="1")
        >>> head is model[1], torch.equal(before, model[1].weight), model[1].weight in opt.state
        (True, False, False)

    References:
        Li et al., ICML 2020 (arXiv:2007.03349), Algorithm 1.
    """
    module = get_submodule(model_or_head, head) if head else model_or_head
    reset_module(module, initializer)
    if optimizer is not None:
        for p in module.parameters():
            optimizer.state.pop(p, None)
    return module


class RIFLESchedule:
    """RIFLE for a hand-written loop, used like a learning-rate scheduler::

        schedule = RIFLESchedule(model.fc, optimizer, total_steps=len(loader) * epochs, times=3)
        for x, y in batches:
            ...; optimizer.step(); schedule.step()

    ``step()`` counts optimizer steps; after steps ``round(k T / (K + 1))``, k = 1..K (T = ``total_steps``),
    the head is re-initialised by :func:`reinit_head`, so the last reset leaves a full period of
    training. ``resets`` lists the steps after which it happened. ``state_dict`` / ``load_state_dict``
    resume the count.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> schedule = RIFLESchedule(model[2], opt, total_steps=12, times=2)
        >>> before = model[2].weight.detach().clone()
        >>> done = [schedule.step() for _ in range(12)]
        >>> schedule.resets, torch.equal(model[2].weight, before)       # after steps round(k 12 / 3), k = 1, 2
        ([4, 8], False)

    References:
        Li, Xiong, Wang, Huan and Dou, ICML 2020 (arXiv:2007.03349), Algorithm 1.
    """

    def __init__(self, head: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, times: int = 3,
                 initializer: Callable[[nn.Module], None] | None = None):
        if total_steps < 1 or times < 0:
            raise ValueError(f"RIFLESchedule needs total_steps >= 1 and times >= 0, got {total_steps}, {times}")
        self.head, self.optimizer, self.initializer = head, optimizer, initializer
        self.planned = reset_epochs(total_steps, times)  # the same even spacing, in steps
        self.steps = 0
        self.resets: list[int] = []

    def step(self) -> bool:
        """Count one optimizer step; re-initialise the head if a reset is due. True when it was."""
        self.steps += 1
        if self.steps in self.planned:
            reinit_head(self.head, self.optimizer, initializer=self.initializer)
            self.resets.append(self.steps)
            return True
        return False

    def state_dict(self) -> dict:
        return {"steps": self.steps, "resets": list(self.resets)}

    def load_state_dict(self, sd: dict) -> None:
        self.steps, self.resets = int(sd["steps"]), list(sd["resets"])


class RIFLE:
    """Callback for :func:`~backproplab.train.fit`: re-initialise ``head`` (an attribute path such as
    ``"head"``) K times while fine-tuning.

    At each planned epoch start the head is re-initialised by :func:`reinit_head`. ``resets`` lists
    (epoch, step) of the resets done. The plan is made in ``on_train_start`` (the loop's length is known
    there); a loop that never calls it gets an error rather than a run without resets. In a loop of
    your own, :class:`RIFLESchedule` needs no loop state.

    Example:
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=100)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(16,))
        >>> rifle = RIFLE("head", times=2)
        >>> _ = fit(model, data, TrainConfig(lr=0.05, epochs=6, batch_size=50), callbacks=[rifle])
        >>> [epoch for epoch, _ in rifle.resets]        # K = 2 resets, a full period of training after the last
        [2, 4]

    References:
        Li, Xiong, Wang, Huan, Lan and Yin, "RIFLE: Backpropagation in depth for deep transfer learning through
        re-initializing the fully-connected layer", ICML 2020 (arXiv:2007.03349).
    """

    def __init__(self, head: str = "head", times: int = 3, every: int | None = None,
                 initializer: Callable[[nn.Module], None] | None = None):
        self.head, self.times, self.every, self.initializer = head, times, every, initializer
        self.planned: list[int] | None = None
        self.resets: list[tuple[int, int]] = []

    def on_train_start(self, state) -> None:
        if not state.steps_per_epoch:
            raise ValueError("RIFLE plans its resets in epochs and needs the epoch length: give fit data with "
                             "a length (a DataLoader over a map-style dataset), or use RIFLESchedule")
        epochs = math.ceil(state.total_steps / state.steps_per_epoch)
        self.planned = reset_epochs(epochs, self.times, self.every)

    def on_epoch_start(self, state) -> None:
        if self.planned is None:
            raise RuntimeError("RIFLE.on_epoch_start before on_train_start: the resets were never planned. In "
                               "a loop of your own use RIFLESchedule(head, optimizer, total_steps, times) or "
                               "reinit_head(head, optimizer)")
        if state.epoch in self.planned and (state.epoch, state.step) not in self.resets:
            reinit_head(state.model, state.optimizer, head=self.head, initializer=self.initializer)
            self.resets.append((state.epoch, state.step))

    def state_dict(self) -> dict:
        return {"resets": [list(r) for r in self.resets]}

    def load_state_dict(self, sd: dict) -> None:
        self.resets = [tuple(r) for r in sd["resets"]]


class CosineLR(EpochLR):
    """Callback: the RIFLE authors' cosine learning rate, set at every epoch start (torch's ``LambdaLR``).

    lr_g(e) = min_lr + (base_g - min_lr) (1 + cos(pi t)) / 2, with t = e / E over the run's E epochs for
    every param group, except those listed in ``restart`` (``True``: all of them), whose t runs from 0 to 1
    within each RIFLE period instead (``reset_epochs(E, times, every)`` are the period starts): the
    authors' per-period head learning rate (``fc_lr_util='cyclic'`` in their train.py, the head in its
    own param group) or, for every group, the cyclic-LR baseline (SGDR). Both kinds end the run annealed,
    so a comparison between them is not one of annealed against not annealed.

    Example:
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=100)
        >>> cosine = CosineLR()
        >>> _ = fit(build_model("mlp", data.input_shape, 10, widths=(8,)), data,
        ...         TrainConfig(lr=0.1, epochs=4, batch_size=50), callbacks=[cosine])
        >>> [round(cosine.lr_at(e)[0], 4) for e in range(4)]          # 0.1 (1 + cos(pi e / 4)) / 2
        [0.1, 0.0854, 0.05, 0.0146]

    References:
        Li et al., ICML 2020 (arXiv:2007.03349) and their train.py; Loshchilov and Hutter, "SGDR", ICLR 2017.
    """

    def __init__(self, times: int = 0, restart: bool | Sequence[int] = (), every: int | None = None,
                 min_lr: float = 0.0):
        self.times, self.every, self.min_lr = times, every, min_lr
        self.restart = restart
        self.bounds: list[int] = []
        super().__init__(self._lambda_lr)

    @property
    def base(self) -> list[float]:
        return list(self.scheduler.base_lrs) if self.scheduler is not None else []

    def _lambda_lr(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        if self.min_lr and not all(bases):
            raise ValueError("CosineLR with min_lr > 0 needs every param group's learning rate > 0 (the schedule "
                             "is a factor of it)")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [
            (lambda e, i=i, base=base: self._lr(i, base, e) / base if base else 0.0) for i, base in enumerate(bases)])

    def on_train_start(self, state) -> None:
        if not state.steps_per_epoch:
            raise ValueError("CosineLR sets the learning rate per epoch and needs the epoch length: give fit "
                             "data with a length")
        epochs = math.ceil(state.total_steps / state.steps_per_epoch)
        self.bounds = [0, *reset_epochs(epochs, self.times, self.every), epochs]
        super().on_train_start(state)

    def _lr(self, i: int, base: float, epoch: int) -> float:
        epochs = self.bounds[-1]
        k = max(j for j, b in enumerate(self.bounds[:-1]) if b <= epoch)
        start, end = self.bounds[k], self.bounds[k + 1]
        cyclic = self.restart is True or (self.restart is not False and i in self.restart)
        t = (epoch - start) / max(end - start, 1) if cyclic else epoch / max(epochs, 1)
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * t))

    def lr_at(self, epoch: int) -> list[float]:
        """Every param group's learning rate in ``epoch`` (after ``on_train_start``)."""
        return [self._lr(i, base, epoch) for i, base in enumerate(self.base)]


class CyclicLR(CosineLR):
    """The cyclic-LR baseline: every group's cosine restarts at each RIFLE period start (SGDR-style).

    Example:
        >>> import math
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=100)
        >>> cyclic = CyclicLR(times=1)                                   # two periods of 3 epochs in 6
        >>> _ = fit(build_model("mlp", data.input_shape, 10, widths=(8,)), data,
        ...         TrainConfig(lr=0.1, epochs=6, batch_size=50), callbacks=[cyclic])
        >>> got = [round(cyclic.lr_at(e)[0], 6) for e in range(6)]
        >>> got == [round(0.1 * (1 + math.cos(math.pi * (e % 3) / 3)) / 2, 6) for e in range(6)]
        True

    References:
        Loshchilov and Hutter, "SGDR: Stochastic gradient descent with warm restarts", ICLR 2017.
    """

    def __init__(self, times: int = 3, every: int | None = None, min_lr: float = 0.0):
        super().__init__(times, restart=True, every=every, min_lr=min_lr)


def head_param_groups(model: nn.Module, head: str = "head") -> list[dict]:
    """``[{"params": head's}, {"params": the rest}]``: the authors' two groups, so the head's learning rate
    can restart per period (:class:`CosineLR` with ``restart=[0]``).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> groups = head_param_groups(model, head="2")
        >>> [len(g["params"]) for g in groups], groups[0]["params"][0] is model[2].weight
        ([2, 2], True)
    """
    ids = {id(p) for p in get_submodule(model, head).parameters()}
    return [{"params": [p for p in model.parameters() if id(p) in ids]},
            {"params": [p for p in model.parameters() if id(p) not in ids]}]


class L2SP:
    """(alpha/2) sum_{w in S} |w - w^0|^2 + (beta/2) sum_{w in head} |w|^2, with w^0 the pretrained
    weights of every parameter outside ``head`` captured at construction.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> penalty = L2SP(model, head="1", alpha=0.1, beta=0.01)
        >>> penalty(model).item()                       # at the pretrained weights only the head's term is left
        ... # doctest: +ELLIPSIS
        0.00...
        >>> abs(penalty(model).item() - 0.005 * model[1].weight.pow(2).sum().item()
        ...     - 0.005 * model[1].bias.pow(2).sum().item()) < 1e-7
        True

    References:
        Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with convolutional networks",
        ICML 2018 (L2-SP).
    """

    def __init__(self, model: nn.Module, head: str = "head", alpha: float = 0.1, beta: float = 0.01):
        head_ids = {id(p) for p in get_submodule(model, head).parameters()}
        self.alpha, self.beta = alpha, beta
        self.start = [(p, p.detach().clone()) for p in model.parameters() if id(p) not in head_ids]
        self.new = [p for p in model.parameters() if id(p) in head_ids]
        self._start_flat = torch.cat([p0.reshape(-1) for _, p0 in self.start]) if self.start else None

    def __call__(self, model: nn.Module) -> Tensor:
        # one flat vector per term: a few ops instead of three per parameter (the step's cost on a small ResNet);
        # the gradients are the same elementwise products as the per-parameter sum's
        sp = (_flat([p for p, _ in self.start]) - self._start_flat).pow(2).sum() if self.start else 0.0
        return 0.5 * self.alpha * sp + 0.5 * self.beta * (_flat(self.new).pow(2).sum() if self.new else 0.0)


class L2:
    """(alpha/2) |w|^2 over all parameters.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 1)
        >>> _ = nn.init.ones_(layer.weight), nn.init.ones_(layer.bias)
        >>> L2(alpha=0.1)(layer).item()                     # 0.05 * (1 + 1 + 1)
        0.15000000596046448
    """

    def __init__(self, alpha: float = 0.01):
        self.alpha = alpha

    def __call__(self, model: nn.Module) -> Tensor:
        return 0.5 * self.alpha * _flat(list(model.parameters())).pow(2).sum()


def _flat(params: Sequence[Tensor]) -> Tensor:
    """The parameters as one vector (differentiable): a penalty over it costs a few ops, not a few per tensor."""
    return torch.cat([p.reshape(-1) for p in params])


def disturb_labels(y: Tensor, alpha: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """DisturbLabel: each label is, with probability alpha, replaced by a class drawn uniformly from all
    ``num_classes`` (so it actually changes with probability alpha (C - 1) / C).

    Example:
        >>> import torch
        >>> y = torch.zeros(100_000, dtype=torch.long)
        >>> changed = disturb_labels(y, 0.2, 10, generator=torch.Generator().manual_seed(0)) != y
        >>> abs(changed.float().mean().item() - 0.2 * 9 / 10) < 0.005
        True
    """
    resample = torch.rand(y.shape, generator=generator, device="cpu").to(y.device) < alpha
    random = torch.randint(0, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
    return torch.where(resample, random, y)


def penalized_step(penalty: Callable[[nn.Module], Tensor] | None = None, disturb_label: float = 0.0,
                   num_classes: int = 0) -> Callable:
    """A training-loop step: loss(model(x), y') + penalty(model), y' = DisturbLabel(y) when asked.
    Returns the data loss (what the curves show).

    Example:
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=100)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(16,))
        >>> rows = fit(model, data, TrainConfig(lr=0.05, epochs=1, batch_size=50),
        ...            step=penalized_step(L2(1e-3), disturb_label=0.1, num_classes=10))
        >>> rows[-1]["train_loss"] > 0                     # the data loss, the penalty left out
        True

    References:
        Xie, Wang, Wang and Tian, "DisturbLabel: Regularizing CNN on the loss layer", CVPR 2016.
    """

    def penalized(batch, state) -> tuple[Tensor, Tensor]:
        y = disturb_labels(batch.y, disturb_label, num_classes) if disturb_label > 0 else batch.y
        loss = state.loss_fn(state.net(batch.x), y)
        return (loss + penalty(state.model) if penalty is not None else loss), loss

    return loss_step(penalized)


class DropConnectLinear(nn.Module):
    """A linear layer whose weights (not activations) are dropped with probability p in training:
    y = x (W * M)^T / (1 - p) + b, one Bernoulli mask M per forward pass; ``last_mask`` keeps it.

    Example:
        >>> import torch
        >>> layer = DropConnectLinear(nn.Linear(3, 2), p=0.5)
        >>> x = torch.randn(4, 3)
        >>> y = layer(x)                                             # training: one mask for this forward
        >>> torch.allclose(y, x @ (layer.linear.weight * layer.last_mask / 0.5).T + layer.linear.bias)
        True
        >>> torch.equal(layer.eval()(x), layer.linear(x))            # at test: the plain layer
        True

    References:
        Wan, Zeiler, Zhang, LeCun and Fergus, "Regularization of neural networks using DropConnect", ICML 2013.
    """

    def __init__(self, linear: nn.Linear, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"DropConnect p must be in [0, 1), got {p}")
        self.linear, self.p = linear, p
        self.last_mask: Tensor | None = None

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return self.linear(x)
        mask = (torch.rand_like(self.linear.weight) >= self.p).to(x.dtype)
        self.last_mask = mask
        return F.linear(x, self.linear.weight * mask / (1 - self.p), self.linear.bias)


class StochasticDepthBlock(nn.Module):
    """A residual block whose residual branch is dropped with probability p in training (Huang et al.
    2016): out = act(shortcut(x) + m * branch(x)), m ~ Bernoulli(1 - p); at test m = 1 - p.

    Example:
        >>> import torch
        >>> block = BasicBlock(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, 4, 4, stride=1).eval()
        >>> x = torch.randn(2, 4, 5, 5)
        >>> dropped = StochasticDepthBlock(block, p=1.0).eval()        # at test the branch is scaled by 1 - p = 0
        >>> torch.allclose(dropped(x), block.act2(block.shortcut(x)))
        True
        >>> torch.allclose(StochasticDepthBlock(block, p=0.0).eval()(x), block(x))   # p = 0: the block itself
        True

    References:
        Huang, Sun, Liu, Sedra and Weinberger, "Deep networks with stochastic depth", ECCV 2016.
    """

    def __init__(self, block: BasicBlock, p: float):
        super().__init__()
        self.block, self.p = block, p

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        branch = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x)))))
        if self.training:
            keep = float(torch.rand(()) >= self.p)
            branch = branch * keep
        else:
            branch = branch * (1 - self.p)
        return b.act2(branch + b.shortcut(x))


def with_head_dropout(model: nn.Module, p: float = 0.5, head: str = "head") -> nn.Module:
    """Dropout on the head's input (in place).

    Example:
        >>> from backproplab import build_model
        >>> model = with_head_dropout(build_model("mlp", (4,), 3, widths=(8,)), p=0.3)
        >>> [type(m).__name__ for m in model.head], model.head[0].p
        (['Dropout', 'Linear'], 0.3)
    """
    parent, _, name = head.rpartition(".")
    owner = get_submodule(model, parent) if parent else model
    setattr(owner, name, nn.Sequential(nn.Dropout(p), getattr(owner, name)))
    return model


def with_dropconnect(model: nn.Module, p: float = 0.5, head: str = "head") -> nn.Module:
    """DropConnect on the head's weights (in place).

    Example:
        >>> from backproplab import build_model
        >>> model = with_dropconnect(build_model("mlp", (4,), 3, widths=(8,)), p=0.3)
        >>> type(model.head).__name__, model.head.p
        ('DropConnectLinear', 0.3)
    """
    parent, _, name = head.rpartition(".")
    owner = get_submodule(model, parent) if parent else model
    layer = getattr(owner, name)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"DropConnect needs {head!r} to be nn.Linear, got {type(layer).__name__}")
    setattr(owner, name, DropConnectLinear(layer, p))
    return model


def with_stochastic_depth(model: nn.Module, p_last: float = 0.5) -> nn.Module:
    """Stochastic depth on every ResNet ``BasicBlock``, drop probability rising linearly to ``p_last``.

    Example:
        >>> from backproplab import build_model
        >>> model = with_stochastic_depth(build_model("resnet18", (3, 8, 8), 10, width=0.125), p_last=0.5)
        >>> [round(m.p, 3) for m in model.modules() if isinstance(m, StochasticDepthBlock)]   # rising linearly
        [0.062, 0.125, 0.188, 0.25, 0.312, 0.375, 0.438, 0.5]
    """
    blocks = [(parent, name) for parent in model.modules() for name, c in parent.named_children()
              if isinstance(c, BasicBlock)]
    if not blocks:
        raise ValueError("stochastic depth needs residual blocks (backproplab.models.BasicBlock); use resnet18")
    for i, (parent, name) in enumerate(blocks):
        setattr(parent, name, StochasticDepthBlock(getattr(parent, name), p_last * (i + 1) / len(blocks)))
    return model


def layer_grad_norms(model: nn.Module, names: Sequence[str]) -> dict[str, float]:
    """The l2 norm of the gradient (``.grad``) of each named submodule's parameters together.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> norms = layer_grad_norms(model, ["1"])
        >>> g = torch.cat([model[1].weight.grad.flatten(), model[1].bias.grad])
        >>> abs(norms["1"] - float(g.norm())) < 1e-6
        True
    """
    norms: dict[str, Tensor | float] = {}
    for n in names:
        grads = [p.grad.detach().reshape(-1) for p in get_submodule(model, n).parameters() if p.grad is not None]
        norms[n] = torch.cat(grads).pow(2).sum().sqrt() if grads else 0.0
    computed = [n for n in names if torch.is_tensor(norms[n])]
    if computed:  # one device-to-host copy for all the layers, not one per layer (it runs at every step)
        norms.update(zip(computed, torch.stack([norms[n] for n in computed]).tolist()))
    return {n: float(norms[n]) for n in names}


def _layer_weights(model: nn.Module, name: str) -> Tensor:
    """The weights and biases of the convolutions and linear layers inside ``name``, as one vector."""
    parts = [p.detach().flatten() for m in get_submodule(model, name).modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for p in m.parameters(recurse=False)]
    if not parts:
        raise ValueError(f"{name!r} has no convolution or linear layer to compare")
    return torch.cat(parts)


def direction_change(model: nn.Module, reference: nn.Module, names: Sequence[str]) -> dict[str, float]:
    """1 - cos(w, w0) per named layer: how far the direction of each layer's weights (convolutions and
    linear layers, as one vector) turned away from ``reference``'s (the pretrained model). The paper's
    "backpropagation in depth" means the deep layers' weights change more; a direction is blind to the
    uniform shrinking that weight decay alone causes.

    Example:
        >>> import copy, torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 3))
        >>> reference = copy.deepcopy(model)
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(0.5), model[0].bias.mul_(0.5)   # shrinking turns nothing
        >>> abs(direction_change(model, reference, ["0"])["0"]) < 1e-6
        True
    """
    out = {}
    for n in names:
        w, w0 = _layer_weights(model, n).double().cpu(), _layer_weights(reference, n).double().cpu()
        out[n] = float(1 - torch.dot(w, w0) / (w.norm() * w0.norm()))
    return out
