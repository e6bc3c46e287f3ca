"""RIFLE (Li et al., ICML 2020) against the transfer-learning regularizers and baselines, offline.

Source task: digits classes 0-4 (the training split); a ResNet-18 (CIFAR stem, width ``width``) is
pretrained once (``_pretrained/model.pt``) and reused by every arm and seed. Target task: digits classes
5-9, ``per_class`` labelled training images each, drawn per seed; every other image of those classes is
the target test pool (about 800 images). Fine-tuning replaces the head by a new 5-way linear layer (drawn
with the run's seed: the same for every arm of a seed) and trains everything with SGD+momentum 0.9 at
lr 0.01, cosine-annealed per epoch over the whole run, as the authors' train.py does; the head and the
backbone are two param groups as there.

Arms: l2 (L2 1e-4 on every weight: the authors' weight decay), l2_rifle (K = ``times`` resets; 1 by default,
the authors' ``run.sh`` setting, the headline arm), l2_rifle_k2 / l2_rifle_k3 (the K sweep), l2_rifle_headlr
(resets, and the head's learning rate restarts its cosine every period: the authors' ``fc_lr_util='cyclic'``),
l2sp and l2sp_rifle (L2-SP with the RIFLE code's alpha 0.01, beta 1e-4, no weight decay), dropout (head
input), dropconnect (head weights), stochastic_depth, disturblabel, cyclic_lr (every group's cosine restarts
at RIFLE's period starts; both it and RIFLE end annealed, so the paper's ablation "re-initialisation, not the
learning-rate restarts" is not confounded with annealing). No arm is tuned: all share the authors' settings
(an equal, zero budget).

"Backpropagation in depth" is measured per layer (stem, stages 0-3): the direction change of the weights
against the pretrained ones, 1 - cos(w, w0) (:func:`rifle.direction_change`), and the gradient norm per step,
averaged in the windows between the planned resets (the same windows for every arm, so l2 and l2_rifle are
compared at the same steps; the first period is identical for both and left out of the "after reset" mean).

Deviations from the paper: digits instead of CUB/Stanford Cars/ImageNet-pretrained ResNet-50; no reset
after the last period (the authors' loop also re-draws the head after the final epoch, which would leave
an untrained head); a reset clears the head's momentum (the authors' keeps the stale buffer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from .. import _io, plots
from ..data import Data, load_dataset
from ..evidence import Claim, quoted
from ..fields import option
from ..methods import rifle
from ..models import build_model
from ..streams import derive
from ..train import TrainConfig, fit, isolated_rng
from .registry import MAX_SEEDS, Arm, Experiment, ExperimentConfig, training_phase
from .config import check_choices
from .runner import Results, Run

PAPER = "Li et al., ICML 2020 (arXiv:2007.03349)"

ARMS = ("l2", "l2_rifle", "l2_rifle_k2", "l2_rifle_k3", "l2_rifle_headlr", "l2sp", "l2sp_rifle", "dropout",
        "dropconnect", "stochastic_depth", "disturblabel", "cyclic_lr")
LAYERS = ("stem", "layers.0", "layers.1", "layers.2", "layers.3")  # deepest (nearest the input) first


@dataclass
class RifleConfig(ExperimentConfig):
    """RifleConfig.

    Example:
        The arms are chosen by name from the experiment's list:

        >>> from backproplab.experiments import make_config
        >>> make_config(EXPERIMENT, ["arms=l2,l2_rifle"]).arms
        ('l2', 'l2_rifle')
        >>> make_config(EXPERIMENT, ["arms=l2,rifle"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 'rifle' for 'arms': unknown; choose from l2, ...
    """
    arms: tuple[str, ...] = option(ARMS, "fine-tuning arms compared")
    width: float = option(0.125, "width multiplier of the ResNet", gt=0)
    # the source model's SGD (its seed is pretrain_seed, not the run's: one source model for every run)
    pretrain: TrainConfig = training_phase("SGD of the source model", prefix="pretrain_", optimizer="sgd",
                                           epochs=option(15, "epochs of the source model", ge=1),
                                           lr=option(0.05, "source model's learning rate", gt=0),
                                           momentum=option(0.9, "source model's momentum"),
                                           weight_decay=option(5e-4, "source model's weight decay"),
                                           batch_size=option(64, "source model's batch size", ge=1))
    pretrain_seed: int = option(0, "one source model for every arm and seed")
    per_class: int = option(60, "target training examples per class (60: hundreds of SGD steps per RIFLE period)", ge=1)
    # every arm's fine-tuning SGD (the arm's regularizer and schedule act through the step and callbacks)
    train: TrainConfig = training_phase("SGD of the fine-tuning", optimizer="sgd",
                                        epochs=option(40, "fine-tuning epochs", ge=1),
                                        batch_size=option(20, "fine-tuning batch size", ge=1),
                                        lr=option(0.01, "fine-tuning learning rate", gt=0),
                                        momentum=option(0.9, "fine-tuning momentum"))
    times: int = option(
        1, "RIFLE resets (and cyclic-LR restarts), the authors' run.sh K; l2_rifle_k* sweep K = 2, 3", ge=1)
    l2_alpha: float = option(1e-4, "L2 strength of every arm but L2-SP (the authors' weight decay)")
    l2sp_alpha: float = option(0.01, "L2-SP pull towards the pretrained weights (the RIFLE code's alpha)")
    l2sp_beta: float = option(1e-4, "L2-SP's L2 on the new head (the RIFLE code's beta)")
    dropout: float = option(0.5, "dropout probability of the dropout arm", lt=1)
    dropconnect: float = option(0.5, "drop probability of the DropConnect arm", lt=1)
    stochastic_depth: float = option(0.5, "block drop probability of the stochastic-depth arm", lt=1)
    disturb_alpha: float = option(0.1, "DisturbLabel's label-noise rate", lt=1)
    seeds: int = option(10, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)

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
    """Classes 5-9: ``per_class`` training images each, drawn by ``seed``; all the others are the test pool.

    Example:
        >>> from backproplab.experiments import make_config
        >>> data = target_data(make_config(EXPERIMENT, ["per_class=7"]), seed=0)
        >>> data.num_classes, torch.bincount(data.y_train).tolist()              # digits 5-9 relabelled 0-4
        (5, [7, 7, 7, 7, 7])
        >>> train = {tuple(row.flatten().tolist()) for row in data.x_train}
        >>> any(tuple(row.flatten().tolist()) in train for row in data.x_test)    # the test pool is the rest
        False
    """
    full = load_dataset("digits", seed=seed, root=cfg.data_root or None)
    pooled = replace(full, x_train=torch.cat([full.x_train, full.x_test]),
                     y_train=torch.cat([full.y_train, full.y_test]))
    target = _split(pooled, range(5, 10))
    g = derive(seed, "target-subset")
    picked = [torch.nonzero(target.y_train == c).flatten() for c in range(5)]
    picked = [idx[torch.randperm(len(idx), generator=g)] for idx in picked]
    train = torch.cat([idx[:cfg.per_class] for idx in picked]).sort().values
    test = torch.cat([idx[cfg.per_class:] for idx in picked]).sort().values
    return replace(target, x_train=target.x_train[train], y_train=target.y_train[train],
                   x_test=target.x_train[test], y_test=target.y_train[test])


def pretrained(cfg: RifleConfig, exp_dir: Path, device: str) -> dict:
    """The source model's weights, trained once (``pretrain_seed``) and cached (atomically) under
    ``exp_dir/_pretrained``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from backproplab.experiments import make_config
        >>> cfg, folder = make_config(EXPERIMENT, scale="smoke"), Path(tempfile.mkdtemp())
        >>> first = pretrained(cfg, folder, "cpu")                                # trained, then cached
        >>> again = pretrained(cfg, folder, "cpu")                                # read back
        >>> cached = {p.name for p in (folder / "_pretrained").iterdir()}
        >>> {"model.pt", "stamp.json"} <= cached, all(torch.equal(first[k], again[k]) for k in first)
        (True, True)
    """
    folder = exp_dir / "_pretrained"
    phase = cfg.pretrain
    stamp = {"width": cfg.width, "epochs": phase.epochs, "lr": phase.lr, "seed": cfg.pretrain_seed,
             "momentum": phase.momentum, "weight_decay": phase.weight_decay, "batch_size": phase.batch_size}
    if (folder / "model.pt").exists() and (folder / "stamp.json").exists() and \
            json.loads((folder / "stamp.json").read_text()) == stamp:
        return torch.load(folder / "model.pt", weights_only=True)
    source = _split(load_dataset("digits", root=cfg.data_root or None), range(0, 5))
    with isolated_rng(cfg.pretrain_seed):  # the same weights whichever run trains them; the run's stream untouched
        model = build_model("resnet18", source.input_shape, 5, width=cfg.width)
        history = fit(model, source, replace(phase, device=device))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    _io.torch_save(folder / "model.pt", state)
    _io.write_json(folder / "stamp.json", stamp)
    _io.write_json(folder / "pretrain_metrics.json", history[-1])
    return state


class GradNormMonitor:
    """Callback: the gradient norm of each named layer at every step (``norms[layer][step - 1]``), and
    its mean over the steps since the last evaluation in the history (``grad_norm_<layer>``).

    Example:
        With the whole training set as the batch, the first step's gradient norm of a layer is the norm of the full
        loss's gradient at the initial weights:

        >>> import copy
        >>> from torch import nn
        >>> from backproplab.data import Data
        >>> from backproplab.train import TrainConfig, fit
        >>> x, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> start = copy.deepcopy(model)
        >>> monitor = GradNormMonitor(layers=("0", "2"))
        >>> _ = fit(model, Data("toy", x, y, x, y, 2), TrainConfig(batch_size=20, epochs=2), callbacks=[monitor],
        ...         progress=False)
        >>> torch.nn.functional.cross_entropy(start(x), y).backward()
        >>> by_hand = torch.cat([p.grad.flatten() for p in start[0].parameters()]).norm()
        >>> len(monitor.norms["0"]), abs(monitor.norms["0"][0] - float(by_hand)) < 1e-6
        (2, True)
    """

    def __init__(self, layers: tuple[str, ...] = LAYERS):
        self.layers = layers
        self.norms: dict[str, list[float]] = {n: [] for n in layers}
        self.logged = 0

    def on_step_end(self, state) -> None:
        # the step has run optimizer.step() but .grad still holds this step's gradient
        for n, v in rifle.layer_grad_norms(state.model, self.layers).items():
            self.norms[n].append(v)

    def on_eval(self, state) -> None:
        for n in self.layers:
            state.history[-1][f"grad_norm_{n}"] = float(np.mean(self.norms[n][self.logged:] or [np.nan]))
        self.logged = len(self.norms[self.layers[0]])

    def state_dict(self) -> dict:
        return {"norms": self.norms, "logged": self.logged}

    def load_state_dict(self, sd: dict) -> None:
        self.norms, self.logged = {n: list(v) for n, v in sd["norms"].items()}, int(sd["logged"])

    def windows(self, bounds: list[int]) -> dict[str, list[float]]:
        """Per layer, the mean gradient norm over steps [bounds[k], bounds[k+1]) for each k."""
        return {n: [float(np.mean(v[a:b])) if b > a else float("nan") for a, b in zip(bounds, bounds[1:])]
                for n, v in self.norms.items()}


def _key(layer: str) -> str:
    return layer.replace(".", "")


def method_times(method: str, cfg: RifleConfig) -> int:
    """How many times the arm re-initialises the head.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["times=3"])
        >>> method_times("l2", cfg), method_times("l2_rifle", cfg), method_times("l2_rifle_k2", cfg)
        (0, 3, 2)
    """
    if method.startswith("l2_rifle_k"):
        return int(method.removeprefix("l2_rifle_k"))
    return cfg.times if "rifle" in method else 0


@dataclass(frozen=True)
class RifleArm(Arm):
    """RifleArm.

    Example:
        >>> RifleArm("l2sp_rifle").name                                 # the arm is its method
        'l2sp_rifle'
    """
    method: str


def arms(cfg: RifleConfig) -> list[RifleArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (12, True)
    """
    return [RifleArm(a) for a in cfg.arms]


# The paper's own words behind each claim (its arXiv abstract, arXiv:2007.03349), verbatim.
_TRICKS = ("abstract: \"out-performing known tricks for the similar purpose, such as Dropout, DropConnect, "
           "StochasticDepth, Disturb Label and Cyclic Learning Rate, under the same settings with 0.5% -2% higher "
           "testing accuracy\"")
_DEPTH = ("abstract: \"RIFLE brings meaningful updates to the weights of deep CNN layers and improves low-level "
          "feature learning\"")
QUOTES = {
    "rifle.l2_rifle_vs_l2": "abstract: \"the use of RIFLE significantly improves deep transfer learning accuracy on a "
                            "wide range of datasets\"",
    "rifle.l2sp_rifle_vs_l2sp": "abstract: \"the use of RIFLE significantly improves deep transfer learning accuracy "
                                "on a wide range of datasets\"",
    "rifle.l2_rifle_vs_dropout": _TRICKS, "rifle.l2_rifle_vs_dropconnect": _TRICKS,
    "rifle.l2_rifle_vs_stochastic_depth": _TRICKS, "rifle.l2_rifle_vs_disturblabel": _TRICKS,
    "rifle.l2_rifle_vs_cyclic_lr": _TRICKS, "rifle.deeper_updates": _DEPTH, "rifle.deeper_gradients": _DEPTH,
}


def claims(cfg: RifleConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (9, True)
    """
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
                         "Re-initialising the head pushes larger updates into the deepest layers: the stem's weights "
                         "turn further from their pretrained direction.", "dir_change_stem", "l2_rifle", "greater",
                         0.0, "larger weight changes and gradients in the lower layers with RIFLE", baseline="l2",
                         metric_label="1 - cos(stem weights, pretrained stem weights) at the end"))
        out.append(Claim("rifle.deeper_gradients", PAPER, "Section 3 / Fig. 2 (backpropagation in depth)",
                         "After a re-initialisation larger gradients reach the deepest layer.",
                         "grad_after_reset_stem", "l2_rifle", "greater", 0.0,
                         "larger gradients in the lower layers with RIFLE", baseline="l2",
                         metric_label="mean gradient norm of the stem per step, from the first reset to the end"))
    return quoted(out, QUOTES)


def run_arm(run: Run) -> dict:
    """run_arm.

    Fine-tunes the pretrained network on the target task for one seed with the arm's method (L2 or L2-SP, RIFLE's
    head re-initialisations, dropout, DropConnect, stochastic depth, label noise, a cyclic learning rate); returns
    the metrics with the layers' gradient norms and direction changes.

    Example:
        The stem's reported movement is the distance between the saved network's stem and the pretrained one's:

        >>> import tempfile, torch
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "arms=l2"], scale="smoke")
        >>> job = plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu")[0]
        >>> final = run_job(job)
        >>> saved, start = torch.load(job.run_dir / "model.pt", weights_only=True), pretrained(cfg, job.exp_dir, "cpu")
        >>> stem = [k for k in start if k.startswith("stem.") and k.rsplit(".", 1)[1] in ("weight", "bias")]
        >>> moved = sum(float((saved[k] - start[k]).pow(2).sum()) for k in stem) ** 0.5       # its parameters
        >>> moved > 0, abs(moved - final["stem_update_norm"]) < 1e-6
        (True, True)
    """
    cfg, method = run.cfg, run.arm.method
    weights = pretrained(cfg, run.exp_dir, run.device)
    data = target_data(cfg, run.seed)
    reference = build_model("resnet18", data.input_shape, 5, width=cfg.width)
    reference.load_state_dict(weights)
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
    monitor = GradNormMonitor()
    times = method_times(method, cfg)
    callbacks: list = [monitor]
    if times:
        callbacks.append(rifle.RIFLE("head", times=times))
    restart = True if method == "cyclic_lr" else [0] if method == "l2_rifle_headlr" else []
    callbacks.append(rifle.CosineLR(cfg.times, restart=restart))
    step = rifle.penalized_step(penalty, cfg.disturb_alpha if method == "disturblabel" else 0.0, data.num_classes)
    tc = run.train_config(cfg.train)
    optimizer = torch.optim.SGD(rifle.head_param_groups(model, "head"), lr=tc.lr, momentum=tc.momentum)
    history = run.fit(model, data, tc, step=step, callbacks=callbacks, optimizer=optimizer)
    moved = sum(float((p.detach().cpu() - p0.cpu()).pow(2).sum())
                for p, p0 in zip(model.stem.parameters(), stem_before))
    per_epoch = math.ceil(len(data.x_train) / tc.batch_size)
    bounds = [e * per_epoch for e in [0, *rifle.reset_epochs(tc.epochs, cfg.times), tc.epochs]]
    windows = monitor.windows(bounds)
    after = {f"grad_after_reset_{_key(n)}": float(np.mean(v[bounds[1]:])) for n, v in monitor.norms.items()
             if len(bounds) > 2}
    turned = rifle.direction_change(model, reference, LAYERS)
    return {**history[-1], "stem_update_norm": moved ** 0.5, **after,
            **{f"dir_change_{_key(n)}": v for n, v in turned.items()},
            "grad_windows": {_key(n): v for n, v in windows.items()}, "window_bounds": bounds}


def _paired(res: Results, arm: str, base: str, metric: str) -> str:
    """"mean difference [95% t-interval] (n)" of ``arm`` minus ``base``, paired by seed."""
    a, b = res.values(arm, metric), res.values(base, metric)
    d = np.array([a[k] - b[k] for k in sorted(set(a) & set(b))])
    if len(d) < 2:
        return f"{d.mean() if len(d) else float('nan'):+.3g} (n={len(d)})"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.3g} [{d.mean() - half:+.3g}, {d.mean() + half:+.3g}] (n={len(d)})"


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (per-layer gradient norms and direction changes) and notes: target accuracy by arm, the paired
    differences from L2, direction changes and gradient norms between resets.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "arms=l2,l2_rifle"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = analyze(results)[0]
        >>> [bool(abs(float(re.search(rf"{a} ([0-9.]+)%", note).group(1))
        ...           - 100 * np.mean(list(results.values(a, "test_acc").values()))) < 0.05)
        ...  for a in ("l2", "l2_rifle")]
        [True, True]
    """
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
    axes[0][0].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    axes[0][0].set(ylabel="target test accuracy (%)", xlabel="arm", title="final target accuracy")
    axes[0][0].legend(fontsize=8)
    plots.save(fig, res.exp_dir / "accuracy_table.png")
    if not acc:
        return []
    lines = ["target test accuracy, mean over seeds: " + ", ".join(f"{a} {100 * v.mean():.1f}%" for a, v in acc.items())
             + f" ({len(next(iter(acc.values())))} seeds, about {_pool_size(res)} test images)."]
    if "l2" in runs:
        sweep = [a for a in ("l2_rifle", "l2_rifle_k2", "l2_rifle_k3", "l2_rifle_headlr", "cyclic_lr") if a in runs]
        if sweep:
            lines.append("accuracy minus l2, paired [95% CI]: " + "; ".join(
                f"{a} (K={method_times(a, cfg) or cfg.times}) {_paired(res, a, 'l2', 'test_acc')}" for a in sweep))
    if {"l2", "l2_rifle"} <= set(runs):
        lines.append("direction change 1 - cos(w, w_pretrained), l2_rifle minus l2 per layer (deepest first): "
                     + "; ".join(f"{n} {_paired(res, 'l2_rifle', 'l2', f'dir_change_{_key(n)}')}" for n in LAYERS))
        ratios = []
        for n in LAYERS:
            r = [np.array(f["grad_windows"][_key(n)]) / np.array(b["grad_windows"][_key(n)])
                 for s, f in res.finals("l2_rifle").items() for t, b in res.finals("l2").items() if s == t]
            if r:
                ratios.append(f"{n} " + "/".join(f"{x:.2f}" for x in np.mean(r, axis=0)))
        if ratios:
            lines.append("gradient norm, l2_rifle over l2, mean of the per-seed ratios in each period between resets "
                         "(the first period is the same training for both): " + "; ".join(ratios))
        lines.append(_layer_plot(res))
    return lines


def _layer_plot(res: Results) -> str:
    fig, axes = plots.subplots(2, 1, size=(7, 3.2))  # one above the other: each panel as wide as the page
    (directions,), (gradients,) = axes
    x = np.arange(len(LAYERS))
    for i, arm in enumerate(a for a in ("l2", "l2_rifle", "cyclic_lr") if a in res.all_runs()):
        vals = np.array([[f[f"dir_change_{_key(n)}"] for n in LAYERS] for f in res.final_list(arm)])
        directions.bar(x + 0.25 * i, vals.mean(0), 0.25, label=arm)
        grads = np.array([[np.mean(f["grad_windows"][_key(n)][1:]) for n in LAYERS] for f in res.final_list(arm)])
        gradients.bar(x + 0.25 * i, grads.mean(0), 0.25, label=arm)
    directions.set(title="direction change of the weights (1 - cos)", xticks=x, xticklabels=LAYERS, yscale="log")
    gradients.set(title="gradient norm after the first reset", xticks=x, xticklabels=LAYERS, yscale="log")
    for ax in (directions, gradients):
        ax.legend(fontsize=9)
    plots.save(fig, res.exp_dir / "rifle_layers.png")
    return "per-layer plot: rifle_layers.png"


def _pool_size(res: Results) -> int:
    return len(target_data(res.cfg, 0).y_test)


EXPERIMENT = Experiment(
    name="rifle",
    description="RIFLE (Li et al. 2020) vs L2, L2-SP, dropout, DropConnect, stochastic depth, DisturbLabel, cyclic LR.",
    paper_setting="ImageNet-pretrained ResNet-50 fine-tuned on CUB-200-2011, Stanford Cars, "
                  "Flowers and other target sets",
    deviations=(
        "source task digits 0-4, target task digits 5-9 with `per_class` labelled images each, a "
        "narrow ResNet-18 pretrained here instead of on ImageNet (offline data, 2 CPU cores)",
    ),
    config=RifleConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"arms": ("l2", "l2_rifle"), "width": 0.0625, "pretrain_epochs": 1, "per_class": 5, "epochs": 3, "times": 1,
           "seeds": 2},
    quick={"pretrain_epochs": 6, "epochs": 16, "seeds": 3},
)
