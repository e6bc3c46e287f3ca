"""CurveBall (Henriques et al. 2019): the paper's toy problems and a small CNN.

Toy problems (``toy-<problem>-<method>`` arms, ``toy_seeds`` seeds each):
  ``rosenbrock``      f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1); solved when |w - (1, 1)| < tol.
  ``rosenbrock_u1``   the second term multiplied by eps ~ U[0, 1] each iteration (stochastic Rosenbrock).
  ``rosenbrock_u3``   eps ~ U[0, 3].
  ``rahimi_recht``    Rahimi and Recht's ill-conditioned deep linear problem (NIPS 2017 test-of-time talk,
                      the paper's "degenerate" linear net): fit y = W2 W1 x (6x6 each) to y = A x, where A
                      has singular values 10^0 .. 10^-5 (condition number 1e5), on n = 1000 Gaussian inputs;
                      mean squared error; random init per seed; solved when the loss < ``linear_tol``.
  ``rahimi_recht_stochastic``  the same with a mini-batch of ``rr_batch`` inputs per iteration (the
                      paper's stochastic variants); solved on the full-batch loss.
  Methods: SGD, Adam, L-BFGS (torch.optim.LBFGS, strong-Wolfe line search with up to 25 function
  evaluations per iteration; one .step() = one iteration), exact Newton (dense Hessian, shifted to be
  positive definite), Levenberg-Marquardt (J^T J + mu I, mu x10 on rejection, /10 on acceptance) and
  CurveBall (automatic rho and beta, Levenberg-Marquardt lambda). Every compared method gets the same
  tuning budget, five values of ``TUNING_GRID`` on a tuning seed that is not one of the evaluated seeds
  (fewest iterations to tolerance, ties: the smaller final loss): the learning rates of SGD, Adam and
  L-BFGS and CurveBall's initial lambda (reported in the ``lr`` column); Newton and LM, compared in no
  claim, are run untuned. Every run reports iterations and forward
  passes (residual evaluations: L-BFGS's line search and CurveBall's extra passes are counted; Newton's
  and LM's Hessian/Jacobian work beyond one evaluation is not).
CNN (``<dataset>-<bn|nobn>-<method>`` arms): the small CNN with and without BatchNorm on digits and
MNIST-1D, SGD+momentum, Adam and CurveBall. The learning rates from ``momentum_lrs`` / ``adam_lrs`` and
CurveBall's initial lambda from ``curveball_lambdas`` (as many values each) are chosen by validation loss:
the tuning seed trains on 80% of its training set for
the arms' budget and is scored on the other 20% (never the test set). Reported: training loss and test
accuracy against iterations and wall time, forward passes, and the steps and seconds to a test accuracy
fixed before the run (``TARGET_ACC``), AlgoPerf style, so the cost per step shows beside the per-step gain.
The per-iteration claims (the paper's Fig. 3-4 are curves) are judged on the whole training-loss curve:
``train_loss_curve_mean``, the mean training loss over every step of the run (the area under the curve
divided by the steps), not on its end point, where every arm is near zero.

Deviation from the paper: CIFAR-10 and its larger networks are replaced by digits and MNIST-1D (offline);
the toy problems' budgets and tolerances are ours (the paper reports iterations only).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .. import _io, plots
from ..evidence import Claim, quoted
from ..fields import option
from ..methods.curveball import CurveBall
from ..models import build_model
from ..streams import derive
from ..train import TrainConfig
from .config import build_config, config_values
from .registry import MAX_SEEDS, Arm, Experiment, ExperimentConfig, training_phase
from .runner import Results, Run

PROBLEMS = ("rosenbrock", "rosenbrock_u1", "rosenbrock_u3", "rahimi_recht", "rahimi_recht_stochastic")
TOY_METHODS = ("sgd", "adam", "lbfgs", "newton", "lm", "curveball")
# every compared method, the paper's included, tunes five values on the tuning seed: the learning rate of SGD,
# Adam and L-BFGS, CurveBall's initial damping lambda (its rho and beta are automatic, as in the paper)
TUNING_GRID = {"sgd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "adam": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
               "lbfgs": (0.1, 0.3, 1.0, 3.0, 10.0), "curveball": (1e-3, 1e-2, 0.1, 1.0, 10.0)}
TUNING_SEED = 10_000  # tunes every method; never one of the evaluated seeds
CNN_METHODS = ("momentum", "adam", "curveball")
TARGET_ACC = {"digits": 0.95, "mnist1d": 0.80, "fashion_mnist": 0.85, "mnist": 0.98, "cifar10": 0.60}
PAPER = "Henriques et al., ICCV 2019 (arXiv:1805.08095)"
# The paper's own words behind each claim (its arXiv abstract), verbatim.
QUOTES = {
    "curveball.table1": "abstract: \"We first validate our method, called CurveBall, on small problems with known "
                        "closed-form solutions (noisy Rosenbrock function and degenerate 2-layer linear networks), "
                        "where current deep learning solvers seem to struggle.\"",
    "curveball.fig3": "abstract: \"We then train several large models on CIFAR and ImageNet, including ResNet and "
                      "VGG-f networks, where we demonstrate faster convergence with no hyperparameter tuning.\"",
}


@dataclass
class CurveBallConfig(ExperimentConfig):
    """CurveBallConfig.

    Example:
        The toy problems and the CNN comparison are configured apart; a tolerance must be positive:

        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["problems=rosenbrock", "toy_seeds=2"], scale="quick")
        >>> cfg.problems, cfg.toy_seeds, cfg.max_iters                # quick's iteration budget, the seeds given
        (('rosenbrock',), 2, 1500)
        >>> make_config(EXPERIMENT, ["tol=0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 0.0 for 'tol' in experiment 'curveball': expected ...
    """
    problems: tuple[str, ...] = option(PROBLEMS, "toy problems (Rosenbrock family, Rahimi-Recht linear network)")
    toy_methods: tuple[str, ...] = option(TOY_METHODS, "optimizers on the toy problems")
    toy_seeds: int = option(10, "random starts per toy problem", ge=1)
    max_iters: int = option(20000, "iteration budget per toy run", ge=1)
    tol: float = option(1e-3, "distance to (1, 1) for Rosenbrock", gt=0)
    linear_tol: float = option(1e-6, "mean squared error that counts as solved for the Rahimi-Recht problem", gt=0)
    rr_batch: int = option(100, "mini-batch of the stochastic Rahimi-Recht problem", ge=1)
    datasets: tuple[str, ...] = option(("digits", "mnist1d"), "datasets of the CNN comparison")
    cnn_methods: tuple[str, ...] = option(CNN_METHODS, "optimizers of the CNN comparison")
    batchnorm: tuple[str, ...] = option(("nobn", "bn"), "CNN variants: without / with BatchNorm")
    # what the CNN arms share; each arm chooses its optimizer and its tuned learning rate (CurveBall: lambda)
    train: TrainConfig = training_phase("the CNN arms' training", epochs=option(10, "CNN training epochs", ge=1),
                                        batch_size=option(64, "CNN mini-batch size", ge=1))
    momentum_lrs: tuple[float, ...] = option((0.01, 0.03, 0.1), "SGD+momentum's learning-rate sweep (CNN)", gt=0)
    momentum: float = option(0.9, "momentum of the SGD baseline")
    adam_lrs: tuple[float, ...] = option((3e-4, 1e-3, 3e-3), "Adam's learning-rate sweep (CNN)", gt=0)
    curveball_lambdas: tuple[float, ...] = option((0.1, 1.0, 10.0), "CurveBall's initial-lambda sweep (CNN)")
    curveball_lr: float = option(0.0, "<= 0: CurveBall's automatic beta (and rho below)")
    curveball_momentum: float = option(0.0, "<= 0: CurveBall's automatic rho")
    evals_per_epoch: int = option(4, "evaluations per CNN epoch", ge=1)
    seeds: int = option(5, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)


# ---------------------------------------------------------------- toy problems


def _rahimi_recht_problem(n: int = 1000, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (n, d) and targets y = x A^T with A = U diag(10^0 .. 10^-5) V^T (fixed draws)."""
    g = derive(0, "rahimi-recht-problem")  # one problem for every seed
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = u @ torch.diag(torch.logspace(0, -5, d, dtype=torch.float64)) @ v.T
    return x, x @ a.T


class Toy(nn.Module):
    """The toy problem's parameters; forward(sample) returns the residuals r, loss = sum r^2.

    Rosenbrock holds a 2-vector ``w``; Rahimi-Recht holds ``net`` = two bias-free 6x6 Linear layers
    (W1 then W2), so CurveBall can replay tangents through it. ``flat()`` / ``set_flat`` / ``residuals(v)``
    give Newton and Levenberg-Marquardt the flat parameter vector. ``sample()`` draws what one iteration
    sees (Rosenbrock's eps, or a mini-batch of indices) and is passed to every evaluation of that
    iteration; ``evals`` counts residual evaluations (forward passes).

    Example:
        Rosenbrock's residuals at the classic start (-1.2, 1) are (1 - x, 10 (y - x^2)), whose squares sum to the
        textbook f(-1.2, 1) = 24.2:

        >>> toy = Toy("rosenbrock", seed=0)
        >>> r = toy(toy.sample())
        >>> toy.flat().tolist(), [round(v, 6) for v in r.tolist()], round(float((r ** 2).sum()), 6)
        ([-1.2, 1.0], [2.2, -4.4], 24.2)
    """

    def __init__(self, problem: str, seed: int, rr_batch: int = 100):
        super().__init__()
        self.problem, self.rr_batch = problem, rr_batch
        g = derive(seed, "toy-start")
        if problem.startswith("rosenbrock"):
            self.w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        elif problem.startswith("rahimi_recht"):
            self.x, self.y = _rahimi_recht_problem()
            d = self.x.shape[1]
            self.net = nn.Sequential(nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)).double()
            with torch.no_grad():
                for layer in self.net:
                    layer.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        else:
            raise ValueError(f"unknown toy problem {problem!r}; choose from {', '.join(PROBLEMS)}")
        self.noise_gen = derive(seed, "toy-noise")
        self.noise_high = {"rosenbrock_u1": 1.0, "rosenbrock_u3": 3.0}.get(problem)
        self.evals = 0
        self._params = list(self.parameters())  # walked every iteration: module traversal costs more than the math

    def sample(self):
        if self.problem == "rahimi_recht_stochastic":
            return torch.randint(0, len(self.x), (self.rr_batch,), generator=self.noise_gen)
        if self.noise_high is None:
            return None
        return float(torch.rand((), generator=self.noise_gen, dtype=torch.float64)) * self.noise_high

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    @torch.no_grad()
    def set_flat(self, v: torch.Tensor) -> None:
        for p, part in zip(self._params, torch.split(v, [p.numel() for p in self._params])):
            p.copy_(part.view_as(p))

    def batch(self, sample=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x, self.y) if sample is None else (self.x[sample], self.y[sample])

    def outputs(self, sample=None) -> torch.Tensor:
        """Rahimi-Recht: the network's outputs on the sample (one forward pass)."""
        self.evals += 1
        return self.net(self.batch(sample)[0])

    def residuals(self, v: torch.Tensor, sample=None) -> torch.Tensor:
        """The residuals at the flat parameter vector ``v``."""
        self.evals += 1
        if self.problem.startswith("rosenbrock"):
            eps = 1.0 if sample is None else sample
            return torch.stack([1 - v[0], 10 * math.sqrt(eps) * (v[1] - v[0] ** 2)])
        d = self.x.shape[1]
        w1, w2 = v[:d * d].view(d, d), v[d * d:].view(d, d)
        x, y = self.batch(sample)
        return (x @ w1.T @ w2.T - y).reshape(-1) / math.sqrt(y.numel())

    def forward(self, sample=None) -> torch.Tensor:
        if self.problem.startswith("rosenbrock"):
            return self.residuals(self.w, sample)
        y = self.batch(sample)[1]
        return (self.outputs(sample) - y).reshape(-1) / math.sqrt(y.numel())

    def loss(self, mean: bool = True, flat: torch.Tensor | None = None) -> float:
        """The full objective (the expected one for stochastic Rosenbrock), not counted as a forward pass;
        ``flat``: the current ``flat()`` when the caller has it."""
        eps = None if self.noise_high is None or not mean else self.noise_high / 2
        with torch.no_grad():
            value = float(self.residuals(self.flat() if flat is None else flat, eps).pow(2).sum())
        self.evals -= 1
        return value

    def solved(self, cfg: CurveBallConfig, flat: torch.Tensor | None = None) -> bool:
        flat = self.flat() if flat is None else flat
        if self.problem.startswith("rosenbrock"):
            return float((flat - 1).norm()) < cfg.tol
        return self.loss(flat=flat) < cfg.linear_tol


def _sum_sq(r: torch.Tensor) -> torch.Tensor:
    return r.pow(2).sum()


def lbfgs(params, lr: float) -> torch.optim.LBFGS:
    """One outer iteration per ``.step()``, with a real strong-Wolfe line search (up to 25 evaluations):
    torch's default ``max_eval = max_iter * 5 // 4`` is 1 for ``max_iter=1``, which leaves the line search
    no evaluation at all.

    Example:
        Thirty steps on Rosenbrock from (-1.2, 1): torch's own strong-Wolfe L-BFGS with ``max_iter=1`` never moves
        (its line search gets no evaluation), this one nears the minimum (1, 1):

        >>> def run(optimizer_of, steps=30):
        ...     w = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        ...     opt = optimizer_of([w])
        ...     def closure():
        ...         opt.zero_grad()
        ...         loss = (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2
        ...         loss.backward()
        ...         return loss
        ...     for _ in range(steps):
        ...         opt.step(closure)
        ...     return [round(v, 2) for v in w.tolist()]
        >>> torch_default = lambda p: torch.optim.LBFGS(p, lr=1.0, max_iter=1, line_search_fn="strong_wolfe")
        >>> run(torch_default), run(lambda p: lbfgs(p, 1.0))
        ([-1.2, 1.0], [0.99, 0.97])
    """
    return torch.optim.LBFGS(params, lr=lr, max_iter=1, max_eval=25, line_search_fn="strong_wolfe")


def solve_toy(problem: str, method: str, seed: int, cfg: CurveBallConfig, lr: float | None = None,
              max_iters: int | None = None) -> dict:
    """Iterate until solved or ``max_iters``; returns iterations, forward passes, success, final loss, path.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> result = solve_toy("rosenbrock", "curveball", seed=0, cfg=cfg)
        >>> x, y = result["path"][-1]
        >>> result["solved"], ((x - 1) ** 2 + (y - 1) ** 2) ** 0.5 < cfg.tol       # within tol of the minimum (1, 1)
        (True, True)
    """
    from ..methods.curveball import MeanSquaredError

    toy = Toy(problem, seed, cfg.rr_batch)  # its own generators: the initial point and each iteration's sample
    max_iters = max_iters or cfg.max_iters
    path = [toy.flat()[:2]]
    loss_of = lambda sample: _sum_sq(toy(sample))  # noqa: E731
    opt = None
    if method == "sgd":
        opt = torch.optim.SGD(toy.parameters(), lr=lr)
    elif method == "adam":
        opt = torch.optim.Adam(toy.parameters(), lr=lr)
    elif method == "lbfgs":
        opt = lbfgs(toy.parameters(), lr)
    elif method == "curveball":  # Rahimi-Recht: the chain of two layers, with tangent replay
        opt = CurveBall(toy.parameters(), model=toy.net if hasattr(toy, "net") else toy,
                        lambd=1.0 if lr is None else lr)  # CurveBall's tuned value: its initial damping lambda
    mu = 1e-3
    jacobian = functools.partial(torch.autograd.functional.jacobian, vectorize=True)
    it = 0
    for it in range(1, max_iters + 1):
        sample = toy.sample()
        if method in ("sgd", "adam"):
            opt.zero_grad()
            loss_of(sample).backward()
            opt.step()
        elif method == "lbfgs":
            def closure(sample=sample):
                opt.zero_grad()
                loss = loss_of(sample)
                loss.backward()
                return loss
            opt.step(closure)
        elif method == "curveball":
            if hasattr(toy, "net"):  # mean squared error = sum of the squared residuals
                opt.step(lambda sample=sample: toy.outputs(sample), MeanSquaredError(toy.batch(sample)[1]))
            else:
                opt.step(lambda sample=sample: toy(sample), _sum_sq)
        elif method == "newton":
            w = toy.flat()
            f = lambda v, sample=sample: _sum_sq(toy.residuals(v, sample))
            g = jacobian(f, w)
            H = torch.autograd.functional.hessian(f, w, vectorize=True)
            low = float(torch.linalg.eigvalsh(H)[0])
            shift = max(0.0, -low + 1e-8)
            toy.set_flat(w - torch.linalg.solve(H + shift * torch.eye(len(w), dtype=w.dtype), g))
        elif method == "lm":
            w = toy.flat()
            r = toy.residuals(w, sample)
            J = jacobian(lambda v, sample=sample: toy.residuals(v, sample), w)
            step = torch.linalg.solve(J.T @ J + mu * torch.eye(len(w), dtype=w.dtype), J.T @ r)
            if _sum_sq(toy.residuals(w - step, sample)) < _sum_sq(r):
                toy.set_flat(w - step)
                mu = max(mu / 10, 1e-12)
            else:
                mu = min(mu * 10, 1e12)
        else:
            raise ValueError(f"unknown toy method {method!r}")
        flat = toy.flat()  # once per iteration: the path, the finiteness check and the stopping test share it
        if it <= 2000 or it % 10 == 0:
            path.append(flat[:2])
        if not torch.isfinite(flat).all():
            break
        if toy.solved(cfg, flat):
            break
    solved = bool(torch.isfinite(toy.flat()).all()) and toy.solved(cfg)
    return {"iterations": it if solved else max_iters, "forward_passes": toy.evals, "solved": solved,
            "final_loss": toy.loss(), "lr": lr, "path": torch.stack(path).tolist()}


@functools.cache
def _tuned_lr(problem: str, method: str, cfg_key: str) -> float | None:
    cfg = build_config(CurveBallConfig, json.loads(cfg_key))
    if method not in TUNING_GRID:
        return None
    trials = [(solve_toy(problem, method, TUNING_SEED, cfg, lr), lr) for lr in TUNING_GRID[method]]
    best = min(trials, key=lambda t: (t[0]["iterations"],
                                      t[0]["final_loss"] if math.isfinite(t[0]["final_loss"]) else math.inf))
    return best[1]


# ---------------------------------------------------------------- arms


@dataclass(frozen=True)
class ToyArm(Arm):
    """ToyArm.

    Example:
        >>> ToyArm("rosenbrock", "curveball").name                     # a toy problem and its solver
        'toy-rosenbrock-curveball'
    """
    problem: str
    method: str

    @property
    def name(self) -> str:
        return f"toy-{self.problem}-{self.method}"


@dataclass(frozen=True)
class CNNArm(Arm):
    """CNNArm.

    Example:
        >>> CNNArm("digits", "bn", "curveball").name                   # dataset, BatchNorm or not, optimizer
        'digits-bn-curveball'
    """
    dataset: str
    batchnorm: str  # "bn" | "nobn"
    method: str


def arms(cfg: CurveBallConfig) -> list[Arm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (36, True)
    """
    toy = [ToyArm(p, m) for p in cfg.problems for m in cfg.toy_methods]
    cnn = [CNNArm(d, b, m) for d in cfg.datasets for b in cfg.batchnorm for m in cfg.cnn_methods]
    return toy + cnn


def seeds_for(cfg: CurveBallConfig, arm: Arm) -> int:
    """seeds_for.

    Per-arm seed count: a toy arm runs ``toy_seeds`` random starts, a CNN arm ``seeds``.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["toy_seeds=4", "seeds=2"])
        >>> seeds_for(cfg, ToyArm("rosenbrock", "sgd")), seeds_for(cfg, CNNArm("digits", "bn", "sgd"))
        (4, 2)
    """
    return cfg.toy_seeds if isinstance(arm, ToyArm) else cfg.seeds


def claims(cfg: CurveBallConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (14, True)
    """
    out = []
    titles = {"rosenbrock": "the Rosenbrock function", "rosenbrock_u1": "the stochastic Rosenbrock function (U[0,1])",
              "rosenbrock_u3": "the stochastic Rosenbrock function (U[0,3])",
              "rahimi_recht": "Rahimi and Recht's ill-conditioned two-layer linear network (full batch)",
              "rahimi_recht_stochastic": "Rahimi and Recht's ill-conditioned two-layer linear network (mini-batch)"}
    for p in cfg.problems:
        for base in ("sgd", "adam"):
            if {base, "curveball"} <= set(cfg.toy_methods):
                out.append(Claim(
                    f"curveball.table1.{p}.vs_{base}", PAPER, "Table 1",
                    f"On {titles[p]}, CurveBall reaches the solution in fewer iterations than "
                    f"{'SGD' if base == 'sgd' else 'Adam'} (each tunes five values on a tuning seed).",
                    "iterations", ToyArm(p, "curveball").name, "less", 0.0,
                    "CurveBall needs fewer iterations than the first-order solvers on every problem",
                    baseline=ToyArm(p, base).name,
                    metric_label=f"iterations to tolerance (capped at max_iters={cfg.max_iters})"))
    for d in cfg.datasets:
        for b in cfg.batchnorm:
            for base in ("momentum", "adam"):
                if {base, "curveball"} <= set(cfg.cnn_methods):
                    out.append(Claim(
                        f"curveball.fig3.{d}-{b}.vs_{base}", PAPER, "Fig. 3 / Fig. 4 (per-iteration curves)",
                        f"Per iteration, CurveBall reaches a lower training loss than {base} on a small CNN "
                        f"({'with' if b == 'bn' else 'without'} BatchNorm).",
                        "train_loss_curve_mean", CNNArm(d, b, "curveball").name, "less", 0.0,
                        "CIFAR-10 basic CNN and ResNets: CurveBall's training-loss curve below SGD+momentum's "
                        "and Adam's",
                        baseline=CNNArm(d, b, base).name,
                        metric_label="mean training loss over every step of the run: the area under the "
                                     "training-loss curve per step (cross-entropy, nats), all methods tuned alike"))
    return quoted(out, QUOTES)


class ForwardCounter:
    """Callback: counts the model's forward calls in train mode (the step's passes; evaluation excluded).

    Example:
        One forward per SGD step; the evaluations (in eval mode) are not counted:

        >>> from backproplab import build_model, load_dataset
        >>> from backproplab.train import TrainConfig, fit
        >>> data = load_dataset("digits", n_train=100)
        >>> rows = fit(build_model("mlp", data.input_shape, 10, widths=(8,)), data,
        ...            TrainConfig(batch_size=10, max_steps=7, eval_every=2), callbacks=[ForwardCounter()],
        ...            progress=False)
        >>> rows[-1]["forward_passes"], len(rows) > 1
        (7, True)
    """

    def __init__(self):
        self.count = 0
        self._handle = None

    def on_train_start(self, state) -> None:
        def count(module, args):
            if module.training:
                self.count += 1
        self._handle = state.model.register_forward_pre_hook(count)

    def on_train_end(self, state) -> None:
        if self._handle is not None:
            self._handle.remove()
        state.history[-1]["forward_passes"] = self.count

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.count = int(sd["count"])


def _cnn_optimizer(model: nn.Module, cfg: CurveBallConfig, method: str, value: float | None):
    """CurveBall with the tuned initial lambda ``value`` (beta and rho as configured: <= 0 automatic); None for
    the baselines, whose optimizer the loop builds from the train config."""
    if method != "curveball":
        return None
    return CurveBall(model.parameters(), model=model, lr=max(cfg.curveball_lr, 0.0),
                     momentum=max(cfg.curveball_momentum, 0.0), auto_lr=cfg.curveball_lr <= 0,
                     auto_momentum=cfg.curveball_momentum <= 0, lambd=1.0 if value is None else value)


def _cnn_train_config(run_or_none, cfg: CurveBallConfig, method: str, lr: float | None, n_train: int, **fields):
    if method == "curveball":  # the optimizer itself comes from _cnn_optimizer (lr holds its initial lambda)
        settings = dict(optimizer="curveball", lr=cfg.curveball_lr, momentum=cfg.curveball_momentum)
    elif method == "momentum":
        settings = dict(optimizer="sgd", lr=lr, momentum=cfg.momentum)
    else:
        settings = dict(optimizer="adam", lr=lr)
    settings.update(eval_every=max(1, n_train // cfg.train.batch_size // cfg.evals_per_epoch))
    settings.update(fields)
    if run_or_none is None:  # the tuning runs: their own seed and device come in `fields`
        return replace(cfg.train, **settings)
    return run_or_none.train_config(cfg.train, **settings)


@functools.cache
def _tuned_cnn_lr(dataset: str, batchnorm: str, method: str, cfg_key: str, data_root: str, device: str) -> float:
    """The value of the method's grid (a learning rate; CurveBall: its initial lambda) with the lowest validation
    loss: the tuning seed trains on 80% of its training set for the arms' full budget and is scored on the other
    20% (the test set is never seen)."""
    from ..data import load_dataset
    from ..train import fit, isolated_rng, seed_everything

    cfg = build_config(CurveBallConfig, json.loads(cfg_key))
    grid = {"momentum": cfg.momentum_lrs, "adam": cfg.adam_lrs, "curveball": cfg.curveball_lambdas}[method]
    data = load_dataset(dataset, seed=TUNING_SEED, root=data_root or None)
    n_fit = int(0.8 * len(data.x_train))
    split = replace(data, x_train=data.x_train[:n_fit], y_train=data.y_train[:n_fit],
                    x_test=data.x_train[n_fit:], y_test=data.y_train[n_fit:])
    scores = []
    with isolated_rng(TUNING_SEED):
        for lr in grid:
            seed_everything(TUNING_SEED)
            model = build_model("cnn", data.input_shape, data.num_classes, batchnorm=batchnorm == "bn")
            tc = _cnn_train_config(None, cfg, method, lr, n_fit, seed=TUNING_SEED, device=device, eval_every=0)
            try:  # the split's "test" part is the validation set: fit's last row is its loss
                loss = fit(model, split, tc, optimizer=_cnn_optimizer(model, cfg, method, lr))[-1]["test_loss"]
            except FloatingPointError:
                loss = math.inf
            scores.append((loss if math.isfinite(loss) else math.inf, lr))
    return min(scores)[1]


def _to_target(history: list[dict], target: float) -> tuple[float | None, float | None]:
    """(steps, seconds) at the first evaluation whose test accuracy reaches ``target``; None if none does."""
    for row in history:
        if row.get("test_acc", -1.0) >= target:
            return float(row["step"]), float(row["wall_time"])
    return None, None


def run_arm(run: Run) -> dict:
    """run_arm.

    Runs one arm for one seed: a toy problem solved from the seed's start (learning rate tuned once, on a tuning
    seed), or the CNN trained for the budget; returns its metrics.

    Example:
        A toy run's saved path ends where it reports: within ``tol`` of the minimum (1, 1) when solved, after as
        many iterations as the path has steps:

        >>> import json, tempfile
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "toy_seeds=1", "toy_methods=curveball"], scale="smoke")
        >>> jobs = plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")
        >>> job = next(j for j in jobs if j.arm.name.startswith("toy"))
        >>> final = run_job(job)
        >>> path = json.load(open(job.run_dir / "path.json"))
        >>> (x, y), solved = path[-1], final["solved"]
        >>> solved, ((x - 1) ** 2 + (y - 1) ** 2) ** 0.5 < cfg.tol, final["iterations"] == len(path) - 1
        (True, True, True)
    """
    cfg, arm = run.cfg, run.arm
    if isinstance(arm, ToyArm):
        key = json.dumps({k: v for k, v in config_values(cfg).items()
                          if k in ("max_iters", "tol", "linear_tol", "rr_batch")}, sort_keys=True)
        lr = run.tuned(f"toy-{arm.problem}-{arm.method}", json.loads(key),
                       lambda: _tuned_lr(arm.problem, arm.method, key))
        t = time.perf_counter()
        result = solve_toy(arm.problem, arm.method, run.seed, cfg, lr)
        result["wall_time"] = time.perf_counter() - t
        path = result.pop("path")
        _io.write_json(run.dir / "path.json", path)
        _io.write_jsonl(run.dir / "metrics.jsonl", [result])
        return result
    data = run.data(arm.dataset)
    key = json.dumps({k: v for k, v in config_values(cfg).items()
                      if k in ("epochs", "batch_size", "momentum_lrs", "adam_lrs", "curveball_lambdas", "momentum",
                               "evals_per_epoch", "curveball_lr", "curveball_momentum")}, sort_keys=True)
    lr = run.tuned(f"cnn-{arm.dataset}-{arm.batchnorm}-{arm.method}", {**json.loads(key), "data_root": cfg.data_root},
                   lambda: _tuned_cnn_lr(arm.dataset, arm.batchnorm, arm.method, key, cfg.data_root, run.device))
    model = build_model("cnn", data.input_shape, data.num_classes, batchnorm=arm.batchnorm == "bn")
    tc = _cnn_train_config(run, cfg, arm.method, lr, len(data.x_train))
    history = run.fit(model, data, tc, callbacks=[ForwardCounter()],
                      optimizer=_cnn_optimizer(model, cfg, arm.method, lr))
    target = TARGET_ACC.get(arm.dataset)
    steps, seconds = _to_target(history, target) if target is not None else (None, None)
    return {**history[-1], "lr": lr, "target_acc": target, "steps_to_target": steps, "time_to_target": seconds,
            "train_loss_curve_mean": curve_mean(history, "train_loss")}


def curve_mean(history: list[dict], key: str) -> float:
    """The mean of ``key`` over every step of the run: each evaluation row holds the mean over the steps since
    the previous row, so the steps-weighted mean of the rows is the area under the per-step curve divided by
    the number of steps.

    Example:
        Rows at steps 10 and 30 hold the means over steps 1-10 and 11-30; their steps-weighted mean is the mean
        over all 30 steps:

        >>> round(curve_mean([{"step": 10, "train_loss": 1.0}, {"step": 30, "train_loss": 0.5}], "train_loss"), 6)
        0.666667
    """
    total, steps, last = 0.0, 0, 0
    for row in history:
        if key in row and row["step"] > last:
            total += row[key] * (row["step"] - last)
            steps += row["step"] - last
            last = row["step"]
    return total / steps if steps else math.nan


# ---------------------------------------------------------------- analysis


def _toy_table(res: Results) -> dict[str, dict[str, tuple[float, float, int, int, float]]]:
    """problem -> method -> (mean, sd of iterations of the solved seeds, solved, seeds, mean forward passes)."""
    cfg = res.cfg
    table: dict[str, dict[str, tuple[float, float, int, int, float]]] = {}
    for p in cfg.problems:
        for m in cfg.toy_methods:
            finals = res.final_list(ToyArm(p, m).name)
            if not finals:
                continue
            solved = [f for f in finals if f["solved"]]
            its = np.array([f["iterations"] for f in solved], dtype=float)
            evals = np.array([f.get("forward_passes", math.nan) for f in solved], dtype=float)
            table.setdefault(p, {})[m] = (float(its.mean()) if len(its) else math.nan,
                                          float(its.std()) if len(its) else math.nan, len(its), len(finals),
                                          float(evals.mean()) if len(evals) else math.nan)
    return table


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (toy paths, CNN curves by step and by wall time) and notes: iterations to tolerance per toy method,
    wall time per CNN method, and steps to the target accuracy.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["toy_methods=curveball", "datasets=digits", "cnn_methods=momentum"],
        ...                   scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: seeds_for(cfg, arm))
        >>> note = next(n for n in analyze(results) if n.startswith("toy rosenbrock"))
        >>> iterations = list(results.values("toy-rosenbrock-curveball", "iterations").values())
        >>> bool(float(re.search(r"curveball ([0-9.]+)±", note).group(1)) == np.mean(iterations))
        True
    """
    cfg, exp_dir = res.cfg, res.exp_dir
    notes = []
    table = _toy_table(res)
    lines = ["problem | " + " | ".join(cfg.toy_methods)]
    for p, row in table.items():
        cells = []
        for m in cfg.toy_methods:
            if m in row:
                mean, std, ok, n, evals = row[m]
                cells.append(f"{mean:.0f}±{std:.0f} ({ok}/{n}; {evals:.0f} passes)" if ok
                             else f"none of {n} within {cfg.max_iters}")
            else:
                cells.append("-")
        lines.append(f"{p} | " + " | ".join(cells))
    _io.write_text(exp_dir / "toy_table.md", "\n".join(lines) + "\n")
    notes.append(f"toy problems: every compared method tunes {len(next(iter(TUNING_GRID.values())))} values on a "
                 f"separate tuning seed ({TUNING_SEED}), the learning rates of " +
                 "; ".join(f"{m}: {', '.join(f'{v:g}' for v in grid)}" for m, grid in TUNING_GRID.items()) +
                 f" (CurveBall: its initial lambda; fewest iterations to tolerance, at most {cfg.max_iters}). "
                 "L-BFGS runs a strong-Wolfe line search of up to 25 evaluations per iteration.")
    for p, row in table.items():
        notes.append(f"toy {p}: iterations to tolerance, mean±sd (solved/seeds; mean forward passes) — " + "; ".join(
            f"{m} {row[m][0]:.0f}±{row[m][1]:.0f} ({row[m][2]}/{row[m][3]}; {row[m][4]:.0f} passes)" if row[m][2]
            else f"{m} none of {row[m][3]} within {cfg.max_iters}" for m in row) + ".")
    rosen = [p for p in cfg.problems if p.startswith("rosenbrock")]
    if rosen:  # trajectories on the Rosenbrock contour (seed 0)
        fig, axes = plots.subplots(1, len(rosen), size=(4.5, 4))
        X, Y = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
        Z = (1 - X) ** 2 + 100 * (Y - X ** 2) ** 2
        for ax, p in zip(axes[0], rosen):
            ax.contour(X, Y, np.log10(Z + 1e-3), levels=30, cmap="Greys", linewidths=0.6)
            for m in cfg.toy_methods:
                f = exp_dir / ToyArm(p, m).name / "seed0" / "path.json"
                if f.exists():
                    path = np.array(json.loads(f.read_text()))
                    ax.plot(path[:, 0], path[:, 1], lw=1, label=m)
            ax.plot([1], [1], "k*", ms=10, label="minimum (1, 1)")
            ax.set(title=f"{p}: iterates of seed 0", xlim=(-2, 2), ylim=(-1, 3), xlabel="x (first coordinate)",
                   ylabel="y (second coordinate)")
            ax.legend(fontsize=8)
        plots.save(fig, exp_dir / "rosenbrock_trajectories.png")
    groups = [(d, b) for d in cfg.datasets for b in cfg.batchnorm]
    if groups:  # CNN curves against iterations and wall time
        fig, axes = plots.subplots(3, len(groups))
        for col, (d, b) in enumerate(groups):
            by_method = {m: res.runs(CNNArm(d, b, m).name) for m in cfg.cnn_methods}
            plots.curves(axes[0][col], by_method, "train_loss", x="step", log=True)
            plots.curves(axes[1][col], by_method, "test_acc", x="step")
            plots.curves(axes[2][col], by_method, "test_acc", x="wall_time")
            axes[0][col].set_title(f"{d} / CNN {b}")
            walls = {m: np.mean([r[-1]["wall_time"] for r in rs]) for m, rs in by_method.items() if rs}
            if "curveball" in walls and len(walls) > 1:
                notes.append(f"{d} / CNN {b}, {cfg.train.epochs} epochs: mean wall time " + ", ".join(
                    f"{m} {w:.1f} s" for m, w in walls.items()) + " (the per-iteration claims ignore wall time).")
            target = TARGET_ACC.get(d)
            parts = []
            for m in cfg.cnn_methods:
                finals = res.final_list(CNNArm(d, b, m).name)
                if not finals:
                    continue
                times = [f.get("time_to_target") for f in finals]
                steps = [f.get("steps_to_target") for f in finals]
                hit = [t for t in times if t is not None]
                lr = finals[0].get("lr")
                parts.append(f"{m}{f' (lr {lr:g}, chosen on validation)' if lr else ''}: "
                             + (f"{np.median(hit):.1f} s / {np.median([s for s in steps if s is not None]):.0f} "
                                f"steps (median of {len(hit)}/{len(finals)} seeds that reached it)" if hit
                                else f"not reached by any of {len(finals)} seeds")
                             + f", {np.mean([f.get('forward_passes', math.nan) for f in finals]):.0f} forward passes")
            if target is not None and parts:
                notes.append(f"{d} / CNN {b}: time to {target:.0%} test accuracy (fixed before the run) — "
                             + "; ".join(parts) + ".")
        plots.save(fig, exp_dir / "cnn_curves.png")
    return notes


EXPERIMENT = Experiment(
    name="curveball",
    description="CurveBall (Henriques et al. 2019): Rosenbrock and linear-network toy problems; small CNN "
                "with/without BN.",
    paper_setting="Table 1: Rosenbrock (deterministic and stochastic) and a degenerate 2-layer "
                  "linear network; Figures: training-loss curves of a basic CNN and ResNets on "
                  "CIFAR-10 and of VGG-f / ResNet on ImageNet",
    deviations=(
        "the CNN claims run on digits (8x8) with a small CNN, with and without BatchNorm, for a "
        "few epochs, instead of CIFAR-10 / ImageNet networks (offline data, 2 CPU cores)",
        "every compared method, CurveBall included (its initial lambda), tunes the same number of"
        " values on a tuning seed; the paper ran CurveBall untuned",
    ),
    config=CurveBallConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims, seeds_for=seeds_for,
    smoke={"problems": ("rosenbrock",), "toy_methods": ("sgd", "curveball"), "toy_seeds": 2, "max_iters": 200,
           "datasets": ("digits",), "batchnorm": ("bn",), "cnn_methods": ("momentum", "curveball"), "epochs": 1,
           "seeds": 2},
    quick={"toy_seeds": 6, "max_iters": 1500, "epochs": 3, "seeds": 3, "datasets": ("digits",)},
    paper={"datasets": ("cifar10",), "batchnorm": ("nobn", "bn")},
    paper_gaps=("the CNN is this library's basic CNN (build_model('cnn')), not the paper's exact network; its "
                "ResNets and ImageNet (VGG-f, ResNet) are not in this config",
                "epochs and batch size are this experiment's full-scale ones, tuned for every method alike"),
    table_metrics=("iterations", "forward_passes", "final_loss", "test_acc", "train_loss_curve_mean", "wall_time",
                   "time_to_target", "lr"),
)
