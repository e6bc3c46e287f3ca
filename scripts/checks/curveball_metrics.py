"""Issue #34 item 5, the metric check behind CurveBall's full-scale CNN verdicts: the same runs read by other
measures than the claim's (the mean training loss over every step, the area under the curve per step):
  - the end point: mean training loss over the last quarter epoch (the metric before issue #34);
  - steps to reach a training loss of 0.3 and 0.1 (not reached: the run's length);
  - final test accuracy.
Each as CurveBall minus the baseline, paired by seed, with a 95% t-interval.

Usage: ``python scripts/checks/curveball_metrics.py RESULTS_DIR/curveball`` (reads each run's metrics.jsonl).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats


def _measures(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train_loss" in r]
    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.array([r["train_loss"] for r in rows], dtype=float)
    last_epoch = max(r["epoch"] for r in rows)
    tail = [r["train_loss"] for r in rows if r["epoch"] > last_epoch - 0.25 - 1e-9]
    out = {"curve_mean": float(loss.mean()), "end_point": float(np.mean(tail)),
           "test_acc": float(rows[-1].get("test_acc", np.nan))}
    for level in (0.3, 0.1):
        below = np.nonzero(loss <= level)[0]
        out[f"steps_to_{level:g}"] = float(steps[below[0]] if len(below) else steps[-1])
    return out


def _interval(diff: np.ndarray) -> str:
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return f"{diff.mean():+.4g} [{diff.mean() - half:+.4g}, {diff.mean() + half:+.4g}]"


def main(exp_dir: str) -> None:
    root = Path(exp_dir)
    for setting in sorted({p.name.rsplit("-", 1)[0] for p in root.glob("*-curveball")
                           if p.is_dir() and not p.name.startswith("toy-")}):
        seeds = sorted(p.name for p in (root / f"{setting}-curveball").glob("seed*"))
        seeds = [s for s in seeds if all((root / f"{setting}-{m}" / s / "final.json").exists()
                                         for m in ("curveball", "momentum", "adam"))]  # finished runs only
        if len(seeds) < 2:
            continue
        per = {m: [_measures(root / f"{setting}-{m}" / s) for s in seeds] for m in ("curveball", "momentum", "adam")}
        for base in ("momentum", "adam"):
            parts = []
            for key in ("curve_mean", "end_point", "steps_to_0.3", "steps_to_0.1", "test_acc"):
                cb = np.array([r[key] for r in per["curveball"]])
                other = np.array([r[key] for r in per[base]])
                parts.append(f"{key} {cb.mean():.4g} vs {other.mean():.4g}, {_interval(cb - other)}")
            print(f"{setting} curveball vs {base} (n={len(seeds)}): " + "; ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])
