"""Registry of reproductions, their validated configs, and the runner that lays out results.

An experiment is a config dataclass (subclass of :class:`ExperimentConfig`), a list of *arms* (the
methods or settings compared), ``run_arm(cfg, arm, seed, run_dir, resume)`` that trains one arm with
one seed and leaves ``metrics.jsonl`` and ``final.json`` in ``run_dir``, and ``analyze(exp_dir, cfg)``
that reads those files back, draws figures and returns verdict lines. The runner writes::

    <out>/<experiment>/<arm>/seed<k>/{config.json, metrics.jsonl, final.json, model.pt}
    <out>/<experiment>/{summary.json, *.png}

Finished runs (marked ``COMPLETE`` once ``run_arm`` returns) whose ``config.json`` matches are skipped;
unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist
from tqdm.auto import tqdm

from .. import _io


class ConfigError(ValueError):
    """A ``--set`` key or value does not fit the experiment's config."""


@dataclass
class ExperimentConfig:
    seeds: int = 3
    device: str = "cpu"
    data_root: str = ""  # where local dataset files live ('' = $BACKPROPLAB_DATA or ./data)
    linear_backprop: bool = False  # train every model of the experiment with linear backprop


def prepare_model(cfg: ExperimentConfig, model):
    """Apply the model transforms the config asks for (``--set linear_backprop=true``)."""
    from ..train import apply_transforms

    return apply_transforms(model, ["linear_backprop"] if cfg.linear_backprop else [])


@dataclass
class Experiment:
    name: str
    description: str
    config: type
    arms: Callable[[Any], list[str]]
    run_arm: Callable[[Any, str, int, Path, bool], None]
    analyze: Callable[[Path, Any], list[str]]
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)
    table_metrics: tuple[str, ...] = ("test_acc", "test_loss", "train_loss")
    seeds_for: Callable[[Any, str], int] | None = None  # per-arm seed count (default: cfg.seeds)
    load_trained: Callable[[Any, str, Path], tuple] | None = None  # (model, data, sigma) for `certify`


REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    REGISTRY[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    _load_builtin()
    if name not in REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(REGISTRY)) or 'none'}")
    return REGISTRY[name]


def all_experiments() -> list[Experiment]:
    _load_builtin()
    return list(REGISTRY.values())


def _load_builtin() -> None:
    from . import (baselines, curveball, layerwise, linear_backprop, luck_matters, msgd,  # noqa: F401
                   privacy, rifle, stobatch)


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


def describe_fields(config_cls: type) -> str:
    hints = typing.get_type_hints(config_cls)
    return "\n".join(f"  {f.name} ({_type_name(hints[f.name])}, default {f.default!r})"
                     for f in dataclasses.fields(config_cls))


def make_config(exp: Experiment, overrides: dict[str, str] | Sequence[str] = (), quick: bool = False,
                **typed: Any) -> Any:
    """The experiment's config: defaults, then the quick overrides, then typed values, then ``key=value`` strings.

    Raises :class:`ConfigError` naming the bad key or value and listing the valid keys and types.
    """
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
    values: dict[str, Any] = dict(exp.quick) if quick else {}
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
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"{name}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")


# ---------------------------------------------------------------- the runner


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run(exp: Experiment, cfg: Any, out: str | Path = "results", resume: bool = True,
        progress: bool = True) -> Path:
    """Run every arm and seed of ``exp`` under ``out/<name>/``, then analyze; returns the experiment folder."""
    exp_dir = Path(out) / exp.name
    record = dataclasses.asdict(cfg)
    jobs = [(arm, seed) for arm in exp.arms(cfg)
            for seed in range(exp.seeds_for(cfg, arm) if exp.seeds_for else cfg.seeds)]
    bar = tqdm(jobs, desc=exp.name, unit="run", disable=not progress or _rank() != 0, file=sys.stderr,
               mininterval=0.2 if sys.stderr.isatty() else 20)  # a log file gets a line every 20 s
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm} seed {seed}", refresh=False)
        run_dir = exp_dir / arm / f"seed{seed}"
        run_config = {"experiment": exp.name, "arm": arm, "seed": seed, "config": record}
        status = _status(run_dir, run_config)
        _barrier()
        if status == "done" and resume:
            continue
        if _rank() == 0:
            if run_dir.exists() and (status == "stale" or not resume):
                shutil.rmtree(run_dir)
            _io.write_json(run_dir / "config.json", run_config)
        _barrier()
        exp.run_arm(cfg, arm, seed, run_dir, resume)
        if _rank() == 0:
            _io.write_text(run_dir / "COMPLETE", "")  # run_arm returned: everything it writes is there
    if _rank() == 0:
        verdict = exp.analyze(exp_dir, cfg)
        _io.write_json(exp_dir / "summary.json", {
            "experiment": exp.name, "description": exp.description, "verdict": verdict,
            "arms": exp.arms(cfg), "seeds": cfg.seeds, "table_metrics": list(exp.table_metrics),
            "figures": sorted(p.name for p in exp_dir.glob("*.png")), "config": record})
    _barrier()
    return exp_dir


def _status(run_dir: Path, run_config: dict) -> str:
    """'new', 'stale' (written by another config), 'partial' or 'done'."""
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        return "new"
    if json.loads(cfg_file.read_text()) != json.loads(json.dumps(run_config)):
        return "stale"
    return "done" if (run_dir / "COMPLETE").exists() else "partial"


# ---------------------------------------------------------------- reading results back


def gap_and_spread(a, b) -> tuple[float, float]:
    """(mean(a) - mean(b), the larger of the two seeds' standard deviations): the verdicts' one criterion
    for "a difference larger than the seeds' spread"."""
    return float(a.mean() - b.mean()), float(max(a.std(), b.std()))


def load_finals(exp_dir: Path, arm: str) -> list[dict]:
    """Each seed's ``final.json`` of one arm (finished runs only)."""
    return [json.loads(p.read_text()) for p in sorted((exp_dir / arm).glob("seed*/final.json"))]


def load_runs(exp_dir: Path) -> dict[str, list[list[dict]]]:
    """``{arm: [metrics of seed 0, seed 1, ...]}`` for finished runs under ``exp_dir``."""
    runs: dict[str, list[list[dict]]] = {}
    for final in sorted(exp_dir.glob("*/seed*/final.json")):
        runs.setdefault(final.parent.parent.name, []).append(_io.read_jsonl(final.parent / "metrics.jsonl"))
    return runs
