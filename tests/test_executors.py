"""The Ray executor on a local instance with 2 workers: a smoke reproduction equals a sequential one file for
file (timing fields aside); a worker killed mid-run is retried and its run resumes from its checkpoint; a run
that fails for its own reasons is recorded and the others finish."""

from __future__ import annotations

import json
import os
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
        RayExecutor(cpus_per_run=1, max_retries=0).run(jobs, progress=False)
    error = json.loads((jobs[1].run_dir / "error.json").read_text())
    assert error["status"] == "failed" and "no-such" in error["error"]
    for i in (0, 2, 3):
        assert json.loads((jobs[i].run_dir / "final.json").read_text())["status"] == "ok"
