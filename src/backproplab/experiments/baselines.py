"""Baselines: SGD, SGD with momentum, Adam and full-batch GD on digits and MNIST-1D with an MLP and the small CNN.

Every optimizer gets the same number of epochs (the same number of examples processed), so GD takes
one step per epoch. Learning rates are fixed per optimizer (the config's ``*_lr`` keys). The claim
judged here is a textbook one that the lab's other verdicts lean on: momentum trains faster than plain
SGD at the same learning rate and budget (Sutskever et al. 2013; Polyak 1964).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import plots
from ..evidence import Claim, quoted
from ..fields import option
from ..models import build_model
from ..train import TrainConfig
from .registry import Arm, Experiment, ExperimentConfig, training_phase
from .config import check_choices, check_n_train
from .runner import Results, Run, final_values

OPTIMIZERS = ("sgd", "momentum", "adam", "gd")
PAPER = "Sutskever et al., ICML 2013"
# The paper's own words behind each claim (abstract, PMLR v28), verbatim.
QUOTES = {"baselines.momentum_trains_faster": "abstract: \"well-initialized networks perform markedly worse when the "
                                              "momentum is absent or poorly tuned\""}


@dataclass
class BaselinesConfig(ExperimentConfig):
    """BaselinesConfig.

    Example:
        ``--set`` values are parsed by each field's type; an optimizer the experiment does not know is refused:

        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["optimizers=sgd,adam", "epochs=3"])
        >>> cfg.optimizers, cfg.train.epochs, cfg.sgd_lr
        (('sgd', 'adam'), 3, 0.05)
        >>> make_config(EXPERIMENT, ["optimizers=sgd,lion"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 'lion' for 'optimizers': unknown; choose from ...
    """
    datasets: tuple[str, ...] = option(("digits", "mnist1d"), "datasets to train on")
    models: tuple[str, ...] = option(("mlp", "cnn"), "architectures (mlp, cnn)")
    optimizers: tuple[str, ...] = option(OPTIMIZERS, "optimizers compared")
    # what every arm shares; each arm chooses its optimizer, learning rate (below) and momentum
    train: TrainConfig = training_phase("the training of every arm",
                                        epochs=option(30, "training epochs per run", ge=1),
                                        batch_size=option(64, "mini-batch size", ge=1),
                                        weight_decay=option(0.0, "L2 weight decay, every arm"),
                                        eval_every=option(0, "steps between evaluations (0: at each epoch's end)"))
    sgd_lr: float = option(0.05, "learning rate of plain SGD", gt=0)
    momentum_lr: float = option(0.05, "learning rate of SGD with momentum", gt=0)
    momentum: float = option(0.9, "momentum of the momentum arm")
    adam_lr: float = option(1e-3, "Adam's learning rate", gt=0)
    gd_lr: float = option(0.5, "learning rate of full-batch GD", gt=0)
    n_train: int = option(0, "0: the whole training set; else a per-seed subset, the rest joins the test set")
    def validate(self) -> None:
        check_n_train(self, self.datasets)
        check_choices("optimizers", self.optimizers, OPTIMIZERS)
        check_choices("models", self.models, ("mlp", "cnn"))


@dataclass(frozen=True)
class BaselineArm(Arm):
    """BaselineArm.

    Example:
        >>> BaselineArm("digits", "mlp", "momentum").name                  # dataset, model, optimizer
        'digits-mlp-momentum'
    """
    dataset: str
    model: str
    optimizer: str


def arms(cfg: BaselinesConfig) -> list[BaselineArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (16, True)
    """
    return [BaselineArm(d, m, o) for d in cfg.datasets for m in cfg.models for o in cfg.optimizers]


def claims(cfg: BaselinesConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (4, True)
    """
    if not {"sgd", "momentum"} <= set(cfg.optimizers):
        return []
    return quoted([Claim(
        id=f"baselines.momentum_trains_faster.{d}-{m}", paper=PAPER, where="Section 2 (classical momentum)",
        statement="At the same learning rate and number of steps, SGD with momentum 0.9 reaches a lower training "
                  "loss than plain SGD.",
        metric="train_loss", metric_label="training loss over the last epoch (cross-entropy, nats)",
        arm=BaselineArm(d, m, "momentum").name, baseline=BaselineArm(d, m, "sgd").name, direction="less",
        margin=0.0, paper_value="faster optimisation with momentum on deep and recurrent nets (MNIST autoencoders)")
        for d in cfg.datasets for m in cfg.models], QUOTES)


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one arm for one seed (``run`` is set up by the runner) and returns its last metrics row.

    Example:
        The metrics returned are those of the model the run saved, evaluated again on the seed's split:

        >>> import tempfile, torch
        >>> from backproplab.data import load_dataset
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.train import cross_entropy, evaluate
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "optimizers=momentum"], scale="smoke")
        >>> job = plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")[0]
        >>> final = run_job(job)                                  # seeds every generator, then run_arm(Run)
        >>> data = load_dataset("digits", seed=0, n_train=cfg.n_train, rest_to_test=True)
        >>> model = build_model("mlp", data.input_shape, data.num_classes)
        >>> model.load_state_dict(torch.load(job.run_dir / "model.pt", weights_only=True))
        <All keys matched successfully>
        >>> abs(evaluate(model, data.x_test, data.y_test, cross_entropy)["acc"] - final["test_acc"]) < 1e-9
        True
    """
    cfg, arm = run.cfg, run.arm
    data = run.data(arm.dataset, n_train=cfg.n_train or None, rest_to_test=True)
    model = run.prepare_model(build_model(arm.model, data.input_shape, data.num_classes))
    tc = run.train_config(cfg.train, optimizer="sgd" if arm.optimizer == "momentum" else arm.optimizer,
                          lr=getattr(cfg, f"{arm.optimizer}_lr"),
                          momentum=cfg.momentum if arm.optimizer == "momentum" else 0.0)
    return run.fit(model, data, tc)[-1]


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (learning curves per dataset and model) and one note per dataset/model pair: each arm's mean and sd.

    Example:
        The note's numbers are the mean and sample sd of the arms' final accuracies over seeds:

        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "optimizers=sgd"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> acc = np.array(list(results.values("digits-mlp-sgd", "test_acc").values()))
        >>> mean, sd = map(float, re.search(r"sgd ([0-9.]+)% [(]sd ([0-9.]+)[)]", analyze(results)[0]).groups())
        >>> bool(abs(mean - 100 * acc.mean()) < 0.05), bool(abs(sd - 100 * acc.std(ddof=1)) < 0.05)
        (True, True)
    """
    cfg = res.cfg
    pairs = [(d, m) for d in cfg.datasets for m in cfg.models]
    for metric, fname in (("test_acc", "test_accuracy.png"), ("train_loss", "train_loss.png")):
        fig, axes = plots.subplots(1, len(pairs))
        for ax, (d, m) in zip(axes[0], pairs):
            plots.curves(ax, {o: res.runs(BaselineArm(d, m, o).name) for o in cfg.optimizers}, metric)
            ax.set_title(f"{d} / {m}")
        plots.save(fig, res.exp_dir / fname)
    notes = []
    for d, m in pairs:
        acc = {o: np.array(final_values(res, BaselineArm(d, m, o).name, "test_acc")) for o in cfg.optimizers}
        acc = {o: a for o, a in acc.items() if len(a)}
        if acc:
            notes.append(f"{d}/{m} after {cfg.train.epochs} epochs, final test accuracy: " + ", ".join(
                f"{o} {100 * a.mean():.1f}% (sd {100 * a.std(ddof=1) if len(a) > 1 else 0:.1f})"
                for o, a in sorted(acc.items(), key=lambda kv: -kv[1].mean())) + ".")
    return notes


EXPERIMENT = Experiment(
    name="baselines",
    description="SGD, SGD+momentum, Adam and full-batch GD on digits and MNIST-1D (MLP and small CNN).",
    paper_setting="Sutskever et al. 2013: deep autoencoders (MNIST, CURVES, FACES) and recurrent "
                  "networks, long training budgets",
    deviations=(
        "classifiers on digits and MNIST-1D (an MLP and a small CNN) for a few epochs instead of "
        "deep autoencoders: the claim is the textbook one the lab's other verdicts lean on, "
        "judged at the lab's scale",
    ),
    config=BaselinesConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"datasets": ("digits",), "models": ("mlp",), "optimizers": ("sgd", "momentum"), "epochs": 2, "seeds": 2,
           "n_train": 300},
    quick={"epochs": 8, "seeds": 3},
)
