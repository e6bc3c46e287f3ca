"""DP-SGD's step through the runner against non-private SGD and against a bare Opacus loop
(PrivacyEngine.make_private with its Poisson DataLoader): same MLP, digits, expected batch 64.

Goal: our overhead over bare Opacus <= 5%.

    python benchmarks/bench_privacy.py [--device cuda] [--out privacy.json]
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cli, compare, report  # noqa: E402

from backproplab.data import load_dataset  # noqa: E402
from backproplab.methods import privacy  # noqa: E402
from backproplab.models import build_model  # noqa: E402
from backproplab.train import Batch  # noqa: E402

BATCH = 64
warnings.filterwarnings("ignore")


def step(method: str, device: str):
    data = load_dataset("digits").to(device)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10, widths=(256, 256)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = len(data.x_train)
    if method == "sgd":
        def run():
            idx = torch.randint(0, n, (BATCH,), device=device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        return run
    if method == "bare opacus":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=BATCH)
        gsm, dp_opt, dp_loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                              noise_multiplier=1.0, max_grad_norm=1.0)
        it = iter(dp_loader)

        def run():
            nonlocal it
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(dp_loader)
                x, y = next(it)
            dp_opt.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            dp_opt.step()
        return run
    dp = privacy.DPSGD(model, opt, n, BATCH, 1000, privacy.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    train_step = dp.step()

    class State:
        pass

    state = State()
    state.data, state.loss_fn, state.optimizer, state.net = data, F.cross_entropy, dp.optimizer, dp.model
    batch = Batch(data.x_train, data.y_train, torch.arange(n))  # the step draws its own Poisson batch
    return lambda: train_step(batch, state)


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    methods = ("sgd", "bare opacus", "backproplab DP-SGD step")
    results = {"MLP 64-256-256-10, digits, batch 64": compare(
        {m: functools.partial(step, m) for m in methods}, baseline="bare opacus", device=args.device,
        repeats=args.repeats, inner=5)}
    report(results, args, "DP-SGD step: runner vs bare Opacus vs non-private SGD")


if __name__ == "__main__":
    main()
