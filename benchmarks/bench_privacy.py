"""A DP-SGD step (per-example clipping to C = 1, Gaussian noise, SGD update) with every engine, against a
non-private SGD step, in one run, interleaved, on the same model and the same fixed batch:

- ``backproplab ghost``: our engine through the runner's DP-SGD step (``DPSGD(..., engine="ghost")``);
- ``opacus hooks`` / ``opacus ew`` / ``opacus functorch`` / ``opacus ghost``: ``PrivacyEngine.make_private``
  with each ``grad_sample_mode`` (``ghost`` with Opacus's fast-gradient-clipping criterion);
- ``torch.func vmap``: per-example gradients by ``vmap(grad(...))``, then clip, sum, noise and step;
- ``noise draw alone``: only the Gaussian noise every DP-SGD step draws (one sample per parameter entry),
  the floor under every engine;
- ``inlined book-keeping``: the same step written out by hand for a network of Linear layers only (the MLP):
  forward hooks keep each layer's input, one backward to the layer outputs, ||a_i|| ||g_i|| norms, the clip
  factors folded into the output gradients, one product per weight into its noise. No checks, no other
  layer types, no sampling: the floor of the method itself on this machine, against which our engine's
  generality is measured.

Models: the MLP 64-256-256-10 and the small CNN (GroupNorm) on digits, ResNet-18 with GroupNorm on
3x32x32 inputs (width 0.25 on CPU, 1.0 on CUDA). Goals (issue 19): ours <= 1.5x SGD in time and peak memory
on the MLP and CNN at batch 128, and >= 2x faster than the best Opacus mode.

    python benchmarks/bench_privacy.py [--device cuda] [--repeats 30] [--batches 64,128,256]
        [--models mlp,cnn,resnet18] [--out privacy.json]
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import compare, report  # noqa: E402

from backproplab.data import load_dataset  # noqa: E402
from backproplab.methods import privacy  # noqa: E402
from backproplab.models import build_model  # noqa: E402
from backproplab.train import Batch  # noqa: E402

warnings.filterwarnings("ignore")
METHODS = ("sgd", "backproplab ghost", "opacus hooks", "opacus ew", "opacus functorch", "opacus ghost",
           "torch.func vmap", "noise draw alone", "inlined book-keeping")
CLIP, NOISE, LR = 1.0, 1.0, 0.05


def _model_and_batch(model_name: str, batch: int, device: str):
    torch.manual_seed(0)
    if model_name == "resnet18":
        shape = (3, 32, 32)
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        width = 1.0 if device.startswith("cuda") else 0.25
        model = build_model("resnet18", shape, 10, width=width)
    else:
        data = load_dataset("digits")
        x, y = data.x_train[:batch], data.y_train[:batch]
        if len(x) < batch:
            raise ValueError(f"digits has {len(x)} training examples, fewer than the batch {batch}")
        kwargs = {"widths": (256, 256)} if model_name == "mlp" else {"batchnorm": True}
        model = build_model(model_name, data.input_shape, 10, **kwargs)
    model = privacy.prepare_model(model, quiet=True)  # BatchNorm -> GroupNorm, for every engine alike
    return model.to(device), x.to(device), y.to(device)


def step(method: str, model_name: str, batch: int, device: str):
    model, x, y = _model_and_batch(model_name, batch, device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if method == "sgd":
        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run
    if method == "noise draw alone":  # the floor under every engine: one Gaussian draw per parameter entry
        noise = privacy.GaussianNoise(NOISE * CLIP, seed=0)
        params = [p for p in model.parameters()]

        def run():
            noise.add_to([torch.zeros_like(p) for p in params])
        return run
    if method == "inlined book-keeping":
        return _inlined(model, opt, x, y)
    if method == "backproplab ghost":
        dp = privacy.DPSGD(model, opt, n=len(x), batch_size=batch, steps=1000,
                           config=privacy.DPConfig(noise_multiplier=NOISE, max_grad_norm=CLIP, engine="ghost"))
        index = torch.arange(len(x), device=device)
        dp.poisson_batch = lambda device: index  # the same fixed batch as every engine

        class State:
            pass

        state = State()
        state.data = type("D", (), {"x_train": x, "y_train": y})()
        state.loss_fn, state.optimizer, state.net = F.cross_entropy, dp.optimizer, dp.model
        train_step = dp.step()
        fixed = Batch(x, y, index)
        return lambda: train_step(fixed, state)
    if method.startswith("opacus"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        mode = method.split()[1]
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE,
                                           max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode,
                                           criterion=nn.CrossEntropyLoss())
        if mode == "ghost":
            module, dp_opt, criterion, _ = out
        else:
            (module, dp_opt, _), criterion = out, nn.CrossEntropyLoss()

        def run():
            dp_opt.zero_grad(set_to_none=True)
            criterion(module(x), y).backward()
            dp_opt.step()
        return run
    if method == "torch.func vmap":
        from torch.func import functional_call, grad, vmap

        params = [p for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, dict(zip(names, p)), (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def run():
            opt.zero_grad(set_to_none=True)
            grads = per_example([p.detach() for p in params], x, y)
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))
            factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, grads):
                p.grad = (torch.einsum("b,b...->...", factor, g) + NOISE * CLIP * torch.randn_like(p)) / batch
            opt.step()
        return run
    raise ValueError(method)


def _inlined(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """A DP-SGD step by hand for Linear layers with biases only (see the module docstring)."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not all(isinstance(m, nn.Linear) and m.bias is not None for m in layers):
        raise TypeError("written for networks of Linear layers with biases only")
    noise = privacy.GaussianNoise(NOISE * CLIP, seed=0)
    kept: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    for m in layers:
        m.register_forward_hook(lambda m, args, out: kept.append((m, args[0], out)))
    B = len(x)

    def run():
        opt.zero_grad(set_to_none=True)
        kept.clear()
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, _, out in kept])
        with torch.no_grad():
            parts = []
            for (_, a, _), g in zip(kept, grads):
                gn = torch.linalg.vector_norm(g, dim=1)
                parts += [gn * torch.linalg.vector_norm(a, dim=1), gn]
            factor = (CLIP / (torch.linalg.vector_norm(torch.stack(parts), dim=0) + 1e-6)).clamp(max=1.0)
            for (m, a, _), g in zip(kept, grads):
                w, b = noise.draw_one(m.weight, 1 / B), noise.draw_one(m.bias, 1 / B)
                b.addmv_(g.T, factor, alpha=1 / B)
                w.addmm_(g.mul_(factor.unsqueeze(1)).T, a, alpha=1 / B)
                m.weight.grad, m.bias.grad = w, b
        kept.clear()  # the inputs and outputs are not kept into the next step
        opt.step()
    return run


def _works(factory, device: str) -> str | None:
    try:
        run = factory(device)
        run()
        run()
        return None
    except Exception as e:  # an engine that cannot take a model is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def goals(results: dict[str, list]) -> str:
    """Issue 19's goals per case, each a verdict from its 95% interval (met: the whole interval on the right
    side; missed: the whole interval on the wrong side; else inconclusive): our step <= 1.5x SGD's; >= 2x
    faster than the fastest Opacus mode (paired by round, like the ratios); peak memory <= 1.5x SGD's (exact)."""
    from harness import ratio_ci

    def verdict(lo: float, hi: float, bound: float, below: bool) -> str:
        if (hi <= bound) if below else (lo >= bound):
            return "met"
        if (lo > bound) if below else (hi < bound):
            return "missed"
        return "inconclusive"

    lines = ["", "## goals (issue 19)", "case | time x SGD (95% CI) | vs fastest Opacus mode (95% CI) | memory x SGD"]
    for case, rs in results.items():
        by = {r.name: r for r in rs}
        ours = by.get("backproplab ghost")
        opacus = [r for r in rs if r.name.startswith("opacus")]
        if ours is None or ours.ratio_lo is None:
            continue
        time = (f"{ours.ratio:.2f} ({ours.ratio_lo:.2f}-{ours.ratio_hi:.2f}) "
                f"{verdict(ours.ratio_lo, ours.ratio_hi, 1.5, True)}")
        speed = "-"
        if opacus:
            best = min(opacus, key=lambda r: r.median_ms)
            lo, hi = ratio_ci(best.times_ms, ours.times_ms)
            speed = (f"{best.median_ms / ours.median_ms:.2f}x {best.name} ({lo:.2f}-{hi:.2f}) "
                     f"{verdict(lo, hi, 2.0, False)}")
        memory = "-" if ours.peak_ratio is None else \
            f"{ours.peak_ratio:.2f} {'met' if ours.peak_ratio <= 1.5 else 'missed'}"
        lines.append(f"{case} | {time} | {speed} | {memory}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--models", default="mlp,cnn,resnet18")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory", choices=("tensors", "rss"), default="tensors",
                   help="CPU peak memory: bytes of live tensors (exact) or the resident set (see harness.py)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    results, skipped = {}, []
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            case = f"{model_name}, batch {batch}"
            candidates = {}
            for m in args.methods.split(","):
                factory = functools.partial(step, m, model_name, batch)
                why = _works(factory, args.device)
                if why is None:
                    candidates[m] = factory
                else:
                    skipped.append(f"{case}: {m} failed ({why})")
            repeats = args.repeats if model_name != "resnet18" else max(3, args.repeats // 3)
            results[case] = compare(candidates, baseline="sgd", device=args.device, repeats=repeats,
                                    inner=5 if model_name == "mlp" else 1, memory=not args.no_memory,
                                    memory_method=args.memory)
            print(f"done: {case}", file=sys.stderr, flush=True)
    report(results, args, "DP-SGD step per engine vs non-private SGD (ratio = time / SGD's)")
    for line in skipped:
        print(line)
    print(goals(results))


if __name__ == "__main__":
    main()
