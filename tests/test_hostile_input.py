"""The second hostile-user pass (silent wrong results): each test failed on the code before its fix."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from backproplab.cli import main
from backproplab.data import Data, DataFormatError, load_dataset
from backproplab.methods import robustness
from backproplab.train import TrainConfig, fit


@pytest.mark.parametrize("args,message", [
    (["--validation", "0"], "would select on the test set"),
    (["--grid", "sgd_lr=0.3"], "names 'sgd_lr' twice"),
    (["--grid", "validation=0.1,0.5"], "the validation split is the sweep's own"),
    (["--metric", "test_accuracy"], "--metric 'test_accuracy' is not a metric of baselines"),
], ids=["validation 0", "repeated key", "grid validation", "metric typo"])
def test_a_sweep_that_would_select_wrongly_is_refused_before_any_run(tmp_path, capsys, args, message):
    code = main(["sweep", "baselines", "--grid", "sgd_lr=0.1,0.2", "--scale", "smoke", "--out", str(tmp_path),
                 "--no-progress", *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.json"))  # nothing ran


def test_mse_refuses_targets_of_another_shape():
    """(B,) targets against (B, 1) outputs broadcast to (B, B): the model learned nothing, silently."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"outputs of shape \(8, 1\) and targets of shape \(8,\)"):
        fit(model, Data("reg", x, y, x, y, 0), TrainConfig(loss="mse", batch_size=8, epochs=1))
    rows = fit(model, Data("reg", x, y[:, None], x, y[:, None], 0),
               TrainConfig(loss="mse", batch_size=8, epochs=60, lr=0.1))
    assert rows[-1]["test_loss"] < 0.01 * float(y.var())  # with matching shapes it fits the linear target


def test_fit_with_no_step_reports_no_training_loss():
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    rows = fit(nn.Linear(3, 2), Data("toy", x, y, x, y, 2), TrainConfig(epochs=0))
    assert "train_loss" not in rows[-1] and rows[-1]["step"] == 0 and "test_acc" in rows[-1]


@pytest.mark.parametrize("kwargs,name", [
    ({"sigma": -0.5}, "sigma"), ({"sigma": math.nan}, "sigma"), ({"sigma": 0.0}, "sigma"), ({"alpha": 2.0}, "alpha"),
    ({"alpha": 0.0}, "alpha"), ({"n0": 0}, "n0"), ({"n": 0}, "n="),
])
@pytest.mark.parametrize("batched", [False, True])
def test_certify_validates_what_the_cli_validates(kwargs, name, batched):
    model = nn.Linear(2, 2)
    args = {"sigma": 0.5, "n0": 10, "n": 50, "alpha": 0.01, **kwargs}
    x = torch.zeros(3, 2) if batched else torch.zeros(2)
    with pytest.raises(ValueError, match=name):
        robustness.certify(model, x, args["sigma"], args["n0"], args["n"], args["alpha"], 2, batched=batched)
    if "n0" not in kwargs:
        with pytest.raises(ValueError, match=name):
            robustness.smoothed_predict(model, x, args["sigma"], args["n"], args["alpha"], 2, batched=batched)


def _svhn(tmp_path, y_train, x_train=None):
    from scipy.io import savemat

    folder = tmp_path / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = len(y_train)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8) if x_train is None else x_train
    savemat(folder / "train_32x32.mat", {"X": x, "y": np.asarray(y_train).reshape(-1, 1)})
    savemat(folder / "test_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8),
                                        "y": np.array([[1], [10]], dtype=np.uint8)})


@pytest.mark.parametrize("labels", [[1, 15, 3], [1, -1, 3], [1, 1000, 3], [1, 2.04, 3], [1, 0, 3]],
                         ids=["15", "-1", "1000", "2.04", "0"])
def test_svhn_labels_outside_the_official_range_are_refused(tmp_path, labels):
    _svhn(tmp_path, np.array(labels, dtype=np.float64))
    with pytest.raises(DataFormatError, match=r"train_32x32\.mat: y must hold the official labels"):
        load_dataset("svhn", root=tmp_path)


def test_svhn_pixels_outside_0_255_are_refused(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (32, 32, 3, 3))
    x[0, 0, 0, 0] = 2.55e8
    _svhn(tmp_path, [1, 2, 3], x_train=x)
    with pytest.raises(DataFormatError, match="pixel values 0..255"):
        load_dataset("svhn", root=tmp_path, unit_range=True)
    x[0, 0, 0, 0] = 12.0  # float pixels in range are read as they are
    _svhn(tmp_path, [1, 2, 10], x_train=x)
    d = load_dataset("svhn", root=tmp_path, unit_range=True)
    assert float(d.x_train.max()) <= 1.0 and d.y_train.tolist() == [1, 2, 0]


@pytest.mark.medium
def test_certify_takes_the_seed_from_config_json_not_from_the_folder_name(tmp_path, capsys):
    """A copied run folder: seed 1's model must be certified on seed 1's test split (its own held-out data)."""
    from backproplab.experiments import privacy as privacy_experiment

    args = ["run", "privacy", "--set", "epsilons=8", "nonprivate=false", "adversarial=clean", "augment_sigmas=0",
            "epochs=1", "cert_examples=3", "cert_n=20", "cert_n0=5", "linf_eps=0.1", "l2_eps=0.5", "pgd_steps=1",
            "widths=8", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "privacy" / "eps8-clean-aug0" / "seed1"
    copy = tmp_path / "copied" / "seed0"
    shutil.copytree(run, copy)
    record = json.loads((copy / "config.json").read_text())
    assert privacy_experiment._seed_of(copy) == record["seed"] == 1


TINY = ["datasets=digits", "models=mlp", "optimizers=sgd", "epochs=1", "n_train=128"]


@pytest.mark.medium
def test_no_resume_never_deletes_another_configs_runs(tmp_path, capsys):
    tail = ["--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(["run", "baselines", "--set", *TINY, "sgd_lr=0.05", *tail]) == 0
    config = tmp_path / "baselines" / "digits-mlp-sgd" / "seed0" / "config.json"
    assert main(["run", "baselines", "--set", *TINY, "sgd_lr=0.1", "--no-resume", *tail]) == 2
    assert "another config" in capsys.readouterr().err
    assert json.loads(config.read_text())["config"]["sgd_lr"] == 0.05  # kept
    assert main(["run", "baselines", "--set", *TINY, "sgd_lr=0.05", "--no-resume", *tail]) == 0  # its own: redone


@pytest.mark.medium
def test_a_grid_value_never_writes_outside_out(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    code = main(["sweep", "baselines", "--grid", "data_root=../../../../../escaped,x", "--set", *TINY,
                 "--seeds", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    outside = [p for p in tmp_path.rglob("*") if not p.resolve().is_relative_to(out.resolve())
               and p.resolve() not in {out.parent.resolve(), out.parent.parent.resolve()}]
    assert outside == []
    folders = sorted(p.name for p in (out / "sweeps" / "baselines").iterdir() if p.is_dir())
    assert folders == ["data_root=..%2F..%2F..%2F..%2F..%2Fescaped", "data_root=x"]


@pytest.mark.medium
def test_a_run_another_process_holds_is_waited_for_and_its_result_reused(tmp_path, capsys):
    """Two identical runs into one --out wrote every metrics row twice. Now a run takes a lock on its folder
    (filelock): while another process holds it, run_job waits, then finds that process's final.json and reuses
    it instead of running again."""
    import threading

    from filelock import FileLock

    from backproplab import experiments

    exp = experiments.get("baselines")
    cfg = experiments.make_config(exp, TINY, seeds=1)
    (job,) = experiments.plan(exp, cfg, tmp_path)
    other = FileLock(str(job.run_dir.parent / f".{job.run_dir.name}.lock"))
    other.acquire()  # the other process, mid-run
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(experiments.run_job(job)))
    waiting.start()
    waiting.join(2.0)
    assert waiting.is_alive() and not result  # it waits instead of running the same run again
    job.run_dir.mkdir(parents=True, exist_ok=True)  # what the other process leaves when it finishes
    (job.run_dir / "config.json").write_text(json.dumps({"config": experiments.identity(cfg)}))
    (job.run_dir / "final.json").write_text(json.dumps({"status": "ok", "test_acc": 0.125}))
    other.release()
    waiting.join(120)
    assert result == {"status": "ok", "test_acc": 0.125}
    assert "being run by another process; waiting" in capsys.readouterr().err


# ---------------------------------------------------------------- malformed data files through the CLI


def _malformed(root, case):
    """Each malformed data file the test suite makes (tests/test_reliability.py, test_data.py and this file):
    (dataset, the file its message must name)."""
    from scipy.io import savemat
    import struct

    from test_reliability import Payload, _cifar, _idx, _mnist

    if case == "idx label count":
        _mnist(root / "mnist", n_labels=11)
        return "mnist", "train-labels-idx1-ubyte"
    if case == "idx missing file":
        _mnist(root / "mnist", skip=("t10k-labels-idx1-ubyte",))
        return "mnist", "t10k-labels-idx1-ubyte"
    if case == "idx truncated header":
        _mnist(root / "mnist")
        (root / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\0\0")
        return "mnist", "train-images-idx3-ubyte"
    if case == "idx wrong magic":
        _mnist(root / "mnist")
        (root / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"garbage, not an IDX file")
        return "mnist", "t10k-images-idx3-ubyte"
    if case == "idx gzip corrupt":
        _mnist(root / "mnist")
        (root / "mnist" / "train-images-idx3-ubyte").unlink()
        (root / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
        return "mnist", "train-images-idx3-ubyte.gz"
    if case == "idx size overflow":  # dimensions whose product overflows 64 bits
        _mnist(root / "mnist")
        head = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
        (root / "mnist" / "train-images-idx3-ubyte").write_bytes(head + bytes(100))
        return "mnist", "train-images-idx3-ubyte"
    if case == "idx image sizes differ":
        _mnist(root / "mnist")
        _idx(root / "mnist" / "t10k-images-idx3-ubyte", np.zeros((5, 20, 20), dtype=np.uint8))
        return "mnist", "t10k-images-idx3-ubyte"
    if case == "idx no examples":
        _mnist(root / "mnist")
        _idx(root / "mnist" / "train-images-idx3-ubyte", np.zeros((0, 28, 28), dtype=np.uint8))
        _idx(root / "mnist" / "train-labels-idx1-ubyte", np.zeros((0,), dtype=np.uint8))
        return "mnist", "train-images-idx3-ubyte"
    if case == "svhn nan pixel":
        x = np.random.default_rng(0).random((32, 32, 3, 3)) * 255
        x[0, 0, 0, 1] = np.nan
        _svhn(root, np.array([1, 2, 10], dtype=np.uint8), x_train=x)
        return "svhn", "train_32x32.mat"
    if case == "cifar hostile pickle":
        _cifar(root / "cifar-10-batches-py", payload=Payload(root / "pwned"))
        return "cifar10", "data_batch_1"
    if case == "cifar label count":
        _cifar(root / "cifar-10-batches-py", n=200, labels=list(range(10)) * 17 + [0] * 5)
        return "cifar10", "data_batch_1"
    if case == "cifar label range":
        _cifar(root / "cifar-10-batches-py", n=3, labels=[0, 1, 12])
        return "cifar10", "data_batch_1"
    if case == "svhn without X":
        (root / "svhn").mkdir(parents=True)
        for split in ("train", "test"):
            savemat(root / "svhn" / f"{split}_32x32.mat", {"y": np.ones((4, 1), dtype=np.uint8)})
        return "svhn", "train_32x32.mat"
    if case == "svhn label range":
        _svhn(root, np.array([1, 15, 3], dtype=np.float64))
        return "svhn", "train_32x32.mat"
    raise AssertionError(case)


MALFORMED = ["idx label count", "idx missing file", "idx truncated header", "idx wrong magic", "idx gzip corrupt",
             "idx size overflow", "idx image sizes differ", "idx no examples", "svhn nan pixel",
             "cifar hostile pickle", "cifar label count", "cifar label range", "svhn without X", "svhn label range"]


@pytest.mark.medium
@pytest.mark.parametrize("case", MALFORMED)
def test_the_cli_names_a_malformed_data_file_in_one_line(tmp_path, capsys, case):
    dataset, name = _malformed(tmp_path / "data", case)
    out = tmp_path / "out"
    code = main(["run", "baselines", "--set", f"datasets={dataset}", f"data_root={tmp_path / 'data'}", "models=mlp",
                 "optimizers=sgd", "epochs=1", "n_train=3", "--seeds", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("backproplab: error: ") and name in lines[0] and str(tmp_path / "data") in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]  # no run folder holding only config.json
    assert not (tmp_path / "data" / "pwned").exists()


# ---------------------------------------------------------------- loggers


def test_a_logger_named_twice_is_refused(tmp_path, capsys):
    from backproplab.loggers import make_loggers

    with pytest.raises(ValueError, match="'tensorboard' named twice"):
        make_loggers("tensorboard,tensorboard", tmp_path)
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path), "--no-progress",
                 "--log", "csv,csv"])
    assert code == 2 and "named twice" in capsys.readouterr().err


@pytest.mark.medium
def test_tensorboard_holds_each_step_once_after_a_crash_without_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backproplab.loggers import TensorBoardLogger
    from backproplab.models import build_model
    from backproplab.train import seed_everything

    data = load_dataset("digits", n_train=128)
    cfg = TrainConfig(lr=0.1, batch_size=32, epochs=3, eval_every=2)  # no checkpoints

    def model():
        seed_everything(0)
        return build_model("mlp", data.input_shape, data.num_classes)

    class Crash:
        def on_step_end(self, state):
            if state.step == 7:
                raise KeyboardInterrupt

    log = tmp_path / "tensorboard"
    with pytest.raises(KeyboardInterrupt):
        fit(model(), data, cfg, out_dir=tmp_path, callbacks=[TensorBoardLogger(log), Crash()])
    history = fit(model(), data, cfg, out_dir=tmp_path, callbacks=[TensorBoardLogger(log)])
    events = EventAccumulator(str(log))
    events.Reload()
    assert [s.step for s in events.Scalars("test_acc")] == [r["step"] for r in history] == [2, 4, 6, 8, 10, 12]


# ---------------------------------------------------------------- options and files the CLI names in one line


@pytest.mark.parametrize("option,value", [("--cpus-per-run", "0"), ("--cpus-per-run", "-1"), ("--seeds", "0"),
                                          ("--seeds", "1000000000000"), ("--gpus-per-run", "-0.5"),
                                          ("--max-retries", "-1"), ("--cpus-per-run", "nan")])
def test_an_option_out_of_range_is_one_line_before_anything_runs(tmp_path, capsys, option, value):
    """argparse's one line for the executor's options; the config's for --seeds (10^12 hung in planning)."""
    try:
        code = main(["run", "baselines", "--set", *TINY, "--out", str(tmp_path), "--no-progress", option, value])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and option.strip("-") in err.splitlines()[-1] and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_a_very_large_number_of_runs_is_announced(capsys, monkeypatch):
    from backproplab import cli, experiments

    monkeypatch.setattr(cli.experiments, "preflight", lambda *a, **k: None)
    monkeypatch.setattr(cli, "init_distributed", lambda *a: (_ for _ in ()).throw(SystemExit(0)))  # stop there
    with pytest.raises(SystemExit):
        main(["run", "baselines", "--set", *TINY, "--seeds", "2000", "--no-progress"])
    assert "2000 runs planned" in capsys.readouterr().err
    assert cli._count_runs(experiments.get("baselines"),
                           experiments.make_config(experiments.get("baselines"), TINY, seeds=3)) == 3


@pytest.mark.parametrize("content", [b"just some text\n", b"PK\x03\x04truncated", "tensor"])
def test_bn_bias_on_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "model.pt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    assert main(["bn-bias", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_help_of_an_unknown_experiment_says_so_and_of_a_known_one_lists_its_keys(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "nosuchexp", "--help"])
    assert "unknown experiment 'nosuchexp'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([command, "privacy", "--help"])
    assert "validation_public" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
    (["--gpus-per-run", "0.5"], "--gpus-per-run 0.5: this machine has no CUDA GPU"),
    (["--storage", "FILE"], "is a file, not a folder"),
], ids=["unreachable address", "gpus without a gpu", "storage is a file"])
def test_ray_settings_that_could_never_run_fail_fast_in_one_line(tmp_path, capsys, args, message):
    """These waited for minutes (the address) or forever (GPUs nobody has); now they fail before Ray starts."""
    import time

    pytest.importorskip("ray")
    if torch.cuda.is_available() and "--gpus-per-run" in args:
        pytest.skip("this machine has a GPU")
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    start = time.monotonic()
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path / "out"), "--no-progress",
                 "--executor", "ray", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and time.monotonic() - start < 30


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_something_not_a_file_where_a_figure_goes_is_one_line_and_the_runs_are_kept(tmp_path, capsys, kind):
    import os

    exp_dir = tmp_path / "baselines"
    exp_dir.mkdir()
    figure = exp_dir / "test_accuracy.png"
    os.mkfifo(figure) if kind == "fifo" else figure.mkdir()
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{figure} is" in err and "move it away" in err and "Traceback" not in err
    assert (exp_dir / "digits-mlp-sgd" / "seed0" / "final.json").exists()  # the finished run is kept


@pytest.mark.medium
@pytest.mark.parametrize("errno_name", ["ENOSPC", "EACCES", "EROFS"])
def test_a_full_disk_or_a_refused_write_is_one_line_even_deep_in_a_chain(tmp_path, capsys, monkeypatch, errno_name):
    """The file system's refusal, raised while the summary is written and wrapped in another error (as torch
    and Ray wrap them), ends the command with one line naming it; the finished runs stay."""
    import errno

    from backproplab import _io

    real = _io.write_json

    def refusing(path, obj):
        if str(path).endswith("summary.json"):
            try:
                raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(path))
            except OSError as e:
                raise RuntimeError("while writing the summary") from e
        return real(path, obj)

    import os

    monkeypatch.setattr(_io, "write_json", refusing)
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("backproplab: error: " + os.strerror(getattr(errno, errno_name)))
    assert "summary.json" in err and (tmp_path / "baselines" / "digits-mlp-sgd" / "seed0" / "final.json").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from backproplab import experiments

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "run", interrupted)
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- paths the file system refuses


def test_an_out_folder_that_is_a_symlink_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "1", "--out", str(tmp_path / "a"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "Too many levels of symbolic links" in err and str(tmp_path / "a") in err


def _refuse_writes_under(monkeypatch, folder):
    """Writes (files, temporary files, folders) under ``folder`` fail with EACCES, as in a folder another user
    owns or made read-only; a real chmod cannot show this when the tests run as root."""
    import builtins
    import errno
    import io
    import os
    import tempfile

    def refused(path):
        return str(os.path.abspath(path)).startswith(str(folder))

    def deny(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_mkstemp, real_makedirs, real_mkdir = builtins.open, tempfile.mkstemp, os.makedirs, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and refused(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and refused(dir):
            deny(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def makedirs(name, *args, **kwargs):
        if refused(name) and not os.path.isdir(name):
            deny(name)
        return real_makedirs(name, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            deny(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "makedirs", makedirs)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("where,log", [("", ""), ("", "csv"), ("tensorboard", "tensorboard")],
                         ids=["read-only run folder", "read-only run folder, csv log", "unwritable tensorboard log"])
def test_a_run_folder_or_log_path_that_refuses_writes_is_one_line_and_keeps_the_finished_runs(
        tmp_path, capsys, monkeypatch, where, log):
    if log == "tensorboard":
        pytest.importorskip("tensorboard")
    run = tmp_path / "baselines" / "digits-mlp-sgd" / "seed1"
    _refuse_writes_under(monkeypatch, run / where if where else run)
    code = main(["run", "baselines", "--set", *TINY, "--seeds", "2", "--out", str(tmp_path), "--no-progress",
                 *(["--log", log] if log else [])])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("backproplab: error: Permission denied: " + str(run)), err
    assert (tmp_path / "baselines" / "digits-mlp-sgd" / "seed0" / "final.json").exists()  # the finished run is kept
    assert not (run / "final.json").exists() and not list(tmp_path.rglob("*.tmp"))  # nothing half-written
