"""Linear backprop's training step against standard backprop: same model, batch and optimizer.

Goal: ratio <= 1.0 (the backward skips the activation derivative).

    python benchmarks/bench_linear_backprop.py [--device cuda] [--out lbp.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.methods.linear_backprop import linear_backprop  # noqa: E402
from backproplab.models import build_model  # noqa: E402

CASES = {
    "mlp 784-512-512-10 tanh, batch 128": ("mlp", (1, 28, 28), {"widths": (512, 512), "activation": "tanh"}, 128),
    "mlp 784-512-512-10 relu, batch 128": ("mlp", (1, 28, 28), {"widths": (512, 512), "activation": "relu"}, 128),
    # GELU has no in-place twin, so it takes the autograd.Function path
    "mlp 784-512-512-10 gelu, batch 128": ("mlp", (1, 28, 28), {"widths": (512, 512), "activation": "gelu"}, 128),
    "cnn 32-64 relu on 1x28x28, batch 128": ("cnn", (1, 28, 28), {"channels": (32, 64)}, 128),
}


def step(name: str, shape, kwargs, batch: int, linear: bool, device: str):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **kwargs).to(device)
    if linear:
        linear_backprop(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    results = {case: compare({"backprop": functools.partial(step, *spec, False),
                              "linear backprop": functools.partial(step, *spec, True)},
                             baseline="backprop", device=args.device, repeats=args.repeats, memory_method=args.memory)
               for case, spec in CASES.items()}
    report(results, args, "linear backprop step time")


if __name__ == "__main__":
    main()
