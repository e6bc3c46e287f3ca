"""Command line: ``backproplab list | claims | run | report | reproduce | certify | bn-bias``.

Runs under ``torchrun --nproc_per_node=N -m backproplab run ...`` data-parallel; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from . import __version__, download, experiments
from .report import build_report
from .data import DataFormatError, DataNotFoundError
from .executors import ExecutorSetupError
from ._io import NotARegularFile
from .train import init_distributed, leave_distributed, shutdown_distributed


MANY_RUNS = 1_000  # above this many runs the command says how many before it starts


def _count_runs(exp, cfg) -> int:
    seeds_of = exp.seeds_of(cfg)
    return sum(seeds_of(arm) for arm in exp.arms(cfg))


def _announce(runs: int) -> None:
    """Say how many runs a command holds before starting an unusually large number of them."""
    if runs > MANY_RUNS:
        print(f"backproplab: {runs} runs planned (arms x seeds); this is more than {MANY_RUNS}: Ctrl-C now if "
              "that is not what you meant (--seeds sets the seeds per arm)", file=sys.stderr)


def _parser(run_name: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backproplab", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"backproplab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="experiments with one-line descriptions")
    ls.add_argument("--verbose", "-v", action="store_true", help="also each experiment's claims")
    cl = sub.add_parser("claims", help="every paper claim the lab judges: id, paper, where, statement")
    cl.add_argument("--experiment", help="only this experiment's claims")

    def number(kind: type, low: float, name: str, high: float | None = None):
        """An argparse type: ``kind`` in [low, high], else one line naming the option and its range."""
        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
            if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
                bound = f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
                raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text}")
            return value
        return parse

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--scale", choices=experiments.SCALES, help="smoke (seconds, for tests), quick (all "
                        "experiments in about 6-7 minutes on 2 CPU cores, on Ray), full (settles the claims; the "
                        "default) or paper (the paper's dataset, model and budget where the config can express them, "
                        "for a GPU; `run NAME --help` lists them)")
        sp.add_argument("--quick", action="store_true", help="the same as --scale quick")
        sp.add_argument("--seeds", type=int, help="number of seeds (0..N-1; checked with the config: 1 to "
                        f"{experiments.MAX_SEEDS})")
        sp.add_argument("--out", default="results", help="results folder (default: results)")
        sp.add_argument("--device", help="cpu, cuda, cuda:N or auto")
        sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip finished runs and continue interrupted ones from their checkpoints (default); "
                             "--no-resume deletes this config's runs and starts over")
        sp.add_argument("--rerun-stale", action="store_true",
                        help="start over finished runs made by other code than this (their recorded provenance "
                             "'code' differs); without it they are kept and counted in a warning")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace results of another config found in the way (otherwise: an error naming them)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--log", help="also log each evaluation as csv and/or tensorboard (comma-separated), "
                        "beside metrics.jsonl: metrics.csv, tensorboard/ in each run folder")
        sp.add_argument("--executor", choices=("local", "ray"),
                        help="local: the runs one after another in this process; ray: every run a Ray task, on "
                             "this machine or on a cluster (--address). Default: ray for `reproduce` on CPU when "
                             "Ray is installed, else local")
        sp.add_argument("--address", help="ray: join this cluster ('auto' or HOST:PORT; default: start Ray here)")
        sp.add_argument("--cpus-per-run", type=number(float, 1, "--cpus-per-run"),
                        help="CPUs (and torch threads) per run; ray's default 1. "
                        "Results are identical across executors for the same value")
        sp.add_argument("--gpus-per-run", type=number(float, 0, "--gpus-per-run"), default=0.0,
                        help="ray: GPUs per run (fractions share one)")
        sp.add_argument("--max-retries", type=number(int, 0, "--max-retries"), default=3,
                        help="ray: retries of a run whose worker died")
        sp.add_argument("--storage", help="ray on a cluster: a folder every machine shares, for checkpoints "
                        "(default: the results folder, which is enough on one machine)")

    epilog = None
    if run_name is not None:  # `backproplab run NAME --help` (and sweep) lists NAME's config keys
        try:
            exp = experiments.get(run_name)
        except experiments.ConfigError as e:
            epilog = str(e)
        else:
            epilog = (f"config keys of {exp.name!r} for --set KEY=VALUE (name, type, full-scale default: "
                      f"meaning):\n{experiments.describe_fields(exp.config)}\n\n"
                      f"{experiments.describe_paper_scale(exp)}")
    r = sub.add_parser("run", help="run one experiment", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("name")
    r.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields (repeatable)")
    common(r)
    sw = sub.add_parser("sweep", help="a grid of config values, every point a run of the experiment on a "
                        "validation split held out of the training set; the table and each arm's best point",
                        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("name")
    sw.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                    help="a config key and its values (repeat for a product grid)")
    sw.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override other config fields (repeatable)")
    sw.add_argument("--validation", type=float, default=0.2,
                    help="fraction of each training set held out and reported on instead of the test set (0.2)")
    sw.add_argument("--metric", default="test_acc", help="final metric compared, measured on the validation split")
    sw.add_argument("--mode", choices=("max", "min"), default="max", help="whether larger or smaller is better")
    common(sw)
    rec = sub.add_parser("record", help="record the full-scale verdicts under DIR (each experiment's summary.json) "
                         "as the ones later reports show beside theirs")
    rec.add_argument("dir")
    rec.add_argument("--dest", help="folder of the records (default: the package's recorded/, committed with "
                     "the code)")
    rec.add_argument("--docs", help="also write DOCS/<experiment>.md, the write-up generated from each record "
                     "(the repository's docs/results)")
    rec.add_argument("--checks", help="JSON {claim id: {tuning, metric, scale, premise: text}}: the checks that "
                     "rule out our own artifact behind each contradicted verdict, kept in the record")
    rec.add_argument("--experiment", action="append", help="record only this experiment (repeatable; default: "
                     "every one under DIR)")
    rep = sub.add_parser("report", help="one HTML page from a results folder")
    rep.add_argument("dir")
    rep.add_argument("--output", help="output file (default DIR/report.html)")
    rp = sub.add_parser("reproduce", help="every registered reproduction, then the report")
    common(rp)
    ce = sub.add_parser("certify", help="randomized-smoothing certified accuracy vs radius of a finished run")
    ce.add_argument("run_dir", help="results/<experiment>/<arm>/seed<k>")
    ce.add_argument("--sigma", type=float, help="noise level (default: the run's training noise)")
    ce.add_argument("--n", type=int, default=1000, help="estimation samples per input")
    ce.add_argument("--n0", type=int, default=100, help="selection samples per input")
    ce.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    ce.add_argument("--examples", type=int, default=200, help="test inputs certified")
    da = sub.add_parser("data", help="datasets: `data get NAME` fetches a real dataset's official files")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    get = da_sub.add_parser("get", help="download and check (published SHA-256; MD5 for SVHN) a dataset's "
                            "official files into the folder its loader reads; resumes a cut download")
    get.add_argument("dataset", choices=sorted(download.SOURCES))
    get.add_argument("--root", help="data folder (default: $BACKPROPLAB_DATA or ./data; runs read it with "
                     "--set data_root=DIR)")
    get.add_argument("--mirror", action="append", metavar="URL",
                     help="a base URL serving the official file names, used instead of the built-in mirrors "
                          "(repeatable; tried in order)")
    get.add_argument("--no-progress", action="store_true", help="no progress bars")
    bn = sub.add_parser("bn-bias", help="fraction of negative BatchNorm biases per layer of a checkpoint")
    bn.add_argument("checkpoint", help="a saved state_dict (model.pt) or training checkpoint (checkpoint.pt)")
    return p


def _check_certify_args(args) -> str | None:
    """The first invalid certify argument, as a message naming it and what is valid; None if all are valid."""
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma > 0):
        return f"--sigma {args.sigma}: the smoothing noise must be a number > 0 (omit it for the run's own sigma)"
    if not (math.isfinite(args.alpha) and 0 < args.alpha < 1):
        return f"--alpha {args.alpha}: the failure probability must be in (0, 1), e.g. 0.001"
    for name in ("n", "n0", "examples"):
        if getattr(args, name) < 1:
            return f"--{name} {getattr(args, name)}: must be at least 1"
    return None


def _certify(args) -> int:
    import json
    from pathlib import Path

    from . import _io, plots
    from .experiments.privacy import certify_run

    problem = _check_certify_args(args)
    if problem:
        print(f"backproplab: {problem}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / "model.pt").exists():
        print(f"backproplab: {run_dir} is not a finished run (needs config.json and model.pt)", file=sys.stderr)
        return 2
    record = json.loads((run_dir / "config.json").read_text())
    exp = experiments.get(record["experiment"])
    if exp.load_trained is None:
        print(f"backproplab: experiment {exp.name!r} does not support certify (no load_trained)", file=sys.stderr)
        return 2
    cfg = experiments.build_config(exp.config, {k: tuple(v) if isinstance(v, list) else v
                                                for k, v in record["config"].items()})
    model, data, sigma = exp.load_trained(cfg, exp.arm_named(cfg, record["arm"]), run_dir)
    sigma = args.sigma if args.sigma is not None else sigma
    examples = min(args.examples, len(data.x_test))
    radii, acc = certify_run(model, data, sigma, args.n0, args.n, args.alpha, examples)
    # the file names carry every setting, so a table made with other settings is never replaced
    stem = f"certify_sigma{sigma:g}_n{args.n}_n0{args.n0}_alpha{args.alpha:g}_examples{examples}"
    md, png = run_dir / f"{stem}.md", run_dir / f"{stem}.png"
    table = (f"sigma {sigma:g}, n {args.n}, n0 {args.n0}, alpha {args.alpha:g}, {examples} test examples\n\n"
             "radius | certified accuracy\n---|---\n" + "".join(f"{r:.3g} | {a:.4f}\n" for r, a in zip(radii, acc)))
    _io.write_text(md, table)
    fig, axes = plots.subplots(1, 1)
    axes[0][0].plot(radii, acc, "o-")
    axes[0][0].set(xlabel="l2 radius", ylabel="certified accuracy",
                   title=f"sigma={sigma:g}, n={args.n}, alpha={args.alpha}")
    plots.save(fig, png)
    print(table + f"written: {md}, {png}")
    return 0


def _bn_bias(path: str) -> int:
    import torch

    from .methods.teacher_student import bn_bias_fractions

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        print(f"backproplab: {path}: no such file", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a text, truncated or hostile file: weights_only never runs its code
        print(f"backproplab: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160] if str(e) else ''}); give a model.pt or checkpoint.pt", file=sys.stderr)
        return 2
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        print(f"backproplab: {path} holds a {type(state).__name__}, not a state dict; give a model.pt or "
              "checkpoint.pt", file=sys.stderr)
        return 2
    fractions = bn_bias_fractions(state)
    if not fractions:
        print(f"backproplab: {path} holds no BatchNorm layer (no '*.running_mean' entries)", file=sys.stderr)
        return 2
    for name, frac in fractions.items():
        print(f"{name}: {frac:.3f}")
    return 0


def _listing(args) -> None:
    if args.command == "list":
        for exp in experiments.all_experiments():
            print(f"{exp.name:20s} {exp.description}")
            if args.verbose:
                for claim in exp.claims(exp.config()):
                    print(f"    {claim.id}: {claim.statement}\n        judged: {claim.describe()}")
        return
    todo = [experiments.get(args.experiment)] if args.experiment else None
    for exp, claim in experiments.all_claims():
        if todo is None or exp in todo:
            print(f"{claim.id}\n    {claim.paper}, {claim.where}\n    {claim.statement}\n"
                  + (f"    the paper's words: {claim.quote}\n" if claim.quote else "")
                  + (f"    this lab's extension: {claim.extension}\n" if claim.extension else "")
                  + f"    judged: {claim.describe()} on {claim.metric_label or claim.metric}")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. Ctrl-C and the file system's refusals (no space left, no
    permission, a read-only folder, a symlink loop) end it with one line, never a traceback: every file is
    written whole or not at all, finished runs are kept, and the same command resumes.

    Example:
        >>> main(["run", "baselines", "--scale", "smoke", "--executor", "local", "--out", "res", "--no-progress"])
        baselines: ... reproduced, ... contradicted (... s); results in res/baselines
        report: res/report.html (... s)
        0
        >>> import json
        >>> json.load(open("res/baselines/summary.json"))["scale"]
        'smoke'
        >>> main(["run", "baselines", "--set", "no_such_key=1", "--out", "res"])       # a clear error, no traceback
        2
    """
    try:
        code = _main(argv)
        if _in_torchrun():  # every file is written and closed: leave without the finalization where a rank can
            leave_distributed(code)  # abort in gloo's teardown (see train.leave_distributed)
        return code
    except KeyboardInterrupt:
        print("backproplab: interrupted; the finished runs are kept and the same command resumes the rest",
              file=sys.stderr)
        ray = sys.modules.get("ray")
        if argv is None and ray is not None and ray.is_initialized():
            # from the command line under Ray: every file is written and closed, and Ray's core worker can abort
            # in its teardown while cancelled tasks still answer (a failed internal check, exit 1, seen in CI);
            # leave with the interrupt's status without that teardown (Ray's processes share the driver's fate)
            import os

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except Exception as e:  # noqa: BLE001 - only the file system's refusals, however deep in the chain
        cause = _os_refusal(e)
        if cause is None:
            raise
        where = f": {cause.filename}" if getattr(cause, "filename", None) else ""
        print(f"backproplab: error: {cause.strerror or cause}{where}; nothing was left half-written", file=sys.stderr)
        return 1


def _in_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _os_refusal(error: BaseException) -> OSError | None:
    """The OSError of the file system refusing a write (ENOSPC, EACCES, EROFS, ELOOP, EDQUOT) in ``error``'s
    chain of causes, or None."""
    import errno

    refusals = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP, errno.EDQUOT}
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in refusals:
            return error
        error = error.__cause__ or error.__context__
    return None


LAB_PACKAGES = ("sklearn", "matplotlib", "mnist1d", "opacus", "threadpoolctl", "filelock")


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    import importlib.util

    missing = [m for m in LAB_PACKAGES if importlib.util.find_spec(m) is None]
    if missing and argv[:1] != ["--version"] and argv[:2] != ["data", "get"]:
        print(f"backproplab: error: the lab needs {', '.join(missing)}, which the core install leaves out: "
              "pip install 'backproplab[lab]'", file=sys.stderr)
        return 2
    run_name = argv[1] if len(argv) > 1 and argv[0] in ("run", "sweep") and not argv[1].startswith("-") else None
    args = _parser(run_name).parse_args(argv)
    try:
        if args.command in ("list", "claims"):
            try:
                _listing(args)
            except BrokenPipeError:  # `backproplab claims | head`: as the Python docs advise, silence stdout
                import os

                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if args.command == "report":
            print(build_report(args.dir, args.output))
            return 0
        if args.command == "record":
            from .report import RECORDED, record

            for path in record(args.dir, args.dest or RECORDED, docs=args.docs, experiments=args.experiment,
                               checks=args.checks):
                print(f"recorded {path}")
            return 0
        if args.command == "data":
            folder = download.get(args.dataset, args.root, mirrors=args.mirror,
                                  progress=False if args.no_progress else None)
            print(f"{args.dataset}: {folder}")
            return 0
        if args.command == "bn-bias":
            return _bn_bias(args.checkpoint)
        if args.command == "certify":
            return _certify(args)
        if args.command == "sweep":
            return _sweep(args)
        todo = [experiments.get(args.name)] if args.command == "run" else experiments.all_experiments()
        overrides = args.set if args.command == "run" else []
        if args.quick and args.scale not in (None, "quick"):
            raise experiments.ConfigError(f"--quick and --scale {args.scale} contradict each other")
        scale = args.scale or ("quick" if args.quick else "full")
        if args.command == "reproduce" and scale == "paper":  # the experiments that have a paper scale
            todo = [e for e in todo if e.paper]
        # validate every config before any training starts
        configs = [(e, experiments.make_config(e, overrides, scale=scale, seeds=args.seeds, device=args.device,
                                               log=args.log)) for e in todo]
        for exp, cfg in configs:  # results of another config in the way stop us before anything trains
            experiments.preflight(exp, cfg, args.out, args.resume, args.overwrite)
        _announce(sum(_count_runs(exp, cfg) for exp, cfg in configs))
    except (experiments.ConfigError, FileNotFoundError, DataFormatError, ExecutorSetupError) as e:
        print(f"backproplab: error: {e}", file=sys.stderr)
        return 2
    except download.DownloadError as e:  # no mirror delivered a good file: one line naming each failure
        print(f"backproplab: error: {e}", file=sys.stderr)
        return 1
    if args.executor is None:
        args.executor = _default_executor(args, configs)
        if args.executor == "ray":  # chosen for the user: if Ray cannot start here, the local loop does the work
            try:
                _executor(args).start()
            except Exception as e:  # noqa: BLE001 - any failure of Ray's start-up, reported in one line
                first = str(e).splitlines()[0] if str(e) else ""
                print(f"backproplab: Ray did not start ({type(e).__name__}: {first}); the runs go one after another "
                      "in this process (--executor local chooses that at once)", file=sys.stderr)
                args.executor = "local"
    if args.executor == "ray":
        try:
            return _run_on_ray(args, configs, scale)
        except ExecutorSetupError as e:
            print(f"backproplab: error: {e}", file=sys.stderr)
            return 2
    rank, _ = init_distributed(configs[0][1].device)
    t0 = time.perf_counter()
    failed = []
    threads = int(args.cpus_per_run) if args.cpus_per_run else None
    executor = None
    if len(configs) > 1:  # reproduce: one bar over every experiment's runs still to do, with the time left
        from .executors import LocalExecutor, progress_bar

        left = sum(len(experiments.plan(exp, cfg, args.out, args.resume, rerun_stale=args.rerun_stale, warn=False))
                   for exp, cfg in configs)
        executor = LocalExecutor(progress_bar(left, args.command, not args.no_progress and rank == 0))
    try:
        for exp, cfg in configs:
            try:
                exp_dir = experiments.run(exp, cfg, out=args.out, resume=args.resume, progress=not args.no_progress,
                                          overwrite=args.overwrite, scale=scale, threads=threads,
                                          rerun_stale=args.rerun_stale, executor=executor)
            except (experiments.ConfigError, DataFormatError, DataNotFoundError, NotARegularFile) as e:  # in a run
                print(f"backproplab: error: {e}", file=sys.stderr)  # one line naming the file or value and the fix
                return 2
            except Exception as e:  # noqa: BLE001 - one broken experiment must not sink the others
                if len(configs) == 1 or dist_initialized():
                    raise
                failed.append(exp.name)
                print(f"backproplab: {exp.name} failed ({type(e).__name__}: {e}); its finished runs are kept, "
                      "going on with the other experiments", file=sys.stderr)
                continue
            if rank == 0:
                line = _verdict_line(exp.name, exp_dir, time.perf_counter() - t0)
                if executor is not None:
                    executor.bar.write(line, file=sys.stdout)  # above the bar, not through it
                else:
                    print(line)
        if rank == 0:
            report = build_report(args.out)
            print(f"report: {report} ({time.perf_counter() - t0:.0f} s)")
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    finally:
        if executor is not None:
            executor.bar.close()
    shutdown_distributed()
    if failed:
        print(f"backproplab: failed experiments: {', '.join(failed)} (see the messages above)", file=sys.stderr)
        return 1
    return 0


def _default_executor(args, configs) -> str:
    """Where the runs go when --executor is not given: ``reproduce`` on CPU takes Ray when it is installed (one
    run per CPU at once, one thread each: about half the time of one after another on 2 cores, #38); ``run``,
    torchrun, a GPU and a one-CPU machine keep the local loop. ``--address`` means Ray."""
    import importlib.util
    import os

    from .train import resolve_device

    if args.address is not None:
        return "ray"
    if args.command != "reproduce" or int(os.environ.get("WORLD_SIZE", "1")) > 1 or (os.cpu_count() or 1) < 2:
        return "local"
    if any(resolve_device(cfg.device).type != "cpu" for _, cfg in configs):
        return "local"
    if importlib.util.find_spec("ray") is None:
        print("backproplab: Ray is not installed, so the runs go one after another in this process "
              "(pip install 'backproplab[ray]' runs one per CPU at once)", file=sys.stderr)
        return "local"
    return "ray"


def _verdict_line(name: str, exp_dir, seconds: float) -> str:
    """One line per finished experiment: its verdicts counted, the time since the command started, the folder."""
    import json
    from collections import Counter

    try:
        outcomes = Counter(v["outcome"] for v in json.loads((exp_dir / "summary.json").read_text())["verdicts"])
    except (OSError, ValueError, KeyError, TypeError):  # under torchrun rank 0 alone writes it
        return f"{name}: results in {exp_dir}"
    counts = ", ".join(f"{outcomes[o]} {o}" for o in ("reproduced", "inconclusive", "contradicted"))
    return f"{name}: {counts} ({seconds:.0f} s); results in {exp_dir}"


def _executor(args):
    from .executors import LocalExecutor, RayExecutor

    if args.executor == "ray":
        return RayExecutor(address=args.address, cpus_per_run=args.cpus_per_run or 1,
                           gpus_per_run=args.gpus_per_run, max_retries=args.max_retries, storage=args.storage)
    return LocalExecutor()


def _point_folder(root, label: str):
    """A grid point's folder: one path component under ``root`` whatever the values hold ('/' and other
    separators percent-encoded), checked to resolve inside ``root``: a value such as ``../../x`` never
    writes, or deletes, outside the output folder."""
    from urllib.parse import quote

    folder = root / quote(label, safe="=,.-_+:@")
    if folder.name in (".", "..") or not folder.resolve().is_relative_to(root.resolve()):
        raise experiments.ConfigError(f"--grid point {label!r} would write outside {root}; use plain values")
    return folder


def _sweep(args) -> int:
    """Every grid point's runs as one pool of jobs (under either executor), each point in its own folder
    ``OUT/sweeps/EXP/<key=value,...>/``, then ``sweep.json`` / ``sweep.md``: the validation metric per point
    and arm (mean and sd over seeds) and each arm's best point."""
    import itertools
    import json
    import statistics
    from pathlib import Path

    from . import _io
    from .executors import RunFailed

    exp = experiments.get(args.name)
    if args.quick and args.scale not in (None, "quick"):
        raise experiments.ConfigError(f"--quick and --scale {args.scale} contradict each other")
    scale = args.scale or ("quick" if args.quick else "full")
    if not 0 < args.validation < 1:  # 0 would report, and so select on, the test set
        raise experiments.ConfigError(f"--validation {args.validation:g}: a sweep selects on a split held out of the "
                                      "training set, a fraction in (0, 1); 0 would select on the test set")
    grid: dict[str, list[str]] = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise experiments.ConfigError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise experiments.ConfigError(f"--grid names {key!r} twice; give all its values once: {key}=V1,V2,...")
        if key == "validation":
            raise experiments.ConfigError("--grid validation=...: the validation split is the sweep's own "
                                          "(--validation), the same for every point")
        grid[key] = values.split(",")
    root = Path(args.out) / "sweeps" / exp.name
    points = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        label = ",".join(f"{k}={v}" for k, v in point.items())
        cfg = experiments.make_config(exp, [*args.set, *(f"{k}={v}" for k, v in point.items()),
                                            f"validation={args.validation}"],
                                      scale=scale, seeds=args.seeds, device=args.device, log=args.log)
        folder = _point_folder(root, label)
        experiments.preflight(exp, cfg, folder, args.resume, args.overwrite)
        points.append((label, folder, cfg))
    _announce(sum(_count_runs(exp, cfg) for _, _, cfg in points))
    known = {"test_acc", "test_loss", *exp.table_metrics,
             *(c.metric for _, _, cfg in points for c in exp.claims(cfg))}
    if args.metric not in known:
        raise experiments.ConfigError(f"--metric {args.metric!r} is not a metric of {exp.name}; choose from "
                                      f"{', '.join(sorted(known))}")
    executor = _executor(args)
    threads = int(args.cpus_per_run) if args.cpus_per_run else None
    jobs = [job for _, folder, cfg in points
            for job in experiments.plan(exp, cfg, folder, args.resume, threads=threads,
                                        device=getattr(executor, "device", None), rerun_stale=args.rerun_stale)]
    code = 0
    try:
        executor.run(jobs, experiments.run_job, progress=not args.no_progress, desc=f"sweep {exp.name}")
    except RunFailed as e:
        print(f"backproplab: {e}", file=sys.stderr)
        code = 1
    rows, best = [], {}
    for label, folder, cfg in points:
        exp_dir = experiments.finish(exp, cfg, folder, scale)
        for arm in exp.arms(cfg):
            finals = sorted((exp_dir / arm.name).glob("seed*/final.json"))
            values = [json.loads(f.read_text()).get(args.metric) for f in finals]
            values = [v for v in values if isinstance(v, (int, float))]
            if not values:
                continue
            row = {"point": label, "arm": arm.name, "mean": statistics.mean(values),
                   "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)}
            rows.append(row)
            old = best.get(arm.name)
            if old is None or (row["mean"] > old["mean"] if args.mode == "max" else row["mean"] < old["mean"]):
                best[arm.name] = row
    record = {"experiment": exp.name, "grid": grid, "validation": args.validation, "metric": args.metric,
              "mode": args.mode, "scale": scale, "points": rows,
              "choice": {arm: row["point"] for arm, row in best.items()}}
    _io.write_json(root / "sweep.json", record)
    lines = [f"# sweep of {exp.name}: {args.metric} on a validation split ({args.validation:g} of each training "
             f"set), {args.mode} is best; the test set is not used", "",
             "| point | arm | mean | sd | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r['point']} | {r['arm']} | {r['mean']:.4f} | {r['sd']:.4f} | {r['seeds']} |" for r in rows]
    lines += ["", "Chosen per arm: " + "; ".join(f"{arm}: {row['point']}" for arm, row in best.items())]
    _io.write_text(root / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"sweep: {root / 'sweep.md'}")
    return code


def _run_on_ray(args, configs, scale: str) -> int:
    """Every run of every experiment as one pool of Ray tasks; then each experiment's verdicts and analysis."""
    from tqdm.auto import tqdm

    from .executors import RunFailed

    t0 = time.perf_counter()
    executor = _executor(args)
    planned = [(exp, cfg, experiments.plan(exp, cfg, args.out, args.resume, device=executor.device,
                                           rerun_stale=args.rerun_stale)) for exp, cfg in configs]
    left = {exp.name: len(jobs) for exp, _, jobs in planned}
    code = 0

    def finish(exp, cfg) -> None:
        """An experiment's verdicts as soon as its last run is in, while the other experiments' runs go on."""
        nonlocal code
        try:
            line = _verdict_line(exp.name, experiments.finish(exp, cfg, args.out, scale), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - one broken analysis must not sink the others' runs
            line, code = f"backproplab: {exp.name}: its verdicts failed ({type(e).__name__}: {e}); its runs are kept", 1
        tqdm.write(line, file=sys.stdout)

    def on_done(job) -> None:
        left[job.exp.name] -= 1
        if not left[job.exp.name]:
            finish(job.exp, job.cfg)

    for exp, cfg, jobs in planned:
        if not jobs:  # every run already there
            finish(exp, cfg)
    try:
        executor.run([job for _, _, jobs in planned for job in jobs], experiments.run_job,
                     progress=not args.no_progress, desc=args.command, on_done=on_done)
    except RunFailed as e:
        print(f"backproplab: {e}; the verdicts use the runs that finished", file=sys.stderr)
        code = 1
    print(f"report: {build_report(args.out)} ({time.perf_counter() - t0:.0f} s)")
    return code


def dist_initialized() -> bool:
    """Whether this process is in a torch.distributed group (under torchrun, after ``init_distributed``).

    Example:
        >>> dist_initialized()
        False
    """
    import torch.distributed as dist

    return dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
