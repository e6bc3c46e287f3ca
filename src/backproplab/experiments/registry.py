"""The experiments' types and the registry that finds them by name.

An experiment is an :class:`Experiment` record: its config dataclass (a subclass of :class:`ExperimentConfig`
whose fields are :func:`~backproplab.fields.option` declarations), its typed :class:`Arm` records, ``run_arm``,
``claims`` and ``analyze``. The built-in ones live in one module each, named in :data:`BUILTIN` and imported on
first use; :func:`register` adds a user's own. Nothing here parses a config (:mod:`.config`) or runs anything
(:mod:`.runner`): both import this module, never the reverse.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from ..evidence import Claim
from ..fields import option

SCALES = ("smoke", "quick", "full", "paper")


class ConfigError(ValueError):
    """A ``--set`` key or value does not fit the experiment's config, or results of another config are in the way.

    Example:
        >>> from backproplab.experiments import make_config
        >>> make_config(get("baselines"), ["epoch=3"])                       # a typo: the message lists the valid keys
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: unknown key 'epoch' for experiment 'baselines'. Valid keys:...
    """


MAX_SEEDS = 100_000


@dataclass
class ExperimentConfig:
    """ExperimentConfig.

    The fields every experiment's config has; a subclass adds its own, each an :func:`~backproplab.fields.option`
    with its help line and bounds, which ``--set`` reaches, ``--help`` prints and the validator enforces.

    Example:
        >>> from backproplab.experiments import make_config
        >>> @dataclass
        ... class MyConfig(ExperimentConfig):
        ...     lr: float = option(0.1, "learning rate", gt=0)
        >>> mine = Experiment("mine", "my experiment", MyConfig, arms=lambda cfg: [], run_arm=lambda run: {},
        ...                   analyze=lambda results: [])
        >>> cfg = make_config(mine, ["lr=0.5", "seeds=2"])
        >>> cfg.lr, cfg.seeds, cfg.device
        (0.5, 2, 'auto')
        >>> make_config(mine, ["lr=0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 0.0 for 'lr' in experiment 'mine': expected ... above 0
    """
    seeds: int = option(5, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    data_root: str = option("", "where local dataset files live ('' = $BACKPROPLAB_DATA or ./data)")
    linear_backprop: bool = option(False, "train every model of the experiment with linear backprop")
    checkpoint_every: int = option(0, "steps between checkpoints (0: none); does not change results")
    log: str = option("", "also log each evaluation as csv and/or tensorboard (comma-separated), beside metrics.jsonl")
    validation: float = option(
        0.0, "> 0: hold out this fraction of the training set, report on it (not the test set)", lt=1)


RUN_OWNED = ("seed", "device", "checkpoint_every")  # TrainConfig fields each run sets (Run.train_config)


def training_phase(help: str, prefix: str = "", names: dict[str, str] | None = None, **fields: Any) -> Any:
    """A :class:`~backproplab.train.TrainConfig` embedded in an experiment's config: one training phase.

    Each keyword names a ``TrainConfig`` field. An :func:`~backproplab.fields.option` makes it a ``--set`` key,
    ``prefix`` + the field's name (or ``names[field]``), with that option's default, help line and bounds (the
    experiment's own words: "learning rate of the BN runs", not the loop's); a plain value is fixed by the
    experiment and is no key. The other fields keep ``TrainConfig``'s defaults, and the run sets its own seed,
    device and checkpointing (:data:`RUN_OWNED`). An arm that chooses a field itself (its optimizer, say) passes it to
    ``Run.train_config`` and does not declare it here, so ``--set`` cannot reach a value the arm would override.

    The keys are flat (``bn_lr``, not ``bn.lr``) and so is the config's record (``config.json``, the identity):
    :func:`~backproplab.experiments.config.config_keys` lists them.

    Example:
        >>> from backproplab.experiments import make_config
        >>> @dataclass
        ... class TwoPhaseConfig(ExperimentConfig):
        ...     train: Any = training_phase("the main runs", optimizer="adam",
        ...                                 lr=option(1e-3, "Adam learning rate", gt=0))
        ...     warmup: Any = training_phase("the warm-up", prefix="warmup_", epochs=option(2, "warm-up epochs"))
        >>> mine = Experiment("two_phase", "two phases", TwoPhaseConfig, arms=lambda cfg: [],
        ...                   run_arm=lambda run: {}, analyze=lambda results: [])
        >>> cfg = make_config(mine, ["lr=0.01", "warmup_epochs=5"])
        >>> type(cfg.train).__name__, cfg.train.optimizer, cfg.train.lr, cfg.warmup.epochs, cfg.warmup.lr
        ('TrainConfig', 'adam', 0.01, 5, 0.05)
        >>> make_config(mine, ["optimizer=sgd"])                  # fixed by the experiment: not a key
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: unknown key 'optimizer' for experiment 'two_phase'. Valid ...
    """
    bad = sorted(set(fields) & set(RUN_OWNED))
    if bad:
        raise TypeError(f"training_phase: {', '.join(bad)} belong to each run (Run.train_config), not the config")
    values = {name: spec.default if isinstance(spec, dataclasses.Field) else spec for name, spec in fields.items()}
    keys = {name: spec for name, spec in fields.items() if isinstance(spec, dataclasses.Field)}
    if set(names or {}) - set(keys):
        raise TypeError(f"training_phase: names {sorted(set(names or {}) - set(keys))} are not option fields")

    def default() -> Any:
        from ..train import TrainConfig

        return TrainConfig(**values)

    key_names = {name: (names or {}).get(name, prefix + name) for name in keys}
    return dataclasses.field(default_factory=default, metadata={"help": help, "phase": key_names, "keys": keys})


@dataclass(frozen=True)
class Arm:
    """A typed arm. Subclasses declare fields; ``name`` (the results folder) joins them with ``-``.

    Example:
        >>> @dataclass(frozen=True)
        ... class MyArm(Arm):
        ...     dataset: str
        ...     lr: float
        >>> MyArm("digits", 0.05).name, str(MyArm("mnist1d", 1e-3))          # the results folder
        ('digits-0.05', 'mnist1d-0.001')
    """

    @property
    def name(self) -> str:
        return "-".join(_token(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __str__(self) -> str:
        return self.name


def _token(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Experiment:
    """Experiment.

    Example:
        An experiment of one's own: a config, typed arms, ``run_arm`` and a claim; registered, run and judged on
        paired seeds (the new arm leads by 0.10, 0.11 and 0.12, so the claim, a lead above 0.05, is reproduced):

        >>> import json, tempfile
        >>> from dataclasses import dataclass
        >>> from backproplab.evidence import Claim
        >>> from backproplab.experiments import run
        >>> @dataclass
        ... class ToyConfig(ExperimentConfig):
        ...     gap: float = option(0.1, "how far the new arm is ahead")
        >>> @dataclass(frozen=True)
        ... class ToyArm(Arm):
        ...     method: str
        >>> def run_arm(run):                          # the runner has seeded everything and made run.dir
        ...     return {"score": 0.5 + (run.cfg.gap + run.seed / 100 if run.arm.method == "new" else 0.0)}
        >>> claim = Claim("toy.new_wins", "a paper", "Table 1", "The new method scores higher.", "score", "new",
        ...               "greater", 0.05, "+0.1", baseline="old")
        >>> toy = register(Experiment("toy", "a toy experiment", ToyConfig, run_arm=run_arm, analyze=lambda res: [],
        ...                           arms=lambda cfg: [ToyArm("new"), ToyArm("old")], claims=lambda cfg: [claim]))
        >>> folder = run(toy, ToyConfig(seeds=3, device="cpu"), out=tempfile.mkdtemp(), progress=False)
        >>> verdicts = json.load(open(folder / "summary.json"))["verdicts"]
        >>> [(v["claim"], v["outcome"], round(v["estimate"], 6)) for v in verdicts]
        [('toy.new_wins', 'reproduced', 0.11)]
        >>> del REGISTRY["toy"]
    """
    name: str
    description: str
    config: type
    arms: Callable[[Any], list[Any]]
    run_arm: Callable[[Any], dict]  # runner.Run -> the run's final metrics
    analyze: Callable[[Any], list[str]]  # runner.Results -> notes (and figures written beside them)
    claims: Callable[[Any], list[Claim]] = lambda cfg: []
    smoke: dict[str, Any] = dataclasses.field(default_factory=dict)
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    table_metrics: tuple[str, ...] = ("test_acc", "test_loss", "train_loss")
    seeds_for: Callable[[Any, Any], int] | None = None  # per-arm seed count (default: cfg.seeds)
    load_trained: Callable[[Any, Any, Path], tuple] | None = None  # (model, data, sigma) for `certify`
    paper_setting: str = ""  # the papers' data, model and budget, as they ran the claims judged here
    deviations: tuple[str, ...] = ()  # how this lab's setting differs from the paper's, and why
    # ``--scale paper`` (for a GPU): the config overrides that put the paper's dataset, model and budget where
    # the config can express them, and what of the paper's setting it still cannot (said by --help and the run)
    paper: dict[str, Any] = dataclasses.field(default_factory=dict)
    paper_gaps: tuple[str, ...] = ()

    def seeds_of(self, cfg: Any) -> Callable[[Any], int]:
        return (lambda arm: self.seeds_for(cfg, arm)) if self.seeds_for else (lambda arm: cfg.seeds)

    def arm_named(self, cfg: Any, name: str) -> Any:
        by_name = {a.name: a for a in self.arms(cfg)}
        if name not in by_name:
            raise ConfigError(f"experiment {self.name!r} has no arm {name!r} under this config; arms: "
                              f"{', '.join(by_name)}")
        return by_name[name]


# Built-in experiments by name -> module; each module defines EXPERIMENT. Nothing is registered by importing.
BUILTIN = {name: f"{__package__}.{name}" for name in
           ("baselines", "curveball", "msgd", "linear_backprop", "layerwise", "rifle", "luck_matters", "privacy",
            "stobatch")}


REGISTRY: dict[str, Experiment] = {}  # experiments a user adds with register()


def register(experiment: Experiment) -> Experiment:
    """Add an experiment of your own (built-ins come from :data:`BUILTIN`).

    Example:
        >>> from dataclasses import dataclass
        >>> mine = Experiment("mine", "my experiment", ExperimentConfig, arms=lambda cfg: [], run_arm=lambda run: {},
        ...                   analyze=lambda results: [])
        >>> register(mine) is get("mine"), "mine" in [e.name for e in all_experiments()]
        (True, True)
        >>> del REGISTRY["mine"]
    """
    REGISTRY[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    """The experiment registered under ``name`` (a built-in one is imported on first use).

    Example:
        >>> get("baselines").name
        'baselines'
        >>> get("nope")
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: unknown experiment 'nope'; available: baselines, curveball, ...
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name]).EXPERIMENT
    raise ConfigError(f"unknown experiment {name!r}; available: {', '.join([*BUILTIN, *REGISTRY])}")


def all_experiments() -> list[Experiment]:
    """Every experiment: the built-in ones in :data:`BUILTIN`'s order, then those registered.

    Example:
        >>> [e.name for e in all_experiments()][:3]
        ['baselines', 'curveball', 'msgd']
    """
    return [get(n) for n in BUILTIN] + [e for n, e in REGISTRY.items() if n not in BUILTIN]


def all_claims() -> list[tuple[Experiment, Claim]]:
    """Every claim of every experiment, at the full-scale default config.

    Example:
        >>> claims = all_claims()
        >>> len({c.id for _, c in claims}) == len(claims)          # claim ids are unique across experiments
        True
    """
    return [(e, c) for e in all_experiments() for c in e.claims(e.config())]
