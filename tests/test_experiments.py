"""Every registered experiment at smoke scale, end to end: runs, claims, verdicts, the report in a browser."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backproplab import experiments
from backproplab.cli import main
from backproplab.evidence import Claim

# runs experiments, the CLI or a local server: not in the fast tier (make test-fast)
pytestmark = pytest.mark.medium


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["reproduce", "--scale", "smoke", "--executor", "local", "--out", str(out), "--no-progress"]) == 0
    return out


def test_every_experiment_runs_at_smoke_scale_and_judges_its_claims(smoke):
    for exp in experiments.all_experiments():
        summary = json.loads((smoke / exp.name / "summary.json").read_text())
        cfg = experiments.make_config(exp, scale="smoke")
        claims = exp.claims(cfg)
        assert claims, f"{exp.name} declares no claim at smoke scale"
        assert summary["scale"] == "smoke" and summary["seeds"] == cfg.seeds
        judged = {v["claim"]: v for v in summary["verdicts"]}
        assert set(judged) == {c.id for c in claims}, exp.name
        for v in judged.values():
            assert v["outcome"] in ("reproduced", "contradicted", "inconclusive")
            assert v["scale"] == "smoke" and v["n"] == 2 and v["seeds"] == [0, 1]
            if v["outcome"] == "inconclusive":
                assert v["note"], v  # says why, and what the run could have detected
        # the runner wrote final.json once per run, from what run_arm returned
        for arm in exp.arms(cfg):
            for seed in range(exp.seeds_of(cfg)(arm)):
                run = smoke / exp.name / arm.name / f"seed{seed}"
                assert json.loads((run / "config.json").read_text())["seed"] == seed
                assert isinstance(json.loads((run / "final.json").read_text()), dict)


def test_a_smoke_reproduce_gives_the_recorded_result_files(smoke):
    """#36: a change meant to leave behaviour alone leaves every result alone. Each JSON result of the smoke
    reproduction (timing and provenance aside, as ``scripts/compare_results.py`` compares them) hashes to the
    digest recorded in ``tests/smoke_digest.json``. The digest holds for the torch build, numpy and CPU
    vector kind it was made with; elsewhere the last bits of a float may differ, so the test is skipped there.
    A change meant to alter results records a new digest (the command is in the message) and says why."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_results", Path(__file__).parents[1] / "scripts"
                                                  / "compare_results.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    recorded = json.loads((Path(__file__).parent / "smoke_digest.json").read_text())
    if recorded["environment"] != compare.environment():
        pytest.skip(f"the digest was made with {recorded['environment']}, this is {compare.environment()}")
    got = compare.digest(smoke)
    differ = sorted(k for k in set(got) | set(recorded["files"]) if got.get(k) != recorded["files"].get(k))
    assert not differ, (f"{len(differ)} of {len(got)} smoke result files differ from the recorded digest: "
                        f"{differ[:10]}. If the change was meant to alter results: python "
                        "scripts/compare_results.py --digest OUT > tests/smoke_digest.json, after "
                        "backproplab reproduce --scale smoke --executor local --out OUT")


def test_every_verdict_is_shown_beside_the_papers_setting_and_this_runs(smoke):
    """#34: the claims table has the paper's setting and this run's (data, model, budget, scale) on every row,
    and each experiment's section lists its deviations from the paper."""
    import html as html_lib

    page = (smoke / "report.html").read_text()
    table = page[page.index("id='claims-table'"):page.index("</table>", page.index("id='claims-table'"))]
    assert "<th>paper's setting</th><th>this run's setting</th>" in table
    for exp in experiments.all_experiments():
        summary = json.loads((smoke / exp.name / "summary.json").read_text())
        cfg = experiments.make_config(exp, scale="smoke")
        assert exp.paper_setting and exp.deviations, f"{exp.name}: paper setting and deviations must be stated"
        assert summary["paper_setting"] == exp.paper_setting and summary["deviations"] == list(exp.deviations)
        assert summary["run_setting"] == experiments.run_setting(cfg, "smoke")
        assert summary["run_setting"].startswith(f"smoke scale, {cfg.seeds} seeds")
        papers = [v for v in summary["verdicts"]
                  if not next(c for c in summary["claims"] if c["id"] == v["claim"]).get("extension")]
        rows = [r for r in table.split("<tr")[2:] if f"<a href='#{exp.name}'>" in r]
        assert len(rows) == len(papers), exp.name  # one row per paper claim, each with both settings
        for row in rows:
            text = html_lib.unescape(row)
            assert exp.paper_setting in text and summary["run_setting"] in text
            assert f"href='#{exp.name}-deviations'" in row
        section = page[page.index(f"id='{exp.name}-deviations'"):]
        assert all(d in html_lib.unescape(section[:4000]) for d in exp.deviations), exp.name


def test_claims_cover_the_seven_methods_and_are_well_formed(capsys):
    pairs = experiments.all_claims()
    ids = [c.id for _, c in pairs]
    assert len(ids) == len(set(ids)), "claim ids must be unique"
    by_exp = {}
    for exp, c in pairs:
        assert isinstance(c, Claim) and c.statement and c.paper and c.where and c.paper_value
        arm_names = {a.name for a in exp.arms(exp.config())}
        assert c.arm in arm_names and (c.baseline is None or c.baseline in arm_names), c.id
        by_exp.setdefault(exp.name, []).append(c)
    for name in ("curveball", "msgd", "linear_backprop", "layerwise", "rifle", "luck_matters", "stobatch"):
        assert by_exp.get(name), f"no claim for {name}"
    # the claims the seeds name in passing
    for wanted in ("luck_matters.lucky_nodes_specialize", "luck_matters.bn_bias_negative", "rifle.deeper_updates"):
        assert wanted in ids
    assert main(["claims"]) == 0
    out = capsys.readouterr().out
    for _, c in pairs:
        assert c.id in out and c.statement in out


def test_same_seed_same_arms_share_data_and_initial_weights(tmp_path, monkeypatch):
    """Seed k of two arms gets the same data subset and initial weights; another seed gets others."""
    import torch


    seen = {}
    real_fit = experiments.Run.fit

    def fit(self, model, data, config, **kwargs):  # the model arrives untrained: its weights are the init
        seen[(self.arm.optimizer, self.seed)] = ({k: v.clone() for k, v in model.state_dict().items()},
                                                 data.x_train.clone())
        return real_fit(self, model, data, config, **kwargs)

    monkeypatch.setattr(experiments.Run, "fit", fit)
    exp = experiments.get("baselines")
    cfg = experiments.make_config(exp, ["optimizers=sgd,momentum", "epochs=1", "n_train=200"], scale="smoke")
    experiments.run(exp, cfg, out=tmp_path, progress=False)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    (sgd0, x_sgd0), (sgd1, x_sgd1) = seen[("sgd", 0)], seen[("sgd", 1)]
    (mom0, x_mom0), (mom1, x_mom1) = seen[("momentum", 0)], seen[("momentum", 1)]
    assert same(sgd0, mom0) and same(sgd1, mom1) and not same(sgd0, sgd1)
    assert torch.equal(x_sgd0, x_mom0) and torch.equal(x_sgd1, x_mom1) and not torch.equal(x_sgd0, x_sgd1)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("CI must have chromium (.ci/run installs Debian's package)")
    pytest.skip("no chromium on this machine (.ci/run installs it)")


PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.naturalWidth, i.naturalHeight]);
  const table = document.getElementById('claims-table'), fig = document.querySelector('img');
  const order = table && fig ? ((table.compareDocumentPosition(fig) & Node.DOCUMENT_POSITION_FOLLOWING)
                                ? 'table-first' : 'figure-first') : 'missing';
  const top = table ? table.getBoundingClientRect().top : -1;
  const ext = document.getElementById('extensions-table');
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({imgs, order, top, rows: table ? table.rows.length : 0,
                                  extension_rows: ext ? ext.rows.length - 1 : 0});
  document.body.appendChild(p);
});</script>"""


def test_report_renders_in_a_browser_with_the_claims_table_first(smoke, tmp_path):
    chromium = _chromium()
    page = (smoke / "report.html").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=15000"]
    dom = subprocess.run(flags + ["--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["order"] == "table-first"
    assert 0 <= probe["top"] < 900, "the claims table starts on the first screen"
    summaries = [json.loads(p.read_text()) for p in smoke.glob("*/summary.json")]
    n_verdicts = sum(len(s["verdicts"]) for s in summaries)
    extensions = {c["id"] for s in summaries for c in s["claims"] if c.get("extension")}
    n_extensions = sum(v["claim"] in extensions for s in summaries for v in s["verdicts"])
    # a header and one row per judged claim: the papers' in the claims table, the lab's own in the extensions table
    assert probe["rows"] == n_verdicts - n_extensions + 1 and probe["extension_rows"] == n_extensions
    assert probe["imgs"] and all(w > 0 and h > 0 for w, h in probe["imgs"]), probe["imgs"]
    shot = tmp_path / "first_screen.png"
    subprocess.run(flags + [f"--screenshot={shot}", (smoke / "report.html").as_uri()], capture_output=True,
                   timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = Path(os.environ.get("BACKPROPLAB_SCREENSHOT_DIR", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "report_first_screen.png").write_bytes(shot.read_bytes())


PAPER_DATA = {"curveball": "cifar10", "msgd": "fashion_mnist", "linear_backprop": "cifar10", "stobatch": "mnist"}


def test_paper_scale_configs_are_listed_validated_here_and_stop_before_training_without_the_files(tmp_path, capsys):
    """--scale paper (for a GPU): each config builds and validates here, names the paper's dataset, is listed
    by `run NAME --help` with what still differs; without the files the run stops before anything trains,
    naming `backproplab data get`, and leaves no run folder; an experiment without one says which have one."""
    assert sorted(experiments.paper_scale_names()) == sorted(PAPER_DATA)
    for name, dataset in PAPER_DATA.items():
        exp = experiments.get(name)
        cfg = experiments.make_config(exp, scale="paper")
        assert (getattr(cfg, "datasets", None) or (cfg.dataset,)) == (dataset,)
        assert exp.paper_gaps and experiments.make_config(exp).__dict__ != cfg.__dict__
        with pytest.raises(SystemExit):
            main(["run", name, "--help"])
        assert f"sets {'datasets' if hasattr(cfg, 'datasets') else 'dataset'}={dataset}" in capsys.readouterr().out
        out = tmp_path / name
        assert main(["run", name, "--scale", "paper", "--seeds", "1", "--out", str(out), "--no-progress",
                     "--set", f"data_root={tmp_path / 'nothing'}"]) == 2
        assert f"backproplab data get {dataset}" in capsys.readouterr().err
        assert not out.exists() or not any(out.rglob("config.json"))
    with pytest.raises(experiments.ConfigError, match="has no paper scale.*curveball"):
        experiments.make_config(experiments.get("rifle"), scale="paper")


def test_the_smoke_report_says_its_verdicts_are_not_evidence_and_lists_contradicted_claims_last(smoke):
    page = (smoke / "report.html").read_text()
    assert "id='banner-smoke'" in page and "not evidence" in page and "id='banner-quick'" not in page
    assert page.index("id='banner-smoke'") < page.index("id='claims-table'")
    table = page[page.index("id='claims-table'"):page.index("</table>", page.index("id='claims-table'"))]
    outcomes = re.findall(r"<tr class='(reproduced|inconclusive|contradicted)'>", table)
    order = {"reproduced": 0, "inconclusive": 1, "contradicted": 2}
    assert outcomes and [order[o] for o in outcomes] == sorted(order[o] for o in outcomes)


def test_saved_figures_are_wide_and_no_text_is_below_eight_points(tmp_path):
    """Every figure is written at 150 dpi (a default panel is 750 px wide) and any smaller text (a legend at
    5 pt, tick labels) is raised to 8 pt before saving."""
    import struct

    from backproplab import plots

    fig, axes = plots.subplots(1, 1)
    axes[0][0].plot([0, 1], [0, 1], label="an arm")
    axes[0][0].legend(fontsize=5)
    axes[0][0].tick_params(labelsize=4)
    png = plots.save(fig, tmp_path / "f.png")
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (750, 555)
    import matplotlib.text

    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert sizes and min(sizes) >= 8


def test_the_report_shows_the_recorded_full_scale_verdict_beside_each_and_flags_a_disagreement(smoke, tmp_path):
    """`backproplab record` keeps full-scale verdicts (other scales refused); the report shows each beside the
    run's own verdict and flags a run whose verdict is the opposite of the record (here one recorded verdict
    is flipped to make such a case); without records each row says none is recorded."""
    from backproplab.report import build_report

    flipped = None
    for path in smoke.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        summary["scale"] = "full"
        for v in summary["verdicts"]:
            if flipped is None and v["outcome"] == "reproduced":
                v["outcome"], flipped = "contradicted", v["claim"]
        (tmp_path / "full" / path.parent.name).mkdir(parents=True)
        (tmp_path / "full" / path.parent.name / "summary.json").write_text(json.dumps(summary))
    assert flipped is not None
    assert main(["record", str(tmp_path / "full"), "--dest", str(tmp_path / "recorded")]) == 0
    assert len(list((tmp_path / "recorded").glob("*.json"))) == len(list(smoke.glob("*/summary.json")))
    with pytest.raises(ValueError, match="only full-scale verdicts are recorded"):
        main(["record", str(smoke), "--dest", str(tmp_path / "refused")])

    page = build_report(smoke, tmp_path / "r.html", recorded=tmp_path / "recorded").read_text()
    table = page[page.index("id='claims-table'"):page.index("</table>", page.index("id='claims-table'"))]
    rows = table.split("<tr class=")[1:]
    assert len(rows) > 1 and all("recorded 20" in r for r in rows) and "none recorded" not in table
    disagreeing = [r for r in rows if "this run disagrees with the record" in r]
    assert len(disagreeing) == 1 and f"<b>{flipped}</b>" in disagreeing[0]
    empty = build_report(smoke, tmp_path / "e.html", recorded=tmp_path / "nothing").read_text()
    assert "none recorded" in empty and "disagrees" not in empty.replace(".disagrees", "")


def test_record_writes_each_experiments_write_up_generated_from_its_record(smoke, tmp_path):
    """`record --docs` writes docs/<experiment>.md from the record alone: every verdict with its interval, the
    paper's claims apart from the lab's extensions, the settings and the commit; re-rendering the stored record
    gives the same text (so a hand edit shows)."""
    from backproplab.report import record_markdown

    full = tmp_path / "full" / "linear_backprop"
    full.mkdir(parents=True)
    summary = json.loads((smoke / "linear_backprop" / "summary.json").read_text()) | {"scale": "full"}
    full.joinpath("summary.json").write_text(json.dumps(summary))
    assert main(["record", str(tmp_path / "full"), "--dest", str(tmp_path / "rec"), "--docs",
                 str(tmp_path / "docs")]) == 0
    md = (tmp_path / "docs" / "linear_backprop.md").read_text()
    rec = json.loads((tmp_path / "rec" / "linear_backprop.json").read_text())
    assert md == record_markdown(rec)
    paper_part, extension_part = md.split("## Verdicts on the lab's extensions")
    for v in summary["verdicts"]:
        extension = next(c for c in summary["claims"] if c["id"] == v["claim"])["extension"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {v['claim']} |"))
        assert f"**{v['outcome']}**" in row and str(v["n"]) in row
        assert (row in extension_part) == bool(extension)
    assert "linear_backprop.sec4.binary" in paper_part and "linear_backprop.fig2.digits-relu" in extension_part
    assert f"commit {summary['provenance'].get('commit') or 'none'}" in md and summary["run_setting"] in md


def test_the_committed_write_ups_are_the_ones_their_records_generate():
    """docs/results/<experiment>.md for each committed record (src/backproplab/recorded/*.json) is exactly
    what record_markdown makes of it: the write-ups are generated, not written by hand."""
    from backproplab.report import RECORDED, record_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    for path in sorted(RECORDED.glob("*.json")):
        rec = json.loads(path.read_text())
        assert (docs / f"{rec['experiment']}.md").read_text() == record_markdown(rec), path.name


def test_a_recorded_contradiction_says_it_is_unchecked_until_the_four_artifact_checks_are_given(tmp_path):
    """#34 item 5: a recorded "contradicted" verdict on a paper's claim reads as not yet checked for our own
    artifacts until tuning, metric, scale and premise checks are recorded with it (`record --checks`); the
    extensions and other verdicts need none; the write-up then lists the checks."""
    from backproplab.report import record_markdown, recorded_verdicts, unchecked

    claims = [{"id": "x.paper", "extension": ""}, {"id": "x.ours", "extension": "why"}, {"id": "x.ok", "extension": ""}]
    verdicts = [{"claim": "x.paper", "outcome": "contradicted", "estimate": -1.0, "ci_low": -2.0, "ci_high": -0.5,
                 "n": 5}, {"claim": "x.ours", "outcome": "contradicted", "estimate": -1.0, "ci_low": -2.0,
                           "ci_high": -0.5, "n": 5},
                {"claim": "x.ok", "outcome": "reproduced", "estimate": 1.0, "ci_low": 0.5, "ci_high": 2.0, "n": 5}]
    (tmp_path / "full" / "x").mkdir(parents=True)
    (tmp_path / "full" / "x" / "summary.json").write_text(json.dumps(
        {"experiment": "x", "scale": "full", "seeds": 5, "claims": claims, "verdicts": verdicts}))
    partial = {"x.paper": {"tuning": "lr swept 4 values on validation for both arms: -5.1 points at the best of each",
                           "metric": "training loss agrees"}}
    (tmp_path / "checks.json").write_text(json.dumps(partial))
    assert main(["record", str(tmp_path / "full"), "--dest", str(tmp_path / "rec"),
                 "--checks", str(tmp_path / "checks.json")]) == 0
    rec = json.loads((tmp_path / "rec" / "x.json").read_text())
    assert unchecked(rec, "x.paper") == ["scale", "premise"] and unchecked(rec, "x.ours") == []
    assert unchecked(rec, "x.ok") == []
    md = record_markdown(rec)
    assert "not yet checked for our own artifacts: scale, premise" in md and "lr swept 4 values" in md
    assert recorded_verdicts(tmp_path / "rec")["x.paper"]["unchecked"] == ["scale", "premise"]

    full = {"x.paper": partial["x.paper"] | {"scale": "3x the epochs: -4.8 points", "premise": "BN as the paper"}}
    (tmp_path / "checks.json").write_text(json.dumps(full))
    assert main(["record", str(tmp_path / "full"), "--dest", str(tmp_path / "rec"),
                 "--checks", str(tmp_path / "checks.json")]) == 0
    rec = json.loads((tmp_path / "rec" / "x.json").read_text())
    assert unchecked(rec, "x.paper") == [] and "not yet checked" not in record_markdown(rec)
    assert "3x the epochs: -4.8 points" in record_markdown(rec)


def test_every_committed_contradiction_of_a_papers_claim_carries_its_artifact_checks():
    from backproplab.report import RECORDED, unchecked

    for path in sorted(RECORDED.glob("*.json")):
        rec = json.loads(path.read_text())
        for v in rec["verdicts"]:
            assert unchecked(rec, v["claim"]) == [], (path.name, v["claim"])


def test_a_tuned_value_is_computed_once_per_folder_settings_and_code(tmp_path, monkeypatch):
    """`tuned` keeps a value tuned on the tuning seed in the experiment folder: asked again with the same key it
    is read, not recomputed; another key, a torn file or other code compute it again."""
    from backproplab import provenance
    from backproplab.experiments import tuned

    calls = []

    def compute(value):
        calls.append(value)
        return value

    assert tuned(tmp_path, "lr", {"grid": [0.1, 0.3]}, lambda: compute(0.3)) == 0.3
    assert tuned(tmp_path, "lr", {"grid": [0.1, 0.3]}, lambda: compute(0.1)) == 0.3 and calls == [0.3]
    assert tuned(tmp_path, "lr", {"grid": [0.1, 0.5]}, lambda: compute(0.5)) == 0.5  # other settings: own value
    [kept] = [p for p in (tmp_path / "_tuning").glob("lr-*.json")
              if json.loads(p.read_text())["identity"]["key"] == {"grid": [0.1, 0.3]}]
    kept.write_text('{"identity": ')  # torn by a crash
    assert tuned(tmp_path, "lr", {"grid": [0.1, 0.3]}, lambda: compute(0.7)) == 0.7
    monkeypatch.setattr(provenance, "code_hash", lambda: "other-code")
    assert tuned(tmp_path, "lr", {"grid": [0.1, 0.3]}, lambda: compute(0.9)) == 0.9
    assert calls == [0.3, 0.5, 0.7, 0.9]


def test_two_processes_tuning_the_same_value_tune_it_once(tmp_path):
    """Two workers (processes) that start the same arm at once: one tunes, the other waits and reads its value."""
    log = tmp_path / "computed.txt"
    script = ("import pathlib, sys, time\nfrom backproplab.experiments import tuned\n"
              "def compute():\n    open(sys.argv[2], 'a').write('x')\n    time.sleep(1.5)\n    return 0.25\n"
              "ready = pathlib.Path(sys.argv[1]) / 'ready'\nready.mkdir(exist_ok=True)\n"
              "(ready / sys.argv[3]).touch()\n"
              "while len(list(ready.iterdir())) < 2:\n    time.sleep(0.01)\n"  # both imported: start together
              "print(tuned(sys.argv[1], 'lr', {'grid': [0.25]}, compute))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(log), str(k)], stdout=subprocess.PIPE,
                              text=True) for k in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["0.25", "0.25"]
    assert log.read_text() == "x"


def test_runs_are_planned_seed_major_so_workers_tune_different_arms(tmp_path):
    exp = experiments.get("curveball")
    cfg = experiments.make_config(exp, scale="smoke")
    jobs = experiments.plan(exp, cfg, tmp_path)
    order = [(job.seed, job.arm.name) for job in jobs]
    seeds_of = exp.seeds_of(cfg)
    assert sorted(order) == sorted((seed, arm.name) for arm in exp.arms(cfg) for seed in range(seeds_of(arm)))
    assert [seed for seed, _ in order] == sorted(seed for seed, _ in order)  # every seed 0 before any seed 1
    assert len({arm for seed, arm in order if seed == 0}) == len(exp.arms(cfg))


def test_each_run_names_the_data_it_was_trained_on_by_its_fingerprint(smoke):
    """Run.data adds the training tensors' fingerprint to the run's config.json; it is the fingerprint of the
    same data loaded independently (seed k's split), and differs between seeds' splits."""
    import json

    from backproplab.data import fingerprint, load_dataset
    from backproplab.experiments import get, make_config

    cfg = make_config(get("baselines"), scale="smoke")
    prints = {}
    for seed in (0, 1):
        written = json.loads((smoke / "baselines" / "digits-mlp-sgd" / f"seed{seed}" / "config.json").read_text())
        n_train = cfg.n_train or None
        prints[seed] = fingerprint(load_dataset("digits", seed=seed, n_train=n_train, rest_to_test=True))
        assert written["data"] == {"digits": prints[seed]}
    assert prints[0] != prints[1]
