"""Greedy training of the last block with a cached prefix against one end-to-end step of the full network.

The cached step runs block J + its auxiliary classifier on stored features of blocks 1..J-1; the
end-to-end step runs the whole network (trunk + the same classifier). Per-step ratios equal per-epoch
ratios (same batches); the one-off caching pass per stage is reported separately. Goal: <= 0.7x time,
<= 0.5x peak memory. CIFAR-sized random inputs (3x32x32), batch 128, widths 32-64-64-128.

    python benchmarks/bench_layerwise.py [--device cuda] [--out layerwise.json]
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.methods.layerwise import LayerwiseCNN  # noqa: E402

SHAPE, BATCH, WIDTHS = (3, 32, 32), 128, (32, 64, 64, 128)


def step(mode: str, k: int, device: str):
    torch.manual_seed(0)
    model = LayerwiseCNN(SHAPE, 10, WIDTHS, (1, 3), k=k).to(device)
    x, y = torch.randn(BATCH, *SHAPE, device=device), torch.randint(0, 10, (BATCH,), device=device)
    if mode == "end-to-end":
        params, net, inp = list(model.parameters()), model, x
    else:
        with torch.no_grad():
            inp = model.eval().features(x, len(WIDTHS) - 1)
        last, aux = model.blocks[-1].train(), model.aux[-1].train()
        params = list(last.parameters()) + list(aux.parameters())
        net = lambda t: aux(last(t))  # noqa: E731
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(inp), y).backward()
        opt.step()
    return run


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    results = {}
    for k in (1, 3):
        modes = ("end-to-end", "greedy last block, cached")
        results[f"k={k}"] = compare({m: functools.partial(step, m, k) for m in modes},
                                    baseline="end-to-end", device=args.device, repeats=args.repeats,
                                    memory_method=args.memory)
    report(results, args, "greedy last block (cached prefix) vs end-to-end step")
    model = LayerwiseCNN(SHAPE, 10, WIDTHS, (1, 3)).eval()
    x = torch.randn(BATCH, *SHAPE)
    t = time.perf_counter()
    with torch.no_grad():
        model.features(x, len(WIDTHS) - 1)
    print(f"\ncaching pass (once per stage): {1e3 * (time.perf_counter() - t):.1f} ms per batch of {BATCH}")


if __name__ == "__main__":
    main()
