"""Checks that need a CUDA device (skipped without one; `scripts/gpu_check.sh` runs them on a GPU machine)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backproplab.cli import main
from backproplab.methods import privacy
from backproplab.methods.ghost_clipping import GhostClipping

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_ghost_clipping_on_cuda_equals_the_cpu_engine():
    torch.manual_seed(0)
    model = privacy.prepare_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                                nn.Linear(4 * 36, 5)), quiet=True).double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    results = []
    for device in ("cpu", "cuda"):
        clipper = GhostClipping(model.to(device))
        with clipper.recording():
            loss = F.cross_entropy(clipper(x.to(device)), y.to(device), reduction="sum")
        sums, norms = clipper.clipped_sum(loss, 0.5)
        results.append(([s.cpu() for s in sums.values()], norms.cpu()))
        clipper.remove_hooks()
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-9)


def test_every_experiment_runs_on_cuda(tmp_path):
    assert main(["reproduce", "--scale", "smoke", "--device", "cuda", "--out", str(tmp_path), "--no-progress"]) == 0
    finals = list(tmp_path.rglob("final.json"))
    assert finals and all(json.loads(f.read_text())["status"] in ("ok", "diverged") for f in finals)
