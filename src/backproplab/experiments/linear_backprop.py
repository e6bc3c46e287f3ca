"""Linear Backprop (Yazdani 2018): backprop vs linear backprop on the paper's three settings.

1. ``points-*``: the paper's Figure 1 setting: a sigmoid MLP (``points_widths``) overfitting 5 random
   points (inputs N(0, I_10), targets N(0, 1)) by full-batch SGD, over ``n_inits`` random
   initialisations per seed: median and inter-quartile band of the MSE per iteration, and the
   histogram of hidden activations after training (saturation).
2. ``<dataset>-<activation>-*``: a VGG-style CNN without BatchNorm (3x3 convolution + max-pool stages,
   ``cnn_channels``, then a hidden linear layer) on digits and MNIST-1D, ReLU and sigmoid, Adam.
   (Plain VGG-11 did not train at all in the quick budget on 8x8 digits, with either method.)
3. ``binary-*``: an MLP with sign activations on digits; the sign's derivative is the clipped
   straight-through estimator in the backprop arm and 1 in the linear-backprop arm.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import _io, plots
from ..evidence import Claim
from ..methods.linear_backprop import linear_backprop
from ..models import build_model
from . import Arm, Experiment, ExperimentConfig, Results, Run

METHODS = {"bp": "backprop", "lbp": "linear backprop"}
PAPER = "Yazdani, NeurIPS 2018 workshop (Linear Backprop in non-linear networks)"
EQUIVALENCE_MARGIN = 0.01  # 1 point of test accuracy


@dataclass
class LinearBackpropConfig(ExperimentConfig):
    n_inits: int = 50  # initialisations per seed in the 5-point experiment
    points_iters: int = 2000  # iterations of the 5-point fit
    points_lr: float = 0.05  # learning rate of the 5-point fit
    points_widths: tuple[int, ...] = (32, 32, 32)  # hidden widths of the 5-point MLP
    datasets: tuple[str, ...] = ("digits", "mnist1d")  # datasets of the MLP/CNN comparison
    activations: tuple[str, ...] = ("relu", "sigmoid")  # activations compared
    cnn_channels: tuple[int, ...] = (32, 64, 128)  # channels of the CNN's conv layers
    epochs: int = 15  # training epochs (MLP/CNN)
    lr: float = 1e-3  # Adam
    batch_size: int = 64  # mini-batch size
    binary_epochs: int = 15  # epochs of the binary networks
    binary_lr: float = 1e-3  # learning rate of the binary networks
    binary_widths: tuple[int, ...] = (256, 256)  # hidden widths of the binary MLP
@dataclass(frozen=True)
class LBPArm(Arm):
    setting: str  # "points", "binary" or "<dataset>-<activation>"
    method: str  # "bp" | "lbp"


def arms(cfg: LinearBackpropConfig) -> list[LBPArm]:
    settings = ["points", *(f"{d}-{a}" for d in cfg.datasets for a in cfg.activations), "binary"]
    return [LBPArm(s, m) for s in settings for m in METHODS]


def claims(cfg: LinearBackpropConfig) -> list[Claim]:
    out = [Claim("linear_backprop.fig1.five_points", PAPER, "Fig. 1",
                 "Overfitting 5 random points with a sigmoid MLP, linear backprop reaches a lower training error than "
                 "backprop in the same number of iterations.", "train_loss", LBPArm("points", "lbp").name, "less",
                 0.0, "5 points, sigmoid MLP: linear backprop's MSE falls orders of magnitude faster",
                 baseline=LBPArm("points", "bp").name,
                 metric_label="median final MSE over the initialisations of a seed")]
    for d in cfg.datasets:
        for a in cfg.activations:
            setting = f"{d}-{a}"
            if a == "relu":
                out.append(Claim(
                    f"linear_backprop.fig2.{setting}", PAPER, "Fig. 2 (VGG on CIFAR-10)",
                    "On a VGG-style ReLU network, linear backprop reaches a test accuracy comparable to backprop's.",
                    "test_acc", LBPArm(setting, "lbp").name, "equivalent", EQUIVALENCE_MARGIN,
                    "VGG-19 on CIFAR-10: linear backprop's test accuracy matches backprop's",
                    baseline=LBPArm(setting, "bp").name, metric_label="final test accuracy (fraction)"))
            else:
                out.append(Claim(
                    f"linear_backprop.sec3.{setting}", PAPER, "Section 3 (saturating activations)",
                    "With sigmoid activations, linear backprop trains where backprop's gradients vanish: higher "
                    "test accuracy.", "test_acc", LBPArm(setting, "lbp").name, "greater", 0.0,
                    "sigmoid networks: backprop stalls in saturation, linear backprop keeps learning",
                    baseline=LBPArm(setting, "bp").name, metric_label="final test accuracy (fraction)"))
    out.append(Claim("linear_backprop.sec4.binary", PAPER, "Section 4 (binary networks)",
                     "For networks with sign activations, linear backprop (derivative 1) trains as well as the "
                     "straight-through estimator.", "test_acc", LBPArm("binary", "lbp").name, "equivalent",
                     EQUIVALENCE_MARGIN, "binary networks: comparable accuracy to the straight-through estimator",
                     baseline=LBPArm("binary", "bp").name, metric_label="final test accuracy (fraction)"))
    return out


def _five_points(cfg: LinearBackpropConfig, method: str, seed: int, run_dir: Path) -> dict:
    curves, hidden = [], []
    for i in range(cfg.n_inits):
        g = torch.Generator().manual_seed(10_000 * seed + i)
        x, y = torch.randn(5, 10, generator=g), torch.randn(5, 1, generator=g)
        model = build_model("mlp", (10,), 1, widths=cfg.points_widths, activation="sigmoid")
        if method == "lbp":
            linear_backprop(model)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.points_lr)
        losses = []
        for _ in range(cfg.points_iters):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if not np.isfinite(losses[-1]):  # diverged: counted, not plotted
                losses += [float("nan")] * (cfg.points_iters - len(losses))
                break
        curves.append(losses)
        with torch.no_grad():
            h = x
            for layer in model.body:
                h = layer(h)
                if not isinstance(layer, (torch.nn.Linear, torch.nn.Flatten)):
                    hidden.append(h.flatten())
    c = np.array(curves)
    diverged = int(np.isnan(c[:, -1]).sum())
    q25, med, q75 = np.nanpercentile(c, [25, 50, 75], axis=0)
    every = max(1, cfg.points_iters // 200)
    rows = [{"step": t + 1, "epoch": t + 1, "train_loss": float(med[t]), "train_loss_q25": float(q25[t]),
             "train_loss_q75": float(q75[t])} for t in range(0, cfg.points_iters, every)]
    acts = torch.cat(hidden).numpy()
    final = {**rows[-1], "step": cfg.points_iters, "train_loss": float(med[-1]),
             "saturated_fraction": float(np.mean((acts < 0.05) | (acts > 0.95))), "n_inits": cfg.n_inits,
             "diverged": diverged}
    _io.write_jsonl(run_dir / "metrics.jsonl", rows)
    buf = io.BytesIO()
    np.save(buf, acts.astype(np.float32))
    _io.write_bytes(run_dir / "hidden_activations.npy", buf.getvalue())
    return final


def run_arm(run: Run) -> dict:
    cfg, arm = run.cfg, run.arm
    if arm.setting == "points":
        return _five_points(cfg, arm.method, run.seed, run.dir)
    if arm.setting == "binary":
        data = run.data("digits")
        model = build_model("mlp", data.input_shape, data.num_classes, widths=cfg.binary_widths, activation="sign")
        tc = run.train_config(optimizer="adam", lr=cfg.binary_lr, batch_size=cfg.batch_size, epochs=cfg.binary_epochs)
    else:
        dataset, act = arm.setting.split("-")
        data = run.data(dataset)
        model = build_model("cnn", data.input_shape, data.num_classes, channels=cfg.cnn_channels, activation=act)
        tc = run.train_config(optimizer="adam", lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs)
    if arm.method == "lbp":
        linear_backprop(model)
    return run.fit(model, data, tc)[-1]


def analyze(res: Results) -> list[str]:
    cfg, exp_dir = res.cfg, res.exp_dir
    notes = []
    fig, axes = plots.subplots(1, 2)  # 1. five points
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
        finals[m] = [(f["train_loss"], f["saturated_fraction"], f["diverged"]) for f in res.final_list(arm)]
    axes[0][0].set_yscale("log")
    axes[0][0].set(xlabel="iteration (full-batch steps)", ylabel="training MSE",
                   title=f"5 random points, sigmoid MLP (seed 0, {cfg.n_inits} inits)")
    axes[0][1].set(xlabel="hidden activation after training (sigmoid output)", ylabel="density",
                   title="saturation")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    plots.save(fig, exp_dir / "five_points.png")
    if len(finals) == 2:
        bp, lbp = (np.array(finals[m]) for m in ("bp", "lbp"))
        notes.append(
            f"5 points, {cfg.n_inits} inits x {len(bp)} seeds, {cfg.points_iters} iterations: median final MSE "
            f"backprop {np.median(bp[:, 0]):.3g}, linear backprop {np.median(lbp[:, 0]):.3g}; saturated hidden units "
            f"(<0.05 or >0.95) {100 * bp[:, 1].mean():.0f}% vs {100 * lbp[:, 1].mean():.0f}%; diverged inits "
            f"{int(bp[:, 2].sum())} vs {int(lbp[:, 2].sum())}.")
    groups = [(f"{d}-{a}", f"{d} / VGG-style CNN {a}") for d in cfg.datasets for a in cfg.activations]
    groups.append(("binary", "digits / binary MLP (sign)"))
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
                "binary MLP.",
    config=LinearBackpropConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"n_inits": 3, "points_iters": 40, "datasets": ("digits",), "activations": ("relu",),
           "cnn_channels": (4, 8, 8), "epochs": 1, "binary_epochs": 1, "binary_widths": (32, 32), "seeds": 2},
    quick={"n_inits": 16, "points_iters": 400, "epochs": 4, "binary_epochs": 5, "seeds": 3},
)
