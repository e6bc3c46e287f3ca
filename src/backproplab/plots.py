"""Figures shared by the experiments: learning curves as mean and band over seeds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import _io  # noqa: E402


def mean_band(runs: Sequence[list[dict]], metric: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, std) over seeds, truncated to the shortest run."""
    length = min(len(r) for r in runs)
    xs = np.array([row[x] for row in runs[0][:length]], dtype=float)
    ys = np.array([[row[metric] for row in r[:length]] for r in runs], dtype=float)
    return xs, ys.mean(0), ys.std(0)


def curves(ax, runs_by_label: dict[str, Sequence[list[dict]]], metric: str, x: str = "epoch",
           log: bool = False) -> None:
    for label, runs in runs_by_label.items():
        if not runs:
            continue
        xs, mean, std = mean_band(runs, metric, x)
        (line,) = ax.plot(xs, mean, label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _io.write_bytes(path, buf.getvalue())
    return Path(path)


def subplots(rows: int, cols: int, size: tuple[float, float] = (4.2, 3.2)):
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes
