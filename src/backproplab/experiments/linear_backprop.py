"""Linear Backprop (Yazdani 2018): backprop vs linear backprop on the paper's three settings.

1. ``points-*``: the paper's Figure 1 setting: a sigmoid MLP (``points_widths``) overfitting the SAME 5
   points (1-D inputs, fixed once for every seed and initialisation, as in the paper's "50 different
   random weight initialisations on the same 5 points") by full-batch gradient descent, over ``n_inits``
   initialisations per seed, all trained at once (their layers stacked side by side). Each method's learning rate is
   chosen from ``points_lrs`` on a tuning seed whose initialisations are not evaluated (lowest median
   final MSE). Reported: median and quartiles of the MSE per iteration, iterations to fit (MSE below
   ``points_fit_tol``), the fitted curves (the paper's left panel) and the histogram of hidden activations
   after training (saturation, the right panel).
2. ``<dataset>-<activation>-*``: a VGG-style CNN without BatchNorm (3x3 convolution + max-pool stages,
   ``cnn_channels``, then a hidden linear layer) on digits and MNIST-1D, ReLU and sigmoid, Adam.
   (Plain VGG-11 did not train at all in the quick budget on 8x8 digits, with either method.)
3. ``binary-*``: a binarized VGG-style CNN on digits (``binary_vgg``: binary weights and Sign activations,
   BatchNorm after every layer; weights trained through the clipped straight-through estimator in both
   arms). The activation's derivative is the clipped straight-through estimator in the backprop arm and
   1 in the linear-backprop arm (the paper's section 1.2 trains binarized VGG/ResNet on CIFAR-10; here the
   offline digits, as CIFAR-10 files are not on this machine).

Deviation from the paper: CIFAR-10 VGG/ResNet runs are replaced by offline data at this scale.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from .. import _io, plots
from ..evidence import Claim, quoted
from ..fields import option
from ..methods.linear_backprop import linear_backprop
from ..models import build_model
from ..streams import derive, derive_seed
from ..train import TrainConfig
from .registry import Arm, Experiment, ExperimentConfig, training_phase
from .runner import Results, Run

METHODS = {"bp": "backprop", "lbp": "linear backprop"}
PAPER = "Yazdani, NeurIPS 2018 workshop (Linear Backprop in non-linear networks)"
EQUIVALENCE_MARGIN = 0.01  # 1 point of test accuracy


@dataclass
class LinearBackpropConfig(ExperimentConfig):
    """LinearBackpropConfig.

    Example:
        A learning-rate sweep is a comma-separated list, each value positive:

        >>> from backproplab.experiments import make_config
        >>> make_config(EXPERIMENT, ["points_lrs=0.1,0.3"]).points_lrs
        (0.1, 0.3)
        >>> make_config(EXPERIMENT, ["points_lrs=0.1,0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 0.0 for 'points_lrs' in ...: expected a number above 0
    """
    n_inits: int = option(50, "initialisations per seed in the 5-point experiment", ge=1)
    points_iters: int = option(2000, "iterations of the 5-point fit", ge=1)
    points_lrs: tuple[float, ...] = option(
        (0.03, 0.1, 0.3, 1.0, 3.0), "learning-rate sweep of the 5-point fit, per method", gt=0)
    points_fit_tol: float = option(1e-3, "MSE below which an initialisation has fitted the 5 points")
    points_widths: tuple[int, ...] = option((32, 32, 32), "hidden widths of the 5-point MLP", ge=1)
    datasets: tuple[str, ...] = option(("digits", "mnist1d"), "datasets of the MLP/CNN comparison")
    activations: tuple[str, ...] = option(("relu", "sigmoid"), "activations compared")
    cnn_channels: tuple[int, ...] = option((32, 64, 128), "channels of the CNN's conv layers", ge=1)
    # the CNNs' Adam (the binary networks' batch size too)
    train: TrainConfig = training_phase("Adam of the CNN comparison", optimizer="adam",
                                        epochs=option(15, "training epochs (MLP/CNN)", ge=1),
                                        lr=option(1e-3, "Adam", gt=0),
                                        batch_size=option(64, "mini-batch size", ge=1))
    binary: TrainConfig = training_phase("Adam of the binary networks", prefix="binary_", optimizer="adam",
                                         epochs=option(15, "epochs of the binary networks", ge=1),
                                         lr=option(1e-3, "learning rate of the binary networks", gt=0))
    binary_channels: tuple[int, ...] = option((32, 64), "channels of the binarized VGG-style CNN's stages", ge=1)
    binary_hidden: int = option(128, "width of its hidden binary linear layer", ge=1)
@dataclass(frozen=True)
class LBPArm(Arm):
    """LBPArm.

    Example:
        >>> LBPArm("points", "lbp").name, LBPArm("digits-relu", "bp").name     # a setting and the method
        ('points-lbp', 'digits-relu-bp')
    """
    setting: str  # "points", "binary" or "<dataset>-<activation>"
    method: str  # "bp" | "lbp"


def arms(cfg: LinearBackpropConfig) -> list[LBPArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (12, True)
    """
    settings = ["points", *(f"{d}-{a}" for d in cfg.datasets for a in cfg.activations), "binary"]
    return [LBPArm(s, m) for s in settings for m in METHODS]


# The paper's own words behind each claim (its abstract, NeurIPS 2018 CDNNRIA workshop), verbatim. The extensions
# (fig2.*-relu, sec3.*-sigmoid) carry none: the paper does not make them.
QUOTES = {
    "linear_backprop.fig1": "abstract: \"Here we investigate backpropagating error terms only linearly. That is, we "
                            "ignore the saturation that arise by ensuring gradients always flow.\"",
    "linear_backprop.sec4.binary": "abstract: \"Our early results suggest that learning with Linear Backprop is "
                                   "competitive with Backprop and saves expensive gradient computations.\"",
}


def claims(cfg: LinearBackpropConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (7, True)
    """
    out = [Claim("linear_backprop.fig1.five_points", PAPER, "Fig. 1",
                 "Overfitting 5 random points with a sigmoid MLP, linear backprop reaches a lower training error than "
                 "backprop in the same number of iterations.", "train_loss", LBPArm("points", "lbp").name, "less",
                 0.0, "5 points, sigmoid MLP: linear backprop's MSE falls orders of magnitude faster",
                 baseline=LBPArm("points", "bp").name,
                 metric_label="median final MSE over the initialisations of a seed (each method at its tuned lr)"),
           Claim("linear_backprop.fig1.five_points_speed", PAPER, "Fig. 1",
                 "Linear backprop fits the 5 points in fewer iterations than backprop.", "iterations_to_fit",
                 LBPArm("points", "lbp").name, "less", 0.0,
                 "5 points, sigmoid MLP: linear backprop converges faster", baseline=LBPArm("points", "bp").name,
                 metric_label=f"median iterations to MSE < {cfg.points_fit_tol:g} over the initialisations "
                              f"(not fitted: {cfg.points_iters + 1})")]
    for d in cfg.datasets:
        for a in cfg.activations:
            setting = f"{d}-{a}"
            if a == "relu":
                out.append(Claim(
                    f"linear_backprop.fig2.{setting}", PAPER, "Fig. 2 (VGG on CIFAR-10)",
                    "On a VGG-style ReLU network, linear backprop reaches a test accuracy comparable to backprop's.",
                    "test_acc", LBPArm(setting, "lbp").name, "equivalent", EQUIVALENCE_MARGIN,
                    "VGG-19 on CIFAR-10: linear backprop's test accuracy matches backprop's",
                    baseline=LBPArm(setting, "bp").name, metric_label="final test accuracy (fraction)",
                    extension="the paper's Fig. 2 (VGG-19 on CIFAR-10) is in its section on binary networks; a "
                              "full-precision ReLU network is this lab's extrapolation (the primary claim is "
                              "linear_backprop.sec4.binary)"))
            else:
                out.append(Claim(
                    f"linear_backprop.sec3.{setting}", PAPER, "Section 3 (saturating activations)",
                    "With sigmoid activations, linear backprop trains where backprop's gradients vanish: higher "
                    "test accuracy.", "test_acc", LBPArm(setting, "lbp").name, "greater", 0.0,
                    "sigmoid networks: backprop stalls in saturation, linear backprop keeps learning",
                    baseline=LBPArm(setting, "bp").name, metric_label="final test accuracy (fraction)",
                    extension="the paper shows the five-point sigmoid fit (Fig. 1), not a sigmoid network on a "
                              "dataset; this accuracy comparison is this lab's extrapolation"))
    out.append(Claim("linear_backprop.sec4.binary", PAPER, "Section 4 (binary networks)",
                     "For binarized networks (binary weights and sign activations), linear backprop "
                     "(derivative 1) trains as well as the straight-through estimator.", "test_acc",
                     LBPArm("binary", "lbp").name, "equivalent",
                     EQUIVALENCE_MARGIN, "binary networks: comparable accuracy to the straight-through estimator",
                     baseline=LBPArm("binary", "bp").name, metric_label="final test accuracy (fraction)"))
    return quoted(out, QUOTES)


TUNING_SEED = 10_000  # its initialisations choose each method's learning rate; never evaluated


def five_points() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5 points every initialisation of every seed fits: x ~ U[-2, 2] (1-D), y ~ N(0, 1), drawn once.

    Example:
        >>> x, y = five_points()
        >>> x.shape, bool(x.abs().max() <= 2), torch.equal(x, five_points()[0])      # the same points every call
        (torch.Size([5, 1]), True, True)
    """
    g = derive(0, "five-points")  # one set of points for every seed
    return (torch.rand(5, 1, generator=g) * 4 - 2), torch.randn(5, 1, generator=g)


class _StackedLinear(torch.nn.Module):
    """Linear layers of several initialisations side by side: (inits, rows, in) -> (inits, rows, out)."""

    def __init__(self, layers: list[torch.nn.Linear]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = torch.nn.Parameter(torch.stack([m.bias.detach() for m in layers]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2))


def _stacked(models: list[torch.nn.Module]) -> torch.nn.Sequential:
    """The library's MLPs of every initialisation as one network of stacked layers (same activations)."""
    layers = []
    for parts in zip(*[[*m.body, m.head] for m in models]):
        if isinstance(parts[0], torch.nn.Linear):
            layers.append(_StackedLinear(list(parts)))
        elif not isinstance(parts[0], torch.nn.Flatten):
            layers.append(type(parts[0])())
    return torch.nn.Sequential(*layers)


def fit_five_points(cfg: LinearBackpropConfig, method: str, lr: float, seed: int,
                    grid: torch.Tensor | None = None) -> dict:
    """Full-batch gradient descent of ``n_inits`` initialisations of the library's sigmoid MLP at once: their
    layers are stacked side by side (one batched matrix product per layer, independent per initialisation)
    and, for ``lbp``, switched by :func:`linear_backprop` like any model. Returns the MSE of each
    initialisation per iteration (NaN after a divergence), the final hidden activations and, on ``grid``,
    the fitted functions.

    Example:
        The initialisations stacked side by side train independently: the first of three follows exactly the path it
        follows alone:

        >>> from backproplab.experiments import make_config
        >>> three = fit_five_points(make_config(EXPERIMENT, ["n_inits=3", "points_iters=30"]), "lbp", 0.3, seed=1)
        >>> alone = fit_five_points(make_config(EXPERIMENT, ["n_inits=1", "points_iters=30"]), "lbp", 0.3, seed=1)
        >>> three["losses"].shape, bool(np.allclose(three["losses"][0], alone["losses"][0], rtol=1e-5, atol=1e-7))
        ((3, 30), True)
    """
    x, y = five_points()
    inits = []
    for i in range(cfg.n_inits):
        torch.manual_seed(derive_seed(seed, "points-init", i))
        inits.append(build_model("mlp", (1,), 1, widths=cfg.points_widths, activation="sigmoid"))
    net = _stacked(inits)
    if method == "lbp":
        linear_backprop(net)
    xs = x.expand(cfg.n_inits, *x.shape)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    losses = torch.empty(cfg.n_inits, cfg.points_iters)
    for t in range(cfg.points_iters):
        opt.zero_grad(set_to_none=True)
        per_init = (net(xs) - y).pow(2).mean((1, 2))  # each init's MSE; their sum's gradient is each one's own
        per_init.sum().backward()
        opt.step()
        losses[:, t] = per_init.detach()
    losses[~torch.isfinite(losses)] = float("nan")
    losses = torch.where(torch.isnan(losses).cummax(1).values, float("nan"), losses)  # diverged stays diverged
    hidden = []
    with torch.no_grad():
        h = xs
        for layer in net[:-1]:
            h = layer(h)
            if not isinstance(layer, _StackedLinear):
                hidden.append(h.flatten())
        curves = net(grid.expand(cfg.n_inits, *grid.shape))[..., 0] if grid is not None else None
    return {"losses": losses.numpy(), "hidden": torch.cat(hidden).numpy(), "curves": curves}


def _iterations_to_fit(losses: np.ndarray, tol: float) -> np.ndarray:
    """Per initialisation, the first iteration (1-based) with MSE below ``tol``; inf if none."""
    below = np.nan_to_num(losses, nan=np.inf) < tol
    return np.where(below.any(1), below.argmax(1) + 1, np.inf)


_TUNED: dict[tuple, float] = {}


def tuned_points_lr(cfg: LinearBackpropConfig, method: str) -> float:
    """The learning rate of ``points_lrs`` with the lowest median final MSE on the tuning seed.

    Example:
        The choice equals a brute-force search over the sweep on the tuning seed:

        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["n_inits=4", "points_iters=40", "points_lrs=0.03,0.3,3"])
        >>> median = lambda lr: np.median(np.nan_to_num(fit_five_points(cfg, "bp", lr, TUNING_SEED)["losses"][:, -1],
        ...                                             nan=np.inf))
        >>> tuned_points_lr(cfg, "bp") == min(cfg.points_lrs, key=median)
        True
    """
    key = (method, cfg.n_inits, cfg.points_iters, cfg.points_widths, cfg.points_lrs)
    if key not in _TUNED:
        def score(lr: float) -> float:
            final = fit_five_points(cfg, method, lr, TUNING_SEED)["losses"][:, -1]
            final = np.where(np.isnan(final), np.inf, final)
            return float(np.median(final))
        _TUNED[key] = min(cfg.points_lrs, key=score)
    return _TUNED[key]


def _five_points(run: Run, method: str) -> dict:
    from ..train import isolated_rng

    cfg, seed, run_dir = run.cfg, run.seed, run.dir
    with isolated_rng(TUNING_SEED):
        key = {"method": method, "n_inits": cfg.n_inits, "points_iters": cfg.points_iters,
               "points_widths": cfg.points_widths, "points_lrs": cfg.points_lrs}
        lr = run.tuned(f"points-{method}", key, lambda: tuned_points_lr(cfg, method))
    grid = torch.linspace(-2.5, 2.5, 101)[:, None]
    out = fit_five_points(cfg, method, lr, seed, grid)
    c = out["losses"]
    diverged = int(np.isnan(c[:, -1]).sum())
    q25, med, q75 = np.nanpercentile(c, [25, 50, 75], axis=0) if diverged < len(c) else (c[0],) * 3
    every = max(1, cfg.points_iters // 200)
    rows = [{"step": t + 1, "epoch": t + 1, "train_loss": float(med[t]), "train_loss_q25": float(q25[t]),
             "train_loss_q75": float(q75[t])} for t in range(0, cfg.points_iters, every)]
    fit_iters = _iterations_to_fit(c, cfg.points_fit_tol)
    acts = out["hidden"]
    final = {**rows[-1], "step": cfg.points_iters, "train_loss": float(med[-1]), "lr": lr,
             "iterations_to_fit": float(np.median(np.minimum(fit_iters, cfg.points_iters + 1))),
             "fitted_fraction": float(np.isfinite(fit_iters).mean()),
             "saturated_fraction": float(np.mean((acts < 0.05) | (acts > 0.95))), "n_inits": cfg.n_inits,
             "diverged": diverged}
    _io.write_jsonl(run_dir / "metrics.jsonl", rows)
    buf = io.BytesIO()
    np.save(buf, acts.astype(np.float32))
    _io.write_bytes(run_dir / "hidden_activations.npy", buf.getvalue())
    _io.write_json(run_dir / "fitted_curves.json", {"x": grid[:, 0].tolist(),
                                                    "curves": out["curves"][:10].tolist()})
    return final


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one arm for one seed: the 5-point fit, the binarized network, or the MLP/CNN comparison, with backprop
    (``bp``) or linear backprop (``lbp``); returns its metrics.

    Example:
        Linear backprop changes the backward pass only: the saved network, run forward as a plain CNN, gives the
        accuracy the linear-backprop arm reported:

        >>> import tempfile
        >>> from backproplab.data import load_dataset
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.train import cross_entropy, evaluate
        >>> cfg = make_config(EXPERIMENT, ["seeds=1"], scale="smoke")
        >>> job = next(j for j in plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")
        ...            if j.arm.name == "digits-relu-lbp")
        >>> final = run_job(job)
        >>> data = load_dataset("digits", seed=0)
        >>> model = build_model("cnn", data.input_shape, data.num_classes, channels=cfg.cnn_channels, activation="relu")
        >>> model.load_state_dict(torch.load(job.run_dir / "model.pt", weights_only=True))
        <All keys matched successfully>
        >>> abs(evaluate(model, data.x_test, data.y_test, cross_entropy)["acc"] - final["test_acc"]) < 1e-9
        True
    """
    cfg, arm = run.cfg, run.arm
    if arm.setting == "points":
        return _five_points(run, arm.method)
    if arm.setting == "binary":
        data = run.data("digits")
        model = build_model("binary_vgg", data.input_shape, data.num_classes, channels=cfg.binary_channels,
                            hidden=cfg.binary_hidden)
        tc = run.train_config(cfg.binary, batch_size=cfg.train.batch_size)
    else:
        dataset, act = arm.setting.split("-")
        data = run.data(dataset)
        model = build_model("cnn", data.input_shape, data.num_classes, channels=cfg.cnn_channels, activation=act)
        tc = run.train_config(cfg.train)
    if arm.method == "lbp":
        linear_backprop(model)
    return run.fit(model, data, tc)[-1]


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (the 5-point fits, hidden activations, learning curves) and notes: the median final MSE and iterations
    to fit of each method, and each comparison's accuracies.

    Example:
        >>> import re, tempfile
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "datasets=digits", "activations=relu"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = analyze(results)[0]
        >>> reported = float(re.search(r"median final MSE backprop ([0-9]+[.][0-9]+)", note).group(1))
        >>> median = np.median(list(results.values("points-bp", "train_loss").values()))   # of the seeds' medians
        >>> bool(abs(reported - median) <= 0.005 * median)                                 # 3 significant figures
        True
    """
    cfg, exp_dir = res.cfg, res.exp_dir
    notes = []
    fig, axes = plots.subplots(1, 3)  # 1. five points
    finals = {}
    for m, label in METHODS.items():
        arm = LBPArm("points", m).name
        arm_runs = res.runs(arm)
        if not arm_runs:
            continue
        r = arm_runs[0]
        xs = [row["step"] for row in r]
        (line,) = axes[0][0].plot(xs, [row["train_loss"] for row in r], label=f"{label} (median, IQR band)")
        axes[0][0].fill_between(xs, [row["train_loss_q25"] for row in r], [row["train_loss_q75"] for row in r],
                                color=line.get_color(), alpha=0.2)
        acts = np.concatenate([np.load(exp_dir / arm / f"seed{s}" / "hidden_activations.npy") for s in res.seeds(arm)])
        axes[0][1].hist(acts, bins=50, range=(0, 1), alpha=0.5, density=True, label=label)
        curves_file = exp_dir / arm / "seed0" / "fitted_curves.json"
        if curves_file.exists():
            import json

            fitted = json.loads(curves_file.read_text())
            for k, curve in enumerate(fitted["curves"]):
                axes[0][2].plot(fitted["x"], curve, color=line.get_color(), lw=0.7, alpha=0.6,
                                label=label if k == 0 else None)
        finals[m] = [(f["train_loss"], f["saturated_fraction"], f["diverged"], f.get("iterations_to_fit", np.nan),
                      f.get("fitted_fraction", np.nan), f.get("lr", np.nan)) for f in res.final_list(arm)]
    px, py = five_points()
    axes[0][2].plot(px[:, 0], py[:, 0], "k*", ms=10, label="the 5 points")
    axes[0][0].set_yscale("log")
    axes[0][0].set(xlabel="iteration (full-batch steps)", ylabel="training MSE",
                   title=f"5 fixed points, sigmoid MLP (seed 0, {cfg.n_inits} inits)")
    axes[0][1].set(xlabel="hidden activation after training (sigmoid output)", ylabel="density",
                   title="saturation")
    axes[0][2].set(xlabel="input x", ylabel="fitted f(x)", title="fitted functions (seed 0, 10 inits)")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    plots.save(fig, exp_dir / "five_points.png")
    if len(finals) == 2:
        bp, lbp = (np.array(finals[m]) for m in ("bp", "lbp"))
        notes.append(
            f"5 fixed points, {cfg.n_inits} inits x {len(bp)} seeds, {cfg.points_iters} iterations, learning rate "
            f"per method from {', '.join(f'{v:g}' for v in cfg.points_lrs)} on a tuning seed (backprop "
            f"{bp[0, 5]:g}, linear backprop {lbp[0, 5]:g}): median final MSE backprop {np.median(bp[:, 0]):.3g}, "
            f"linear backprop {np.median(lbp[:, 0]):.3g}; median iterations to MSE < {cfg.points_fit_tol:g} "
            f"{np.median(bp[:, 3]):.0f} vs {np.median(lbp[:, 3]):.0f} (fitted inits {100 * bp[:, 4].mean():.0f}% vs "
            f"{100 * lbp[:, 4].mean():.0f}%); saturated hidden units (<0.05 or >0.95) {100 * bp[:, 1].mean():.0f}% "
            f"vs {100 * lbp[:, 1].mean():.0f}%; diverged inits {int(bp[:, 2].sum())} vs {int(lbp[:, 2].sum())}.")
    groups = [(f"{d}-{a}", f"{d} / VGG-style CNN {a}") for d in cfg.datasets for a in cfg.activations]
    groups.append(("binary", "digits / binarized VGG-style CNN"))
    fig, axes = plots.subplots(1, len(groups))  # 2. VGG-style and 3. binary
    for ax, (setting, title) in zip(axes[0], groups):
        plots.curves(ax, {label: res.runs(LBPArm(setting, m).name) for m, label in METHODS.items()}, "test_acc")
        ax.set_title(title)
        acc = {m: [f["test_acc"] for f in res.final_list(LBPArm(setting, m).name)] for m in METHODS}
        if all(acc.values()) and max(np.mean(v) for v in acc.values()) < 0.2:
            notes.append(f"{title}: neither arm learned (test accuracy below 20%; chance is 10%).")
    plots.save(fig, exp_dir / "test_accuracy.png")
    return notes


EXPERIMENT = Experiment(
    name="linear_backprop",
    description="Linear backprop (Yazdani 2018) vs backprop: 5-point sigmoid MLP, VGG-style CNN ReLU/sigmoid, "
                "binarized VGG-style CNN.",
    paper_setting="Figure 1: 5 points fitted by a sigmoid MLP; Figure 2: VGG-19 on CIFAR-10, in "
                  "the section on binary networks",
    deviations=(
        "a VGG-style CNN on digits and MNIST-1D (ReLU and sigmoid, no BatchNorm) for a few epochs"
        " instead of VGG-19 on CIFAR-10",
        "a binarized VGG-style CNN on digits instead of a binary VGG on CIFAR-10",
    ),
    config=LinearBackpropConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"n_inits": 3, "points_iters": 40, "datasets": ("digits",), "activations": ("relu",),
           "cnn_channels": (4, 8, 8), "epochs": 1, "binary_epochs": 1, "binary_channels": (4, 8), "binary_hidden": 16,
           "seeds": 2},
    quick={"n_inits": 16, "points_iters": 400, "points_lrs": (0.1, 0.3, 1.0), "epochs": 4, "binary_epochs": 5,
           "seeds": 3},
    paper={"datasets": ("cifar10",)},
    paper_gaps=("the CNN is this library's VGG-style CNN (cnn_channels), not VGG-19",
                "the binary network stays the binarized VGG-style CNN on digits"),
)
