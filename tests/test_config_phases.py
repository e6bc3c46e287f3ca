"""#36 item 4, one config path: an experiment's config embeds its training phases as ``TrainConfig`` values
(``training_phase``), and what ``--set`` puts there is what the loop receives, with nothing copied or edited
on the way but the run's own fields (seed, device, checkpointing) and what an arm chooses itself."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from backproplab import experiments, train
from backproplab.experiments import ConfigError, Run, build_config, config_keys, config_values, make_config
from backproplab.experiments.registry import Experiment, ExperimentConfig, training_phase
from backproplab.fields import option


class _Reached(Exception):
    """Raised by the stand-in for ``fit``: the config it was handed is recorded and nothing trains."""


def _phases(cfg) -> dict[str, train.TrainConfig]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("phase") is not None}


def _changed(key: experiments.ConfigKey, value):
    """A valid value other than ``value`` for ``key``: within the bounds its option declares."""
    meta = key.field.metadata
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        new = value + 1
        return new if meta.get("le") is None or new <= meta["le"] else value - 1
    new = value * 0.5 if value else 0.25  # halving keeps a number within "above 0" and "below 1"
    return new


def _carries(got: train.TrainConfig, cfg, phase: str, phase_keys) -> bool:
    """Whether the config ``fit`` received holds every key value of the phase (each changed from its default)."""
    return all(getattr(got, k.attr) == getattr(getattr(cfg, phase), k.attr) for k in phase_keys if k.phase == phase)


@pytest.mark.parametrize("name", list(experiments.BUILTIN))
def test_every_phase_key_reaches_the_training_config_the_loop_receives(name, tmp_path, monkeypatch):
    """Each ``--set`` key of a training phase, set to a value other than its default, is in the ``TrainConfig``
    that ``fit`` receives from an arm that trains with that phase, and so are the phase's fixed values; only the
    run-owned fields and the fields no phase declares (an arm's own: its optimizer, its lr) may differ. ``fit`` is
    replaced by a stand-in that records its config and stops, so nothing trains."""
    exp = experiments.get(name)
    base = make_config(exp, ["seeds=1", "device=cpu"], scale="smoke")
    phase_keys = [k for k in config_keys(exp.config) if k.phase is not None]
    assert phase_keys, f"{name}: no training phase"
    values = config_values(base)
    overrides = {k.name: _changed(k, values[k.name]) for k in phase_keys}
    try:
        cfg = make_config(exp, [f"{k}={v}" for k, v in overrides.items()] + ["seeds=1", "device=cpu"], scale="smoke")
    except ConfigError as e:  # a combination rule of the experiment's own (batch sizes against n, say)
        pytest.fail(f"{name}: the changed phase values were refused: {e}")
    for key in phase_keys:  # make_config put each value where the key says
        assert getattr(getattr(cfg, key.phase), key.attr) == overrides[key.name], key.name

    received: list[train.TrainConfig] = []
    skip = 0  # fit calls answered with an empty history before the one recorded (a phase behind another)

    def recording_fit(model, data, config, *args, **kwargs):
        nonlocal skip
        if skip:
            skip -= 1
            return [{"step": 0, "epoch": 0}]
        received.append(config)
        raise _Reached

    real_fit = train.fit
    for module in [m for n, m in sys.modules.items() if n.startswith("backproplab")]:
        if getattr(module, "fit", None) is real_fit:
            monkeypatch.setattr(module, "fit", recording_fit)
    phases = _phases(cfg)
    for behind in (0, 1):  # each arm's first fit; then, if a phase is still unseen, each arm's second
        if behind and all(any(_carries(got, cfg, p, phase_keys) for got in received) for p in phases):
            break
        for arm in exp.arms(cfg):
            run_dir = tmp_path / f"{behind}" / arm.name / "seed0"
            run_dir.mkdir(parents=True)
            run = Run(cfg, arm, seed=0, dir=run_dir, exp_dir=tmp_path / f"{behind}", resume=False, device="cpu")
            skip = behind
            try:
                exp.run_arm(run)
            except _Reached:
                pass
            except Exception:  # past an empty history an arm may fail: only what reached fit counts
                if not behind:
                    raise
    defaults = dataclasses.asdict(train.TrainConfig())
    reached = set()
    for got in received:
        match = [p for p in phases if _carries(got, cfg, p, phase_keys)]
        assert match, f"{name}: fit received a config that is none of the phases: {got}"
        for p in match:  # the phase's fixed values (its optimizer, its loss) arrive too
            declared = exp.config.__dataclass_fields__[p].metadata["keys"]
            for attr, value in dataclasses.asdict(phases[p]).items():
                if attr not in experiments.RUN_OWNED and attr not in declared and value != defaults[attr]:
                    assert getattr(got, attr) == value, f"{name}.{p}: fixed {attr}={value!r} became {got}"
        reached.update(match)
    assert reached == set(phases), f"{name}: no arm trained with phase(s) {sorted(set(phases) - reached)}"


def test_the_record_is_flat_and_rebuilds_the_config():
    """``config.json`` and the identity hold the flat ``--set`` keys, as before the phases were embedded, and
    :func:`build_config` inverts :func:`config_values` for every experiment at every scale."""
    for exp in experiments.all_experiments():
        for scale in ("smoke", "quick", "full"):
            cfg = make_config(exp, scale=scale)
            flat = config_values(cfg)
            assert not any(isinstance(v, train.TrainConfig) for v in flat.values())
            assert list(flat) == [k.name for k in config_keys(exp.config)]
            assert len(set(flat)) == len(flat), f"{exp.name}: two keys share a name"
            assert build_config(exp.config, flat) == cfg
            assert set(experiments.identity(cfg)) <= set(flat)


@dataclasses.dataclass
class _PhaseConfig(ExperimentConfig):
    train: train.TrainConfig = training_phase("the runs", optimizer="adam", loss="mse",
                                              lr=option(0.01, "Adam's learning rate", gt=0, lt=1),
                                              epochs=option(3, "epochs", ge=1))
    warmup: train.TrainConfig = training_phase("the warm-up", prefix="warmup_", names={"max_steps": "warmup_steps"},
                                               max_steps=option(10, "warm-up steps", ge=1))


_PHASED = Experiment("phased", "phases", _PhaseConfig, arms=lambda cfg: [], run_arm=lambda run: {},
                     analyze=lambda results: [])


def test_phase_keys_are_parsed_bounded_and_described_by_their_own_option():
    cfg = make_config(_PHASED, ["lr=0.5", "epochs=7", "warmup_steps=4"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.warmup.max_steps) == (0.5, 7, 4)
    assert (cfg.train.optimizer, cfg.train.loss, cfg.warmup.optimizer) == ("adam", "mse", "sgd")  # fixed / default
    with pytest.raises(ConfigError, match=r"bad value 1.0 for 'lr'.*below 1"):
        make_config(_PHASED, ["lr=1"])
    with pytest.raises(ConfigError, match=r"bad value 0 for 'warmup_steps'.*at least 1"):
        make_config(_PHASED, ["warmup_steps=0"])
    for fixed in ("optimizer", "loss", "seed", "warmup_max_steps", "warmup_lr"):
        with pytest.raises(ConfigError, match=f"unknown key '{fixed}'"):
            make_config(_PHASED, [f"{fixed}=1"])
    described = experiments.describe_fields(_PhaseConfig)
    assert "  lr (float, above 0, below 1, default 0.01): Adam's learning rate" in described
    assert "  warmup_steps (int, at least 1, default 10): warm-up steps" in described
    assert "optimizer" not in described


def test_a_phase_refuses_run_owned_fields_and_the_loop_checks_its_fixed_values():
    for owned in experiments.RUN_OWNED:
        with pytest.raises(TypeError, match=owned):
            training_phase("bad", **{owned: option(0, "x")})
    with pytest.raises(TypeError, match="not option fields"):
        training_phase("bad", names={"lr": "rate"}, lr=0.1)

    @dataclasses.dataclass
    class Shadowed(ExperimentConfig):
        lr: float = option(0.1, "a method's own rate")
        train: train.TrainConfig = training_phase("the runs", lr=option(0.05, "SGD's rate"))

    with pytest.raises(TypeError, match=r"Shadowed: keys \['lr'\] name two values"):
        config_keys(Shadowed)

    @dataclasses.dataclass
    class BadLoss(ExperimentConfig):
        train: train.TrainConfig = training_phase("the runs", loss="hinge")

    with pytest.raises(ConfigError, match="training phase 'train'.*unknown loss 'hinge'"):
        make_config(Experiment("bad", "bad", BadLoss, arms=lambda cfg: [], run_arm=lambda run: {},
                               analyze=lambda results: []))


def test_a_dataclass_field_that_is_not_a_phase_is_recorded_as_a_dict_as_before():
    """A user's config may hold a TrainConfig (or any dataclass) as a plain field, without ``training_phase``: it
    is no ``--set`` key, and its record is the nested dict ``dataclasses.asdict`` gave before the phases."""

    @dataclasses.dataclass
    class Nested(ExperimentConfig):
        inner: train.TrainConfig = dataclasses.field(default_factory=lambda: train.TrainConfig(lr=0.3))

    cfg = make_config(Experiment("nested", "nested", Nested, arms=lambda cfg: [], run_arm=lambda run: {},
                                 analyze=lambda results: []))
    assert config_values(cfg)["inner"] == dataclasses.asdict(train.TrainConfig(lr=0.3))
    assert experiments.identity(cfg)["inner"]["lr"] == 0.3


def test_a_run_fills_in_only_its_own_fields_and_what_the_arm_passes(tmp_path: Path):
    cfg = make_config(_PHASED, ["lr=0.2", "checkpoint_every=5"])
    run = Run(cfg, None, seed=3, dir=tmp_path, exp_dir=tmp_path, resume=False, device="cpu")
    tc = run.train_config(cfg.train, batch_size=16)
    assert tc == dataclasses.replace(cfg.train, seed=3, device="cpu", checkpoint_every=5, batch_size=16)
    assert cfg.train.seed == 0 and cfg.train.batch_size == 64  # the config's phase itself is left alone
