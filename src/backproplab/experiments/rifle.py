"""RIFLE (Li et al., ICML 2020) against the transfer-learning regularizers and baselines, offline.

Source task: digits classes 0-4 (the training split); a ResNet-18 (CIFAR stem, width ``width``) is
pretrained once (``_pretrained/model.pt``) and reused by every arm and seed. Target task: digits classes
5-9, ``per_class`` labelled training images each, drawn per seed; every other image of those classes is
the target test pool (about 800 images). Fine-tuning replaces the head by a new 5-way linear layer (drawn
with the run's seed: the same for every arm of a seed) and trains everything with SGD+momentum. Every arm
carries the L2 term except the L2-SP ones. Arms: l2, l2_rifle, l2sp, l2sp_rifle, dropout (head input),
dropconnect (head weights), stochastic_depth, disturblabel, cyclic_lr (same period as RIFLE; with reinit
alone = l2_rifle this is the paper's ablation). A monitor records the gradient norm of the deepest layers
(the stem and the first stage) per step, and each run reports how far the stem moved from its pretrained
weights, for the "backpropagation in depth" claim.

Deviations from the paper (the protocol issue of RIFLE reworks them): a constant learning rate and the
config's L2 strength instead of the authors' cosine schedule and 1e-4; digits instead of CUB/Stanford
Cars/ImageNet-pretrained ResNet-50.
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
from ..evidence import Claim
from ..methods import rifle
from ..models import build_model
from ..train import TrainConfig, fit, isolated_rng
from . import Arm, Experiment, ExperimentConfig, Results, Run, check_choices

PAPER = "Li et al., ICML 2020"

ARMS = ("l2", "l2_rifle", "l2sp", "l2sp_rifle", "dropout", "dropconnect", "stochastic_depth", "disturblabel",
        "cyclic_lr")
DEEP_LAYERS = ("stem", "layers.0")


@dataclass
class RifleConfig(ExperimentConfig):
    arms: tuple[str, ...] = ARMS  # fine-tuning arms compared
    width: float = 0.125  # width multiplier of the ResNet
    pretrain_epochs: int = 15  # epochs of the source model
    pretrain_lr: float = 0.05  # source model's learning rate
    pretrain_momentum: float = 0.9  # source model's momentum
    pretrain_weight_decay: float = 5e-4  # source model's weight decay
    pretrain_batch_size: int = 64  # source model's batch size
    pretrain_seed: int = 0  # one source model for every arm and seed
    per_class: int = 20  # target training examples per class
    epochs: int = 40  # fine-tuning epochs
    batch_size: int = 20  # fine-tuning batch size
    lr: float = 0.01  # fine-tuning learning rate
    momentum: float = 0.9  # fine-tuning momentum
    times: int = 3  # RIFLE resets (and cyclic-LR restarts)
    l2_alpha: float = 0.01  # L2 strength of the l2 arm
    l2sp_alpha: float = 0.1  # L2-SP pull towards the pretrained weights
    l2sp_beta: float = 0.01  # L2-SP's L2 on the new head
    dropout: float = 0.5  # dropout probability of the dropout arm
    dropconnect: float = 0.5  # drop probability of the DropConnect arm
    stochastic_depth: float = 0.5  # block drop probability of the stochastic-depth arm
    disturb_alpha: float = 0.1  # DisturbLabel's label-noise rate
    seeds: int = 10

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


def target_data(cfg: RifleConfig, seed: int) -> Data:
    """Classes 5-9: ``per_class`` training images each, drawn by ``seed``; all the others are the test pool."""
    full = load_dataset("digits", seed=seed, root=cfg.data_root or None)
    pooled = replace(full, x_train=torch.cat([full.x_train, full.x_test]),
                     y_train=torch.cat([full.y_train, full.y_test]))
    target = _split(pooled, range(5, 10))
    g = torch.Generator().manual_seed(seed)
    picked = [torch.nonzero(target.y_train == c).flatten() for c in range(5)]
    picked = [idx[torch.randperm(len(idx), generator=g)] for idx in picked]
    train = torch.cat([idx[:cfg.per_class] for idx in picked]).sort().values
    test = torch.cat([idx[cfg.per_class:] for idx in picked]).sort().values
    return replace(target, x_train=target.x_train[train], y_train=target.y_train[train],
                   x_test=target.x_train[test], y_test=target.y_train[test])


def pretrained(cfg: RifleConfig, exp_dir: Path, device: str) -> dict:
    """The source model's weights, trained once (``pretrain_seed``) and cached (atomically) under
    ``exp_dir/_pretrained``."""
    folder = exp_dir / "_pretrained"
    stamp = {"width": cfg.width, "epochs": cfg.pretrain_epochs, "lr": cfg.pretrain_lr, "seed": cfg.pretrain_seed,
             "momentum": cfg.pretrain_momentum, "weight_decay": cfg.pretrain_weight_decay,
             "batch_size": cfg.pretrain_batch_size}
    if (folder / "model.pt").exists() and (folder / "stamp.json").exists() and \
            json.loads((folder / "stamp.json").read_text()) == stamp:
        return torch.load(folder / "model.pt", weights_only=True)
    source = _split(load_dataset("digits", root=cfg.data_root or None), range(0, 5))
    with isolated_rng(cfg.pretrain_seed):  # the same weights whichever run trains them; the run's stream untouched
        model = build_model("resnet18", source.input_shape, 5, width=cfg.width)
        history = fit(model, source, TrainConfig(optimizer="sgd", lr=cfg.pretrain_lr, momentum=cfg.pretrain_momentum,
                                                 weight_decay=cfg.pretrain_weight_decay,
                                                 batch_size=cfg.pretrain_batch_size, epochs=cfg.pretrain_epochs,
                                                 device=device))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    _io.torch_save(folder / "model.pt", state)
    _io.write_json(folder / "stamp.json", stamp)
    _io.write_json(folder / "pretrain_metrics.json", history[-1])
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


@dataclass(frozen=True)
class RifleArm(Arm):
    method: str


def arms(cfg: RifleConfig) -> list[RifleArm]:
    return [RifleArm(a) for a in cfg.arms]


def claims(cfg: RifleConfig) -> list[Claim]:
    acc = "target test accuracy (fraction of the target pool)"
    have = set(cfg.arms)
    out = []
    for arm, base, where, text in (
            ("l2_rifle", "l2", "Tables 2-4", "RIFLE added to L2 fine-tuning raises target accuracy."),
            ("l2sp_rifle", "l2sp", "Tables 2-4", "RIFLE added to L2-SP fine-tuning raises target accuracy."),
            ("l2_rifle", "dropout", "Table 5", "RIFLE beats dropout on the head's input."),
            ("l2_rifle", "dropconnect", "Table 5", "RIFLE beats DropConnect on the head."),
            ("l2_rifle", "stochastic_depth", "Table 5", "RIFLE beats stochastic depth."),
            ("l2_rifle", "disturblabel", "Table 5", "RIFLE beats DisturbLabel."),
            ("l2_rifle", "cyclic_lr", "Section 4.4 (ablation)",
             "Re-initialising the head, not the learning-rate restarts alone, brings the gain: RIFLE beats "
             "cyclic LR.")):
        if {arm, base} <= have:
            out.append(Claim(f"rifle.{arm}_vs_{base}", PAPER, where, text, "test_acc", arm, "greater", 0.0,
                             "gains of 0.5-2 points over the same fine-tuning without RIFLE (CUB, Cars, Flowers, ...)",
                             baseline=base, metric_label=acc))
    if {"l2", "l2_rifle"} <= have:
        out.append(Claim("rifle.deeper_updates", PAPER, "Section 3 / Fig. 2 (backpropagation in depth)",
                         "Re-initialising the head pushes larger updates into the deepest layers: the stem moves "
                         "further from its pretrained weights.", "stem_update_norm", "l2_rifle", "greater", 0.0,
                         "larger weight changes and gradients in the lower layers with RIFLE", baseline="l2",
                         metric_label="l2 distance of the stem's weights from the pretrained ones"))
    return out


def run_arm(run: Run) -> dict:
    cfg, method = run.cfg, run.arm.method
    weights = pretrained(cfg, run.exp_dir, run.device)
    data = target_data(cfg, run.seed)
    model = build_model("resnet18", data.input_shape, 5, width=cfg.width)
    model.load_state_dict(weights)
    model.head = nn.Linear(model.head.in_features, data.num_classes)  # the new head, drawn with the seed
    stem_before = [p.detach().clone() for p in model.stem.parameters()]
    penalty = (rifle.L2SP(model, "head", cfg.l2sp_alpha, cfg.l2sp_beta) if method.startswith("l2sp")
               else rifle.L2(cfg.l2_alpha))
    if method == "dropout":
        rifle.with_head_dropout(model, cfg.dropout)
    elif method == "dropconnect":
        rifle.with_dropconnect(model, cfg.dropconnect)
    elif method == "stochastic_depth":
        rifle.with_stochastic_depth(model, cfg.stochastic_depth)
    model = run.prepare_model(model)
    callbacks: list = [GradNormMonitor()]
    if method.endswith("_rifle"):
        callbacks.append(rifle.RIFLE("head", times=cfg.times))
    if method == "cyclic_lr":
        callbacks.append(rifle.CyclicLR(times=cfg.times))
    step = rifle.penalized_step(penalty, cfg.disturb_alpha if method == "disturblabel" else 0.0, data.num_classes)
    tc = run.train_config(optimizer="sgd", lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size,
                          epochs=cfg.epochs)
    history = run.fit(model, data, tc, step=step, callbacks=callbacks)
    moved = sum(float((p.detach().cpu() - p0.cpu()).pow(2).sum())
                for p, p0 in zip(model.stem.parameters(), stem_before))
    return {**history[-1], "stem_update_norm": moved ** 0.5,
            "grad_norm_stem_mean": float(np.mean([row["grad_norm_stem"] for row in history]))}


def analyze(res: Results) -> list[str]:
    cfg = res.cfg
    runs = res.all_runs()
    fig, axes = plots.subplots(1, 3)
    show = {a: runs[a] for a in ("l2", "l2_rifle", "cyclic_lr", "l2sp_rifle") if a in runs}
    plots.curves(axes[0][0], show, "test_acc")
    axes[0][0].set_title("target test accuracy (resets visible as dips)")
    plots.curves(axes[0][1], show, "train_loss")
    axes[0][1].set_title("training loss")
    plots.curves(axes[0][2], show, "grad_norm_stem", log=True)
    axes[0][2].set_title("gradient norm of the stem (deepest layer)")
    plots.save(fig, res.exp_dir / "rifle_curves.png")
    acc = {a: np.array([r[-1]["test_acc"] for r in runs[a]]) for a in cfg.arms if a in runs}
    fig, axes = plots.subplots(1, 1, size=(7, 3.4))
    names = list(acc)
    half = [100 * (np.std(acc[a], ddof=1) / np.sqrt(len(acc[a])) * 1.96 if len(acc[a]) > 1 else 0) for a in names]
    axes[0][0].bar(range(len(names)), [100 * acc[a].mean() for a in names], yerr=half, capsize=3,
                   label="mean over seeds, ±1.96 standard errors")
    axes[0][0].set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    axes[0][0].set(ylabel="target test accuracy (%)", xlabel="arm", title="final target accuracy")
    axes[0][0].legend(fontsize=7)
    plots.save(fig, res.exp_dir / "accuracy_table.png")
    return ["target test accuracy, mean over seeds: " + ", ".join(f"{a} {100 * v.mean():.1f}%" for a, v in acc.items())
            + f" ({len(next(iter(acc.values()), []))} seeds, about {_pool_size(res)} test images)."] if acc else []


def _pool_size(res: Results) -> int:
    return len(target_data(res.cfg, 0).y_test)


EXPERIMENT = Experiment(
    name="rifle",
    description="RIFLE (Li et al. 2020) vs L2, L2-SP, dropout, DropConnect, stochastic depth, DisturbLabel, cyclic LR.",
    config=RifleConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"arms": ("l2", "l2_rifle"), "width": 0.0625, "pretrain_epochs": 1, "per_class": 5, "epochs": 3, "times": 1,
           "seeds": 2},
    quick={"pretrain_epochs": 6, "epochs": 16, "seeds": 3},
)
