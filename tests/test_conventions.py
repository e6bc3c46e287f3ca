"""Library conventions a PyTorch user expects: import paths, loud no-ops, callbacks checked, shareable files,
a light import."""

import importlib
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backproplab
from backproplab import _io
from backproplab.data import load_dataset
from backproplab.models import build_model
from backproplab.train import TrainConfig, fit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_module_path_the_readme_names_imports():
    text = README.read_text()
    names = set(re.findall(r"`(backproplab(?:\.[a-z_]+)+)`", text))  # `backproplab.f()` names a function
    names |= {f"backproplab.{m}" for m in re.findall(r"from backproplab\.([a-z_]+) import", text)}
    modules = sorted(n for n in names if n.count(".") == 1 or n.startswith("backproplab.methods."))
    assert {"backproplab.msgd", "backproplab.rifle", "backproplab.layerwise"} <= set(modules)
    for name in modules:
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        assert getattr(importlib.import_module(parent), leaf) is module  # one object under both paths
    from backproplab.rifle import RIFLE  # noqa: F401  (the issue's example)
    from backproplab import CrossEntropy, KNOWN_ACTIVATIONS, MeanSquaredError  # noqa: F401


def test_linear_backprop_on_a_functional_model_warns():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    with pytest.warns(UserWarning, match="switched nothing.*F.relu"):
        backproplab.linear_backprop(Functional())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backproplab.linear_backprop(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))  # a module: no warning


def test_fit_refuses_something_that_is_not_a_callback():
    data = load_dataset("digits", n_train=64)
    with pytest.raises(TypeError, match="Ellipsis is not a callback"):
        fit(build_model("mlp", data.input_shape, 10), data, TrainConfig(epochs=1), callbacks=[...])


def test_result_files_follow_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _io.write_json(tmp_path / "a.json", {"x": 1})
        _io.torch_save(tmp_path / "b.pt", {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


@pytest.mark.medium
def test_import_does_not_pull_in_heavy_optional_modules():
    """scipy.stats (over a second), matplotlib, Opacus and scikit-learn load on use, not on `import backproplab`."""
    code = ("import sys, backproplab; print([m for m in ('scipy.stats', 'matplotlib', 'opacus', 'sklearn') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_package_ships_a_license_and_type_marker():
    root = Path(__file__).resolve().parents[1]
    assert "MIT License" in (root / "LICENSE").read_text()
    assert (Path(backproplab.__file__).parent / "py.typed").exists()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 10


@pytest.mark.medium
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_readme_python_block_runs(index, tmp_path, monkeypatch):
    """Each Python block of the README runs as written, on its own (small data, in a scratch folder)."""
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent no-op (linear_backprop warns when it switches nothing)
        warnings.filterwarnings("ignore", message=".*(Optimal order|Full backward hook|Secure RNG|weights_only).*")
        exec(compile(code, f"README.md block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_an_msgd_weighting_for_another_n_fails_with_a_clear_message():
    from backproplab import msgd

    data = load_dataset("digits", n_train=100)
    model = build_model("mlp", data.input_shape, 10)
    with pytest.raises(ValueError, match="built for n=500 examples but the training set has 100"):
        fit(model, data, TrainConfig(optimizer="gd", max_steps=1),
            step=msgd.weighted_gradient_step(msgd.MSGDCov(500, 50)))


@pytest.mark.medium
def test_every_docstring_example_runs(tmp_path, monkeypatch):
    """The Example blocks of the public docstrings run as written (doctest), in a scratch folder."""
    import doctest
    import pkgutil

    monkeypatch.chdir(tmp_path)
    attempted, failed = 0, []
    for info in pkgutil.walk_packages(backproplab.__path__, "backproplab."):
        if info.name.endswith("__main__"):
            continue
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS, report=False)
        attempted += result.attempted
        failed += [info.name] * result.failed
    assert not failed, f"docstring examples fail in {sorted(set(failed))}"
    assert attempted >= 1500  # the examples exist: 1570 lines in 358 docstrings, every public name (2026-12-04)


def test_library_messages_go_through_the_backproplab_logger(capsys, caplog):
    """A library message (here prepare_model's BatchNorm replacement) is a record of the ``backproplab`` logger,
    shown on standard error by default, and silenced by the logger's level as users of logging expect."""
    import logging

    from backproplab.methods import privacy

    pytest.importorskip("opacus")
    privacy.prepare_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert "replacing 1 BatchNorm layer(s) by GroupNorm" in capsys.readouterr().err
    log = logging.getLogger("backproplab")
    before = log.level
    log.setLevel(logging.WARNING)
    try:
        privacy.prepare_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    finally:
        log.setLevel(before)
    assert capsys.readouterr().err == ""


def _import_graph() -> dict[str, set[str]]:
    """backproplab's modules and the backproplab modules each imports, read from the source (imports inside
    functions included: they hide a cycle from Python, not from this graph)."""
    import ast

    root = Path(backproplab.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (package[:len(package) - node.level + 1] if node.level else []) + (
                    node.module.split(".") if node.module else [])
                targets = [".".join(base + [a.name]) for a in node.names] + [".".join(base)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != module and target != "backproplab":
                    graph[module].add(target)
    return graph


def test_no_import_cycles_and_the_foundation_never_imports_a_method_or_the_runner():
    """Zero cycles among backproplab's modules (Tarjan's strongly connected components), and the foundation
    (data, train, models, dist, evidence, executors) imports neither ``methods`` nor ``experiments``: the
    methods' registry entries are filled by ``plugins``, and the executors receive ``run_job``. Inside
    ``experiments``, ``registry`` < ``config`` < ``runner``: an import upward there would be a cycle."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles
    foundation = ["backproplab." + m for m in ("data", "train", "models", "dist", "evidence", "executors", "streams",
                                               "fields")]
    upward = {m: sorted(t for t in graph[m] if t.startswith(("backproplab.methods", "backproplab.experiments")))
              for m in foundation}
    assert not any(upward.values()), upward


def test_every_seeded_stream_comes_from_the_one_seed_path():
    """#36 item 5: a generator is seeded only through ``streams.derive_seed`` (arithmetic such as ``seed + 1``
    or ``1000 + seed`` made streams of different seeds collide). Every ``manual_seed``, ``default_rng``,
    ``random.seed`` or ``GaussianNoise`` call in the package takes a ``derive_seed(...)`` expression, except
    where the run's seed itself seeds the global generators (``train.seed_everything``) and where a derived
    seed is kept and applied (``privacy.GaussianNoise.generator_on``)."""
    import ast

    allowed = {("train.py", "seed_everything"), ("privacy.py", "generator_on"), ("streams.py", "derive")}
    root = Path(backproplab.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        enclosing: dict[ast.AST, str] = {}  # each node's innermost function (walked outer first)
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                enclosing.update((node, func.name) for node in ast.walk(func))
        for node in ast.walk(tree):
            called = node.func.attr if isinstance(getattr(node, "func", None), ast.Attribute) else \
                node.func.id if isinstance(getattr(node, "func", None), ast.Name) else None
            if not (isinstance(node, ast.Call) and called in ("manual_seed", "default_rng", "seed", "GaussianNoise")):
                continue
            name = enclosing.get(node, "<module>")
            if (path.name, name) in allowed:
                continue
            if not any("derive_seed(" in ast.get_source_segment(source, a) for a in node.args):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} in {name}: "
                                 f"{ast.get_source_segment(source, node)}")
    assert not offenders, sorted(set(offenders))


def test_compare_results_ignores_timing_and_provenance_but_not_a_result(tmp_path, capsys):
    """scripts/compare_results.py (the before/after check of a refactoring): a run whose files differ only in
    wall time, a code hash and a quoted number of seconds compares equal; one changed accuracy does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_results", Path(__file__).parents[1] / "scripts"
                                                  / "compare_results.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def write(root: Path, acc: float, wall: float, code: str) -> str:
        run = root / "exp" / "arm" / "seed0"
        run.mkdir(parents=True)
        (run / "final.json").write_text(json.dumps({"test_acc": acc, "wall_time": wall,
                                                    "provenance": {"code": code, "torch": "2"}}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "step_time": wall}) + "\n")
        (root / "exp" / "summary.json").write_text(json.dumps({"notes": [f"mean wall time {wall:.1f} s"]}))
        return str(root)

    before = write(tmp_path / "a", 0.9, 1.0, "aaa")
    assert compare.main(before, write(tmp_path / "b", 0.9, 2.5, "bbb")) == 0
    assert compare.main(before, write(tmp_path / "c", 0.8, 1.0, "aaa")) == 1
    assert "exp/arm/seed0/final.json" in capsys.readouterr().out
