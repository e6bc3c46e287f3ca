"""CurveBall (Henriques et al. 2019): the paper's toy problems and a small CNN.

Toy problems (``toy-<problem>-<method>`` arms, ``toy_seeds`` seeds each):
  ``rosenbrock``      f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1); solved when |w - (1, 1)| < tol.
  ``rosenbrock_u1``   the second term multiplied by eps ~ U[0, 1] each iteration (stochastic Rosenbrock).
  ``rosenbrock_u3``   eps ~ U[0, 3].
  ``linear_net``      a degenerate two-layer linear network y = w2^T W1 x (4-4-1) fit to a linear teacher on
                      20 points; random init per seed; solved when the loss < ``linear_tol``.
  Methods: SGD, Adam, L-BFGS (torch.optim.LBFGS, strong-Wolfe line search, one .step() = one iteration),
  exact Newton (dense Hessian, shifted to be positive definite), Levenberg-Marquardt (J^T J + mu I, mu x10
  on rejection, /10 on acceptance) and CurveBall (automatic rho, beta, lambda). The learning rates of
  SGD, Adam and L-BFGS are tuned on seed 0 over ``TUNING_GRID``: the value with the fewest iterations
  (ties: the smaller final loss) is then used for every seed.
CNN (``<dataset>-<bn|nobn>-<method>`` arms): the small CNN with and without BatchNorm on digits and
MNIST-1D, SGD+momentum, Adam and CurveBall: training loss and test accuracy against iterations and
against wall time.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import _io, plots
from ..evidence import Claim
from ..methods.curveball import CurveBall
from ..models import build_model
from . import Arm, Experiment, ExperimentConfig, Results, Run

PROBLEMS = ("rosenbrock", "rosenbrock_u1", "rosenbrock_u3", "linear_net")
TOY_METHODS = ("sgd", "adam", "lbfgs", "newton", "lm", "curveball")
TUNING_GRID = {"sgd": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
               "lbfgs": (0.1, 0.3, 1.0)}
CNN_METHODS = ("momentum", "adam", "curveball")
PAPER = "Henriques et al., ICCV 2019"


@dataclass
class CurveBallConfig(ExperimentConfig):
    problems: tuple[str, ...] = PROBLEMS  # toy problems (Rosenbrock family, linear network)
    toy_methods: tuple[str, ...] = TOY_METHODS  # optimizers on the toy problems
    toy_seeds: int = 10  # random starts per toy problem
    max_iters: int = 20000  # iteration budget per toy run
    tol: float = 1e-3  # distance to (1, 1) for Rosenbrock
    linear_tol: float = 1e-6  # loss for the linear network
    datasets: tuple[str, ...] = ("digits", "mnist1d")  # datasets of the CNN comparison
    cnn_methods: tuple[str, ...] = CNN_METHODS  # optimizers of the CNN comparison
    batchnorm: tuple[str, ...] = ("nobn", "bn")  # CNN variants: without / with BatchNorm
    epochs: int = 10  # CNN training epochs
    batch_size: int = 64  # CNN mini-batch size
    momentum_lr: float = 0.05  # learning rate of SGD with momentum (CNN)
    momentum: float = 0.9  # momentum of the SGD baseline
    adam_lr: float = 1e-3  # Adam's learning rate (CNN)
    curveball_lr: float = 0.0  # <= 0: CurveBall's automatic beta (and rho below)
    curveball_momentum: float = 0.0  # <= 0: CurveBall's automatic rho
    evals_per_epoch: int = 4  # evaluations per CNN epoch
# ---------------------------------------------------------------- toy problems


class Toy(nn.Module):
    """Holds the parameter vector; forward(eps) returns the residuals r, loss = sum r^2."""

    def __init__(self, problem: str, seed: int):
        super().__init__()
        self.problem = problem
        g = torch.Generator().manual_seed(seed)
        if problem.startswith("rosenbrock"):
            self.w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        else:
            self.x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            self.y = self.x @ torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            self.w = nn.Parameter(0.5 * torch.randn(20, generator=g, dtype=torch.float64))
        self.noise_gen = torch.Generator().manual_seed(1000 + seed)
        self.noise_high = {"rosenbrock_u1": 1.0, "rosenbrock_u3": 3.0}.get(problem)

    def sample(self) -> float:
        if self.noise_high is None:
            return 1.0
        return float(torch.rand((), generator=self.noise_gen, dtype=torch.float64)) * self.noise_high

    def residuals(self, w: torch.Tensor, eps: float) -> torch.Tensor:
        if self.problem.startswith("rosenbrock"):
            return torch.stack([1 - w[0], 10 * math.sqrt(eps) * (w[1] - w[0] ** 2)])
        w1, w2 = w[:16].view(4, 4), w[16:]
        return (self.x @ w1.T @ w2 - self.y) / math.sqrt(len(self.y))

    def forward(self, eps: float) -> torch.Tensor:
        return self.residuals(self.w, eps)

    def solved(self, cfg: CurveBallConfig) -> bool:
        with torch.no_grad():
            if self.problem.startswith("rosenbrock"):
                return float((self.w - 1).norm()) < cfg.tol
            return float(self.residuals(self.w, 1.0).pow(2).sum()) < cfg.linear_tol

    def expected_loss(self) -> float:
        mean_eps = 1.0 if self.noise_high is None else self.noise_high / 2
        with torch.no_grad():
            return float(self.residuals(self.w, mean_eps).pow(2).sum())


def _sum_sq(r: torch.Tensor) -> torch.Tensor:
    return r.pow(2).sum()


def solve_toy(problem: str, method: str, seed: int, cfg: CurveBallConfig, lr: float | None = None,
              max_iters: int | None = None) -> dict:
    """Iterate until solved or ``max_iters``; returns iterations, success, final loss and the path."""
    toy = Toy(problem, seed)  # its own generators: the initial point and the noise of each iteration
    max_iters = max_iters or cfg.max_iters
    path = [toy.w.detach().clone()]
    loss_of = lambda eps: _sum_sq(toy(eps))  # noqa: E731
    opt = None
    if method == "sgd":
        opt = torch.optim.SGD(toy.parameters(), lr=lr)
    elif method == "adam":
        opt = torch.optim.Adam(toy.parameters(), lr=lr)
    elif method == "lbfgs":
        opt = torch.optim.LBFGS(toy.parameters(), lr=lr, max_iter=1, line_search_fn="strong_wolfe")
    elif method == "curveball":
        opt = CurveBall(toy.parameters(), model=toy)
    mu = 1e-3
    it = 0
    for it in range(1, max_iters + 1):
        eps = toy.sample()
        if method in ("sgd", "adam"):
            opt.zero_grad()
            loss_of(eps).backward()
            opt.step()
        elif method == "lbfgs":
            def closure(eps=eps):
                opt.zero_grad()
                loss = loss_of(eps)
                loss.backward()
                return loss
            opt.step(closure)
        elif method == "curveball":
            opt.step(lambda eps=eps: toy(eps), _sum_sq)
        elif method == "newton":
            w = toy.w.detach()
            f = lambda v, eps=eps: _sum_sq(toy.residuals(v, eps))
            g = torch.autograd.functional.jacobian(f, w)
            H = torch.autograd.functional.hessian(f, w)
            low = float(torch.linalg.eigvalsh(H)[0])
            shift = max(0.0, -low + 1e-8)
            with torch.no_grad():
                toy.w -= torch.linalg.solve(H + shift * torch.eye(len(w), dtype=w.dtype), g)
        elif method == "lm":
            w = toy.w.detach()
            r = toy.residuals(w, eps)
            J = torch.autograd.functional.jacobian(lambda v, eps=eps: toy.residuals(v, eps), w)
            step = torch.linalg.solve(J.T @ J + mu * torch.eye(len(w), dtype=w.dtype), J.T @ r)
            if _sum_sq(toy.residuals(w - step, eps)) < _sum_sq(r):
                with torch.no_grad():
                    toy.w -= step
                mu = max(mu / 10, 1e-12)
            else:
                mu = min(mu * 10, 1e12)
        else:
            raise ValueError(f"unknown toy method {method!r}")
        if it <= 2000 or it % 10 == 0:
            path.append(toy.w.detach().clone())
        if not torch.isfinite(toy.w).all():
            break
        if toy.solved(cfg):
            break
    solved = bool(torch.isfinite(toy.w).all()) and toy.solved(cfg)
    return {"iterations": it if solved else max_iters, "solved": solved, "final_loss": toy.expected_loss(),
            "lr": lr, "path": torch.stack(path)[:, :2].tolist()}


@functools.cache
def _tuned_lr(problem: str, method: str, cfg_key: str) -> float | None:
    cfg = CurveBallConfig(**json.loads(cfg_key))
    if method not in TUNING_GRID:
        return None
    trials = [(solve_toy(problem, method, 0, cfg, lr), lr) for lr in TUNING_GRID[method]]
    best = min(trials, key=lambda t: (t[0]["iterations"],
                                      t[0]["final_loss"] if math.isfinite(t[0]["final_loss"]) else math.inf))
    return best[1]


# ---------------------------------------------------------------- arms


@dataclass(frozen=True)
class ToyArm(Arm):
    problem: str
    method: str

    @property
    def name(self) -> str:
        return f"toy-{self.problem}-{self.method}"


@dataclass(frozen=True)
class CNNArm(Arm):
    dataset: str
    batchnorm: str  # "bn" | "nobn"
    method: str


def arms(cfg: CurveBallConfig) -> list[Arm]:
    toy = [ToyArm(p, m) for p in cfg.problems for m in cfg.toy_methods]
    cnn = [CNNArm(d, b, m) for d in cfg.datasets for b in cfg.batchnorm for m in cfg.cnn_methods]
    return toy + cnn


def seeds_for(cfg: CurveBallConfig, arm: Arm) -> int:
    return cfg.toy_seeds if isinstance(arm, ToyArm) else cfg.seeds


def claims(cfg: CurveBallConfig) -> list[Claim]:
    out = []
    titles = {"rosenbrock": "the Rosenbrock function", "rosenbrock_u1": "the stochastic Rosenbrock function (U[0,1])",
              "rosenbrock_u3": "the stochastic Rosenbrock function (U[0,3])",
              "linear_net": "a two-layer linear network"}
    for p in cfg.problems:
        for base in ("sgd", "adam"):
            if {base, "curveball"} <= set(cfg.toy_methods):
                out.append(Claim(
                    f"curveball.table1.{p}.vs_{base}", PAPER, "Table 1",
                    f"On {titles[p]}, CurveBall reaches the solution in fewer iterations than "
                    f"{'SGD' if base == 'sgd' else 'Adam'} (both tuned).",
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
                        "train_loss", CNNArm(d, b, "curveball").name, "less", 0.0,
                        "CIFAR-10 basic CNN and ResNets: CurveBall's training-loss curve below SGD+momentum's "
                        "and Adam's",
                        baseline=CNNArm(d, b, base).name,
                        metric_label="training loss over the last evaluation interval (cross-entropy, nats)"))
    return out


def run_arm(run: Run) -> dict:
    cfg, arm = run.cfg, run.arm
    if isinstance(arm, ToyArm):
        key = json.dumps({k: v for k, v in cfg.__dict__.items() if k in ("max_iters", "tol", "linear_tol")},
                         sort_keys=True)
        lr = _tuned_lr(arm.problem, arm.method, key)
        t = time.perf_counter()
        result = solve_toy(arm.problem, arm.method, run.seed, cfg, lr)
        result["wall_time"] = time.perf_counter() - t
        path = result.pop("path")
        _io.write_json(run.dir / "path.json", path)
        _io.write_jsonl(run.dir / "metrics.jsonl", [result])
        return result
    data = run.data(arm.dataset)
    model = build_model("cnn", data.input_shape, data.num_classes, batchnorm=arm.batchnorm == "bn")
    if arm.method == "curveball":
        tc = run.train_config(optimizer="curveball", lr=cfg.curveball_lr, momentum=cfg.curveball_momentum)
    elif arm.method == "momentum":
        tc = run.train_config(optimizer="sgd", lr=cfg.momentum_lr, momentum=cfg.momentum)
    else:
        tc = run.train_config(optimizer="adam", lr=cfg.adam_lr)
    tc.batch_size, tc.epochs = cfg.batch_size, cfg.epochs
    tc.eval_every = max(1, len(data.x_train) // cfg.batch_size // cfg.evals_per_epoch)
    return run.fit(model, data, tc)[-1]


# ---------------------------------------------------------------- analysis


def _toy_table(res: Results) -> dict[str, dict[str, tuple[float, float, int, int]]]:
    cfg = res.cfg
    table: dict[str, dict[str, tuple[float, float, int, int]]] = {}
    for p in cfg.problems:
        for m in cfg.toy_methods:
            finals = res.final_list(ToyArm(p, m).name)
            if not finals:
                continue
            its = np.array([f["iterations"] for f in finals if f["solved"]], dtype=float)
            table.setdefault(p, {})[m] = (float(its.mean()) if len(its) else math.nan,
                                          float(its.std()) if len(its) else math.nan, len(its), len(finals))
    return table


def analyze(res: Results) -> list[str]:
    cfg, exp_dir = res.cfg, res.exp_dir
    notes = []
    table = _toy_table(res)
    lines = ["problem | " + " | ".join(cfg.toy_methods)]
    for p, row in table.items():
        cells = []
        for m in cfg.toy_methods:
            if m in row:
                mean, std, ok, n = row[m]
                cells.append(f"{mean:.0f}±{std:.0f} ({ok}/{n})" if ok else f"none of {n} within {cfg.max_iters}")
            else:
                cells.append("-")
        lines.append(f"{p} | " + " | ".join(cells))
    _io.write_text(exp_dir / "toy_table.md", "\n".join(lines) + "\n")
    notes.append("toy baselines' learning rates tuned on seed 0 over " +
                 "; ".join(f"{m}: {', '.join(f'{v:g}' for v in grid)}" for m, grid in TUNING_GRID.items()) +
                 f" (fewest iterations to tolerance, at most {cfg.max_iters}); CurveBall has nothing to tune.")
    for p, row in table.items():
        notes.append(f"toy {p}: iterations to tolerance, mean±sd (solved/seeds) — " + "; ".join(
            f"{m} {row[m][0]:.0f}±{row[m][1]:.0f} ({row[m][2]}/{row[m][3]})" if row[m][2]
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
            ax.legend(fontsize=6)
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
                notes.append(f"{d} / CNN {b}, {cfg.epochs} epochs: mean wall time " + ", ".join(
                    f"{m} {w:.1f} s" for m, w in walls.items()) + " (the per-iteration claims ignore wall time).")
        plots.save(fig, exp_dir / "cnn_curves.png")
    return notes


EXPERIMENT = Experiment(
    name="curveball",
    description="CurveBall (Henriques et al. 2019): Rosenbrock and linear-network toy problems; small CNN "
                "with/without BN.",
    config=CurveBallConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims, seeds_for=seeds_for,
    smoke={"problems": ("rosenbrock",), "toy_methods": ("sgd", "curveball"), "toy_seeds": 2, "max_iters": 200,
           "datasets": ("digits",), "batchnorm": ("bn",), "cnn_methods": ("momentum", "curveball"), "epochs": 1,
           "seeds": 2},
    quick={"toy_seeds": 6, "max_iters": 1500, "epochs": 3, "seeds": 3, "datasets": ("digits",)},
    table_metrics=("iterations", "final_loss", "test_acc", "train_loss", "wall_time"),
)
