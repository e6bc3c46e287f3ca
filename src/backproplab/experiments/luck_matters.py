"""Luck Matters (Tian et al. 2019; Tian 2020): student specialization in a teacher-student setting.

Teacher: the structured 2019 teacher (input 20, hidden ``teacher_widths``, output 100, seed 0) unless an
arm says otherwise; inputs N(0, 10^2 I); ``train_size`` training and ``test_size`` evaluation inputs.
Students: the same depth, each hidden layer ``multiplier`` times wider, plain SGD on MSE.
Arms: ``mult{m}`` (multiplier sweep), ``random_teacher`` and ``teacher2020`` (largest multiplier, other
teachers), ``bn_student`` (largest multiplier with BatchNorm), ``bn_cnn_digits`` (the small CNN with
BatchNorm on digits, for the BatchNorm-bias claim) and ``two_layer``: the regime the authors demonstrate the
L-shape in, a 2-layer 2020 teacher (``two_layer_width`` hidden nodes, no strength decay: their config's
default) and a student ``multiplier`` times wider whose initial weights are scaled by ``student_scale``
(their ``student_scale_down`` 0.1), plain SGD at their lr 0.01 for ``two_layer_steps`` (62.5k) steps.

Fan-out (the L-shape) is judged per layer, each node's outgoing-weight norm relative to its own norm at
initialisation (:func:`teacher_student.fan_out_ratio`), and also as fan-out x activation std (the node's
contribution to the next layer). Pruning keeps every student node matched to a teacher node (best
correlation >= ``prune_corr``, duplicates included) and gives every arm that trains the same budget
(``prune_epochs``): fine-tuning the kept nodes, the same shape re-initialised, and the kept nodes rewound
to their initial weights (the lottery-ticket arm); random pruning to as many nodes is the control.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .. import plots
from ..evidence import Claim, quoted
from ..fields import option
from ..methods import teacher_student as ts
from ..models import build_model
from ..streams import derive
from ..train import TrainConfig, evaluate, mse
from .registry import MAX_SEEDS, Arm, Experiment, ExperimentConfig, training_phase
from .runner import Results, Run

PAPER = "Tian et al., arXiv:1905.13405 2019 (Luck Matters); Tian, ICML 2020"


@dataclass
class LuckConfig(ExperimentConfig):
    """LuckConfig.

    Example:
        The student widths are multiples of the teacher's; the BatchNorm teacher's firing rate is a fraction:

        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, ["multipliers=1,5"], scale="quick")
        >>> cfg.multipliers, cfg.teacher_widths
        ((1, 5), (10, 15, 20, 25))
        >>> make_config(EXPERIMENT, ["bn_teacher_firing=1"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 1.0 for 'bn_teacher_firing' in ...: expected ... below 1
    """
    teacher_widths: tuple[int, ...] = option((10, 15, 20, 25), "hidden widths of the teacher", ge=1)
    multipliers: tuple[int, ...] = option((1, 2, 5, 10), "student width = multiplier x teacher width", ge=1)
    train_size: int = option(100_000, "teacher-labelled training inputs", ge=1)
    test_size: int = option(10_000, "teacher-labelled test inputs", ge=1)
    # the students' SGD on the teacher's outputs (the pruning arms' too, for prune_epochs; the 2-layer student's
    # batch size)
    train: TrainConfig = training_phase("SGD of the students", optimizer="sgd", loss="mse",
                                        epochs=option(40, "student training epochs", ge=1),
                                        lr=option(0.1, "student SGD learning rate", gt=0),
                                        batch_size=option(64, "mini-batch size", ge=1))
    bn_teacher_firing: float = option(
        0.2, "bn_student's teacher: each hidden node fires on this fraction of inputs", gt=0, lt=1)
    # the BatchNorm CNN on digits
    bn: TrainConfig = training_phase("SGD with momentum of the BatchNorm CNN on digits", prefix="bn_",
                                     optimizer="sgd", epochs=option(20, "epochs of the BatchNorm CNN", ge=1),
                                     lr=option(0.05, "the BatchNorm CNN on digits: SGD with momentum", gt=0),
                                     momentum=option(0.9, "momentum of the BatchNorm CNN"))
    bn_channels: tuple[int, ...] = option((32, 64, 64), "channels of the BatchNorm CNN", ge=1)
    matched_corr: float = option(
        0.9, "fan-out groups: a student node is matched at this best correlation or above", le=1)
    unmatched_corr: float = option(0.5, "... and unmatched below this one", le=1)
    prune_corr: float = option(0.9, "a student node is kept (lucky) when it matches some teacher node this well", le=1)
    prune_epochs: int = option(10, "the training budget of every pruning arm that trains", ge=1)
    two_layer_width: int = option(10, "hidden nodes of the 2-layer teacher", ge=1)
    two_layer: TrainConfig = training_phase(
        "SGD of the 2-layer student", prefix="two_layer_", names={"max_steps": "two_layer_steps"}, optimizer="sgd",
        loss="mse", max_steps=option(62_500, "SGD steps of the 2-layer student (the authors run 62.5k)", ge=1),
        lr=option(0.01, "its learning rate (the authors' config)", gt=0))
    student_scale: float = option(0.1, "the 2-layer student's initial weights are scaled by this")
    seeds: int = option(5, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)


def _max_mult(cfg: LuckConfig) -> int:
    return max(cfg.multipliers)


@dataclass(frozen=True)
class LuckArm(Arm):
    """LuckArm.

    Example:
        >>> LuckArm("mult5").name                                       # a student 5 times the teacher's width
        'mult5'
    """
    kind: str  # "mult<m>", "random_teacher", "teacher2020", "bn_student", "bn_cnn_digits"


def arms(cfg: LuckConfig) -> list[LuckArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (9, True)
    """
    kinds = [f"mult{m}" for m in cfg.multipliers] + ["random_teacher", "teacher2020", "bn_student", "bn_cnn_digits",
                                                     "two_layer"]
    return [LuckArm(k) for k in kinds]


# The paper's own words behind each claim (the abstract of arXiv:1905.13405), verbatim. The BN-student claim is
# the lab's extension and carries none.
_LUCKY = ("abstract: \"in over-parameterized regimes and 2-layer case, while a small set of lucky nodes do converge "
          "to the teacher nodes, the fan-out weights of other nodes converge to zero\"")
_PHENOMENA = ("abstract: \"This framework provides insight into multiple puzzling phenomena in deep learning like "
              "over-parameterization, implicit regularization, lottery tickets, etc.\"")
QUOTES = {
    "luck_matters.lucky_nodes_specialize": "abstract: \"student nodes whose weights are initialized to be close to "
                                           "teacher nodes converge to them at a faster rate\"",
    "luck_matters.prune_to_lucky": _PHENOMENA, "luck_matters.lucky_finetune_beats_reinit": _PHENOMENA,
    "luck_matters.rewind_beats_reinit": _PHENOMENA, "luck_matters.fan_out_l_shape": _LUCKY,
    "luck_matters.overparameterization_recovers": _LUCKY,
    "luck_matters.bn_bias_negative": "abstract: \"We verify our assumption by showing that the majority of BatchNorm "
                                     "biases of pre-trained VGG11/16 models are negative.\"",
}


def claims(cfg: LuckConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (12, True)
    """
    top = f"mult{_max_mult(cfg)}"
    out = [
        Claim("luck_matters.lucky_nodes_specialize", PAPER, "Section 5 / Fig. 5 (luck)",
              "The student node that ends up matching a teacher node is one that was already among the most "
              "correlated with it at initialisation (a lucky node).", "luck_rank_mean", top, "less", 0.0,
              "final best students rank near the top at init (authors' notebooks: top 1/11/22/34% per layer)",
              threshold=0.5, metric_label="rank at init of each teacher node's final best student (0 = luckiest, "
                                          "1 = least; 0.5 = luck does not matter), mean over nodes and layers"),
        Claim("luck_matters.prune_to_lucky", PAPER, "Section 6 (pruning)",
              "Keeping only the lucky (matched) nodes preserves the function better than keeping as many random nodes.",
              "pruning_gap", top, "greater", 0.0, "pruning to the matched nodes keeps the loss low",
              threshold=0.0, metric_label="eval loss after random pruning minus after lucky pruning (MSE)"),
        Claim("luck_matters.lucky_finetune_beats_reinit", PAPER, "Section 6 (pruning)",
              "Fine-tuning the lucky nodes beats training the same pruned shape from a fresh initialisation, "
              "with the same budget.", "finetune_gap", top, "greater", 0.0,
              "lucky nodes carry what was learned", threshold=0.0,
              metric_label="eval loss of the re-initialised minus the fine-tuned lucky network (MSE)"),
        Claim("luck_matters.rewind_beats_reinit", PAPER, "Section 6 (lottery tickets)",
              "The lucky nodes' own initial weights train better than a fresh initialisation of the same shape "
              "(the lottery-ticket reading of luck), with the same budget.", "rewind_gap", top, "greater", 0.0,
              "lucky initialisations are winning tickets", threshold=0.0,
              metric_label="eval loss of the re-initialised minus the rewound lucky network (MSE)"),
    ]
    for li in range(1, len(cfg.teacher_widths) + 1):
        out.append(Claim(f"luck_matters.fan_out_l_shape.layer{li}", PAPER, "Fig. 6 (L-shape)",
                         f"Student nodes of layer {li} that match no teacher node end with smaller fan-out weights, "
                         "relative to their start, than the matched ones.", f"fan_out_ratio_layer{li}", top, "less",
                         0.0, "an L-shaped scatter: unmatched nodes have near-zero fan-out norms", threshold=1.0,
                         metric_label=f"mean final/initial fan-out norm of unmatched (corr < {cfg.unmatched_corr:g}) "
                                      f"over matched (corr >= {cfg.matched_corr:g}) students"))
    out.append(Claim("luck_matters.fan_out_l_shape.two_layer", PAPER, "Tian 2020 (2-layer experiments, small init)",
                     "In a 2-layer network trained from a small initialisation, unmatched student nodes' fan-out "
                     "weights stay small while matched nodes' grow.", "fan_out_ratio_layer1", "two_layer", "less",
                     0.0, "unmatched nodes' fan-out shrinks to near zero", threshold=1.0,
                     metric_label="mean final/initial fan-out norm of unmatched over matched students"))
    out += [
        Claim("luck_matters.bn_bias_negative", PAPER, "Section 7 (BatchNorm)",
              "After training with BatchNorm, most BatchNorm biases are negative.", "bn_negative_mean",
              "bn_cnn_digits", "greater", 0.0, "most BN biases negative in trained CNNs (CIFAR-10, VGG/ResNet)",
              threshold=0.5, metric_label="fraction of negative BatchNorm biases, mean over layers"),
        Claim("luck_matters.bn_student_bias_negative", PAPER, "Section 7 (BatchNorm)",
              "A BatchNorm student trained on the teacher ends with mostly negative BatchNorm biases.",
              "bn_negative_mean", "bn_student", "greater", 0.0, "most BN biases negative", threshold=0.5,
              metric_label="fraction of negative BatchNorm biases, mean over layers",
              extension="the paper's BatchNorm evidence is the biases of pretrained ImageNet VGG networks; a "
                        "BatchNorm student trained on a teacher is this lab's test of the same reading"),
    ]
    if len(cfg.multipliers) > 1:
        low = f"mult{min(cfg.multipliers)}"
        out.append(Claim("luck_matters.overparameterization_recovers", PAPER, "Section 5 / Fig. 4",
                         "A wider (over-parameterised) student recovers more of the teacher's nodes.", "covered_mean",
                         top, "greater", 0.0, "more teacher nodes matched as the student widens",
                         baseline=low, metric_label="fraction of teacher nodes with a student at corr >= 0.95"))
    return quoted(out, QUOTES)


class CorrelationMonitor:
    """At every evaluation: mean best correlation and coverage per layer, added to the metrics row.

    Example:
        A student that is a copy of the teacher matches it node for node at every evaluation:

        >>> import copy
        >>> from backproplab.train import TrainConfig, fit
        >>> teacher = ts.make_teacher(input_dim=20, widths=(6, 4), output_dim=3, seed=0)
        >>> data = ts.teacher_data(teacher, 200, 100, seed=0)
        >>> rows = fit(copy.deepcopy(teacher), data, TrainConfig(lr=0.0, epochs=2, loss="mse"),
        ...            callbacks=[CorrelationMonitor(teacher, data.x_test)], progress=False)
        >>> [(round(r["corr_layer1"], 6), round(r["corr_layer2"], 6), r["covered_layer2"]) for r in rows]
        [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)]
    """

    def __init__(self, teacher, x_eval):
        self.teacher, self.x = teacher, x_eval

    def on_eval(self, state) -> None:
        for layer, c in enumerate(ts.layer_correlations(self.teacher, state.model, self.x)):
            table = ts.match_table(c)
            state.history[-1][f"corr_layer{layer + 1}"] = table["mean_best"]
            state.history[-1][f"covered_layer{layer + 1}"] = table["covered"]


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one student (or the BatchNorm CNN) for one seed and measures how its nodes match the teacher's: best
    correlations per layer, coverage, the luck rank at initialisation, fan-out norms, BatchNorm biases; returns them.

    Example:
        The reported test loss is the saved student's mean squared error against the teacher on the seed's data:

        >>> import tempfile, torch
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.train import evaluate, mse
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "multipliers=1"], scale="smoke")
        >>> job = next(j for j in plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu") if j.arm.kind == "mult1")
        >>> final = run_job(job)
        >>> teacher = ts.make_teacher(widths=cfg.teacher_widths, version="2019", seed=0)
        >>> data = ts.teacher_data(teacher, cfg.train_size, cfg.test_size, seed=0)
        >>> student = ts.ReLUNet(20, list(cfg.teacher_widths), 100)
        >>> student.load_state_dict(torch.load(job.run_dir / "model.pt", weights_only=True))
        <All keys matched successfully>
        >>> loss = evaluate(student, data.x_test, data.y_test, mse, classification=False)["loss"]
        >>> abs(loss - final["test_loss"]) < 1e-6 * loss
        True
    """
    cfg, kind = run.cfg, run.arm.kind
    if kind == "bn_cnn_digits":
        data = run.data("digits")
        model = build_model("cnn", data.input_shape, data.num_classes, batchnorm=True, channels=cfg.bn_channels)
        history = run.fit(model, data, run.train_config(cfg.bn))
        fractions = ts.bn_bias_fractions(model)
        return {**history[-1], "bn_negative": fractions, "bn_negative_mean": float(np.mean(list(fractions.values())))}
    if kind == "two_layer":
        teacher = ts.make_teacher(widths=(cfg.two_layer_width,), version="2020", seed=0, strength_decay=0.0)
        student = ts.ReLUNet(20, [cfg.two_layer_width * _max_mult(cfg)], 100)
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(cfg.student_scale)
        tc = run.train_config(cfg.two_layer, batch_size=cfg.train.batch_size)
    else:
        version = {"random_teacher": "random", "teacher2020": "2020"}.get(kind, "2019")
        mult = int(kind[4:]) if kind.startswith("mult") else _max_mult(cfg)
        teacher = ts.make_teacher(widths=cfg.teacher_widths, version=version, seed=0)
        if kind == "bn_student":  # the premise of the BatchNorm reading: sparsely, rarely jointly firing nodes
            ts.set_firing_rate(teacher, cfg.bn_teacher_firing)
        student = ts.ReLUNet(20, [w * mult for w in cfg.teacher_widths], 100, batchnorm=kind == "bn_student")
        tc = run.train_config(cfg.train)
    data = ts.teacher_data(teacher, cfg.train_size, cfg.test_size, seed=run.seed)
    x_eval = data.x_test[:5000]
    initial = copy.deepcopy(student)
    corr_init = ts.layer_correlations(teacher, student, x_eval)
    fan_out_init = ts.fan_out_norms(student)
    history = run.fit(student, data, tc, callbacks=[CorrelationMonitor(teacher, x_eval)])
    student = student.cpu()
    corr = ts.layer_correlations(teacher, student, x_eval)
    fan_out = ts.fan_out_norms(student)
    act_std = [h.std(0) for h in ts.hidden_activations(student, x_eval)]
    layers, final = [], {**history[-1]}
    for li, (c0, c, f, f0, sd) in enumerate(zip(corr_init, corr, fan_out, fan_out_init, act_std), start=1):
        table = ts.match_table(c)
        best = c.max(0).values
        layers.append({"mean_best": table["mean_best"], "covered": table["covered"],
                       "hits_mean": float(table["hits"].double().mean()),
                       "teacher_best": table["best"].tolist(), "luck_rank": ts.luck_ranks(c0, c).tolist(),
                       "student_best": best.tolist(), "fan_out": f.tolist(), "fan_out_init": f0.tolist(),
                       "act_std": sd.tolist(), "students": c.shape[1]})
        groups = {"unmatched": cfg.unmatched_corr, "matched": cfg.matched_corr}
        final[f"fan_out_ratio_layer{li}"] = ts.fan_out_ratio(best, f, f0, **groups)
        final[f"contribution_ratio_layer{li}"] = ts.fan_out_ratio(best, f * sd.float(), **groups)
    ranks = np.concatenate([np.array(layer["luck_rank"]) / max(layer["students"] - 1, 1) for layer in layers])
    final.update({"layers": layers, "luck_rank_mean": float(ranks.mean()),
                  "covered_mean": float(np.mean([layer["covered"] for layer in layers]))})
    if kind == "bn_student":
        fractions = ts.bn_bias_fractions(student)
        final.update({"bn_negative": fractions, "bn_negative_mean": float(np.mean(list(fractions.values()))),
                      "teacher_coactivation": ts.coactivation(teacher, x_eval)})
    if kind == f"mult{_max_mult(cfg)}":
        pruning = _pruning(cfg, student, initial.cpu(), corr, data, run)
        final.update({"pruning": pruning, "pruning_gap": pruning["random_pruned"] - pruning["lucky_pruned"],
                      "finetune_gap": pruning["reinit"] - pruning["lucky_finetuned"],
                      "rewind_gap": pruning["reinit"] - pruning["lucky_rewound"]})
    return final


def _seed_mean(finals: list[dict], key: str) -> float:
    """Mean over seeds, leaving out the seeds where the value is undefined (NaN, stored as null)."""
    vals = [f[key] for f in finals if f.get(key) is not None and np.isfinite(f[key])]
    return float(np.mean(vals)) if vals else float("nan")


PRUNING_ARMS = ("lucky_finetuned", "random_finetuned", "reinit", "lucky_rewound")


def lucky_nodes(corr: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Per layer, every student node whose best correlation with a teacher node reaches ``threshold``
    (duplicates of one teacher node included); each teacher node's best student when none does.

    Example:
        Rows are teacher nodes, columns student nodes:

        >>> corr = torch.tensor([[0.90, 0.20, 0.95],
        ...                      [0.10, 0.30, 0.20]])
        >>> lucky_nodes([corr], 0.8)[0].tolist()          # students 0 and 2 both reach teacher 0 (duplicates kept)
        [0, 2]
        >>> lucky_nodes([corr], 0.99)[0].tolist()         # none reaches it: each teacher's best student
        [1, 2]
    """
    out = []
    for c in corr:
        keep = torch.nonzero(c.max(0).values >= threshold).flatten()
        out.append(keep if len(keep) else torch.unique(c.argmax(1)))
    return out


def _pruning(cfg: LuckConfig, student, initial, corr, data, run: Run) -> dict:
    """Prune to the lucky nodes and to as many random ones; evaluate as pruned, then give every arm that
    trains the same budget (``prune_epochs``): fine-tune the kept nodes, fine-tune the random ones, train the
    same shape from a fresh initialisation, and rewind the kept nodes to their initial weights."""
    keep = lucky_nodes(corr, cfg.prune_corr)
    g = derive(run.seed, "random-nodes")
    random_keep = [torch.randperm(c.shape[1], generator=g)[:len(k)].sort().values for c, k in zip(corr, keep)]
    x, y = data.x_test, data.y_test
    loss = lambda m: evaluate(m, x, y, mse, classification=False)["loss"]  # noqa: E731
    out = {"nodes_kept": [len(k) for k in keep], "full": loss(student),
           "lucky_pruned": loss(ts.prune_to_nodes(student, keep)),
           "random_pruned": loss(ts.prune_to_nodes(student, random_keep))}
    nets = {"lucky_finetuned": ts.prune_to_nodes(student, keep),
            "random_finetuned": ts.prune_to_nodes(student, random_keep),
            "reinit": ts.prune_to_nodes(student, keep, reinit=True, seed=run.seed),
            "lucky_rewound": ts.prune_to_nodes(initial, keep)}
    out["steps"] = {}
    for name in PRUNING_ARMS:
        tc = run.train_config(cfg.train, epochs=cfg.prune_epochs)
        history = run.fit(nets[name], data, tc, sub=f"prune_{name}")
        out[name], out["steps"][name] = loss(nets[name].cpu()), history[-1]["step"]
    return out


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (correlation by epoch and layer, coverage by width, fan-out, BatchNorm biases) and notes on each of the
    paper's observations.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = next(n for n in analyze(results) if n.startswith("over-parameterization"))
        >>> loss = {m: np.mean(list(results.values(f"mult{m}", "test_loss").values())) for m in cfg.multipliers}
        >>> reported = {m: float(re.search(rf"x{m}: ([0-9]+[.][0-9]+)", note.split("eval loss")[1]).group(1))
        ...             for m in cfg.multipliers}
        >>> all(abs(reported[m] - loss[m]) < 0.005 for m in cfg.multipliers)
        True
    """
    cfg, exp_dir = res.cfg, res.exp_dir
    runs = res.all_runs()
    depth = len(cfg.teacher_widths)
    top = f"mult{_max_mult(cfg)}"
    verdict = []
    fig, axes = plots.subplots(2, 3)
    # 1. mean best correlation per layer vs epoch
    if top in runs:
        plots_by_layer = {f"layer {li}": [[{**r, "m": r[f"corr_layer{li}"]} for r in run] for run in runs[top]]
                          for li in range(1, depth + 1)}
        plots.curves(axes[0][0], plots_by_layer, "m")
        axes[0][0].set(title=f"mean best correlation, multiplier {_max_mult(cfg)}", ylabel="correlation")
        axes[0][0].legend(fontsize=8)
        curves = np.array([[[row[f"corr_layer{li}"] for row in run] for li in range(1, depth + 1)]
                           for run in runs[top]])
        mean = curves.mean(0)  # layers x evals
        reach = [int(np.argmax(m >= 0.9 * m[-1])) + 1 for m in mean]
        ends = ", ".join(f"{v:.3f}" for v in mean[:, -1])
        verdict.append(f"layer by layer: mean best correlation per layer at the end {ends}; "
                       f"epoch reaching 90% of its final value, per layer: {reach} "
                       f"({'lower layers first' if reach == sorted(reach) else 'not in layer order'}; seed mean).")
    # 2. over-parameterisation sweep
    sweep = {m: res.final_list(f"mult{m}") for m in cfg.multipliers}
    sweep = {m: f for m, f in sweep.items() if f}
    if sweep:
        ms = sorted(sweep)
        for li in range(depth):
            axes[0][1].plot(ms, [np.mean([f["layers"][li]["covered"] for f in sweep[m]]) for m in ms], "o-",
                            label=f"layer {li + 1}")
        axes[0][1].set(xscale="log", xlabel="multiplier", ylabel="teacher nodes covered (corr >= 0.95)",
                       title="over-parameterization")
        ax2 = axes[0][1].twinx()
        ax2.plot(ms, [np.mean([f["test_loss"] for f in sweep[m]]) for m in ms], "k--", label="eval loss")
        ax2.set_ylabel("eval loss")
        axes[0][1].legend(fontsize=8)
        cov = {m: np.mean([np.mean([layer["covered"] for layer in f["layers"]]) for f in sweep[m]]) for m in ms}
        loss = {m: np.mean([f["test_loss"] for f in sweep[m]]) for m in ms}
        verdict.append("over-parameterization: mean fraction of teacher nodes covered " +
                       ", ".join(f"x{m}: {cov[m]:.2f}" for m in ms) + "; eval loss " +
                       ", ".join(f"x{m}: {loss[m]:.3g}" for m in ms) + ".")
    tops = res.final_list(top)
    if tops:
        # 3. luck scatter, 4. L-shape
        ranks = np.concatenate([np.array(li["luck_rank"]) / max(li["students"] - 1, 1)
                                for f in tops for li in f["layers"]])
        best = np.concatenate([li["teacher_best"] for f in tops for li in f["layers"]])
        axes[0][2].scatter(ranks, best, s=6, alpha=0.5)
        axes[0][2].set(xlabel="rank at init of the final best student (0 = luckiest, 1 = least)",
                       ylabel="final best correlation", title="luck")
        for li in range(depth):
            sb = np.concatenate([f["layers"][li]["student_best"] for f in tops])
            rel = np.concatenate([np.array(f["layers"][li]["fan_out"]) / np.array(f["layers"][li]["fan_out_init"])
                                  for f in tops])
            axes[1][0].scatter(sb, rel, s=4, alpha=0.4, label=f"layer {li + 1}")
        axes[1][0].set(xlabel="student's best correlation with a teacher node",
                       ylabel="fan-out norm / its initial value", title="L-shape", yscale="log")
        axes[1][0].legend(fontsize=8)
        verdict.append(f"winner takes all / luck: the final best student of a teacher node ranked, at init, in the "
                       f"top {100 * np.mean(ranks):.0f}% on average (median {100 * np.median(ranks):.0f}%; 50% "
                       "would mean luck does not matter).")
        for arm in (top, "two_layer"):
            fs = res.final_list(arm)
            if fs:
                n_layers = len(fs[0]["layers"])
                rel, con = ([_seed_mean(fs, f"{m}_layer{li}") for li in range(1, n_layers + 1)]
                            for m in ("fan_out_ratio", "contribution_ratio"))
                verdict.append(f"fan-out, {arm}: unmatched (best corr < {cfg.unmatched_corr:g}) over matched "
                               f"(>= {cfg.matched_corr:g}) students per layer, "
                               "final/initial fan-out norm " + "/".join(f"{v:.2f}" for v in rel)
                               + "; fan-out x activation std " + "/".join(f"{v:.2f}" for v in con)
                               + " (seed means; below 1 is the L-shape).")
        pr = [f["pruning"] for f in tops if "pruning" in f]
        if pr:
            keys = ("full", "lucky_pruned", "random_pruned", *PRUNING_ARMS)
            vals = {k: np.array([p[k] for p in pr]) for k in keys}
            axes[1][1].bar(range(len(keys)), [vals[k].mean() for k in keys], yerr=[vals[k].std() for k in keys],
                           capsize=3)
            axes[1][1].set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
            axes[1][1].set(ylabel="eval loss", yscale="log", title=f"pruning to {pr[0]['nodes_kept']} nodes")
            verdict.append("pruning to the lucky nodes: eval loss " + ", ".join(
                f"{k} {vals[k].mean():.3g}" for k in keys)
                + f" (every trained arm: {pr[0]['steps']['reinit']} steps; rewound = the kept nodes' initial "
                  "weights).")
    # 5. structured vs random teacher, 2020 teacher
    rows = []
    for arm, label in ((top, "structured 2019"), ("teacher2020", "2020 (median bias, strengths)"),
                       ("random_teacher", "random")):
        fs = res.final_list(arm)
        if fs:
            rows.append((label, [np.mean([f["layers"][li]["mean_best"] for f in fs]) for li in range(depth)]))
    for i, (label, vals) in enumerate(rows):
        axes[1][2].bar(np.arange(depth) + 0.25 * i, vals, width=0.25, label=label)
    axes[1][2].set(xlabel="layer", ylabel="mean best correlation", title="teacher kind")
    axes[1][2].set_xticks(np.arange(depth) + 0.25, [str(li + 1) for li in range(depth)])
    axes[1][2].legend(fontsize=8)
    if rows:
        verdict.append("teacher kind: mean best correlation per layer " + "; ".join(
            f"{label}: {', '.join(f'{v:.2f}' for v in vals)}" for label, vals in rows) + ".")
    plots.save(fig, exp_dir / "luck_matters.png")
    # 6. BatchNorm biases
    for arm, label in (("bn_cnn_digits", "BN CNN on digits"), ("bn_student", "BN student on the teacher")):
        fs = res.final_list(arm)
        if fs and "bn_negative" in fs[0]:
            names = sorted(fs[0]["bn_negative"], key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
            fr = {n: np.mean([f["bn_negative"][n] for f in fs]) for n in names}
            verdict.append(f"BatchNorm biases, {label}: fraction negative per layer " +
                           ", ".join(f"{n} {v:.2f}" for n, v in fr.items()) +
                           ".")
            if "teacher_coactivation" in fs[0]:  # the premise, measured: a sparsely and rarely jointly firing teacher
                verdict.append("the BN student's teacher (the paper's premise): firing rate / co-activation ratio "
                               "P(j fires | i fires) per layer " + ", ".join(
                                   f"{c['firing_rate']:.2f} / {c['coactivation_ratio']:.2f}"
                                   for c in fs[0]["teacher_coactivation"]) + ".")
    return verdict


EXPERIMENT = Experiment(
    name="luck_matters",
    description="Luck Matters (Tian et al. 2019): teacher-student node specialization, luck, fan-out, pruning, "
                "BN biases.",
    paper_setting="teacher-student deep ReLU networks on Gaussian inputs (the authors' teachers "
                  "and notebooks); BatchNorm biases of trained CIFAR-10 / ImageNet CNNs",
    deviations=(
        "shorter training and fewer students than the authors' notebooks",
        "the BatchNorm-bias reading uses a small CNN trained on digits, not pretrained ImageNet "
        "networks",
    ),
    config=LuckConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"multipliers": (1, 2), "train_size": 1000, "test_size": 500, "epochs": 1, "bn_epochs": 1, "seeds": 2,
           "bn_channels": (8, 8, 8), "prune_epochs": 1, "two_layer_steps": 100},
    quick={"train_size": 20_000, "test_size": 5000, "epochs": 8, "bn_epochs": 5, "seeds": 3, "prune_epochs": 2,
           "two_layer_steps": 10_000},
    table_metrics=("test_loss", "train_loss", "corr_layer1", "corr_layer2", "corr_layer3", "corr_layer4", "test_acc"),
)
