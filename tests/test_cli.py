"""The command line end to end: config validation, runs, report, torchrun, kill-and-resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backproplab import experiments
from backproplab.cli import main
from backproplab.train import TIMING_KEYS

# runs experiments, the CLI or a local server: not in the fast tier (make test-fast)
pytestmark = pytest.mark.medium

TINY = ["datasets=digits", "models=mlp", "optimizers=sgd,adam", "epochs=2"]


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "backproplab", *args], capture_output=True, text=True,
                          env=env, timeout=kw.pop("timeout", 300), **kw)


def test_list_names_every_registered_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for exp in experiments.all_experiments():
        assert exp.name in out and exp.description in out


def test_unknown_set_key_fails_fast_listing_valid_keys(tmp_path, capsys):
    code = main(["run", "baselines", "--set", "epochz=3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'epochz'" in err
    for field in ("epochs (int", "optimizers (comma-separated list of str", "adam_lr (float"):
        assert field in err
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_repeated_set_flags_all_apply(tmp_path, capsys):
    """``--set a=1 --set b=2`` must not silently drop a=1: a bad key in the first flag still fails."""
    assert main(["run", "baselines", "--set", "epochz=3", "--set", "epochs=1", "--out", str(tmp_path)]) == 2
    assert "unknown key 'epochz'" in capsys.readouterr().err


@pytest.mark.parametrize("bad,expect", [("epochs=three", "expected int"), ("optimizers=sgd,lbfgs", "lbfgs"),
                                        ("noequals", "key=value")])
def test_bad_values_fail_before_training(tmp_path, capsys, bad, expect):
    assert main(["run", "baselines", "--set", bad, "--out", str(tmp_path)]) == 2
    assert expect in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_config_parsing_types():
    exp = experiments.get("baselines")
    cfg = experiments.make_config(exp, ["adam_lr=0.01", "models=cnn", "epochs=4"], quick=True, seeds=5)
    assert cfg.adam_lr == 0.01 and cfg.models == ("cnn",) and cfg.train.epochs == 4 and cfg.seeds == 5
    assert experiments.make_config(exp, quick=True).train.epochs == exp.quick["epochs"]


def test_run_writes_layout_and_report_has_one_figure_section_per_experiment(tmp_path):
    out = tmp_path / "res"
    assert main(["run", "baselines", "--set", *TINY, "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    exp_dir = out / "baselines"
    for arm in ("digits-mlp-sgd", "digits-mlp-adam"):
        for seed in (0, 1):
            run = exp_dir / arm / f"seed{seed}"
            assert {"config.json", "metrics.jsonl", "final.json", "model.pt"} <= {p.name for p in run.iterdir()}
            assert json.loads((run / "config.json").read_text())["seed"] == seed
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["notes"] and summary["figures"]
    page = (out / "report.html").read_text()
    sections = page.split("<h2")[2:]  # the first is the claims table
    assert len(sections) == len(list(out.glob("*/summary.json")))
    for section in sections:
        assert section.count("<img") == len(summary["figures"]) >= 1
        assert "data:image/png;base64," in section
    # the table reports mean ± std over the 2 seeds, from the runs' own final.json
    finals = [json.loads((exp_dir / "digits-mlp-adam" / f"seed{s}" / "final.json").read_text())["test_acc"]
              for s in (0, 1)]
    mean = sum(finals) / 2
    assert re.search(rf"digits-mlp-adam</td><td>2</td><td>{mean:.4g} ±", page)


def test_rerun_skips_finished_runs(tmp_path):
    tail = ["--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    args = ["run", "baselines", "--set", *TINY, *tail]
    assert main(args) == 0
    model = tmp_path / "baselines" / "digits-mlp-sgd" / "seed0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert main(args) == 0
    assert model.stat().st_mtime_ns == stamp
    # fields that do not change results (device, checkpointing, seed count) keep the runs
    assert main(["run", "baselines", "--set", *TINY, "checkpoint_every=5", "--device", "cpu", *tail]) == 0
    assert model.stat().st_mtime_ns == stamp
    # --overwrite replaces only another config's runs: this one's are kept; --no-resume starts them over
    assert main([*args, "--overwrite"]) == 0
    assert model.stat().st_mtime_ns == stamp
    assert main([*args, "--no-resume"]) == 0
    assert model.stat().st_mtime_ns != stamp


def test_another_config_never_mixes_or_deletes_results(tmp_path, capsys):
    """Issue: a second run with other epochs deleted seed 0 and averaged the stale seed 1 into the verdict."""
    s = ["datasets=digits", "models=mlp", "optimizers=sgd,momentum", "n_train=256"]
    out = ["--out", str(tmp_path), "--no-progress"]
    assert main(["run", "baselines", "--set", *s, "epochs=1", "--seeds", "2", *out]) == 0
    runs = tmp_path / "baselines" / "digits-mlp-sgd"
    before = {p: p.stat().st_mtime_ns for p in runs.glob("seed*/final.json")}
    assert len(before) == 2
    capsys.readouterr()
    assert main(["run", "baselines", "--set", *s, "epochs=2", "--seeds", "1", *out]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "epochs: 1 there, 2 now" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in runs.glob("seed*/final.json")} == before  # nothing deleted
    # with --overwrite the runs of this config replace them, and the analysis reads only this config's seeds
    assert main(["run", "baselines", "--set", *s, "epochs=2", "--seeds", "1", "--overwrite", *out]) == 0
    summary = json.loads((tmp_path / "baselines" / "summary.json").read_text())
    assert summary["config"]["epochs"] == 2
    verdict = summary["verdicts"][0]
    assert verdict["seeds"] == [0] and verdict["outcome"] == "inconclusive"  # one seed: no interval
    page = (tmp_path / "report.html").read_text()
    assert re.search(r"digits-mlp-sgd</td><td>1</td>", page)  # the seed-1 run of the old config is not counted


def _final_weights(folder):
    return torch.load(Path(folder) / "baselines" / "digits-mlp-momentum" / "seed0" / "model.pt")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    """2 gloo ranks x 32 examples == 1 process x 64 examples, step for step (n_train divisible by 64)."""
    args = ["run", "baselines", "--set", "datasets=digits", "models=mlp", "optimizers=momentum", "epochs=2",
            "n_train=1280", "batch_size=64", "--seeds", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # in this process: a second start costs seconds
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "backproplab", *args, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    run = tmp_path / "two" / "baselines" / "digits-mlp-momentum" / "seed0"
    assert len(json.loads((run / "final.json").read_text())) > 0


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    args = ["run", "baselines", "--set", "datasets=digits", "models=cnn", "optimizers=momentum", "epochs=6",
            "checkpoint_every=10", "--seeds", "1", "--no-progress"]
    full = _cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    run = tmp_path / "cut" / "baselines" / "digits-cnn-momentum" / "seed0"
    proc = subprocess.Popen([sys.executable, "-m", "backproplab", *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final.json").exists(), "the run finished before it could be killed"
    resumed = _cli(*args, "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr

    def metrics(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert metrics(run) == metrics(tmp_path / "full" / "baselines" / "digits-cnn-momentum" / "seed0")


def test_run_name_help_lists_every_config_key_with_type_default_and_meaning(capsys):
    import dataclasses

    for exp in experiments.all_experiments():
        with pytest.raises(SystemExit) as stop:
            main(["run", exp.name, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        for key in experiments.config_keys(exp.config):  # a training phase's keys included (bn_lr, ...)
            line = next((ln for ln in out.splitlines() if ln.startswith(f"  {key.name} (")), None)
            assert line is not None, (exp.name, key.name)
            assert f"default {key.field.default!r}" in line and re.search(r"\): \S", line), line  # a meaning follows
        for f in dataclasses.fields(exp.config):  # each phase is named with what it trains
            if f.metadata.get("phase") is not None:
                assert f"training phase {f.name!r}: {f.metadata['help']}]" in out, (exp.name, f.name)


def test_list_verbose_shows_each_experiments_claims(capsys):
    assert main(["list", "--verbose"]) == 0
    out = capsys.readouterr().out
    for exp in experiments.all_experiments():
        for claim in exp.claims(exp.config()):
            assert f"    {claim.id}: {claim.statement}" in out


def test_log_option_writes_csv_and_tensorboard_that_their_readers_read(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["run", "baselines", "--set", "datasets=digits", "models=mlp", "optimizers=sgd", "epochs=3",
            "--seeds", "1", "--out", str(tmp_path), "--no-progress", "--log", "csv,tensorboard"]
    assert main(args) == 0
    run = tmp_path / "baselines" / "digits-mlp-sgd" / "seed0"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 3
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in rows]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("test_acc")
    assert [s.step for s in scalars] == [r["step"] for r in rows]
    assert [s.value for s in scalars] == pytest.approx([r["test_acc"] for r in rows], rel=1e-6)
    # logging does not change which results are whose: the run is not redone without --log
    stamp = (run / "model.pt").stat().st_mtime_ns
    assert main(args[:-2]) == 0 and (run / "model.pt").stat().st_mtime_ns == stamp
    assert main([*args[:-1], "csv,wandb"]) == 2


def test_csv_logger_rewrites_from_the_restored_history_on_resume(tmp_path):
    from backproplab.data import load_dataset
    from backproplab.loggers import CSVLogger
    from backproplab.models import build_model
    from backproplab.train import TrainConfig, fit, seed_everything

    data = load_dataset("digits", n_train=128)
    cfg = TrainConfig(lr=0.1, batch_size=32, epochs=3, checkpoint_every=4, eval_every=2)

    def model():
        seed_everything(0)
        return build_model("mlp", data.input_shape, data.num_classes)

    class Crash:
        def on_step_end(self, state):
            if state.step == 7:  # after the evaluation at step 6, past the checkpoint at step 4
                raise KeyboardInterrupt

    path = tmp_path / "metrics.csv"
    with pytest.raises(KeyboardInterrupt):
        fit(model(), data, cfg, out_dir=tmp_path, callbacks=[CSVLogger(path), Crash()])
    assert len(path.read_text().splitlines()) == 1 + 3
    history = fit(model(), data, cfg, out_dir=tmp_path, callbacks=[CSVLogger(path)])
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(history) == 1 + 6  # rows 6 (seen before the crash) is not duplicated
    assert [int(line.split(",")[lines[0].split(",").index("step")]) for line in lines[1:]] == [2, 4, 6, 8, 10, 12]


def test_sweep_tunes_on_a_held_out_validation_split_and_records_the_choice(tmp_path, capsys):
    """Each grid point trains on 80% of the training set and reports on the other 20%; the saved model's
    accuracy on that split (rebuilt independently) is the reported one, so the test set played no part."""
    import torch

    from backproplab import experiments as ex
    from backproplab.data import load_dataset
    from backproplab.models import build_model

    code = main(["sweep", "baselines", "--grid", "sgd_lr=0.001,0.3", "--set", "optimizers=sgd", "--scale", "smoke",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "sweeps" / "baselines" / "sweep.json").read_text())
    assert {r["point"] for r in record["points"]} == {"sgd_lr=0.001", "sgd_lr=0.3"}
    assert record["choice"] == {"digits-mlp-sgd": "sgd_lr=0.3"}  # 0.001 barely moves in 2 epochs
    run = tmp_path / "sweeps" / "baselines" / "sgd_lr=0.3" / "baselines" / "digits-mlp-sgd" / "seed1"
    final = json.loads((run / "final.json").read_text())
    data = ex.validation_split(load_dataset("digits", seed=1, n_train=300, rest_to_test=True), 0.2, 1)
    assert len(data.x_test) == 60 and len(data.x_train) == 240
    model = build_model("mlp", data.input_shape, 10)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert acc == pytest.approx(final["test_acc"], abs=1e-6)
    assert "Chosen per arm: digits-mlp-sgd: sgd_lr=0.3" in capsys.readouterr().out


def test_validation_is_refused_by_an_experiment_that_does_not_load_through_run_data(tmp_path):
    code = main(["run", "luck_matters", "--scale", "smoke", "--set", "validation=0.2", "--out", str(tmp_path),
                 "--no-progress"])
    assert code != 0


def test_reproduce_locally_shows_one_bar_over_every_experiments_runs(tmp_path, monkeypatch, capsys):
    """#38: the local loop's progress equals Ray's: one count of the runs done of all still to do, the time
    left, the run in progress; each experiment's verdicts printed as it ends."""
    chosen = [experiments.get("baselines"), experiments.get("msgd")]
    monkeypatch.setattr(experiments, "all_experiments", lambda: chosen)
    total = sum(len(experiments.plan(e, experiments.make_config(e, scale="smoke"), tmp_path)) for e in chosen)
    assert main(["reproduce", "--scale", "smoke", "--executor", "local", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert re.search(rf"reproduce: 100%.*\b{total}/{total} \[", err), err[-2000:]  # one bar, all the runs
    assert "running msgd" in err and "<00:00" in err
    assert [line.split(":")[0] for line in out.splitlines() if "; results in " in line] == ["baselines", "msgd"]
