"""The benchmark harness's memory measure against allocations whose sizes are known in closed form."""

import functools
import os
import sys
from pathlib import Path

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


def test_a_failed_tensor_measurement_falls_back_to_the_resident_set_and_says_so():
    value, how = peak_memory(_dies_under_the_profiler, "cpu", steps=2)
    assert how == "rss" and value is not None and value >= 0
