"""Every run names the code that made it; runs made by other code are flagged, kept, or with --rerun-stale
made again; the report says which."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backproplab import __version__, provenance
from backproplab.cli import main

TINY = ["datasets=digits", "models=mlp", "optimizers=sgd", "epochs=1", "n_train=128"]


def _run(out, *extra):
    return main(["run", "baselines", "--set", *TINY, "--seeds", "2", "--out", str(out), "--no-progress", *extra])


def test_config_final_and_summary_record_the_code_versions_and_device(tmp_path):
    assert _run(tmp_path) == 0
    run = tmp_path / "baselines" / "digits-mlp-sgd" / "seed0"
    summary = json.loads((tmp_path / "baselines" / "summary.json").read_text())
    for record in (json.loads((run / "config.json").read_text())["provenance"],
                   json.loads((run / "final.json").read_text())["provenance"], summary["provenance"]):
        assert record["code"] == provenance.code_hash() and record["backproplab"] == __version__
        assert record["torch"] == torch.__version__
    assert json.loads((run / "final.json").read_text())["provenance"]["device"] == "cpu"
    assert summary["stale_runs"] == []
    assert "class='stale'" not in (tmp_path / "report.html").read_text()


@pytest.mark.medium
def test_runs_made_by_other_code_are_flagged_kept_and_rerun_on_request(tmp_path, capsys):
    assert _run(tmp_path) == 0
    final = tmp_path / "baselines" / "digits-mlp-sgd" / "seed1" / "final.json"
    record = json.loads(final.read_text())
    record["provenance"]["code"] = "0" * 16  # as if an earlier version of the code had made it
    final.write_text(json.dumps(record))
    capsys.readouterr()

    assert _run(tmp_path) == 0  # kept, and said so
    err = capsys.readouterr().err
    assert "1 finished run(s) of baselines were made by other code" in err and "--rerun-stale" in err
    assert json.loads(final.read_text())["provenance"]["code"] == "0" * 16
    summary = json.loads((tmp_path / "baselines" / "summary.json").read_text())
    assert summary["stale_runs"] == ["digits-mlp-sgd/seed1"]
    page = (tmp_path / "report.html").read_text()
    assert "class='stale'" in page and "digits-mlp-sgd/seed1" in page and "--rerun-stale" in page

    assert _run(tmp_path, "--rerun-stale") == 0  # made again by this code
    assert json.loads(final.read_text())["provenance"]["code"] == provenance.code_hash()
    assert json.loads((tmp_path / "baselines" / "summary.json").read_text())["stale_runs"] == []


def test_a_run_without_provenance_counts_as_stale():
    assert provenance.is_stale(None) and provenance.is_stale({"torch": "2.0"})
    assert provenance.is_stale({"code": "0" * 16}) and not provenance.is_stale(provenance.provenance())


def test_the_code_hash_follows_the_source_files(tmp_path, monkeypatch):
    original = provenance.code_hash()
    copy = tmp_path / "backproplab"
    shutil.copytree(provenance.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE", copy)
    provenance.code_hash.cache_clear()
    try:
        same = provenance.code_hash()
        (copy / "README.txt").write_text("not code")  # only .py files count
        provenance.code_hash.cache_clear()
        assert provenance.code_hash() == same
        train = copy / "train.py"
        train.write_text(train.read_text().replace("lr: float = option(0.05", "lr: float = option(0.06"))
        provenance.code_hash.cache_clear()
        changed = provenance.code_hash()
    finally:
        provenance.code_hash.cache_clear()
    assert same == original and changed != same  # the copy hashes as the package itself; one edit changes it


def test_the_commit_is_the_checkouts_and_a_copy_inside_another_repository_gets_none(tmp_path, monkeypatch):
    import subprocess

    head = subprocess.run(["git", "-C", str(provenance.PACKAGE), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit().split("+")[0] == head
        repo = tmp_path / "project"  # a user's repository with an installed copy of the package in it
        copy = repo / ".venv" / "site-packages" / "backproplab"
        shutil.copytree(provenance.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / "README").write_text("x")
        subprocess.run(["git", "-C", str(repo), "add", "README"], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "x"],
                       check=True)
        monkeypatch.setattr(provenance, "PACKAGE", copy)
        provenance.git_commit.cache_clear()
        assert provenance.git_commit() is None
    finally:
        provenance.git_commit.cache_clear()
