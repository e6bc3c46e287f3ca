"""Where a reproduction's runs execute: one after another in this process, or as Ray tasks.

``LocalExecutor`` is today's loop (and the one that runs under torchrun). ``RayExecutor`` makes every
(experiment, arm, seed) run a Ray task: locally with no set-up (``ray.init()`` starts a private instance on
this machine), or on a cluster by ``address``. Each task takes ``cpus_per_run`` CPUs and sets torch's thread
count to them (so parallel runs do not oversubscribe the cores) and ``gpus_per_run`` GPUs (fractions share
one). A task whose worker dies is retried up to ``max_retries`` times; the retry resumes from the run's last
checkpoint, which lives where the retry can find it: the driver's results folder on one machine, or a shared
``storage`` folder on a cluster. Every task returns its run folder's files, so results reach the driver's
folder whether or not the machines share a file system. A run that fails for its own reasons is recorded
(``error.json`` in its folder) and the others go on; Ctrl-C cancels what is left and keeps what finished.

Results equal a sequential run's (timing fields aside) for the same threads per run: torch's CPU kernels
sum in an order that depends on the thread count, so ``--cpus-per-run`` sets it under both executors.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import _io
from ._log import logger
from .dist import rank

ATTEMPTS = ".attempts"  # under the experiment folder: one line per attempt at a run, while it is running


class RunFailed(RuntimeError):
    """Some runs failed for their own reasons; each one's error is in ``error.json`` in its folder.

    Example:
        A run that fails for its own reason is recorded in its folder, the others finish, then the executor raises:

        >>> import json, os, tempfile, ray
        >>> from backproplab.experiments import get, make_config, plan, run_job
        >>> exp = get("baselines")
        >>> jobs = plan(exp, make_config(exp, ["seeds=2", "optimizers=sgd"], scale="smoke"), out=tempfile.mkdtemp())
        >>> def run_job_failing_seed1(job):
        ...     if job.seed == 1:
        ...         raise RuntimeError("the data went missing")
        ...     return run_job(job)
        >>> os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        'disabled'
        >>> try:
        ...     RayExecutor(max_retries=0, num_cpus=2).run(jobs, run_job_failing_seed1, progress=False)
        ... except RunFailed as e:
        ...     print(e)
        1 of 2 runs failed: baselines digits-mlp-sgd seed 1
        >>> error = json.load(open(jobs[1].run_dir / "error.json"))["error"]
        >>> error.endswith("RuntimeError: the data went missing"), (jobs[0].run_dir / "final.json").exists()
        (True, True)
        >>> ray.shutdown()
    """


class ExecutorSetupError(ValueError):
    """The executor cannot run these jobs as asked (an unreachable cluster, resources it does not have, a
    storage path that is not a folder); raised before any run is submitted, naming the option.

    Example:
        >>> _ = open("not_a_folder", "w").write("x")
        >>> RayExecutor(storage="not_a_folder").check()
        Traceback (most recent call last):
        ...
        backproplab.executors.ExecutorSetupError: --storage not_a_folder: is a file, not a folder ...
    """


class LocalExecutor:
    """Runs the jobs one after another in this process (under torchrun: every rank runs every job). ``bar``: a
    progress bar shared by several calls (``reproduce``'s one bar over every experiment's runs, with the time
    left); by default each call has its own.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> jobs = [NS(exp=NS(name="demo"), arm=NS(name="a"), seed=s) for s in range(3)]
        >>> done = []
        >>> LocalExecutor().run(jobs, lambda job: done.append(job.seed), progress=False, on_done=lambda job: None)
        >>> done                                              # in order, in this process
        [0, 1, 2]
    """

    device = None

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar

    def run(self, jobs: list, run_job: Callable[[Any], dict], progress: bool = True, desc: str = "",
            on_done: Callable[[Any], None] | None = None) -> None:
        """Run each job with ``run_job`` (the runner's, :func:`backproplab.experiments.run_job`), in order."""
        bar = self.bar if self.bar is not None else progress_bar(len(jobs), desc, progress and rank() == 0)
        try:
            for job in jobs:
                bar.set_postfix_str(f"running {job.exp.name} {job.arm.name} seed {job.seed}", refresh=False)
                run_job(job)
                bar.update(1)
                if on_done is not None:
                    on_done(job)
        finally:
            if self.bar is None:
                bar.close()


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """Runs done of ``total``, the rate and the time left, on standard error (a log file gets a line every 20 s).

    Example:
        >>> bar = progress_bar(3, "runs", enabled=True)          # a tqdm bar, on standard error
        >>> _ = bar.update(2)
        >>> bar.n, bar.total, bar.unit
        (2, 3, 'run')
        >>> bar.close()
    """
    return tqdm(total=total, desc=desc or "runs", unit="run", disable=not enabled, file=sys.stderr,
                mininterval=0.2 if sys.stderr.isatty() else 20)


def _collect(run_dir: Path) -> dict[str, bytes]:
    """The run folder's files (the checkpoint aside: the run is finished), by path relative to it."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "checkpoint.pt"}


def _remote_run(job, storage: str | None, run_job: Callable[[Any], dict]) -> dict:
    """The Ray task: the run (in ``storage`` if given, else at the driver's path), then its files."""
    marker = _marker(job, storage)
    if storage:
        job = replace(job, exp_dir=Path(storage) / job.exp.name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    resumes = (job.run_dir / "checkpoint.pt").exists() and job.resume
    with open(marker, "a") as f:  # the driver counts the attempts (a retry after a dead worker adds one)
        f.write(f"{os.getpid()} {'from-checkpoint' if resumes else 'from-start'}\n")
    final = run_job(job)
    return {"final": final, "files": _collect(job.run_dir), "run_dir": str(job.run_dir)}


@dataclass
class RayExecutor:
    """Every run a Ray task. ``address``: None starts Ray on this machine; ``"auto"`` or ``"HOST:PORT"`` joins
    a running cluster.

    Example:
        >>> RayExecutor().device, RayExecutor(gpus_per_run=0.5).device       # where a run's model goes
        (None, 'cuda')
        >>> RayExecutor(address="127.0.0.1:1").check()                       # nothing listens there: fails at once
        Traceback (most recent call last):
        ...
        backproplab.executors.ExecutorSetupError: --address 127.0.0.1:1: no Ray cluster answers there ...

    References:
        Moritz et al., "Ray: A distributed framework for emerging AI applications", OSDI 2018.
    """

    address: str | None = None
    cpus_per_run: float = 1
    gpus_per_run: float = 0
    max_retries: int = 3
    storage: str | None = None
    num_cpus: int | None = None  # a local instance's CPUs (None: all of this machine's)

    def __post_init__(self) -> None:
        self.attempts: dict[str, list[str]] = {}  # per finished run: "pid from-start|from-checkpoint" per attempt

    @property
    def device(self) -> str | None:
        return "cuda" if self.gpus_per_run > 0 else None

    def start(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise ImportError("--executor ray needs Ray: pip install 'backproplab[ray]'") from e
        if ray.is_initialized():
            return
        self.check()
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if self.address is None:
            kwargs.update(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False)
        context = ray.init(address=self.address, **kwargs)
        resources = ray.cluster_resources()
        where = getattr(context, "dashboard_url", None)
        logger.info(f"ray: {'started on this machine' if self.address is None else 'joined ' + self.address}, "
                    f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
                    f"dashboard: {'http://' + where if where else 'none (pip install ray[default] for one)'}")

    def check(self) -> None:
        """Fail fast, before Ray starts or any run is submitted: a storage path that is not a folder, GPUs asked
        of a machine without CUDA, a cluster address nothing answers at (Ray would retry for minutes)."""
        import socket

        if self.storage is not None and Path(self.storage).exists() and not Path(self.storage).is_dir():
            raise ExecutorSetupError(f"--storage {self.storage}: is a file, not a folder every machine shares")
        if self.address is None and self.gpus_per_run > 0:
            import torch

            if not torch.cuda.is_available():
                raise ExecutorSetupError(f"--gpus-per-run {self.gpus_per_run:g}: this machine has no CUDA GPU, so "
                                         "no run could ever be scheduled; use --gpus-per-run 0 or join a cluster "
                                         "with GPUs (--address)")
        if self.address not in (None, "auto"):
            host, _, port = self.address.rpartition(":")
            try:
                socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
            except (OSError, ValueError) as e:
                raise ExecutorSetupError(f"--address {self.address}: no Ray cluster answers there ({e}); start one "
                                         "with `ray start --head` or give its HOST:PORT") from None

    def _check_resources(self, ray) -> None:
        have = ray.cluster_resources()
        for name, want in (("CPU", self.cpus_per_run), ("GPU", self.gpus_per_run)):
            if want > have.get(name, 0):
                raise ExecutorSetupError(f"--{name.lower()}s-per-run {want:g}: the cluster has {have.get(name, 0):g} "
                                         f"{name}s in all, so no run could ever be scheduled")

    def run(self, jobs: list, run_job: Callable[[Any], dict], progress: bool = True, desc: str = "",
            on_done: Callable[[Any], None] | None = None) -> None:
        """Run ``jobs`` as Ray tasks (each calls ``run_job`` on its job), each run's files written at the driver's
        path as it finishes; ``on_done(job)`` is called after each (finished or failed), in the driver, while the
        others go on."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        if not jobs:
            return
        self.start()
        self._check_resources(ray)
        threads = max(1, int(self.cpus_per_run))
        task = ray.remote(_remote_run).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                               max_retries=self.max_retries, retry_exceptions=False)
        pending = {task.remote(replace(job, threads=job.threads or threads), self.storage, run_job): job
                   for job in jobs}
        bar = progress_bar(len(jobs), desc, progress)
        failed, retried = [], 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = pending.pop(ref)
                    self.attempts[job.label] = _attempt_lines(job, self.storage)
                    attempts = len(self.attempts[job.label])
                    retried += attempts > 1
                    try:
                        out = ray.get(ref)
                    except (RayTaskError, RayError) as e:  # the run's own error, or retries exhausted
                        failed.append(job)
                        _io.write_json(job.run_dir / "error.json", {"status": "failed", "attempts": attempts,
                                                                     "error": f"{type(e).__name__}: {e}"[-4000:]})
                        logger.warning(f"{job.label} failed ({type(e).__name__}); recorded in "
                                       f"{job.run_dir / 'error.json'}, going on")
                    else:
                        _deliver(out, job.run_dir)
                    _forget_attempts(job, self.storage)
                    bar.update(1)
                    if on_done is not None:
                        on_done(job)
                running = sum(1 for job in pending.values() if _attempt_lines(job, self.storage))
                bar.set_postfix_str(f"running {running}, retried {retried}, failed {len(failed)}", refresh=False)
        except BaseException:  # Ctrl-C (or anything else): cancel the rest, keep every finished run
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
            for root in {_marker(job, self.storage).parents[1] for job in jobs}:
                if root.exists() and not any(p.is_file() for p in root.rglob("*")):
                    shutil.rmtree(root, ignore_errors=True)
        if failed:
            raise RunFailed(f"{len(failed)} of {len(jobs)} runs failed: " + ", ".join(j.label for j in failed))


def _marker(job, storage: str | None) -> Path:
    root = Path(storage) / job.exp.name if storage else job.exp_dir
    return root / ATTEMPTS / job.arm.name / f"seed{job.seed}"


def _attempt_lines(job, storage: str | None) -> list[str]:
    marker = _marker(job, storage)
    return marker.read_text().splitlines() if marker.exists() else []


def _forget_attempts(job, storage: str | None) -> None:
    _marker(job, storage).unlink(missing_ok=True)  # the folders go at the end: a task may be creating its own now


def _deliver(out: dict, run_dir: Path) -> None:
    """Write a finished task's files into the driver's run folder (nothing to do where the task wrote there)."""
    if Path(out["run_dir"]).resolve() == run_dir.resolve():
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    for rel, data in out["files"].items():
        _io.write_bytes(run_dir / rel, data)


