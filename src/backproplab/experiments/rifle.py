"""RIFLE (Li et al. 2020) against the transfer-learning regularizers and baselines, offline.

Source task: digits classes 0-4 (all their training images); a ResNet-18 (CIFAR stem, width
``width``) is pretrained once (``_pretrained/model.pt``) and reused by every arm and seed. Target task:
digits classes 5-9 with ``per_class`` labelled training images each (a fixed subset), the held-out
images of those classes as test set. Fine-tuning replaces the head by a new 5-way linear layer (drawn
with the run's seed) and trains everything with SGD+momentum. Every arm carries the L2 term except the
L2-SP ones. Arms: l2, l2_rifle, l2sp, l2sp_rifle, dropout (head input), dropconnect (head weights),
stochastic_depth, disturblabel, cyclic_lr (same period as RIFLE; with reinit alone = l2_rifle this is the
paper's ablation). A monitor records the gradient norm of the deepest layers (the stem and the first
stage) per step, averaged per evaluation, for the 'backpropagation in depth' claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _io, plots
from ..data import Data, load_dataset
from ..methods import rifle
from ..models import build_model
from ..train import TrainConfig, fit, seed_everything
from . import Experiment, ExperimentConfig, check_choices, gap_and_spread, load_runs, prepare_model, register

ARMS = ("l2", "l2_rifle", "l2sp", "l2sp_rifle", "dropout", "dropconnect", "stochastic_depth", "disturblabel",
        "cyclic_lr")
DEEP_LAYERS = ("stem", "layers.0")


@dataclass
class RifleConfig(ExperimentConfig):
    arms: tuple[str, ...] = ARMS
    width: float = 0.125
    pretrain_epochs: int = 15
    per_class: int = 20
    epochs: int = 40
    batch_size: int = 20
    lr: float = 0.01
    times: int = 3  # RIFLE resets (and cyclic-LR restarts)
    l2_alpha: float = 0.01
    l2sp_alpha: float = 0.1
    l2sp_beta: float = 0.01
    dropout: float = 0.5
    dropconnect: float = 0.5
    stochastic_depth: float = 0.5
    disturb_alpha: float = 0.1
    seeds: int = 5

    def validate(self) -> None:
        check_choices("arms", self.arms, ARMS)


def _split(data: Data, classes: range) -> Data:
    def keep(x, y):
        mask = (y >= classes.start) & (y < classes.stop)
        return x[mask], y[mask] - classes.start

    xtr, ytr = keep(data.x_train, data.y_train)
    xte, yte = keep(data.x_test, data.y_test)
    return replace(data, name=f"{data.name}[{classes.start}-{classes.stop - 1}]", x_train=xtr, y_train=ytr,
                   x_test=xte, y_test=yte, num_classes=len(classes))


def target_data(cfg: RifleConfig) -> Data:
    target = _split(load_dataset("digits", root=cfg.data_root or None), range(5, 10))
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(target.y_train == c).flatten()[torch.randperm(int((target.y_train == c).sum()),
                     generator=g)[:cfg.per_class]] for c in range(5)]).sort().values
    return replace(target, x_train=target.x_train[idx], y_train=target.y_train[idx])


def pretrained(cfg: RifleConfig, exp_dir: Path) -> dict:
    """The source model's weights, trained once and cached (atomically) under ``exp_dir/_pretrained``."""
    folder = exp_dir / "_pretrained"
    stamp = {"width": cfg.width, "epochs": cfg.pretrain_epochs}
    if (folder / "model.pt").exists() and (folder / "stamp.json").exists() and \
            json.loads((folder / "stamp.json").read_text()) == stamp:
        return torch.load(folder / "model.pt", weights_only=True)
    source = _split(load_dataset("digits", root=cfg.data_root or None), range(0, 5))
    seed_everything(0)
    model = build_model("resnet18", source.input_shape, 5, width=cfg.width)
    history = fit(model, source, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                                             batch_size=64, epochs=cfg.pretrain_epochs, device=cfg.device))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    _io.torch_save(folder / "model.pt", state)
    _io.write_json(folder / "stamp.json", stamp)
    _io.write_json(folder / "final.json", history[-1])
    return state


class GradNormMonitor:
    """Mean gradient norm of the named layers over the steps since the last evaluation."""

    def __init__(self, layers=DEEP_LAYERS):
        self.layers, self.sums, self.count = layers, {n: 0.0 for n in layers}, 0

    def on_step_end(self, state) -> None:
        # the step has run optimizer.step() but .grad still holds this step's gradient
        for n, v in rifle.layer_grad_norms(state.model, self.layers).items():
            self.sums[n] += v
        self.count += 1

    def on_eval(self, state) -> None:
        for n in self.layers:
            state.history[-1][f"grad_norm_{n}"] = self.sums[n] / max(self.count, 1)
        self.sums, self.count = {n: 0.0 for n in self.layers}, 0


def arms(cfg: RifleConfig) -> list[str]:
    return list(cfg.arms)


def run_arm(cfg: RifleConfig, arm: str, seed: int, run_dir: Path, resume: bool) -> None:
    exp_dir = run_dir.parent.parent
    weights = pretrained(cfg, exp_dir)
    data = target_data(cfg)
    model = build_model("resnet18", data.input_shape, 5, width=cfg.width)
    model.load_state_dict(weights)
    seed_everything(seed)
    model.head = nn.Linear(model.head.in_features, data.num_classes)  # the new head, drawn with the seed
    penalty = (rifle.L2SP(model, "head", cfg.l2sp_alpha, cfg.l2sp_beta) if arm.startswith("l2sp")
               else rifle.L2(cfg.l2_alpha))
    if arm == "dropout":
        rifle.with_head_dropout(model, cfg.dropout)
    elif arm == "dropconnect":
        rifle.with_dropconnect(model, cfg.dropconnect)
    elif arm == "stochastic_depth":
        rifle.with_stochastic_depth(model, cfg.stochastic_depth)
    model = prepare_model(cfg, model)
    callbacks: list = [GradNormMonitor()]
    if arm.endswith("_rifle"):
        callbacks.append(rifle.RIFLE("head", times=cfg.times))
    if arm == "cyclic_lr":
        callbacks.append(rifle.CyclicLR(times=cfg.times))
    step = rifle.penalized_step(penalty, cfg.disturb_alpha if arm == "disturblabel" else 0.0, data.num_classes)
    tc = TrainConfig(optimizer="sgd", lr=cfg.lr, momentum=0.9, batch_size=cfg.batch_size, epochs=cfg.epochs,
                     seed=seed, device=cfg.device)
    fit(model, data, tc, step=step, callbacks=callbacks, out_dir=run_dir, resume=resume)


def analyze(exp_dir: Path, cfg: RifleConfig) -> list[str]:
    runs = load_runs(exp_dir)
    fig, axes = plots.subplots(1, 3)
    show = [a for a in ("l2", "l2_rifle", "cyclic_lr", "l2sp_rifle") if a in runs]
    plots.curves(axes[0][0], {a: runs[a] for a in show}, "test_acc")
    axes[0][0].set_title("target test accuracy (resets visible as dips)")
    plots.curves(axes[0][1], {a: runs[a] for a in show}, "train_loss", log=True)
    axes[0][1].set_title("training loss")
    plots.curves(axes[0][2], {a: runs[a] for a in show}, "grad_norm_stem", log=True)
    axes[0][2].set_title("gradient norm of the stem (deepest layer)")
    for ax in axes[0]:
        ax.legend(fontsize=6)
    plots.save(fig, exp_dir / "rifle_curves.png")
    acc = {a: np.array([r[-1]["test_acc"] for r in runs[a]]) for a in cfg.arms if a in runs}
    fig, axes = plots.subplots(1, 1, size=(7, 3.2))
    names = list(acc)
    axes[0][0].bar(range(len(names)), [100 * acc[a].mean() for a in names],
                   yerr=[100 * acc[a].std() for a in names], capsize=3)
    axes[0][0].set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    axes[0][0].set_ylabel("target test accuracy (%)")
    plots.save(fig, exp_dir / "accuracy_table.png")
    verdict = ["target test accuracy: " + ", ".join(f"{a} {100 * v.mean():.1f}±{100 * v.std():.1f}%"
                                                     for a, v in acc.items()) + "."]
    if "l2" in acc:
        base = acc["l2"]
        for a, v in acc.items():
            if a == "l2":
                continue
            gain, spread = gap_and_spread(v, base)
            verdict.append(f"{a} vs l2: {100 * gain:+.1f} points, {'larger' if abs(gain) > spread else 'not larger'} "
                           f"than the seeds' spread ({100 * spread:.1f}).")
    if "l2_rifle" in acc and "cyclic_lr" in acc:
        verdict.append(f"ablation: re-initialisation alone {100 * acc['l2_rifle'].mean():.1f}% vs cyclic LR alone "
                       f"{100 * acc['cyclic_lr'].mean():.1f}%.")
    if "l2" in runs and "l2_rifle" in runs:
        g = {a: np.mean([np.mean([row["grad_norm_stem"] for row in r]) for r in runs[a]]) for a in ("l2", "l2_rifle")}
        verdict.append(f"backpropagation in depth: mean stem gradient norm with RIFLE {g['l2_rifle']:.3g} vs "
                       f"{g['l2']:.3g} without ({g['l2_rifle'] / max(g['l2'], 1e-12):.2f}x).")
    return verdict


register(Experiment(
    name="rifle",
    description="RIFLE (Li et al. 2020) vs L2, L2-SP, dropout, DropConnect, stochastic depth, DisturbLabel, cyclic LR.",
    config=RifleConfig, arms=arms, run_arm=run_arm, analyze=analyze,
    quick={"pretrain_epochs": 6, "epochs": 16, "seeds": 2},
))
