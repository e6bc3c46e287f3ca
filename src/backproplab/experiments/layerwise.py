"""Greedy layerwise learning (Belilovsky et al. 2019) against end-to-end training, offline.

Datasets: digits (2-D, 8x8), MNIST-1D (1-D convolutions on the length-40 signal; no reshaping) and
CIFAR-10 when its files are present (``datasets=auto``). Architecture: ``LayerwiseCNN`` with ``widths``
and invertible downsampling before blocks ``downsample`` (8x8 -> 4x4 -> 2x2; 40 -> 20 -> 10).
Arms: ``greedy_k{k}`` for k in ``ks`` (each block ``epochs_per_block`` epochs, SGD momentum 0.9, weight
decay 5e-4, lr x0.2 every ``decay_every`` epochs, cached frozen prefix) and ``e2e_k{k}`` for k in
``e2e_ks``: the same network (trunk + aux classifier k) trained end to end for the same total number of
epochs (blocks x epochs_per_block). For every arm, each depth's features are probed for linear
separability (a linear layer on 2x2-averaged features); greedy arms also retrain a narrower final
classifier (``small_width``) for the size-reduction figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from .. import _io, plots
from ..data import DataNotFoundError, load_dataset
from ..methods.layerwise import GreedyLayerwiseTrainer, LayerwiseCNN, parameter_count, probe, \
    retrain_smaller_classifier
from ..train import StepDecay, TrainConfig, cross_entropy, evaluate, fit, seed_everything
from . import Experiment, ExperimentConfig, gap_and_spread, load_runs, register


@dataclass
class LayerwiseConfig(ExperimentConfig):
    datasets: tuple[str, ...] = ("auto",)  # auto: digits, mnist1d, and cifar10 if its files are present
    ks: tuple[int, ...] = (1, 2, 3)
    e2e_ks: tuple[int, ...] = (3,)
    widths: tuple[int, ...] = (32, 64, 64, 128)
    downsample: tuple[int, ...] = (1, 3)
    epochs_per_block: int = 10
    decay_every: int = 5
    lr: float = 0.05
    batch_size: int = 64
    probe_epochs: int = 5
    small_width: int = 16


def _datasets(cfg: LayerwiseConfig) -> list[str]:
    if tuple(cfg.datasets) != ("auto",):
        return list(cfg.datasets)
    out = ["digits", "mnist1d"]
    try:
        load_dataset("cifar10", root=cfg.data_root or None)
        out.append("cifar10")
    except DataNotFoundError:
        pass
    return out


def arms(cfg: LayerwiseConfig) -> list[str]:
    return [f"{d}-{kind}_k{k}" for d in _datasets(cfg)
            for kind, ks in (("greedy", cfg.ks), ("e2e", cfg.e2e_ks)) for k in ks]


def _train_config(cfg: LayerwiseConfig, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(optimizer="sgd", lr=cfg.lr, momentum=0.9, weight_decay=5e-4, batch_size=cfg.batch_size,
                       epochs=epochs, seed=seed, device=cfg.device)


def run_arm(cfg: LayerwiseConfig, arm: str, seed: int, run_dir: Path, resume: bool) -> None:
    dataset, kind_k = arm.split("-")
    kind, k = kind_k.split("_k")
    k = int(k)
    data = load_dataset(dataset, root=cfg.data_root or None).to(cfg.device)
    seed_everything(seed)
    model = LayerwiseCNN(data.input_shape, data.num_classes, cfg.widths, cfg.downsample, k=k).to(cfg.device)
    decay = [StepDecay(cfg.decay_every, 0.2)]
    rows = []
    if kind == "greedy":
        trainer = GreedyLayerwiseTrainer(model, _train_config(cfg, cfg.epochs_per_block, seed), callbacks=decay)
        rows = trainer.train(data, out_dir=run_dir, resume=resume)
    else:
        epochs = cfg.epochs_per_block * len(cfg.widths)
        fit(model, data, _train_config(cfg, epochs, seed), callbacks=decay, out_dir=run_dir / "e2e", resume=resume)
        rows = [{"depth": j + 1} for j in range(len(cfg.widths))]
        rows[-1].update(evaluate(model, data.x_test, data.y_test, cross_entropy))
        rows[-1]["test_acc"] = rows[-1].pop("acc")
        rows[-1]["test_loss"] = rows[-1].pop("loss")
    probe_cfg = TrainConfig(optimizer="adam", lr=1e-3, epochs=cfg.probe_epochs, batch_size=cfg.batch_size,
                            seed=seed, device=cfg.device)
    for row in rows:
        row["linear_separability"] = probe(model, row["depth"], data, probe_cfg)
        row["step"] = row["epoch"] = row["depth"]
    final = dict(rows[-1])
    final["params"] = parameter_count(model)
    if kind == "greedy":
        small_acc, small_params = retrain_smaller_classifier(model, data, _train_config(cfg, cfg.epochs_per_block,
                                                                                         seed), cfg.small_width)
        final.update({"small_classifier_acc": small_acc, "small_classifier_params": small_params,
                      "classifier_params": parameter_count(model.aux[-1])})
    _io.write_jsonl(run_dir / "metrics.jsonl", rows)
    _io.write_json(run_dir / "final.json", final)


def analyze(exp_dir: Path, cfg: LayerwiseConfig) -> list[str]:
    runs = load_runs(exp_dir)
    datasets = _datasets(cfg)
    fig, axes = plots.subplots(2, len(datasets))
    verdict = []
    for col, d in enumerate(datasets):
        greedy = {f"greedy k={k}": runs.get(f"{d}-greedy_k{k}", []) for k in cfg.ks}
        e2e = {f"end-to-end k={k}": runs.get(f"{d}-e2e_k{k}", []) for k in cfg.e2e_ks}
        plots.curves(axes[0][col], greedy, "test_acc", x="depth")
        axes[0][col].set_title(f"{d}: test accuracy after each block")
        for label, rs in e2e.items():
            if rs:
                acc = np.array([r[-1]["test_acc"] for r in rs])
                axes[0][col].axhline(acc.mean(), ls="--", color="k", lw=1, label=f"{label} (final)")
        plots.curves(axes[1][col], {**greedy, **e2e}, "linear_separability", x="depth")
        axes[1][col].set_title(f"{d}: linear separability by depth")
        for ax in (axes[0][col], axes[1][col]):
            ax.legend(fontsize=6)
        finals = {label: np.array([r[-1]["test_acc"] for r in rs]) for label, rs in {**greedy, **e2e}.items() if rs}
        if finals:
            verdict.append(f"{d}: final test accuracy " + ", ".join(
                f"{label} {100 * a.mean():.1f}±{100 * a.std():.1f}%" for label, a in finals.items()) + ".")
        k_top = max(cfg.ks)
        g, e = finals.get(f"greedy k={k_top}"), finals.get(f"end-to-end k={k_top}")
        if g is not None and e is not None:
            gap, spread = gap_and_spread(g, e)
            verdict.append(f"{d}: greedy k={k_top} is {'within' if abs(gap) <= spread else 'outside'} the seeds' "
                           f"spread of end-to-end ({100 * gap:+.1f} points, spread {100 * spread:.1f}).")
        for label, rs in greedy.items():
            if rs:
                sep = np.array([[row["linear_separability"] for row in r] for r in rs]).mean(0)
                grows = bool(np.all(np.diff(sep) >= -0.005))
                verdict.append(f"{d}, {label}: linear separability by depth "
                               f"{', '.join(f'{100 * s:.1f}%' for s in sep)} — "
                               f"{'grows' if grows else 'does not grow monotonically'} with depth.")
        for label, rs in greedy.items():
            if rs and "small_classifier_acc" in _final(exp_dir, d, label):
                f = _final(exp_dir, d, label)
                verdict.append(f"{d}, {label}: size reduction — classifier {f['classifier_params']} -> "
                               f"{f['small_classifier_params']} parameters, accuracy {100 * f['test_acc']:.1f}% -> "
                               f"{100 * f['small_classifier_acc']:.1f}% (seed 0).")
    plots.save(fig, exp_dir / "layerwise.png")
    return verdict


def _final(exp_dir: Path, dataset: str, label: str) -> dict:
    k = label.split("=")[1]
    path = exp_dir / f"{dataset}-greedy_k{k}" / "seed0" / "final.json"
    return json.loads(path.read_text()) if path.exists() else {}


register(Experiment(
    name="layerwise",
    description="Greedy layerwise learning (Belilovsky et al. 2019), k=1,2,3, vs end-to-end; separability by depth.",
    config=LayerwiseConfig, arms=arms, run_arm=run_arm, analyze=analyze,
    quick={"epochs_per_block": 3, "decay_every": 2, "probe_epochs": 3, "seeds": 2},
    table_metrics=("test_acc", "linear_separability", "small_classifier_acc", "params"),
))
