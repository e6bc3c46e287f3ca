"""Results folder -> one self-contained HTML page (figures embedded as PNG data URIs).

Reads only result files: ``<dir>/<experiment>/summary.json``, the figures beside it, and the ``final.json``
of each run whose ``config.json`` belongs to the summarised config. The first screen is one table of
every claim judged: the claim, what the paper says, the measured estimate with its confidence interval,
seeds, scale and the verdict, each linked to its experiment's section. Per experiment: the verdicts,
notes, a table of final metrics (mean and sd over seeds), the figures and the config.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

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
    """[(arm, finished seeds, diverged seeds, {metric: (mean, sd)})] from each run's final.json."""
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
    and for the lab's extensions, which say nothing about the paper)."""
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
    "contradicted, not yet checked for our artifacts" (:func:`unchecked`)."""
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
    (the paper's claims, then the lab's extensions apart), and the analysis notes the run wrote."""
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
    """{claim id: the recorded full-scale verdict, with the record's provenance} from ``source``."""
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


def _recorded_cell(v: dict, recorded: dict[str, dict]) -> str:
    """The recorded full-scale verdict of ``v``'s claim, flagged when this run's verdict contradicts it."""
    rec = recorded.get(v.get("claim"))
    if rec is None or v.get("scale") == "full":
        return "<td><small>none recorded</small></td>" if rec is None else "<td><small>this is a full run</small></td>"
    ci = (f" [{_num(rec.get('ci_low'))}, {_num(rec.get('ci_high'))}]" if rec.get("ci_low") is not None else "")
    opposite = {v.get("outcome"), rec.get("outcome")} == {"reproduced", "contradicted"}
    flag = "<br><b class='disagrees'>this run disagrees with the record</b>" if opposite else ""
    if rec.get("unchecked"):
        flag += (f"<br><small>not yet checked for our own artifacts: {html.escape(', '.join(rec['unchecked']))}"
                 "</small>")
    elif rec.get("checked"):
        flag += (f"<br><small>artifact checks (tuning, metric, scale, premise): docs/results/"
                 f"{html.escape(str(rec.get('experiment')))}.md</small>")
    return (f"<td class='{html.escape(str(rec.get('outcome')))}'><b>{html.escape(str(rec.get('outcome')))}</b> "
            f"<small>{_num(rec.get('estimate'))}{ci}, n={rec.get('n')}, "
            f"recorded {html.escape(str(rec.get('recorded')))}"
            f", commit {html.escape(str(rec.get('commit') or 'none')[:10])}</small>{flag}</td>")


def _is_extension(s: dict, v: dict) -> bool:
    claim = next((c for c in s.get("claims") or [] if isinstance(c, dict) and c.get("id") == v.get("claim")), {})
    return bool(claim.get("extension"))


def _claim_rows(s: dict, extensions: bool = False, recorded: dict[str, dict] | None = None) -> list[str]:
    rows = []
    recorded = {} if recorded is None else recorded
    claims = {c["id"]: c for c in s.get("claims", [])}
    for v in s.get("verdicts", []):
        c = claims.get(v["claim"], {})
        if bool(c.get("extension")) != extensions:
            continue
        ci = (f"[{_num(v['ci_low'])}, {_num(v['ci_high'])}]" if v.get("ci_low") is not None
              and math.isfinite(v["ci_low"]) else "[no interval]")
        hyp = c.get("metric_label") or c.get("metric", "")
        rows.append(
            f"<tr class='{html.escape(str(v['outcome']))}'><td><b>{html.escape(v['claim'])}</b><br>"
            f"<small>{html.escape(c.get('statement', ''))}</small></td>"
            + (f"<td><i>this lab's claim, not the paper's:</i> {html.escape(str(c.get('extension')))}</td>"
               if extensions else
               f"<td>{html.escape(c.get('paper', ''))}, {html.escape(c.get('where', ''))}: "
               f"{html.escape(c.get('paper_value', ''))}"
               + (f"<br><small class='quote'>{html.escape(c['quote'])}</small>" if c.get("quote") else "")
               + "</td>") +
            f"<td class='num'><span class='nowrap'>{_num(v['estimate'])}</span> <span class='nowrap'>{ci}</span>"
            f"<br><small>{html.escape(hyp)}; "
            f"{html.escape(c.get('direction', ''))}, margin {c.get('margin', 0):g}</small></td>"
            f"<td class='num'>{v['n']}</td>"
            f"<td><small>{html.escape(str(s.get('paper_setting') or 'not recorded'))}</small></td>"
            f"<td><small>{html.escape(str(s.get('run_setting') or (v.get('scale', '') + ' scale')))}"
            + (f" <a href='#{html.escape(s['experiment'])}-deviations'>deviations</a>" if s.get("deviations") else "")
            + "</small></td>"
            f"<td><b>{html.escape(str(v['outcome']))}</b>"
            f"{'<br><small>' + html.escape(v['note']) + '</small>' if v.get('note') else ''}"
            f"</td>{_recorded_cell(v, recorded)}"
            f"<td><a href='#{html.escape(s['experiment'])}'>{html.escape(s['experiment'])}</a></td></tr>")
    return rows


def _claims_table(summaries: list[dict], recorded: dict[str, dict] | None = None) -> str:
    rows, extension_rows = [], []
    recorded = recorded_verdicts() if recorded is None else recorded
    for s in summaries:
        try:
            rows += _claim_rows(s, recorded=recorded)
            extension_rows += _claim_rows(s, extensions=True, recorded=recorded)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            name = html.escape(str(s.get("experiment")))
            rows.append(f"<tr class='contradicted'><td colspan='9'>{name}: claims unreadable in summary.json "
                        f"({html.escape(type(e).__name__)}); re-run the experiment</td></tr>")

    def count(extensions: bool) -> dict[str, int]:
        return {k: sum(isinstance(v, dict) and v.get("outcome") == k and _is_extension(s, v) == extensions
                       for s in summaries for v in (s.get("verdicts") or [])) for k in COLOURS}

    # reproduced first, contradicted last (stable: each experiment's claims keep their order within a verdict)
    def by_outcome(row: str) -> int:
        outcome = row.split("'", 2)[1] if row.startswith("<tr class='") else ""
        return OUTCOME_ORDER.get(outcome, len(OUTCOME_ORDER))

    rows, extension_rows = sorted(rows, key=by_outcome), sorted(extension_rows, key=by_outcome)
    counts, extension_counts = count(False), count(True)
    head = ("<colgroup><col style='width:19%'><col style='width:14%'><col style='width:13%'><col style='width:4%'>"
            "<col style='width:12%'><col style='width:12%'><col style='width:10%'><col style='width:11%'>"
            "<col style='width:5%'></colgroup>"
            "<tr><th>claim</th><th>paper says</th><th>measured: estimate [95% CI]</th><th>seeds</th>"
            "<th>paper's setting</th><th>this run's setting</th><th>verdict</th><th>recorded full-scale verdict</th>"
            "<th>section</th></tr>")
    return (f"<h2 id='claims'>Claims</h2><p>{len(rows)} claims judged: " +
            ", ".join(f"{n} {k}" for k, n in counts.items()) +
            ". Estimate: mean paired difference over seeds (arm minus comparison, or minus the threshold), in the "
            "metric's units. Reproduced: the whole interval on the claimed side of the margin; contradicted: the "
            "whole interval on the other side; inconclusive otherwise, with the effect the run could have detected "
            "(80% power).</p>"
            f"<table class='claims' id='claims-table'>{head}{''.join(rows)}</table>"
            + (f"<h2 id='extensions'>Extensions</h2><p>{len(extension_rows)} claims of this lab's own, not the papers' "
               "(a corrected method, or a reading the paper does not report), judged the same way: " +
               ", ".join(f"{n} {k}" for k, n in extension_counts.items()) + ". A verdict here says nothing about "
               "whether the paper's own claim holds.</p>"
               f"<table class='claims' id='extensions-table'>{head.replace('paper says', 'why it is ours')}"
               f"{''.join(extension_rows)}</table>" if extension_rows else ""))


def _section(exp_dir: Path, summary: dict) -> str:
    name = summary["experiment"]
    metrics = summary.get("table_metrics", ["test_acc", "test_loss", "train_loss"])
    made = summary.get("provenance") if isinstance(summary.get("provenance"), dict) else {}
    parts = [f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>",
             f"<p>{html.escape(summary.get('description', ''))} "
             f"<small>Scale: {html.escape(summary.get('scale', '?'))}, "
             f"{summary.get('seeds', '?')} seeds. Judged by code {html.escape(str(made.get('code', 'unrecorded')))}"
             f" (backproplab {html.escape(str(made.get('backproplab', '?')))}, commit "
             f"{html.escape(str(made.get('commit') or 'none'))}, torch {html.escape(str(made.get('torch', '?')))}"
             f").</small></p>"]
    deviations = summary.get("deviations") or []
    if deviations or summary.get("paper_setting"):
        parts.append(f"<p id='{html.escape(name)}-deviations'><small><b>Paper's setting:</b> "
                     f"{html.escape(str(summary.get('paper_setting') or 'not recorded'))}<br><b>This run:</b> "
                     f"{html.escape(str(summary.get('run_setting') or summary.get('scale', '?')))}</small></p>"
                     + ("<small><b>Deviations from the paper</b></small><ul>"
                        + "".join(f"<li><small>{html.escape(str(d))}</small></li>" for d in deviations) + "</ul>"
                        if deviations else ""))
    stale = summary.get("stale_runs") or []
    if stale or made.get("code") != code_hash():
        what = (f"{len(stale)} run(s) were made by other code than the code that judged them "
                f"({html.escape(', '.join(map(str, stale[:6])))}{', ...' if len(stale) > 6 else ''})" if stale else "")
        now = ("this summary was written by other code than the report's "
               f"({html.escape(str(made.get('code', 'unrecorded')))} vs {code_hash()})"
               if made.get("code") != code_hash() else "")
        parts.append(f"<p class='stale'><b>Made by other code:</b> {'; '.join(x for x in (what, now) if x)}. "
                     "Re-run with <code>--rerun-stale</code> to make every run with the current code.</p>")
    verdicts = summary.get("verdicts", [])
    items = "".join(f"<li class='{html.escape(str(v['outcome']))}'>"
                    f"{'[extension, not the paper' + chr(39) + 's claim] ' if _is_extension(summary, v) else ''}"
                    f"{html.escape(_verdict_line(v))}</li>" for v in verdicts)
    parts.append(f"<div class='verdict'><b>Verdicts</b><ul>{items or '<li>(no claim judged)</li>'}</ul>"
                 + (f"<b>Notes</b><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in summary.get('notes', []))}</ul>"
                    if summary.get("notes") else "") + "</div>")
    problems: list[str] = []
    rows = final_table(exp_dir, summary, metrics, problems)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{n}{f' (+{d} diverged)' if d else ''}</td>" +
        "".join(f"<td>{s[m][0]:.4g} ± {s[m][1]:.2g}</td>" if m in s else "<td>–</td>" for m in metrics) + "</tr>"
        for arm, n, d, s in rows)
    parts.append(f"<table><tr><th>arm</th><th>seeds</th>{head}</tr>{body}</table><small>mean ± sd over the seeds "
                 "that finished; diverged seeds are counted apart</small>")
    if problems:
        parts.append("<div class='inconclusive'><b>Unreadable files (left out)</b><ul>" +
                     "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul></div>")
    for fig in summary.get("figures", []):
        png = exp_dir / str(fig)
        # only a PNG that sits in the experiment folder itself: a summary cannot pull in other local files
        if Path(str(fig)).name != str(fig) or png.suffix != ".png" or png.is_symlink():
            parts.append(f"<p class='contradicted'>figure entry {html.escape(str(fig))!s} refused: not a PNG file "
                         "name inside the experiment folder</p>")
            continue
        if png.exists() and not png.is_file():  # a FIFO would block the read forever, a directory fail it
            parts.append(f"<p class='contradicted'>figure {html.escape(str(fig))} refused: not a regular file</p>")
        elif png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(fig)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(fig)}</figcaption></figure>")
    cfg = json.dumps(summary.get("config", {}), indent=1, sort_keys=True)
    parts.append(f"<details><summary>config</summary><pre>{html.escape(cfg)}</pre></details>")
    return "\n".join(parts)


def _verdict_line(v: dict) -> str:
    ci = (f"[{_num(v['ci_low'])}, {_num(v['ci_high'])}]" if v.get("ci_low") is not None and math.isfinite(v["ci_low"])
          else "[no interval]")
    text = f"{v['claim']}: {v['outcome']} — estimate {_num(v['estimate'])}, 95% CI {ci}, n={v['n']}"
    return text + (f"; {v['note']}" if v.get("note") else "")


def _scale_banner(summaries: list[dict]) -> str:
    """A banner at the top for every scale below full that any experiment here ran at, naming those experiments."""
    out = []
    for scale, text in SCALE_BANNERS.items():
        names = [str(s.get("experiment")) for s in summaries if s.get("scale") == scale]
        if names:
            out.append(f"<p class='banner' id='banner-{scale}'><b>{html.escape(text)}</b> "
                       f"<small>({html.escape(', '.join(names))})</small></p>")
    return "".join(out)


def build_report(results_dir: str | Path, out_file: str | Path | None = None, recorded: str | Path = RECORDED) -> Path:
    """Write ``report.html`` (or ``out_file``) for every experiment under ``results_dir``, each verdict beside the
    full-scale verdict recorded in ``recorded`` (see :func:`record`)."""
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
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = " · ".join(f"<a href='#{html.escape(d.name)}'>{html.escape(d.name)}</a>" for d in exp_dirs)
    sections = []
    for d, summary in summaries:
        try:
            sections.append(_section(d, summary))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed summary breaks its section only
            broken.append((d, f"{d / 'summary.json'}: malformed ({type(e).__name__}: {e})"))
    sections += [f"<h2 id='{html.escape(d.name)}'>{html.escape(d.name)}</h2><p class='contradicted'>This section "
                 f"could not be built: {html.escape(why)}. Re-run the experiment to rebuild it.</p>"
                 for d, why in broken]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>backproplab report</title>"
            f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>"
            f"<h1>backproplab report</h1><p>{stamp} · code {code_hash()} · torch {torch.__version__} · Python "
            f"{platform.python_version()} · {toc}</p>" + _scale_banner([s for _, s in summaries])
            + _claims_table([s for _, s in summaries], recorded_verdicts(recorded)) + "\n<hr>\n"
            + "\n<hr>\n".join(sections) + "</body></html>")
    out = Path(out_file) if out_file else results_dir / "report.html"
    _io.write_text(out, page)
    return out
