"""MSGD (Wu et al. 2020): does multiplicative noise generalize like SGD? At laptop scale.

n = ``n_train`` training examples (Fashion-MNIST when its files are present under the data root,
otherwise digits and MNIST-1D), the small CNN (``cnn_channels``), a fixed learning rate, no weight decay, no augmentation,
a budget of ``steps`` updates for every method. Arms:
  gd, gld_dynamic (noise trace matched to SGD's, re-estimated every ``gld_every`` steps), gld_const
  (sigma = ``gld_sigma``), sgd (batch b), msgd_cov, msgd_fisher, msgd_bernoulli, msgd_fisher_b
  (Gaussian weights on ``b`` random examples) — all matched to SGD with batch b — and for the
  large-batch figure: large_sgd (batch B = ``large_factor`` x b, capped at n) and large_weighted (the
  same batch with N(1, B/b - 1) loss weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plots
from ..data import DataNotFoundError, load_dataset
from ..methods import msgd
from ..models import build_model
from ..train import TrainConfig, fit, seed_everything
from . import Experiment, ExperimentConfig, check_choices, gap_and_spread, load_runs, prepare_model, register

SMALL = ("gd", "gld_dynamic", "gld_const", "sgd", "msgd_cov", "msgd_fisher", "msgd_bernoulli", "msgd_fisher_b")
LARGE = ("large_sgd", "large_weighted")


@dataclass
class MSGDConfig(ExperimentConfig):
    datasets: tuple[str, ...] = ("auto",)  # auto: fashion_mnist if present, else digits and mnist1d
    methods: tuple[str, ...] = SMALL + LARGE
    n_train: int = 1000
    batch_size: int = 50
    large_factor: int = 20
    cnn_channels: tuple[int, ...] = (16, 32)
    lr: float = 0.05
    steps: int = 3000
    evals: int = 20
    gld_sigma: float = 0.01
    gld_every: int = 50
    seeds: int = 5

    def validate(self) -> None:
        check_choices("methods", self.methods, SMALL + LARGE)


def _datasets(cfg: MSGDConfig) -> list[str]:
    if tuple(cfg.datasets) != ("auto",):
        return list(cfg.datasets)
    try:
        load_dataset("fashion_mnist", root=cfg.data_root or None)
        return ["fashion_mnist"]
    except DataNotFoundError:
        return ["digits", "mnist1d"]


def arms(cfg: MSGDConfig) -> list[str]:
    return [f"{d}-{m}" for d in _datasets(cfg) for m in cfg.methods]


def run_arm(cfg: MSGDConfig, arm: str, seed: int, run_dir: Path, resume: bool) -> None:
    dataset, method = arm.split("-")
    data = load_dataset(dataset, n_train=cfg.n_train, root=cfg.data_root or None)
    n, b = len(data.x_train), cfg.batch_size
    big = min(cfg.large_factor * b, n)
    seed_everything(seed)
    model = prepare_model(cfg, build_model("cnn", data.input_shape, data.num_classes,
                                                  channels=cfg.cnn_channels))
    tc = TrainConfig(optimizer="gd", lr=cfg.lr, max_steps=cfg.steps, eval_every=max(1, cfg.steps // cfg.evals),
                     seed=seed, device=cfg.device, eval_train=True)
    step, callbacks = None, []
    if method == "sgd":
        tc.optimizer, tc.batch_size = "sgd", b
    elif method == "large_sgd":
        tc.optimizer, tc.batch_size = "sgd", big
    elif method.startswith("gld"):
        gld = msgd.GLD(n, b, every=cfg.gld_every) if method == "gld_dynamic" else msgd.GLD(n, sigma=cfg.gld_sigma)
        step, callbacks = gld.training_step(), [gld]
    elif method != "gd":
        weighting = {"msgd_cov": lambda: msgd.MSGDCov(n, b), "msgd_fisher": lambda: msgd.MSGDFisher(n, b),
                     "msgd_bernoulli": lambda: msgd.MSGDBernoulli(n, b),
                     "msgd_fisher_b": lambda: msgd.MSGDFisherB(n, b, noise_batch=b),
                     "large_weighted": lambda: msgd.LargeBatchWeighted(n, b, large_batch=big)}[method]()
        step = msgd.weighted_gradient_step(weighting)
    fit(model, data, tc, step=step, callbacks=callbacks, out_dir=run_dir, resume=resume)


def analyze(exp_dir: Path, cfg: MSGDConfig) -> list[str]:
    runs = load_runs(exp_dir)
    datasets = _datasets(cfg)
    verdict = []
    for fname, group in (("small_batch_noise.png", [m for m in cfg.methods if m in SMALL]),
                         ("large_batch.png", [m for m in ("sgd",) + LARGE if m in cfg.methods])):
        if not group:
            continue
        fig, axes = plots.subplots(1, len(datasets))
        for ax, d in zip(axes[0], datasets):
            plots.curves(ax, {m: runs.get(f"{d}-{m}", []) for m in group}, "test_acc", x="step")
            ax.set_title(f"{d}, n={cfg.n_train}, b={cfg.batch_size}")
            ax.legend(fontsize=6)
        plots.save(fig, exp_dir / fname)
    for d in datasets:
        acc = {m: np.array([r[-1]["test_acc"] for r in runs.get(f"{d}-{m}", [])]) for m in cfg.methods}
        acc = {m: a for m, a in acc.items() if len(a)}
        if "sgd" not in acc:
            continue
        sgd = acc["sgd"]
        fmt = lambda m: f"{m} {100 * acc[m].mean():.1f}±{100 * acc[m].std():.1f}%"  # noqa: E731
        close = {m: gap_and_spread(acc[m], sgd) for m in acc if m.startswith("msgd")}
        like = [m for m, (gap, spread) in close.items() if abs(gap) <= spread]
        unlike = [m for m in close if m not in like]
        worse = [m for m in ("gd", "gld_dynamic", "gld_const") if m in acc]
        beat_all = [m for m in acc if m.startswith("msgd") and all(acc[m].mean() > acc[w].mean() for w in worse)]
        verdict.append(f"{d}: final test accuracy after {cfg.steps} steps — " + ", ".join(fmt(m) for m in acc) + ".")
        verdict.append(f"{d}: within the seeds' spread of SGD: {', '.join(like) or 'none'}; not: "
                       f"{', '.join(unlike) or 'none'}. Better than all of {', '.join(worse) or '-'}: "
                       f"{', '.join(beat_all) or 'none'}.")
        if "large_sgd" in acc and "large_weighted" in acc:
            gain, spread = gap_and_spread(acc["large_weighted"], acc["large_sgd"])
            verdict.append(f"{d}: large batch B={min(cfg.large_factor * cfg.batch_size, cfg.n_train)}: weighting "
                           f"{'rescues' if gain > spread else 'does not clearly rescue'} large-batch training "
                           f"({fmt('large_weighted')} vs {fmt('large_sgd')}, small-batch {fmt('sgd')}).")
    return verdict


register(Experiment(
    name="msgd",
    description="MSGD (Wu et al. 2020): GD, GLD, SGD and multiplicative-noise GD on n=1000 examples; large batch.",
    config=MSGDConfig, arms=arms, run_arm=run_arm, analyze=analyze,
    quick={"datasets": ("digits",), "steps": 200, "seeds": 2, "evals": 10},
    table_metrics=("test_acc", "test_loss", "train_full_acc", "train_full_loss"),
))
