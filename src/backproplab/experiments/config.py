"""An experiment's config: ``--set key=value`` parsed into its dataclass, validated, and its identity.

Every field is an :func:`~backproplab.fields.option` with its help line and bounds; :func:`make_config` parses
the overrides by the field's type, :func:`check_values` enforces the bounds and the config's own ``validate``
before anything trains, :func:`describe_fields` is ``--help``. :func:`identity` is the part of a config that
decides results: a run folder holds one identity, and results of different identities never mix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any
from collections.abc import Callable, Sequence

from .registry import SCALES, ConfigError, Experiment, all_experiments, get  # noqa: F401 (get: the Examples)

FLOAT32_MAX = 3.0e38


NOT_IDENTITY = ("seeds", "device", "checkpoint_every", "log")


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One ``--set`` key: its field (help line and bounds), its type, and where the value lives: a top-level
    field of the config (``phase`` None) or field ``attr`` of an embedded training phase.

    Example:
        Luck Matters' ``two_layer_steps`` is the 2-layer student's step budget, ``cfg.two_layer.max_steps``:

        >>> key = next(k for k in config_keys(get("luck_matters").config) if k.name == "two_layer_steps")
        >>> key.phase, key.attr, key.field.default
        ('two_layer', 'max_steps', 62500)
        >>> make_config(get("luck_matters"), ["two_layer_steps=100"]).two_layer.max_steps
        100
    """
    name: str
    field: dataclasses.Field
    type: Any
    phase: str | None
    attr: str


def config_keys(config_cls: type) -> list[ConfigKey]:
    """The config's ``--set`` keys in declaration order: its own fields, and in place of each embedded
    :func:`~backproplab.experiments.registry.training_phase` the phase's keys (prefix + ``TrainConfig`` field).

    Example:
        >>> [k.name for k in config_keys(get("layerwise").config)][-6:]
        ['lr', 'momentum', 'weight_decay', 'batch_size', 'small_width', 'probe_all_arms']
        >>> key = config_keys(get("layerwise").config)[-6]
        >>> key.phase, key.attr, key.type, key.field.metadata["gt"]     # held at cfg.train.lr, above 0
        ('train', 'lr', <class 'float'>, 0)
    """
    hints = typing.get_type_hints(config_cls)
    keys = []
    for f in dataclasses.fields(config_cls):
        phase = f.metadata.get("phase")
        if phase is None:
            keys.append(ConfigKey(f.name, f, hints[f.name], None, f.name))
            continue
        phase_hints = typing.get_type_hints(type(f.default_factory()))
        keys += [ConfigKey(phase[attr], spec, phase_hints[attr], f.name, attr)
                 for attr, spec in f.metadata["keys"].items()]
    names = [k.name for k in keys]
    if len(set(names)) < len(names):  # a phase's key shadowing a field or another phase's: --set would be ambiguous
        twice = sorted({n for n in names if names.count(n) > 1})
        raise TypeError(f"{config_cls.__name__}: keys {twice} name two values; give a phase a prefix or names=")
    return keys


def config_values(cfg: Any) -> dict[str, Any]:
    """The config as ``--set`` key -> value (flat: a phase's keys in place of the phase), as ``config.json``
    records it.

    Example:
        >>> cfg = make_config(get("layerwise"), ["lr=0.05"], scale="smoke")
        >>> cfg.train.lr, config_values(cfg)["lr"]
        (0.05, 0.05)
    """
    def plain(value: Any) -> Any:  # a dataclass-valued field of one's own, not a phase: a dict, as asdict gives
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value

    return {k.name: getattr(getattr(cfg, k.phase), k.attr) if k.phase else plain(getattr(cfg, k.name))
            for k in config_keys(type(cfg))}


def build_config(config_cls: type, values: dict[str, Any]) -> Any:
    """The config from ``--set`` key -> typed value (the others at their defaults): the inverse of
    :func:`config_values`.

    Example:
        >>> cfg = make_config(get("layerwise"), ["lr=0.05", "seeds=2"], scale="smoke")
        >>> build_config(type(cfg), config_values(cfg)) == cfg
        True
    """
    keys = {k.name: k for k in config_keys(config_cls)}
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"unknown keys {', '.join(unknown)} for {config_cls.__name__}")
    top = {name: v for name, v in values.items() if keys[name].phase is None}
    phases: dict[str, dict[str, Any]] = {}
    for name, v in values.items():
        if keys[name].phase is not None:
            phases.setdefault(keys[name].phase, {})[keys[name].attr] = v
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("phase") is not None:
            top[f.name] = dataclasses.replace(f.default_factory(), **phases.get(f.name, {}))
    return config_cls(**top)


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
    flat = config_values(cfg)
    parts = [f"{scale} scale, {flat.get('seeds', '?')} seeds"]
    for label, names in _SETTING_FIELDS:
        values = []
        for name in names:
            if name in flat and flat[name] not in (0, "", ()):  # 0: the field's "all" / unset
                value = flat[name]
                text = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
                values.append(text if label == "data" or name in ("models", "model") else f"{name} {text}")
        if values:
            parts.append(f"{label}: {'; '.join(values)}")
    return "; ".join(parts)


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
    keys, lines = config_keys(config_cls), []
    for i, key in enumerate(keys):
        if key.phase is not None and (i == 0 or keys[i - 1].phase != key.phase):  # what a phase's keys train
            count = sum(k.phase == key.phase for k in keys)
            lines.append(f"  [the next {count} key{'s' * (count > 1)} set training phase {key.phase!r}: "
                         f"{config_cls.__dataclass_fields__[key.phase].metadata['help']}]")
        kind = ", ".join(filter(None, (_type_name(key.type), _range_words(key.field, key.type))))
        lines.append(f"  {key.name} ({kind}, default {key.field.default!r})"
                     + (f": {key.field.metadata['help']}" if "help" in key.field.metadata else ""))
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
        >>> cfg.seeds, cfg.train.epochs, cfg.n_train               # n_train from the smoke scale's overrides
        (3, 4, 300)
        >>> make_config(get("baselines"), ["seeds=0"])
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value 0 for 'seeds' in experiment 'baselines': expected ...
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
    hints = {key.name: key.type for key in config_keys(exp.config)}
    if scale == "paper" and not exp.paper:
        raise ConfigError(f"experiment {exp.name!r} has no paper scale (its paper's setting is its full scale or "
                          f"not expressible here); experiments with one: {', '.join(paper_scale_names())}")
    values: dict[str, Any] = {"smoke": dict(exp.smoke), "quick": dict(exp.quick), "full": {},
                              "paper": dict(exp.paper)}[scale]
    values.update({k: v for k, v in typed.items() if v is not None})
    for key, raw in overrides.items():
        if key not in hints:
            raise ConfigError(f"unknown key {key!r} for experiment {exp.name!r}. Valid keys:\n"
                              f"{describe_fields(exp.config)}")
        try:
            values[key] = _parse(raw, hints[key])
        except ValueError:
            raise ConfigError(f"bad value {raw!r} for {key!r} in experiment {exp.name!r}: expected "
                              f"{_type_name(hints[key])}. Valid keys:\n{describe_fields(exp.config)}") from None
    try:
        cfg = build_config(exp.config, values)
    except ConfigError as e:  # a typed value or a scale's override naming no key: the experiment's own bug
        raise ConfigError(f"experiment {exp.name!r}: {e}") from None
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
    ConfigError naming the key, the value and the range.

    Example:
        >>> cfg = make_config(get("baselines"), scale="smoke")
        >>> cfg.sgd_lr = float("inf")                                   # set past make_config, caught before training
        >>> check_values(get("baselines"), cfg)
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: bad value inf for 'sgd_lr' in experiment 'baselines': expected ...
    """
    from ..data import DATASETS
    from ..train import check_config, resolve_device

    def fail(key: str, value: Any, want: str) -> None:
        raise ConfigError(f"bad value {value!r} for {key!r} in experiment {exp.name!r}: {want}")

    flat = config_values(cfg)
    for config_key in config_keys(type(cfg)):
        f, key, value = config_key.field, config_key.name, flat[config_key.name]
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
    for f in dataclasses.fields(cfg):  # the loop's own checks on each embedded phase, fixed values included
        if f.metadata.get("phase") is not None:
            try:
                check_config(getattr(cfg, f.name))
            except ValueError as e:
                raise ConfigError(f"experiment {exp.name!r}, training phase {f.name!r}: {e}") from None
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
        backproplab.experiments.registry.ConfigError: bad value 5000 for 'n_train': dataset 'digits' has 1438 ...
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
        backproplab.experiments.registry.ConfigError: bad value 'lion' for 'optimizers': unknown; choose from sgd, adam
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
        backproplab.experiments.registry.ConfigError: validation=0.2 on a private training set: ...
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
    return json.loads(json.dumps(identity_of(config_values(cfg))))


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
