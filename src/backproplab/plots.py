"""Figures shared by the experiments: learning curves as the mean over seeds with a 95% band.

Axes carry labels with units (:data:`LABELS`), accuracies are drawn in percent, and the y axis turns
logarithmic when the values span more than two decades.
"""

from __future__ import annotations

import io
from pathlib import Path
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from . import _io  # noqa: E402

LABELS = {
    "epoch": "epoch", "step": "iteration (optimizer steps)", "wall_time": "wall time (s)", "depth": "depth (blocks)",
    "test_acc": "test accuracy (%)", "train_full_acc": "training accuracy (%)",
    "linear_separability": "linear-probe accuracy (%)",
    "train_loss": "training loss (mean over the interval)", "test_loss": "test loss",
    "grad_norm_stem": "gradient norm of the stem (l2)",
}


def is_percent(metric: str) -> bool:
    """Whether a metric is a fraction plotted as a percentage (accuracies, separability).

    Example:
        >>> is_percent("test_acc"), is_percent("train_loss")
        (True, False)
    """
    return metric.endswith(("acc", "accuracy", "separability"))


def label(metric: str) -> str:
    """The axis label of a metric: a known name's label, else the name with spaces.

    Example:
        >>> label("grad_norm_head")
        'grad norm head'
    """
    return LABELS.get(metric, metric.replace("_", " "))


def mean_band(runs: Sequence[list[dict]], metric: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, half-width of the 95% t-interval) over seeds, truncated to the shortest run (0 for one seed).

    Example:
        >>> from scipy import stats
        >>> runs = [[{"epoch": 1, "acc": a}, {"epoch": 2, "acc": a + 0.1}] for a in (0.5, 0.6, 0.7)]
        >>> xs, mean, half = mean_band(runs, "acc")
        >>> xs.tolist(), [round(float(m), 6) for m in mean]
        ([1.0, 2.0], [0.6, 0.7])
        >>> bool(abs(half[0] - stats.t.ppf(0.975, 2) * 0.1 / 3 ** 0.5) < 1e-9)          # sd 0.1 over 3 seeds
        True
    """
    length = min(len(r) for r in runs)
    xs = np.array([row[x] for row in runs[0][:length]], dtype=float)
    ys = np.array([[row[metric] for row in r[:length]] for r in runs], dtype=float)
    n = len(ys)
    half = (stats.t.ppf(0.975, n - 1) * ys.std(0, ddof=1) / np.sqrt(n)) if n > 1 else np.zeros(length)
    return xs, ys.mean(0), half


def curves(ax, runs_by_label: dict[str, Sequence[list[dict]]], metric: str, x: str = "epoch",
           log: bool | None = None, legend: bool = True) -> None:
    """One line per label: the mean over its runs, with the 95% band; ``log=None`` decides from the data.

    Example:
        >>> import numpy as np
        >>> from scipy import stats
        >>> runs = [[{"epoch": 1, "test_acc": a}, {"epoch": 2, "test_acc": b}] for a, b in ((0.5, 0.7), (0.6, 0.9))]
        >>> fig, axes = subplots(1, 1)
        >>> curves(axes[0][0], {"sgd": runs}, "test_acc")
        >>> line = axes[0][0].get_lines()[0]
        >>> line.get_label(), line.get_ydata().round(6).tolist()           # the mean over runs, in percent
        ('sgd (n=2)', [55.0, 80.0])
        >>> half = stats.t.ppf(0.975, 1) * stats.sem([70.0, 90.0])           # the band at epoch 2: a 95% t-interval
        >>> band = axes[0][0].collections[0].get_paths()[0].vertices[:, 1]
        >>> bool(np.isclose(band.max(), min(80.0 + half, 100.0)))            # clipped to 100%
        True
    """
    scale = 100.0 if is_percent(metric) else 1.0
    values = []
    for name, runs in runs_by_label.items():
        if not runs:
            continue
        xs, mean, half = mean_band(runs, metric, x)
        (line,) = ax.plot(xs, scale * mean, label=f"{name} (n={len(runs)})")
        low, high = scale * (mean - half), scale * (mean + half)
        if is_percent(metric):  # the band of a t-interval over few seeds can pass 0% or 100%
            low, high = low.clip(0, 100), high.clip(0, 100)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, lw=0)
        values.append(mean)
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(metric))
    if log is None and values:
        v = np.concatenate(values)
        v = v[np.isfinite(v)]
        log = bool(len(v)) and v.min() > 0 and v.max() / v.min() > 100
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend and values:
        ax.legend(fontsize=8)


DPI = 150  # a 5-inch panel is 750 px wide: legible in the report at its full width
MIN_FONT = 8.0  # points: 17 px at DPI; no legend, tick or label in a saved figure is smaller


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI`, every text at least :data:`MIN_FONT` points.

    Example:
        >>> fig, axes = subplots(1, 2)
        >>> path = save(fig, "figure.png")
        >>> open(path, "rb").read(8) == bytes([137, 80, 78, 71, 13, 10, 26, 10])   # a PNG file
        True
    """
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_fontsize() < MIN_FONT:
            text.set_fontsize(MIN_FONT)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    _io.write_bytes(path, buf.getvalue())
    return Path(path)


def subplots(rows: int, cols: int, size: tuple[float, float] = (5.0, 3.7)):
    """A grid of ``rows`` x ``cols`` axes (always 2-D), each ``size`` inches.

    Example:
        >>> fig, axes = subplots(2, 3)
        >>> axes.shape, fig.get_size_inches().tolist()
        ((2, 3), [15.0, 7.4])
        >>> import matplotlib.pyplot as plt; plt.close(fig)
    """
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes
