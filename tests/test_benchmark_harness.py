"""The benchmark harness's memory measure against allocations whose sizes are known in closed form."""

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import peak_memory, tensor_peak  # noqa: E402


def _make_step(kept_per_step: int, transient: tuple[int, ...], device: str):
    """A step that allocates the ``transient`` float32 tensors together, frees them, then keeps one more."""
    existing = torch.ones(10_000)  # alive before the steps: not counted
    kept: list[torch.Tensor] = []

    def step():
        temps = [torch.ones(n) for n in transient]
        del temps
        kept.append(torch.ones(kept_per_step))
        assert existing.numel()  # kept alive through the steps
    return step


def _factory(kept_per_step: int, transient: tuple[int, ...]):
    return functools.partial(_make_step, kept_per_step, transient)  # picklable: measured in a fresh process


@pytest.mark.medium
def test_tensor_peak_is_the_most_bytes_alive_at_once_over_the_set_up():
    # step s holds (s - 1) kept tensors beside the transient ones: the peak is in the last step
    got = tensor_peak(_factory(500, (1000, 3000)), steps=3)
    assert got == 4 * (2 * 500 + 1000 + 3000)
    # a step whose kept tensors outgrow its transient ones: the peak is the end of the last step
    assert tensor_peak(_factory(4000, (100,)), steps=3) == 4 * 3 * 4000
    # the same measure in a fresh process, as the benchmarks take it
    assert peak_memory(_factory(500, (1000, 3000)), "cpu", steps=2) == (4 * (500 + 4000), "tensors")


def _dies_under_the_profiler(device: str):
    def step():
        if torch.autograd.profiler._is_profiler_enabled:
            os._exit(3)  # as the profiler's own analysis has died on ResNet-18
        torch.ones(1000)
    return step


@pytest.mark.medium
def test_a_failed_tensor_measurement_falls_back_to_the_resident_set_and_says_so():
    value, how = peak_memory(_dies_under_the_profiler, "cpu", steps=2)
    assert how == "rss" and value is not None and value >= 0


def test_ratio_ci_pairs_rounds_so_a_drift_shared_by_both_steps_does_not_widen_it():
    import numpy as np

    from harness import ratio_ci

    rng = np.random.default_rng(0)
    drift = np.exp(rng.normal(0, 0.3, 40))  # each round's slowdown, shared by both steps (a busy machine)
    base = list(drift * 1.0 * np.exp(rng.normal(0, 0.02, 40)))
    times = list(drift * 1.5 * np.exp(rng.normal(0, 0.02, 40)))
    lo, hi = ratio_ci(times, base)
    assert lo < 1.5 < hi  # the true ratio
    assert hi - lo < 0.15  # 30% drift between rounds, 2% noise within: paired, a few percent either side
    # unpaired (the same times, rounds shuffled apart) it is several times wider (0.34 against 0.12)
    lo_u, hi_u = ratio_ci(times, list(rng.permutation(base)))
    assert hi_u - lo_u > 2.5 * (hi - lo)
    # an exact ratio: a point
    assert ratio_ci([1.5 * b for b in base], base) == pytest.approx((1.5, 1.5), abs=1e-12)
    with pytest.raises(ValueError, match="paired rounds"):
        ratio_ci(times[:5], base)


def test_bench_privacy_goal_verdicts_come_from_the_intervals_and_can_go_each_way():
    import numpy as np

    import bench_privacy
    from harness import Result, ratio_ci

    rng = np.random.default_rng(1)
    drift = np.exp(rng.normal(0, 0.2, 30))

    def result(name, factor, noise, base=None, peak=None):
        times = list(drift * factor * np.exp(rng.normal(0, noise, 30)))
        r = Result(name, float(np.median(times)), 0, 0, 0, None, peak, times_ms=times)
        if base is not None:
            r.ratio = r.median_ms / base.median_ms
            r.ratio_lo, r.ratio_hi = ratio_ci(times, base.times_ms)
        return r

    def verdicts(ours_factor, opacus_factor, noise, peak):
        sgd = result("sgd", 1.0, 0.01)
        ours = result("backproplab ghost", ours_factor, noise, sgd, peak)
        opacus = result("opacus ghost", opacus_factor, noise, sgd)
        row = bench_privacy.goals({"case": [sgd, ours, opacus]}).splitlines()[-1]
        return [part.split()[-1] for part in row.split(" | ")[1:]]

    assert verdicts(1.3, 3.0, 0.01, 1.2) == ["met", "met", "met"]
    assert verdicts(1.8, 3.0, 0.01, 1.7) == ["missed", "missed", "missed"]
    assert verdicts(1.5, 3.0, 0.05, 1.0) == ["inconclusive", "inconclusive", "met"]  # both bounds inside the CIs
