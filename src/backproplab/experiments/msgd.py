"""MSGD (Wu et al., ICML 2020): does multiplicative noise generalize like SGD? At laptop scale.

n = ``n_train`` training examples drawn per seed (Fashion-MNIST when its files are present under the
data root, otherwise digits and MNIST-1D); the examples left out join the test set. The small CNN
(``cnn_channels``), a fixed learning rate, no weight decay, no augmentation, a budget of ``steps``
updates for every method. Arms:
  gd, gld_dynamic (noise trace matched to SGD's, re-estimated every ``gld_every`` steps), gld_const
  (sigma chosen from ``gld_sigmas`` by validation accuracy: a tuning seed that is never evaluated trains
  on 80% of its subset for the full budget and is scored on the other 20%; its one free parameter gets a
  sweep like the CNN baselines' learning rates in the CurveBall experiment), sgd (batch b), msgd_cov,
  msgd_fisher, msgd_bernoulli, msgd_fisher_b
  (Gaussian weights on ``b`` random examples) — all matched to SGD with batch b — and for the
  large-batch figure: large_sgd (batch B = ``large_factor`` x b, strictly between b and n) and
  large_weighted (the same batch with N(1, B/b - 1) loss weights).
Seed k gives every arm the same data subset and the same initial weights.

Claims: every "MSGD variant generalizes like SGD" claim requires that SGD beats GD in the same run
(the paper's premise); where it does not, those verdicts are inconclusive. The equivalence margin,
1.5 points, was fixed before the full run as half the SGD-GD gap of a pilot (3 seeds, the settings here,
2026-12-01): on MNIST-1D GD fits the training set (100%) and reaches 62.3% test accuracy against SGD's
65.2% (gap 2.9 points, every seed positive); on digits the gap is 0.2 points (97.8% against 98.0%), so
digits is no default, at either scale: the quick scale runs MNIST-1D too (600 examples, 2000 steps, the five
cheapest arms), where GD still fits the training set and SGD still beats it. The authors' own CNN (model ``wu_cnn``,
N(0, 0.02^2) initialisation, lr 0.01) does not leave its plateau on digits in 10,000 GD steps (21% training
accuracy), so it is an option, not the default. Deviation from the paper: MNIST-1D instead of Fashion-MNIST /
CIFAR-10 when their files are absent, our small CNN, lr 0.05 and 3000 steps instead of the authors' 10,000 at lr
0.01.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace

import numpy as np

from .. import plots
from ..data import DataNotFoundError, load_dataset
from ..evidence import Claim, quoted
from ..fields import option
from ..methods import msgd
from ..models import build_model
from ..train import TrainConfig
from .registry import MAX_SEEDS, Arm, Experiment, ExperimentConfig, training_phase
from .config import build_config, check_choices, check_n_train
from .runner import Results, Run, final_values, validation_split

SMALL = ("gd", "gld_dynamic", "gld_const", "sgd", "msgd_cov", "msgd_fisher", "msgd_bernoulli", "msgd_fisher_b")
LARGE = ("large_sgd", "large_weighted")
MODELS = ("cnn", "wu_cnn")
PAPER = "Wu et al., ICML 2020 (arXiv:1906.07405)"


@dataclass
class MSGDConfig(ExperimentConfig):
    """MSGDConfig.

    Example:
        The large batch B = large_factor x b must lie strictly between b and n; the message says how to fix it:

        >>> from backproplab.experiments import make_config
        >>> make_config(EXPERIMENT, ["n_train=400", "large_factor=10"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 10 for 'large_factor': ... e.g. large_factor=3
        >>> large_batch(make_config(EXPERIMENT, ["n_train=400", "large_factor=3"]), 400)
        150
    """
    datasets: tuple[str, ...] = option(("auto",), "auto: fashion_mnist if present, else digits and mnist1d")
    methods: tuple[str, ...] = option(
        SMALL + LARGE, "arms: GD, GLD, SGD, the MSGD weightings, and the large-batch pair")
    n_train: int = option(1000, "training examples (a per-seed subset)")
    batch_size: int = option(50, "SGD's mini-batch size b", ge=1)
    large_factor: int = option(4, "large batch B = large_factor x b, strictly between b and n", ge=1)
    model: str = option("cnn", "\"cnn\" (our small CNN) or \"wu_cnn\" (the authors' CNN, N(0, 0.02^2) initialisation)")
    cnn_channels: tuple[int, ...] = option((16, 32), "channels of the small CNN's conv layers (model \"cnn\")", ge=1)
    # every arm's steps; each arm chooses its optimizer and batch (gd: full batch; sgd: b; large_sgd: B), and
    # batch_size above is the b of every weighting's sampling noise, so it is the method's, not this phase's
    train: TrainConfig = training_phase("the training steps of every arm", names={"max_steps": "steps"},
                                        eval_train=True, lr=option(0.05, "learning rate, every arm", gt=0),
                                        max_steps=option(3000, "training steps per run", ge=1))
    evals: int = option(20, "evaluations per run", ge=1)
    gld_sigma: float = option(0.01, "constant GLD's noise std when ``gld_sigmas`` is empty")
    gld_sigmas: tuple[float, ...] = option((0.003, 0.01, 0.03), "constant GLD's sweep, chosen on validation")
    gld_every: int = option(10, "steps between dynamic GLD's trace re-estimates (the authors': 10)", ge=1)
    gld_probes: int = option(100, "mini-batches per trace estimate (the authors': 100)", ge=1)
    equivalence_margin: float = option(
        0.015, "\"generalizes like SGD\": within half the SGD-GD gap (see the docstring)")
    seeds: int = option(10, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)

    def validate(self) -> None:
        check_n_train(self, _datasets(self))
        check_choices("methods", self.methods, SMALL + LARGE)
        check_choices("model", (self.model,), MODELS)
        if set(LARGE) & set(self.methods) and self.n_train:
            large_batch(self, self.n_train)


def large_batch(cfg: MSGDConfig, n: int) -> int:
    """B = large_factor x b, which must lie strictly between b and n: B = n would make large-batch SGD full-batch
    GD (and its weighted twin MSGD-Fisher), B = b plain SGD.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["batch_size=50", "large_factor=4"])
        >>> large_batch(cfg, n=1000)
        200
        >>> large_batch(cfg, n=200)                                     # B = n would be full-batch GD
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 4 for 'large_factor': ... e.g. large_factor=2
    """
    from .registry import ConfigError

    big = cfg.large_factor * cfg.batch_size
    if not cfg.batch_size < big < n:
        raise ConfigError(f"bad value {cfg.large_factor!r} for 'large_factor': the large batch B = large_factor x "
                          f"batch_size = {big} must satisfy batch_size ({cfg.batch_size}) < B < n ({n}); e.g. "
                          f"large_factor={max(2, (n - 1) // cfg.batch_size // 2)}")
    return big


@dataclass(frozen=True)
class MSGDArm(Arm):
    """MSGDArm.

    Example:
        >>> MSGDArm("mnist1d", "msgd_fisher").name                     # dataset, method
        'mnist1d-msgd_fisher'
    """
    dataset: str
    method: str


def _datasets(cfg: MSGDConfig) -> list[str]:
    if tuple(cfg.datasets) != ("auto",):
        return list(cfg.datasets)
    try:
        load_dataset("fashion_mnist", root=cfg.data_root or None)
        return ["fashion_mnist"]
    except DataNotFoundError:
        return ["mnist1d"]  # digits shows no SGD-GD gap at this scale (see the module docstring)


def arms(cfg: MSGDConfig) -> list[MSGDArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (3, True)
    """
    return [MSGDArm(d, m) for d in _datasets(cfg) for m in cfg.methods]


# The paper's own words behind each claim (the ICML 2020 abstract of arXiv:1906.07405), verbatim.
QUOTES = {
    "msgd.sgd_beats_gd": "abstract: \"The gradient noise of SGD is considered to play a central role in the observed "
                         "strong generalization abilities of deep learning.\"",
    "msgd.msgd_cov_generalizes_like_sgd": "abstract: \"the sampling noises unify two kinds of gradient regularizing "
                                          "noises that belong to the Gaussian class: the one using (scaled) Fisher as "
                                          "covariance and the one using the gradient covariance of SGD as covariance\"",
    "msgd.msgd_fisher_generalizes_like_sgd": "abstract: \"the sampling noises unify two kinds of gradient "
                                             "regularizing noises that belong to the Gaussian class: the one using "
                                             "(scaled) Fisher as covariance and the one using the gradient covariance "
                                             "of SGD as covariance\"",
    "msgd.msgd_bernoulli_generalizes_like_sgd": "abstract: \"In this work we provide negative results by showing "
                                                "that noises in classes different from the SGD noise can also "
                                                "effectively regularize gradient descent.\"",
    "msgd.msgd_fisher_b_generalizes_like_sgd": "abstract: \"an algorithm is proposed to perform noisy gradient descent "
                                               "that generalizes well\"",
    "msgd.sgd_beats_gld_dynamic": "abstract: \"past studies confirm that the magnitude and the covariance structure "
                                  "of gradient noise are critical for regularization\"",
    "msgd.sgd_beats_gld_const": "abstract: \"past studies confirm that the magnitude and the covariance structure of "
                                "gradient noise are critical for regularization\"",
    "msgd.large_batch_weighting_helps": "abstract: \"the variant of which even benefits large batch SGD training "
                                        "without hurting generalization\"",
}


def claims(cfg: MSGDConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (2, True)
    """
    out = []
    acc = "final test accuracy (fraction of the held-out pool)"
    for d in _datasets(cfg):
        name = lambda m, d=d: MSGDArm(d, m).name
        premise = f"msgd.sgd_beats_gd.{d}"
        have = set(cfg.methods)
        if {"sgd", "gd"} <= have:
            out.append(Claim(premise, PAPER, "Fig. 1 / Section 5",
                             "SGD generalizes better than full-batch GD at the same learning rate and step budget.",
                             "test_acc", name("sgd"), "greater", 0.0,
                             "Fashion-MNIST, 1000 examples, small CNN: SGD's test accuracy above GD's",
                             baseline=name("gd"), metric_label=acc))
        for m, label in (("msgd_cov", "MSGD-Cov"), ("msgd_fisher", "MSGD-Fisher"),
                         ("msgd_bernoulli", "MSGD-Bernoulli"), ("msgd_fisher_b", "mini-batch MSGD-[Fisher-B]")):
            if {m, "sgd"} <= have:
                out.append(Claim(
                    f"msgd.{m}_generalizes_like_sgd.{d}", PAPER, "Fig. 2, Section 5",
                    f"{label}, whose noise has SGD's covariance, generalizes as well as SGD.", "test_acc", name(m),
                    "equivalent", cfg.equivalence_margin,
                    "Fashion-MNIST / CIFAR-10: test accuracy curves overlap SGD's",
                    baseline=name("sgd"), metric_label=acc, requires=(premise,) if "gd" in have else ()))
        for m in ("gld_dynamic", "gld_const"):
            if {m, "sgd"} <= have:
                out.append(Claim(
                    f"msgd.sgd_beats_{m}.{d}", PAPER, "Fig. 1",
                    "Isotropic Gaussian noise (GLD) does not generalize like SGD: SGD's test accuracy is higher.",
                    "test_acc", name("sgd"), "greater", 0.0, "GLD close to GD, below SGD",
                    baseline=name(m), metric_label=acc, requires=(premise,) if "gd" in have else ()))
        if set(LARGE) <= have:
            out.append(Claim(
                f"msgd.large_batch_weighting_helps.{d}", PAPER, "Section 6 (mini-batch MSGD, large batch)",
                "Multiplicative noise on a large batch recovers generalization that large-batch SGD loses.",
                "test_acc", name("large_weighted"), "greater", 0.0,
                "large batch with SGD-like noise generalizes better than the same large batch without it",
                baseline=name("large_sgd"), metric_label=acc))
    return quoted(out, QUOTES)


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one arm (GD, SGD, GLD or an MSGD weighting) for one seed; returns its last metrics row.

    Example:
        The GD arm's reported accuracies are its saved model's, on the seed's subset and the pool left out:

        >>> import tempfile, torch
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.train import cross_entropy, evaluate
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "methods=gd"], scale="smoke")
        >>> job = plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")[0]
        >>> final = run_job(job)
        >>> data = load_dataset("digits", seed=0, n_train=cfg.n_train, rest_to_test=True)
        >>> model = _model(cfg, data)
        >>> model.load_state_dict(torch.load(job.run_dir / "model.pt", weights_only=True))
        <All keys matched successfully>
        >>> test, train = (evaluate(model, x, y, cross_entropy) for x, y in ((data.x_test, data.y_test),
        ...                                                                  (data.x_train, data.y_train)))
        >>> abs(test["acc"] - final["test_acc"]) < 1e-9, abs(train["acc"] - final["train_full_acc"]) < 1e-9
        (True, True)
    """
    cfg, arm = run.cfg, run.arm
    data = run.data(arm.dataset, n_train=cfg.n_train, rest_to_test=True)
    n, b = len(data.x_train), cfg.batch_size
    big = large_batch(cfg, n) if arm.method in LARGE else None
    model = run.prepare_model(_model(cfg, data))
    # plain SGD runs mini-batches of the loop; every other arm is one full-batch step per draw ("gd")
    batch = {"sgd": b, "large_sgd": big}.get(arm.method)
    tc = run.train_config(cfg.train, optimizer="gd" if batch is None else "sgd",
                          eval_every=max(1, cfg.train.max_steps // cfg.evals),
                          **({} if batch is None else {"batch_size": batch}))
    step, callbacks, method = None, [], arm.method
    if method.startswith("gld"):
        gld = (msgd.GLD(n, b, every=cfg.gld_every, probes=cfg.gld_probes) if method == "gld_dynamic"
               else msgd.GLD(n, sigma=run.tuned(f"gld_sigma-{arm.dataset}", _gld_tuning_key(cfg),
                                                lambda: tuned_gld_sigma(cfg, arm.dataset, run.device))))
        step, callbacks = gld.training_step(), [gld]
    elif method not in ("gd", "sgd", "large_sgd"):  # the loop's own step does those three
        weighting = {"msgd_cov": lambda: msgd.MSGDCov(n, b), "msgd_fisher": lambda: msgd.MSGDFisher(n, b),
                     "msgd_bernoulli": lambda: msgd.MSGDBernoulli(n, b),
                     "msgd_fisher_b": lambda: msgd.MSGDFisherB(n, b, noise_batch=b),
                     "large_weighted": lambda: msgd.LargeBatchWeighted(n, b, large_batch=big)}[method]()
        step = msgd.weighted_gradient_step(weighting)
    final = run.fit(model, data, tc, step=step, callbacks=callbacks)[-1]
    return {**final, "gld_sigma": gld.sigma} if method == "gld_const" else final


def _model(cfg: MSGDConfig, data):
    if cfg.model == "wu_cnn":
        return build_model("wu_cnn", data.input_shape, data.num_classes)
    return build_model("cnn", data.input_shape, data.num_classes, channels=cfg.cnn_channels)


TUNING_SEED = 10_000  # tunes constant GLD's sigma; never one of the evaluated seeds


def tuned_gld_sigma(cfg: MSGDConfig, dataset: str, device: str) -> float:
    """Constant GLD's sigma: the one of ``cfg.gld_sigmas`` with the best validation accuracy.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["gld_sigmas=0.003,0.03", "datasets=digits"], scale="smoke")
        >>> tuned_gld_sigma(cfg, "digits", "cpu") in cfg.gld_sigmas
        True
        >>> cfg.gld_sigmas, cfg.gld_sigma = (), 0.02                    # no sweep (a library caller's config)
        >>> tuned_gld_sigma(cfg, "digits", "cpu")
        0.02
    """
    if not cfg.gld_sigmas:
        return cfg.gld_sigma
    return _tuned_gld_sigma(json.dumps(_gld_tuning_key(cfg), sort_keys=True), dataset, device)


def _gld_tuning_key(cfg: MSGDConfig) -> dict:
    """The config values constant GLD's sigma is tuned under."""
    return {"lr": cfg.train.lr, "steps": cfg.train.max_steps,
            **{k: getattr(cfg, k) for k in ("n_train", "model", "cnn_channels", "gld_sigmas", "gld_sigma",
                                            "data_root")}}


@functools.cache
def _tuned_gld_sigma(key: str, dataset: str, device: str) -> float:
    from ..train import fit, isolated_rng, seed_everything

    cfg = json.loads(key)
    tuning = build_config(MSGDConfig, {"model": cfg["model"], "cnn_channels": tuple(cfg["cnn_channels"]),
                                       "lr": cfg["lr"], "steps": cfg["steps"]})
    data = load_dataset(dataset, seed=TUNING_SEED, root=cfg["data_root"] or None, n_train=cfg["n_train"],
                        rest_to_test=True)
    split = validation_split(data, 0.2, TUNING_SEED)
    scores = []
    with isolated_rng(TUNING_SEED):
        for sigma in cfg["gld_sigmas"]:
            seed_everything(TUNING_SEED)
            model = _model(tuning, split)
            gld = msgd.GLD(len(split.x_train), sigma=sigma)
            # the arms' phase on the tuning seed, full batch, scored once at the end on the validation part
            tc = replace(tuning.train, optimizer="gd", eval_every=0, eval_train=False, seed=TUNING_SEED,
                         device=device)
            try:  # the split's "test" part is the validation set
                acc = fit(model, split, tc, step=gld.training_step(), callbacks=[gld])[-1]["test_acc"]
            except FloatingPointError:
                acc = -math.inf
            scores.append((acc, -sigma))
    return -max(scores)[1]


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (test accuracy by step, small and large batch) and notes: each method's mean final accuracy, GD's and
    SGD's training accuracy, and constant GLD's chosen sigma.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "methods=gd,sgd"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = analyze(results)[0]
        >>> mean_acc = lambda m: 100 * np.mean(list(results.values(f"digits-{m}", "test_acc").values()))
        >>> [bool(abs(float(re.search(rf"{m} ([0-9.]+)%", note).group(1)) - mean_acc(m)) < 0.05) for m in ("gd", "sgd")]
        [True, True]
    """
    cfg = res.cfg
    datasets = _datasets(cfg)
    for fname, group in (("small_batch_noise.png", [m for m in cfg.methods if m in SMALL]),
                         ("large_batch.png", [m for m in ("sgd",) + LARGE if m in cfg.methods])):
        if not group:
            continue
        fig, axes = plots.subplots(1, len(datasets))
        for ax, d in zip(axes[0], datasets):
            plots.curves(ax, {m: res.runs(MSGDArm(d, m).name) for m in group}, "test_acc", x="step")
            ax.set_title(f"{d}, n={cfg.n_train}, b={cfg.batch_size}")
        plots.save(fig, res.exp_dir / fname)
    notes = []
    for d in datasets:
        acc = {m: np.array(final_values(res, MSGDArm(d, m).name, "test_acc")) for m in cfg.methods}
        acc = {m: a for m, a in acc.items() if len(a)}
        if acc:
            notes.append(f"{d}: final test accuracy after {cfg.train.max_steps} steps, mean over seeds — " +
                         ", ".join(f"{m} {100 * a.mean():.1f}%" for m, a in acc.items()) + ".")
        if {"gd", "sgd"} <= set(acc):
            train = {m: final_values(res, MSGDArm(d, m).name, "train_full_acc") for m in ("gd", "sgd")}
            notes.append(f"{d}: training accuracy at the end GD {100 * np.mean(train['gd']):.1f}%, SGD "
                         f"{100 * np.mean(train['sgd']):.1f}%; the SGD-GD test gap is the claim msgd.sgd_beats_gd.{d}; "
                         f"the equivalence margin is {100 * cfg.equivalence_margin:g} points.")
        sigmas = final_values(res, MSGDArm(d, "gld_const").name, "gld_sigma")
        if sigmas:
            notes.append(f"{d}: constant GLD's sigma {sigmas[0]:g}, chosen from {', '.join(map(str, cfg.gld_sigmas))} "
                         "by validation accuracy on a tuning seed.")
    return notes


EXPERIMENT = Experiment(
    name="msgd",
    description="MSGD (Wu et al. 2020): GD, GLD, SGD and multiplicative-noise GD on n=1000 examples; large batch.",
    paper_setting="Fashion-MNIST, 1000 training examples, a small CNN, GD / SGD / GLD / MSGD "
                  "trained to fit; CIFAR-10 as well",
    deviations=(
        "digits (MNIST-1D where configured) when Fashion-MNIST's files are absent, the offline "
        "default; a fixed budget of `steps` updates for every method",
    ),
    config=MSGDConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"datasets": ("digits",), "methods": ("gd", "sgd", "msgd_cov"), "n_train": 200, "steps": 20, "evals": 2,
           "seeds": 2, "cnn_channels": (4, 8)},
    # The premise's setting at a quarter of the full cost: MNIST-1D, where SGD beats GD once GD fits (2026-12-03,
    # 3 seeds: GD and SGD at 100% training accuracy, SGD +2.5 to +2.8 points, an interval touching 0); five seeds of
    # three arms cost what three seeds of five did and give the premise a verdict.
    quick={"datasets": ("mnist1d",), "n_train": 600, "steps": 2000, "seeds": 5, "evals": 5,
           "methods": ("gd", "sgd", "msgd_bernoulli")},
    paper={"datasets": ("fashion_mnist",), "n_train": 1000, "model": "wu_cnn"},
    paper_gaps=("the paper's CIFAR-10 runs: add --set datasets=fashion_mnist,cifar10",
                "a fixed budget of `steps` updates for every method, not training to a fitting criterion"),
    table_metrics=("test_acc", "test_loss", "train_full_acc", "train_full_loss"),
)
