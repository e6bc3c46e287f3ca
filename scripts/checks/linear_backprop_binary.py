"""Issue #34 item 5: the checks behind linear_backprop.sec4.binary's full-scale "contradicted" verdict.

1. Tuning: each arm's Adam learning rate from the same four values, chosen on a validation split (20% of the
   digits training set, 3 seeds, 15 epochs), never the test set.
2. Metric: at those rates, training accuracy and loss beside test accuracy (5 paired seeds).
3. Scale: the same at three times the epochs (45).

Run from the repository root: ``python scripts/checks/linear_backprop_binary.py`` (about 10 minutes on 2 CPU
cores); prints one line per result and writes ``linear_backprop_binary.json``. The numbers are in
``docs/checks/linear_backprop.json`` and, through ``backproplab record --checks``, in the generated write-up.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from scipy import stats

from backproplab.data import load_dataset
from backproplab.experiments import validation_split
from backproplab.experiments.linear_backprop import LinearBackpropConfig
from backproplab.methods.linear_backprop import linear_backprop
from backproplab.models import build_model
from backproplab.train import TrainConfig, fit

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
KEYS = ("test_acc", "train_full_acc", "train_full_loss")


CFG = LinearBackpropConfig()  # the experiment's binary arm, at its full-scale defaults


def train(method: str, lr: float, seed: int, epochs: int, validation: bool) -> dict:
    """The experiment's binary arm (binary_vgg with its channels and hidden width, Adam, its batch) on digits."""
    data = load_dataset("digits", seed=seed)
    if validation:
        data = validation_split(data, 0.2, seed)
    torch.manual_seed(seed)
    model = build_model("binary_vgg", data.input_shape, data.num_classes, channels=CFG.binary_channels,
                        hidden=CFG.binary_hidden)
    if method == "lbp":
        linear_backprop(model)
    config = TrainConfig(optimizer="adam", lr=lr, batch_size=CFG.batch_size, epochs=epochs, seed=seed, device="cpu",
                         eval_train=True)
    return fit(model, data, config, write_final=False, progress=False)[-1]


def main() -> None:
    torch.set_num_threads(1)
    out: dict = {"validation_acc": {}, "test": {}}
    for method in ("bp", "lbp"):
        for lr in LRS:
            out["validation_acc"][f"{method} {lr:g}"] = float(np.mean([train(method, lr, s, 15, True)["test_acc"]
                                                                       for s in range(3)]))
            print(method, lr, "validation accuracy", round(out["validation_acc"][f"{method} {lr:g}"], 4), flush=True)
    best = {m: max(LRS, key=lambda lr, m=m: out["validation_acc"][f"{m} {lr:g}"]) for m in ("bp", "lbp")}
    print("learning rate chosen on validation:", best, flush=True)
    for epochs in (15, 45):
        runs = {m: [train(m, best[m], s, epochs, False) for s in range(5)] for m in ("bp", "lbp")}
        for key in KEYS:
            diff = np.array([b[key] - a[key] for a, b in zip(runs["bp"], runs["lbp"])])
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
            line = (f"{epochs} epochs, {key}: backprop {np.mean([r[key] for r in runs['bp']]):.4f}, linear backprop "
                    f"{np.mean([r[key] for r in runs['lbp']]):.4f}, difference {diff.mean():+.4f} "
                    f"[{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}] (5 paired seeds, 95% t-interval)")
            out["test"][f"{epochs} {key}"] = line
            print(line, flush=True)
    with open("linear_backprop_binary.json", "w") as f:
        json.dump(out | {"chosen_lr": best}, f, indent=1)


if __name__ == "__main__":
    main()
