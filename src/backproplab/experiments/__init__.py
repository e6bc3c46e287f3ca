"""Registry of reproductions, their validated configs, typed arms, claims, and the runner.

An experiment is

* a config dataclass (subclass of :class:`ExperimentConfig`) that holds every hyper-parameter, so
  ``--set key=value`` reaches all of them, with ``smoke`` and ``quick`` overrides (``full`` = defaults);
* ``arms(cfg)``: typed arm records (:class:`Arm` subclasses; ``arm.name`` is the results folder);
* ``run_arm(run) -> dict``: trains one arm with one seed and returns its final metrics. The runner
  (:func:`run`) has already seeded every generator with the seed, resolved the device and data folder,
  and written ``config.json``; it writes ``final.json`` from the returned metrics, once;
* ``claims(cfg)``: the paper's claims (:class:`backproplab.evidence.Claim`) over those arms, judged
  by the runner from the finished runs with paired seeds;
* ``analyze(results) -> list[str]``: figures and descriptive notes from a :class:`Results`.

Layout::

    <out>/<experiment>/<arm>/seed<k>/{config.json, metrics.jsonl, final.json, model.pt}
    <out>/<experiment>/{summary.json, *.png}

A run's identity is its config without the fields that do not change results (:data:`NOT_IDENTITY`).
A finished run of the same identity is skipped, an interrupted one resumes; a folder written by another
identity stops the run with the differences named, unless ``overwrite`` is given (``resume=False`` starts
this config's own runs over, never another's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch.distributed as dist

from .. import _io
from .._log import logger
from ..dist import rank
from ..evidence import Claim, Verdict, judge_all
from ..fields import option
from ..streams import derive

SCALES = ("smoke", "quick", "full", "paper")
FLOAT32_MAX = 3.0e38
NOT_IDENTITY = ("seeds", "device", "checkpoint_every", "log")


class ConfigError(ValueError):
    """A ``--set`` key or value does not fit the experiment's config, or results of another config are in the way."""


MAX_SEEDS = 100_000


@dataclass
class ExperimentConfig:
    seeds: int = option(5, "paired seeds per arm (0..N-1); each seed is one run of every arm", ge=1, le=MAX_SEEDS)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    data_root: str = option("", "where local dataset files live ('' = $BACKPROPLAB_DATA or ./data)")
    linear_backprop: bool = option(False, "train every model of the experiment with linear backprop")
    checkpoint_every: int = option(0, "steps between checkpoints (0: none); does not change results")
    log: str = option("", "also log each evaluation as csv and/or tensorboard (comma-separated), beside metrics.jsonl")
    validation: float = option(
        0.0, "> 0: hold out this fraction of the training set, report on it (not the test set)", lt=1)


@dataclass(frozen=True)
class Arm:
    """A typed arm. Subclasses declare fields; ``name`` (the results folder) joins them with ``-``."""

    @property
    def name(self) -> str:
        return "-".join(_token(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __str__(self) -> str:
        return self.name


def _token(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_NO_VALIDATION = ("experiment {name!r} (this arm) does not load its data through Run.data, so it cannot hold out a "
                  "validation split: --set validation (and sweep) do not apply to it")


@dataclass
class Run:
    """What ``run_arm`` gets: the config, the arm, the seed and where to write, all set up by the runner."""

    cfg: Any
    arm: Any
    seed: int
    dir: Path
    exp_dir: Path
    resume: bool
    device: str  # resolved: 'cpu', 'cuda:0', ...

    @property
    def data_root(self) -> str | None:
        return self.cfg.data_root or None

    def data(self, name: str, **kwargs):
        """Dataset ``name`` for this seed: seed k of every arm gets the same split/subset, which changes with k.
        With ``cfg.validation`` > 0 the returned "test" split is a held-out part of the training set. The
        training tensors' fingerprint is added to the run's ``config.json`` (``data``: name -> fingerprint), so
        a result names the exact data it was trained on."""
        from ..data import fingerprint, load_dataset

        data = load_dataset(name, seed=self.seed, root=self.data_root, **kwargs)
        config_file = self.dir / "config.json"
        if rank() == 0 and config_file.exists():
            written = json.loads(config_file.read_text())
            written.setdefault("data", {})[name] = fingerprint(data)
            _io.write_json(config_file, written)
        if getattr(self.cfg, "validation", 0):
            data = validation_split(data, self.cfg.validation, self.seed)
            self.validation_used = True
        return data

    def train_config(self, **fields):
        """A :class:`~backproplab.train.TrainConfig` with this run's seed, device and checkpointing."""
        from ..train import TrainConfig

        fields.setdefault("checkpoint_every", self.cfg.checkpoint_every)
        return TrainConfig(seed=self.seed, device=self.device, **fields)

    def fit(self, model, data, config, *, sub: str = "", **kwargs) -> list[dict]:
        """``train.fit`` into this run's folder (or a sub-folder), resuming; ``final.json`` is the runner's."""
        from ..loggers import make_loggers
        from ..train import fit

        if getattr(self.cfg, "validation", 0) and not getattr(self, "validation_used", False):
            raise ConfigError(_NO_VALIDATION.format(name=self.dir.parent.parent.name))
        out_dir = self.dir / sub if sub else self.dir
        callbacks = [*kwargs.pop("callbacks", ()), *make_loggers(getattr(self.cfg, "log", ""), out_dir)]
        return fit(model, data, config, out_dir=out_dir, resume=self.resume, write_final=False,
                   callbacks=callbacks, **kwargs)

    def tuned(self, what: str, key: dict, compute: Callable[[], Any]) -> Any:
        """``compute()`` (a value tuned on a tuning seed), done once per experiment folder: see :func:`tuned`."""
        return tuned(self.exp_dir, what, {**key, "device": self.device}, compute)

    def prepare_model(self, model):
        """Apply the model transforms the config asks for (``--set linear_backprop=true``)."""
        from ..train import apply_transforms

        return apply_transforms(model, ["linear_backprop"] if self.cfg.linear_backprop else [])


class Results:
    """Finished runs of the current config only: arms of ``cfg`` and seeds ``0..seeds-1``."""

    def __init__(self, exp_dir: Path, cfg: Any, arms: Sequence[Any], seeds_of: Callable[[Any], int]):
        self.exp_dir, self.cfg = exp_dir, cfg
        self.arm_names = [a.name for a in arms]
        self._seeds = {a.name: seeds_of(a) for a in arms}

    def _all(self, arm: str) -> dict[int, dict]:
        out = {}
        for s in range(self._seeds.get(arm, 0)):
            f = self.exp_dir / arm / f"seed{s}" / "final.json"
            if f.exists():
                out[s] = json.loads(f.read_text())
        return out

    def seeds(self, arm: str) -> list[int]:
        """Seeds of ``arm`` that finished without diverging."""
        return list(self.finals(arm))

    def diverged(self, arm: str) -> list[int]:
        return [s for s, f in self._all(arm).items() if f.get("status") == "diverged"]

    def finals(self, arm: str) -> dict[int, dict]:
        """``{seed: final metrics}`` of one arm's runs that finished without diverging."""
        return {s: f for s, f in self._all(arm).items() if f.get("status") != "diverged"}

    def final_list(self, arm: str) -> list[dict]:
        return list(self.finals(arm).values())

    def runs(self, arm: str) -> list[list[dict]]:
        """The metric rows of each finished seed of one arm (seed order)."""
        return [_io.read_jsonl(self.exp_dir / arm / f"seed{s}" / "metrics.jsonl") for s in self.seeds(arm)]

    def all_runs(self) -> dict[str, list[list[dict]]]:
        return {a: r for a in self.arm_names if (r := self.runs(a))}

    def values(self, arm: str, metric: str) -> dict[int, float]:
        return {s: float(f[metric]) if f[metric] is not None else float("nan")
                for s, f in self.finals(arm).items() if metric in f}


@dataclass
class Experiment:
    name: str
    description: str
    config: type
    arms: Callable[[Any], list[Any]]
    run_arm: Callable[[Run], dict]
    analyze: Callable[[Results], list[str]]
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


_SETTING_FIELDS = (("data", ("datasets", "dataset")),
                   ("model", ("models", "model", "widths", "width", "teacher_widths", "batchnorm")),
                   ("budget", ("epochs", "epochs_per_block", "pretrain_epochs", "steps", "max_iters", "n_train",
                               "per_class", "batch_size", "batch")))


def run_setting(cfg: Any, scale: str) -> str:
    """This run's setting in one line, from its config: scale, seeds, data, model and budget fields.

    Example:
        >>> run_setting(make_config(get("baselines"), ["seeds=3"], scale="smoke"), "smoke")
        'smoke scale, 3 seeds; data: digits; model: mlp; budget: epochs 2; n_train 300; batch_size 64'
    """
    parts = [f"{scale} scale, {getattr(cfg, 'seeds', '?')} seeds"]
    for label, names in _SETTING_FIELDS:
        values = []
        for name in names:
            if hasattr(cfg, name) and getattr(cfg, name) not in (0, "", ()):  # 0: the field's "all" / unset
                value = getattr(cfg, name)
                text = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
                values.append(text if label == "data" or name in ("models", "model") else f"{name} {text}")
        if values:
            parts.append(f"{label}: {'; '.join(values)}")
    return "; ".join(parts)


# Built-in experiments by name -> module; each module defines EXPERIMENT. Nothing is registered by importing.
BUILTIN = {name: f"{__name__}.{name}" for name in
           ("baselines", "curveball", "msgd", "linear_backprop", "layerwise", "rifle", "luck_matters", "privacy",
            "stobatch")}
REGISTRY: dict[str, Experiment] = {}  # experiments a user adds with register()


def register(experiment: Experiment) -> Experiment:
    """Add an experiment of your own (built-ins come from :data:`BUILTIN`)."""
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
        backproplab.experiments.ConfigError: unknown experiment 'nope'; available: baselines, curveball, ...
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


# ---------------------------------------------------------------- config parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"comma-separated list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _parse(value: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(_parse(v.strip(), inner) for v in value.split(",") if v.strip())
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and value.lower() in ("none", "null", ""):
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _parse(value, a)
                except ValueError:
                    pass
        raise ValueError(value)
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if tp in (int, float, str):
        return tp(value)
    raise ValueError(f"unsupported field type {tp}")


def _range_words(f: dataclasses.Field, tp: Any) -> str:
    """A numeric field's declared range in words ("at least 1", "above 0, below 1"), '' for other fields."""
    numeric = tp in (int, float) or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] in (int, float))
    if not numeric:
        return ""
    bounds = [(words, bound) for words, bound, _ in _bounds(f)]
    if any(words == "above" for words, _ in bounds):  # "above 0" says more than "at least 0"
        bounds = [(words, bound) for words, bound in bounds if words != "at least"]
    return ", ".join(f"{words} {bound:g}" for words, bound in bounds)


def describe_fields(config_cls: type) -> str:
    """``KEY (type[, range], default D): meaning``, one line per field, for ``--help`` and config errors.

    Example:
        >>> describe_fields(type(get("baselines").config())).splitlines()[0]
        '  seeds (int, at least 1, at most 100000, default 5): paired seeds per arm (0..N-1); each seed is ...'
    """
    hints = typing.get_type_hints(config_cls)
    lines = []
    for f in dataclasses.fields(config_cls):
        kind = ", ".join(filter(None, (_type_name(hints[f.name]), _range_words(f, hints[f.name]))))
        lines.append(f"  {f.name} ({kind}, default {f.default!r})"
                     + (f": {f.metadata['help']}" if "help" in f.metadata else ""))
    return "\n".join(lines)


def paper_scale_names() -> list[str]:
    """The experiments with a ``--scale paper`` config.

    Example:
        >>> paper_scale_names()
        ['curveball', 'msgd', 'linear_backprop', 'stobatch']
    """
    return [exp.name for exp in all_experiments() if exp.paper]


def describe_paper_scale(exp: Experiment) -> str:
    """``--scale paper`` for ``--help``: the overrides, the datasets to fetch first, and the gaps left.

    Example:
        >>> print(describe_paper_scale(get("baselines")))
        --scale paper: none for 'baselines' (with one: curveball, msgd, linear_backprop, stobatch)
        >>> describe_paper_scale(get("msgd")).startswith("--scale paper (the paper's setting, for a GPU:")
        True
    """
    if not exp.paper:
        return f"--scale paper: none for {exp.name!r} (with one: {', '.join(paper_scale_names())})"
    sets = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in exp.paper.items())
    lines = [f"--scale paper (the paper's setting, for a GPU: {exp.paper_setting}):", f"  sets {sets}"]
    lines += [f"  still differs: {gap}" for gap in exp.paper_gaps]
    return "\n".join(lines)


def make_config(exp: Experiment, overrides: dict[str, str] | Sequence[str] = (), quick: bool = False,
                scale: str | None = None, **typed: Any) -> Any:
    """The experiment's config: defaults, then the scale's overrides (``quick=True`` means scale quick),
    then typed values, then ``key=value`` strings.

    Raises :class:`ConfigError` naming the bad key or value and listing the valid keys and types.

    Example:
        >>> cfg = make_config(get("baselines"), ["seeds=3", "epochs=4"], scale="smoke")
        >>> cfg.seeds, cfg.epochs, cfg.n_train                     # n_train from the smoke scale's overrides
        (3, 4, 300)
        >>> make_config(get("baselines"), ["seeds=0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.ConfigError: bad value 0 for 'seeds' in experiment 'baselines': expected a number ...
    """
    scale = scale or ("quick" if quick else "full")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if not isinstance(overrides, dict):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v
        overrides = pairs
    hints = typing.get_type_hints(exp.config)
    valid = {f.name for f in dataclasses.fields(exp.config)}
    if scale == "paper" and not exp.paper:
        raise ConfigError(f"experiment {exp.name!r} has no paper scale (its paper's setting is its full scale or "
                          f"not expressible here); experiments with one: {', '.join(paper_scale_names())}")
    values: dict[str, Any] = {"smoke": dict(exp.smoke), "quick": dict(exp.quick), "full": {},
                              "paper": dict(exp.paper)}[scale]
    values.update({k: v for k, v in typed.items() if v is not None})
    for key, raw in overrides.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} for experiment {exp.name!r}. Valid keys:\n"
                              f"{describe_fields(exp.config)}")
        try:
            values[key] = _parse(raw, hints[key])
        except ValueError:
            raise ConfigError(f"bad value {raw!r} for {key!r} in experiment {exp.name!r}: expected "
                              f"{_type_name(hints[key])}. Valid keys:\n{describe_fields(exp.config)}") from None
    cfg = exp.config(**values)
    check_values(exp, cfg)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    exp.arms(cfg)  # arms are built from the config: a bad combination fails here, before training
    return cfg


DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?|mps)$")


def _bounds(f: dataclasses.Field) -> list[tuple[str, float, Callable[[float, float], bool]]]:
    """A field's declared bounds (:func:`option`) as (words, bound, holds) triples."""
    meta = f.metadata
    rules = [("at least", meta.get("ge", 0), lambda v, b: v >= b), ("above", meta.get("gt"), lambda v, b: v > b),
             ("below", meta.get("lt"), lambda v, b: v < b), ("at most", meta.get("le"), lambda v, b: v <= b)]
    return [(words, bound, holds) for words, bound, holds in rules if bound is not None]


def check_values(exp: Experiment, cfg: Any) -> None:
    """Every number of the config (and every item of a list of numbers) finite, within float32 and within the
    bounds its field declares (:func:`option`); lists non-empty; datasets known; a device that exists. Raises
    ConfigError naming the key, the value and the range."""
    from ..data import DATASETS
    from ..train import resolve_device

    def fail(key: str, value: Any, want: str) -> None:
        raise ConfigError(f"bad value {value!r} for {key!r} in experiment {exp.name!r}: {want}")

    for f in dataclasses.fields(cfg):
        key, value = f.name, getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            fail(key, value, "the list must not be empty")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                fail(key, v, "expected a finite number")
            if abs(v) > FLOAT32_MAX:  # training holds it in float32 tensors (an lr of 3.4e38 overflows there)
                fail(key, v, f"expected a number below {FLOAT32_MAX:g}, float32's range")
            for words, bound, holds in _bounds(f):
                if not holds(v, bound):
                    fail(key, v, f"expected a number {words} {bound:g}"
                         + (" (more seeds than planning can take in reasonable time: a typo?)"
                            if key == "seeds" and words == "at most" else ""))
    for key in ("datasets", "dataset"):
        names = getattr(cfg, key, None)
        default = next((f.default for f in dataclasses.fields(cfg) if f.name == key), None)
        auto = isinstance(default, tuple) and "auto" in default  # the experiments that resolve "auto" default to it
        for name in (names if isinstance(names, tuple) else (names,) if names is not None else ()):
            if not (name == "auto" and auto) and name not in DATASETS:
                fail(key, name, f"unknown dataset; choose from {', '.join(sorted(DATASETS))}" +
                     (" or auto" if auto else ""))
    if getattr(cfg, "log", ""):
        from ..loggers import make_loggers

        try:
            make_loggers(cfg.log, ".")
        except (ValueError, ImportError) as e:
            raise ConfigError(f"bad value {cfg.log!r} for 'log': {e}") from None
    if not DEVICE.match(cfg.device):
        fail("device", cfg.device, "expected cpu, cuda, cuda:N, mps or auto")
    try:
        resolve_device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(f"bad value {cfg.device!r} for 'device' in experiment {exp.name!r}: {e}") from None


def check_n_train(cfg: Any, datasets: Sequence[str]) -> None:
    """``n_train`` must not exceed any dataset's training set (0 means all of it).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> check_n_train(NS(n_train=0, data_root=""), ["digits"])              # 0: all of it
        >>> check_n_train(NS(n_train=5000, data_root=""), ["digits"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.ConfigError: bad value 5000 for 'n_train': dataset 'digits' has 1438 training ...
    """
    from ..data import DataNotFoundError, load_dataset

    for name in datasets:
        try:
            size = len(load_dataset(name, root=cfg.data_root or None).x_train)
        except DataNotFoundError:
            continue  # reported where the run needs the files, with the expected layout
        if cfg.n_train > size:
            raise ConfigError(f"bad value {cfg.n_train!r} for 'n_train': dataset {name!r} has {size} training "
                              f"examples; use 1..{size}, or 0 for all of them")


def check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for any of ``values`` not in ``allowed``, listing the choices.

    Example:
        >>> check_choices("optimizers", ["sgd"], ["sgd", "adam"])
        >>> check_choices("optimizers", ["sgd", "lion"], ["sgd", "adam"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.ConfigError: bad value 'lion' for 'optimizers': unknown; choose from sgd, adam
    """
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"bad value {', '.join(map(repr, bad))} for {name!r}: unknown; choose from "
                          f"{', '.join(allowed)}")


def check_private_validation(cfg: Any, private_arms: bool) -> None:
    """A validation split of a private training set is private data: choosing a grid point by a metric on it
    (``sweep``) releases it beyond what each run's epsilon accounts for. Refuse it unless the config declares
    the split public (``validation_public=true``, recorded with every run).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> check_private_validation(NS(validation=0.2, validation_public=True), private_arms=True)
        >>> check_private_validation(NS(validation=0.2), private_arms=True)
        Traceback (most recent call last):
        ...
        backproplab.experiments.ConfigError: validation=0.2 on a private training set: ...
    """
    if getattr(cfg, "validation", 0) > 0 and private_arms and not getattr(cfg, "validation_public", False):
        raise ConfigError(
            f"validation={cfg.validation:g} on a private training set: choosing among runs by a metric on that "
            "split (what sweep does) uses private data that no run's epsilon accounts for. Fix: tune on public "
            "data; or, if the held-out split is public data, say so with --set validation_public=true (each run "
            "records it)")


def private_selection_note(cfg: Any) -> str:
    """What each private run records about selection on its validation split.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> private_selection_note(NS(validation=0))
        'no selection on a validation split'
    """
    if not getattr(cfg, "validation", 0):
        return "no selection on a validation split"
    return ("validation split declared public (validation_public=true): selection on it is not accounted in "
            "epsilon")


def identity(cfg: Any) -> dict:
    """The fields of ``cfg`` that decide results (all but :data:`NOT_IDENTITY`), JSON-normalised. ``validation``
    appears only when set, so runs made before the field existed keep their identity.

    Example:
        >>> a = make_config(get("baselines"), ["seeds=3", "device=cpu"], scale="smoke")
        >>> b = make_config(get("baselines"), ["seeds=5"], scale="smoke")
        >>> identity(a) == identity(b)                   # more seeds or another device: the same results folder
        True
        >>> identity(a) == identity(make_config(get("baselines"), ["epochs=3"], scale="smoke"))
        False
    """
    return json.loads(json.dumps(identity_of(dataclasses.asdict(cfg))))


def identity_of(config: dict) -> dict:
    """The identity part of a config written as a dict (a ``summary.json``'s, say): see :func:`identity`.

    Example:
        >>> identity_of({"seeds": 3, "device": "cpu", "epochs": 2, "validation": 0.0})
        {'epochs': 2}
    """
    record = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if not record.get("validation"):
        record.pop("validation", None)
    return record


# ---------------------------------------------------------------- the runner




def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def validation_split(data: Any, fraction: float, seed: int) -> Any:
    """``data`` with a random ``fraction`` of its training set (seeded) as the evaluation split; the test set
    is dropped, so nothing tuned on this can see it.

    Example:
        >>> import torch
        >>> from backproplab.data import Data
        >>> data = Data("toy", torch.arange(10.0).unsqueeze(1), torch.zeros(10), torch.ones(4, 1), torch.ones(4), 0)
        >>> split = validation_split(data, 0.2, seed=0)
        >>> len(split.x_train), len(split.x_test)                            # the test set is gone
        (8, 2)
        >>> sorted(torch.cat([split.x_train, split.x_test]).flatten().tolist()) == list(range(10))
        True
    """
    import torch

    n = len(data.x_train)
    k = max(1, int(round(fraction * n)))
    if not 0 < fraction < 1 or k >= n:
        raise ConfigError(f"bad value {fraction!r} for 'validation': expected a fraction in (0, 1) leaving "
                          f"training examples of the {n}")
    order = torch.randperm(n, generator=derive(seed, "validation-split"))
    held, kept = order[:k], order[k:]
    return dataclasses.replace(data, name=f"{data.name}-validation", x_train=data.x_train[kept],
                               y_train=data.y_train[kept], x_test=data.x_train[held], y_test=data.y_train[held])


@dataclass
class Job:
    """One (experiment, arm, seed) run, as the runner hands it to an executor."""

    exp: Experiment
    cfg: Any
    arm: Any
    seed: int
    exp_dir: Path
    resume: bool
    device: str
    threads: int | None = None  # torch's CPU threads for this run (None: leave torch's setting)

    @property
    def run_dir(self) -> Path:
        return self.exp_dir / self.arm.name / f"seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.exp.name} {self.arm.name} seed {self.seed}"


def plan(exp: Experiment, cfg: Any, out: str | Path = "results", resume: bool = True,
         threads: int | None = None, device: str | None = None, rerun_stale: bool = False,
         warn: bool = True) -> list[Job]:
    """The runs of ``exp`` still to do under ``out`` (all of them with ``resume=False``). A finished run made by
    other code (see :mod:`backproplab.provenance`) is kept and counted in a warning (``warn``), or with
    ``rerun_stale`` started over.

    Example:
        >>> exp = get("baselines")
        >>> jobs = plan(exp, make_config(exp, ["seeds=2"], scale="smoke"), out="planned", warn=False)
        >>> [(job.seed, job.arm.name) for job in jobs]                # seed-major: every arm's seed 0 first
        [(0, 'digits-mlp-sgd'), (0, 'digits-mlp-momentum'), (1, 'digits-mlp-sgd'), (1, 'digits-mlp-momentum')]
    """
    from ..provenance import is_stale
    from ..train import resolve_device

    exp_dir = Path(out) / exp.name
    device = device or str(resolve_device(cfg.device))
    record, seeds_of = identity(cfg), exp.seeds_of(cfg)
    jobs, stale = [], []
    inside = Path(out).resolve()
    arms = exp.arms(cfg)
    for arm in arms:
        if not (exp_dir / arm.name).resolve().is_relative_to(inside) or "/" in arm.name:
            raise ConfigError(f"arm {arm.name!r} of {exp.name} would write outside {out}; use plain config values")
    # seed-major: the first runs of the arms go first, so parallel workers tune different arms (see `tuned`)
    # instead of one waiting for another to tune the arm both run
    pairs = sorted(((seed, i) for i, arm in enumerate(arms) for seed in range(seeds_of(arm))))
    for seed, i in pairs:
        job = Job(exp, cfg, arms[i], seed, exp_dir, resume, device, threads)
        if resume and (job.run_dir / "final.json").exists() and _same_identity(job.run_dir, record):
            if not is_stale(_read_provenance(job.run_dir)):
                continue
            stale.append(job)
            if not rerun_stale:
                continue
            job = dataclasses.replace(job, resume=False)  # made by other code: start it over
        jobs.append(job)
    if stale and warn and rank() == 0:
        what = "starting them over" if rerun_stale else "kept; --rerun-stale starts them over"
        logger.warning(f"backproplab: {len(stale)} finished run(s) of {exp.name} were made by other code than this "
                       f"(provenance 'code' differs, e.g. {stale[0].run_dir}): {what}")
    return jobs


def _read_provenance(run_dir: Path) -> Any:
    try:
        return json.loads((run_dir / "final.json").read_text()).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None


def run_job(job: Job) -> dict:
    """One run: its folder (started over if another config's, or with resume off), its seed, ``run_arm``,
    then ``final.json`` (written last: its presence marks the run done). Returns the final record."""
    import torch.distributed as dist

    run_dir, record = job.run_dir, identity(job.cfg)
    alone = not (dist.is_available() and dist.is_initialized())
    try:
        with _run_lock(run_dir) if alone else contextlib.nullcontext():
            if alone and job.resume and (run_dir / "final.json").exists() and _same_identity(run_dir, record):
                return json.loads((run_dir / "final.json").read_text())  # another process finished it meanwhile
            return _run_job_locked(job, record)
    finally:
        if alone and not run_dir.exists():  # nothing was kept (the data never loaded): no lock file either
            _lock_path(run_dir).unlink(missing_ok=True)
            for folder in (run_dir.parent, run_dir.parent.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty


def _lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _run_lock(run_dir: Path):
    """A lock per run folder (``filelock``): a second process running the same run into the same folder waits
    for the first, then finds its result, instead of writing every row twice."""
    from filelock import FileLock, Timeout

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(_lock_path(run_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info(f"backproplab: {run_dir} is being run by another process; waiting for it (lock {lock.lock_file})")
        lock.acquire()

    @contextlib.contextmanager
    def held():
        try:
            yield
        finally:
            lock.release()

    return held()


def tuned(exp_dir: str | Path, what: str, key: dict, compute: Callable[[], Any]) -> Any:
    """A hyper-parameter chosen on a tuning seed, computed once and shared by every run that asks for it.

    Every seed of an arm uses the value tuned for the arm; without this each process (each Ray worker) would
    tune it again. The value is kept in ``exp_dir/_tuning/<what>-<hash>.json`` with its identity: ``what``,
    ``key`` (every config value the tuning depends on) and the code hash, so other settings or other code never
    reuse it. A file lock makes a second process wait for the first instead of tuning twice; a missing or
    unreadable file is computed again. ``compute`` must be deterministic and return a JSON value.

    Example:
        >>> calls = []
        >>> def compute():
        ...     calls.append(1)
        ...     return 0.3
        >>> tuned("exp", "lr", {"grid": [0.1, 0.3]}, compute), tuned("exp", "lr", {"grid": [0.1, 0.3]}, compute)
        (0.3, 0.3)
        >>> len(calls)                                        # computed once, read back the second time
        1
        >>> _ = tuned("exp", "lr", {"grid": [0.1, 1.0]}, compute); len(calls)       # another key: tuned anew
        2
    """
    from ..provenance import code_hash

    identity = json.loads(json.dumps({"what": what, "key": key, "code": code_hash()}, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(exp_dir) / "_tuning" / f"{what}-{digest}.json"
    with _run_lock(path):  # the run folders' lock: a second process waits, then reads the value
        try:
            saved = json.loads(path.read_text())
            if isinstance(saved, dict) and saved.get("identity") == identity and "value" in saved:
                return saved["value"]
        except (OSError, ValueError):
            pass  # not tuned yet, or a torn file: tune again
        value = compute()
        _io.write_json(path, {"identity": identity, "value": value})
    return value


def _run_job_locked(job: Job, record: dict) -> dict:
    import torch

    from ..data import DataFormatError, DataNotFoundError
    from ..provenance import provenance
    from ..train import seed_everything

    exp, cfg, arm, seed, run_dir = job.exp, job.cfg, job.arm, job.seed, job.run_dir
    made_by = provenance(job.device)
    if rank() == 0:
        if run_dir.exists() and (not job.resume or not _same_identity(run_dir, record)):
            shutil.rmtree(run_dir)
        _io.write_json(run_dir / "config.json", {"experiment": exp.name, "arm": arm.name,
                                                 "arm_fields": dataclasses.asdict(arm), "seed": seed,
                                                 "config": record, "provenance": made_by})
    _barrier()
    threads = torch.get_num_threads()
    limits: Any = contextlib.nullcontext()
    if job.threads:  # torch's and NumPy's BLAS (the PRV accountant's sums), so results follow the thread count only
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(job.threads)
        limits = threadpool_limits(limits=job.threads)
    seed_everything(seed)
    run = Run(cfg, arm, seed, run_dir, job.exp_dir, job.resume, job.device)
    try:
        with limits:
            final = {"status": "ok", **exp.run_arm(run)}
        if getattr(cfg, "validation", 0) and not getattr(run, "validation_used", False):
            raise ConfigError(_NO_VALIDATION.format(name=exp.name))
    except (DataFormatError, DataNotFoundError):  # the data never loaded: leave no half-made run folder behind
        if rank() == 0 and {p.name for p in run_dir.iterdir()} <= {"config.json"}:
            shutil.rmtree(run_dir)
        raise
    except FloatingPointError as e:  # one diverging run is a result, not the end of the reproduction (the loop's
        # NonFiniteLossError, or a method's own, e.g. CurveBall's non-finite step)
        final = {"status": "diverged", "diverged_at_step": getattr(e, "step", None),
                 "diverged_at_epoch": getattr(e, "epoch", None), "error": str(e),
                 "last_finite": getattr(e, "last", None)}
        if rank() == 0:
            logger.warning(f"{exp.name}: {arm.name} seed {seed} diverged ({e}); recorded, going on")
    finally:
        torch.set_num_threads(threads)
    final["provenance"] = made_by
    if rank() == 0:
        _io.write_json(run_dir / "final.json", final)
    return final


def finish(exp: Experiment, cfg: Any, out: str | Path = "results", scale: str = "full") -> Path:
    """Judge the claims on the finished runs, analyze, and write ``summary.json``; returns the folder."""
    from ..provenance import is_stale, provenance

    exp_dir = Path(out) / exp.name
    arms, seeds_of = exp.arms(cfg), exp.seeds_of(cfg)
    if rank() == 0:
        results = Results(exp_dir, cfg, arms, seeds_of)
        stale = [f"{a.name}/seed{k}" for a in arms for k in range(seeds_of(a))
                 if (exp_dir / a.name / f"seed{k}" / "final.json").exists()
                 and is_stale(_read_provenance(exp_dir / a.name / f"seed{k}"))]
        verdicts = judge_claims(exp, cfg, results, scale)
        notes = exp.analyze(results)
        _io.write_json(exp_dir / "summary.json", {
            "experiment": exp.name, "description": exp.description, "scale": scale, "seeds": cfg.seeds,
            "claims": [dataclasses.asdict(c) for c in exp.claims(cfg)],
            "verdicts": [v.to_dict() for v in verdicts], "notes": notes,
            "diverged": {a.name: d for a in arms if (d := results.diverged(a.name))},
            "arms": [a.name for a in arms], "table_metrics": list(exp.table_metrics),
            "figures": sorted(p.name for p in exp_dir.glob("*.png") if p.is_file()), "config": dataclasses.asdict(cfg),
            "provenance": provenance(), "stale_runs": stale, "paper_setting": exp.paper_setting,
            "run_setting": run_setting(cfg, scale), "deviations": list(exp.deviations)})
    _barrier()
    return exp_dir


def run(exp: Experiment, cfg: Any, out: str | Path = "results", resume: bool = True, progress: bool = True,
        overwrite: bool = False, scale: str = "full", executor: Any = None, threads: int | None = None,
        rerun_stale: bool = False) -> Path:
    """Run every arm and seed of ``exp`` under ``out/<name>/`` on ``executor`` (default: one after another in
    this process, :class:`backproplab.executors.LocalExecutor`), judge the claims, analyze; returns the folder."""
    from ..executors import LocalExecutor

    preflight(exp, cfg, out, resume, overwrite)
    executor = executor or LocalExecutor()
    executor.run(plan(exp, cfg, out, resume, threads=threads, device=getattr(executor, "device", None),
                      rerun_stale=rerun_stale),
                 run_job, progress=progress, desc=exp.name)
    return finish(exp, cfg, out, scale)


def check_data_present(cfg: Any) -> None:
    """Every dataset the config names that lives in files (``backproplab data get`` fetches it) is there: a
    missing one raises :class:`~backproplab.data.DataNotFoundError` naming the file and the command before
    anything trains (a paper-scale CurveBall run would otherwise find out after its toy problems)."""
    from ..data import load_dataset
    from ..download import SOURCES

    names = [*getattr(cfg, "datasets", ()), *([cfg.dataset] if isinstance(getattr(cfg, "dataset", None), str) else [])]
    for name in dict.fromkeys(names):
        if name in SOURCES:
            load_dataset(name, root=getattr(cfg, "data_root", "") or None)


def preflight(exp: Experiment, cfg: Any, out: str | Path, resume: bool = True, overwrite: bool = False) -> None:
    """Raise :class:`ConfigError` if ``out`` cannot hold results, or results of another config stand where this
    one would write.

    Example:
        >>> _ = open("a_file", "w").write("x")
        >>> exp = get("baselines")
        >>> preflight(exp, make_config(exp, scale="smoke"), "a_file")
        Traceback (most recent call last):
        ...
        backproplab.experiments.ConfigError: --out a_file: is a file, not a folder; name a folder for the results
    """
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; name a folder for the results")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; name a folder you can write to")
    check_data_present(cfg)
    record, seeds_of = identity(cfg), exp.seeds_of(cfg)
    for arm in exp.arms(cfg):
        for seed in range(seeds_of(arm)):
            # --no-resume starts this config's runs over; only --overwrite replaces another config's
            _check_identity(Path(out) / exp.name / arm.name / f"seed{seed}", record, overwrite)


def judge_claims(exp: Experiment, cfg: Any, results: Results, scale: str) -> list[Verdict]:
    """The verdict on each claim of ``exp`` whose arms have finished runs, seeds paired."""
    claims = exp.claims(cfg)
    values = {}
    for c in claims:
        for arm in (c.arm, c.baseline):
            if arm is not None:
                values[f"{arm}:{c.metric}"] = results.values(arm, c.metric)
    verdicts = judge_all(claims, {k: v for k, v in values.items() if v}, scale=scale)
    by_id = {c.id: c for c in claims}
    for v in verdicts:  # a diverged seed is left out of the pairing; the verdict says so
        c = by_id[v.claim]
        lost = {arm: results.diverged(arm) for arm in (c.arm, c.baseline) if arm is not None}
        lost = {arm: seeds for arm, seeds in lost.items() if seeds}
        if lost:
            text = "; ".join(f"{len(seeds)} seed(s) of {arm} diverged ({', '.join(map(str, seeds))})"
                             for arm, seeds in lost.items())
            v.note = f"{text}, left out of the pairing" + (f"; {v.note}" if v.note else "")
    return verdicts


def _same_identity(run_dir: Path, record: dict) -> bool:
    cfg_file = run_dir / "config.json"
    return cfg_file.exists() and json.loads(cfg_file.read_text()).get("config") == record


def _check_identity(run_dir: Path, record: dict, replace: bool) -> None:
    cfg_file = run_dir / "config.json"
    if replace or not cfg_file.exists():
        return
    old = json.loads(cfg_file.read_text()).get("config", {})
    if old == record:
        return
    diff = [f"{k}: {old.get(k, '(absent)')!r} there, {record.get(k, '(absent)')!r} now"
            for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
    raise ConfigError(f"{run_dir} holds a run of another config ({'; '.join(diff)}). Results of different "
                      "configs never mix: use another --out folder, or --overwrite to replace them.")


# ---------------------------------------------------------------- helpers for analyses


def final_values(results: Results, arm: str, key: str) -> list[float]:
    """One final metric of an arm, seed order."""
    return [f[key] for f in results.final_list(arm) if key in f]
