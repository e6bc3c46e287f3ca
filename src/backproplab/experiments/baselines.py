"""Baselines: SGD, SGD with momentum, Adam and full-batch GD on digits and MNIST-1D with an MLP and the small CNN.

Every optimizer gets the same number of epochs (the same number of examples processed), so GD takes
one step per epoch. Learning rates are fixed per optimizer (the config's ``*_lr`` keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plots
from ..data import load_dataset
from ..models import build_model
from ..train import TrainConfig, fit, seed_everything
from . import Experiment, ExperimentConfig, check_choices, gap_and_spread, load_runs, prepare_model, register

OPTIMIZERS = ("sgd", "momentum", "adam", "gd")


@dataclass
class BaselinesConfig(ExperimentConfig):
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    models: tuple[str, ...] = ("mlp", "cnn")
    optimizers: tuple[str, ...] = OPTIMIZERS
    epochs: int = 30
    batch_size: int = 64
    sgd_lr: float = 0.05
    momentum_lr: float = 0.05
    momentum: float = 0.9
    adam_lr: float = 1e-3
    gd_lr: float = 0.5
    weight_decay: float = 0.0
    n_train: int = 0  # 0: the whole training set
    eval_every: int = 0
    checkpoint_every: int = 0

    def validate(self) -> None:
        check_choices("optimizers", self.optimizers, OPTIMIZERS)
        check_choices("models", self.models, ("mlp", "cnn"))


def arms(cfg: BaselinesConfig) -> list[str]:
    return [f"{d}-{m}-{o}" for d in cfg.datasets for m in cfg.models for o in cfg.optimizers]


def train_config(cfg: BaselinesConfig, optimizer: str, seed: int) -> TrainConfig:
    lr = getattr(cfg, f"{optimizer}_lr")
    return TrainConfig(optimizer="sgd" if optimizer == "momentum" else optimizer, lr=lr,
                       momentum=cfg.momentum if optimizer == "momentum" else 0.0, weight_decay=cfg.weight_decay,
                       batch_size=cfg.batch_size, epochs=cfg.epochs, eval_every=cfg.eval_every,
                       checkpoint_every=cfg.checkpoint_every, seed=seed, device=cfg.device)


def run_arm(cfg: BaselinesConfig, arm: str, seed: int, run_dir: Path, resume: bool) -> None:
    dataset, model_name, optimizer = arm.split("-")
    data = load_dataset(dataset, n_train=cfg.n_train or None, root=cfg.data_root or None)
    seed_everything(seed)
    model = prepare_model(cfg, build_model(model_name, data.input_shape, data.num_classes))
    fit(model, data, train_config(cfg, optimizer, seed), out_dir=run_dir, resume=resume)


def analyze(exp_dir: Path, cfg: BaselinesConfig) -> list[str]:
    runs = load_runs(exp_dir)
    pairs = [(d, m) for d in cfg.datasets for m in cfg.models]
    for metric, fname in (("test_acc", "test_accuracy.png"), ("train_loss", "train_loss.png")):
        fig, axes = plots.subplots(1, len(pairs))
        for ax, (d, m) in zip(axes[0], pairs):
            plots.curves(ax, {o: runs.get(f"{d}-{m}-{o}", []) for o in cfg.optimizers}, metric,
                         log=metric.endswith("loss"))
            ax.set_title(f"{d} / {m}")
            ax.legend(fontsize=7)
        plots.save(fig, exp_dir / fname)
    verdict = []
    for d, m in pairs:
        finals = {o: np.array([r[-1]["test_acc"] for r in runs.get(f"{d}-{m}-{o}", [])]) for o in cfg.optimizers}
        finals = {o: a for o, a in finals.items() if len(a)}
        if not finals:
            continue
        ranked = sorted(finals, key=lambda o: -finals[o].mean())
        best, worst = ranked[0], ranked[-1]
        text = ", ".join(f"{o} {100 * finals[o].mean():.1f}±{100 * finals[o].std():.1f}%" for o in ranked)
        if len(ranked) > 1:
            second = ranked[1]
            gap, spread = gap_and_spread(finals[best], finals[second])
            clear = "larger" if gap > spread else "not larger"
            text += (f". Best {best} leads {second} by {100 * gap:.1f} points, {clear} than the seeds' spread "
                     f"({100 * spread:.1f}); worst {worst}")
        verdict.append(f"{d}/{m} after {cfg.epochs} epochs: {text}.")
    return verdict


register(Experiment(
    name="baselines",
    description="SGD, SGD+momentum, Adam and full-batch GD on digits and MNIST-1D (MLP and small CNN).",
    config=BaselinesConfig, arms=arms, run_arm=run_arm, analyze=analyze,
    quick={"epochs": 8, "seeds": 2},
))
