"""The Ray executor on a local instance with 2 workers: a smoke reproduction equals a sequential one file for
file (timing fields aside); a worker killed mid-run is retried and its run resumes from its checkpoint; a run
that fails for its own reasons is recorded and the others finish."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from backproplab import experiments
from backproplab.executors import RayExecutor, RunFailed
from backproplab.train import TIMING_KEYS

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance on loopback, for this test only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _normalised(path: Path):
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        return {k: v for k, v in d.items() if k not in TIMING_KEYS} if isinstance(d, dict) else d
    if path.suffix == ".jsonl":
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in path.read_text().splitlines()]
    if path.suffix == ".pt":
        return {k: v.tolist() for k, v in torch.load(path, weights_only=True).items()}
    return path.read_bytes()


def assert_same_files(a: Path, b: Path) -> int:
    files = lambda root: {str(p.relative_to(root)) for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and p.suffix in (".json", ".jsonl", ".pt", ".md")}
    assert files(a) == files(b)
    for name in sorted(files(a)):
        assert _normalised(a / name) == _normalised(b / name), name
    return len(files(a))


def _config(*overrides: str):
    exp = experiments.get("baselines")
    # long enough runs (several checkpoints each) that a worker can be killed mid-run
    return exp, experiments.make_config(exp, ["epochs=12", "checkpoint_every=20", *overrides], scale="smoke")


def test_ray_equals_sequential_and_a_killed_worker_is_retried_and_resumes(tmp_path, local_ray):
    exp, cfg = _config()
    sequential = experiments.run(exp, cfg, out=tmp_path / "local", progress=False, threads=1)

    executor = RayExecutor(cpus_per_run=1, max_retries=2)
    victim = tmp_path / "ray" / exp.name / "digits-mlp-sgd" / "seed1"
    killed = {}

    def kill_mid_run():  # once the run has checkpointed, SIGKILL the worker process running it
        marker = tmp_path / "ray" / exp.name / ".attempts" / "digits-mlp-sgd" / "seed1"
        end = time.time() + 120
        while time.time() < end and not killed:
            if marker.exists() and (victim / "checkpoint.pt").exists() and marker.read_text().strip():
                pid = int(marker.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_run)
    killer.start()
    distributed = experiments.run(exp, cfg, out=tmp_path / "ray", progress=False, executor=executor)
    killer.join()
    assert killed, "the run finished before it could be killed"
    attempts = executor.attempts[f"{exp.name} digits-mlp-sgd seed 1"]
    assert len(attempts) == 2 and attempts[0].startswith(str(killed["pid"]))
    assert attempts[1].endswith("from-checkpoint")  # the retry resumed, it did not start over
    assert not (victim / "final.json").exists() or (victim / "final.json").stat().st_size > 0
    assert assert_same_files(sequential, distributed) >= 10
    assert not (tmp_path / "ray" / exp.name / ".attempts").exists()


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path, local_ray, monkeypatch):
    exp, cfg = _config("epochs=1")
    jobs = experiments.plan(exp, cfg, tmp_path, threads=1)
    bad = jobs[1]
    # a run that raises for its own reasons: its arm is not one the experiment can build
    jobs[1] = type(bad)(bad.exp, bad.cfg, type(bad.arm)(**{**bad.arm.__dict__, "optimizer": "no-such"}), bad.seed,
                        bad.exp_dir, bad.resume, bad.device, bad.threads)
    with pytest.raises(RunFailed, match="1 of 4 runs failed"):
        RayExecutor(cpus_per_run=1, max_retries=0).run(jobs, experiments.run_job, progress=False)
    error = json.loads((jobs[1].run_dir / "error.json").read_text())
    assert error["status"] == "failed" and "no-such" in error["error"]
    for i in (0, 2, 3):
        assert json.loads((jobs[i].run_dir / "final.json").read_text())["status"] == "ok"


def test_ctrl_c_cancels_the_rest_and_keeps_every_finished_run(tmp_path):
    """SIGINT to a `run --executor ray` once a run has finished: the command stops, the finished runs stay
    whole, and the same command afterwards does only what is left."""
    import subprocess
    import sys

    # two CPUs per run: one run at a time on a 2-core machine, so when the first run's results arrive the other
    # three are still to come (one per CPU, two finished together and the last two could all land before the
    # signal: the command then ended normally, exit 0, in two CI runs on a loaded machine)
    cmd = [sys.executable, "-m", "backproplab", "run", "baselines", "--scale", "smoke", "--set", "epochs=12",
           "checkpoint_every=20", "--executor", "ray", "--cpus-per-run", "2", "--out", str(tmp_path),
           "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own private instance
    env["RAY_AUTH_MODE"] = "disabled"
    def as_from_a_terminal():
        # a child inherits its parent's blocked and ignored signals; in the full suite something earlier in this
        # process left SIGINT so, and the command then never saw the signal and ended normally (exit 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    status = Path(f"/proc/{os.getpid()}/status")
    masks = " ".join(line for line in status.read_text().splitlines() if line.startswith(("SigBlk", "SigIgn"))) \
        if status.exists() else ""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    finals = lambda: list((tmp_path / "baselines").glob("*/seed*/final.json"))  # noqa: E731
    end = time.time() + 180
    while time.time() < end and not finals() and proc.poll() is None:
        time.sleep(0.05)
    assert finals() and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "no run finished"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the command ended normally after SIGINT; this process's {masks}"
    # one line of ours, no traceback (Ray's own log lines may come before it)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("backproplab: interrupted; the finished runs are kept"), err
    done = finals()
    assert 1 <= len(done) < 4, err[-2000:]
    for f in done:
        assert json.loads(f.read_text())["status"] == "ok" and (f.parent / "model.pt").exists()
    stamps = {f: f.stat().st_mtime_ns for f in done}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(finals()) == 4
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # kept, not redone


def test_with_a_storage_folder_the_runs_come_back_to_the_driver(tmp_path, local_ray):
    """As on a cluster without a shared results folder: the tasks write under --storage, return their run
    folders, and the driver's folder ends with the same files as a sequential run (checkpoints stay behind)."""
    exp, cfg = _config("epochs=2")
    sequential = experiments.run(exp, cfg, out=tmp_path / "local", progress=False, threads=1)
    executor = RayExecutor(cpus_per_run=1, storage=str(tmp_path / "shared"))
    delivered = experiments.run(exp, cfg, out=tmp_path / "driver", progress=False, executor=executor)
    assert (tmp_path / "shared" / exp.name / "digits-mlp-sgd" / "seed0" / "final.json").exists()
    assert assert_same_files(sequential, delivered) >= 10


def test_reproduce_on_ray_judges_each_experiment_as_its_runs_finish(tmp_path, local_ray, monkeypatch, capsys):
    """#38: `reproduce` on Ray prints an experiment's verdicts once its last run is in, while the other
    experiments' runs go on (today's code judged every experiment after the last run of all); an analysis that
    fails is reported and the others are still judged."""
    import dataclasses

    from backproplab.cli import main

    def broken_analysis(results):
        raise RuntimeError("a bug in this analysis")

    first = experiments.get("baselines")
    broken = dataclasses.replace(first, name="broken", analyze=broken_analysis)
    monkeypatch.setattr(experiments, "all_experiments", lambda: [first, broken, experiments.get("layerwise")])
    # no --executor: reproduce on CPU takes Ray when it is installed
    assert main(["reproduce", "--scale", "smoke", "--out", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "broken: its verdicts failed (RuntimeError: a bug in this analysis); its runs are kept" in out
    for name in ("baselines", "layerwise"):
        assert re.search(rf"^{name}: \d+ reproduced, \d+ inconclusive, \d+ contradicted \(\d+ s\); results in ",
                         out, re.M), out
    assert (tmp_path / "report.html").exists() and not (tmp_path / "broken" / "summary.json").exists()
    judged = min((tmp_path / name / "summary.json").stat().st_mtime_ns for name in ("baselines", "layerwise"))
    last_run = max(p.stat().st_mtime_ns for p in tmp_path.glob("*/*/seed*/final.json"))
    assert judged < last_run, "the first verdicts came only after every run had finished"


@pytest.mark.parametrize("argv,env,installed,expect", [
    (["reproduce", "--quick"], {}, True, "ray"),
    (["reproduce", "--quick"], {}, False, "local"),
    (["reproduce", "--quick"], {"WORLD_SIZE": "2"}, True, "local"),  # under torchrun every rank runs every job
    (["reproduce", "--quick", "--executor", "local"], {}, True, "local"),
    (["run", "baselines", "--quick"], {}, True, "local"),
    (["run", "baselines", "--quick", "--address", "auto"], {}, True, "ray"),
])
def test_the_default_executor(argv, env, installed, expect, monkeypatch, capsys):
    import importlib.util

    from backproplab import cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec(name, *a) if installed or
                        name != "ray" else None)
    args = cli._parser(argv[1] if argv[0] == "run" else None).parse_args(argv)
    exp = experiments.get("baselines")
    configs = [(exp, experiments.make_config(exp, scale="quick"))]
    chosen = args.executor or cli._default_executor(args, configs)
    assert chosen == expect
    assert ("Ray is not installed" in capsys.readouterr().err) == (not installed and expect == "local" and not env
                                                                  and "--executor" not in argv)


def test_when_the_default_ray_cannot_start_the_local_loop_does_the_work(tmp_path, monkeypatch, capsys):
    from backproplab.cli import main

    def no_ray(self):
        raise RuntimeError("no shared memory here\nmore of Ray's explanation")

    monkeypatch.setattr(RayExecutor, "start", no_ray)
    monkeypatch.setattr(experiments, "all_experiments", lambda: [experiments.get("baselines")])
    assert main(["reproduce", "--scale", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Ray did not start (RuntimeError: no shared memory here); the runs go one after another" in err
    assert (tmp_path / "baselines" / "summary.json").exists() and (tmp_path / "report.html").exists()
    # and a user who asked for Ray gets the error, not a quiet change of plan
    with pytest.raises(RuntimeError, match="no shared memory"):
        main(["reproduce", "--scale", "smoke", "--executor", "ray", "--out", str(tmp_path / "asked"), "--no-progress"])
