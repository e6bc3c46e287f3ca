"""Our training loop against a bare hand-written torch loop: same model, data, batches, optimizer.

Each timed unit is one epoch of SGD+momentum followed by one test-set evaluation, which both loops do
(the bare loop by hand). Goal: overhead <= 5% (ratio <= 1.05).

    python benchmarks/bench_loop_overhead.py [--device cuda] [--out loop.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.data import load_dataset  # noqa: E402
from backproplab.models import build_model  # noqa: E402
from backproplab.train import TrainConfig, fit  # noqa: E402

CASES = {"digits / mlp": ("digits", "mlp"), "mnist1d / cnn": ("mnist1d", "cnn")}
BATCH = 64


def _setup(dataset: str, model_name: str, device: str):
    data = load_dataset(dataset).to(device)
    model = build_model(model_name, data.input_shape, data.num_classes).to(device)
    return data, model


def ours(dataset: str, model_name: str, device: str):
    data, model = _setup(dataset, model_name, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = TrainConfig(lr=0.01, momentum=0.9, batch_size=BATCH, epochs=1, device=device, seed=0)
    return lambda: fit(model, data, cfg, optimizer=opt)


def bare(dataset: str, model_name: str, device: str):
    data, model = _setup(dataset, model_name, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = len(data.x_train)

    def epoch():
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
        for s in range(0, n, BATCH):
            idx = perm[s:s + BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(data.x_test)
            F.cross_entropy(out, data.y_test).item(), (out.argmax(1) == data.y_test).float().mean().item()

    return epoch


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    results = {}
    for case, (dataset, model_name) in CASES.items():
        results[case] = compare({"bare torch loop": functools.partial(bare, dataset, model_name),
                                 "backproplab.fit": functools.partial(ours, dataset, model_name)},
                                baseline="bare torch loop", device=args.device, repeats=args.repeats, memory=False)
    report(results, args, "loop overhead: one epoch + evaluation")


if __name__ == "__main__":
    main()
