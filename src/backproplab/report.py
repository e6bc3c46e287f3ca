"""Results folder -> one self-contained HTML page (figures embedded as PNG data URIs).

Reads only result files: ``<dir>/<experiment>/summary.json``, the figures beside it, and each run's
``final.json``. Per experiment: the verdict lines, a table of final metrics as mean ± std over
seeds, and the figures.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import _io

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.verdict{background:#f4f7fb;border-left:4px solid #4a78b5;
padding:.5em 1em}img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{background:#f3f3f3}"""


def final_table(exp_dir: Path, metrics: list[str]) -> list[tuple[str, int, dict[str, tuple[float, float]]]]:
    """[(arm, number of seeds, {metric: (mean, std)})] from each finished run's final.json."""
    rows = []
    for arm_dir in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
        finals = [json.loads(f.read_text()) for f in sorted(arm_dir.glob("seed*/final.json"))]
        if not finals:
            continue
        stats = {}
        for m in metrics:
            vals = np.array([f[m] for f in finals if m in f], dtype=float)
            if len(vals):
                stats[m] = (float(vals.mean()), float(vals.std()))
        rows.append((arm_dir.name, len(finals), stats))
    return rows


def _section(exp_dir: Path) -> str:
    summary = json.loads((exp_dir / "summary.json").read_text())
    metrics = summary.get("table_metrics", ["test_acc", "test_loss", "train_loss"])
    parts = [f"<h2 id='{html.escape(summary['experiment'])}'>{html.escape(summary['experiment'])}</h2>",
             f"<p>{html.escape(summary.get('description', ''))}</p>"]
    verdict = summary.get("verdict") or ["(no verdict recorded)"]
    parts.append("<div class='verdict'><b>Verdict</b><ul>" +
                 "".join(f"<li>{html.escape(v)}</li>" for v in verdict) + "</ul></div>")
    rows = final_table(exp_dir, metrics)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{n}</td>" +
        "".join(f"<td>{s[m][0]:.4g} ± {s[m][1]:.2g}</td>" if m in s else "<td>–</td>" for m in metrics) + "</tr>"
        for arm, n, s in rows)
    parts.append(f"<table><tr><th>arm</th><th>seeds</th>{head}</tr>{body}</table>")
    for name in summary.get("figures", []):
        png = exp_dir / name
        if png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    cfg = json.dumps(summary.get("config", {}), indent=1, sort_keys=True)
    parts.append(f"<details><summary>config</summary><pre>{html.escape(cfg)}</pre></details>")
    return "\n".join(parts)


def build_report(results_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out_file``) for every experiment under ``results_dir``."""
    results_dir = Path(results_dir)
    exp_dirs = sorted(p.parent for p in results_dir.glob("*/summary.json"))
    if not exp_dirs:
        raise FileNotFoundError(f"no experiment results under {results_dir} (expected {results_dir}/<experiment>/"
                                "summary.json); run `backproplab run NAME` or `backproplab reproduce` first")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = " · ".join(f"<a href='#{html.escape(d.name)}'>{html.escape(d.name)}</a>" for d in exp_dirs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>backproplab report</title>"
            f"<style>{STYLE}</style></head><body><h1>backproplab report</h1>"
            f"<p>{stamp} · torch {torch.__version__} · Python {platform.python_version()} · {toc}</p>"
            + "\n<hr>\n".join(_section(d) for d in exp_dirs) + "</body></html>")
    out = Path(out_file) if out_file else results_dir / "report.html"
    _io.write_text(out, page)
    return out
