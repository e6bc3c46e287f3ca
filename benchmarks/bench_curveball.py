"""CurveBall's step against SGD with momentum: same model, batch; time and peak memory ratios.

Goal: <= 2.0x time and <= 1.5x peak memory. Variants: automatic rho/beta (J z, one reverse pass, J dz)
or fixed lr/momentum (J z and the reverse pass; J dz only on the lambda step, every 5th); the J v
products by tangent replay on the recorded forward (the default for these chain networks) or by
forward-mode AD passes, which recompute the forward (with ``low_memory``, the default for networks
with normalisation layers, J z gets a pass of its own instead of riding on the graph-building forward).
``fill_grad`` also writes the loss gradient to ``.grad`` (a second cotangent in the reverse pass).

    python benchmarks/bench_curveball.py [--device cuda] [--out curveball.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.methods.curveball import CrossEntropy, CurveBall  # noqa: E402
from backproplab.models import build_model  # noqa: E402

CASES = {
    "small CNN (32-64) on 1x8x8 (digits), batch 128": ("cnn", (1, 8, 8), {}, 128),
    "small CNN (32-64, BN) on 1x28x28, batch 128": ("cnn", (1, 28, 28), {"batchnorm": True}, 128),
    "MLP 784-512-512-10, batch 128": ("mlp", (1, 28, 28), {"widths": (512, 512)}, 128),
}


def step(name, shape, kwargs, batch, method, device):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **kwargs).to(device)
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run
    fixed = {"lr": 0.01, "momentum": 0.9} if method.startswith("curveball fixed") else {}
    jvp = "forward_ad" if "forward AD" in method else "replay"
    opt = CurveBall(model.parameters(), model=model, jvp=jvp, fill_grad="fill_grad" in method, **fixed)
    loss = CrossEntropy(y)
    return lambda: opt.step(lambda: model(x), loss)


METHODS = ("sgd", "curveball auto (default)", "curveball fixed", "curveball auto, forward AD",
           "curveball fixed, forward AD", "curveball auto, fill_grad")


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    results = {case: compare({m: functools.partial(step, *spec, m) for m in METHODS},
                             baseline="sgd", device=args.device, repeats=args.repeats, memory_method=args.memory)
               for case, spec in CASES.items()}
    report(results, args, "CurveBall step vs SGD+momentum")


if __name__ == "__main__":
    main()
