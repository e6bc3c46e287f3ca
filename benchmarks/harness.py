"""Timing harness: a method's training step against a baseline step, in the same process.

``compare(candidates, baseline=...)`` takes ``{name: factory}`` where ``factory(device) -> step`` builds
the model, data and optimizer and returns a zero-argument callable doing one training step. Times are
taken in interleaved rounds (baseline, method, baseline, method, ...) so drift and turbo affect both
alike; the table gives each median, its ratio to the baseline's median with a 95% confidence interval
(``ratio_ci``: a paired bootstrap over the rounds, each round's candidate and baseline times kept together),
and peak memory. The interval covers the noise within one run; the noise between runs (another process,
another minute on a shared machine) can be larger, so a goal within a few percent of a ratio should be
checked on more than one run.

Peak memory is what the steps add on top of the set-up (model and data), including optimizer state
created by the first step, excluding one-time library initialisation: on CUDA ``max_memory_allocated`` after a
reset; on CPU (``memory_method="tensors"``, the default) the same quantity, the most bytes of tensors alive at
once, replayed from the profiler's memory timeline (every tensor's creation and destruction, in order) of a
fresh instance's steps: exact and the same from run to run. ``memory_method="rss"`` measures instead the
growth of the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) in a fresh
process per candidate, with glibc told to map and unmap every block of 64 KiB or more so that the resident
set follows the live tensors; it also counts memory that is not a tensor, but below a few MB it varies by
tens of percent from run to run (heap reuse of small blocks).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable

import torch

Factory = Callable[[str], Callable[[], None]]


@dataclass
class Result:
    name: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    ratio: float  # median / baseline median
    peak_mb: float | None
    peak_ratio: float | None
    peak_method: str | None = None  # "tensors", "rss" or "cuda" (see peak_memory)
    ratio_lo: float | None = None  # 95% confidence interval of ratio (ratio_ci)
    ratio_hi: float | None = None
    times_ms: list[float] | None = None  # every round's time, in round order (paired with every other's)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable[[], None]], device: str = "cpu", repeats: int = 30,
                     warmup: int = 3, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each step, ``repeats`` rounds, candidates interleaved within a round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            _sync(device)
            t = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t) / inner)
    return times


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_child(factory: Factory, steps: int, queue) -> None:
    # a throwaway instance first: one-time library set-up (BLAS buffers, thread pools) stays resident
    # and is no candidate's memory
    torch.manual_seed(0)
    warm = factory("cpu")
    warm()
    del warm
    gc.collect()
    torch.manual_seed(0)
    step = factory("cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    for _ in range(steps):
        step()
    queue.put((_rss_kb("VmHWM") - before) * 1024)


# glibc otherwise serves large blocks from a heap whose freed pages stay resident, and raises its mmap
# threshold as it goes, so the resident set would depend on what the set-up happened to free. A fixed
# threshold puts every block of 64 KiB or more in its own mapping, returned on free: VmHWM then follows
# the bytes of live tensors.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def tensor_peak(factory: Factory, device: str = "cpu", steps: int = 3) -> int:
    """The most bytes of tensors alive at once during the first ``steps`` steps of a fresh instance, over those
    alive before (the profiler's memory timeline: needs shapes and stacks recorded)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    torch.manual_seed(0)
    step = factory(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        for _ in range(steps):
            step()
    live = top = 0
    for _, action, _, size in p._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        top = max(top, live)
    return top


def _tensor_peak_child(factory: Factory, steps: int, queue) -> None:
    queue.put(tensor_peak(factory, "cpu", steps))


def _in_child(target, factory: Factory, steps: int, env: dict[str, str]) -> int | None:
    """``target(factory, steps, queue)`` in a fresh process: its value, or None if the process failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(factory, steps, queue))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the child (glibc: when it starts)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    proc.join(timeout=3600)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return queue.get(timeout=10) if proc.exitcode == 0 else None


def peak_memory(factory: Factory, device: str = "cpu", steps: int = 3,
                method: str = "tensors") -> tuple[int | None, str]:
    """``(bytes the first steps training steps add at their peak over the set-up, how it was measured)``.

    On CPU each candidate is measured in a fresh process. The profiler's memory analysis is private API and
    has crashed the interpreter on large models (``none_dealloc``, torch 2.13): a candidate whose tensor
    measurement fails is measured by the resident set instead, and the table says so."""
    if method not in ("tensors", "rss"):
        raise ValueError(f"memory method must be 'tensors' or 'rss', got {method!r}")
    if device.startswith("cuda"):
        torch.manual_seed(0)
        step = factory(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda"
    if method == "tensors":
        value = _in_child(_tensor_peak_child, factory, steps, {})
        if value is not None:
            return value, "tensors"
        print("harness: the tensor memory measurement failed; using the resident set", file=sys.stderr)
    if not Path("/proc/self/clear_refs").exists():
        return None, "rss"
    return _in_child(_cpu_peak_child, factory, steps, _MALLOC_ENV), "rss"


def ratio_ci(times: list[float], base: list[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Confidence interval of median(times) / median(base), paired by round: scipy's percentile bootstrap
    over rounds, each resample keeping a round's two times together (so slow rounds that slowed both do
    not widen it)."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(times) != len(base) or len(times) < 3:
        raise ValueError(f"ratio_ci needs the same number (at least 3) of paired rounds, got {len(times)} and "
                         f"{len(base)}")
    res = bootstrap((times, base), lambda t, b, axis=-1: np.median(t, axis) / np.median(b, axis),
                    paired=True, vectorized=True, n_resamples=2000, confidence_level=level, method="percentile",
                    random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(candidates: dict[str, Factory], baseline: str, device: str = "cpu", repeats: int = 30,
            warmup: int = 3, inner: int = 1, memory: bool = True, memory_method: str = "tensors") -> list[Result]:
    torch.manual_seed(0)
    steps = {name: f(device) for name, f in candidates.items()}
    times = time_interleaved(steps, device, repeats, warmup, inner)
    peaks = {name: peak_memory(f, device, method=memory_method) if memory else (None, None)
             for name, f in candidates.items()}
    base_t = statistics.median(times[baseline])
    base_m, base_how = peaks[baseline]
    results = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        m, how = peaks[name]
        lo, hi = ratio_ci(ts, times[baseline]) if len(ts) >= 3 else (None, None)
        results.append(Result(name, 1e3 * statistics.median(ts), 1e3 * q[0], 1e3 * q[2],
                              statistics.median(ts) / base_t,
                              None if m is None else m / 2**20,
                              None if (m is None or not base_m or how != base_how) else m / base_m, how, lo, hi,
                              [1e3 * t for t in ts]))
    return results


def table(results: list[Result], title: str) -> str:
    lines = [title, f"{'name':32s} {'median ms':>10s} {'IQR ms':>15s} {'ratio':>7s} {'ratio 95% CI':>13s} "
                    f"{'peak MB':>9s} {'mem ratio':>9s} {'memory':>8s}"]
    for r in results:
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:9.2f}"
        pr = "-" if r.peak_ratio is None else f"{r.peak_ratio:9.2f}"
        ci = "-" if r.ratio_lo is None else f"{r.ratio_lo:.3f}-{r.ratio_hi:.3f}"
        lines.append(f"{r.name:32s} {r.median_ms:10.3f} {r.q1_ms:7.3f}-{r.q3_ms:<7.3f} {r.ratio:7.3f} {ci:>13s} "
                     f"{peak:>9s} {pr:>9s} {r.peak_method or '-':>8s}")
    return "\n".join(lines)


def cli(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory", choices=("tensors", "rss"), default="tensors",
                   help="CPU peak memory: bytes of live tensors (exact) or the resident set (see harness.py)")
    return p.parse_args()


def report(results_by_case: dict[str, list[Result]], args: argparse.Namespace, title: str) -> None:
    memory = "" if args.device.startswith("cuda") else f", CPU memory: {getattr(args, 'memory', 'tensors')}"
    print(f"# {title} (device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads{memory})")
    for case, results in results_by_case.items():
        print(table(results, f"\n## {case}"))
    if args.out:
        Path(args.out).write_text(json.dumps({c: [asdict(r) for r in rs] for c, rs in results_by_case.items()},
                                             indent=2))
    sys.stdout.flush()
