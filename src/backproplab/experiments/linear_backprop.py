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
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import _io, plots
from ..data import load_dataset
from ..methods.linear_backprop import linear_backprop
from ..models import build_model
from ..train import TrainConfig, fit, seed_everything
from . import Experiment, ExperimentConfig, gap_and_spread, load_runs, register

METHODS = {"bp": "backprop", "lbp": "linear backprop"}


@dataclass
class LinearBackpropConfig(ExperimentConfig):
    n_inits: int = 50  # initialisations per seed in the 5-point experiment
    points_iters: int = 2000
    points_lr: float = 0.05
    points_widths: tuple[int, ...] = (32, 32, 32)
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    activations: tuple[str, ...] = ("relu", "sigmoid")
    cnn_channels: tuple[int, ...] = (32, 64, 128)
    epochs: int = 15
    lr: float = 1e-3  # Adam
    batch_size: int = 64
    binary_epochs: int = 15
    binary_lr: float = 1e-3
    binary_widths: tuple[int, ...] = (256, 256)


def arms(cfg: LinearBackpropConfig) -> list[str]:
    out = [f"points-{m}" for m in METHODS]
    out += [f"{d}-{a}-{m}" for d in cfg.datasets for a in cfg.activations for m in METHODS]
    return out + [f"binary-{m}" for m in METHODS]


def _five_points(cfg: LinearBackpropConfig, method: str, seed: int, run_dir: Path) -> None:
    curves, hidden = [], []
    for i in range(cfg.n_inits):
        g = torch.Generator().manual_seed(10_000 * seed + i)
        x, y = torch.randn(5, 10, generator=g), torch.randn(5, 1, generator=g)
        seed_everything(10_000 * seed + i)
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
             "saturated_fraction": float(np.mean((acts < 0.05) | (acts > 0.95))), "n_inits": cfg.n_inits, "diverged": diverged}
    _io.write_jsonl(run_dir / "metrics.jsonl", rows)
    buf = io.BytesIO()
    np.save(buf, acts.astype(np.float32))
    _io.write_bytes(run_dir / "hidden_activations.npy", buf.getvalue())
    _io.write_json(run_dir / "final.json", final)


def run_arm(cfg: LinearBackpropConfig, arm: str, seed: int, run_dir: Path, resume: bool) -> None:
    parts = arm.split("-")
    method = parts[-1]
    if parts[0] == "points":
        return _five_points(cfg, method, seed, run_dir)
    root = cfg.data_root or None
    seed_everything(seed)
    if parts[0] == "binary":
        data = load_dataset("digits", root=root)
        model = build_model("mlp", data.input_shape, data.num_classes, widths=cfg.binary_widths, activation="sign")
        tc = TrainConfig(optimizer="adam", lr=cfg.binary_lr, batch_size=cfg.batch_size, epochs=cfg.binary_epochs,
                         seed=seed, device=cfg.device)
    else:
        dataset, act = parts[0], parts[1]
        data = load_dataset(dataset, root=root)
        model = build_model("cnn", data.input_shape, data.num_classes, channels=cfg.cnn_channels, activation=act)
        tc = TrainConfig(optimizer="adam", lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=seed,
                         device=cfg.device)
    if method == "lbp":
        linear_backprop(model)
    fit(model, data, tc, out_dir=run_dir, resume=resume)


def _finals(runs, arm, key):
    return np.array([r[-1][key] for r in runs.get(arm, [])])


def analyze(exp_dir: Path, cfg: LinearBackpropConfig) -> list[str]:
    runs = load_runs(exp_dir)
    verdict = []
    # 1. five points
    fig, axes = plots.subplots(1, 2)
    finals = {}
    for m, label in METHODS.items():
        arm_runs = runs.get(f"points-{m}", [])
        if not arm_runs:
            continue
        r = arm_runs[0]
        xs = [row["step"] for row in r]
        (line,) = axes[0][0].plot(xs, [row["train_loss"] for row in r], label=f"{label} (median)")
        axes[0][0].fill_between(xs, [row["train_loss_q25"] for row in r], [row["train_loss_q75"] for row in r],
                                color=line.get_color(), alpha=0.2)
        acts = np.concatenate([np.load(p) for p in sorted((exp_dir / f"points-{m}").glob("seed*/hidden_activations.npy"))])
        axes[0][1].hist(acts, bins=50, range=(0, 1), alpha=0.5, density=True, label=label)
        finals[m] = [(json_final["train_loss"], json_final["saturated_fraction"], json_final["diverged"])
                     for json_final in (json.loads(p.read_text()) for p in sorted((exp_dir / f"points-{m}").glob("seed*/final.json")))]
    axes[0][0].set_yscale("log")
    axes[0][0].set(xlabel="iteration", ylabel="MSE", title="5 random points, sigmoid MLP (seed 0)")
    axes[0][1].set(xlabel="hidden activation after training", ylabel="density", title="saturation")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    plots.save(fig, exp_dir / "five_points.png")
    if len(finals) == 2:
        bp, lbp = (np.array(finals[m]) for m in ("bp", "lbp"))
        better = "lower" if np.median(lbp[:, 0]) < np.median(bp[:, 0]) else "higher"
        verdict.append(
            f"5 points, {cfg.n_inits} inits x {len(bp)} seeds, {cfg.points_iters} iterations: median final MSE "
            f"backprop {np.median(bp[:, 0]):.3g}, linear backprop {np.median(lbp[:, 0]):.3g} ({better} with linear "
            f"backprop); saturated hidden units (<0.05 or >0.95) {100 * bp[:, 1].mean():.0f}% vs "
            f"{100 * lbp[:, 1].mean():.0f}%; diverged inits {int(bp[:, 2].sum())} vs {int(lbp[:, 2].sum())}.")
    # 2. VGG and 3. binary
    groups = [(f"{d}-{a}", f"{d} / VGG-style CNN {a}") for d in cfg.datasets for a in cfg.activations]
    groups.append(("binary", "digits / binary MLP (sign)"))
    fig, axes = plots.subplots(1, len(groups))
    for ax, (prefix, title) in zip(axes[0], groups):
        plots.curves(ax, {label: runs.get(f"{prefix}-{m}", []) for m, label in METHODS.items()}, "test_acc")
        ax.set_title(title)
        ax.legend(fontsize=7)
        bp, lbp = _finals(runs, f"{prefix}-bp", "test_acc"), _finals(runs, f"{prefix}-lbp", "test_acc")
        if len(bp) and len(lbp):
            gap, spread = gap_and_spread(lbp, bp)
            judged = ("matches" if abs(gap) <= spread else "beats" if gap > 0 else "falls behind")
            line = (f"{title}: linear backprop {100 * lbp.mean():.1f}±{100 * lbp.std():.1f}% vs backprop "
                    f"{100 * bp.mean():.1f}±{100 * bp.std():.1f}% test accuracy: ")
            if max(lbp.mean(), bp.mean()) < 0.2:
                line += "neither arm learned (chance is 10%), so no comparison."
            else:
                line += (f"linear backprop {judged} backprop (gap {100 * gap:+.1f} points, seeds' spread "
                         f"{100 * spread:.1f}).")
            verdict.append(line)
    plots.save(fig, exp_dir / "test_accuracy.png")
    return verdict


register(Experiment(
    name="linear_backprop",
    description="Linear backprop (Yazdani 2018) vs backprop: 5-point sigmoid MLP, VGG-style CNN ReLU/sigmoid, binary MLP.",
    config=LinearBackpropConfig, arms=arms, run_arm=run_arm, analyze=analyze,
    quick={"n_inits": 16, "points_iters": 400, "epochs": 4, "binary_epochs": 5, "seeds": 2},
))
