"""MSGD's noisy full-batch step against GD on the same n examples, and against forming the
per-example gradient matrix G (torch.func vmap(grad)) and multiplying by w.

Goal: weighted-loss step <= 1.05x GD. Small CNN (16-32) on n = 1000 digits images, chunks of 1000.

    python benchmarks/bench_msgd.py [--device cuda] [--out msgd.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.data import load_dataset  # noqa: E402
from backproplab.methods import msgd  # noqa: E402
from backproplab.models import build_model  # noqa: E402
from backproplab.train import Batch  # noqa: E402

N, B = 1000, 50


def step(method: str, device: str):
    data = load_dataset("digits", n_train=N).to(device)
    torch.manual_seed(0)
    model = build_model("cnn", data.input_shape, 10, channels=(16, 32)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data.x_train, data.y_train
    if method == "gd":
        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run
    if method == "per-example G w (vmap)":
        weighting = msgd.MSGDCov(N, B)
        params = dict(model.named_parameters())

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))

        def run():
            _, w = weighting.sample(device=device)
            G = per_example({k: v.detach() for k, v in params.items()}, x, y)
            for k, p in params.items():
                p.grad = torch.tensordot(w, G[k], dims=1)
            opt.step()
        return run
    weighting = {"msgd_cov": msgd.MSGDCov, "msgd_fisher": msgd.MSGDFisher,
                 "msgd_bernoulli": msgd.MSGDBernoulli}[method](N, B)
    train_step = msgd.weighted_gradient_step(weighting, chunk_size=N)  # the library's step, as the loop runs it

    class State:
        pass

    state = State()
    state.data, state.optimizer, state.net, state.loss_fn = data, opt, model, F.cross_entropy
    batch = Batch(x, y, torch.arange(len(x)))  # ignored: the step draws its own examples and weights
    return lambda: train_step(batch, state)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    methods = ("gd", "msgd_cov", "msgd_fisher", "msgd_bernoulli", "per-example G w (vmap)")
    results = {f"small CNN, n={N}": compare({m: functools.partial(step, m) for m in methods}, baseline="gd",
                                            device=args.device, repeats=args.repeats, memory_method=args.memory)}
    report(results, args, "MSGD weighted-loss step vs GD")


if __name__ == "__main__":
    main()
