"""Private and certifiably robust training: the privacy-utility and robustness-utility trade-offs.

On ``dataset`` (digits by default; ``cifar10`` when its files are present and you have the budget: per-example
gradients make DP-SGD slow on a CPU), an MLP is trained by SGD (``nonprivate``) or DP-SGD at target epsilon
in ``epsilons`` (delta = ``delta``,
RDP accountant picks the noise multiplier; PRV epsilon reported beside it), each with and without
adversarial training (PGD l-inf, ``adv_eps``, mixed with weight ``adv_alpha``) and with Gaussian noise
augmentation at each sigma in ``augment_sigmas`` (0 = none). Evaluation: clean accuracy, PGD accuracy at
``linf_eps`` and ``l2_eps``, randomized-smoothing certified accuracy versus l2 radius (sigma = the arm's
augmentation sigma, or ``cert_sigma`` without augmentation) on ``cert_examples`` test images, epsilon spent.

Pixels stay in [0, 1] (public constants), so no statistic of the private training set is released
unaccounted; attacks are clipped to that range. ``secure_mode=true`` draws DP-SGD's noise and Poisson
batches from a CSPRNG (Opacus's secure_mode) instead of the public run seed; each run records which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import plots
from ..data import Data, load_dataset
from ..evidence import Claim, quoted
from ..fields import option
from ..methods import privacy, robustness
from ..models import build_model
from ..streams import derive
from ..train import TrainConfig, loss_step
from .registry import Arm, Experiment, ExperimentConfig, training_phase
from .config import check_choices, check_private_validation, private_selection_note
from .runner import Results, Run

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
CLAIM_RADIUS = 0.5  # l2 radius at which the certification claim is judged


@dataclass
class PrivacyConfig(ExperimentConfig):
    """PrivacyConfig.

    Example:
        An unknown DP engine is refused, and so is selection on a validation split of the private training set:

        >>> from backproplab.experiments import make_config
        >>> make_config(EXPERIMENT, ["engine=jax"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 'jax' for 'engine': unknown; choose from ghost, opacus
        >>> make_config(EXPERIMENT, ["validation=0.2"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: validation=0.2 on a private training set: ...
    """
    dataset: str = option("digits", "dataset (digits offline; local files for the others)")
    epsilons: tuple[float, ...] = option((1.0, 3.0, 8.0), "target epsilons of the DP arms", gt=0)
    nonprivate: bool = option(True, "also train a non-private arm")
    adversarial: tuple[str, ...] = option(("clean", "adv"), "clean and/or adversarial training")
    augment_sigmas: tuple[float, ...] = option((0.0, 0.25, 0.5), "Gaussian noise augmentation levels")
    delta: float = option(1e-5, "the DP delta", gt=0, lt=1)
    max_grad_norm: float = option(1.0, "per-example clipping norm", gt=0)
    noise_multiplier: float = option(0.0, "> 0: use this noise for every DP arm instead of the target epsilon")
    widths: tuple[int, ...] = option((128,), "hidden widths of the MLP", ge=1)
    # every arm's SGD; a private arm's lot is the Poisson-sampled batch of batch_size expected examples
    train: TrainConfig = training_phase("SGD of every arm", optimizer="sgd",
                                        epochs=option(20, "training epochs", ge=1),
                                        batch_size=option(64, "expected Poisson batch size", ge=1),
                                        lr=option(0.5, "SGD learning rate", gt=0))
    adv_eps: float = option(0.3, "l_inf size of training attacks")
    adv_alpha: float = option(1.0, "weight of the adversarial loss")
    adv_steps: int = option(5, "PGD steps of training attacks", ge=1)
    linf_eps: tuple[float, ...] = option((0.1, 0.3, 0.5), "l_inf attack sizes evaluated")
    l2_eps: tuple[float, ...] = option((0.5, 1.0, 2.0), "l_2 attack sizes evaluated")
    pgd_steps: int = option(20, "PGD steps of evaluation attacks", ge=1)
    cert_sigma: float = option(0.25, "randomized-smoothing noise for certification", gt=0)
    cert_examples: int = option(200, "test inputs certified", ge=1)
    cert_n0: int = option(100, "selection samples per certified input", ge=1)
    cert_n: int = option(1000, "estimation samples per certified input", ge=1)
    cert_alpha: float = option(0.001, "certification failure probability", lt=1)
    secure_mode: bool = option(False, "Opacus's secure_mode (CSPRNG noise and sampling) for the DP arms")
    engine: str = option(
        "ghost", "DP-SGD's clipping engine: ghost (per-example norms, no per-example gradients) or opacus")
    validation_public: bool = option(False, "the validation split a sweep selects on is public data (else refused)")

    def validate(self) -> None:
        check_choices("engine", (self.engine,), privacy.ENGINES)
        check_private_validation(self, private_arms=True)  # epsilons is never empty


def _privacy_levels(cfg: PrivacyConfig) -> list[str]:
    """The arms' privacy levels: ``eps<target>`` per target epsilon, or, when ``noise_multiplier`` fixes the noise
    instead, one level ``noise<sigma>`` (a folder named eps8 must hold a run that targeted epsilon 8)."""
    private = [f"noise{cfg.noise_multiplier:g}"] if cfg.noise_multiplier else [f"eps{e:g}" for e in cfg.epsilons]
    return (["nonprivate"] if cfg.nonprivate else []) + private


@dataclass(frozen=True)
class PrivacyArm(Arm):
    """PrivacyArm.

    Example:
        >>> arm = PrivacyArm("eps1", "adv", 0.5)                        # privacy level, training, augmentation noise
        >>> arm.name, arm.private, PrivacyArm("nonprivate", "clean", 0.0).private
        ('eps1-adv-aug0.5', True, False)
    """
    level: str  # "nonprivate", "eps<target epsilon>" or "noise<noise multiplier>"
    training: str  # "clean" | "adv"
    augment_sigma: float

    @property
    def name(self) -> str:
        return f"{self.level}-{self.training}-aug{self.augment_sigma:g}"

    @property
    def private(self) -> bool:
        return self.level != "nonprivate"

    @property
    def epsilon(self) -> float | None:
        """The target epsilon of an ``eps`` level (None for the others)."""
        return float(self.level[3:]) if self.level.startswith("eps") else None


def arms(cfg: PrivacyConfig) -> list[PrivacyArm]:
    """The experiment's arms for ``cfg``, typed records; ``arm.name`` is the results folder.

    Example:
        >>> from backproplab.experiments import make_config
        >>> quick = arms(make_config(EXPERIMENT, scale="quick"))
        >>> len(quick), len({arm.name for arm in quick}) == len(quick)      # each arm its own results folder
        (12, True)
    """
    return [PrivacyArm(p, a, s) for p in _privacy_levels(cfg) for a in cfg.adversarial for s in cfg.augment_sigmas]


# The papers' own words behind each claim (their abstracts), verbatim.
_ABADI = ("Abadi et al., abstract: \"we can train deep neural networks with non-convex objectives, under a modest "
          "privacy budget, and at a manageable cost in software complexity, training efficiency, and model quality\"")
QUOTES = {
    "privacy.dpsgd": _ABADI,
    "privacy.adversarial_training_robust": "Madry et al., abstract: \"These methods let us train networks with "
                                           "significantly improved resistance to a wide range of adversarial "
                                           "attacks.\"",
    "privacy.smoothing": "Cohen et al., abstract: \"We show how to turn any classifier that classifies well under "
                         "Gaussian noise into a new classifier that is certifiably robust to adversarial perturbations "
                         "under the l2 norm.\"",
}


def claims(cfg: PrivacyConfig) -> list[Claim]:
    """The claims ``cfg`` can judge (the paper's, quoted, and the lab's extensions), over its arms' final metrics.

    Example:
        >>> from backproplab.experiments import make_config
        >>> cfg = make_config(EXPERIMENT, scale="quick")
        >>> names, found = {arm.name for arm in arms(cfg)}, claims(cfg)
        >>> len(found), all(c.arm in names and c.baseline in names | {None} for c in found)   # judged on its arms
        (6, True)
    """
    have = {a.name for a in arms(cfg)}
    acc = "clean test accuracy (fraction)"
    out = []
    lo, hi = min(cfg.epsilons, default=None), max(cfg.epsilons, default=None)
    clean = lambda level, s=0.0: PrivacyArm(level, "clean", s).name  # noqa: E731
    if lo is not None and lo != hi and {clean(f"eps{hi:g}"), clean(f"eps{lo:g}")} <= have:
        out.append(Claim("privacy.dpsgd.utility_grows_with_epsilon", "Abadi et al., CCS 2016", "Fig. 4 / Section 5",
                         "DP-SGD's accuracy rises with the privacy budget epsilon.", "test_acc", clean(f"eps{hi:g}"),
                         "greater", 0.0, "MNIST: about 90 / 95 / 97% at epsilon 0.5 / 2 / 8",
                         baseline=clean(f"eps{lo:g}"), metric_label=acc))
    if hi is not None and {clean("nonprivate"), clean(f"eps{hi:g}")} <= have:
        out.append(Claim("privacy.dpsgd.cost_of_privacy", "Abadi et al., CCS 2016", "Section 5",
                         "Even at the largest budget, DP-SGD stays below non-private training.", "test_acc",
                         clean("nonprivate"), "greater", 0.0, "MNIST: 98.3% non-private vs 97% at epsilon 8",
                         baseline=clean(f"eps{hi:g}"), metric_label=acc))
    mid = cfg.linf_eps[len(cfg.linf_eps) // 2] if cfg.linf_eps else None
    for level in _privacy_levels(cfg):
        adv, plain = PrivacyArm(level, "adv", 0.0).name, clean(level)
        if mid is not None and {adv, plain} <= have:
            out.append(Claim(f"privacy.adversarial_training_robust.{level}", "Madry et al., ICLR 2018", "Table 2",
                             f"PGD adversarial training raises accuracy under a PGD l-inf attack of size {mid:g} "
                             f"({level}).", f"pgd_linf_{mid:g}", adv, "greater", 0.0,
                             "MNIST: 89% under PGD eps 0.3 with adversarial training, near 0% without",
                             baseline=plain, metric_label=f"test accuracy under PGD l-inf {mid:g} (fraction)",
                             extension="" if level == "nonprivate" else
                             f"Madry et al. train without privacy; adversarial training under DP-SGD ({level}) is "
                             "this lab's extension"))
    sigmas = [s for s in cfg.augment_sigmas if s > 0]
    if sigmas and clean("nonprivate") in have:
        s = max(sigmas)
        out.append(Claim("privacy.smoothing.noise_training_certifies", "Cohen et al., ICML 2019", "Table 1 / Fig. 6",
                         f"A model trained with Gaussian noise (sigma {s:g}) and smoothed at that sigma has higher "
                         f"certified accuracy at l2 radius {CLAIM_RADIUS:g} than one trained without noise.",
                         f"certified_l2_{CLAIM_RADIUS:g}", clean("nonprivate", s), "greater", 0.0,
                         "ImageNet / CIFAR-10: noise-trained smoothed classifiers certify large l2 radii",
                         baseline=clean("nonprivate"),
                         metric_label=f"certified accuracy at l2 radius {CLAIM_RADIUS:g} (fraction of inputs)"))
    return quoted(out, QUOTES)


def _model(cfg: PrivacyConfig, data: Data):
    return build_model("mlp", data.input_shape, data.num_classes, widths=cfg.widths)


def load_trained(cfg: PrivacyConfig, arm: PrivacyArm, run_dir: Path):
    """(model, data, sigma) of a finished run, for ``backproplab certify``.

    Example:
        >>> import tempfile
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> from backproplab.train import cross_entropy, evaluate
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "epsilons=8"], scale="smoke")
        >>> job = next(j for j in plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu") if not j.arm.private)
        >>> final = run_job(job)
        >>> model, data, sigma = load_trained(cfg, job.arm, job.run_dir)
        >>> abs(evaluate(model, data.x_test, data.y_test, cross_entropy)["acc"] - final["test_acc"]) < 1e-9
        True
    """
    data = load_dataset(cfg.dataset, root=cfg.data_root or None, seed=_seed_of(run_dir), unit_range=True)
    model = _model(cfg, data)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("_module."): v for k, v in state.items()})
    return model.eval(), data, arm.augment_sigma or cfg.cert_sigma


def _seed_of(run_dir: Path) -> int:
    """The run's seed as its ``config.json`` records it (a copied or renamed folder keeps it; its name may not)."""
    import json

    return int(json.loads((run_dir / "config.json").read_text())["seed"])


def certify_run(model, data: Data, sigma: float, n0: int, n: int, alpha: float, examples: int, seed: int = 0,
                extra_radii: tuple[float, ...] = ()):
    """certify_run.

    The certified accuracy of ``model`` smoothed with noise ``sigma`` on the first ``examples`` test images, at the
    radii of :data:`RADII` scaled to ``sigma`` (Cohen et al.'s CERTIFY per image, seeded).

    Example:
        A classifier that always answers 3 is certified at every image to the radius sigma Phi^-1(alpha^(1/n)): the
        accuracy is the share of 3s up to that radius, 0 beyond:

        >>> from scipy.stats import norm
        >>> from backproplab.data import Data
        >>> class Three(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()
        >>> labels = torch.tensor([3, 3, 1, 3])
        >>> data = Data("toy", torch.rand(4, 2), labels, torch.rand(4, 2), labels, 10)
        >>> radii, acc = certify_run(Three(), data, sigma=0.5, n0=10, n=100, alpha=0.001, examples=4)
        >>> limit = 0.5 * norm.ppf(0.001 ** (1 / 100))
        >>> all(a == (0.75 if r <= limit else 0.0) for r, a in zip(radii, acc))
        True

    References:
        Cohen, Rosenfeld and Kolter, ICML 2019 (arXiv:1902.02918), CERTIFY.
    """
    g = derive(seed, "certification")
    x, y = data.x_test[:examples], data.y_test[:examples]
    results = [robustness.certify(model, xi, sigma, n0, n, alpha, data.num_classes, generator=g) for xi in x]
    radii = [r * sigma / 0.25 for r in RADII] if sigma else list(RADII)
    radii = sorted(set(radii) | set(extra_radii))
    return radii, robustness.certified_accuracy(results, y, radii)


def run_arm(run: Run) -> dict:
    """run_arm.

    Trains one arm (non-private, or DP-SGD at a target epsilon; clean or adversarial; with or without Gaussian
    augmentation), then attacks and certifies it; returns the metrics.

    Example:
        A DP-SGD arm spends no more than its target epsilon, by the accountant that chose its noise:

        >>> import tempfile
        >>> from backproplab.experiments import make_config, plan, run_job
        >>> cfg = make_config(EXPERIMENT, ["seeds=1", "epsilons=1"], scale="smoke")
        >>> job = next(j for j in plan(EXPERIMENT, cfg, out=tempfile.mkdtemp(), device="cpu") if j.arm.private)
        >>> final = run_job(job)
        >>> job.arm.name, final["epsilon_rdp"] <= 1.0 + 1e-6, final["noise_multiplier"] > 0
        ('eps1-clean-aug0', True, True)
    """
    cfg, arm = run.cfg, run.arm
    eps, sigma = arm.epsilon, arm.augment_sigma
    # pixels in [0, 1], not standardised with the private training set's own statistics (an unaccounted release)
    data = run.data(cfg.dataset, unit_range=True)
    model = _model(cfg, data)
    tc = run.train_config(cfg.train)
    loss_terms = None
    if arm.training == "adv":
        loss_terms = robustness.adversarial_loss(robustness.pgd, cfg.adv_alpha, eps=cfg.adv_eps, steps=cfg.adv_steps,
                                                 clip=(0.0, 1.0))
    if sigma > 0:
        noisy = robustness.gaussian_augmentation(sigma)
        loss_terms = noisy if loss_terms is None else _both(noisy, loss_terms)
    if not arm.private:
        step = None if loss_terms is None else loss_step(lambda batch, state: loss_terms(state.model, batch.x, batch.y))
        history = run.fit(model, data, tc, step=step)
        trained = model
    else:
        model = privacy.prepare_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=tc.lr)
        dpc = privacy.DPConfig(noise_multiplier=cfg.noise_multiplier or None, max_grad_norm=cfg.max_grad_norm,
                               target_epsilon=None if cfg.noise_multiplier else eps, delta=cfg.delta,
                               secure_mode=cfg.secure_mode, engine=cfg.engine)
        dp = privacy.DPSGD(model, opt, len(data.x_train), tc.batch_size,
                           privacy.planned_steps(tc, len(data.x_train)), dpc, seed=run.seed)
        history = run.fit(dp.model, data, tc, optimizer=dp.optimizer, step=dp.step(loss_terms), callbacks=[dp])
        trained = dp.detach()  # evaluation and attacks need plain gradients, not per-example ones
    trained.eval()
    final = dict(history[-1])
    if arm.private:
        final["selection_privacy"] = private_selection_note(cfg)
    x, y = data.x_test, data.y_test
    for e in cfg.linf_eps:
        final[f"pgd_linf_{e:g}"] = robustness.robust_accuracy(trained, x, y, "pgd", e, steps=cfg.pgd_steps,
                                                              clip=(0.0, 1.0))
    for e in cfg.l2_eps:
        final[f"pgd_l2_{e:g}"] = robustness.robust_accuracy(trained, x, y, "pgd", e, steps=cfg.pgd_steps, norm="l2",
                                                            clip=(0.0, 1.0))
    radii, cert = certify_run(trained, data, sigma or cfg.cert_sigma, cfg.cert_n0, cfg.cert_n, cfg.cert_alpha,
                              cfg.cert_examples, run.seed, extra_radii=(CLAIM_RADIUS,))
    final["certified"] = {f"{r:.3g}": a for r, a in zip(radii, cert)}
    final[f"certified_l2_{CLAIM_RADIUS:g}"] = dict(zip(radii, cert))[CLAIM_RADIUS]
    final["cert_sigma"] = sigma or cfg.cert_sigma
    return final


def _both(first, second):
    def loss_terms(model, x, y):
        return 0.5 * (first(model, x, y) + second(model, x, y))
    return loss_terms


def analyze(res: Results) -> list[str]:
    """analyze.

    Figures (privacy-utility, PGD accuracy by attack size, certified accuracy by radius) and notes: each level's
    clean accuracy and the epsilon it spent.

    Example:
        >>> import re, tempfile, numpy as np
        >>> from backproplab.experiments import Results, make_config, run
        >>> cfg = make_config(EXPERIMENT, ["seeds=2", "epsilons=8"], scale="smoke")
        >>> folder = run(EXPERIMENT, cfg, out=tempfile.mkdtemp(), progress=False)
        >>> results = Results(folder, cfg, arms(cfg), lambda arm: cfg.seeds)
        >>> note = next(n for n in analyze(results) if n.startswith("privacy-utility: eps8"))
        >>> spent = np.mean(list(results.values("eps8-clean-aug0", "epsilon_rdp").values()))
        >>> bool(abs(float(re.search(r"RDP ([0-9.]+)", note).group(1)) - spent) < 0.005)
        True
    """
    cfg, exp_dir = res.cfg, res.exp_dir
    levels = _privacy_levels(cfg)
    finals = {arm.name: res.final_list(arm.name) for arm in arms(cfg)}
    finals = {a: f for a, f in finals.items() if f}
    mean = lambda arm, key: float(np.mean([f[key] for f in finals[arm]]))  # noqa: E731
    fig, axes = plots.subplots(1, 4)
    # privacy-utility: clean accuracy vs epsilon
    for adv in cfg.adversarial:
        for s in cfg.augment_sigmas:
            xs, ys = [], []
            for p in levels:
                arm = f"{p}-{adv}-aug{s:g}"
                if arm in finals:
                    eps = mean(arm, "epsilon_rdp") if p != "nonprivate" else None
                    xs.append(eps if eps else 30.0)
                    ys.append(mean(arm, "test_acc"))
            axes[0][0].plot(xs, ys, "o-", label=f"{adv}, aug {s:g}")
    axes[0][0].set(xscale="log", xlabel="epsilon spent (RDP; 30 = non-private)", ylabel="clean accuracy",
                   title="privacy-utility")
    # robustness: PGD accuracy vs size, l-inf and l2 (no augmentation arms)
    for p in levels:
        for adv in cfg.adversarial:
            arm = f"{p}-{adv}-aug0"
            if arm in finals:
                axes[0][1].plot([0, *cfg.linf_eps],
                                [mean(arm, "test_acc")] + [mean(arm, f"pgd_linf_{e:g}") for e in cfg.linf_eps],
                                "o-", label=f"{p} {adv}")
                axes[0][2].plot([0, *cfg.l2_eps],
                                [mean(arm, "test_acc")] + [mean(arm, f"pgd_l2_{e:g}") for e in cfg.l2_eps],
                                "o-", label=f"{p} {adv}")
    axes[0][1].set(xlabel="PGD l-inf size", ylabel="accuracy", title="l-inf attacks (no augmentation)")
    axes[0][2].set(xlabel="PGD l2 size", ylabel="accuracy", title="l2 attacks (no augmentation)")
    # certified accuracy vs radius (augmented arms)
    for arm, fs in finals.items():
        if arm.endswith("-aug0") and any(s > 0 for s in cfg.augment_sigmas):
            continue  # curves of the noise-trained models only
        radii = [float(r) for r in fs[0]["certified"]]
        acc = [np.mean([f["certified"][k] for f in fs]) for k in fs[0]["certified"]]
        axes[0][3].plot(radii, acc, label=arm, lw=1)
    axes[0][3].set(xlabel="l2 radius", ylabel="certified accuracy", title="randomized smoothing")
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    plots.save(fig, exp_dir / "privacy_robustness.png")
    verdict = []
    for p in levels:
        arm = f"{p}-clean-aug0"
        if arm in finals:
            accs = np.array([f["test_acc"] for f in finals[arm]])
            spent = "" if p == "nonprivate" else (f", epsilon spent RDP {mean(arm, 'epsilon_rdp'):.2f} / PRV "
                                                   f"{mean(arm, 'epsilon_prv'):.2f} at noise "
                                                   f"{mean(arm, 'noise_multiplier'):.2f} (noise from "
                                                   f"{finals[arm][0].get('noise_source', '?')}; sigma chosen by "
                                                   f"the {finals[arm][0].get('accountant_for_target') or 'given'} "
                                                   "accountant; Opacus's default is PRV, which picks a "
                                                   "smaller sigma for the same target)")
            verdict.append(f"privacy-utility: {p} clean accuracy {100 * accs.mean():.1f}% (sd "
                           f"{100 * accs.std():.1f}){spent}.")
    mid = cfg.linf_eps[len(cfg.linf_eps) // 2]
    for p in levels:
        a, b = f"{p}-clean-aug0", f"{p}-adv-aug0"
        if a in finals and b in finals:
            verdict.append(f"robustness-utility, {p}: adversarial training moves clean accuracy "
                           f"{100 * mean(a, 'test_acc'):.1f}% -> {100 * mean(b, 'test_acc'):.1f}% and PGD l-inf "
                           f"{mid:g} accuracy {100 * mean(a, f'pgd_linf_{mid:g}'):.1f}% -> "
                           f"{100 * mean(b, f'pgd_linf_{mid:g}'):.1f}%.")
    for p in levels:
        for s in cfg.augment_sigmas:
            arm = f"{p}-clean-aug{s:g}"
            if s > 0 and arm in finals:
                cert = finals[arm][0]["certified"]
                keys = list(cert)
                verdict.append(f"certified, {p}, sigma {s:g}: certified accuracy at l2 radius {' / '.join(keys[:3])}: "
                               + " / ".join(f"{100 * np.mean([f['certified'][k] for f in finals[arm]]):.1f}%"
                                            for k in keys[:3]) + f" (n={cfg.cert_n}, alpha={cfg.cert_alpha}).")
    return verdict


EXPERIMENT = Experiment(
    name="privacy",
    description="DP-SGD (Opacus) at epsilon 1/3/8, adversarial training, randomized-smoothing certification on digits.",
    paper_setting="DP-SGD on MNIST and CIFAR-10 (Abadi et al. 2016); PGD adversarial training on "
                  "MNIST (Madry et al. 2018); randomized smoothing on CIFAR-10 / ImageNet (Cohen "
                  "et al. 2019)",
    deviations=(
        "an MLP on digits (CIFAR-10 when its files are present) for a few epochs",
    ),
    config=PrivacyConfig, arms=arms, run_arm=run_arm, analyze=analyze, claims=claims,
    smoke={"epsilons": (1.0, 8.0), "adversarial": ("clean",), "augment_sigmas": (0.0,), "epochs": 1, "seeds": 2,
           "widths": (32,), "cert_examples": 5, "cert_n0": 10, "cert_n": 20, "pgd_steps": 2, "linf_eps": (0.1,),
           "l2_eps": (0.5,)},
    quick={"epsilons": (1.0, 8.0), "augment_sigmas": (0.0, 0.5), "epochs": 8, "seeds": 2, "cert_examples": 60,
           "cert_n": 300, "pgd_steps": 10, "linf_eps": (0.1, 0.3), "l2_eps": (0.5, 1.5)},
    table_metrics=("test_acc", "epsilon_rdp", "epsilon_prv", "pgd_linf_0.3"),
    load_trained=load_trained,
)
