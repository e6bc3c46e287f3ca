"""The runner: plan an experiment's runs, run each into its own folder, judge the claims, analyze.

:func:`run` = :func:`preflight` (the output folder and the data, before anything trains), :func:`plan` (the
runs still to do), an executor that calls :func:`run_job` for each (:mod:`backproplab.executors`: the runner
hands it ``run_job``), then :func:`finish`. ``run_arm`` receives a :class:`Run`, ``analyze`` a :class:`Results`.

Layout::

    <out>/<experiment>/<arm>/seed<k>/{config.json, metrics.jsonl, final.json, model.pt}
    <out>/<experiment>/{summary.json, *.png}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch.distributed as dist

from .. import _io
from .._log import logger
from ..dist import rank
from ..evidence import Verdict, judge_all
from ..streams import derive
from .config import config_values, identity, run_setting
from .registry import ConfigError, Experiment

_NO_VALIDATION = ("experiment {name!r} (this arm) does not load its data through Run.data, so it cannot hold out a "
                  "validation split: --set validation (and sweep) do not apply to it")


@dataclass
class Run:
    """What ``run_arm`` gets: the config, the arm, the seed and where to write, all set up by the runner.

    Example:
        >>> from pathlib import Path
        >>> from backproplab.experiments import get, make_config
        >>> cfg = make_config(get("baselines"), ["checkpoint_every=50", "epochs=3"], scale="smoke")
        >>> run = Run(cfg, get("baselines").arms(cfg)[0], seed=2, dir=Path("out/a/seed2"), exp_dir=Path("out"),
        ...           resume=True, device="cpu")
        >>> tc = run.train_config(cfg.train, lr=0.1)      # the phase, the run's seed, device and checkpoints, an lr
        >>> tc.epochs, tc.seed, tc.device, tc.checkpoint_every, tc.lr
        (3, 2, 'cpu', 50, 0.1)
    """

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

    def train_config(self, phase=None, **arm_fields):
        """The training phase ``phase`` (a :class:`~backproplab.train.TrainConfig` embedded in the config by
        :func:`~backproplab.experiments.registry.training_phase`; default: ``TrainConfig()``) for this run: its
        seed, device and checkpointing, and the fields the arm chooses itself (``arm_fields``), which the phase
        does not make ``--set`` keys."""
        from ..train import TrainConfig

        arm_fields.setdefault("checkpoint_every", self.cfg.checkpoint_every)
        return dataclasses.replace(phase if phase is not None else TrainConfig(), seed=self.seed, device=self.device,
                                   **arm_fields)

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
    """Finished runs of the current config only: arms of ``cfg`` and seeds ``0..seeds-1``.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from types import SimpleNamespace as Arm
        >>> exp_dir = Path(tempfile.mkdtemp())
        >>> for seed, (score, status) in enumerate([(0.6, "ok"), (0.7, "ok"), (None, "diverged")]):
        ...     (exp_dir / "new" / f"seed{seed}").mkdir(parents=True)
        ...     final = {"score": score, "status": status}
        ...     _ = (exp_dir / "new" / f"seed{seed}" / "final.json").write_text(json.dumps(final))
        >>> results = Results(exp_dir, cfg=None, arms=[Arm(name="new")], seeds_of=lambda arm: 4)
        >>> results.values("new", "score"), results.seeds("new"), results.diverged("new")
        ({0: 0.6, 1: 0.7}, [0, 1], [2])
    """

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
    """One (experiment, arm, seed) run, as the runner hands it to an executor.

    Example:
        >>> from backproplab.experiments import get, make_config
        >>> exp = get("baselines")
        >>> job = plan(exp, make_config(exp, ["seeds=1"], scale="smoke"), out="results", device="cpu")[0]
        >>> job.run_dir.as_posix(), job.label
        ('results/baselines/digits-mlp-sgd/seed0', 'baselines digits-mlp-sgd seed 0')
    """

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
        >>> from backproplab.experiments import get, make_config
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
    then ``final.json`` (written last: its presence marks the run done). Returns the final record.

    Example:
        >>> import json, tempfile
        >>> from backproplab.experiments import get, make_config
        >>> exp = get("baselines")
        >>> job = plan(exp, make_config(exp, ["seeds=1"], scale="smoke"), out=tempfile.mkdtemp(), device="cpu")[0]
        >>> final = run_job(job)
        >>> final["status"], final == json.load(open(job.run_dir / "final.json"))       # written last: the run is done
        ('ok', True)
        >>> json.load(open(job.run_dir / "config.json"))["seed"], run_job(job) == final   # a finished run is read back
        (0, True)
    """
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
    """Judge the claims on the finished runs, analyze, and write ``summary.json``; returns the folder.

    Example:
        >>> import json, tempfile
        >>> from backproplab.experiments import get, make_config
        >>> exp, out = get("baselines"), tempfile.mkdtemp()
        >>> cfg = make_config(exp, ["seeds=1", "optimizers=sgd"], scale="smoke")
        >>> for job in plan(exp, cfg, out=out, device="cpu"):
        ...     _ = run_job(job)
        >>> summary = json.load(open(finish(exp, cfg, out, scale="smoke") / "summary.json"))
        >>> summary["arms"], summary["scale"], summary["seeds"]
        (['digits-mlp-sgd'], 'smoke', 1)
    """
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
            "figures": sorted(p.name for p in exp_dir.glob("*.png") if p.is_file()), "config": config_values(cfg),
            "provenance": provenance(), "stale_runs": stale, "paper_setting": exp.paper_setting,
            "run_setting": run_setting(cfg, scale), "deviations": list(exp.deviations)})
    _barrier()
    return exp_dir


def run(exp: Experiment, cfg: Any, out: str | Path = "results", resume: bool = True, progress: bool = True,
        overwrite: bool = False, scale: str = "full", executor: Any = None, threads: int | None = None,
        rerun_stale: bool = False) -> Path:
    """Run every arm and seed of ``exp`` under ``out/<name>/`` on ``executor`` (default: one after another in
    this process, :class:`backproplab.executors.LocalExecutor`), judge the claims, analyze; returns the folder.

    Example:
        >>> import tempfile
        >>> from backproplab.experiments import get, make_config
        >>> exp, out = get("baselines"), tempfile.mkdtemp()
        >>> cfg = make_config(exp, ["seeds=1", "optimizers=sgd"], scale="smoke")
        >>> folder = run(exp, cfg, out=out, progress=False)
        >>> sorted(p.name for p in folder.iterdir() if p.suffix == ".json"), plan(exp, cfg, out=out)   # nothing left
        (['summary.json'], [])
    """
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
    anything trains (a paper-scale CurveBall run would otherwise find out after its toy problems).

    Example:
        >>> import tempfile
        >>> from types import SimpleNamespace as Config
        >>> check_data_present(Config(datasets=("digits",), data_root=""))        # made locally: nothing to check
        >>> check_data_present(Config(datasets=("mnist",), data_root=tempfile.mkdtemp()))
        Traceback (most recent call last):
        ...
        backproplab.data.DataNotFoundError: mnist: .../train-images-idx3-ubyte ...`backproplab data get mnist ...
    """
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
        >>> from backproplab.experiments import get, make_config
        >>> _ = open("a_file", "w").write("x")
        >>> exp = get("baselines")
        >>> preflight(exp, make_config(exp, scale="smoke"), "a_file")
        Traceback (most recent call last):
        ...
        backproplab.experiments.registry.ConfigError: --out a_file: is a file, not a folder; name a folder ...
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
    """The verdict on each claim of ``exp`` whose arms have finished runs, seeds paired.

    Example:
        Paired seeds: the verdict's estimate is the mean of the per-seed differences, and its interval is scipy's
        t-interval of them:

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from scipy import stats
        >>> from types import SimpleNamespace as Arm
        >>> from backproplab.evidence import Claim
        >>> from backproplab.experiments import Experiment, ExperimentConfig
        >>> exp_dir = Path(tempfile.mkdtemp())
        >>> scores = {"new": [0.61, 0.72, 0.66, 0.70], "old": [0.55, 0.70, 0.60, 0.62]}
        >>> for arm, values in scores.items():
        ...     for seed, score in enumerate(values):
        ...         (exp_dir / arm / f"seed{seed}").mkdir(parents=True)
        ...         _ = (exp_dir / arm / f"seed{seed}" / "final.json").write_text(json.dumps({"score": score}))
        >>> claim = Claim("toy.new_wins", "a paper", "Table 1", "new > old", "score", "new", "greater", 0.0, "-",
        ...               baseline="old")
        >>> exp = Experiment("toy", "", ExperimentConfig, arms=lambda cfg: [], run_arm=lambda run: {},
        ...                  analyze=lambda res: [], claims=lambda cfg: [claim])
        >>> results = Results(exp_dir, None, [Arm(name="new"), Arm(name="old")], lambda arm: 4)
        >>> (verdict,) = judge_claims(exp, ExperimentConfig(), results, scale="quick")
        >>> diffs = [a - b for a, b in zip(scores["new"], scores["old"])]
        >>> low, high = stats.t.interval(0.95, 3, loc=sum(diffs) / 4, scale=stats.sem(diffs))
        >>> verdict.outcome, bool(abs(verdict.ci_low - low) < 1e-9), bool(abs(verdict.ci_high - high) < 1e-9)
        ('reproduced', True, True)
    """
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


def final_values(results: Results, arm: str, key: str) -> list[float]:
    """One final metric of an arm, seed order.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from types import SimpleNamespace as Arm
        >>> exp_dir = Path(tempfile.mkdtemp())
        >>> for seed, score in enumerate([0.6, 0.7]):
        ...     (exp_dir / "new" / f"seed{seed}").mkdir(parents=True)
        ...     _ = (exp_dir / "new" / f"seed{seed}" / "final.json").write_text(json.dumps({"score": score}))
        >>> final_values(Results(exp_dir, None, [Arm(name="new")], lambda arm: 2), "new", "score")
        [0.6, 0.7]
    """
    return [f[key] for f in results.final_list(arm) if key in f]
