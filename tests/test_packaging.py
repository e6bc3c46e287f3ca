"""The core install is the library: it works without the lab's packages, and what needs them names the extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB_ONLY = ("opacus", "sklearn", "matplotlib", "mnist1d", "threadpoolctl", "filelock")

SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec returns None
import torch, torch.nn.functional as F
from torch import nn
import backproplab
from backproplab import CurveBall, TrainConfig, fit, linear_backprop_scope
from backproplab.data import Data
from backproplab.methods.msgd import LossWeighting

torch.manual_seed(0)
x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
opt = CurveBall(model.parameters(), model=model, lr=0.5, momentum=0.9)
loss = opt.step(lambda: F.cross_entropy(model(x), y))
assert torch.isfinite(loss)
with linear_backprop_scope(model):
    F.cross_entropy(model(x), y).backward()
LossWeighting.weighted_loss(F.cross_entropy(model(x), y, reduction="none"), torch.ones(32)).backward()
data = Data("toy", x, y, x[:8], y[:8], 3)
history = fit(model, data, TrainConfig(lr=0.1, epochs=1, batch_size=8))
assert history and "test_acc" in history[-1]
for name in {blocked!r}:
    assert sys.modules[name] is None, name  # nothing needed them
messages = []
try:
    from backproplab.methods.privacy import DPConfig, DPSGD
    DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=32, batch_size=8, steps=4, config=DPConfig())
except ImportError as e:
    messages.append(str(e))
try:
    backproplab.load_dataset("digits")
except ImportError as e:
    messages.append(str(e))
from backproplab.cli import main
code = main(["list"])
print("CODE", code)
print("MESSAGES", messages)
"""


@pytest.mark.medium
def test_the_library_runs_without_the_lab_packages_and_names_the_extra_when_they_are_needed():
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=LAB_ONLY)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "CODE 2" in out and "pip install 'backproplab[lab]'" in done.stderr  # the CLI is the lab
    assert "pip install 'backproplab[dp]'" in out and "DP-SGD" in out
    assert "pip install 'backproplab[lab]'" in out and "digits" in out


def test_the_core_dependencies_leave_the_lab_out_and_the_extras_bring_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    pip_names = {"sklearn": "scikit-learn"}
    lab = {d.split(">")[0].strip() for d in project["optional-dependencies"]["lab"]}
    assert core == {"torch", "numpy", "scipy", "tqdm"}
    assert {pip_names.get(m, m) for m in LAB_ONLY} <= lab
    assert {d.split(">")[0] for d in project["optional-dependencies"]["dp"]} == {"opacus"}
    assert project["license"] == "MIT"  # an SPDX expression: the licence table is deprecated by setuptools


def test_version_flag(capsys):
    import pytest

    from backproplab import __version__
    from backproplab.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"backproplab {__version__}"


def test_citation_file_names_this_version():
    import pytest

    yaml = pytest.importorskip("yaml")
    from backproplab import __version__

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["version"] == __version__ and citation["title"]
