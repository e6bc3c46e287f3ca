"""Results folder -> one self-contained HTML page (figures embedded as PNG data URIs).

Reads only result files: ``<dir>/<experiment>/summary.json``, the figures beside it, and the ``final.json``
of each run whose ``config.json`` belongs to the summarised config. The first screen is one table of
every claim judged: the claim, what the paper says, the measured estimate with its confidence interval,
seeds, scale and the verdict, each linked to its experiment's section. Per experiment: the verdicts,
notes, a table of final metrics (mean and sd over seeds), the figures and the config.

The page is the Jinja2 template ``templates/report.html.jinja``, rendered with autoescape on: this module
only gathers values from the result files, and every one of them is escaped by the template.
"""

from __future__ import annotations

import base64
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import numpy as np
import torch

from . import _io

from .provenance import code_hash
from .experiments import identity_of  # fields that change results: runs differing only in others match
COLOURS = {"reproduced": "#d7f0d4", "contradicted": "#f7d4d4", "inconclusive": "#fbefc7"}
OUTCOME_ORDER = {"reproduced": 0, "inconclusive": 1, "contradicted": 2}
SCALE_BANNERS = {
    "smoke": "Smoke scale: these runs last seconds and only check that every experiment runs end to end. Their "
             "verdicts are not evidence for or against any paper.",
    "quick": "Quick scale: few seeds and short budgets. A verdict here is preliminary, and many are inconclusive "
             "by design; the full scale (--scale full) is the one that settles the claims.",
}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1250px;margin:1.5em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right;vertical-align:top}th:first-child,td:first-child{text-align:left}
table.claims{table-layout:fixed;width:100%}table.claims th{text-align:left}
table.claims td{text-align:left;overflow-wrap:anywhere}
table.claims td.num{text-align:right}.nowrap{white-space:nowrap}
.reproduced{background:#d7f0d4}.contradicted{background:#f7d4d4}.inconclusive{background:#fbefc7}
.stale{background:#fbe3c7;border-left:4px solid #c77a1e;padding:.3em 1em}
.banner{background:#fde2dc;border-left:4px solid #b5534a;padding:.4em 1em}.disagrees{color:#a12a1e}
.verdict{background:#f4f7fb;border-left:4px solid #4a78b5;padding:.4em 1em}img{max-width:100%;height:auto;
border:1px solid #eee;margin:.5em 0}code{background:#f3f3f3}small{color:#555}"""


def _identity(config: dict) -> dict:
    return identity_of(config)


def _read_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]})")
        return None


def _finals(exp_dir: Path, summary: dict, arm: str, problems: list[str]) -> list[dict]:
    """Final metrics of the summarised config's runs of ``arm`` (another config's leftovers are skipped)."""
    want = _identity(summary.get("config", {}))
    out = []
    for final in sorted((exp_dir / arm).glob("seed*/final.json")):
        record = _read_json(final.parent / "config.json", problems) if (final.parent / "config.json").exists() else None
        if isinstance(record, dict) and record.get("config") == want:
            f = _read_json(final, problems)
            if isinstance(f, dict):
                out.append(f)
    return out


def final_table(exp_dir: Path, summary: dict, metrics: list[str],
                problems: list[str] | None = None) -> list[tuple[str, int, int, dict[str, tuple[float, float]]]]:
    """[(arm, finished seeds, diverged seeds, {metric: (mean, sd)})] from each run's final.json.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> exp_dir = Path(tempfile.mkdtemp())
        >>> for seed, (acc, status) in enumerate([(0.8, "ok"), (0.9, "ok"), (None, "diverged")]):
        ...     run = exp_dir / "sgd" / f"seed{seed}"
        ...     run.mkdir(parents=True)
        ...     _ = (run / "config.json").write_text(json.dumps({"config": {"lr": 0.1}}))
        ...     _ = (run / "final.json").write_text(json.dumps({"test_acc": acc, "status": status}))
        >>> table = final_table(exp_dir, {"arms": ["sgd"], "config": {"lr": 0.1}}, ["test_acc"])
        >>> [(arm, ok, diverged, {m: tuple(round(v, 4) for v in s) for m, s in stats.items()})
        ...  for arm, ok, diverged, stats in table]
        [('sgd', 2, 1, {'test_acc': (0.85, 0.0707)})]
    """
    problems = [] if problems is None else problems
    rows = []
    for arm in summary.get("arms", []):
        finals = _finals(exp_dir, summary, arm, problems)
        if not finals:
            continue
        ok = [f for f in finals if f.get("status") != "diverged"]
        stats = {}
        for m in metrics:
            vals = np.array([f[m] for f in ok if isinstance(f.get(m), (int, float))], dtype=float)
            if len(vals):
                stats[m] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
        rows.append((arm, len(ok), len(finals) - len(ok), stats))
    return rows


def _num(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


RECORDED = Path(__file__).resolve().parent / "recorded"  # full-scale verdicts, written by `backproplab record`


RECORD_KEYS = ("experiment", "description", "scale", "seeds", "claims", "verdicts", "provenance", "paper_setting",
               "run_setting", "deviations", "notes", "diverged")


ARTIFACT_CHECKS = ("tuning", "metric", "scale", "premise")  # what rules out our own artifact (issue #34 item 5)


def unchecked(rec: dict, claim: str) -> list[str]:
    """The artifact checks a recorded "contradicted" verdict of ``claim`` still lacks (none for other verdicts
    and for the lab's extensions, which say nothing about the paper).

    Example:
        >>> rec = {"verdicts": [{"claim": "x", "outcome": "contradicted"}],
        ...        "claims": [{"id": "x", "extension": ""}],
        ...        "artifact_checks": {"x": {"tuning": "lr tuned on validation: still -3 points", "metric": " "}}}
        >>> unchecked(rec, "x")                          # a blank entry is not a check
        ['metric', 'scale', 'premise']
    """
    verdict = next((v for v in rec.get("verdicts") or [] if v.get("claim") == claim), {})
    c = next((c for c in rec.get("claims") or [] if c.get("id") == claim), {})
    if verdict.get("outcome") != "contradicted" or c.get("extension"):
        return []
    done = (rec.get("artifact_checks") or {}).get(claim) or {}
    return [k for k in ARTIFACT_CHECKS if not str(done.get(k, "")).strip()]


def record(results_dir: str | Path, dest: str | Path = RECORDED, docs: str | Path | None = None,
           experiments: list[str] | None = None, checks: str | Path | None = None) -> list[Path]:
    """Copy every full-scale experiment's claims and verdicts under ``results_dir`` (or only ``experiments``)
    into ``dest/<experiment>.json`` (with its provenance, settings, notes and the date), for the report to show
    beside later runs; with ``docs``, also write ``docs/<experiment>.md`` from that record by
    :func:`record_markdown`. Other scales are refused: only a full-scale verdict is a record.

    ``checks``: a JSON file ``{claim id: {"tuning": ..., "metric": ..., "scale": ..., "premise": ...}}``, the
    checks (with their numbers) that rule out our own artifact behind a "contradicted" verdict of the paper's
    claim; kept in the record as ``artifact_checks``. Until all four are there the write-up and the report say
    "contradicted, not yet checked for our artifacts" (:func:`unchecked`).

    Example:
        Only a full-scale run is a record; a smoke run is refused, naming its summary:

        >>> import tempfile
        >>> from backproplab.experiments import get, make_config, run
        >>> out = tempfile.mkdtemp()
        >>> _ = run(get("baselines"), make_config(get("baselines"), ["seeds=1", "optimizers=sgd"], scale="smoke"),
        ...         out=out, progress=False, scale="smoke")
        >>> record(out, dest=tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        ValueError: .../baselines/summary.json: scale 'smoke'; only full-scale verdicts are recorded
    """
    extra = json.loads(Path(checks).read_text()) if checks is not None else {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(f"{checks}: expected {{claim id: {{check: text}}}} with checks among {ARTIFACT_CHECKS}")
    written = []
    for path in sorted(Path(results_dir).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if experiments is not None and summary.get("experiment") not in experiments:
            continue
        if summary.get("scale") != "full":
            raise ValueError(f"{path}: scale {summary.get('scale')!r}; only full-scale verdicts are recorded")
        ids = {c["id"] for c in summary.get("claims") or []}
        rec = ({k: summary.get(k) for k in RECORD_KEYS}
               | {"recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                  "artifact_checks": {k: v for k, v in extra.items() if k in ids}})
        out = Path(dest) / f"{summary['experiment']}.json"
        _io.write_json(out, rec)
        written.append(out)
        if docs is not None:
            md = Path(docs) / f"{summary['experiment']}.md"
            _io.write_text(md, record_markdown(json.loads(out.read_text())))  # as stored: the test re-renders that
            written.append(md)
    if not written:
        raise FileNotFoundError(f"no experiment results under {results_dir} (expected <experiment>/summary.json)")
    return written


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def record_markdown(rec: dict) -> str:
    """The write-up of one recorded full-scale run, generated from the record alone (never edited by hand):
    where and when it ran, the paper's setting and this run's, the deviations, every verdict with its interval
    (the paper's claims, then the lab's extensions apart), and the analysis notes the run wrote.

    Example:
        >>> import json
        >>> rec = json.loads((RECORDED / "rifle.json").read_text())              # a shipped full-scale record
        >>> page = record_markdown(rec)
        >>> page.splitlines()[0], all(v["claim"] in page for v in rec["verdicts"])    # every verdict is written up
        ('# rifle: recorded full-scale verdicts', True)
    """
    prov = rec.get("provenance") or {}
    claims = {c["id"]: c for c in rec.get("claims") or []}
    lines = [f"# {rec['experiment']}: recorded full-scale verdicts", "",
             f"Generated by `backproplab record` from `src/backproplab/recorded/{rec['experiment']}.json`; do not "
             "edit by hand (a test regenerates it and compares).", "",
             f"- experiment: {rec.get('description') or rec['experiment']}",
             f"- scale: {rec.get('scale')}, {rec.get('seeds')} paired seeds",
             f"- recorded: {rec.get('recorded')}; code: commit {prov.get('commit') or 'none'}, "
             f"hash {prov.get('code') or 'none'}"
             + (f"; torch {prov['torch']}" if prov.get("torch") else "")
             + (f"; {prov['platform']}" if prov.get("platform") else ""),
             f"- paper's setting: {rec.get('paper_setting') or 'not recorded'}",
             f"- this run's setting: {rec.get('run_setting') or 'not recorded'}"]
    if rec.get("deviations"):
        lines += ["", "## Deviations from the paper", ""] + [f"- {d}" for d in rec["deviations"]]
    for title, extension in (("Verdicts on the paper's claims", False), ("Verdicts on the lab's extensions", True)):
        rows = [v for v in rec.get("verdicts") or [] if bool(claims.get(v["claim"], {}).get("extension")) == extension]
        if not rows:
            continue
        lines += ["", f"## {title}", "",
                  "Estimate: mean paired difference over seeds (arm minus comparison), 95% t-interval.", "",
                  "| claim | outcome | estimate | 95% CI | seeds | judged | " + ("why it is ours" if extension
                                                                               else "the paper's words") + " |",
                  "|---|---|---|---|---|---|---|"]
        for v in rows:
            c = claims.get(v["claim"], {})
            missing = unchecked(rec, v["claim"])
            if missing:
                v = {**v, "note": f"not yet checked for our own artifacts: {', '.join(missing)}"}
            ci = (f"[{_num(v.get('ci_low'))}, {_num(v.get('ci_high'))}]" if v.get("ci_low") is not None else "–")
            judged = (f"{c.get('metric_label') or c.get('metric', '')}; {c.get('direction', '')}, margin "
                      f"{c.get('margin', 0):g}")
            note = f" ({v['note']})" if v.get("note") else ""
            lines.append(f"| {_md(v['claim'])} | **{_md(v['outcome'])}**{_md(note)} | {_num(v.get('estimate'))} | "
                         f"{ci} | {v.get('n')} | {_md(judged)} | "
                         f"{_md(c.get('extension') if extension else c.get('quote') or c.get('where', ''))} |")
    checked = [(c, k) for c, k in (rec.get("artifact_checks") or {}).items() if k]
    if checked:
        lines += ["", "## Checks behind each \"contradicted\" verdict", "",
                  "Before the lab says the paper is contradicted it rules out its own artifact: the tuning budget, "
                  "the metric, the scale and the paper's premise."]
        for claim, done in checked:
            lines += ["", f"### {claim}", ""] + [f"- **{k}**: {_md(done[k])}" for k in ARTIFACT_CHECKS if done.get(k)]
            lines += [f"- **{k}**: {_md(v)}" for k, v in done.items() if k not in ARTIFACT_CHECKS]
    if rec.get("diverged"):
        lines += ["", "## Diverged runs", ""] + [f"- {_md(k)}: {_md(v)}" for k, v in rec["diverged"].items()]
    if rec.get("notes"):
        lines += ["", "## Notes written by the run's analysis", ""] + [f"- {_md(n)}" for n in rec["notes"]]
    return "\n".join(lines) + "\n"


def recorded_verdicts(source: str | Path = RECORDED) -> dict[str, dict]:
    """{claim id: the recorded full-scale verdict, with the record's provenance} from ``source``.

    Example:
        >>> recorded = recorded_verdicts()
        >>> sorted({v["experiment"] for v in recorded.values()})
        ['curveball', 'linear_backprop', 'luck_matters', 'msgd', 'rifle', 'stobatch']
        >>> [claim for claim, v in recorded.items() if v["unchecked"]]   # each contradiction carries its checks
        []
    """
    out: dict[str, dict] = {}
    for path in sorted(Path(source).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            for v in rec.get("verdicts") or []:
                out[v["claim"]] = {**v, "recorded": rec.get("recorded"),
                                   "commit": (rec.get("provenance") or {}).get("commit"),
                                   "code": (rec.get("provenance") or {}).get("code"),
                                   "experiment": rec.get("experiment"), "unchecked": unchecked(rec, v["claim"]),
                                   "checked": bool((rec.get("artifact_checks") or {}).get(v["claim"]))}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable record is no record
    return out


def _recorded(v: dict, recorded: dict[str, dict]) -> dict:
    """The recorded full-scale verdict of ``v``'s claim, for the report's cell; ``disagrees`` when this run's
    verdict is the opposite of the record."""
    rec = recorded.get(v.get("claim"))
    if rec is None or v.get("scale") == "full":
        return {"none": rec is None, "full": rec is not None}
    return {"none": False, "full": False, "outcome": str(rec.get("outcome")), "estimate": _num(rec.get("estimate")),
            "ci": f"[{_num(rec.get('ci_low'))}, {_num(rec.get('ci_high'))}]" if rec.get("ci_low") is not None else "",
            "n": rec.get("n"), "recorded": str(rec.get("recorded")), "commit": str(rec.get("commit") or "none")[:10],
            "disagrees": {v.get("outcome"), rec.get("outcome")} == {"reproduced", "contradicted"},
            "unchecked": [str(x) for x in rec.get("unchecked") or []], "checked": bool(rec.get("checked")),
            "experiment": str(rec.get("experiment"))}


def _is_extension(s: dict, v: dict) -> bool:
    claim = next((c for c in s.get("claims") or [] if isinstance(c, dict) and c.get("id") == v.get("claim")), {})
    return bool(claim.get("extension"))


def _interval(v: dict) -> str:
    return (f"[{_num(v['ci_low'])}, {_num(v['ci_high'])}]" if v.get("ci_low") is not None
            and math.isfinite(v["ci_low"]) else "[no interval]")


def _claim_rows(s: dict, extensions: bool = False, recorded: dict[str, dict] | None = None) -> list[dict]:
    """One row of the claims table (or of the extensions table) per verdict of summary ``s``."""
    rows = []
    recorded = {} if recorded is None else recorded
    claims = {c["id"]: c for c in s.get("claims", [])}
    for v in s.get("verdicts", []):
        c = claims.get(v["claim"], {})
        if bool(c.get("extension")) != extensions:
            continue
        rows.append({
            "outcome": str(v["outcome"]), "claim": str(v["claim"]), "statement": c.get("statement", ""),
            "extension": str(c.get("extension")), "paper": c.get("paper", ""), "where": c.get("where", ""),
            "paper_value": c.get("paper_value", ""), "quote": c.get("quote") or "",
            "estimate": _num(v["estimate"]), "ci": _interval(v), "metric": c.get("metric_label") or c.get("metric", ""),
            "direction": c.get("direction", ""), "margin": f"{c.get('margin', 0):g}", "n": v["n"],
            "paper_setting": str(s.get("paper_setting") or "not recorded"),
            "run_setting": str(s.get("run_setting") or (v.get("scale", "") + " scale")),
            "deviations": bool(s.get("deviations")), "note": v.get("note") or "",
            "recorded": _recorded(v, recorded), "experiment": str(s["experiment"]), "broken": False})
    return rows


def _claims_context(summaries: list[dict], recorded: dict[str, dict] | None = None) -> dict:
    """The claims and extensions tables: rows reproduced first, contradicted last (stable: each experiment's
    claims keep their order within a verdict), and the count of each verdict."""
    rows, extension_rows = [], []
    recorded = recorded_verdicts() if recorded is None else recorded
    for s in summaries:
        try:
            rows += _claim_rows(s, recorded=recorded)
            extension_rows += _claim_rows(s, extensions=True, recorded=recorded)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            rows.append({"broken": True, "outcome": "contradicted", "experiment": str(s.get("experiment")),
                         "error": type(e).__name__})

    def count(extensions: bool) -> dict[str, int]:
        return {k: sum(isinstance(v, dict) and v.get("outcome") == k and _is_extension(s, v) == extensions
                       for s in summaries for v in (s.get("verdicts") or [])) for k in COLOURS}

    def by_outcome(row: dict) -> int:
        return OUTCOME_ORDER.get(row["outcome"], len(OUTCOME_ORDER))

    return {"rows": sorted(rows, key=by_outcome), "extension_rows": sorted(extension_rows, key=by_outcome),
            "counts": count(False), "extension_counts": count(True)}


def _figure(exp_dir: Path, fig: object) -> dict | None:
    """A figure entry of a summary: its PNG as base64, or why it is refused; None when the file is missing."""
    png = exp_dir / str(fig)
    # only a PNG that sits in the experiment folder itself: a summary cannot pull in other local files
    if Path(str(fig)).name != str(fig) or png.suffix != ".png" or png.is_symlink():
        return {"refused": f"figure entry {fig} refused: not a PNG file name inside the experiment folder"}
    if png.exists() and not png.is_file():  # a FIFO would block the read forever, a directory fail it
        return {"refused": f"figure {fig} refused: not a regular file"}
    if png.exists():
        return {"refused": "", "name": str(fig), "data": base64.b64encode(png.read_bytes()).decode()}
    return None


def _section(exp_dir: Path, summary: dict) -> dict:
    """One experiment's section: provenance, settings, verdicts, notes, the final-metrics table, figures."""
    name = summary["experiment"]
    metrics = summary.get("table_metrics", ["test_acc", "test_loss", "train_loss"])
    made = summary.get("provenance") if isinstance(summary.get("provenance"), dict) else {}
    stale = summary.get("stale_runs") or []
    why_stale = []
    if stale:
        why_stale.append(f"{len(stale)} run(s) were made by other code than the code that judged them "
                         f"({', '.join(map(str, stale[:6]))}{', ...' if len(stale) > 6 else ''})")
    if made.get("code") != code_hash():
        why_stale.append(f"this summary was written by other code than the report's "
                         f"({made.get('code', 'unrecorded')} vs {code_hash()})")
    problems: list[str] = []
    rows = [{"arm": arm, "n": n, "diverged": d,
             "cells": [f"{st[m][0]:.4g} ± {st[m][1]:.2g}" if m in st else "–" for m in metrics]}
            for arm, n, d, st in final_table(exp_dir, summary, metrics, problems)]
    figures = [f for f in (_figure(exp_dir, fig) for fig in summary.get("figures", [])) if f is not None]
    return {
        "name": str(name), "description": summary.get("description", ""), "scale": summary.get("scale", "?"),
        "seeds": summary.get("seeds", "?"),
        "made": {"code": str(made.get("code", "unrecorded")), "backproplab": str(made.get("backproplab", "?")),
                 "commit": str(made.get("commit") or "none"), "torch": str(made.get("torch", "?"))},
        "show_setting": bool(summary.get("deviations") or summary.get("paper_setting")),
        "paper_setting": str(summary.get("paper_setting") or "not recorded"),
        "run_setting": str(summary.get("run_setting") or summary.get("scale", "?")),
        "deviations": [str(d) for d in summary.get("deviations") or []], "stale": why_stale,
        "verdicts": [{"outcome": str(v["outcome"]), "extension": _is_extension(summary, v), "line": _verdict_line(v)}
                     for v in summary.get("verdicts", [])],
        "notes": [str(n) for n in summary.get("notes") or []], "metrics": metrics, "rows": rows,
        "problems": problems, "figures": figures,
        "config": json.dumps(summary.get("config", {}), indent=1, sort_keys=True)}


def _verdict_line(v: dict) -> str:
    text = f"{v['claim']}: {v['outcome']} — estimate {_num(v['estimate'])}, 95% CI {_interval(v)}, n={v['n']}"
    return text + (f"; {v['note']}" if v.get("note") else "")


def _scale_banners(summaries: list[dict]) -> list[dict]:
    """A banner for every scale below full that any experiment here ran at, naming those experiments."""
    out = []
    for scale, text in SCALE_BANNERS.items():
        names = [str(s.get("experiment")) for s in summaries if s.get("scale") == scale]
        if names:
            out.append({"scale": scale, "text": text, "names": names})
    return out


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("backproplab", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.jinja")


def build_report(results_dir: str | Path, out_file: str | Path | None = None, recorded: str | Path = RECORDED) -> Path:
    """Write ``report.html`` (or ``out_file``) for every experiment under ``results_dir``, each verdict beside the
    full-scale verdict recorded in ``recorded`` (see :func:`record`).

    Example:
        >>> import tempfile
        >>> from backproplab.experiments import get, make_config, run
        >>> out = tempfile.mkdtemp()
        >>> _ = run(get("baselines"), make_config(get("baselines"), ["seeds=2", "optimizers=sgd,momentum"],
        ...                                          scale="smoke"), out=out, progress=False, scale="smoke")
        >>> page = build_report(out).read_text()
        >>> "baselines" in page, "digits-mlp-momentum" in page
        (True, True)
    """
    results_dir = Path(results_dir)
    exp_dirs = sorted(p.parent for p in results_dir.glob("*/summary.json"))
    if not exp_dirs:
        raise FileNotFoundError(f"no experiment results under {results_dir} (expected {results_dir}/<experiment>/"
                                "summary.json); run `backproplab run NAME` or `backproplab reproduce` first")
    summaries, broken = [], []
    for d in exp_dirs:
        summary = _read_json(d / "summary.json", problems := [])
        if isinstance(summary, dict) and isinstance(summary.get("experiment"), str):
            summaries.append((d, summary))
        else:
            broken.append((d, problems[0] if problems else f"{d / 'summary.json'}: not a summary object"))
    sections = []
    for d, summary in summaries:
        try:
            sections.append(_section(d, summary))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed summary breaks its section only
            broken.append((d, f"{d / 'summary.json'}: malformed ({type(e).__name__}: {e})"))
    page = _template().render(
        style=STYLE, stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), code=code_hash(),
        torch_version=torch.__version__, python_version=platform.python_version(), names=[d.name for d in exp_dirs],
        banners=_scale_banners([s for _, s in summaries]), sections=sections,
        broken=[{"name": d.name, "why": why} for d, why in broken],
        **_claims_context([s for _, s in summaries], recorded_verdicts(recorded)))
    out = Path(out_file) if out_file else results_dir / "report.html"
    _io.write_text(out, page)
    return out
