"""Greedy layerwise learning (Belilovsky et al. 2019) against end-to-end training, offline.

Datasets: digits (2-D, 8x8), MNIST-1D (1-D convolutions on the length-40 signal; no reshaping) and
CIFAR-10 when its files are present (``datasets=auto``). Architecture: ``LayerwiseCNN`` with ``widths``
and invertible downsampling before blocks ``downsample`` (8x8 -> 4x4 -> 2x2; 40 -> 20 -> 10).
Arms: ``greedy_k{k}`` for k in ``ks`` (each block ``epochs_per_block`` epochs, SGD momentum 0.9, weight
decay 5e-4, lr x0.2 every ``decay_every`` epochs, cached frozen prefix) and ``e2e_k{k}`` for k in
``e2e_ks``: the same network (trunk + aux classifier k) trained end to end for the same total number of
epochs (blocks x epochs_per_block), its lr decay stretched to that budget (:func:`decay_schedule`). The
auxiliary classifiers have BatchNorm after each convolution and before the linear layer for k > 1 (the
paper's and the authors' setting). For every arm, each depth's features are probed for linear
separability by logistic regression fitted to convergence (L-BFGS, gradient below 1e-4) on the
2x2-averaged frozen features and scored on the held-out test split; greedy arms also retrain a narrower
final classifier (``small_width``) for the size-reduction figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _io, plots
from ..data import DataNotFoundError, load_dataset
from ..evidence import Claim, quoted
from ..methods.layerwise import GreedyLayerwiseTrainer, LayerwiseCNN, parameter_count, probe, \
    retrain_smaller_classifier
from ..fields import option
from ..train import StepDecay, TrainConfig, cross_entropy, evaluate
from .registry import Arm, Experiment, ExperimentConfig, training_phase
from .runner import Results, Run

PAPER = "Belilovsky et al., ICML 2019 (arXiv:1812.11446)"
EQUIVALENCE_MARGIN = 0.02  # 2 points of test accuracy: "competitive with end-to-end"


@dataclass
class LayerwiseConfig(ExperimentConfig):
    """LayerwiseConfig.

    Example:
        Auxiliary-classifier depths are a list of positive integers:

        >>> from backproplab.experiments import make_config
        >>> make_config(EXPERIMENT, ["ks=1,2"], scale="quick").ks
        (1, 2)
        >>> make_config(EXPERIMENT, ["ks=0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 0 for 'ks' in ...: expected a number at least 1
    """
    datasets: tuple[str, ...] = option(("auto",), "auto: digits, mnist1d, and cifar10 if its files are present")
    ks: tuple[int, ...] = option((1, 2, 3), "auxiliary-classifier depths k compared", ge=1)
    e2e_ks: tuple[int, ...] = option((3,), "k values given an end-to-end baseline", ge=1)
    widths: tuple[int, ...] = option((32, 64, 64, 128), "channels of each block", ge=1)
    downsample: tuple[int, ...] = option((1, 3), "blocks followed by invertible downsampling")
    epochs_per_block: int = option(10, "epochs each block trains")
    decay_every: int = option(5, "epochs between lr decays", ge=1)
    decay_factor: float = option(0.2, "lr multiplier at each decay")
    # every block's and the end-to-end network's SGD; each arm's epochs follow from epochs_per_block
    train: TrainConfig = training_phase("SGD of the blocks and of the end-to-end networks", optimizer="sgd",
                                        lr=option(0.05, "SGD learning rate", gt=0),
                                        momentum=option(0.9, "SGD momentum"),
                                        weight_decay=option(5e-4, "L2 weight decay"),
                                        batch_size=option(64, "mini-batch size", ge=1))
    small_width: int = option(16, "block width of the size-reduction arm", ge=1)
    probe_all_arms: bool = option(True, "probe every arm's depths (False: only greedy k=min(ks), which the claim uses)")
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


@dataclass(frozen=True)
class LayerwiseArm(Arm):
    """LayerwiseArm.

    Example:
        >>> LayerwiseArm("digits", "greedy", 3).name, LayerwiseArm("digits", "e2e", 3).name
        ('digits-greedy_k3', 'digits-e2e_k3')
    """
    dataset: str
    kind: str  # "greedy" | "e2e"
    k: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.kind}_k{self.k}"


def arms(cfg: LayerwiseConfig) -> list[LayerwiseArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (8, True)
    """
    return [LayerwiseArm(d, kind, k) for d in _datasets(cfg)
            for kind, ks in (("greedy", cfg.ks), ("e2e", cfg.e2e_ks)) for k in ks]


# The paper's own words behind each claim (its ICML 2019 abstract), verbatim.
QUOTES = {
    "layerwise.table2.greedy_k3_vs_e2e": "abstract: \"and can train a VGG-11 model to the same accuracy as "
                                         "end-to-end learning\"",
    "layerwise.table1.k3_beats_k1": "abstract: \"Extending this training methodology to construct individual layers "
                                    "by solving 2-and-3-hidden layer auxiliary problems, we obtain an 11-layer network "
                                    "that exceeds several members of the VGG model family on ImageNet\"",
    "layerwise.fig3.separability_grows": "abstract: \"conduct a range of experiments to study the properties this "
                                         "training induces on the intermediate layers\" (the separability by depth "
                                         "is read off the paper's Fig. 3)",
}


def claims(cfg: LayerwiseConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (6, True)
    """
    out = []
    acc = "final test accuracy (fraction)"
    for d in _datasets(cfg):
        top = max(cfg.ks)
        if top in cfg.e2e_ks:
            out.append(Claim(
                f"layerwise.table2.greedy_k{top}_vs_e2e.{d}", PAPER, "Tables 2-3",
                f"Greedy layerwise training with k={top} auxiliary layers is competitive with end-to-end training of "
                "the same network.", "test_acc", LayerwiseArm(d, "greedy", top).name, "equivalent", EQUIVALENCE_MARGIN,
                "CIFAR-10 / ImageNet: k=3 greedy within a few points of end-to-end VGG-style networks",
                baseline=LayerwiseArm(d, "e2e", top).name, metric_label=acc))
        if len(cfg.ks) > 1:
            low = min(cfg.ks)
            out.append(Claim(
                f"layerwise.table1.k{top}_beats_k{low}.{d}", PAPER, "Table 1 / Section 4.2",
                "Deeper auxiliary problems (larger k) give a more accurate greedily trained network.", "test_acc",
                LayerwiseArm(d, "greedy", top).name, "greater", 0.0, "accuracy grows with k (k=1 < k=2 < k=3)",
                baseline=LayerwiseArm(d, "greedy", low).name, metric_label=acc))
        low = min(cfg.ks)
        out.append(Claim(
            f"layerwise.fig3.separability_grows.{d}", PAPER, "Fig. 3",
            "Features of greedily trained blocks become more linearly separable with depth.", "separability_gain",
            LayerwiseArm(d, "greedy", low).name, "greater", 0.0,
            "linear-probe accuracy rises block after block (CIFAR-10, k=1)", threshold=0.0,
            metric_label="linear-probe accuracy at the last block minus at the first (fraction)"))
    return quoted(out, QUOTES)


def decay_schedule(cfg: LayerwiseConfig, kind: str) -> StepDecay:
    """Each arm's step decay fitted to its own budget: a greedy stage trains ``epochs_per_block`` epochs and
    decays every ``decay_every``; end-to-end training runs blocks x as many epochs, so it decays every
    blocks x ``decay_every`` epochs: the same number of decays at the same fractions of its run (a decay
    copied from the stage would leave it at lr x 0.2^7 for most of its 40 epochs).

    Example:
        With 4 blocks, end-to-end training runs 4 times a stage's epochs and decays 4 times as rarely, so both
        decay at the same fractions of their runs:

        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["epochs_per_block=10", "decay_every=5"])
        >>> decay_schedule(cfg, "greedy").every, decay_schedule(cfg, "e2e").every, len(cfg.widths)
        (5, 20, 4)
    """
    every = cfg.decay_every * (len(cfg.widths) if kind == "e2e" else 1)
    return StepDecay(every, cfg.decay_factor)


def _train_config(run: Run, epochs: int):
    return run.train_config(run.cfg.train, epochs=epochs)


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one arm for one seed (greedy block by block, or end to end), probes the frozen features after each block
    with a logistic regression, and retrains a narrower final classifier on the greedy trunk; returns the metrics.

    Example:
        >>> import json, tempfile
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.methods.layerwise import AuxClassifier
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "ks=1", "e2e_ks=1"], scale="smoke")
        >>> jobs = plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")
        >>> job = next(j for j in jobs if j.arm.kind == "greedy")
        >>> final = run_job(job)
        >>> rows = [json.loads(line) for line in open(job.run_dir / "metrics.jsonl")]
        >>> gain = rows[-1]["linear_separability"] - rows[0]["linear_separability"]
        >>> head = sum(p.numel() for p in AuxClassifier(cfg.widths[-1], 10, 1, 2).parameters())
        >>> [row["depth"] for row in rows], final["separability_gain"] == gain, final["classifier_params"] == head
        ([1, 2, 3], True, True)
    """
    cfg, arm = run.cfg, run.arm
    data = run.data(arm.dataset).to(run.device)
    model = run.prepare_model(LayerwiseCNN(data.input_shape, data.num_classes, cfg.widths, cfg.downsample, k=arm.k))
    model = model.to(run.device)
    decay = [decay_schedule(cfg, arm.kind)]
    if arm.kind == "greedy":
        trainer = GreedyLayerwiseTrainer(model, _train_config(run, cfg.epochs_per_block), callbacks=decay)
        rows = trainer.train(data, out_dir=run.dir, resume=run.resume)
    else:
        epochs = cfg.epochs_per_block * len(cfg.widths)
        run.fit(model, data, _train_config(run, epochs), callbacks=decay, sub="e2e")
        rows = [{"depth": j + 1} for j in range(len(cfg.widths))]
        test = evaluate(model, data.x_test, data.y_test, cross_entropy)
        rows[-1].update({"test_acc": test["acc"], "test_loss": test["loss"]})
    probed = cfg.probe_all_arms or (arm.kind == "greedy" and arm.k == min(cfg.ks))
    for row in rows:  # logistic regression fitted to convergence on the frozen features (L-BFGS)
        if probed:
            row["linear_separability"] = probe(model, row["depth"], data, None)
        row["step"] = row["epoch"] = row["depth"]
    _io.write_jsonl(run.dir / "metrics.jsonl", rows)
    final = dict(rows[-1])
    final["params"] = parameter_count(model)
    if probed:
        final["separability_gain"] = rows[-1]["linear_separability"] - rows[0]["linear_separability"]
    if arm.kind == "greedy":
        small_acc, small_params = retrain_smaller_classifier(model, data, _train_config(run, cfg.epochs_per_block),
                                                             cfg.small_width)
        final.update({"small_classifier_acc": small_acc, "small_classifier_params": small_params,
                      "classifier_params": parameter_count(model.aux[-1])})
    return final


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (accuracy and linear separability by depth) and notes: the probe's accuracy by depth for each k, and the
    size reduction.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "ks=1", "e2e_ks=1"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = next(n for n in analyze(results) if "linear-probe accuracy by depth" in n)
        >>> runs = results.runs("digits-greedy_k1")
        >>> by_depth = np.mean([[row["linear_separability"] for row in rows] for rows in runs], 0)
        >>> [float(v) for v in re.findall(r"([0-9.]+)%", note)] == [round(100 * v, 1) for v in by_depth]
        True
    """
    cfg = res.cfg
    datasets = _datasets(cfg)
    fig, axes = plots.subplots(2, len(datasets))
    notes = []
    for col, d in enumerate(datasets):
        greedy = {f"greedy k={k}": res.runs(LayerwiseArm(d, "greedy", k).name) for k in cfg.ks}
        e2e = {f"end-to-end k={k}": res.runs(LayerwiseArm(d, "e2e", k).name) for k in cfg.e2e_ks}
        plots.curves(axes[0][col], greedy, "test_acc", x="depth", legend=False)
        axes[0][col].set_title(f"{d}: test accuracy after each block")
        for label, rs in e2e.items():
            if rs:
                acc = np.array([r[-1]["test_acc"] for r in rs])
                axes[0][col].axhline(100 * acc.mean(), ls="--", color="k", lw=1, label=f"{label} (final)")
        axes[0][col].legend(fontsize=8)
        probed = {label: rs for label, rs in {**greedy, **e2e}.items()
                  if rs and all("linear_separability" in row for r in rs for row in r)}
        plots.curves(axes[1][col], probed, "linear_separability", x="depth")
        axes[1][col].set_title(f"{d}: linear separability by depth")
        for label, rs in greedy.items():
            if label in probed:
                sep = np.array([[row["linear_separability"] for row in r] for r in rs]).mean(0)
                notes.append(f"{d}, {label}: linear-probe accuracy by depth, mean over seeds: "
                             f"{', '.join(f'{100 * s:.1f}%' for s in sep)}.")
        for k in cfg.ks:
            f = res.finals(LayerwiseArm(d, "greedy", k).name).get(0, {})
            if "small_classifier_acc" in f:
                notes.append(f"{d}, greedy k={k}: size reduction (seed 0) — classifier {f['classifier_params']} -> "
                             f"{f['small_classifier_params']} parameters, accuracy {100 * f['test_acc']:.1f}% -> "
                             f"{100 * f['small_classifier_acc']:.1f}%.")
    plots.save(fig, res.exp_dir / "layerwise.png")
    return notes


EXPERIMENT = Experiment(
    name="layerwise",
    description="Greedy layerwise learning (Belilovsky et al. 2019), k=1,2,3, vs end-to-end; separability by depth.",
    paper_setting="CIFAR-10 and ImageNet, VGG-style blocks trained one at a time with auxiliary "
                  "classifiers of k = 1-3 hidden layers, tens of epochs per block",
    deviations=(
        "digits (8x8) and MNIST-1D (CIFAR-10 only when its files are present), narrow blocks and "
        "a few epochs per block",
    ),
    config=LayerwiseConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"datasets": ("digits",), "ks": (1, 3), "e2e_ks": (3,), "widths": (8, 8, 16), "downsample": (1,),
           "epochs_per_block": 1, "decay_every": 1, "seeds": 2},
    quick={"epochs_per_block": 3, "decay_every": 2, "seeds": 3, "probe_all_arms": False},
    table_metrics=("test_acc", "linear_separability", "small_classifier_acc", "params"),
)
